"""Train-side against test-side MT: ``python -m flare.crossed ORACLE MT CROSSED [--readme PAGE]``.

Under an MT condition the fusion modes meet the MT twice: the target-language training text is the MT's, and at test
time they read the MT's English of the target test set. The two study folders change both at once. The crossed
evaluations (``scripts/embedded_nusax_study.py --mt lexical --crossed``: ``run.py --eval_stage2``, no training) test
the oracle-trained models with the MT's English and the MT-trained models with the gold English, which fills the
2 x 2 of (training MT) x (test-time English) per row:

=================  ===========================  ===========================
trained on          tested with the gold English  tested with the MT's English
=================  ===========================  ===========================
the human text      ORACLE folder                 CROSSED folder
the MT              CROSSED folder                MT folder
=================  ===========================  ===========================

Per row (input-level fusion, FLARE add_relu, ...), over the (language, seed) pairs of all four cells: each cell's
mean and its difference to translate-train LoRA trained on the same text (LoRA reads no English, so its test side
does not change); the test-side effect (training held fixed) and the train-side effect (test English held fixed),
each with the report's interval and p-value (seeds and items resampled with at least 3 seeds), Holm over the
comparisons of this analysis. Writes ``CROSSED/crossed.json`` and ``CROSSED/crossed.md``; ``--readme PAGE`` puts the
markdown into PAGE's marked block of ``CROSSED``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

from flare import report

logger = logging.getLogger("flare.crossed")

LORA = ("translate-train", None)
GOLD = "gold"
CELLS = (("human", GOLD), ("human", "mt"), ("mt", GOLD), ("mt", "mt"))  # (training text, test English)
CELL_LABEL = {("human", GOLD): "human / gold", ("human", "mt"): "human / MT", ("mt", GOLD): "MT / gold",
              ("mt", "mt"): "MT / MT"}
# (name, (cell, cell minus which), held fixed)
EFFECTS = (("test side", (("human", "mt"), ("human", GOLD)), "trained on the human text"),
           ("test side", (("mt", "mt"), ("mt", GOLD)), "trained on the MT"),
           ("train side", (("mt", GOLD), ("human", GOLD)), "tested with the gold English"),
           ("train side", (("mt", "mt"), ("human", "mt")), "tested with the MT's English"))


def crossed_runs(root: Path, mt: str) -> dict:
    """{(row, training text, lang, seed): result} of the crossed evaluations under ``root`` (results written by
    ``run.py --eval_stage2``): a run tested with ``mt``'s English (its ``path_mt``) was trained on the human text, one
    tested with the gold English was trained on the MT."""
    out = {}
    for path in sorted(root.rglob("results_test.json")):
        res = json.loads(path.read_text())
        if not res.get("evaluated_run"):
            continue
        tested_with_mt = Path(res["test_translations"]).name.endswith(f"-{mt}")
        res["_path"] = str(path)
        out[(report.row_key(res), "human" if tested_with_mt else "mt", res["target_lang"], res["seed"])] = res
    return out


def analyse(oracle: Path, mt_root: Path, crossed: Path) -> dict:
    o_study, o_table = report.study_table(oracle)
    m_study, m_table = report.study_table(mt_root)
    mt = m_study.get("translations")
    if mt in (None, "reference"):
        raise ValueError(f"{mt_root}: not an MT condition (its study.json says translations {mt!r})")
    task, metric = o_study["task"], report.METRIC[o_study["task"]]
    cross = crossed_runs(crossed, mt)
    if not cross:
        raise ValueError(f"{crossed}: no crossed evaluations (results of run.py --eval_stage2)")
    rows = sorted({k[0] for k in cross}, key=lambda r: (report.ROW_ORDER.index(r[0]), r[1] or ""))
    # the (language, seed) pairs of every cell: both crossed evaluations of every row and the four runs beside them
    pairs = {(lang, seed) for (_, _, lang, seed) in cross}
    for row in rows:
        pairs &= {(lang, seed) for (r, side, lang, seed) in cross if r == row and side == "human"}
        pairs &= {(lang, seed) for (r, side, lang, seed) in cross if r == row and side == "mt"}
        for table in (o_table, m_table):
            pairs &= {(lang, seed) for (r, lang, seed) in table["runs"] if r == row}
    for table in (o_table, m_table):
        pairs &= {(lang, seed) for (r, lang, seed) in table["runs"] if r == LORA}
    if not pairs:
        raise ValueError(f"{crossed}: no (language, seed) has both crossed evaluations and the runs of both "
                         "conditions beside them")
    # one pseudo-table: row keys (mode, "fn|training text|test English") so that report.compare pairs the cells
    runs = {}

    def put(row, cell, lang, seed, res):
        if (lang, seed) in pairs:
            runs[((row[0], f"{row[1]}|{cell[0]}|{cell[1]}"), lang, seed)] = res

    for (row, lang, seed), res in o_table["runs"].items():
        if row in rows or row == LORA:
            put(row, ("human", GOLD), lang, seed, res)
    for (row, lang, seed), res in m_table["runs"].items():
        if row in rows or row == LORA:
            put(row, ("mt", "mt"), lang, seed, res)
    for (row, side, lang, seed), res in cross.items():
        put(row, (side, "mt" if side == "human" else GOLD), lang, seed, res)
    table = {"runs": runs, "langs": sorted({lang for lang, _ in pairs}), "seeds": sorted({s for _, s in pairs}),
             "task": task}

    def key(row, cell):
        return (row[0], f"{row[1]}|{cell[0]}|{cell[1]}")

    def lora(cell):  # LoRA reads no English: its cell is the one trained on the same text
        return key(LORA, (cell[0], GOLD if cell[0] == "human" else "mt"))

    def summary(s):
        return None if s is None else {
            "mean": round(100 * s["mean"], 2), "ci": [round(100 * v, 2) for v in s["ci"]], "p": s["p"],
            "resampled": s["resampled"], "pairs": s["n"],
            "per_seed": {str(k): round(100 * v, 2) for k, v in s["per_seed"].items()}, "_s": s}

    entries, effects = [], []
    for row in rows:
        for cell in CELLS:
            values = [float(r[metric]) for (k, _, _), r in runs.items() if k == key(row, cell)]
            if not values:
                continue
            entries.append({"row": report.row_label(row), "mode": row[0], "fusion_fn": row[1], "train": cell[0],
                            "test_english": cell[1], "mean": round(100 * float(np.mean(values)), 2),
                            "runs": len(values),
                            "minus_lora": summary(report.compare(table, metric, task, key(row, cell), lora(cell)))})
        for name, (a, b), fixed in EFFECTS:
            s = summary(report.compare(table, metric, task, key(row, a), key(row, b)))
            if s is not None:
                effects.append({"row": report.row_label(row), "effect": name, "held_fixed": fixed,
                                "cells": [CELL_LABEL[a], CELL_LABEL[b]], **s})
    tests = [*effects, *(e["minus_lora"] for e in entries if e["minus_lora"])]
    for t, adjusted in zip(tests, report.holm([t["p"] for t in tests])):
        t["p_holm"], t["holm_family"] = adjusted, len(tests)
        del t["_s"]
    return {"oracle": str(oracle), "mt_condition": str(mt_root), "crossed": str(crossed), "mt": mt,
            "metric": metric, "seeds": table["seeds"], "languages": table["langs"],
            "pairs": [list(pair) for pair in sorted(pairs)], "cells": entries,
            "effects": effects}


def fmt_test(t: dict) -> str:
    floor = report.p_floor()
    return (f"{t['mean']:+.2f} | [{t['ci'][0]:+.2f}, {t['ci'][1]:+.2f}] | {report.fmt_p(t['p'], floor)} | "
            f"{report.fmt_p(t['p_holm'], floor)}")


def markdown(result: dict) -> str:
    seeds = ", ".join(map(str, result["seeds"]))
    name = dict(sum(report.METRICS.values(), ())).get(result["metric"], result["metric"])
    lines = [f"{name} ×100, means over {len(result['languages'])} "
             f"languages × seeds {seeds}; training text / test-time English (gold = the human English; MT = "
             f"{result['mt']}); − LoRA: minus translate-train LoRA trained on the same text; intervals resample "
             "seeds and items (items only below 3 seeds); Holm over the "
             f"{result['effects'][0]['holm_family'] if result['effects'] else 0} comparisons of this block.", "",
             "| row | training / test English | mean | − LoRA | 95 % CI | p | p Holm |",
             "|---|---|---|---|---|---|---|"]
    for e in result["cells"]:
        d = e["minus_lora"]
        lines.append(f"| {e['row']} | {CELL_LABEL[(e['train'], e['test_english'])]} | {e['mean']:.2f} | "
                     + (fmt_test(d) if d else "| | | ") + " |")
    lines += ["", "| row | effect | held fixed | cells | difference | 95 % CI | p | p Holm |",
              "|---|---|---|---|---|---|---|---|"]
    for e in result["effects"]:
        lines.append(f"| {e['row']} | {e['effect']} | {e['held_fixed']} | {e['cells'][0]} − {e['cells'][1]} | "
                     f"{fmt_test(e)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Train-side against test-side MT: the crossed evaluations of an MT "
                                            "condition against the oracle (see the module docstring).")
    p.add_argument("oracle", help="the oracle study's results folder (results/embedded-nusax)")
    p.add_argument("mt_condition", help="the MT condition's results folder (results/embedded-nusax-lexical)")
    p.add_argument("crossed", help="the crossed evaluations' results folder (scripts/embedded_nusax_study.py "
                                   "--crossed)")
    p.add_argument("--readme", default=None, metavar="PAGE",
                   help="also replace PAGE's marked block of the crossed folder with the markdown")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = analyse(Path(args.oracle), Path(args.mt_condition), Path(args.crossed))
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from flare.files import write_json_atomic

    out = Path(args.crossed)
    write_json_atomic(out / "crossed.json", result)
    text = markdown(result)
    (out / "crossed.md").write_text(text, encoding="utf-8")
    print(text)
    if args.readme:
        command = f"python -m flare.crossed {args.oracle} {args.mt_condition} {args.crossed} --readme {args.readme}"
        if not report.update_readme(Path(args.readme), args.crossed, text, command):
            print(f"error: {args.readme} has no marked block for {args.crossed}", file=sys.stderr)
            return 2
    print(f"wrote {out / 'crossed.json'}, {out / 'crossed.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
