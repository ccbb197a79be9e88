"""Several processes, one run: device per rank, rank 0 writes, and a 2-process (gloo, CPU) run of stage 1 and of
FLARE (cross-attention) that computes what one process computes with the same global batch."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from flare import common_args, stages

REPO = Path(__file__).resolve().parents[1]
DATA = str(REPO / "data")


# ------------------------------------------------------------------------------------------- device per rank
@pytest.fixture
def two_gpus(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_each_rank_gets_its_own_gpu(monkeypatch, two_gpus):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert common_args.resolve_device("auto") == "cuda"  # a plain run: the current GPU
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert common_args.resolve_device("auto") == "cuda:1" and common_args.resolve_device("cuda") == "cuda:1"
    assert common_args.resolve_device("cpu") == "cpu"
    # the 8-bit optimizer default follows the GPU, whichever it is
    assert stages.default_optim(None, "4bit", "cuda:1") == "adamw_bnb_8bit"
    assert stages.default_optim(None, "4bit", "cpu") == "adamw_torch"
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(common_args.UsageError, match="only 2 GPU"):
        common_args.resolve_device("auto")


def test_the_quantised_model_is_placed_on_the_rank_gpu(monkeypatch):
    """load_model passes the rank's device to bitsandbytes' device_map (not 'cuda', which is GPU 0 on every rank)."""
    from flare.config import resolve_model
    from flare.models import loading

    seen = {}

    class Stop(Exception):
        pass

    def fake_from_pretrained(*args, **kwargs):
        seen.update(kwargs)
        raise Stop

    import transformers

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_from_pretrained)
    with pytest.raises(Stop):
        loading.load_model(resolve_model("llama3.1-8b"), "nusax", quantize="4bit", device="cuda:3", bf16=False)
    assert seen["device_map"] == {"": "cuda:3"}


def test_a_plain_run_never_spreads_one_process_over_several_gpus(tmp_path, tiny_models):
    """A plain ``python run.py`` where 4 GPUs are visible: transformers would set n_gpu = 4, multiply the batch by
    4 and wrap the model in nn.DataParallel (FLARE's source states on GPU 0, hooks on replicas elsewhere). The
    arguments both stages train with keep one process on one device: batch as given, no DataParallel."""
    import torch
    from transformers import Trainer
    from transformers.training_args import ParallelMode

    from flare import stage1

    cfg = stage1.resolve_config(stage1.build_parser().parse_args(
        ["--task", "nusax", "--plm", str(tiny_models / "xlm-roberta"), "--batch_size", "4", "--device", "cpu",
         "--seed", "1", "--output_dir", str(tmp_path), "--epochs", "1"]))
    args = stages.training_arguments(cfg, 40, ("labels",), "f1")
    _ = args.device
    args._n_gpu = 4  # what TrainingArguments._setup_devices sets in a non-distributed process that sees 4 GPUs
    assert args.n_gpu == 1 and args.train_batch_size == 4 and args.parallel_mode == ParallelMode.NOT_PARALLEL
    assert args.max_steps == 10  # 40 examples / batch 4, one epoch
    trainer = Trainer(model=torch.nn.Linear(2, 2), args=args, eval_dataset=[{"x": 0}])
    assert not isinstance(trainer._wrap_model(trainer.model), torch.nn.DataParallel)


def test_epoch_budget_counts_every_process(tmp_path, tiny_models, monkeypatch):
    """--epochs E under torchrun / accelerate launch: one optimizer step takes batch x accumulation x WORLD_SIZE
    examples, so the step budget is divided by the number of processes."""
    from flare import stage1

    cfg = stage1.resolve_config(stage1.build_parser().parse_args(
        ["--task", "nusax", "--plm", str(tiny_models / "xlm-roberta"), "--batch_size", "4", "--device", "cpu",
         "--seed", "1", "--output_dir", str(tmp_path), "--epochs", "3", "--gradient_accumulation_steps", "2"]))
    assert stages.training_arguments(cfg, 80, ("labels",), "f1").max_steps == 30  # 80 x 3 / (4 x 2)
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert stages.step_budget(80, cfg.opts) == 7  # 240 / 32, not 30


def test_only_rank_zero_writes(monkeypatch, tmp_path):
    monkeypatch.setenv("RANK", "1")
    assert not common_args.is_main_process()
    monkeypatch.setenv("RANK", "0")
    assert common_args.is_main_process()
    monkeypatch.delenv("RANK")
    assert common_args.is_main_process()


# ---------------------------------------------------------------------------------- 2 processes vs 1, for real
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: str, argv: list[str], nproc: int, launcher: str = "torchrun") -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    env.pop("RANK", None), env.pop("LOCAL_RANK", None), env.pop("WORLD_SIZE", None)
    if nproc == 1:
        cmd = [sys.executable, str(REPO / script), *argv]
    elif launcher == "accelerate":
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), str(REPO / script), *argv, "--device", "cpu"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(REPO / script), *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def no_dropout_model(tiny_models, tmp_path_factory) -> Path:
    """The tiny XLM-R without dropout: each rank draws its own dropout masks, so only a dropout-free model can
    compute exactly what one process computes."""
    out = tmp_path_factory.mktemp("nodrop") / "xlm-roberta"
    shutil.copytree(tiny_models / "xlm-roberta", out)
    config = json.loads((out / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (out / "config.json").write_text(json.dumps(config))
    return out


def compare(one: Path, two: Path, prefix: str = "test") -> dict:
    r1 = json.loads((one / f"results_{prefix}.json").read_text())
    r2 = json.loads((two / f"results_{prefix}.json").read_text())
    assert (r1["world_size"], r2["world_size"]) == (1, 2)
    assert r1["effective_batch_size"] == r2["effective_batch_size"] == 8
    assert r2["train_loss"] == pytest.approx(r1["train_loss"], rel=1e-4)  # not 2x: see FlareTrainer
    for key in [k for k in r1 if k.startswith("test_") and k != "test_runtime"]:
        assert r2[key] == r1[key], key
    assert [v for _, v in r2["validation_history"]] == pytest.approx([v for _, v in r1["validation_history"]])
    assert (one / f"predictions_{prefix}.jsonl").read_text() == (two / f"predictions_{prefix}.jsonl").read_text()
    w1, w2 = load_file(one / "adapter_model.safetensors"), load_file(two / "adapter_model.safetensors")
    assert w1.keys() == w2.keys()
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-4
    return r2


def test_two_processes_train_stage1_as_one_does(tmp_path, no_dropout_model):
    """torchrun, 2 gloo processes x batch 4, against one process x batch 8 (in this process): the same run. With
    --epochs, as users type it: 16 examples x 2 epochs / global batch 8 = 4 optimizer steps in both (regression:
    the step budget ignored the number of processes, and torchrun trained 8 steps, 4 epochs)."""
    from flare import stage1

    common = ["--task", "nusax", "--plm", str(no_dropout_model), "--data_dir", DATA, "--max_train_samples", "16",
              "--max_eval_samples", "8", "--epochs", "2", "--lr", "1e-3", "--seed", "3", "--num_evals", "1"]
    assert stage1.main([*common, "--batch_size", "8", "--output_dir", str(tmp_path / "one")]) == 0
    proc = launch("run_task_ft.py", [*common, "--batch_size", "4", "--output_dir", str(tmp_path / "two")], 2)
    # DDP is not told to search the graph for unused parameters (there are none: transformers' default for a peft
    # model searched in every step and warned that it found none)
    assert "find_unused_parameters=True was specified" not in proc.stderr + proc.stdout
    name = "nusax-en-xlm-roberta-3"
    res = compare(tmp_path / "one" / name, tmp_path / "two" / name)
    one = json.loads((tmp_path / "one" / name / "results_test.json").read_text())
    assert res["train_steps"] == one["train_steps"] == 4
    assert res["epochs_trained"] == one["epochs_trained"] == 2
    assert res["precision"] == one["precision"] == "fp32"
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [name]  # one run directory


@pytest.mark.slow
def test_two_processes_compute_what_one_computes(tmp_path, no_dropout_model):
    """Stage 1, then FLARE with cross-attention (a fusion module outside peft, kept in sync by DDP), each run once
    with 1 process x batch 8 and once with torchrun 2 processes x batch 4: the same global batches (accelerate
    hands out whole per-rank batches in turn), so the same losses, metrics, predictions and weights up to float
    summation order; one run directory, written by rank 0."""
    common = ["--task", "nusax", "--plm", str(no_dropout_model), "--data_dir", DATA, "--max_train_samples", "32",
              "--max_eval_samples", "16", "--max_steps", "4", "--lr", "1e-3", "--seed", "3", "--num_evals", "2"]
    for n, batch in ((1, "8"), (2, "4")):
        launch("run_task_ft.py", [*common, "--batch_size", batch, "--output_dir", str(tmp_path / f"s1-{n}")], n)
    name = "nusax-en-xlm-roberta-3"
    compare(tmp_path / "s1-1" / name, tmp_path / "s1-2" / name)
    # accelerate launch (torchrun underneath) works as well
    launch("run_task_ft.py", [*common, "--batch_size", "4", "--output_dir", str(tmp_path / "s1-acc")], 2, "accelerate")
    compare(tmp_path / "s1-1" / name, tmp_path / "s1-acc" / name)

    tr = tmp_path / "translations"
    for src, tgt in (("en", "jav"), ("jav", "en")):
        launch("run_translate.py", ["--task", "nusax", "--source_lang", src, "--target_lang", tgt, "--model",
                                    "reference", "--output_dir", str(tr), "--data_dir", DATA], 1)
    flare = ["--target_lang", "jav", "--load_ckpt", str(tmp_path / "s1-1" / name), "--adapter", "lora",
             "--translate-train", "--path_mt", str(tr / "nusax" / "translate-jav-reference"),
             "--fusion_fn", "cross-attention"]
    for n, batch in ((1, "8"), (2, "4")):
        launch("run.py", [*common, *flare, "--batch_size", batch, "--output_dir", str(tmp_path / f"s2-{n}")], n)
    run = "nusax-en-jav-xlm-roberta-3-lora-8_cross-attention-translate-jav-reference-ttrain"
    res = compare(tmp_path / "s2-1" / run, tmp_path / "s2-2" / run)
    assert res["fusion_calls_train"] > 0 and res["fusion_calls_eval"] > 0
    f1 = load_file(tmp_path / "s2-1" / run / "fusion_model.safetensors")
    f2 = load_file(tmp_path / "s2-2" / run / "fusion_model.safetensors")
    assert max((f1[k] - f2[k]).abs().max().item() for k in f1) < 1e-4


def test_gradient_accumulation_computes_the_full_batch(tmp_path, no_dropout_model):
    """batch 4 x 2 accumulation steps = batch 8 on an encoder (regression: Trainer skipped dividing the loss by the
    accumulation steps, believing the peft-wrapped classifier normalised by num_items_in_batch)."""
    from flare import stage1

    common = ["--task", "nusax", "--plm", str(no_dropout_model), "--data_dir", DATA, "--max_train_samples", "32",
              "--max_eval_samples", "8", "--max_steps", "2", "--lr", "1e-3", "--seed", "3", "--num_evals", "1"]
    for name, flags in (("full", ["--batch_size", "8"]),
                        ("accum", ["--batch_size", "4", "--gradient_accumulation_steps", "2"])):
        assert stage1.main([*common, *flags, "--output_dir", str(tmp_path / name)]) == 0
    w = [load_file(tmp_path / n / "nusax-en-xlm-roberta-3" / "adapter_model.safetensors") for n in ("full", "accum")]
    assert max((w[0][k] - w[1][k]).abs().max().item() for k in w[0]) < 1e-5


@pytest.mark.parametrize("model,task", [("xlm-roberta", "nusax"), ("xlm-roberta", "tydiqa"),
                                        pytest.param("llama", "nusax", marks=pytest.mark.slow)])
def test_evaluation_is_sharded_across_ranks_and_gathered_in_order(tmp_path, tiny_models, model, task):
    """Under DDP each rank evaluates its share of the batches (an odd number of them here: 3 and 2 of 5, or 2 and 2
    of 4) and every rank ends with all predictions, in the examples' order: the predictions, generated texts and
    metrics of one process, on both ranks (so both pick the same best checkpoint). Regression: every rank ran the
    whole evaluation."""
    worker = "tests/shard_eval_worker.py"
    launch(worker, [str(tiny_models / model), task, str(tmp_path / "one.json")], 1)
    launch(worker, [str(tiny_models / model), task, str(tmp_path / "two.json")], 2)
    one = json.loads((tmp_path / "one.json").read_text())
    ranks = [json.loads((tmp_path / f"two.json.rank{r}").read_text()) for r in (0, 1)]
    n = one["n_batches"]
    assert one["batches_run"] == n and [r["batches_run"] for r in ranks] == [(n + 1) // 2, n // 2]
    for rank in ranks:
        assert rank["predictions"] == one["predictions"]
        assert rank["outputs"] == one["outputs"]
        assert rank["metrics"] == one["metrics"]


def test_an_eval_only_run_under_torchrun_is_sharded(tmp_path, no_dropout_model):
    """Zero-shot / --eval_only under torchrun: the ranks join the process group and split the test set (they used to
    evaluate all of it, each), and the predictions are those of one process."""
    common = ["--task", "nusax", "--plm", str(no_dropout_model), "--data_dir", DATA, "--seed", "2",
              "--max_eval_samples", "12", "--batch_size", "4", "--device", "cpu"]
    launch("run_task_ft.py", [*common, "--max_train_samples", "8", "--max_steps", "1", "--output_dir",
                              str(tmp_path / "s1")], 1)
    run = tmp_path / "s1" / "nusax-en-xlm-roberta-2"
    jav = [*common, "--target_lang", "jav", "--load_ckpt", str(run), "--eval_zs", "--eval_only"]
    launch("run.py", [*jav, "--output_dir", str(tmp_path / "one")], 1)
    launch("run.py", [*jav, "--output_dir", str(tmp_path / "two")], 2)
    runs = [next((tmp_path / d).glob("*/results_zs.json")).parent for d in ("one", "two")]
    one, two = (json.loads((r / "results_zs.json").read_text()) for r in runs)
    assert (one["eval_processes"], two["eval_processes"]) == (1, 2)
    assert one["test_f1"] == two["test_f1"]
    assert (runs[0] / "predictions_zs.jsonl").read_text() == (runs[1] / "predictions_zs.jsonl").read_text()
