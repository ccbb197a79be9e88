"""Results tables, plots and significance from the run directories:
``python -m flare.report ROOT [ROOT ...] [--out DIR] [--readme PAGE]``.

Reads every ``results_zs.json`` / ``results_test.json`` of stage 2 under a folder and writes, per task and model,
the table the paper shows: rows = modes (zero-shot, translate-test, translate-train LoRA, input-level fusion, FLARE
per fusion function, FLARE MT), columns = target languages + average, cells = the mean over seeds of the task's
metric (± std with at least 3 seeds; XNLI accuracy, NusaX macro-F1 then accuracy, TyDiQA exact match then F1; x100).
A row whose predictions are the same in every language (translate-test on the human English of a parallel corpus) is
shown apart, as one value, not averaged as languages. Then:

- significance: every FLARE / FLARE MT row minus translate-train LoRA and minus input-level fusion (or minus the rows
  a study's ``compare_with`` names, e.g. FLARE add_relu in an equal-budget ablation of the fusion functions): the mean
  over (language, seed) pairs of the difference and its mean per seed; a 95 % interval and p-value from a paired
  bootstrap that, with at least 3 seeds, draws the training SEEDS with replacement and then the TEST ITEMS (one draw
  of items shared by every language and seed, fixed seed), so that it covers a re-run of training; the items-only
  interval (these trained models) beside it; and Holm's correction over every comparison of the page (the roots given
  together), not per table;
- cost: trainable parameters, epochs and the measured training / test times per mode (median [min–max]), and the
  training time per epoch;
- for a study folder (``study.json``, see ``scripts/embedded_nusax_study.py``): the training budget chosen on
  validation data and the scores behind it (the budget runs themselves are not rows of the tables);
- the runs missing for a full grid (every mode x language x seed seen for that task and model).

Markdown and CSV tables and a PNG bar plot per (task, model) go to ``--out`` (default ``ROOT/report``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from flare.languages import check_task_language

logger = logging.getLogger("flare.report")

METRICS = {"xnli": (("test_accuracy", "accuracy"),),
           "nusax": (("test_f1", "macro-F1"), ("test_accuracy", "accuracy")),
           "tydiqa": (("test_exact_match", "exact match"), ("test_f1", "F1"))}
METRIC = {task: metrics[0][0] for task, metrics in METRICS.items()}  # the paper's metric per task (first table)
METRIC_NAME = {task: metrics[0][1] for task, metrics in METRICS.items()}
ROW_ORDER = ("zero-shot", "translate-test", "translate-train", "xmixup", "input-fusion", "flare", "flare-mt")
NO_TRAINING = ("zero-shot", "translate-test")  # rows that run in every language of a study
ROW_LABEL = {"zero-shot": "Zero-shot", "translate-test": "Translate-test", "translate-train": "Translate-train LoRA",
             "xmixup": "X-Mixup", "input-fusion": "Input-level fusion", "flare": "FLARE", "flare-mt": "FLARE MT"}
# what FLARE rows are compared with, paired (X-Mixup where a table has it); X-Mixup rows are compared with LoRA
BASELINES = (("translate-train", None), ("xmixup", None), ("input-fusion", None))
STUDY_FILE = "study.json"  # written by scripts/embedded_nusax_study.py: protocol and the budget choice
N_BOOTSTRAP = 10_000


def row_key(res: dict) -> tuple[str, str | None]:
    mode = res["mode"]
    return mode, res.get("fusion_fn") if mode in ("flare", "flare-mt") else None


def row_label(key: tuple[str, str | None]) -> str:
    mode, fn = key
    return ROW_LABEL.get(mode, mode) + (f" ({fn})" if fn else "")


def load_study(root: Path) -> dict | None:
    path = root / STUDY_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def load_results(root: Path) -> list[dict]:
    """Stage-2 results (not stage 1, not English->English checks, not ``run.py --eval_stage2`` re-evaluations)
    under ``root``; a study's budget-selection runs (the folder its ``study.json`` names) are not part of its
    tables."""
    study = load_study(root)
    folder = ((study or {}).get("selection") or {}).get("folder")  # None: the budgets were kept from another study
    skip = root / folder if folder else None
    out = []
    for path in sorted(root.rglob("results_*.json")):
        if "checkpoint-" in str(path.parent.name) or (skip is not None and skip in path.parents):
            continue
        try:
            res = json.loads(path.read_text())
        except json.JSONDecodeError:
            logger.warning("skipping unreadable %s", path)
            continue
        if res.get("evaluated_run"):
            continue  # a trained run evaluated again with other test translations (flare.crossed reads those)
        if res.get("mode") in ROW_ORDER and res.get("target_lang") != res.get("source_lang"):
            res["_path"] = str(path)
            out.append(res)
    return out


def study_table(root: Path) -> tuple[dict, dict]:
    """(study.json, the table of its own task and model) of a study's results folder; ValueError without either."""
    study = load_study(root)
    if study is None:
        raise ValueError(f"{root}: no study.json; pass the results folders of scripts/embedded_nusax_study.py")
    table = build_tables(load_results(root), study).get((study["task"], study["model"]))
    if table is None:
        raise ValueError(f"{root}: no stage-2 results of {study['task']} / {study['model']}")
    return study, table


