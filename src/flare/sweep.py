"""Run a grid of FLARE experiments with one command: seeds x target languages x modes, on a CPU or a GPU node.

    python -m flare.sweep --task nusax --plm me5-small --langs jav sun --modes zero-shot lora flare \\
        --seeds 1 2 3 --mt reference --data_dir data

For each language the translations (``run_translate.py``) whose files are missing; for each seed stage 1
(``run_task_ft.py``) if its results are missing; then every stage-2 run (``run.py``) whose ``results_*.json`` is
missing.
Finished runs are skipped, a failed run does not stop the sweep, and the failures are listed at the end (exit 1).
Each run is its own process (memory is returned between runs; a crash cannot take the sweep down), unless
``--in_process``: then every job runs in this process through its script's ``main(argv)`` (the imports, about 6 s
per job on a 2-core CPU, happen once). Each run still loads a fresh model and sets its own seed, so it computes
what it computes as a separate process (tested); an exception fails that job only.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from flare.config import model_name
from flare.errors import FlareError, UsageError
from flare.files import ADAPTER_FILE

logger = logging.getLogger("flare.sweep")

REPO = Path(__file__).resolve().parents[2]
TRAINING_SCRIPTS = ("run.py", "run_task_ft.py")  # jobs that train: checkpoints to resume from, DDP over several GPUs
EVAL_ONLY_FLAGS = ("--eval_only", "--translate-test")  # run.py / run_task_ft.py runs that train nothing
HELD_EXIT = 3  # the sweep's exit status when nothing failed but jobs were left to another sweep
MODES = ("zero-shot", "translate-test", "lora", "xmixup", "input-fusion", "flare", "flare-mt")


@dataclass
class Job:
    name: str
    argv: list[str]
    done_files: tuple[Path, ...]  # the job is finished when all exist; () = always run
    deps: tuple[str, ...] = ()  # names of the jobs that must finish first (stage 1 of the seed, the translations)

    @property
    def run_dir(self) -> Path | None:
        """The run directory of a training job (where its checkpoints go); None for other jobs."""
        if self.argv and self.argv[0] in TRAINING_SCRIPTS and self.done_files:
            return self.done_files[0].parent
        return None

    @property
    def finished(self) -> bool:
        return bool(self.done_files) and all(p.is_file() for p in self.done_files)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Run seeds x languages x modes of FLARE, skipping finished runs.")
    p.add_argument("--task", required=True, help="task (xnli, nusax, tydiqa)")
    p.add_argument("--plm", required=True, help="model key or local model directory")
    p.add_argument("--langs", nargs="+", required=True, help="target languages")
    p.add_argument("--modes", nargs="+", default=["zero-shot", "translate-test", "lora", "input-fusion", "flare"],
                   choices=MODES, help="stage-2 modes (lora = translate-train LoRA)")
    p.add_argument("--fusion_fns", nargs="+", default=["add_relu"], help="fusion functions for flare / flare-mt")
    p.add_argument("--seeds", nargs="+", type=int, default=[42], help="seeds")
    p.add_argument("--source_lang", default="en", help="source language")
    p.add_argument("--mt", default="nllb-3.3b",
                   help="translation model of run_translate.py: an NLLB key or folder, 'reference', 'lexical' or an "
                        "MT quality level 'lexical-qNN'")
    p.add_argument("--mt_model", default="nllb-600m", help="FLARE MT encoder")
    p.add_argument("--data_dir", default=None, help="local data root (default: the hub)")
    p.add_argument("--output_dir", default="checkpoints", help="root of the run directories")
    p.add_argument("--stage1_dir", default=None,
                   help="root of the stage-1 run directories (default: --output_dir); lets several sweeps, e.g. "
                        "one per training budget, share one stage-1 model per seed")
    p.add_argument("--translations", default="translations", help="root of the translation files")
    p.add_argument("--translate_args", default="", help="extra flags for run_translate.py (one quoted string)")
    p.add_argument("--stage1_args", default="", help="extra flags for run_task_ft.py (one quoted string)")
    p.add_argument("--stage2_args", default="", help="extra flags for run.py (one quoted string)")
    p.add_argument("--in_process", action="store_true",
                   help="run every job in this process (no per-job interpreter start and imports; fresh model and "
                        "seed per run, same results); default: one process per job")
    p.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    g = p.add_argument_group("parallel and cluster runs")
    g.add_argument("--gpus", default=None,
                   help="comma-separated GPU ids as this process sees them (e.g. 0,1,2,3; inside an allocation that "
                        "sets CUDA_VISIBLE_DEVICES they index into it) or GPU-/MIG- UUIDs: independent jobs run in "
                        "parallel, one per GPU (CUDA_VISIBLE_DEVICES), in dependency order; each job's output goes "
                        "to LOG_DIR/<job>.log")
    g.add_argument("--launcher", default=None, choices=["slurm", "local"],
                   help="submit every job through submitit: slurm = Slurm jobs with afterok dependencies; local = "
                        "submitit's local executor (real processes on this machine, for testing the same path)")
    g.add_argument("--log_dir", default=None, help="job logs (default OUTPUT_DIR/logs)")
    g.add_argument("--partition", default=None, help="Slurm partition")
    g.add_argument("--account", default=None, help="Slurm account")
    g.add_argument("--slurm_qos", default=None, help="Slurm QOS")
    g.add_argument("--slurm_constraint", default=None, help="Slurm constraint (e.g. a100|h100)")
    g.add_argument("--slurm_setup", nargs="+", default=None, metavar="LINE",
                   help="lines each Slurm job runs before its command, e.g. 'module load cuda/12.4' "
                        "'source .venv/bin/activate'")
    g.add_argument("--gpus_per_job", type=int, default=1,
                   help="GPUs per job (default 1); with more, a training job runs under torchrun, one process per "
                        "GPU (DDP): --gpus 0,1,2,3 --gpus_per_job 2 runs two jobs side by side, or one Slurm job "
                        "with that many GPUs")
    g.add_argument("--cpus_per_job", type=int, default=8, help="CPUs per Slurm job (default 8)")
    g.add_argument("--mem_gb", type=int, default=64, help="memory per Slurm job in GB (default 64)")
    g.add_argument("--time_min", type=int, default=24 * 60, help="time limit per Slurm job in minutes (default 1 day)")
    return p


def mode_flags(mode: str, fn: str, forward: Path, backward: Path, mt_model: str) -> list[str]:
    train = ["--adapter", "lora", "--translate-train", "--path_mt", str(forward)]
    return {
        "zero-shot": ["--eval_zs", "--eval_only"],
        "translate-test": ["--translate-test", "--path_mt", str(backward)],
        "lora": train,
        "xmixup": [*train, "--xmixup"],
        "input-fusion": [*train, "--input_fusion"],
        "flare": [*train, "--fusion_fn", fn],
        "flare-mt": [*train, "--fusion_fn", fn, "--fuse_mt", "--mt_model", mt_model],
    }[mode]


def check_args(args: argparse.Namespace) -> None:
    """The grid's model, languages and folders, checked before any job starts (a typo fails in a second, not after
    stage 1)."""
    if args.in_process and (args.gpus or args.launcher):
        raise UsageError("--in_process runs the jobs one after another in this process; drop it with --gpus or "
                         "--launcher")
    if args.gpus and args.launcher:
        raise UsageError("--gpus runs the jobs on this node, --launcher submits them; pass one of them")
    if args.gpus is not None:
        ids = gpu_ids(args.gpus)
        if not ids or not all(g.isdigit() or is_device_uuid(g) for g in ids):
            raise UsageError(f"--gpus {args.gpus!r}: give GPU ids (0,1,2,3, numbered as this process sees them) or "
                             "GPU-/MIG- UUIDs (nvidia-smi -L)")
        if len(set(ids)) != len(ids):
            raise UsageError(f"--gpus {args.gpus}: a GPU is listed twice")
        import torch

        if not torch.cuda.is_available():
            raise UsageError(f"--gpus {args.gpus}: no CUDA GPU is visible here; drop --gpus to run the jobs one after "
                             "another, or run the sweep on a GPU node")
        numbers = [int(g) for g in ids if g.isdigit()]
        if numbers and max(numbers) >= torch.cuda.device_count():
            raise UsageError(f"--gpus {args.gpus}: only {torch.cuda.device_count()} GPU(s) are visible (ids 0.."
                             f"{torch.cuda.device_count() - 1})")
        if args.gpus_per_job < 1 or len(ids) % args.gpus_per_job:
            raise UsageError(f"--gpus {args.gpus}: {len(ids)} GPUs do not split into jobs of --gpus_per_job "
                             f"{args.gpus_per_job}")
    slurm_flags = [f"--{n}" for n in ("partition", "account", "slurm_qos", "slurm_constraint", "slurm_setup")
                   if getattr(args, n)]
    if slurm_flags and args.launcher != "slurm":
        raise UsageError(f"{' '.join(slurm_flags)} are Slurm flags; add --launcher slurm")
    if args.launcher:
        try:
            import submitit  # noqa: F401
        except ImportError as e:
            raise UsageError(f"--launcher {args.launcher} needs submitit: pip install submitit==1.5.4 (it is in "
                             "requirements.txt)") from e
    if args.source_lang in args.langs and set(args.modes) != {"zero-shot"}:
        raise UsageError(f"--langs includes the source language {args.source_lang}; only zero-shot makes sense for it "
                         "(run it with --modes zero-shot), drop it from --langs")
    from flare.config import resolve_model, resolve_translation_model
    from flare.data import check_task_language
    from flare.stages import check_output_dir

    resolve_model(args.plm)
    from flare.lexical_mt import is_offline_mt

    checked = {"--mt": args.mt} if not is_offline_mt(args.mt) else {}
    if "flare-mt" in args.modes:
        checked["--mt_model"] = args.mt_model
    for flag, name in checked.items():
        resolve_translation_model(name, flag)
    for lang in (args.source_lang, *args.langs):
        check_task_language(args.task, lang)
    for folder in (args.output_dir, args.stage1_dir, args.translations):
        if folder:
            check_output_dir(folder)


def plan(args: argparse.Namespace) -> list[Job]:
    from flare import stage2
    from flare.data import check_task_language
    from flare.data.layout import mt_name, translation_files, translation_folder  # (flare.data imports datasets)

    # the languages' canonical codes (TyDiQA's id is ind, bn ben): the names run.py gives its run directories and
    # translation folders, so that a finished job is recognised as finished
    args = argparse.Namespace(**{**vars(args), "source_lang": check_task_language(args.task, args.source_lang),
                                 "langs": [check_task_language(args.task, lang) for lang in args.langs]})

    plm_name = model_name(args.plm)
    out, tr = Path(args.output_dir), Path(args.translations)
    data = ["--data_dir", args.data_dir] if args.data_dir else []
    jobs: list[Job] = []
    translations: dict[str, tuple[str, ...]] = {}  # language -> its translation jobs
    needs_mt = any(m != "zero-shot" for m in args.modes)
    redo = "--overwrite" in shlex.split(args.translate_args)
    # run.py --validation_set target: the fusion modes read the MT English of the target validation set too
    flags = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    flags.add_argument("--validation_set", default="translated")
    target_validation = flags.parse_known_args(shlex.split(args.stage2_args))[0].validation_set == "target"
    backward = ("validation", "test") if target_validation else ("test",)
    if needs_mt:
        for lang in args.langs:
            for src, tgt, splits in ((args.source_lang, lang, ()), (lang, args.source_lang, backward)):
                name = f"translate {args.task} {src}->{tgt}"
                translations[lang] = (*translations.get(lang, ()), name)
                done = () if redo else tuple(translation_files(tr, args.task, src, tgt, args.mt, splits))
                jobs.append(Job(name, ["run_translate.py", "--task", args.task, "--source_lang", src,
                                       "--target_lang", tgt, "--model", args.mt, "--output_dir", str(tr),
                                       *(["--splits", *splits] if splits else []), *data,
                                       *shlex.split(args.translate_args)], done))
    for seed in args.seeds:
        stage1_root = Path(args.stage1_dir or args.output_dir)
        stage1_dir = stage1_root / f"{args.task}-{args.source_lang}-{plm_name}-{seed}"
        stage1_job = f"stage 1 seed {seed}"
        jobs.append(Job(stage1_job,
                        ["run_task_ft.py", "--task", args.task, "--plm", args.plm, "--lang", args.source_lang,
                         "--seed", str(seed), "--output_dir", str(stage1_root), *data,
                         *shlex.split(args.stage1_args)],
                        # finished = its results AND the model stage 2 loads (a folder of copied results alone, as in
                        # results/, is trained again rather than failing every stage-2 run of the seed)
                        (stage1_dir / "results_test.json", stage1_dir / ADAPTER_FILE)))
        for lang in args.langs:
            forward = translation_folder(tr, args.task, lang, mt_name(args.mt))
            backward = translation_folder(tr, args.task, args.source_lang, mt_name(args.mt))
            for mode in args.modes:
                for fn in (args.fusion_fns if mode.startswith("flare") else [None]):
                    argv = ["--task", args.task, "--plm", args.plm, "--source_lang", args.source_lang,
                            "--target_lang", lang, "--seed", str(seed), "--output_dir", str(out),
                            "--load_ckpt", str(stage1_dir), *data,
                            *mode_flags(mode, fn, forward, backward, args.mt_model),
                            *shlex.split(args.stage2_args)]
                    parsed = stage2.build_parser().parse_args(argv)
                    name = stage2.run_name(parsed, args.source_lang, lang, plm_name)
                    prefix = "zs" if mode == "zero-shot" else "test"
                    deps = (stage1_job, *(translations.get(lang, ()) if mode != "zero-shot" else ()))
                    jobs.append(Job(f"{mode}{'/' + fn if fn else ''} {lang} seed {seed}", ["run.py", *argv],
                                    (out / name / f"results_{prefix}.json",), deps))
    return jobs


def load_script(script: str):
    """The module of one of the repository's scripts, by its path from the repository root (``run.py``,
    ``scripts/embedded_nusax_study.py``): the scripts are files, not modules of the package."""
    spec = importlib.util.spec_from_file_location(f"flare_script_{Path(script).stem}", REPO / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # the scripts only define functions (and import from flare) at import time
    return module


def script_main(script: str):
    """The ``main(argv)`` of one of the repository's scripts (run.py, run_task_ft.py, run_translate.py)."""
    return load_script(script).main


