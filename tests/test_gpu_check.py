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
    for family in ("llama", "xlmr"):
        s1, s2 = parts[f"{family}: stage 1 --epochs 1"], parts[f"{family}: FLARE add_relu --epochs 1"]
        assert s1["ok"] and s1["epochs_trained"] == 1 and s1["precision"] == "fp32" and s1["world_size"] == 1
        assert s2["ok"] and s2["epochs_trained"] == 1 and s2["stage1_start_max_abs_diff"] == 0.0
        assert s2["fusion_calls_train"] > 0
    cost = parts["step_cost: LoRA vs FLARE"]
    assert cost["model"] == "llama-small-4bit"
    lora_tps, flare_tps = cost["lora_vs_flare_add_relu"]["tokens_per_s"]
    assert lora_tps > 0 and flare_tps > 0 and cost["lora_vs_flare_add_relu"]["step_ratio"] > 0
    assert parts["ddp: torchrun 2 processes --epochs 1"]["ok"] is None  # skipped on a CPU, and says why
    assert "[gpu_check] " in proc.stdout and "every part passed" in proc.stdout