MIN_SEEDS_FOR_STD = 3  # a standard deviation of two values is too rough to print


def fmt(values: list[float], scale: float = 100, digits: int = 2) -> str:
    """Mean over seeds; ± the standard deviation only with at least MIN_SEEDS_FOR_STD seeds."""
    if not values:
        return "–"
    mean = scale * float(np.mean(values))
    if len(values) < MIN_SEEDS_FOR_STD:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {scale * float(np.std(values, ddof=1)):.{digits}f}"


def same_input_for_every_language(runs: dict, row: tuple, langs: list[str], seeds: list[int]) -> bool:
    """True when a row's predictions are identical in every language for every seed: its input is the same test
    set (translate-test on a parallel corpus with the human English, which IS the English test set), so it is one
    result per seed, not one per language."""
    if len(langs) < 2:
        return False
    for seed in seeds:
        preds = []
        for lang in langs:
            res = runs.get((row, lang, seed))
            recs = predictions_of(res) if res is not None else None
            if recs is None:
                return False
            preds.append(sorted((str(r["id"]), json.dumps(r["prediction"])) for r in recs))
        if any(p != preds[0] for p in preds[1:]):
            return False
    return True


def build_tables(results: list[dict], study: dict | None = None) -> dict:
    """{(task, plm_name): {"langs", "rows", "seeds", "runs": {(row, lang, seed): result}, "missing"}}. The missing
    runs are those of the full grid: every mode x language x seed seen, and for a study's own task and model also
    every language and seed its ``study.json`` declares (so an unfinished study lists its absent seeds)."""
    groups: dict = defaultdict(lambda: {"runs": {}, "langs": set(), "rows": set(), "seeds": set()})
    for res in results:
        g = groups[(res["task"], res["plm_name"])]
        key, lang, seed = row_key(res), res["target_lang"], res["seed"]
        if (key, lang, seed) in g["runs"]:
            continue  # the same run twice (e.g. a copied folder)
        g["runs"][(key, lang, seed)] = res
        g["langs"].add(lang)
        g["rows"].add(key)
        g["seeds"].add(seed)
    tables = {}
    for (task, plm), g in groups.items():
        rows = sorted(g["rows"], key=lambda k: (ROW_ORDER.index(k[0]), k[1] or ""))
        declared = study and study.get("task") == task and study.get("model") == plm
        # a study names its languages as its command took them (TyDiQA's "id"); runs record the canonical code
        langs = sorted(g["langs"] | {canonical(task, lang) for lang in (study["languages"] if declared else ())})
        grid_seeds = sorted(g["seeds"] | set(study["seeds"] if declared else ()))
        # a study that trains in one language only (study.json "train_language") expects its training rows there
        trained_in = [canonical(task, study["train_language"])] if declared and study.get("train_language") \
            else langs
        missing = [f"{row_label(r)} / {lang} / seed {s}" for r in rows
                   for lang in (langs if r[0] in NO_TRAINING else trained_in) for s in grid_seeds
                   if (r, lang, s) not in g["runs"]]
        apart = [r for r in rows if r[0] == "translate-test"
                 and same_input_for_every_language(g["runs"], r, sorted(g["langs"]), sorted(g["seeds"]))]
        baselines = tuple((m, fn) for m, fn in study["compare_with"]) if declared and study.get("compare_with") \
            else BASELINES
        tables[(task, plm)] = dict(task=task, plm=plm, rows=rows, langs=langs, runs=g["runs"],
                                   seeds=sorted(g["seeds"]), missing=missing, apart=apart, baselines=baselines)
    return tables


def canonical(task: str, lang: str) -> str:
    """The code run.py records for ``lang`` (``id`` -> ``ind``), or ``lang`` itself if the task does not know it."""
    try:
        return check_task_language(task, lang)
    except ValueError:
        return lang


def cells(table: dict, metric: str) -> dict:
    """{(row, lang): [value per seed, in seed order]} of one metric."""
    out: dict = defaultdict(list)
    for (r, lang, _), res in sorted(table["runs"].items(), key=lambda kv: kv[0][2]):
        if metric in res:
            out[(r, lang)].append(float(res[metric]))
    return out