def run_in_process(job: Job) -> int:
    try:
        code = script_main(job.argv[0])(job.argv[1:])
    except SystemExit as e:  # argparse errors
        code = e.code if isinstance(e.code, int) else 1
    except Exception:  # noqa: BLE001 - one failed job must not stop the sweep
        logger.exception("job raised: %s", job.name)
        code = 1
    finally:
        gc.collect()  # the run's model and data go before the next one loads
    return code


def command(job: Job, python: str = sys.executable) -> list[str]:
    """The job's command line: a repository script (``run.py`` ...) or raw interpreter arguments."""
    script = str(REPO / job.argv[0]) if job.argv[0].endswith(".py") else job.argv[0]
    return [python, script, *job.argv[1:]]


@dataclass
class Outcome:
    """What a sweep did with its jobs (names): ran, skipped (finished before), failed (or a predecessor failed), held
    (another process runs the job, or an earlier sweep's job it waits for is still queued or running: not run
    here, nothing failed; run the sweep again once they are done)."""

    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    held: list[str] = field(default_factory=list)

    def __iter__(self):  # ran, skipped, failed, held = outcome
        return iter((self.ran, self.skipped, self.failed, self.held))


def blocked_by(job: Job, names: list[str]) -> str | None:
    return next((d for d in job.deps if d in names), None)


