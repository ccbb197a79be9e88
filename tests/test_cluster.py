"""What a shared cluster does to runs: SIGTERM preemption, a checkpoint cut mid-save, two sweeps on one folder.

The preemption tests go through submitit's real local executor and :class:`flare.sweep.ResumableCommand`, the code
path of a Slurm job; the cut checkpoint is resumed by the real stages and by the requeued command."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from run_checks import write_checkpoint

from flare import stage1, sweep
from flare.files import checkpoint_problem, newest_complete_checkpoint

REPO = Path(__file__).resolve().parents[1]
DATA = str(REPO / "data")


def test_last_means_the_newest_complete_checkpoint(tmp_path):
    write_checkpoint(tmp_path / "checkpoint-4")
    write_checkpoint(tmp_path / "checkpoint-12", cut_weights=True)
    write_checkpoint(tmp_path / "checkpoint-16", trainer_state=False)
    write_checkpoint(tmp_path / "checkpoint-20", optimizer=False)
    (tmp_path / "checkpoint-final").mkdir()  # not a step: ignored
    found, skipped = newest_complete_checkpoint(tmp_path)
    assert found == tmp_path / "checkpoint-4"
    assert [(p.name, why) for p, why in skipped] == [
        ("checkpoint-20", "no optimizer.pt"), ("checkpoint-16", "no trainer_state.json"),
        ("checkpoint-12", checkpoint_problem(tmp_path / "checkpoint-12"))]
    assert skipped[2][1].startswith("adapter_model.safetensors is truncated")
    # the requeued command resumes only where a complete checkpoint exists
    assert sweep.ResumableCommand(["x"], ".", str(tmp_path)).resumed() == ["x", "--resume_from_checkpoint", "last"]
    shutil.rmtree(tmp_path / "checkpoint-4")
    assert newest_complete_checkpoint(tmp_path)[0] is None
    assert sweep.ResumableCommand(["x"], ".", str(tmp_path)).resumed() == ["x"]


def test_a_checkpoint_cut_mid_save_is_skipped_by_resume_last(tmp_path, tiny_models, caplog):
    """The review's repro: train, copy the last checkpoint to checkpoint-99 without trainer_state.json and
    optimizer.pt, remove the results, resume with 'last': it resumes from the newest complete checkpoint, says which
    it skipped, moves the cut one aside, and ends as the uninterrupted run (it used to exit 2, FileNotFoundError)."""
    argv = ["--task", "nusax", "--plm", str(tiny_models / "xlm-roberta"), "--data_dir", DATA, "--seed", "5",
            "--max_train_samples", "16", "--max_eval_samples", "8", "--max_steps", "4", "--num_evals", "2",
            "--batch_size", "4", "--save_total_limit", "3", "--output_dir", str(tmp_path)]
    assert stage1.main(argv) == 0
    run = tmp_path / "nusax-en-xlm-roberta-5"
    whole = json.loads((run / "results_test.json").read_text())
    cut = run / "checkpoint-99"
    shutil.copytree(run / "checkpoint-4", cut)
    (cut / "trainer_state.json").unlink()
    (cut / "optimizer.pt").unlink()
    for name in ("results_test.json", "predictions_test.jsonl"):
        (run / name).unlink()

    assert stage1.main([*argv, "--resume_from_checkpoint", "last"]) == 0
    assert "checkpoint-99 is incomplete (no trainer_state.json, optimizer.pt)" in caplog.text
    assert not cut.exists() and (run / "incomplete-checkpoint-99").is_dir()
    resumed = json.loads((run / "results_test.json").read_text())
    assert resumed["train_steps"] == whole["train_steps"] == 4
    assert resumed["test_f1"] == whole["test_f1"]
    # a resumed run counts the training time of its earlier attempt (up to the checkpoint) too
    assert resumed["train_attempts"] == 2 and resumed["train_runtime"] >= whole["train_runtime"] * 0.5
    assert json.loads((run / "checkpoint-4" / "flare_runtime.json").read_text())["attempts"] == 1


def test_resume_last_with_only_cut_checkpoints_is_a_usage_error(tmp_path, capsys):
    run = tmp_path / "nusax-en-xlmr-5"
    write_checkpoint(run / "checkpoint-8", trainer_state=False)
    code = stage1.main(["--task", "nusax", "--plm", "xlmr", "--output_dir", str(tmp_path), "--seed", "5",
                        "--resume_from_checkpoint", "last"])
    err = capsys.readouterr().err
    assert code == 2 and "no complete checkpoint" in err and "checkpoint-8: no trainer_state.json" in err


# ------------------------------------------------------------------------------------------- SIGTERM preemption
def _preemptible_job(tmp_path: Path):
    """A submitit local job running a ResumableCommand whose command records its calls and pids and, unless it
    resumes, waits to be preempted; its run directory has a complete checkpoint."""
    import submitit

    run_dir = tmp_path / "run"
    write_checkpoint(run_dir / "checkpoint-5")
    code = ("import os, sys, time; d = sys.argv[1]; "
            "open(os.path.join(d, 'calls'), 'a').write(' '.join(sys.argv[2:]) + '|'); "
            "open(os.path.join(d, 'pids'), 'w').write(f'{os.getppid()} {os.getpid()}'); "
            "time.sleep(0 if '--resume_from_checkpoint' in sys.argv else 300)")
    executor = submitit.LocalExecutor(folder=tmp_path / "logs" / "%j")
    executor.update_parameters(timeout_min=10, gpus_per_node=0)
    job = executor.submit(sweep.ResumableCommand([sys.executable, "-c", code, str(run_dir)], str(tmp_path),
                                                 str(run_dir)))
    deadline = time.time() + 60
    while not (run_dir / "pids").is_file() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # the parent's SIGTERM handler is set before the command starts
    parent, child = map(int, (run_dir / "pids").read_text().split())
    return job, run_dir, parent, child


@pytest.mark.parametrize("who", ["every process", "the command only", "the job only"])
def test_sigterm_preemption_requeues_the_job_and_resumes(tmp_path, who):
    """Slurm sites that preempt with SIGTERM to every process of the step (and scancel): the job requeues itself
    and resumes from its last checkpoint; it used to fail with "command failed with exit -15", and its dependents
    were cancelled. Also when only the command (exit -15) or only the job's own process gets the signal."""
    job, run_dir, parent, child = _preemptible_job(tmp_path)
    targets = {"every process": [parent, child], "the command only": [child], "the job only": [parent]}[who]
    os.kill(targets[0], signal.SIGTERM)
    for pid in targets[1:]:
        # Slurm signals every process at once; here the job may already have passed the first signal on to its
        # command, which can be gone before the second kill (that race once failed CI with ProcessLookupError)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    assert job.result() == 0
    assert (run_dir / "calls").read_text() == "|--resume_from_checkpoint last|"