def table_rows(table: dict, metric: str) -> list[list[str]]:
    values = cells(table, metric)
    out = []
    for r in table["rows"]:
        if r in table.get("apart", ()):
            continue  # shown below the table (apart_markdown)
        row = [fmt(values.get((r, lang), [])) for lang in table["langs"]]
        # average over languages of the per-language seed means (only when every language has a value)
        means = [float(np.mean(values[(r, lang)])) for lang in table["langs"] if values.get((r, lang))]
        avg = f"{100 * float(np.mean(means)):.2f}" if len(means) == len(table["langs"]) else "–"
        out.append([row_label(r), *row, avg])
    return out


# ------------------------------------------------------------------------------------------------- significance
# The test sets of a parallel corpus (NusaX) are translations of the same items, so one item's predictions in every
# language and seed are not independent draws: the unit of resampling is the ITEM. One bootstrap replicate draws the
# test items with replacement (multinomial counts W over the item ids) and applies the same draw to every run of
# the comparison; each run's metric is recomputed from W-weighted per-item statistics (exact: W = 1 gives the
# recorded metric) and the replicate's statistic is the mean over (language, seed) of row - baseline.
def predictions_of(res: dict) -> list[dict] | None:
    """The ``predictions_*.jsonl`` beside a result file (None when it is absent); read once per result."""
    if "_predictions" not in res:
        path = Path(res["_path"])
        pred = path.with_name(path.name.replace("results_", "predictions_", 1)).with_suffix(".jsonl")
        res["_predictions"] = ([json.loads(line) for line in pred.read_text().splitlines() if line.strip()]
                               if pred.is_file() else None)
    return res["_predictions"]


def item_statistics(task: str, metric: str, records: list[dict], ids: list[str]) -> np.ndarray:
    """(items, k) per-item statistics whose weighted sums give ``metric`` (see :func:`metric_from_sums`), rows in
    the order of ``ids``."""
    from flare.config import TASKS

    by_id = {str(r["id"]): r for r in records}
    rows = [by_id[i] for i in ids]
    if TASKS[task].kind == "qa":
        from flare.metrics import exact_match_score, f1_score_text

        score = exact_match_score if metric.endswith("exact_match") else f1_score_text
        return np.array([[max(score(str(r["prediction"]), g) for g in r["gold"])] for r in rows], dtype=float)
    pred = np.array([int(r["prediction"]) for r in rows])
    gold = np.array([int(r["gold"]) for r in rows])
    if metric.endswith("accuracy"):
        return (pred == gold).astype(float)[:, None]
    cols = []
    for c in range(len(TASKS[task].labels)):  # macro-F1 over the task's classes: tp, fp, fn per class
        cols += [(pred == c) & (gold == c), (pred == c) & (gold != c), (pred != c) & (gold == c)]
    return np.stack(cols, axis=1).astype(float)


def metric_from_sums(metric: str, sums: np.ndarray, n: int) -> np.ndarray:
    """The metric from weighted sums of :func:`item_statistics` (``sums``: (..., k)); macro-F1 as sklearn computes
    it with ``zero_division=0``."""
    if sums.shape[-1] == 1:
        return sums[..., 0] / n
    tp, fp, fn = sums[..., 0::3], sums[..., 1::3], sums[..., 2::3]
    denom = 2 * tp + fp + fn
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return f1.mean(axis=-1)


MIN_SEEDS = 3  # from this many seeds on, intervals and p-values resample seeds as well as items


def p_floor(n_boot: int = N_BOOTSTRAP) -> float:
    """The smallest p-value a two-sided bootstrap with ``n_boot`` replicates can give (no replicate beyond 0)."""
    return 2 / (n_boot + 1)


