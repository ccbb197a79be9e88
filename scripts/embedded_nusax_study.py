"""Does FLARE beat LoRA? The multi-seed NusaX study on the embedded model (me5-small), in one command:

    python scripts/embedded_nusax_study.py               # oracle MT; from the repository root; re-run to resume
    python scripts/embedded_nusax_study.py --mt lexical  # the statistical MT condition
    python scripts/embedded_nusax_study.py --equal_budget 3  # the fusion functions, all trained for 3 epochs

1. Stage 1 on English NusaX, one per seed (the demo's stage-1 flags).
2. Training budget, chosen on VALIDATION data of a language outside the reported table (Indonesian, first seed):
   every training mode (translate-train LoRA, input-level fusion, FLARE add / add_relu / mul / cross-attention)
   trains for each budget in {1, 3, 6} epochs (lr 5e-4, batch 8, one validation per epoch, best checkpoint kept);
   the budget with the best validation macro-F1 wins (a tie goes to the smaller budget) and is kept for every
   reported language and seed.
3. The grid: zero-shot, translate-test and the six training modes, for every target language and seed (seed by
   seed, so an interrupted study leaves whole seeds).
4. Every run's ``results_*.json``, ``predictions_*.jsonl`` and ``run_config.json`` (no checkpoints) are copied to
   ``--results`` with ``study.json`` (the protocol, the budget choice and the validation scores behind it); then
   ``python -m flare.report RESULTS`` writes the tables, plot and significance analysis.

Two conditions (``--mt``), each in its own results folder:

* ``reference`` (the oracle, ``results/embedded-nusax``): NusaX's human translations; translate-test and both fusion
  methods see the gold English sentence at test time (an upper bound of what MT gives).
* ``lexical`` (``results/embedded-nusax-lexical``): the word-level statistical MT of ``flare.lexical_mt`` (IBM
  Model 1 trained on the 500 training pairs of each language; test chrF about 28 against the human translation), a
  lower bound. The training budgets are the oracle condition's (not chosen again); the grid is zero-shot (the same
  as the oracle's), translate-test, translate-train LoRA, input-level fusion and FLARE with ``--fns`` (default
  add_relu and mul). Validation and checkpoint selection read the lexical translation of the English validation
  set into the target language, as the original code selected on machine-translated validation data; the fusion
  modes read the GOLD English beside it. ``--validation_set target`` (training rows only, into
  ``results/embedded-nusax-lexical-valtarget``) selects instead on the target-language validation set paired as the
  test set is: the fusion modes read its lexical English, as they do at test time.

``--xmixup`` adds the paper's X-Mixup baseline as a row (``run.py --xmixup``): under ``--mt reference`` its budget is
chosen on the same validation data from the same candidates (only its own budget runs are trained; the other rows'
are the committed study's), and the lexical condition keeps it, as for every row; its runs join the condition's
results folder and tables.

``--equal_budget E`` is the ablation of the fusion functions without the budget confound: FLARE with every function
of ``--fns`` (default all four) trained for E epochs in every language and seed (runs already trained for E epochs
by the grid are reused), collected into their own folder (``results/embedded-nusax-equal-budget``) and compared
with FLARE add_relu.

FLARE runs with ``--cache_source_states`` (the
same numbers as without, tested; about 30 % faster here). Finished runs are skipped, so an interrupted study resumes
where it stopped, and so are the cells already committed under ``--results`` (a fresh clone has the results but no
checkpoints: adding a row or a seed trains only what is missing). ``--reproduce RUN_NAME`` re-runs one committed
cell from scratch (its stage 1 included) into a scratch folder and compares its metrics and predictions with the
committed ones.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # runnable from a clone without an editable install

from flare import sweep  # noqa: E402
from flare.files import copy_run_results, write_json_atomic  # noqa: E402

logger = logging.getLogger("flare.study")

STAGE1_ARGS = "--epochs 3 --lr 5e-4 --batch_size 8 --num_evals 3 --group_by_length --save_total_limit 1"
STAGE2_ARGS = "--lr 5e-4 --batch_size 8 --group_by_length --save_total_limit 1"
FUSION_FNS = ("add", "add_relu", "mul", "cross-attention")
TRAINING_ROWS = (("lora", None), ("input-fusion", None), *(("flare", fn) for fn in FUSION_FNS))
XMIXUP_ROW = ("xmixup", None)  # the paper's X-Mixup baseline (--xmixup): a row of its own, budget chosen the same way


def row_name(mode: str, fn: str | None) -> str:
    return f"{mode}/{fn}" if fn else mode


DEFAULT_SEEDS = (1, 2, 3)


def study_command(args, *flags: str) -> str:
    """The command line that regenerates a results folder, as its study.json records it: the MT condition, FLAGS,
    and the fusion functions, seeds and validation set wherever they are not the defaults."""
    return " ".join(["python scripts/embedded_nusax_study.py",
                     *([f"--mt {args.mt}"] if args.mt != "reference" else []), *flags,
                     *(["--fns", *args.fns] if args.fns else []),
                     *(["--seeds", *map(str, args.seeds)] if tuple(args.seeds) != DEFAULT_SEEDS else []),
                     *(["--validation_set target"] if args.validation_set == "target" else [])])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="The multi-seed NusaX study on me5-small (see the module docstring).")
    p.add_argument("--langs", nargs="+", default=["jav", "sun", "ace", "mad"], help="reported target languages")
    p.add_argument("--seeds", nargs="+", type=int, default=list(DEFAULT_SEEDS),
                   help="seeds (measured on 2 cores alone, with a stage 1 and --xmixup: about 90-110 min per seed for "
                        "the oracle, 95 min for the lexical condition; docs/study.md, 'Time')")
    p.add_argument("--mt", choices=("reference", "lexical", *(f"lexical-q{q}" for q in (25, 50, 75))),
                   default="reference",
                   help="translations: reference = NusaX's human ones (oracle), lexical = the statistical MT of "
                        "flare.lexical_mt trained on the training split, lexical-qNN = an MT quality level between "
                        "them (NN %% of the rows lexical, chosen by a seeded hash of the row id)")
    p.add_argument("--fns", nargs="+", choices=FUSION_FNS, default=None,
                   help="FLARE fusion functions of the grid (default: all four for reference, add_relu mul for "
                        "lexical)")
    p.add_argument("--equal_budget", type=int, metavar="EPOCHS", default=None,
                   help="ablation: FLARE with every function of --fns (default all four) trained for EPOCHS epochs, "
                        "compared with add_relu (results default results/embedded-nusax[-MT]-equal-budget)")
    p.add_argument("--xmixup", action="store_true",
                   help="add the X-Mixup row (run.py --xmixup): its budget chosen like the other rows' (--mt "
                        "reference: on --select_lang validation, only its own budget runs are trained; the other "
                        "rows' come from the committed study), kept by the lexical condition; its runs join the "
                        "condition's results folder")
    p.add_argument("--crossed", nargs="*", metavar="ROW", default=None,
                   choices=("input-fusion", *(f"flare/{fn}" for fn in FUSION_FNS)),
                   help="with an MT condition: the crossed evaluations (run.py --eval_stage2, no training of their "
                        "own) of these rows that read English at test time (default: input-fusion flare/add_relu): "
                        "the oracle-trained models tested with the MT's English, the MT-trained ones with the gold "
                        "English; the trained models are retrained where the work folder lacks them (results "
                        "default: the condition's folder + -crossed; then python -m flare.crossed)")
    p.add_argument("--validation_set", choices=("translated", "target"), default="translated",
                   help="run.py --validation_set of the training rows: target = select each checkpoint on the "
                        "target-language validation set paired as the test set is (the fusion modes read its MT "
                        "English); only the training rows run (results default: the condition's folder + "
                        "-valtarget); not with --mt reference, where both are the same data")
    p.add_argument("--budgets_from", default="results/embedded-nusax",
                   help="lexical: the oracle study whose chosen budgets are kept (its study.json)")
    p.add_argument("--select_lang", default="ind", help="language whose VALIDATION data picks the budget")
    p.add_argument("--budgets", nargs="+", type=int, default=[1, 3, 6], help="candidate epochs of stage 2")
    p.add_argument("--plm", default="me5-small", help="model")
    p.add_argument("--data_dir", default="data", help="local data root")
    p.add_argument("--work_dir", default="checkpoints/embedded-nusax",
                   help="run directories with checkpoints (not committed)")
    p.add_argument("--results", default=None,
                   help="where the runs' results and predictions are collected (committed; default "
                        "results/embedded-nusax, or results/embedded-nusax-lexical for --mt lexical; "
                        "-equal-budget appended for --equal_budget)")
    p.add_argument("--phase", choices=("all", "select", "grid", "collect"), default="all",
                   help="run only one phase (default: all; each skips finished runs)")
    p.add_argument("--reproduce", metavar="RUN_NAME", default=None,
                   help="re-run one committed cell (e.g. nusax-en-jav-me5-small-1-lora-8_add_relu-...) from scratch "
                        "and compare it with the committed results")
    return p


def sweep_argv(args, *, langs, seeds, modes, fns, output_dir: Path, stage2: str) -> list[str]:
    work = Path(args.work_dir)
    return ["--task", "nusax", "--plm", args.plm, "--langs", *langs, "--seeds", *map(str, seeds),
            "--modes", *modes, "--fusion_fns", *(fns or ["add_relu"]), "--mt", args.mt,
            "--data_dir", args.data_dir, "--output_dir", str(output_dir), "--stage1_dir", str(work / "stage1"),
            "--translations", str(work / "translations"), "--stage1_args", STAGE1_ARGS, "--stage2_args", stage2,
            "--in_process"]


def budget_args(mode: str, epochs: int, validation_set: str = "translated") -> str:
    cache = " --cache_source_states" if mode == "flare" else ""
    target = " --validation_set target" if validation_set == "target" else ""
    return f"{STAGE2_ARGS} --epochs {epochs} --num_evals {epochs}{cache}{target}"


def run_sweep(argv: list[str]) -> bool:
    return sweep.main(argv) == 0


def select_dir(args, epochs: int) -> Path:
    return Path(args.work_dir) / "select" / f"epochs-{epochs}"


def grid_dir(args, epochs: int | None) -> Path:
    grid = "grid" if args.mt == "reference" else f"grid-{args.mt}"
    if getattr(args, "validation_set", "translated") == "target":
        grid += "-valtarget"
    return Path(args.work_dir) / grid / (f"epochs-{epochs}" if epochs else "eval-only")


def training_rows(args) -> list[tuple[str, str | None]]:
    fns = args.fns or (FUSION_FNS if args.mt == "reference" or args.equal_budget else ("add_relu", "mul"))
    rows = [(m, fn) for m, fn in TRAINING_ROWS if (fn is None and not args.equal_budget) or fn in fns]
    if getattr(args, "xmixup", False) and not args.equal_budget:
        rows.insert(1, XMIXUP_ROW)  # after LoRA, as in the paper's tables
    return rows


def selection_rows(args) -> list[tuple[str, str | None]]:
    """Every row whose budget the oracle condition chooses."""
    return [*TRAINING_ROWS, *([XMIXUP_ROW] if getattr(args, "xmixup", False) else [])]


def selection_seed(args) -> int:
    """The seed of the budget runs: the committed study's (so that a later run of other seeds, e.g. ``--seeds 3``,
    keeps its budgets), else the first of ``--seeds``."""
    study = Path(args.budgets_from) / "study.json"
    if args.mt == "reference" and study.is_file():
        return json.loads(study.read_text())["selection"]["seed"]
    return args.seeds[0]


def run_selection(args) -> bool:
    """The budget runs of every row, except those the committed study already holds (a fresh machine adding the
    X-Mixup row trains only X-Mixup's)."""
    ok = True
    committed = Path(args.budgets_from) / "selection"
    for epochs in args.budgets:
        for mode in ("lora", "input-fusion", "flare", *(["xmixup"] if getattr(args, "xmixup", False) else [])):
            fns = list(FUSION_FNS) if mode == "flare" else None
            if all(result_of(committed / f"epochs-{epochs}", mode, fn, args.select_lang, selection_seed(args))
                   for fn in (fns or [None])):
                continue
            ok &= run_sweep(sweep_argv(args, langs=[args.select_lang], seeds=[selection_seed(args)], modes=[mode],
                                       fns=fns, output_dir=select_dir(args, epochs),
                                       stage2=budget_args(mode, epochs)))
    return ok


RESULT_MODE = {"lora": "translate-train"}  # the sweep's mode name -> the one run.py records


def result_of(roots: Path | list[Path], mode: str, fn: str | None, lang: str, seed: int) -> dict | None:
    recorded = RESULT_MODE.get(mode, mode)
    roots = [roots] if isinstance(roots, Path) else roots
    for path in sorted(p for root in roots for p in root.glob(f"nusax-en-{lang}-*-{seed}-*/results_test.json")):
        res = json.loads(path.read_text())
        if res.get("mode") == recorded and res.get("fusion_fn") == fn and res.get("seed") == seed:
            return res
    return None


def choose_budgets(args) -> dict:
    """{row: {"epochs": chosen, "validation": {epochs: best validation F1}}}; a tie goes to the smaller budget.
    The budget runs are read from the work folder, or from the committed study (a fresh clone has no checkpoints).
    ``--equal_budget E``: E epochs for every row, nothing chosen."""
    if args.equal_budget:
        return {row_name(m, fn): {"epochs": args.equal_budget} for m, fn in training_rows(args)}
    if args.mt != "reference":  # the lexical condition keeps the oracle's budgets
        oracle = Path(args.budgets_from) / "study.json"
        if not oracle.is_file():
            raise SystemExit(f"error: --mt {args.mt} keeps the budgets of the oracle study, but {oracle} is missing; "
                             "run the oracle condition first or pass --budgets_from")
        chosen = json.loads(oracle.read_text())["selection"]["chosen"]
        if (missing := [row_name(m, fn) for m, fn in training_rows(args) if row_name(m, fn) not in chosen]):
            raise SystemExit(f"error: {oracle} chose no budget for {', '.join(missing)}; run the oracle condition "
                             "with the same rows first (e.g. python scripts/embedded_nusax_study.py --xmixup)")
        return {row_name(m, fn): chosen[row_name(m, fn)] for m, fn in training_rows(args)}
    choice = {}
    for mode, fn in selection_rows(args):
        scores = {}
        for epochs in args.budgets:
            roots = [select_dir(args, epochs), Path(args.budgets_from) / "selection" / f"epochs-{epochs}"]
            res = result_of(roots, mode, fn, args.select_lang, selection_seed(args))
            if res is None:
                raise SystemExit(f"error: the budget run {row_name(mode, fn)} / {epochs} epochs is missing under "
                                 f"{select_dir(args, epochs)}; run --phase select first")
            scores[epochs] = res["validation_best"]
        best = max(sorted(scores), key=lambda e: scores[e])  # sorted + max keeps the first (smallest) of ties
        choice[row_name(mode, fn)] = {"epochs": best, "validation": {str(e): v for e, v in scores.items()}}
    return choice


def committed(args, mode: str, fn: str | None, lang: str, seed: int, epochs: int | None) -> bool:
    """Whether the cell is committed under --results already (a fresh clone has the results but no checkpoints)."""
    recorded = RESULT_MODE.get(mode, mode)
    folder = Path(args.results) / "runs" / (f"epochs-{epochs}" if epochs else "eval-only")
    for path in folder.glob(f"nusax-en-{lang}-*-{seed}*/results_*.json"):
        res = json.loads(path.read_text())
        if res.get("mode") == recorded and res.get("fusion_fn") == fn and res.get("seed") == seed:
            return True
    return False


def run_grid(args, choice: dict) -> bool:
    """Every cell of the grid that is not committed under --results yet (so that adding a row, e.g. --xmixup, on a
    fresh clone trains that row only; --reproduce re-runs a committed cell)."""
    ok = True

    def cells(mode, fn, seed, epochs, stage2):
        langs = [lang for lang in args.langs if not committed(args, mode, fn, lang, seed, epochs)]
        if not langs:
            return True
        return run_sweep(sweep_argv(args, langs=langs, seeds=[seed], modes=[mode], fns=[fn] if fn else None,
                                    output_dir=grid_dir(args, epochs), stage2=stage2))

    for seed in args.seeds:  # seed by seed: an interruption leaves complete seeds
        if not args.equal_budget and args.validation_set != "target":  # (evaluation-only rows select nothing)
            for mode in ("zero-shot", "translate-test"):
                ok &= cells(mode, None, seed, None, STAGE2_ARGS)
        for mode, fn in training_rows(args):
            epochs = choice[row_name(mode, fn)]["epochs"]
            ok &= cells(mode, fn, seed, epochs, budget_args(mode, epochs, args.validation_set))
    return ok


def collect(args, choice: dict) -> None:
    work, results = Path(args.work_dir), Path(args.results)
    grid = grid_dir(args, None).parent.name
    subs = (("stage1", "stage1"), ("select", "selection"), (grid, "runs")) if args.mt == "reference" and \
        not args.equal_budget else (("stage1", "stage1"), (grid, "runs"))
    # the grid folder (epochs-N, or eval-only) each of this study's rows must come from: a run of the same row
    # trained for another budget (by the grid or by an --equal_budget ablation sharing the work folder) is not this
    # study's, nor is a row it does not have
    folder = {(RESULT_MODE.get(m, m), fn): f"epochs-{choice[row_name(m, fn)]['epochs']}" for m, fn in
              training_rows(args)}
    if not args.equal_budget and args.validation_set != "target":
        folder.update({("zero-shot", None): "eval-only", ("translate-test", None): "eval-only"})
    for sub, dest in subs:
        for res in sorted((work / sub).rglob("results_*.json")):
            if "checkpoint-" in res.parent.name:
                continue
            run = json.loads(res.read_text())
            lang = run.get("target_lang")  # None for a stage-1 run
            if run["seed"] not in args.seeds or lang not in (None, *args.langs, args.select_lang):
                continue  # a run of another seed or language (e.g. of an earlier, larger grid) is not this study's
            rel = res.parent.relative_to(work / sub)
            if dest == "runs" and folder.get((run["mode"], run.get("fusion_fn"))) != rel.parts[0]:
                continue
            copy_run_results(res.parent, results / dest / rel)
    # the MT's own record (what it was trained on, chrF/BLEU against the human translation), per direction
    for meta in sorted((work / "translations" / "nusax").glob(f"translate-*-{args.mt}/meta.json")):
        dest = results / "translations" / meta.parent.name
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy2(meta, dest / meta.name)
    extra = {}
    if args.equal_budget:
        selection = None
        fns = sorted(fn for _, fn in folder)
        base = "add_relu" if "add_relu" in fns else fns[0]
        extra = {"equal_budget": args.equal_budget, "compare_with": [["flare", base]]}
    elif args.mt == "reference":
        selection = {"folder": "selection", "language": args.select_lang, "seed": selection_seed(args),
                     "budgets": args.budgets, "metric": "validation macro-F1 of the best checkpoint",
                     "chosen": choice}
    else:
        oracle = json.loads((Path(args.budgets_from) / "study.json").read_text())["selection"]
        selection = {**oracle, "folder": None, "kept_from": args.budgets_from, "chosen": choice}
    write_json_atomic(results / "study.json", {
        "model": args.plm, "task": "nusax", "languages": args.langs, "seeds": args.seeds, "translations": args.mt,
        "stage1_args": STAGE1_ARGS, "stage2_args": STAGE2_ARGS + " --epochs E --num_evals E (FLARE: "
                                                                 "--cache_source_states)",
        "validation_set": args.validation_set,
        "selection": selection, **extra, "command": study_command(
            args, *(["--xmixup"] if getattr(args, "xmixup", False) else []),
            *([f"--equal_budget {args.equal_budget}"] if args.equal_budget else [])),
    })


CROSSED_ROWS = ("input-fusion", "flare/add_relu")  # --crossed without rows


def crossed_rows(args) -> list[tuple[str, str | None]]:
    """--crossed's rows (all of them read English at test time), in the grid's order."""
    rows = [tuple(r.split("/")) if "/" in r else (r, None) for r in (args.crossed or CROSSED_ROWS)]
    return [row for row in (("input-fusion", None), *(("flare", fn) for fn in FUSION_FNS)) if row in rows]


def run_path(folder: Path, mode: str, fn: str | None, lang: str, seed: int) -> Path | None:
    """The run directory of a cell in a work folder (None if it is not there)."""
    recorded = RESULT_MODE.get(mode, mode)
    for path in sorted(folder.glob(f"nusax-en-{lang}-*-{seed}-*/results_test.json")):
        res = json.loads(path.read_text())
        if res.get("mode") == recorded and res.get("fusion_fn") == fn and res.get("seed") == seed \
                and not res.get("evaluated_run"):
            return path.parent
    return None


def run_crossed(args) -> int:
    """Issue 29, item 4: which side of the MT drives an MT condition's result. Per seed, row and language: the
    oracle-trained model and the MT-trained model (the study's budgets; trained again where the work folder has no
    checkpoint: a fresh clone has only their results), then ``run.py --eval_stage2`` of each with the OTHER
    condition's English of the target test set (the target text is the human test set in both). The evaluations
    and their study.json go to --results; ``python -m flare.crossed`` analyses them."""
    choice = choose_budgets(args)
    work, results = Path(args.work_dir), Path(args.results)
    suffix = "-valtarget" if args.validation_set == "target" else ""
    out, tr = work / f"crossed-{args.mt}{suffix}", work / "translations" / "nusax"
    conditions = {"reference": argparse.Namespace(**{**vars(args), "mt": "reference", "validation_set": "translated"}),
                  args.mt: args}
    evaluate = sweep.script_main("run.py")
    ok = True
    for seed in args.seeds:
        for mode, fn in crossed_rows(args):
            epochs = choice[row_name(mode, fn)]["epochs"]
            for cond in conditions.values():  # the trained models (finished runs skip)
                ok &= run_sweep(sweep_argv(cond, langs=args.langs, seeds=[seed], modes=[mode],
                                           fns=[fn] if fn else None, output_dir=grid_dir(cond, epochs),
                                           stage2=budget_args(mode, epochs, cond.validation_set)))
            for lang in args.langs:
                for trained, tested in (("reference", args.mt), (args.mt, "reference")):
                    run = run_path(grid_dir(conditions[trained], epochs), mode, fn, lang, seed)
                    if run is None:
                        logger.error("no trained %s run of %s / %s / seed %d", trained, row_name(mode, fn), lang,
                                     seed)
                        ok = False
                        continue
                    path_mt = tr / f"translate-{lang}-{tested}"
                    if (out / f"{run.name}-evaltest-{path_mt.name}" / "results_test.json").is_file():
                        continue
                    ok &= evaluate(["--eval_stage2", str(run), "--path_mt", str(path_mt),
                                    "--output_dir", str(out)]) == 0
    for res in sorted(out.glob("*/results_test.json")):
        run = json.loads(res.read_text())
        if run["seed"] in args.seeds and run["target_lang"] in args.langs:
            copy_run_results(res.parent, results / "runs" / res.parent.name)
    oracle_results = Path(args.budgets_from)
    condition = Path(f"results/embedded-nusax-{args.mt}{suffix}")
    write_json_atomic(results / "study.json", {
        "model": args.plm, "task": "nusax", "languages": args.langs, "seeds": args.seeds, "translations": args.mt,
        "crossed": {"oracle": str(oracle_results), "mt_condition": str(condition),
                    "rows": [row_name(m, fn) for m, fn in crossed_rows(args)],
                    "budgets": {row_name(m, fn): choice[row_name(m, fn)]["epochs"] for m, fn in crossed_rows(args)},
                    "evaluation": "run.py --eval_stage2 RUN --path_mt <the other condition's translations>"},
        "command": study_command(args, "--crossed", *args.crossed)})
    from flare import crossed

    if crossed.main([str(oracle_results), str(condition), str(results)]) != 0:
        ok = False
    return 0 if ok else 1


def reproduce(args, run_name: str) -> int:
    """Re-run one committed grid cell from scratch (its own stage 1 too) and compare."""
    results = Path(args.results)
    committed = next((p for p in (results / "runs").rglob(run_name) if p.is_dir()), None)
    if committed is None:
        print(f"error: no committed run {run_name} under {results / 'runs'}", file=sys.stderr)
        return 2
    config = json.loads((committed / "run_config.json").read_text())
    res_file = next(committed.glob("results_*.json"))
    old = json.loads(res_file.read_text())
    scratch = Path(tempfile.mkdtemp(prefix="flare-reproduce-"))
    mode, fn, lang, seed = old["mode"], old.get("fusion_fn"), old["target_lang"], old["seed"]
    mode = {"translate-train": "lora"}.get(mode, mode)
    epochs = config["args"]["epochs"]
    stage2 = STAGE2_ARGS if mode in ("zero-shot", "translate-test") else budget_args(mode, epochs)
    argv = sweep_argv(args, langs=[lang], seeds=[seed], modes=[mode], fns=[fn] if fn else None,
                      output_dir=scratch / "runs", stage2=stage2)
    argv[argv.index("--stage1_dir") + 1] = str(scratch / "stage1")
    argv[argv.index("--translations") + 1] = str(scratch / "translations")
    if not run_sweep(argv):
        return 1
    new_dir = scratch / "runs" / run_name
    new = json.loads((new_dir / res_file.name).read_text())
    keys = [k for k in old if k.startswith("test_") and k != "test_runtime"]
    same_metrics = all(old[k] == new[k] for k in keys)
    pred = res_file.name.replace("results_", "predictions_").replace(".json", ".jsonl")
    same_predictions = (committed / pred).read_bytes() == (new_dir / pred).read_bytes()
    for k in keys:
        print(f"{k}: committed {old[k]!r}, now {new[k]!r}")
    print(f"predictions identical: {same_predictions}; run directory: {new_dir}")
    return 0 if same_metrics and same_predictions else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.validation_set == "target" and args.mt == "reference":
        print("error: --validation_set target with --mt reference: the human English of the validation set is its "
              "reference translation, the same data; use it with --mt lexical", file=sys.stderr)
        return 2
    if args.crossed is not None and (args.mt == "reference" or args.equal_budget or args.xmixup):
        print("error: --crossed evaluates an MT condition's models against the oracle's: pass --mt lexical (or a "
              "lexical-qNN level), without --equal_budget or --xmixup", file=sys.stderr)
        return 2
    if args.results is None:
        args.results = ("results/embedded-nusax" + ("" if args.mt == "reference" else f"-{args.mt}")
                        + ("-equal-budget" if args.equal_budget else "")
                        + ("-valtarget" if args.validation_set == "target" else "")
                        + ("-crossed" if args.crossed is not None else ""))
    from flare.common_args import setup_logging

    setup_logging()
    if not (Path(args.data_dir) / "nusax").is_dir():
        print(f"error: no NusaX data under {args.data_dir}/nusax; run from the repository root or pass --data_dir",
              file=sys.stderr)
        return 2
    if args.reproduce:
        return reproduce(args, args.reproduce)
    if args.crossed is not None:
        return run_crossed(args)
    ok = True
    if args.phase in ("all", "select") and args.mt == "reference" and not args.equal_budget:
        ok &= run_selection(args)
    if args.phase == "select":
        return 0 if ok else 1
    choice = choose_budgets(args)
    logger.info("budgets (%s): %s", f"--equal_budget {args.equal_budget}" if args.equal_budget else
                f"chosen on {args.select_lang} validation", {k: v["epochs"] for k, v in choice.items()})
    if args.phase in ("all", "grid"):
        ok &= run_grid(args, choice)
    collect(args, choice)
    from flare import report

    report.main([str(args.results)])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