def settle(job: Job, out: Outcome, prefix: str = "") -> bool:
    """True if ``job`` needs no run here: finished before (-> skipped), a predecessor failed (-> failed) or is run by
    another process (-> held); ``prefix`` goes before the log line (the serial sweep's ``[i/n] ``)."""
    if job.finished:
        logger.info("%sskip (finished): %s", prefix, job.name)
        out.skipped.append(job.name)
        return True
    if (dep := blocked_by(job, out.failed)) is not None:
        logger.error("%snot started, %s failed: %s", prefix, dep, job.name)
        out.failed.append(job.name)
        return True
    if (dep := blocked_by(job, out.held)) is not None:
        logger.warning("%snot started, it waits for %s, which another process runs: %s", prefix, dep, job.name)
        out.held.append(job.name)
        return True
    return False


def claim_path(job: Job) -> Path | None:
    """The lock file that claims ``job`` (None for a job without done files: it always runs): beside a training
    job's run directory (``.<run>.claim``), else beside its first done file. Every sweep on the same folders uses the
    same file, whatever its --output_dir or job names."""
    if not job.done_files:
        return None
    target = job.run_dir or job.done_files[0]
    return target.with_name(f".{target.name}.claim")


@contextlib.contextmanager
def claimed(path: Path | None):
    """Claim ``path`` (a lock file) for the block: yields True if this process holds it, False if another process
    does. The lock dies with its holder (an OS file lock: a crashed or killed sweep leaves no stale claim)."""
    if path is None:
        yield True
        return
    from filelock import FileLock, Timeout

    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