def test_a_failing_command_still_fails(tmp_path):
    import submitit

    executor = submitit.LocalExecutor(folder=tmp_path / "logs" / "%j")
    executor.update_parameters(timeout_min=5, gpus_per_node=0)
    job = executor.submit(sweep.ResumableCommand([sys.executable, "-c", "raise SystemExit(3)"], str(tmp_path)))
    with pytest.raises(Exception, match="command failed with exit 3"):
        job.result()


# ------------------------------------------------------------------------------------------- two sweeps, one folder
SWEEP_SCRIPT = textwrap.dedent('''
    import sys, time
    from pathlib import Path
    from flare import sweep

    root, how, start_at = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3])
    job = ("import sys, time; from pathlib import Path; done = Path(sys.argv[1]); "
           "open(done.parent.parent / 'trained', 'a').write(done.parent.name + '\\\\n'); time.sleep(1.5); "
           "done.write_text('{}')")
    jobs = []
    for name, deps in (("a", ()), ("b", ("a",)), ("c", ()), ("d", ("c",))):
        done = root / f"run-{name}" / "results_test.json"
        done.parent.mkdir(parents=True, exist_ok=True)
        jobs.append(sweep.Job(name, ["-c", job, str(done)], (done,), deps))
    while time.time() < start_at:
        time.sleep(0.001)
    if how == "serial":
        out = sweep.run_jobs(jobs)
    else:
        out = sweep.run_parallel(jobs, ["0", "1"], root / "logs", poll_s=0.02)
    print("OUTCOME", out.ran, out.skipped, out.failed, out.held)
''')


@pytest.mark.parametrize("hows", [("serial", "serial"), ("parallel", "parallel"), ("serial", "parallel")])
def test_two_sweeps_started_on_one_folder_at_once_train_each_job_once(tmp_path, hows):
    """Two sweeps on the same folders, started at the same moment: every job is trained by exactly one of them; the
    other skips it (finished) or holds it (claimed by the other sweep, with its dependents) and says so."""
    script = tmp_path / "sweep_script.py"
    script.write_text(SWEEP_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    start_at = time.time() + 3  # both interpreters are up by then
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path), how, str(start_at)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for how in hows]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    trained = (tmp_path / "trained").read_text().split()
    assert sorted(trained) == ["run-a", "run-b", "run-c", "run-d"], (trained, outputs)
    assert all("OUTCOME" in o for o in outputs), outputs
    assert any("claimed by another process" in o or "skip (finished)" in o for o in outputs)


def test_a_sweep_that_only_holds_jobs_exits_3(tmp_path, monkeypatch, caplog):
    """A re-run that leaves every job to another sweep says so and exits 3, not "0 ran, 0 skipped, 0 failed" with 0."""
    import logging

    caplog.set_level(logging.INFO, logger="flare.sweep")
    job = sweep.Job("a", ["-c", "pass"], (tmp_path / "run-a" / "results_test.json",))
    monkeypatch.setattr(sweep, "check_args", lambda args: None)
    monkeypatch.setattr(sweep, "plan", lambda args: [job])
    with sweep.claimed(sweep.claim_path(job)) as got:  # another sweep (here: this process) holds it
        assert got
        code = sweep.main(["--task", "nusax", "--plm", "me5-small", "--langs", "jav"])
    assert code == sweep.HELD_EXIT == 3
    assert "1 held" in caplog.text and "run this sweep again once it is done" in caplog.text