def item_bootstrap(task: str, metric: str, pairs: list[tuple[list[dict], list[dict]]], n_boot: int = N_BOOTSTRAP,
                   seed: int = 0, groups: list | None = None) -> dict:
    """Paired bootstrap of mean(row - baseline) over ``pairs`` ((row records, baseline records) per language and
    seed). Items are matched by id across all runs; one draw of items per replicate, shared by every run: the
    observed mean difference, and the 95 % percentile interval and two-sided p-value of these trained models
    (``ci``, ``p``: items resampled).

    ``groups`` (the training seed of each pair): with at least :data:`MIN_SEEDS` distinct seeds, a two-level
    bootstrap as well (``ci_seeds``, ``p_seeds``): each replicate draws the seeds with replacement (a seed drawn
    twice counts its pairs twice), then applies the replicate's shared item draw, so the interval covers a re-run of
    training as well as another sample of sentences; a difference that changes sign between seeds is not significant
    however many sentences agree."""
    ids = sorted(set.intersection(*({str(r["id"]) for r in recs} for pair in pairs for recs in pair)))
    if not ids:
        raise ValueError("the runs of a comparison share no test item ids")
    n = len(ids)
    weights = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(float)
    observed, per_pair = [], np.zeros((len(pairs), n_boot))
    for i, (row_recs, base_recs) in enumerate(pairs):
        diff_obs, diff_boot = 0.0, 0.0
        for sign, recs in ((1.0, row_recs), (-1.0, base_recs)):
            stats = item_statistics(task, metric, recs, ids)
            diff_obs = diff_obs + sign * float(metric_from_sums(metric, stats.sum(axis=0), n))
            diff_boot = diff_boot + sign * metric_from_sums(metric, weights @ stats, n)
        observed.append(diff_obs)
        per_pair[i] = diff_boot
    out = dict(mean=float(np.mean(observed)), items=n, **_interval(per_pair.mean(axis=0), n_boot))
    seeds = sorted(set(groups)) if groups is not None else []
    out["seeds"] = len(seeds)
    if len(seeds) >= MIN_SEEDS:
        k = len(seeds)
        draws = np.random.default_rng(seed + 1).multinomial(k, np.full(k, 1.0 / k), size=n_boot)  # (n_boot, k)
        counts = draws[:, [seeds.index(g) for g in groups]].T.astype(float)  # (pairs, n_boot): each pair's weight
        replicates = (counts * per_pair).sum(axis=0) / counts.sum(axis=0)
        both = _interval(replicates, n_boot)
        out.update(ci_seeds=both["ci"], p_seeds=both["p"])
    return out


def _interval(replicates: np.ndarray, n_boot: int) -> dict:
    lo, hi = np.percentile(replicates, [2.5, 97.5])
    # two-sided: twice the smaller tail of the replicates beyond 0 (with the +1 of a proper Monte-Carlo p-value)
    tail = min(int((replicates <= 0).sum()), int((replicates >= 0).sum()))
    return dict(ci=(float(lo), float(hi)), p=min(1.0, 2 * (tail + 1) / (n_boot + 1)))


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjustment (family-wise error) of ``pvalues``, in their order."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def paired(table: dict, metric: str, a: tuple, b: tuple) -> list[tuple[str, int, float]]:
    """(language, seed, a - b) for every (language, seed) that both rows ran."""
    runs = table["runs"]
    return [(lang, seed, float(runs[(a, lang, seed)][metric]) - float(runs[(b, lang, seed)][metric]))
            for lang in table["langs"] for seed in table["seeds"]
            if (a, lang, seed) in runs and (b, lang, seed) in runs
            and metric in runs[(a, lang, seed)] and metric in runs[(b, lang, seed)]]


def significance(table: dict, metric: str, task: str | None = None) -> list[dict]:
    """Every FLARE / FLARE MT row against the table's baselines (translate-train LoRA, X-Mixup and input-level fusion,
    or a study's ``compare_with``; a row is not compared with itself), and X-Mixup against translate-train LoRA: the
    per-(language, seed)
    differences (counted better / worse), their mean, the item-level bootstrap interval and p-value, and Holm's
    correction over all comparisons of the table. Comparisons whose runs lack predictions files are skipped.
    Computed once per table and metric (the markdown is written for the report, the README and the terminal)."""
    cache = table.setdefault("_significance", {})
    if metric not in cache:
        cache[metric] = _significance(table, metric, task or next(iter(table["runs"].values()))["task"])
    return cache[metric]


def compare(table: dict, metric: str, task: str, r: tuple, base: tuple) -> dict | None:
    """Row ``r`` minus row ``base`` over the (language, seed) pairs both ran: the mean difference, its mean per
    seed, better / worse / tied pair counts, and the bootstrap's intervals and p-values (seeds and items with at
    least :data:`MIN_SEEDS` seeds, else items only; ``ci`` and ``p`` are the ones a judgement uses). None without
    pairs or predictions."""
    triples = paired(table, metric, r, base)
    if not triples:
        return None
    recs = [(predictions_of(table["runs"][(r, lang, seed)]), predictions_of(table["runs"][(base, lang, seed)]))
            for lang, seed, _ in triples]
    if any(a is None or b is None for a, b in recs):
        logger.warning("%s - %s: predictions missing, no item bootstrap", row_label(r), row_label(base))
        return None
    diffs = [d for _, _, d in triples]
    boot = item_bootstrap(task, metric, recs, seed=table.get("bootstrap_seed", 0),
                          groups=[seed for _, seed, _ in triples])
    wins, losses = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    by_seed = defaultdict(list)
    for _, seed, d in triples:
        by_seed[seed].append(d)
    with_seeds = "p_seeds" in boot
    return dict(row=r, baseline=base, n=len(diffs), mean=float(np.mean(diffs)), items=boot["items"],
                seeds=boot["seeds"], ci_items=boot["ci"], p_items=boot["p"],
                ci_seeds=boot.get("ci_seeds"), p_seeds=boot.get("p_seeds"),
                # what the judgement uses: seeds and items resampled when there are enough seeds
                resampled="seeds and items" if with_seeds else "items",
                ci=boot["ci_seeds"] if with_seeds else boot["ci"], p=boot["p_seeds"] if with_seeds else boot["p"],
                per_seed={seed: float(np.mean(v)) for seed, v in sorted(by_seed.items())},
                wins=wins, losses=losses, ties=len(diffs) - wins - losses)


