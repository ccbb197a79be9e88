"""Interruption: a stage-2 FLARE run (cross-attention: a fusion module outside peft) killed mid-training and resumed
with --resume_from_checkpoint last ends where the uninterrupted run ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from safetensors.torch import load_file

from flare import stage1, stage2
from flare.translate import TranslateJob, run_job

REPO = Path(__file__).resolve().parents[1]
DATA = str(REPO / "data")
RUN = "nusax-en-jav-xlm-roberta-3-lora-8_cross-attention-translate-jav-reference-ttrain"


def newest_checkpoint_step(run_dir: Path) -> int:
    steps = [int(p.parent.name.split("-")[1]) for p in run_dir.glob("checkpoint-*/trainer_state.json")]
    return max(steps, default=0)


def test_killed_flare_run_resumes_to_the_same_result(tmp_path, tiny_models):
    common = ["--task", "nusax", "--plm", str(tiny_models / "xlm-roberta"), "--data_dir", DATA, "--seed", "3",
              "--max_eval_samples", "8", "--lr", "1e-3"]
    assert stage1.main([*common, "--max_train_samples", "16", "--max_steps", "2",
                        "--output_dir", str(tmp_path / "s1")]) == 0
    for src, tgt in (("en", "jav"), ("jav", "en")):
        run_job(TranslateJob("nusax", src, tgt, "reference", output_dir=tmp_path / "tr", data_dir=DATA))
    flare = [*common, "--target_lang", "jav", "--load_ckpt", str(tmp_path / "s1" / "nusax-en-xlm-roberta-3"),
             "--adapter", "lora", "--translate-train", "--path_mt",
             str(tmp_path / "tr" / "nusax" / "translate-jav-reference"), "--fusion_fn", "cross-attention",
             "--max_train_samples", "32", "--batch_size", "4", "--max_steps", "16", "--num_evals", "8",
             "--save_total_limit", "2"]

    assert stage2.main([*flare, "--output_dir", str(tmp_path / "whole")]) == 0

    # the same run as a user starts it, killed (SIGKILL: no clean-up) once a checkpoint past step 4 exists
    out = tmp_path / "killed"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen([sys.executable, str(REPO / "run.py"), *flare, "--output_dir", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=REPO)
    deadline = time.time() + 300
    while newest_checkpoint_step(out / RUN) < 4 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = newest_checkpoint_step(out / RUN)
    assert 4 <= killed_at < 16 and not (out / RUN / "results_test.json").exists(), "the run was not interrupted"

    assert stage2.main([*flare, "--output_dir", str(out), "--resume_from_checkpoint", "last"]) == 0
    whole = json.loads((tmp_path / "whole" / RUN / "results_test.json").read_text())
    resumed = json.loads((out / RUN / "results_test.json").read_text())
    assert resumed["train_steps"] == whole["train_steps"] == 16
    for key in ("test_accuracy", "test_f1", "validation_best", "best_checkpoint"):
        assert (resumed[key] if key != "best_checkpoint" else Path(resumed[key]).name) == (
            whole[key] if key != "best_checkpoint" else Path(whole[key]).name), key
    assert resumed["validation_history"] == whole["validation_history"]
    assert (out / RUN / "predictions_test.jsonl").read_text() == (
        tmp_path / "whole" / RUN / "predictions_test.jsonl").read_text()
    for name in ("adapter_model.safetensors", "fusion_model.safetensors"):
        a, b = load_file(tmp_path / "whole" / RUN / name), load_file(out / RUN / name)
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6, name
