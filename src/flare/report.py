"""Results tables and plots from the run directories: ``python -m flare.report checkpoints/ [--out DIR]``.

Reads every ``results_zs.json`` / ``results_test.json`` of stage 2 under a folder and writes, per task and model,
the table the paper shows: rows = modes (zero-shot, translate-test, translate-train LoRA, input-level fusion, FLARE
per fusion function, FLARE MT), columns = target languages + average, cells = mean ± std over seeds of the task's
metric (XNLI accuracy, NusaX macro-F1, TyDiQA exact match; x100). Markdown and CSV tables, a PNG bar plot, and the
list of runs missing for a full grid (every mode x language x seed seen for that task and model).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

logger = logging.getLogger("flare.report")

METRIC = {"xnli": "test_accuracy", "nusax": "test_f1", "tydiqa": "test_exact_match"}
METRIC_NAME = {"xnli": "accuracy", "nusax": "macro-F1", "tydiqa": "exact match"}
ROW_ORDER = ("zero-shot", "translate-test", "translate-train", "input-fusion", "flare", "flare-mt")
ROW_LABEL = {"zero-shot": "Zero-shot", "translate-test": "Translate-test", "translate-train": "Translate-train LoRA",
             "input-fusion": "Input-level fusion", "flare": "FLARE", "flare-mt": "FLARE MT"}


def row_key(res: dict) -> tuple[str, str | None]:
    mode = res["mode"]
    return mode, res.get("fusion_fn") if mode in ("flare", "flare-mt") else None


def row_label(key: tuple[str, str | None]) -> str:
    mode, fn = key
    return ROW_LABEL.get(mode, mode) + (f" ({fn})" if fn else "")


def load_results(root: Path) -> list[dict]:
    """Stage-2 results (not stage 1, not English->English checks) under ``root``."""
    out = []
    for path in sorted(root.rglob("results_*.json")):
        if "checkpoint-" in str(path.parent.name):
            continue
        try:
            res = json.loads(path.read_text())
        except json.JSONDecodeError:
            logger.warning("skipping unreadable %s", path)
            continue
        if res.get("mode") in ROW_ORDER and res.get("target_lang") != res.get("source_lang"):
            res["_path"] = str(path)
            out.append(res)
    return out


def fmt(values: list[float]) -> str:
    if not values:
        return "–"
    mean = 100 * float(np.mean(values))
    return f"{mean:.2f}" if len(values) == 1 else f"{mean:.2f} ± {100 * float(np.std(values, ddof=1)):.2f}"


def build_tables(results: list[dict]) -> dict:
    """{(task, plm_name): {"langs", "rows", "cells": {(row, lang): [values]}, "seeds", "missing"}}."""
    groups: dict = defaultdict(lambda: {"cells": defaultdict(list), "langs": set(), "rows": set(), "seeds": set(),
                                        "runs": set()})
    for res in results:
        task = res["task"]
        g = groups[(task, res["plm_name"])]
        key, lang, seed = row_key(res), res["target_lang"], res["seed"]
        if (key, lang, seed) in g["runs"]:
            continue  # the same run twice (e.g. a copied folder)
        g["runs"].add((key, lang, seed))
        g["cells"][(key, lang)].append(float(res[METRIC[task]]))
        g["langs"].add(lang)
        g["rows"].add(key)
        g["seeds"].add(seed)
    tables = {}
    for (task, plm), g in groups.items():
        rows = sorted(g["rows"], key=lambda k: (ROW_ORDER.index(k[0]), k[1] or ""))
        langs = sorted(g["langs"])
        missing = [f"{row_label(r)} / {lang} / seed {s}" for r in rows for lang in langs for s in sorted(g["seeds"])
                   if (r, lang, s) not in g["runs"]]
        tables[(task, plm)] = dict(rows=rows, langs=langs, cells=g["cells"], seeds=sorted(g["seeds"]),
                                   missing=missing)
    return tables


def table_rows(table: dict) -> list[list[str]]:
    out = []
    for r in table["rows"]:
        cells = [fmt(table["cells"].get((r, lang), [])) for lang in table["langs"]]
        # average over languages of the per-language seed means (only when every language has a value)
        means = [float(np.mean(table["cells"][(r, lang)])) for lang in table["langs"] if table["cells"].get((r, lang))]
        avg = f"{100 * float(np.mean(means)):.2f}" if len(means) == len(table["langs"]) else "–"
        out.append([row_label(r), *cells, avg])
    return out


def markdown(task: str, plm: str, table: dict) -> str:
    header = ["mode", *table["langs"], "avg"]
    lines = [f"### {task} · {plm} · {METRIC_NAME[task]} (×100; mean ± std over seeds {table['seeds']})", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(table)]
    if table["missing"]:
        lines += ["", f"Missing for a full table ({len(table['missing'])}): " + "; ".join(table["missing"])]
    return "\n".join(lines) + "\n"


def csv_text(task: str, plm: str, table: dict) -> str:
    import csv
    import io

    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["task", "model", "mode", "language", "mean", "std", "n_seeds"])
    for r in table["rows"]:
        for lang in table["langs"]:
            values = table["cells"].get((r, lang), [])
            if values:
                std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
                writer.writerow([task, plm, row_label(r), lang, f"{float(np.mean(values)):.4f}", f"{std:.4f}",
                                 len(values)])
    return buf.getvalue()


def plot(task: str, plm: str, table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    langs, rows = table["langs"], table["rows"]
    width = 0.8 / max(len(rows), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(langs) + 2) + 2, 4))
    x = np.arange(len(langs))
    for i, r in enumerate(rows):
        means = [100 * float(np.mean(table["cells"].get((r, lang)) or [np.nan])) for lang in langs]
        # std bars only where there are >= 2 seeds (a single seed has no spread to show)
        errs = np.array([100 * float(np.std(v, ddof=1)) if len(v := table["cells"].get((r, lang), [])) > 1
                         else np.nan for lang in langs])
        ax.bar(x + (i - (len(rows) - 1) / 2) * width, means, width, label=row_label(r), capsize=2,
               yerr=errs if np.isfinite(errs).any() else None)
    ax.set_xticks(x, langs)
    ax.set_ylim(0, 100)
    ax.set_ylabel(f"{METRIC_NAME[task]} (×100)")
    ax.set_title(f"{task} · {plm}")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, never over them
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(tables: dict, out: Path) -> list[Path]:
    """Markdown, CSV and PNG per (task, model) table of :func:`build_tables` into ``out``."""
    from flare.files import atomic_write

    written = []
    out.mkdir(parents=True, exist_ok=True)
    for (task, plm), table in sorted(tables.items()):
        stem = out / f"{task}-{plm}"
        md = markdown(task, plm, table)
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Tables (markdown, CSV) and bar plots of every stage-2 result under a "
                                            "folder, one per task and model; lists the runs missing for a full grid.")
    p.add_argument("root", help="folder with run directories (e.g. checkpoints/)")
    p.add_argument("--out", default=None, help="where to write the report (default ROOT/report)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    root = Path(args.root)
    if not root.is_dir():
        print(f"error: {root} is not a folder; pass the --output_dir of run.py (e.g. checkpoints/)", file=sys.stderr)
        return 2
    tables = build_tables(load_results(root))
    if not tables:
        print(f"error: no stage-2 results_*.json under {root}; run run.py (or python -m flare.sweep) first",
              file=sys.stderr)
        return 2
    written = write_report(tables, Path(args.out) if args.out else root / "report")
    for (task, plm), table in sorted(tables.items()):
        print(markdown(task, plm, table))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
