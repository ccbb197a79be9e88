"""TyDiQA-GoldP on the embedded model (me5-small), end to end on real text, in one command:

    python scripts/embedded_tydiqa_study.py        # from the repository root; re-run to resume (finished runs skip)

1. Stage 1 on English TyDiQA-GoldP (data/tydiqa: 1,000 English training questions, of which every 10th validates),
   3 epochs (one validation per epoch on the held-out English questions; the best checkpoint is kept, so the epoch
   budget is chosen per run on held-out English training data), batch 8. The learning rate is chosen among
   ``--lrs`` (default 3e-4 and 1e-3) by the English DEV F1 of the first seed (ties to the smaller rate); English dev
   is not a reported cell: the tables are the eight target languages.
2. Zero-shot on the dev sets of the eight target languages (ar, bn, fi, id, ko, ru, sw, te), every seed.
3. Indonesian translate-train with the lexical MT (``run_translate.py --model lexical``: English TyDiQA translated
   word by word by an IBM Model 1 trained on NusaX's English-Indonesian TRAINING pairs, the only parallel data here
   for a TyDiQA language; out of domain; the answer is carried by its markers through the word-by-word translation,
   so the projection loses only answers whose markers do not come back): translate-train LoRA, input-level fusion and
   FLARE add_relu, ``STAGE2_ARGS`` (3 epochs, lr 5e-4, batch 8, best checkpoint on every 10th translated training
   question). Its test set is the Indonesian dev set; input fusion and FLARE read its lexical English.
4. Every run's ``results_*.json``, ``predictions_*.jsonl`` and ``run_config.json`` (no checkpoints), the stage-1 runs
   and the MT's meta.json go to ``--results`` (``results/embedded-tydiqa``) with ``study.json``; then
   ``python -m flare.report results/embedded-tydiqa`` writes the tables and the significance analysis.

Finished runs skip, and so do the cells committed under ``--results`` and its committed choice of the rate (a fresh
clone has the results but no checkpoints): seed by seed, ``--seeds 1``, then ``--seeds 1 2``, ``--seeds 1 2 3``,
committing each, retrains only a seed's stage 1 and its missing cells; ``--train_modes`` trains some of the
Indonesian rows (in the order given) when a session cannot fit all three.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # runnable from a clone without an editable install

from flare import sweep  # noqa: E402
from flare.files import copy_run_results, write_json_atomic  # noqa: E402

logger = logging.getLogger("flare.study")

TARGETS = ("ar", "bn", "fi", "id", "ko", "ru", "sw", "te")
STAGE1_ARGS = "--epochs 3 --batch_size 8 --num_evals 3 --save_total_limit 1"
STAGE2_ARGS = "--epochs 3 --num_evals 3 --lr 5e-4 --batch_size 8 --save_total_limit 1"
TRAIN_MODES = ("lora", "input-fusion", "flare")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="TyDiQA-GoldP on me5-small (see the module docstring).")
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3], help="seeds")
    p.add_argument("--langs", nargs="+", default=list(TARGETS), help="zero-shot target languages")
    p.add_argument("--lrs", nargs="+", default=["3e-4", "1e-3"], help="stage-1 learning rates to choose from")
    p.add_argument("--train_lang", default="id",
                   help="the translate-train language (the lexical MT needs NusaX pairs: only id)")
    p.add_argument("--plm", default="me5-small", help="model")
    p.add_argument("--data_dir", default="data", help="local data root")
    p.add_argument("--work_dir", default="checkpoints/embedded-tydiqa", help="run directories (not committed)")
    p.add_argument("--results", default="results/embedded-tydiqa", help="where results are collected (committed)")
    p.add_argument("--train_modes", nargs="+", choices=TRAIN_MODES, default=list(TRAIN_MODES),
                   help="the Indonesian translate-train rows to train, in this order (e.g. 'lora flare' first, "
                        "input fusion in a later session: it costs about twice as much)")
    p.add_argument("--phase", choices=("all", "select", "zero-shot", "train", "collect"), default="all",
                   help="run only one phase (each skips finished runs)")
    return p


def stage1_dir(args, lr: str) -> Path:
    return Path(args.work_dir) / "stage1" / f"lr-{lr}"


def sweep_argv(args, *, lr: str, langs, seeds, modes, output_dir: Path, mt: str = "reference",
               stage2: str = STAGE2_ARGS) -> list[str]:
    return ["--task", "tydiqa", "--plm", args.plm, "--langs", *langs, "--seeds", *map(str, seeds),
            "--modes", *modes, "--fusion_fns", "add_relu", "--mt", mt, "--data_dir", args.data_dir,
            "--output_dir", str(output_dir), "--stage1_dir", str(stage1_dir(args, lr)),
            "--translations", str(Path(args.work_dir) / "translations"),
            "--stage1_args", f"{STAGE1_ARGS} --lr {lr}", "--stage2_args", stage2, "--in_process"]


def run_sweep(argv: list[str]) -> bool:
    return sweep.main(argv) == 0


def stage1_result(args, lr: str, seed: int) -> dict | None:
    path = stage1_dir(args, lr) / f"tydiqa-en-{args.plm}-{seed}" / "results_test.json"
    return json.loads(path.read_text()) if path.is_file() else None


def run_selection(args) -> bool:
    """Stage 1 of the first seed for every candidate learning rate (the English dev set is its test set), unless the
    committed study chose among them already."""
    if committed_choice(args) is not None:
        return True
    ok = True
    for lr in args.lrs:
        # zero-shot on English = stage 1's own test set: a sweep needs a stage-2 mode, this one only reads it
        ok &= run_sweep(sweep_argv(args, lr=lr, langs=[args.train_lang], seeds=args.seeds[:1], modes=["zero-shot"],
                                   output_dir=Path(args.work_dir) / "select" / f"lr-{lr}"))
    return ok


def committed_choice(args) -> dict | None:
    """The learning rate the committed study chose (a fresh clone has its results but no stage-1 runs), if it chose
    among the same rates on the same seed."""
    path = Path(args.results) / "study.json"
    choice = json.loads(path.read_text()).get("stage1_selection") if path.is_file() else None
    if choice and choice["seed"] == args.seeds[0] and sorted(choice["english_dev_f1"]) == sorted(args.lrs):
        return choice
    return None


def choose_lr(args) -> dict:
    scores = {}
    for lr in args.lrs:
        res = stage1_result(args, lr, args.seeds[0])
        if res is None:
            if (committed := committed_choice(args)) is not None:
                return committed
            raise SystemExit(f"error: the stage-1 run with lr {lr} (seed {args.seeds[0]}) is missing under "
                             f"{stage1_dir(args, lr)}; run --phase select first")
        scores[lr] = res["test_f1"]
    best = max(sorted(scores, key=float), key=lambda lr: scores[lr])  # sorted + max: ties to the smaller rate
    return {"lr": best, "english_dev_f1": scores, "seed": args.seeds[0],
            "metric": "F1 on the English dev set (stage 1's test set) of the best checkpoint, chosen per run on the "
                      "held-out 10% of the English training questions"}


def grid_dir(args, lr: str) -> Path:
    return Path(args.work_dir) / "grid" / f"lr-{lr}"


RESULT_MODE = {"lora": "translate-train"}  # the sweep's mode name -> the one run.py records


def committed_cells(args) -> set[tuple[str, str, int]]:
    """(recorded mode, language as given, seed) of every cell committed under --results: not trained again (a fresh
    clone has the results but no checkpoints; pass every seed, the committed ones skip)."""
    from flare.data import check_task_language

    code = {check_task_language("tydiqa", lang): lang for lang in {*args.langs, args.train_lang}}
    cells = set()
    for path in (Path(args.results) / "runs").glob("*/results_*.json"):
        res = json.loads(path.read_text())
        if res.get("target_lang") in code:
            cells.add((res["mode"], code[res["target_lang"]], res["seed"]))
    return cells


def run_zero_shot(args, lr: str) -> bool:
    ok, done = True, committed_cells(args)
    for seed in args.seeds:  # seed by seed: an interruption leaves whole seeds
        if langs := [lang for lang in args.langs if ("zero-shot", lang, seed) not in done]:
            ok &= run_sweep(sweep_argv(args, lr=lr, langs=langs, seeds=[seed], modes=["zero-shot"],
                                       output_dir=grid_dir(args, lr)))
    return ok


def run_train(args, lr: str) -> bool:
    ok, done = True, committed_cells(args)
    for seed in args.seeds:
        for mode in args.train_modes:
            if (RESULT_MODE.get(mode, mode), args.train_lang, seed) in done:
                continue
            stage2 = STAGE2_ARGS + (" --cache_source_states" if mode == "flare" else "")
            ok &= run_sweep(sweep_argv(args, lr=lr, langs=[args.train_lang], seeds=[seed], modes=[mode],
                                       output_dir=grid_dir(args, lr), mt="lexical", stage2=stage2))
    return ok


def collect(args, choice: dict) -> None:
    results, lr = Path(args.results), choice["lr"]
    for sub, dest in ((stage1_dir(args, lr), results / "stage1"), (grid_dir(args, lr), results / "runs")):
        for res in sorted(sub.glob("*/results_*.json")):
            run = json.loads(res.read_text())
            if run["seed"] in args.seeds:
                copy_run_results(res.parent, dest / res.parent.name)
    for lr_other in args.lrs:  # the candidates' stage-1 runs (their English dev scores chose the rate)
        res = stage1_result(args, lr_other, args.seeds[0])
        if res is not None and lr_other != lr:
            copy_run_results(stage1_dir(args, lr_other) / f"tydiqa-en-{args.plm}-{args.seeds[0]}",
                             results / "stage1-candidates" / f"lr-{lr_other}")
    for meta in sorted((Path(args.work_dir) / "translations" / "tydiqa").glob("translate-*-lexical/meta.json")):
        dest = results / "translations" / meta.parent.name
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy2(meta, dest / meta.name)
    write_json_atomic(results / "study.json", {
        "model": args.plm, "task": "tydiqa", "languages": args.langs, "seeds": args.seeds,
        "translations": "lexical (Indonesian only; trained on NusaX en-ind training pairs)",
        "stage1_args": STAGE1_ARGS + " --lr LR", "stage2_args": STAGE2_ARGS + " (FLARE: --cache_source_states)",
        "stage1_selection": choice, "selection": None, "train_language": args.train_lang,
        "command": "python scripts/embedded_tydiqa_study.py"})


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from flare.common_args import setup_logging

    setup_logging()
    if not (Path(args.data_dir) / "tydiqa").is_dir():
        print(f"error: no TyDiQA data under {args.data_dir}/tydiqa; run from the repository root or pass --data_dir",
              file=sys.stderr)
        return 2
    ok = True
    if args.phase in ("all", "select"):
        ok &= run_selection(args)
        if args.phase == "select":
            return 0 if ok else 1
    choice = choose_lr(args)
    logger.info("stage-1 learning rate %s (English dev F1 %s)", choice["lr"], choice["english_dev_f1"])
    if args.phase in ("all", "zero-shot"):
        ok &= run_zero_shot(args, choice["lr"])
    if args.phase in ("all", "train"):
        ok &= run_train(args, choice["lr"])
    collect(args, choice)
    from flare import report

    report.main([str(args.results)])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