def claim_or_hold(job: Job, lock: contextlib.ExitStack, out: Outcome, prefix: str = "") -> bool:
    """Claim ``job`` into ``lock`` (released when the job ends). False, with the job held or skipped, if another
    process holds it or finished it meanwhile."""
    if not lock.enter_context(claimed(claim_path(job))):
        logger.warning("%sclaimed by another process (another sweep runs it), not run here: %s", prefix, job.name)
        out.held.append(job.name)
        return False
    if job.finished:  # finished by another sweep between the check and the claim
        logger.info("%sskip (finished): %s", prefix, job.name)
        out.skipped.append(job.name)
        return False
    return True


def gpu_ids(spec: str) -> list[str]:
    """The entries of ``--gpus``."""
    return [g.strip() for g in spec.split(",") if g.strip()]


def stop_process_groups(groups: list[tuple[int, Callable[[], bool]]], grace_s: float = 30.0) -> None:
    """SIGTERM to each ``(pid, exited)`` process group (a job with every process it started, torchrun's workers
    too), then SIGKILL to those whose ``exited()`` is still false after ``grace_s``."""
    import signal

    for pid, _ in groups:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
    deadline = time.time() + grace_s
    waiting = list(groups)
    while waiting:
        waiting = [(pid, exited) for pid, exited in waiting if not exited()]
        if waiting and time.time() > deadline:
            for pid, _ in waiting:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
            deadline = float("inf")
        if waiting:
            time.sleep(0.1)


def is_device_uuid(gpu: str) -> bool:
    """A GPU or MIG instance UUID as ``nvidia-smi -L`` prints it (CUDA_VISIBLE_DEVICES accepts both)."""
    return gpu.startswith(("GPU-", "MIG-")) and len(gpu) > 4