def _significance(table: dict, metric: str, task: str) -> list[dict]:
    out = []
    for r in table["rows"]:
        if r[0] not in ("flare", "flare-mt", "xmixup"):
            continue
        bases = (("translate-train", None),) if r[0] == "xmixup" else table.get("baselines", BASELINES)
        for base in bases:
            if base != r and (s := compare(table, metric, task, r, base)) is not None:
                out.append(s)
    for s, adjusted in zip(out, holm([s["p"] for s in out])):
        s["p_holm"], s["holm_family"] = adjusted, len(out)
    return out


def page_holm(tables: list[dict], metric_of=lambda task: METRIC[task]) -> int:
    """Holm's correction over EVERY comparison of the given tables (a page of several studies, each table's paper
    metric), replacing each table's own; returns the number of comparisons corrected for."""
    rows = [s for table in tables for s in significance(table, metric_of(table["task"]), table["task"])]
    for s, adjusted in zip(rows, holm([s["p"] for s in rows])):
        s["p_holm"], s["holm_family"] = adjusted, len(rows)
    return len(rows)


def verdict(s: dict, alpha: float = 0.05) -> str:
    if s["p_holm"] >= alpha:
        return "no evidence of a difference"
    return "better" if s["mean"] > 0 else "worse"


def fmt_p(p: float, floor: float | None = None) -> str:
    """A p-value as the bootstrap resolves it: at the floor (no replicate beyond 0) it is "< floor"."""
    floor = p_floor() if floor is None else floor
    return f"< {floor:.1g}" if p <= floor * (1 + 1e-9) else f"{p:.2g}"


def fmt_holm(s: dict) -> str:
    """Holm's p; when the raw p is at the bootstrap's floor, Holm's is a bound too."""
    at_floor = s["p"] <= p_floor() * (1 + 1e-9)
    return f"< {s['p_holm']:.2g}" if at_floor and s["p_holm"] < 1 else f"{s['p_holm']:.2g}"


