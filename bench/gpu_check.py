"""The GPU check: what a maintainer with one GPU runs (under 8 minutes) before trusting the code on a node.

On a GPU (``--device cuda``, the default where one is visible), with random weights, nothing downloaded, every
part a pass/fail entry of the JSON (a failed part is recorded and the others still run):

* ``llama``: a model shaped like Llama 3.1 8B (width 4096, FFN 14336, 32 heads / 8 KV heads, vocabulary 128256),
  4-bit NF4 with bf16 compute, ``--llama_layers`` decoder layers (default 4: the 8B's layers, not all 32 of them,
  so that stage 1 and stage 2 fit the time). Stage 1, then FLARE add_relu with ``--gradient_checkpointing``; both
  evaluate by greedy generation (``--eval_mode generate``, the default).
* ``gemma2``: a model shaped like Gemma 2 9B (width 3584, FFN 14336, 16 heads / 8 KV heads of dimension 256,
  vocabulary 256000, tied embedding and head, soft-capping, sliding window), 4-bit, ``--llama_layers`` layers,
  stage 1 and FLARE (label scoring).
* ``xlmr``: a model shaped like XLM-R large (24 layers, width 1024, vocabulary 250002): stage 1 with NO precision
  flag (the default: fp32 with TF32 matmuls on Ampere and newer, recorded as ``precision: tf32``), FLARE add_relu
  with ``--bf16``, and stage 1 with ``--fp16``.
* ``tydiqa``: stage 1 of the XLM-R-large shape on English TyDiQA-GoldP (extractive QA: stride, span
  post-processing), then zero-shot on Swahili.

Stages 1 and 2 run with ``--epochs 1``, as users type them; each must finish, train one epoch
(``epochs_trained`` 1) and record its precision, and stage 2 must start from the stage-1 model exactly and fuse.
Then ``bench/step_cost.py --quick`` on the full 32-layer Llama 3.1 8B shape (tokens/s and peak memory of LoRA
against FLARE), and, when two GPUs are visible, 2-process ``torchrun`` runs of stage 1 and of FLARE that must train
the steps of one process with twice the batch.

On a CPU (``--device cpu``) the same parts run on the tiny random models of :mod:`flare.tiny_models` (the 4-bit
Llama and Gemma 2 too; fp32 stands in for the GPU precisions) and the small 4-bit Llama of step_cost: that is the
check's own test. It writes ``--out`` (default ``bench/results/gpu_check.json`` on a GPU,
``bench/results/gpu_check_cpu.json`` on a CPU) with the device's name, each part's pass/fail, time and numbers;
the exit status is 0 only if every part passed. ``--parts`` runs a subset (a re-run of what failed).

    bash bench/gpu_check.sh                 # a GPU node
    bash bench/gpu_check.sh --device cpu    # anywhere: tiny models (about 3 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
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
GEMMA2_9B = dict(hidden_size=3584, intermediate_size=14336, num_attention_heads=16, num_key_value_heads=8,
                 head_dim=256, vocab_size=256000, query_pre_attn_scalar=256, sliding_window=4096,
                 max_position_embeddings=8192, final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
                 tie_word_embeddings=True)
XLMR_LARGE = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  vocab_size=250002, max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5)


def write_shaped(tiny_dir: Path, out: Path, family: str, llama_layers: int) -> Path:
    """A random model of the real shape, with the tiny model's tokenizer (its ids are a subset of the vocabulary)."""
    import torch
    from transformers import (
        Gemma2Config,
        Gemma2ForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
        XLMRobertaConfig,
        XLMRobertaForMaskedLM,
    )

    shutil.copytree(tiny_dir, out, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    tiny = json.loads((tiny_dir / "config.json").read_text())
    special = {k: tiny[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in tiny}
    torch.manual_seed(0)
    with torch.device("cuda"):
        if family in ("llama", "gemma2"):
            config = (LlamaConfig(**LLAMA_8B, num_hidden_layers=llama_layers, **special) if family == "llama" else
                      Gemma2Config(**GEMMA2_9B, num_hidden_layers=llama_layers, **special))
            torch.set_default_dtype(torch.bfloat16)  # initialised in bf16: no fp32 copy of the weights
            try:
                model = (LlamaForCausalLM if family == "llama" else Gemma2ForCausalLM)(config)
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


class Skip(Exception):
    """A part not asked for (--parts)."""


class Check:
    """Runs the parts, records each one's outcome; a failed part is recorded, not fatal. ``only``: the names (or name
    prefixes) of the parts to run (None: all)."""

    def __init__(self, device: str, only: list[str] | None = None, after_part=None):
        self.device, self.parts, self.only = device, {}, only
        self.after_part = after_part  # called after each part: the JSON so far (a time limit keeps what ran)

    def wanted(self, name: str) -> bool:
        return self.only is None or name.startswith("setup") or any(name.startswith(o) for o in self.only)

    @contextlib.contextmanager
    def part(self, name: str):
        if not self.wanted(name):
            self.parts[name] = {"ok": None, "skipped": "not in --parts"}
            raise Skip
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
            if self.after_part is not None:
                self.after_part()
            gc.collect()
            if self.device == "cuda":
                import torch

                torch.cuda.empty_cache()


def results_of(run_dir: Path) -> dict:
    return json.loads(next(run_dir.glob("results_test.json")).read_text())


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def run_part(check: Check, name: str, fn) -> None:
    with contextlib.suppress(Skip):
        fn(name)


def stage1_part(check: Check, name: str, plm: Path, argv: list[str], out: Path, precision: str | None) -> None:
    """Stage 1 (run_task_ft.py) with ``argv``: one epoch, the expected precision."""
    from flare import stage1

    def part(label):
        with check.part(label) as rec:
            expect(stage1.main(["--plm", str(plm), *argv, "--output_dir", str(out)]) == 0, "run_task_ft.py failed")
            res = results_of(next(out.iterdir()))
            rec.update({k: res.get(k) for k in ("train_steps", "epochs_trained", "precision", "world_size",
                                                "train_runtime", "test_f1", "test_exact_match", "n_train_features")})
            # one epoch of whole batches: QA's stride makes the feature count no multiple of the batch
            expect(1 - res["effective_batch_size"] / res["n_train_features"] < res["epochs_trained"] <= 1,
                   f"epochs_trained {res['epochs_trained']}, not 1 epoch")
            if precision:
                expect(res["precision"] == precision, f"precision {res['precision']}, not {precision}")

    run_part(check, name, part)


def stage2_part(check: Check, name: str, plm: Path, argv: list[str], stage1_out: Path, out: Path,
                translations: Path, precision: str | None, lang: str = "jav", xmixup: bool = False) -> None:
    """FLARE add_relu (run.py) from the stage-1 run: one epoch, starts from stage 1 exactly, fuses; ``xmixup``:
    X-Mixup instead, its mixed layers ran (a mean λ per mixed layer)."""
    from flare import stage2

    def part(label):
        with check.part(label) as rec:
            expect(stage1_out.is_dir(), "its stage 1 did not run")
            method = ["--xmixup"] if xmixup else ["--fusion_fn", "add_relu"]
            full = ["--plm", str(plm), *argv, "--target_lang", lang, "--load_ckpt", str(next(stage1_out.iterdir())),
                    "--adapter", "lora", "--translate-train", *method,
                    "--path_mt", str(translations / "nusax" / f"translate-{lang}-reference"), "--output_dir", str(out)]
            expect(stage2.main(full) == 0, "run.py failed")
            res = results_of(next(out.iterdir()))
            rec.update({k: res.get(k) for k in ("train_steps", "epochs_trained", "precision", "train_runtime",
                                                "stage1_start_max_abs_diff", "fusion_calls_train", "test_f1",
                                                "xmixup_layers", "xmixup_lambda_last_epoch")})
            expect(res["epochs_trained"] == 1, f"epochs_trained {res['epochs_trained']}, not 1")
            expect(res["stage1_start_max_abs_diff"] == 0.0, "stage 2 did not start from the stage-1 model exactly")
            if xmixup:
                lam = res.get("xmixup_lambda_last_epoch") or {}
                expect(bool(lam) and all(v is not None and 0 < v < 1 for v in lam.values()),
                       f"X-Mixup's mixed layers did not run: {lam}")
            else:
                expect(res["fusion_calls_train"] > 0, "no fusion call in training")
            if precision:
                expect(res["precision"] == precision, f"precision {res['precision']}, not {precision}")

    run_part(check, name, part)


def zero_shot_part(check: Check, name: str, plm: Path, argv: list[str], stage1_out: Path, out: Path,
                   lang: str) -> None:
    from flare import stage2

    def part(label):
        with check.part(label) as rec:
            expect(stage1_out.is_dir(), "its stage 1 did not run")
            full = ["--plm", str(plm), *argv, "--target_lang", lang, "--load_ckpt", str(next(stage1_out.iterdir())),
                    "--eval_zs", "--eval_only", "--output_dir", str(out)]
            expect(stage2.main(full) == 0, "run.py failed")
            res = json.loads(next(out.glob("*/results_zs.json")).read_text())
            rec.update({k: res.get(k) for k in ("n_test", "test_exact_match", "test_f1", "test_runtime")})
            expect(res["n_test"] > 0, "no test example")

    run_part(check, name, part)


def step_cost(check: Check, work: Path, cuda: bool) -> None:
    from flare import sweep

    module = sweep.load_script("bench/step_cost.py")
    out = work / "step_cost.json"
    if not check.wanted("step_cost: LoRA vs FLARE"):
        check.parts["step_cost: LoRA vs FLARE"] = {"ok": None, "skipped": "not in --parts"}
        return
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


def ddp(check: Check, plm: Path, work: Path, common: list[str], translations: Path) -> None:
    """torchrun, 2 processes x batch 4, against the 1-process x batch 8 runs of the same model: stage 1, then FLARE."""
    batch = common.index("--batch_size")
    argv = [*common[:batch + 1], "4", *common[batch + 2:]]

    def torchrun(script: str, extra: list[str]) -> None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), str(REPO / script), "--plm", str(plm), *argv, *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        expect(proc.returncode == 0, proc.stderr[-2000:])
        expect("find_unused_parameters=True was specified" not in proc.stderr, "DDP searched for unused parameters")

    def compare(rec: dict, one_dir: Path, two_dir: Path) -> None:
        one, two = results_of(next(one_dir.iterdir())), results_of(next(two_dir.iterdir()))
        rec.update(one_process_steps=one["train_steps"], two_process_steps=two["train_steps"],
                   epochs_trained=two["epochs_trained"], world_size=two["world_size"])
        expect(two["world_size"] == 2 and two["train_steps"] == one["train_steps"], "steps differ from 1 process")
        expect(two["epochs_trained"] == 1, f"epochs_trained {two['epochs_trained']}, not 1")

    def stage1_ddp(label):
        with check.part(label) as rec:
            torchrun("run_task_ft.py", ["--output_dir", str(work / "ddp-stage1")])
            compare(rec, work / "xlmr-stage1", work / "ddp-stage1")

    def stage2_ddp(label):
        with check.part(label) as rec:
            expect((work / "ddp-stage1").is_dir(), "its stage 1 did not run")
            torchrun("run.py", ["--target_lang", "jav", "--load_ckpt", str(next((work / "xlmr-stage1").iterdir())),
                                "--adapter", "lora", "--translate-train", "--fusion_fn", "add_relu", "--path_mt",
                                str(translations / "nusax" / "translate-jav-reference"),
                                "--output_dir", str(work / "ddp-stage2")])
            compare(rec, work / "xlmr-stage2", work / "ddp-stage2")

    run_part(check, "ddp: torchrun 2 processes, stage 1 --epochs 1", stage1_ddp)
    run_part(check, "ddp: torchrun 2 processes, FLARE --epochs 1", stage2_ddp)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default=None,
                   help="default: cuda if a GPU is visible, else cpu (tiny models)")
    p.add_argument("--llama_layers", type=int, default=4,
                   help="decoder layers of the Llama-3.1-8B- and Gemma-2-9B-shaped models in stages 1 and 2 "
                        "(step_cost uses all 32 of Llama's)")
    p.add_argument("--parts", nargs="+", default=None, metavar="PREFIX",
                   help="run only the parts whose names start with one of these (e.g. 'gemma2' 'tydiqa'); the "
                        "others are recorded as skipped")
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
    import transformers

    device_name = torch.cuda.get_device_name() if cuda else f"{platform.processor() or platform.machine()} CPU"

    def write_report(final: bool = False) -> dict:
        failed = [name for name, r in check.parts.items() if r["ok"] is False]
        report = {"device": device_name, "device_kind": "cuda" if cuda else "cpu",
                  "gpus_visible": torch.cuda.device_count(), "date": datetime.date.today().isoformat(),
                  "torch": torch.__version__, "transformers": transformers.__version__,
                  "llama_layers": args.llama_layers if cuda else None, "parts_asked": args.parts,
                  "parts": check.parts, "finished": final, "all_ok": final and not failed, "failed": failed,
                  "wall_s": round(time.perf_counter() - t_start, 1)}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        return report

    check = Check("cuda" if cuda else "cpu", args.parts, after_part=write_report)
    data = str(REPO / "data")
    translations = work / "translations"
    families = {"llama": "llama", "gemma2": "gemma2", "xlmr": "xlm-roberta"}
    wanted = {key for key in families if check.wanted(key) or (key == "xlmr" and (check.wanted("tydiqa")
                                                                                   or check.wanted("ddp")))}
    with check.part("setup: models and translations") as rec:
        tiny = Path(args.tiny_models) if args.tiny_models else None
        if tiny is None:
            tiny = work / "tiny"
            write_tiny_models(tiny, families=tuple(families[k] for k in sorted(wanted)))
        if cuda:
            shaped = {"llama": "llama3.1-8b-shaped", "gemma2": "gemma2-9b-shaped", "xlmr": "xlmr-large-shaped"}
            models = {k: write_shaped(tiny / families[k], work / shaped[k], k, args.llama_layers) for k in wanted}
        else:
            models = {k: tiny / families[k] for k in wanted}
        rec["models"] = {k: str(v.name) for k, v in models.items()}
        for src, tgt in (("en", "jav"), ("jav", "en")):
            run_job(TranslateJob("nusax", src, tgt, "reference", output_dir=translations, data_dir=data))
    if check.parts["setup: models and translations"]["ok"]:
        device = ["--device", "cuda" if cuda else "cpu"]
        base = ["--data_dir", data, "--max_train_samples", "64", "--max_eval_samples", "32", "--epochs", "1",
                "--batch_size", "8", "--num_evals", "1", "--lr", "1e-4", "--seed", "1", *device]
        nusax = ["--task", "nusax", *base]
        bf16 = ["--bf16"] if cuda else []
        expected = (lambda p: p) if cuda else (lambda p: "fp32")  # noqa: E731 - the CPU check runs fp32
        gen = ["--generate_max_tokens", "8"]
        if "llama" in models:  # 4-bit, bf16; generation; FLARE under gradient checkpointing
            llama = [*nusax, *bf16, "--quantize", "4bit", *gen]
            stage1_part(check, "llama: stage 1 --epochs 1 (4-bit, generate)", models["llama"], llama,
                        work / "llama-stage1", expected("bf16"))
            stage2_part(check, "llama: FLARE add_relu --epochs 1 (4-bit, --gradient_checkpointing, generate)",
                        models["llama"], [*llama, "--gradient_checkpointing"], work / "llama-stage1",
                        work / "llama-stage2", translations, expected("bf16"))
            stage2_part(check, "llama: X-Mixup --epochs 1 (4-bit)", models["llama"], llama, work / "llama-stage1",
                        work / "llama-xmixup", translations, expected("bf16"), xmixup=True)
        if "gemma2" in models:  # the 9B's shapes: head_dim 256, soft-capping, a tied 256k vocabulary
            gemma = [*nusax, *bf16, "--quantize", "4bit", "--eval_mode", "score"]
            stage1_part(check, "gemma2: stage 1 --epochs 1 (4-bit)", models["gemma2"], gemma, work / "gemma2-stage1",
                        expected("bf16"))
            stage2_part(check, "gemma2: FLARE add_relu --epochs 1 (4-bit)", models["gemma2"], gemma,
                        work / "gemma2-stage1", work / "gemma2-stage2", translations, expected("bf16"))
            stage2_part(check, "gemma2: X-Mixup --epochs 1 (4-bit)", models["gemma2"], gemma,
                        work / "gemma2-stage1", work / "gemma2-xmixup", translations, expected("bf16"), xmixup=True)
        if "xlmr" in models:
            xlmr = models["xlmr"]
            stage1_part(check, "xlmr: stage 1 --epochs 1 (no precision flag)", xlmr, nusax, work / "xlmr-stage1",
                        expected("tf32") if cuda and torch.cuda.get_device_capability()[0] >= 8 else "fp32")
            stage2_part(check, "xlmr: FLARE add_relu --epochs 1 (--bf16)", xlmr, [*nusax, *bf16],
                        work / "xlmr-stage1", work / "xlmr-stage2", translations, expected("bf16"))
            stage1_part(check, "xlmr: stage 1 --epochs 1 (--fp16)", xlmr, [*nusax, *(["--fp16"] if cuda else [])],
                        work / "xlmr-stage1-fp16", expected("fp16"))
            qa = ["--task", "tydiqa", *base, *bf16, "--max_train_samples", "128"]
            stage1_part(check, "tydiqa: stage 1 --epochs 1 (English, extractive QA)", xlmr, qa,
                        work / "tydiqa-stage1", expected("bf16"))
            zero_shot_part(check, "tydiqa: zero-shot sw", xlmr, qa, work / "tydiqa-stage1", work / "tydiqa-zs", "sw")
            if cuda and torch.cuda.device_count() >= 2:
                ddp(check, xlmr, work, [*nusax, *bf16], translations)
            else:
                for name in ("ddp: torchrun 2 processes, stage 1 --epochs 1",
                             "ddp: torchrun 2 processes, FLARE --epochs 1"):
                    check.parts[name] = {"ok": None, "skipped": "needs 2 GPUs" if cuda else
                                         "CPU check (tests/test_distributed.py covers it)"}
    step_cost(check, work, cuda)
    report = write_report(final=True)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    failed = report["failed"]
    print(f"[gpu_check] {device_name}: {'every part passed' if not failed else 'FAILED: ' + ', '.join(failed)} "
          f"in {report['wall_s']:.0f} s; wrote {out}")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