def physical_gpus(ids: list[str], visible: str | None = None) -> list[str]:
    """The ``CUDA_VISIBLE_DEVICES`` entries of ``--gpus`` ids. Numbers are positions among the GPUs this process
    sees, as torch numbers them: inside an allocation that already restricts ``CUDA_VISIBLE_DEVICES`` (say
    ``4,5,6,7``), ``--gpus 0,1`` are the physical GPUs 4 and 5, not 0 and 1 (someone else's). UUIDs pass as they
    are. ``visible``: the current ``CUDA_VISIBLE_DEVICES`` (default: this process's environment)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES") if visible is None else visible
    entries = [v.strip() for v in visible.split(",") if v.strip()] if visible else None
    out = []
    for gpu in ids:
        if gpu.isdigit() and entries is not None:
            if int(gpu) >= len(entries):
                raise UsageError(f"--gpus {gpu}: CUDA_VISIBLE_DEVICES={visible} makes only {len(entries)} GPU(s) "
                                 f"visible (ids 0..{len(entries) - 1})")
            out.append(entries[int(gpu)])
        else:
            out.append(gpu)
    return out


def gpu_slots(ids: list[str], per_job: int) -> list[str]:
    """``CUDA_VISIBLE_DEVICES`` values, one per concurrent job: consecutive groups of ``per_job`` GPUs."""
    return [",".join(ids[i:i + per_job]) for i in range(0, len(ids), per_job)]


def distributed(cmd: list[str], nproc: int) -> list[str]:
    """A training script's command line under ``torchrun`` with one process per GPU (DDP); other jobs (the
    translations, evaluation-only runs) run as they are, on the first GPU of their slot."""
    script = Path(cmd[1]).name if len(cmd) > 1 else ""
    if nproc <= 1 or script not in TRAINING_SCRIPTS or any(flag in cmd for flag in EVAL_ONLY_FLAGS):
        return cmd  # an evaluation-only run (zero-shot, translate-test) is one process: no K model loads
    return [cmd[0], "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *cmd[1:]]


def run_jobs(jobs: list[Job], dry_run: bool = False, python: str = sys.executable,
             in_process: bool = False) -> Outcome:
    """One job at a time, in plan order (which is a dependency order). A failure never stops the sweep, but the jobs
    that depend on a failed job are not started (failed too). Each job is claimed while it runs
    (:func:`claim_path`): a job another sweep is running is held, with its dependents, not run twice."""
    out = Outcome()
    for i, job in enumerate(jobs, 1):
        prefix = f"[{i}/{len(jobs)}] "
        if settle(job, out, prefix):
            continue
        cmd = command(job, python)
        here = in_process and job.argv[0].endswith(".py")
        if dry_run:
            logger.info("%s%s\n  %s", prefix, job.name, shlex.join(cmd))
            continue
        with contextlib.ExitStack() as lock:
            if not claim_or_hold(job, lock, out, prefix):
                continue
            logger.info("%s%s%s\n  %s", prefix, job.name, " (in process)" if here else "", shlex.join(cmd))
            t0 = time.time()
            code = run_in_process(job) if here else subprocess.call(cmd)
        if code != 0:
            logger.error("FAILED (exit %d): %s", code, job.name)
            out.failed.append(job.name)
        else:
            logger.info("done in %.0f s: %s", time.time() - t0, job.name)
            out.ran.append(job.name)
    return out


def log_name(job: Job) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in job.name) + ".log"


def run_parallel(jobs: list[Job], gpus: list[str], log_dir: Path, python: str = sys.executable,
                 poll_s: float = 0.2, gpus_per_job: int = 1) -> tuple[list, list, list]:
    """Up to one job per GPU slot at a time (``CUDA_VISIBLE_DEVICES``: ``gpus_per_job`` GPUs each; a training job
    with several GPUs runs under torchrun), each started once every job it depends on has finished; each job's
    stdout and stderr go to ``log_dir/<job>.log``. SIGTERM / SIGINT to the sweep stop every running job (its whole
    process group: torchrun's workers too) before the sweep exits: nothing is left running on the GPUs."""
    import signal

    log_dir.mkdir(parents=True, exist_ok=True)
    out = Outcome()
    pending, free = list(jobs), gpu_slots(physical_gpus(gpus), gpus_per_job)
    running: dict[str, tuple[Job, subprocess.Popen, float, object, contextlib.ExitStack]] = {}
    finished = lambda name: name in out.ran or name in out.skipped  # noqa: E731

    def stop(signum, _frame):
        logger.error("sweep: signal %d, stopping %d running job(s)", signum, len(running))
        stop_process_groups([(proc.pid, lambda proc=proc: proc.poll() is not None)
                             for _, proc, _, _, _ in running.values()])
        raise SystemExit(128 + signum)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while pending or running:
            for job in list(pending):
                if settle(job, out):
                    pending.remove(job)
                elif free and all(finished(d) for d in job.deps):
                    lock = contextlib.ExitStack()
                    if not claim_or_hold(job, lock, out):
                        pending.remove(job)
                        continue
                    gpu = free.pop(0)
                    log = open(log_dir / log_name(job), "w")  # noqa: SIM115 - closed when the job ends
                    cmd = distributed(command(job, python), gpus_per_job)
                    log.write(shlex.join(cmd) + "\n")
                    log.flush()
                    env = dict(os.environ, CUDA_VISIBLE_DEVICES=gpu)
                    # its own process group: a stop reaches every process it started (torchrun's workers)
                    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=os.getcwd(),
                                            start_new_session=True)
                    running[gpu] = (job, proc, time.time(), log, lock)
                    pending.remove(job)
                    logger.info("GPU %s: %s (log %s)", gpu, job.name, log.name)
            for gpu, (job, proc, t0, log, lock) in list(running.items()):
                if proc.poll() is None:
                    continue
                log.close()
                lock.close()
                del running[gpu]
                free.append(gpu)
                if proc.returncode == 0:
                    logger.info("done in %.0f s on GPU %s: %s", time.time() - t0, gpu, job.name)
                    out.ran.append(job.name)
                else:
                    logger.error("FAILED (exit %d): %s; log: %s", proc.returncode, job.name, log.name)
                    out.failed.append(job.name)
            if running or pending:
                time.sleep(poll_s)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for *_, lock in running.values():
            lock.close()
    return out