def significance_markdown(task: str, table: dict) -> list[str]:
    rows = significance(table, METRIC[task], task)
    if not rows:
        return []
    seeds = max(s["seeds"] for s in rows)
    family = rows[0].get("holm_family", len(rows))
    items = rows[0]["items"]
    draw = table.get("bootstrap_seed", 0)
    how = (f"{N_BOOTSTRAP} two-level bootstrap resamples: the {seeds} training seeds drawn with replacement, then "
           f"the {items} TEST ITEMS, one draw shared by every language and seed" if seeds >= MIN_SEEDS else
           f"{N_BOOTSTRAP} bootstrap resamples of the {items} TEST ITEMS, one draw shared by every language and seed "
           f"(fewer than {MIN_SEEDS} seeds: the seed-to-seed variation is NOT in the interval)")
    if draw:
        how += f" (random draw {draw} of the bootstrap, not the default 0: --bootstrap_seed)"
    lines = ["", f"Paired differences (row − baseline, {METRIC_NAME[task]} ×100, averaged over the (language, seed) "
                 f"pairs both rows ran; {how}; p two-sided; Holm's correction over the {family} comparisons of the "
                 "page; the intervals are not corrected; judged at Holm p < 0.05). The items-only interval is that of "
                 "these trained models: it leaves out a re-run of training. Per seed: the mean difference over the "
                 "languages of each seed, in seed order.", "",
             "| comparison | pairs | mean difference | per seed | 95 % CI (seeds and items) | 95 % CI (items only: "
             "these trained models) | better / worse / tied pairs | p | Holm p | judged |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for s in rows:
        both = (f"[{100 * s['ci_seeds'][0]:+.2f}, {100 * s['ci_seeds'][1]:+.2f}]" if s["ci_seeds"] is not None
                else "–")
        per_seed = " / ".join(f"{100 * v:+.2f}" for v in s["per_seed"].values())
        lines.append(f"| {row_label(s['row'])} − {row_label(s['baseline'])} | {s['n']} | {100 * s['mean']:+.2f} | "
                     f"{per_seed} | {both} | [{100 * s['ci_items'][0]:+.2f}, {100 * s['ci_items'][1]:+.2f}] | "
                     f"{s['wins']} / {s['losses']} / {s['ties']} | {fmt_p(s['p'])} | {fmt_holm(s)} | {verdict(s)} |")
    return lines


# --------------------------------------------------------------------------------------------------------- cost
def median_range(values: list[float], digits: int) -> str:
    """Median [min–max]: robust to the odd run that shared its machine with other work."""
    if not values:
        return "–"
    med = f"{float(np.median(values)):.{digits}f}"
    return med if len(values) == 1 else f"{med} [{min(values):.{digits}f}–{max(values):.{digits}f}]"


def cost_markdown(table: dict) -> list[str]:
    """Trainable parameters, training budget and measured wall-clock times per row (over its runs)."""
    lines = ["", "Cost per mode (every run of the row; wall-clock seconds, median [min–max], on the machine that ran "
                 "it; per epoch = training time / epochs, to compare rows trained for different budgets):", "",
             "| mode | trainable parameters | epochs | training time (s) | per epoch (s) | test evaluation time (s) |",
             "|---|---|---|---|---|---|"]
    for r in table["rows"]:
        runs = [res for (row, _, _), res in table["runs"].items() if row == r]
        params = sorted({int(res["param_train"]) for res in runs if "param_train" in res})
        trains = [res for res in runs if "train_runtime" in res]
        epochs = sorted({res.get("args", {}).get("epochs") for res in trains} - {None})
        per_epoch = [res["train_runtime"] / res["args"]["epochs"] for res in trains
                     if res.get("args", {}).get("epochs") and not res["args"].get("max_steps")]
        lines.append("| {} | {} | {} | {} | {} | {} |".format(
            row_label(r), " / ".join(f"{p:,}" for p in params) or "–",
            " / ".join(str(e) for e in epochs) if trains else "– (no training)",
            median_range([res["train_runtime"] for res in trains], 0), median_range(per_epoch, 0),
            median_range([res["test_runtime"] for res in runs if "test_runtime" in res], 1)))
    return lines


def budget_markdown(study: dict | None) -> list[str]:
    """The training budget a study chose on validation data, with the scores behind the choice."""
    sel = (study or {}).get("selection")
    if not sel:
        return []
    budgets = [str(b) for b in sel["budgets"]]
    kept = f", kept from the study in {sel['kept_from']}" if sel.get("kept_from") else ""
    lines = ["", f"Training budget (epochs of stage 2), chosen per mode on {sel['language']} VALIDATION data "
                 f"(seed {sel['seed']}; {sel['metric']}, ×100; a tie goes to the smaller budget){kept}:", "",
             "| mode | " + " | ".join(f"{b} epoch{'s' if b != '1' else ''}" for b in budgets) + " | chosen |",
             "|---|" + "---|" * (len(budgets) + 1)]
    for name, c in sel["chosen"].items():
        mode, _, fn = name.partition("/")
        label = row_label(({"lora": "translate-train"}.get(mode, mode), fn or None))
        vals = [f"{100 * c['validation'][b]:.2f}" if c["validation"].get(b) is not None else "–" for b in budgets]
        lines.append(f"| {label} | " + " | ".join(vals) + f" | {c['epochs']} |")
    return lines


def markdown(task: str, plm: str, table: dict, study: dict | None = None) -> str:
    header = ["mode", *table["langs"], "avg"]
    lines = []
    for i, (metric, name) in enumerate(METRICS[task]):
        if not any(metric in res for res in table["runs"].values()):
            continue
        lines += ([] if i == 0 else [""]) + [
            f"### {task} · {plm} · {name} ({seeds_note(table)})", "",
            "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in table_rows(table, metric)]
        lines += apart_markdown(table, metric)
    lines += significance_markdown(task, table)
    lines += cost_markdown(table)
    lines += budget_markdown(study)
    if table["missing"]:
        lines += ["", f"Missing for a full table ({len(table['missing'])}): " + "; ".join(table["missing"])]
    return "\n".join(lines) + "\n"


def seeds_note(table: dict) -> str:
    seeds = table["seeds"]
    few = f"; no ± with fewer than {MIN_SEEDS_FOR_STD} seeds"
    spread = ", ± std over them" if len(seeds) >= MIN_SEEDS_FOR_STD else few
    return f"×100; mean over seeds {seeds}{spread}"


def apart_markdown(table: dict, metric: str) -> list[str]:
    """The rows whose input is the same for every language, as one value per seed set (not averaged as languages)."""
    lines = []
    values = cells(table, metric)
    for r in table.get("apart", ()):
        v = values.get((r, table["langs"][0]), [])
        if v:
            lines += ["", f"{row_label(r)}: {fmt(v)}. Not a row of the table: its predictions are the same in every "
                          "language (the input is one English test set, the human translation of the items), so it "
                          "is one result per seed, not one per language."]
    return lines


def csv_text(task: str, plm: str, table: dict) -> str:
    import csv
    import io

    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["task", "model", "metric", "mode", "language", "mean", "std", "n_seeds"])
    for metric, name in METRICS[task]:
        values = cells(table, metric)
        for r in table["rows"]:
            for lang in table["langs"]:
                v = values.get((r, lang), [])
                if v:
                    std = float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
                    writer.writerow([task, plm, name, row_label(r), lang, f"{float(np.mean(v)):.4f}", f"{std:.4f}",
                                     len(v)])
    return buf.getvalue()


def plot(task: str, plm: str, table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    langs = table["langs"]
    rows = [r for r in table["rows"] if r not in table.get("apart", ())]
    values = cells(table, METRIC[task])
    width = 0.8 / max(len(rows), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(langs) + 2) + 2, 4))
    x = np.arange(len(langs))
    for i, r in enumerate(rows):
        means = [100 * float(np.mean(values.get((r, lang)) or [np.nan])) for lang in langs]
        # std bars only where the table prints a std (>= MIN_SEEDS_FOR_STD seeds)
        errs = np.array([100 * float(np.std(v, ddof=1)) if len(v := values.get((r, lang), [])) >= MIN_SEEDS_FOR_STD
                         else np.nan for lang in langs])
        ax.bar(x + (i - (len(rows) - 1) / 2) * width, means, width, label=row_label(r), capsize=2,
               yerr=errs if np.isfinite(errs).any() else None)
    for r in table.get("apart", ()):  # one value for every language: a line, not bars
        v = values.get((r, langs[0]), [])
        if v:
            ax.axhline(100 * float(np.mean(v)), color="black", linestyle="--", linewidth=1,
                       label=f"{row_label(r)} (same input in every language)")
    ax.set_xticks(x, langs)
    ax.set_ylim(0, 100)
    ax.set_ylabel(f"{METRIC_NAME[task]} (×100)")
    ax.set_title(f"{task} · {plm}")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, never over them
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(tables: dict, out: Path, study: dict | None = None) -> list[Path]:
    """Markdown, CSV and PNG per (task, model) table of :func:`build_tables` into ``out``."""
    from flare.files import atomic_write

    written = []
    out.mkdir(parents=True, exist_ok=True)
    for (task, plm), table in sorted(tables.items()):
        stem = out / f"{task}-{plm}"
        md = markdown(task, plm, table, study)
        atomic_write(stem.with_suffix(".md"), lambda p, t=md: p.write_text(t, encoding="utf-8"))
        csv = csv_text(task, plm, table)
        atomic_write(stem.with_suffix(".csv"), lambda p, t=csv: p.write_text(t, encoding="utf-8"))
        png = stem.with_suffix(".png")
        _plot_to(task, plm, table, png)
        written += [stem.with_suffix(".md"), stem.with_suffix(".csv"), png]
    return written


