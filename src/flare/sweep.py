"""Run a grid of FLARE experiments with one command: seeds x target languages x modes, on a CPU or a GPU node.

    python -m flare.sweep --task nusax --plm me5-small --langs jav sun --modes zero-shot lora flare \\
        --seeds 1 2 3 --mt reference --data_dir data

For each seed: stage 1 (``run_task_ft.py``) if its results are missing; for each language the translations
(``run_translate.py`` skips finished files); then every stage-2 run (``run.py``) whose ``results_*.json`` is missing.
Finished runs are skipped, a failed run does not stop the sweep, and the failures are listed at the end (exit 1).
Each run is its own process (memory is returned between runs; a crash cannot take the sweep down), unless
``--in_process``: then every job runs in this process through its script's ``main(argv)`` (the imports, about 6 s
per job on a 2-core CPU, happen once). Each run still loads a fresh model and sets its own seed, so it computes
what it computes as a separate process (tested); an exception fails that job only.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import logging
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from flare.config import model_name
from flare.errors import FlareError

logger = logging.getLogger("flare.sweep")

REPO = Path(__file__).resolve().parents[2]
MODES = ("zero-shot", "translate-test", "lora", "input-fusion", "flare", "flare-mt")


@dataclass
class Job:
    name: str
    argv: list[str]
    done_file: Path | None  # None: always run (the script skips finished work itself)


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
    p.add_argument("--mt", default="nllb-3.3b", help="translation model of run_translate.py (or 'reference')")
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
    return p


def mode_flags(mode: str, fn: str, forward: Path, backward: Path, mt_model: str) -> list[str]:
    train = ["--adapter", "lora", "--translate-train", "--path_mt", str(forward)]
    return {
        "zero-shot": ["--eval_zs", "--eval_only"],
        "translate-test": ["--translate-test", "--path_mt", str(backward)],
        "lora": train,
        "input-fusion": [*train, "--input_fusion"],
        "flare": [*train, "--fusion_fn", fn],
        "flare-mt": [*train, "--fusion_fn", fn, "--fuse_mt", "--mt_model", mt_model],
    }[mode]


def check_args(args: argparse.Namespace) -> None:
    """The grid's model, languages and folders, checked before any job starts (a typo fails in a second, not after
    stage 1)."""
    from flare.config import resolve_model
    from flare.data import check_task_language
    from flare.stages import check_output_dir

    resolve_model(args.plm)
    for lang in (args.source_lang, *args.langs):
        check_task_language(args.task, lang)
    for folder in (args.output_dir, args.stage1_dir, args.translations):
        if folder:
            check_output_dir(folder)


def plan(args: argparse.Namespace) -> list[Job]:
    from flare import stage2

    plm_name = model_name(args.plm)
    out, tr = Path(args.output_dir), Path(args.translations)
    data = ["--data_dir", args.data_dir] if args.data_dir else []
    jobs: list[Job] = []
    needs_mt = any(m != "zero-shot" for m in args.modes)
    if needs_mt:
        for lang in args.langs:
            for src, tgt, splits in ((args.source_lang, lang, []), (lang, args.source_lang, ["--splits", "test"])):
                jobs.append(Job(f"translate {args.task} {src}->{tgt}",
                                ["run_translate.py", "--task", args.task, "--source_lang", src, "--target_lang", tgt,
                                 "--model", args.mt, "--output_dir", str(tr), *splits, *data,
                                 *shlex.split(args.translate_args)], None))
    for seed in args.seeds:
        stage1_root = Path(args.stage1_dir or args.output_dir)
        stage1_dir = stage1_root / f"{args.task}-{args.source_lang}-{plm_name}-{seed}"
        jobs.append(Job(f"stage 1 seed {seed}",
                        ["run_task_ft.py", "--task", args.task, "--plm", args.plm, "--lang", args.source_lang,
                         "--seed", str(seed), "--output_dir", str(stage1_root), *data,
                         *shlex.split(args.stage1_args)],
                        stage1_dir / "results_test.json"))
        for lang in args.langs:
            forward = tr / args.task / f"translate-{lang}-{args.mt}"
            backward = tr / args.task / f"translate-{args.source_lang}-{args.mt}"
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
                    jobs.append(Job(f"{mode}{'/' + fn if fn else ''} {lang} seed {seed}", ["run.py", *argv],
                                    out / name / f"results_{prefix}.json"))
    return jobs


def script_main(script: str):
    """The ``main(argv)`` of one of the repository's scripts (run.py, run_task_ft.py, run_translate.py)."""
    spec = importlib.util.spec_from_file_location(f"flare_script_{Path(script).stem}", REPO / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # the scripts only define main() (and import from flare) at import time
    return module.main


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


def run_jobs(jobs: list[Job], dry_run: bool = False, python: str = sys.executable,
             in_process: bool = False) -> tuple[list, list, list]:
    """(ran, skipped, failed) job names; failures never stop the sweep."""
    ran, skipped, failed = [], [], []
    for i, job in enumerate(jobs, 1):
        if job.done_file is not None and job.done_file.is_file():
            logger.info("[%d/%d] skip (finished): %s", i, len(jobs), job.name)
            skipped.append(job.name)
            continue
        script = str(REPO / job.argv[0]) if job.argv[0].endswith(".py") else job.argv[0]
        cmd = [python, script, *job.argv[1:]]
        here = in_process and job.argv[0].endswith(".py")
        logger.info("[%d/%d] %s%s\n  %s", i, len(jobs), job.name, " (in process)" if here else "", shlex.join(cmd))
        if dry_run:
            continue
        t0 = time.time()
        code = run_in_process(job) if here else subprocess.call(cmd)
        if code != 0:
            logger.error("FAILED (exit %d): %s", code, job.name)
            failed.append(job.name)
        else:
            logger.info("done in %.0f s: %s", time.time() - t0, job.name)
            ran.append(job.name)
    return ran, skipped, failed


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        check_args(args)
    except (FlareError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    jobs = plan(args)
    ran, skipped, failed = run_jobs(jobs, args.dry_run, in_process=args.in_process)
    logger.info("sweep: %d ran, %d skipped (finished), %d failed", len(ran), len(skipped), len(failed))
    for name in failed:
        logger.error("failed: %s", name)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