class ResumableCommand:
    """A submitit job that runs one command line and, on a time limit or a preemption, requeues ITSELF resuming from
    its newest complete checkpoint (``--resume_from_checkpoint last``), so its dependents still run.

    Two ways a cluster ends a job early, both handled:

    * the signal submitit waits for (Slurm's ``--signal`` before the time limit, USR2 by default): submitit calls
      :meth:`checkpoint` and requeues the job with what it returns;
    * SIGTERM to every process of the step, as many Slurm sites preempt (and as ``scancel`` does): submitit only logs
      it, the training command dies of it, and the job used to fail ("command failed with exit -15") with its
      dependents cancelled. Here a SIGTERM to this process is passed on to the command's process group, and a
      command ended by SIGTERM (this process signalled, or the command's exit -15 / 143) is a preemption: the job
      raises submitit's requeue signal at itself, which takes the same path as the first case.

    The command's process group is stopped before a requeue. A command that fails otherwise raises, as submitit's
    ``CommandFunction`` does. ``claim``: a lock file held while the command runs (:func:`claim_path`): a second
    copy of the same run (another sweep's job) finds it held and fails at once instead of training into the same
    folder."""

    def __init__(self, cmd: list[str], cwd: str, run_dir: str | None = None, claim: str | None = None):
        self.cmd, self.cwd, self.run_dir, self.claim = list(cmd), cwd, run_dir, claim
        self._proc = None

    def __getstate__(self):  # the running process does not travel with a requeued job
        return {k: v for k, v in self.__dict__.items() if k != "_proc"}

    def __setstate__(self, state):
        self.__dict__.update({"claim": None, **state}, _proc=None)

    def __call__(self) -> int:
        import signal

        terminated = []

        def on_sigterm(signum, _frame):
            terminated.append(signum)
            if self._proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self._proc.pid, signal.SIGTERM)

        lock = claimed(Path(self.claim)) if self.claim else contextlib.nullcontext(True)
        with lock as got:
            if not got:
                raise RuntimeError(f"{self.claim} is held by another process (another sweep runs this job); not "
                                   f"run twice: {shlex.join(self.cmd)}")
            print("running: " + shlex.join(self.cmd), flush=True)
            previous = signal.signal(signal.SIGTERM, on_sigterm)
            try:
                self._proc = subprocess.Popen(self.cmd, cwd=self.cwd, start_new_session=True)
                code = self._proc.wait()
            finally:
                signal.signal(signal.SIGTERM, previous)
        if code != 0 and (terminated or code in (-signal.SIGTERM, 128 + signal.SIGTERM)):
            requeue_signal = preemption_signal()
            if requeue_signal is not None:
                print(f"the command ended by SIGTERM (exit {code}): a preemption; requeueing", flush=True)
                signal.raise_signal(requeue_signal)  # submitit's handler: checkpoint() then requeue; it exits
        if code != 0:
            raise RuntimeError(f"command failed with exit {code}: {shlex.join(self.cmd)}")
        return code

    def resumed(self) -> list[str]:
        """The command that resumes from the run's newest complete checkpoint, if it has one (else the same
        command: a job preempted before its first complete save starts over)."""
        from flare.files import newest_complete_checkpoint

        has_ckpt = self.run_dir is not None and newest_complete_checkpoint(Path(self.run_dir))[0] is not None
        if not has_ckpt or "--resume_from_checkpoint" in self.cmd:
            return list(self.cmd)
        return [*self.cmd, "--resume_from_checkpoint", "last"]

    def checkpoint(self, *args, **kwargs):
        from submitit.helpers import DelayedSubmission

        if self._proc is not None and self._proc.returncode is None:
            # called from a signal handler while __call__ is inside Popen.wait(), which holds the Popen's lock:
            # reap with os.waitpid, not with the Popen
            pid = self._proc.pid

            def exited() -> bool:
                try:
                    return os.waitpid(pid, os.WNOHANG) != (0, 0)
                except ChildProcessError:
                    return True

            stop_process_groups([(pid, exited)], grace_s=60)
        logger.info("requeued, resuming: %s", shlex.join(self.resumed()))
        return DelayedSubmission(ResumableCommand(self.resumed(), self.cwd, self.run_dir, self.claim))


