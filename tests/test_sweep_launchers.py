"""The sweep beyond one job at a time: one job per GPU in dependency order (--gpus), and submitit (--launcher local
here: the real local executor and real processes; slurm takes the same path with afterok dependencies)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flare import sweep

REPO = Path(__file__).resolve().parents[1]
SMALL = "--max_train_samples 16 --max_eval_samples 8 --max_steps 2 --batch_size 8 --num_evals 1"


def test_parallel_runs_in_dependency_order_one_job_per_gpu(tmp_path):
    mark = tmp_path / "a-finished"
    code_a = ("import os, time; time.sleep(0.5); print('gpu', os.environ['CUDA_VISIBLE_DEVICES']); "
              f"open({str(mark)!r}, 'w')")
    code_b = f"import os; assert os.path.exists({str(mark)!r}), 'b started before a finished'"
    jobs = [sweep.Job("a", ["-c", code_a], ()),
            sweep.Job("slow other", ["-c", "import time; time.sleep(0.5)"], ()),
            sweep.Job("b", ["-c", code_b], (), deps=("a",)),
            sweep.Job("bad", ["-c", "raise SystemExit(3)"], ()),
            sweep.Job("after bad", ["-c", "pass"], (), deps=("bad",))]
    done = tmp_path / "done.json"
    done.write_text("{}")
    jobs.append(sweep.Job("finished before", ["-c", "raise SystemExit(1)"], (done,)))
    ran, skipped, failed, _ = sweep.run_parallel(jobs, ["0", "1"], tmp_path / "logs", poll_s=0.05)
    assert sorted(ran) == ["a", "b", "slow other"] and skipped == ["finished before"]
    assert sorted(failed) == ["after bad", "bad"]  # a job whose predecessor failed never starts
    logs = {p.name: p.read_text() for p in (tmp_path / "logs").iterdir()}
    assert set(logs) == {"a.log", "slow_other.log", "b.log", "bad.log"}
    assert "gpu 0" in logs["a.log"] or "gpu 1" in logs["a.log"]  # CUDA_VISIBLE_DEVICES = its GPU


def test_gpu_ids_index_the_visible_gpus_and_uuids_pass():
    """Inside an allocation with CUDA_VISIBLE_DEVICES=4,5,6,7, --gpus 0,1 are the physical GPUs 4 and 5 (they were
    passed on raw: GPUs 0 and 1, someone else's); GPU-/MIG- UUIDs pass as they are; a job can own several GPUs."""
    assert sweep.physical_gpus(["0", "1"], visible="4,5,6,7") == ["4", "5"]
    assert sweep.physical_gpus(["3"], visible="4,5,6,7") == ["7"]
    assert sweep.physical_gpus(["0", "1"], visible="") == ["0", "1"]  # nothing restricted
    mig = "MIG-4b2c1a2e-6f1d-5b7e-9a1b-0c2d3e4f5a6b"
    assert sweep.physical_gpus([mig, "GPU-abc"], visible="4,5") == [mig, "GPU-abc"]
    with pytest.raises(sweep.UsageError, match="only 2 GPU"):
        sweep.physical_gpus(["2"], visible="4,5")
    assert sweep.gpu_slots(["4", "5", "6", "7"], 2) == ["4,5", "6,7"]
    cmd = ["python", "/r/run.py", "--task", "nusax"]
    assert sweep.distributed(cmd, 2) == ["python", "-m", "torch.distributed.run", "--standalone",
                                         "--nproc_per_node", "2", "/r/run.py", "--task", "nusax"]
    assert sweep.distributed(["python", "/r/run_translate.py"], 2) == ["python", "/r/run_translate.py"]
    assert sweep.distributed(cmd, 1) == cmd
    # zero-shot and translate-test train nothing: one process, not K model loads
    for eval_only in (["--eval_zs", "--eval_only"], ["--translate-test", "--path_mt", "x"]):
        assert sweep.distributed([*cmd, *eval_only], 2) == [*cmd, *eval_only]


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's exit status waits for a reaper that containers may not run)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def test_sigterm_to_the_gpu_scheduler_stops_its_jobs(tmp_path):
    """A SIGTERM (a cancelled allocation, a Ctrl-C) to the sweep stops the jobs it runs on the GPUs, child
    processes included, before it exits; they used to keep running."""
    import os
    import signal
    import subprocess
    import sys
    import time

    pids = tmp_path / "pids"
    pids.mkdir()
    job = ("import os, subprocess, sys, time; "
           "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
           f"open(os.path.join({str(pids)!r}, str(os.getpid())), 'w').write(str(child.pid)); time.sleep(120)")
    code = ("import sys; from pathlib import Path; from flare import sweep; "
            f"jobs = [sweep.Job(n, ['-c', {job!r}], ()) for n in ('a', 'b', 'c')]; "
            f"sweep.run_parallel(jobs, ['0', '1'], Path({str(tmp_path / 'logs')!r}), poll_s=0.05)")
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    deadline = time.time() + 60
    while len(list(pids.iterdir())) < 2 and time.time() < deadline:
        time.sleep(0.1)
    started = {int(p.name): int(p.read_text()) for p in pids.iterdir() if p.read_text()}
    assert len(started) == 2  # two GPUs: two jobs at a time, the third waits
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    time.sleep(0.5)
    for pid in [*started, *started.values()]:
        assert not running(pid)
    assert len(list(pids.iterdir())) == 2  # the third job never started


def test_submitit_local_runs_jobs_after_their_predecessors_and_reports_failures(tmp_path, caplog):
    """The real submitit local executor with real processes: wave by wave in dependency order, one log per job, a
    failure reported with its log path, its dependents never submitted."""
    import argparse

    mark = tmp_path / "a-finished"
    jobs = [sweep.Job("a", ["-c", f"open({str(mark)!r}, 'w'); print('a ran')"], ()),
            sweep.Job("b", ["-c", f"import os; assert os.path.exists({str(mark)!r})"], (), deps=("a",)),
            sweep.Job("bad", ["-c", "raise SystemExit(3)"], ()),
            sweep.Job("after bad", ["-c", "pass"], (), deps=("bad",))]
    args = argparse.Namespace(launcher="local", time_min=5, cpus_per_job=1, mem_gb=1, gpus_per_job=0,
                              partition=None, account=None)
    ran, skipped, failed, _ = sweep.run_submitit(jobs, args, tmp_path / "logs")
    assert ran == ["a", "b"] and skipped == [] and sorted(failed) == ["after bad", "bad"]
    assert "FAILED: bad" in caplog.text and "_log.err" in caplog.text
    assert any("a ran" in p.read_text() for p in (tmp_path / "logs").rglob("*_log.out"))


def test_a_timed_out_job_requeues_itself_and_resumes_from_its_checkpoint(tmp_path):
    """submitit's local executor times the job out (as Slurm does at the time limit or on preemption): the job stops
    its command, requeues itself, and the requeued job runs the command again with --resume_from_checkpoint last
    (the run has a checkpoint); it used to fail, and downstream jobs were cancelled."""
    import sys

    import submitit
    from run_checks import write_checkpoint

    run_dir = tmp_path / "run"
    write_checkpoint(run_dir / "checkpoint-5")  # complete: the requeued command resumes from it
    code = ("import os, sys, time; d = sys.argv[1]; "
            "open(os.path.join(d, 'calls'), 'a').write(' '.join(sys.argv[2:]) + '|'); "
            "time.sleep(0 if '--resume_from_checkpoint' in sys.argv else 120)")
    executor = submitit.LocalExecutor(folder=tmp_path / "logs" / "%j")
    executor.update_parameters(timeout_min=0.2, signal_delay_s=8, gpus_per_node=0)  # the signal after 4 s
    job = executor.submit(sweep.ResumableCommand([sys.executable, "-c", code, str(run_dir)], str(tmp_path),
                                                 str(run_dir)))
    assert job.result() == 0
    assert (run_dir / "calls").read_text() == "|--resume_from_checkpoint last|"
    assert sweep.ResumableCommand(["x"], ".", str(tmp_path / "none")).resumed() == ["x"]  # no checkpoint: as is


def _local_args(**kw):
    import argparse

    return argparse.Namespace(launcher="local", time_min=5, cpus_per_job=1, mem_gb=1, gpus_per_job=0,
                              partition=None, account=None, **kw)


def test_a_rerun_does_not_submit_a_job_that_is_still_queued_or_running(tmp_path, caplog):
    """The sweep records each submitted job id next to its run (log_dir/submitted.json); run again while that job is
    still queued or running, it does not submit the run a second time (two jobs writing one run directory)."""
    import logging

    caplog.set_level(logging.INFO, logger="flare.sweep")
    unfinished = tmp_path / "never-written.json"
    jobs = [sweep.Job("a", ["-c", "print('a')"], (unfinished,)),
            sweep.Job("b", ["-c", "print('b')"], (tmp_path / "b.json",), deps=("a",))]
    ran, _, failed, held = sweep.run_submitit(jobs[:1], _local_args(), tmp_path / "logs")
    record = json.loads((tmp_path / "logs" / "submitted.json").read_text())
    assert ran == ["a"] and failed == [] and set(record) == {"a"} and record["a"]["job_id"]
    asked = []
    ran, _, failed, held = sweep.run_submitit(jobs, _local_args(), tmp_path / "logs",
                                              state=lambda launcher, jid: asked.append(jid) or "RUNNING")
    assert ran == [] and failed == [] and asked == [record["a"]["job_id"]]
    assert sorted(held) == ["a", "b"]  # reported as held, not as nothing at all (the sweep exits 3, not 0)
    assert "already queued or running as job" in caplog.text and "waits for a job of another sweep" in caplog.text
    # once it has left the queue, it is submitted again (it never finished)
    ran, _, _, _ = sweep.run_submitit(jobs[:1], _local_args(), tmp_path / "logs", state=lambda launcher, jid: "")
    assert ran == ["a"]


def test_a_refused_submission_is_reported_and_the_others_are_kept(tmp_path, caplog, monkeypatch):
    """sbatch refusing one job (a per-user cap): that job and its dependents are reported failed, the others are
    submitted and recorded."""
    import submitit

    real = submitit.AutoExecutor.submit

    def submit(self, fn, *a, **kw):
        if "refused" in " ".join(fn.cmd):
            raise submitit.core.utils.FailedJobError("sbatch: error: QOSMaxSubmitJobPerUserLimit")
        return real(self, fn, *a, **kw)

    monkeypatch.setattr(submitit.AutoExecutor, "submit", submit)
    jobs = [sweep.Job("ok", ["-c", "print('ok')"], ()),
            sweep.Job("refused", ["-c", "print('refused')"], ()),
            sweep.Job("after", ["-c", "pass"], (), deps=("refused",))]
    ran, _, failed, held = sweep.run_submitit(jobs, _local_args(), tmp_path / "logs")
    assert ran == ["ok"] and sorted(failed) == ["after", "refused"]
    assert "QOSMaxSubmitJobPerUserLimit" in caplog.text
    assert set(json.loads((tmp_path / "logs" / "submitted.json").read_text())) == {"ok"}


def test_usage_errors_of_the_launch_flags(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    base = ["--task", "nusax", "--plm", "me5-small", "--langs", "jav", "--dry_run"]
    assert sweep.main([*base, "--gpus", "0,1", "--in_process"]) == 2
    assert "drop it" in capsys.readouterr().err
    assert sweep.main([*base, "--gpus", "0", "--launcher", "local"]) == 2
    assert "one of them" in capsys.readouterr().err
    assert sweep.main([*base, "--gpus", ","]) == 2
    assert sweep.main([*base, "--gpus", "0"]) == 2  # this machine has no GPU
    assert "no CUDA GPU" in capsys.readouterr().err
    assert sweep.main([*base, "--partition", "gpu"]) == 2
    assert "add --launcher slurm" in capsys.readouterr().err


def grid(tiny_models, out: Path, *extra: str) -> list[str]:
    return ["--task", "nusax", "--plm", str(tiny_models / "xlm-roberta"), "--langs", "jav", "--modes", "zero-shot",
            "lora", "flare", "--seeds", "5", "--mt", "reference", "--data_dir", str(REPO / "data"),
            "--output_dir", str(out / "ck"), "--translations", str(out / "tr"), "--stage1_args", SMALL,
            "--stage2_args", SMALL, *extra]


def metrics(out: Path) -> dict:
    return {p.parent.name: {k: v for k, v in json.loads(p.read_text()).items() if k.startswith("test_")
                            and k != "test_runtime"} for p in sorted((out / "ck").glob("*/results_*.json"))}


@pytest.mark.slow
def test_submitit_and_gpus_launchers_run_a_small_grid(tmp_path, tiny_models, caplog):
    """submitit's local executor: translations and stage 1 first, then the three stage-2 runs, each a real process
    with its own log; a re-run submits nothing; --gpus 0,1 (CUDA_VISIBLE_DEVICES, ignored on this CPU) computes the
    same results; a failing stage 1 is reported with its log, and its stage-2 jobs are never submitted."""
    assert sweep.main(grid(tiny_models, tmp_path / "sub", "--launcher", "local")) == 0
    first = metrics(tmp_path / "sub")
    assert len(first) == 4  # stage 1, zero-shot, LoRA, FLARE
    logs = list((tmp_path / "sub" / "ck" / "logs").rglob("*_log.out"))
    assert len(logs) == 2 + 1 + 3  # one per job: 2 translations, stage 1, 3 stage-2 runs
    caplog.clear()
    assert sweep.main(grid(tiny_models, tmp_path / "sub", "--launcher", "local")) == 0
    assert "submitted" not in caplog.text or all("translate" in ln for ln in caplog.text.splitlines()
                                                 if "submitted" in ln)  # only the self-skipping translations

    import torch

    with pytest.MonkeyPatch.context() as mp:  # two "GPUs" for the flag check; the jobs run on this CPU
        mp.setattr(torch.cuda, "is_available", lambda: True)
        mp.setattr(torch.cuda, "device_count", lambda: 2)
        assert sweep.main(grid(tiny_models, tmp_path / "gpus", "--gpus", "0,1")) == 0
    assert metrics(tmp_path / "gpus") == first
    assert len(list((tmp_path / "gpus" / "ck" / "logs").glob("*.log"))) == 6

    caplog.clear()
    bad = grid(tiny_models, tmp_path / "bad", "--launcher", "local")
    bad[bad.index("--stage1_args") + 1] = SMALL + " --epochs 0"  # stage 1 fails in its own process
    assert sweep.main(bad) == 1
    assert "FAILED: stage 1 seed 5" in caplog.text and "_log.err" in caplog.text
    assert "not started, stage 1 seed 5 failed: flare/add_relu jav seed 5" in caplog.text
