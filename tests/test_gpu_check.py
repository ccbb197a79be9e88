"""bench/gpu_check.sh, on this CPU with tiny models: every part runs and the JSON says what it measured."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_on_the_cpu_with_tiny_models(tmp_path, tiny_models):
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--device", "cpu", "--tiny_models",
                           str(tiny_models), "--work", str(tmp_path / "work"), "--out", str(out)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["all_ok"] and report["device_kind"] == "cpu"
    parts = report["parts"]
    stages = {"llama": ("llama: stage 1 --epochs 1 (4-bit, generate)",
                        "llama: FLARE add_relu --epochs 1 (4-bit, --gradient_checkpointing, generate)"),
              "gemma2": ("gemma2: stage 1 --epochs 1 (4-bit)", "gemma2: FLARE add_relu --epochs 1 (4-bit)"),
              "xlmr": ("xlmr: stage 1 --epochs 1 (no precision flag)", "xlmr: FLARE add_relu --epochs 1 (--bf16)")}
    for s1_name, s2_name in stages.values():
        s1, s2 = parts[s1_name], parts[s2_name]
        assert s1["ok"] and s1["epochs_trained"] == 1 and s1["precision"] == "fp32" and s1["world_size"] == 1
        assert s2["ok"] and s2["epochs_trained"] == 1 and s2["stage1_start_max_abs_diff"] == 0.0
        assert s2["fusion_calls_train"] > 0
    for name in ("llama: X-Mixup --epochs 1 (4-bit)", "gemma2: X-Mixup --epochs 1 (4-bit)"):
        xm = parts[name]
        assert xm["ok"] and xm["stage1_start_max_abs_diff"] == 0.0 and xm["fusion_calls_train"] == 0
        assert xm["xmixup_layers"] == [1, 2] and 0 < xm["xmixup_lambda_last_epoch"]["1"] < 0.5
    assert parts["xlmr: stage 1 --epochs 1 (--fp16)"]["ok"]  # (fp32 on a CPU)
    assert parts["tydiqa: stage 1 --epochs 1 (English, extractive QA)"]["ok"]
    assert parts["tydiqa: zero-shot sw"]["ok"] and parts["tydiqa: zero-shot sw"]["n_test"] > 0
    cost = parts["step_cost: LoRA vs FLARE"]
    assert cost["model"] == "llama-small-4bit"
    lora_tps, flare_tps = cost["lora_vs_flare_add_relu"]["tokens_per_s"]
    assert lora_tps > 0 and flare_tps > 0 and cost["lora_vs_flare_add_relu"]["step_ratio"] > 0
    for name in ("ddp: torchrun 2 processes, stage 1 --epochs 1", "ddp: torchrun 2 processes, FLARE --epochs 1"):
        assert parts[name]["ok"] is None and parts[name]["skipped"]  # skipped on a CPU, and says why
    assert "[gpu_check] " in proc.stdout and "every part passed" in proc.stdout


def test_gpu_check_reruns_only_the_parts_asked_for(tmp_path, tiny_models):
    """--parts: a re-run of what failed on the GPU, the rest recorded as skipped (not as passed)."""
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--device", "cpu", "--tiny_models",
                           str(tiny_models), "--work", str(tmp_path / "work"), "--out", str(out), "--parts",
                           "gemma2"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    parts = json.loads(out.read_text())["parts"]
    ran = {name for name, r in parts.items() if r["ok"]}
    assert ran == {"setup: models and translations", "gemma2: stage 1 --epochs 1 (4-bit)",
                   "gemma2: FLARE add_relu --epochs 1 (4-bit)", "gemma2: X-Mixup --epochs 1 (4-bit)"}
    assert parts["step_cost: LoRA vs FLARE"]["skipped"] == "not in --parts"