def preemption_signal():
    """The signal on which submitit checkpoints and requeues the job this process runs (its handler is installed), or
    None outside a submitit job."""
    import signal

    try:
        from submitit import JobEnvironment

        sig = JobEnvironment()._usr_sig()  # USR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise
    except Exception:  # noqa: BLE001 - not inside a submitit job (or an unknown signal name)
        return None
    return sig if callable(signal.getsignal(sig)) else None


ACTIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED",
                 "REQUEUE_HOLD", "REQUEUE_FED", "STAGE_OUT", "SIGNALING"}
SUBMITTED_FILE = "submitted.json"  # in the log folder: job name -> {"job_id", "run_dir"}


def job_state(launcher: str, job_id: str) -> str:
    """A submitted job's state: Slurm's (``squeue``; "" once it has left the queue) or, for the local executor
    (job id = process id), RUNNING while that process lives."""
    if launcher == "local":
        try:
            os.kill(int(job_id), 0)
        except (ProcessLookupError, ValueError):
            return ""
        except PermissionError:  # alive, another user's
            pass
        return "RUNNING"
    out = subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%T"], capture_output=True, text=True)
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else ""


def run_submitit(jobs: list[Job], args: argparse.Namespace, log_dir: Path,
                 python: str = sys.executable,
                 state: Callable[[str, str], str] = job_state) -> Outcome:
    """Every unfinished job through submitit. Slurm: each job submitted with ``afterok`` dependencies on its
    predecessors' Slurm jobs, all at once; local (submitit's local executor, no dependency support): submitted
    wave by wave, each job once its predecessors have finished. Logs: submitit's per-job files in ``log_dir``.

    Each job is a :class:`ResumableCommand` (a time limit or preemption requeues it from its newest complete
    checkpoint) named after its run; a job that needs several GPUs is one job running torchrun. The submitted job
    ids are recorded in ``log_dir/submitted.json``, read and written under a lock (``submitted.json.lock``), one job
    at a time: a sweep started beside another one on the same folder, or re-run later, does not submit a run whose
    job is still pending or running (its dependents wait for that job, and are reported held). A submission that
    fails (e.g. a per-user cap) is reported, its dependents are not submitted, and the jobs already submitted stay
    recorded."""
    import submitit
    from filelock import FileLock

    from flare.files import write_json_atomic

    executor = submitit.AutoExecutor(folder=log_dir / "%j", cluster=args.launcher)
    params = dict(timeout_min=args.time_min, cpus_per_task=args.cpus_per_job, mem_gb=args.mem_gb,
                  gpus_per_node=args.gpus_per_job, nodes=1, tasks_per_node=1, name="flare")
    if args.launcher == "slurm":
        params.update({k: v for k, v in (("slurm_partition", args.partition), ("slurm_account", args.account),
                                         ("slurm_qos", getattr(args, "slurm_qos", None)),
                                         ("slurm_constraint", getattr(args, "slurm_constraint", None)),
                                         ("slurm_setup", getattr(args, "slurm_setup", None))) if v})
    executor.update_parameters(**params)
    out = Outcome()
    submitted: dict[str, object] = {}  # job name -> submitit job (this sweep's)
    elsewhere: dict[str, str] = {}  # job name -> id of a job another sweep submitted, still queued or running
    log_dir.mkdir(parents=True, exist_ok=True)
    record_path = log_dir / SUBMITTED_FILE
    record_lock = FileLock(str(record_path) + ".lock")

    def read_record() -> dict:
        return json.loads(record_path.read_text()) if record_path.is_file() else {}

    def active_elsewhere(job: Job, record: dict) -> str | None:
        old = record.get(job.name, {}).get("job_id")
        if old and not job.finished and state(args.launcher, str(old)) in ACTIVE_STATES:
            return str(old)
        return None

    with record_lock:
        record = read_record()
        pending = []
        for job in jobs:
            if (old := active_elsewhere(job, record)) is not None:
                logger.info("already queued or running as job %s (not submitted again): %s", old, job.name)
                elsewhere[job.name] = old
            else:
                pending.append(job)

    def job_id(name: str) -> str | None:
        return submitted[name].job_id if name in submitted else elsewhere.get(name)

    def submit(job: Job) -> bool:
        if (dep := blocked_by(job, out.failed)) is not None:  # (Slurm submits a whole wave: a predecessor failed)
            logger.error("not submitted, %s failed: %s", dep, job.name)
            out.failed.append(job.name)
            return False
        ids = [i for i in (job_id(d) for d in job.deps) if i]
        extra = {}
        if args.launcher == "slurm" and ids:
            # kill_on_invalid_dep: a job whose predecessor failed ends (and is reported) instead of pending forever
            extra = {"dependency": "afterok:" + ":".join(ids), "kill_on_invalid_dep": "yes"}
        name = "flare-" + log_name(job)[:-len(".log")]
        executor.update_parameters(name=name, **({"slurm_additional_parameters": extra}
                                                 if args.launcher == "slurm" else {}))
        cmd = distributed(command(job, python), args.gpus_per_job)
        run_dir = str(job.run_dir) if job.run_dir else None
        claim = claim_path(job)
        with record_lock:  # another sweep may have submitted it, or run it, since this one started
            record = read_record()
            if job.finished:
                logger.info("skip (finished meanwhile): %s", job.name)
                out.skipped.append(job.name)
                return False
            if (old := active_elsewhere(job, record)) is not None:
                logger.warning("submitted by another sweep meanwhile as job %s (not submitted again): %s", old,
                               job.name)
                elsewhere[job.name] = old
                return False
            try:
                submitted[job.name] = executor.submit(ResumableCommand(cmd, os.getcwd(), run_dir,
                                                                       str(claim) if claim else None))
            except Exception as e:  # noqa: BLE001 - sbatch refused (a cap, a bad partition): report, keep going
                logger.error("FAILED to submit %s: %s", job.name, str(e).strip().splitlines()[-1] if str(e) else e)
                out.failed.append(job.name)
                return False
            record[job.name] = {"job_id": submitted[job.name].job_id, "run_dir": run_dir}
            write_json_atomic(record_path, record)
        logger.info("submitted %s: %s (log %s)", submitted[job.name].job_id, job.name,
                    submitted[job.name].paths.stdout)
        return True

    def collect(name: str) -> None:
        sub = submitted[name]
        try:
            sub.result()
            out.ran.append(name)
            logger.info("done: %s", name)
        except Exception as e:  # noqa: BLE001 - a failed job is reported, the others go on
            out.failed.append(name)
            logger.error("FAILED: %s (%s); log: %s", name, type(e).__name__, sub.paths.stderr)

    while pending:
        wave = []
        for job in list(pending):
            if settle(job, out):
                pending.remove(job)
            elif args.launcher == "slurm" or all(d in out.ran or d in out.skipped for d in job.deps):
                wave.append(job)
                pending.remove(job)
        if not wave and pending:  # local: the rest waits for jobs that are still running
            if any(d in elsewhere for job in pending for d in job.deps):
                for job in pending:
                    logger.warning("not submitted, it waits for a job of another sweep that is still queued or "
                                   "running: %s", job.name)
                    out.held.append(job.name)
                break
            raise RuntimeError("sweep: no job can start; a dependency is missing from the plan")
        wave = [job for job in wave if submit(job)]
        for job in wave:
            collect(job.name)
    out.held.extend(name for name in elsewhere if name not in out.held)
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from flare.common_args import setup_logging

    setup_logging()
    try:
        check_args(args)
    except (FlareError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    jobs = plan(args)
    log_dir = Path(args.log_dir or Path(args.output_dir) / "logs")
    if args.dry_run or not (args.gpus or args.launcher):
        out = run_jobs(jobs, args.dry_run, in_process=args.in_process)
    elif args.gpus:
        out = run_parallel(jobs, gpu_ids(args.gpus), log_dir, gpus_per_job=args.gpus_per_job)
    else:
        out = run_submitit(jobs, args, log_dir)
    logger.info("sweep: %d ran, %d skipped (finished), %d failed, %d held (run by another sweep or waiting for "
                "one)", len(out.ran), len(out.skipped), len(out.failed), len(out.held))
    for name in out.failed:
        logger.error("failed: %s", name)
    if out.held:
        logger.warning("%d job(s) not run here because another sweep runs them or what they wait for; run this "
                       "sweep again once it is done (exit %d): %s", len(out.held), HELD_EXIT, ", ".join(out.held))
    return 1 if out.failed else HELD_EXIT if out.held else 0


if __name__ == "__main__":
    sys.exit(main())