def _plot_to(task: str, plm: str, table: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.tmp.png")  # written whole, then renamed
    plot(task, plm, table, tmp)
    tmp.replace(path)


README_BEGIN = "<!-- flare.report {root}: generated by `{command}`; edit the results, not this block -->"
README_END = "<!-- /flare.report {root} -->"


def page_command(roots: list[str], page: str) -> str:
    return f"python -m flare.report {' '.join(roots)} --readme {page}"


def load_page(roots: list[str], seeds: list[int] | None = None,
              bootstrap_seed: int = 0) -> list[tuple[str, dict | None, dict]]:
    """(root, study, tables) of each results folder of one page, with Holm's correction over every comparison of
    the page (:func:`page_holm`); ``seeds``: only the runs of these seeds; ``bootstrap_seed``: the random draw of
    every bootstrap on the page (0, the default, is the committed reports'). A folder without stage-2 results raises
    ValueError."""
    page = []
    for root in roots:
        study = load_study(Path(root))
        results = load_results(Path(root))
        if seeds is not None:
            results = [r for r in results if r.get("seed") in seeds]
            if study is not None:
                study = {**study, "seeds": [s for s in study.get("seeds", []) if s in seeds]}
        tables = build_tables(results, study)
        if not tables:
            raise ValueError(f"no stage-2 results_*.json under {root}; run run.py (or python -m flare.sweep) first")
        page.append((root, study, tables))
    redraw([table for _, _, tables in page for _, table in sorted(tables.items())], bootstrap_seed)
    return page


def redraw(tables: list[dict], bootstrap_seed: int) -> int:
    """Every comparison of a page's ``tables`` computed (again) from random draw ``bootstrap_seed`` of the
    bootstrap, with Holm's correction over all of them (:func:`page_holm`); returns the number of comparisons."""
    for table in tables:
        table["bootstrap_seed"] = bootstrap_seed
        table.pop("_significance", None)  # the cache of significance(), drawn with another seed
    return page_holm(tables)


def readme_block(tables: dict, study: dict | None, root: str, out: Path, page: Path | None = None) -> str:
    """What ``--readme`` puts between the markers: every table's markdown and its plot (linked relative to the
    folder of ``page``, the markdown file the block goes into)."""
    parts = []
    for (task, plm), table in sorted(tables.items()):
        parts.append(markdown(task, plm, table, study).replace("### ", "#### ", 1))
        png = out / f"{task}-{plm}.png"
        link = Path(os.path.relpath(png.resolve(), page.resolve().parent)) if page is not None else png
        parts.append(f"![{task} · {plm}]({link.as_posix()})\n")
    return "\n".join(parts)


def update_readme(readme: Path, root: str, block: str, command: str | None = None) -> bool:
    """Replace the marked block of ``root`` in ``readme`` (its begin marker found by the root; its command line
    rewritten to ``command``, default: this root alone); False if the markers are missing."""
    text = readme.read_text(encoding="utf-8")
    prefix, end = f"<!-- flare.report {root}: ", README_END.format(root=root)
    if prefix not in text or end not in text:
        return False
    begin = README_BEGIN.format(root=root, command=command or page_command([root], readme.as_posix()))
    head, rest = text.split(prefix, 1)
    _, tail = rest.split("\n", 1)[1].split(end, 1)
    new = f"{head}{begin}\n{block}{end}{tail}"
    if new != text:
        from flare.files import atomic_write

        atomic_write(readme, lambda p: p.write_text(new, encoding="utf-8"))
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Tables (markdown, CSV) and bar plots of every stage-2 result under a "
                                            "folder, one per task and model; lists the runs missing for a full grid.")
    p.add_argument("roots", nargs="+", metavar="root",
                   help="folder with run directories (e.g. checkpoints/); several folders make one page (e.g. the "
                        "study's conditions): Holm's correction then runs over every comparison of all of them")
    p.add_argument("--out", default=None, help="where to write the report (default ROOT/report; one root only)")
    p.add_argument("--seeds", nargs="+", type=int, default=None,
                   help="only the runs of these seeds (e.g. to compare with a condition that has fewer); the report "
                        "goes to ROOT/report-seeds-S1-S2 unless --out says otherwise; not with --readme")
    p.add_argument("--bootstrap_seed", type=int, default=0,
                   help="the random draw of the bootstrap (default 0, the committed reports'): another one shows how "
                        "much a p-value near a threshold owes to the Monte-Carlo draw; the report goes to "
                        "ROOT/report-bootstrap-S unless --out says otherwise; not with --readme")
    p.add_argument("--readme", default=None,
                   help="also replace the block between the markers '<!-- flare.report ROOT ... -->' and "
                        "'<!-- /flare.report ROOT -->' in this markdown file (e.g. docs/study.md) with the tables, "
                        "for each root")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for root in args.roots:
        if not Path(root).is_dir():
            print(f"error: {root} is not a folder; pass the --output_dir of run.py (e.g. checkpoints/)",
                  file=sys.stderr)
            return 2
    if args.seeds and args.readme:
        print("error: --seeds makes a partial report; the --readme blocks hold every seed (drop one of them)",
              file=sys.stderr)
        return 2
    if args.bootstrap_seed and args.readme:
        print("error: --bootstrap_seed draws other bootstrap samples than the --readme blocks hold (draw 0); drop one "
              "of them", file=sys.stderr)
        return 2
    if args.out and len(args.roots) > 1:
        print("error: --out names one folder; with several roots each report goes to ROOT/report (drop --out)",
              file=sys.stderr)
        return 2
    try:
        page = load_page(args.roots, args.seeds, args.bootstrap_seed)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    written = []
    if args.readme:
        command = page_command(args.roots, args.readme)
        missing = [root for root in args.roots
                   if f"<!-- flare.report {root}: " not in Path(args.readme).read_text(encoding="utf-8")]
        if missing:
            print(f"error: {args.readme} has no block for {missing[0]}; add the two lines\n"
                  f"{README_BEGIN.format(root=missing[0], command=command)}\n{README_END.format(root=missing[0])}",
                  file=sys.stderr)
            return 2
    default_out = ("report" + ("-seeds-" + "-".join(map(str, args.seeds)) if args.seeds else "")
                   + (f"-bootstrap-{args.bootstrap_seed}" if args.bootstrap_seed else ""))
    for root, study, tables in page:
        out = Path(args.out) if args.out else Path(root) / default_out
        written += write_report(tables, out, study)
        if args.readme:
            block = readme_block(tables, study, root, out, page=Path(args.readme))
            if not update_readme(Path(args.readme), root, block, command):
                print(f"error: {args.readme} has no block for {root}", file=sys.stderr)
                return 2
        for (task, plm), table in sorted(tables.items()):
            print(markdown(task, plm, table, study))
    if args.readme:
        written.append(Path(args.readme))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
