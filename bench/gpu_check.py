"""The GPU check: what a maintainer with one GPU runs (under 8 minutes) before trusting the code on a node.

On a GPU (``--device cuda``, the default where one is visible), with random weights, nothing downloaded:

* ``llama``: a model shaped like Llama 3.1 8B (width 4096, FFN 14336, 32 heads / 8 KV heads, vocabulary 128256),
  4-bit NF4 with bf16 compute, ``--llama_layers`` decoder layers (default 4: the 8B's layers, not all 32 of them,
  so that stage 1 and stage 2 fit the time);
* ``xlmr``: a model shaped like XLM-R large (24 layers, width 1024, vocabulary 250002), bf16.

For each: stage 1 (``run_task_ft.py``) and FLARE add_relu (``run.py``, on the human NusaX translations) with
``--epochs 1``, as users type them; each must finish, train one epoch (``epochs_trained`` 1), record its precision,
and stage 2 must start from the stage-1 model exactly and fuse. Then ``bench/step_cost.py --quick`` on the full
32-layer Llama 3.1 8B shape (tokens/s and peak memory of LoRA against FLARE), and, when two GPUs are visible, a
2-process ``torchrun`` stage 1 that must train the steps of one process with twice the batch.

On a CPU (``--device cpu``) the same parts run on the tiny random models of :mod:`flare.tiny_models` (the 4-bit
Llama too) and the small 4-bit Llama of step_cost: that is the check's own test. It writes ``--out`` (default
``bench/results/gpu_check.json`` on a GPU, ``bench/results/gpu_check_cpu.json`` on a CPU) with the device's name,
each part's pass/fail, time and numbers; the exit status is 0 only if every part passed.

    bash bench/gpu_check.sh                 # a GPU node
    bash bench/gpu_check.sh --device cpu    # anywhere: tiny models (about 2 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib.util
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # also runs from a plain checkout

LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                vocab_size=128256, rope_theta=500000.0, max_position_embeddings=4096, tie_word_embeddings=False)
XLMR_LARGE = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  vocab_size=250002, max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5)


def write_shaped(tiny_dir: Path, out: Path, family: str, llama_layers: int) -> Path:
    """A random model of the real shape, with the tiny model's tokenizer (its ids are a subset of the vocabulary)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, XLMRobertaConfig, XLMRobertaForMaskedLM

    shutil.copytree(tiny_dir, out, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    tiny = json.loads((tiny_dir / "config.json").read_text())
    special = {k: tiny[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in tiny}
    torch.manual_seed(0)
    with torch.device("cuda"):
        if family == "llama":
            config = LlamaConfig(**LLAMA_8B, num_hidden_layers=llama_layers, **special)
            torch.set_default_dtype(torch.bfloat16)  # initialised in bf16: no fp32 copy of the weights
            try:
                model = LlamaForCausalLM(config)
            finally:
                torch.set_default_dtype(torch.float32)
        else:
            model = XLMRobertaForMaskedLM(XLMRobertaConfig(**XLMR_LARGE, **special))
    model.save_pretrained(out)
    del model
    torch.cuda.empty_cache()
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Check:
    """Runs the parts, records each one's outcome; a failed part is recorded, not fatal."""

    def __init__(self, device: str):
        self.device, self.parts = device, {}

    @contextlib.contextmanager
    def part(self, name: str):
        record = {"ok": False}
        self.parts[name] = record
        t0 = time.perf_counter()
        try:
            yield record
            record["ok"] = True
        except Exception as e:  # noqa: BLE001 - every failure is a result of the check
            record["error"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        finally:
            record["seconds"] = round(time.perf_counter() - t0, 1)
            print(f"[gpu_check] {name}: {'ok' if record['ok'] else 'FAILED'} ({record['seconds']} s)", flush=True)
            gc.collect()
            if self.device == "cuda":
                import torch

                torch.cuda.empty_cache()


def results_of(run_dir: Path) -> dict:
    return json.loads(next(run_dir.glob("results_test.json")).read_text())


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def stages(check: Check, name: str, plm: Path, work: Path, common: list[str], stage1_extra: list[str],
           translations: Path) -> None:
    """Stage 1, then FLARE add_relu on its checkpoint, both with --epochs 1."""
    from flare import stage1, stage2

    s1_out, s2_out = work / f"{name}-stage1", work / f"{name}-stage2"
    with check.part(f"{name}: stage 1 --epochs 1") as rec:
        expect(stage1.main(["--plm", str(plm), *common, *stage1_extra, "--output_dir", str(s1_out)]) == 0,
               "run_task_ft.py failed")
        res = results_of(next(s1_out.iterdir()))
        rec.update({k: res.get(k) for k in ("train_steps", "epochs_trained", "precision", "world_size",
                                            "train_runtime", "test_f1")})
        expect(res["epochs_trained"] == 1, f"epochs_trained {res['epochs_trained']}, not 1")
    with check.part(f"{name}: FLARE add_relu --epochs 1") as rec:
        argv = ["--plm", str(plm), *common, "--target_lang", "jav", "--load_ckpt", str(next(s1_out.iterdir())),
                "--adapter", "lora", "--translate-train", "--fusion_fn", "add_relu",
                "--path_mt", str(translations / "nusax" / "translate-jav-reference"), "--output_dir", str(s2_out)]
        expect(stage2.main(argv) == 0, "run.py failed")
        res = results_of(next(s2_out.iterdir()))
        rec.update({k: res.get(k) for k in ("train_steps", "epochs_trained", "precision", "train_runtime",
                                            "stage1_start_max_abs_diff", "fusion_calls_train", "test_f1")})
        expect(res["epochs_trained"] == 1, f"epochs_trained {res['epochs_trained']}, not 1")
        expect(res["stage1_start_max_abs_diff"] == 0.0, "stage 2 did not start from the stage-1 model exactly")
        expect(res["fusion_calls_train"] > 0, "no fusion call in training")


def step_cost(check: Check, work: Path, cuda: bool) -> None:
    spec = importlib.util.spec_from_file_location("step_cost", REPO / "bench" / "step_cost.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = work / "step_cost.json"
    with check.part("step_cost: LoRA vs FLARE") as rec:
        argv = (["--device", "cuda", "--models", "llama3.1-8b-4bit", "--quick", "--agreement_steps", "0"] if cuda
                else ["--device", "cpu", "--models", "llama-small-4bit", "--steps", "2", "--rounds", "1",
                      "--warmup", "0", "--agreement_steps", "0", "--mt_shape", "tiny", "--cells", "lora",
                      "flare add_relu", "--skip_eval_modes"])
        expect(module.main([*argv, "--out", str(out)]) == 0, "step_cost.py failed")
        rows = json.loads(out.read_text())["rows"]
        keep = ("mode", "fusion_fn", "cached", "train_step_ms", "train_tokens_per_s", "peak_mb", "ratio_to_lora",
                "eval_examples_per_s")
        rec["model"] = rows[0]["model"]
        rec["rows"] = [{k: r[k] for k in keep} for r in rows]
        lora = next(r for r in rows if r["mode"] == "lora")
        flare = next(r for r in rows if r["mode"] == "flare" and r["fusion_fn"] == "add_relu" and not r["cached"])
        rec["lora_vs_flare_add_relu"] = {
            "tokens_per_s": [lora["train_tokens_per_s"], flare["train_tokens_per_s"]],
            "peak_mb": [lora["peak_mb"], flare["peak_mb"]], "step_ratio": flare["ratio_to_lora"]}
        expect(lora["train_tokens_per_s"] > 0 and flare["train_tokens_per_s"] > 0, "no throughput measured")


def ddp(check: Check, plm: Path, work: Path, common: list[str]) -> None:
    """torchrun, 2 processes x batch 4 against the 1-process x batch 8 stage 1 of the same model."""
    one = results_of(next((work / "xlmr-stage1").iterdir()))
    with check.part("ddp: torchrun 2 processes --epochs 1") as rec:
        batch = common.index("--batch_size")
        argv = [*common[:batch + 1], "4", *common[batch + 2:]]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), str(REPO / "run_task_ft.py"), "--plm", str(plm), *argv,
               "--output_dir", str(work / "ddp")]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        expect(proc.returncode == 0, proc.stderr[-2000:])
        two = results_of(next((work / "ddp").iterdir()))
        rec.update(one_process_steps=one["train_steps"], two_process_steps=two["train_steps"],
                   epochs_trained=two["epochs_trained"], world_size=two["world_size"])
        expect(two["world_size"] == 2 and two["train_steps"] == one["train_steps"], "steps differ from 1 process")
        expect(two["epochs_trained"] == 1, f"epochs_trained {two['epochs_trained']}, not 1")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default=None,
                   help="default: cuda if a GPU is visible, else cpu (tiny models)")
    p.add_argument("--llama_layers", type=int, default=4,
                   help="decoder layers of the Llama-3.1-8B-shaped model in stages 1 and 2 (step_cost uses 32)")
    p.add_argument("--tiny_models", default=None,
                   help="a folder written by `python -m flare.tiny_models` (default: written into --work)")
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed at the end)")
    p.add_argument("--out", default=None,
                   help="the JSON (default bench/results/gpu_check.json, or gpu_check_cpu.json on a CPU)")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # random models only: never the network
    import torch

    from flare.tiny_models import write_tiny_models
    from flare.translate import TranslateJob, run_job

    cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    if cuda and not torch.cuda.is_available():
        print("error: --device cuda, but torch sees no GPU; run with --device cpu for the tiny-model check",
              file=sys.stderr)
        return 2
    out = Path(args.out or REPO / "bench" / "results" / ("gpu_check.json" if cuda else "gpu_check_cpu.json"))
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="flare-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    check = Check("cuda" if cuda else "cpu")
    data = str(REPO / "data")
    translations = work / "translations"
    with check.part("setup: models and translations") as rec:
        tiny = Path(args.tiny_models) if args.tiny_models else None
        if tiny is None:
            tiny = work / "tiny"
            write_tiny_models(tiny, families=("llama", "xlm-roberta"))
        if cuda:
            models = {"llama": write_shaped(tiny / "llama", work / "llama3.1-8b-shaped", "llama", args.llama_layers),
                      "xlmr": write_shaped(tiny / "xlm-roberta", work / "xlmr-large-shaped", "xlmr", 0)}
        else:
            models = {"llama": tiny / "llama", "xlmr": tiny / "xlm-roberta"}
        rec["models"] = {k: str(v.name) for k, v in models.items()}
        for src, tgt in (("en", "jav"), ("jav", "en")):
            run_job(TranslateJob("nusax", src, tgt, "reference", output_dir=translations, data_dir=data))
    if check.parts["setup: models and translations"]["ok"]:
        precision = ["--bf16"] if cuda else []
        common = ["--task", "nusax", "--data_dir", data, "--max_train_samples", "64", "--max_eval_samples", "32",
                  "--epochs", "1", "--batch_size", "8", "--num_evals", "1", "--lr", "1e-4", "--seed", "1",
                  "--device", "cuda" if cuda else "cpu", *precision]
        stages(check, "llama", models["llama"], work, [*common, "--quantize", "4bit", "--eval_mode", "score"], [],
               translations)
        stages(check, "xlmr", models["xlmr"], work, common, [], translations)
        if cuda and torch.cuda.device_count() >= 2:
            ddp(check, models["xlmr"], work, common)
        else:
            check.parts["ddp: torchrun 2 processes --epochs 1"] = {
                "ok": None, "skipped": "needs 2 GPUs" if cuda else "CPU check (tests/test_distributed.py covers it)"}
    step_cost(check, work, cuda)
    device = torch.cuda.get_device_name() if cuda else f"{platform.processor() or platform.machine()} CPU"
    failed = [name for name, r in check.parts.items() if r["ok"] is False]
    report = {"device": device, "device_kind": "cuda" if cuda else "cpu", "gpus_visible": torch.cuda.device_count(),
              "date": datetime.date.today().isoformat(), "torch": torch.__version__,
              "llama_layers": args.llama_layers if cuda else None, "parts": check.parts, "all_ok": not failed,
              "wall_s": round(time.perf_counter() - t_start, 1)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    print(f"[gpu_check] {device}: {'every part passed' if not failed else 'FAILED: ' + ', '.join(failed)} "
          f"in {report['wall_s']:.0f} s; wrote {out}")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
