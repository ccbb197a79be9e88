"""FLARE's margin against MT quality: ``python -m flare.curve ROOT [ROOT ...] --out DIR``.

Each ROOT is a study folder of one MT condition (``scripts/embedded_nusax_study.py``: the oracle's human translation,
the quality levels ``--mt lexical-qNN``, the lexical MT), all of one task and model. Per condition and row
(translate-train LoRA, input-level fusion, FLARE add_relu): the condition's measured MT quality (chrF against the
human translation: of the test sets translated into English, which the fusion modes read at test time, and of the
English training set translated into the target languages, which every training mode learns from; means over the
study's languages, from the translations' ``meta.json``; the human translation itself is 100), the row's mean
score, and for input fusion and FLARE the difference to LoRA with the report's intervals (seeds and items resampled
with at least 3 seeds). Where a row's mean difference changes sign between two adjacent levels, the chrF at which it
crosses zero is interpolated linearly: the level of MT quality below which the method stops paying.

Writes ``DIR/curve.json`` (one entry per (condition, row)), ``DIR/curve.md`` and ``DIR/curve.png`` (the differences
against test chrF).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

from flare import report

logger = logging.getLogger("flare.curve")

LORA = ("translate-train", None)
ROWS = (LORA, ("input-fusion", None), ("flare", "add_relu"))
HUMAN_CHRF = 100.0  # the human translation against itself


def mt_quality(root: Path, study: dict) -> dict:
    """chrF of the condition's translations against the human ones: ``chrf_test`` (target test sets into English),
    ``chrf_train`` (the English training set into the target languages); means over the study's languages."""
    mt = study.get("translations", "reference")
    if mt == "reference":
        return {"mt": mt, "chrf_test": HUMAN_CHRF, "chrf_train": HUMAN_CHRF}
    langs, folder = study["languages"], root / "translations"
    test, train = [], []
    for lang in langs:
        back = json.loads((folder / f"translate-en-{mt}" / "meta.json").read_text())["splits"]
        forward = json.loads((folder / f"translate-{lang}-{mt}" / "meta.json").read_text())["splits"]
        test.append(back[f"test_{lang}-en"]["against_human"]["chrf"])
        train.append(forward[f"train_en-{lang}"]["against_human"]["chrf"])
    return {"mt": mt, "chrf_test": round(float(np.mean(test)), 2), "chrf_train": round(float(np.mean(train)), 2)}


def entries(root: Path) -> list[dict]:
    """One entry per row of the condition in ``root``."""
    study, table = report.study_table(root)
    metric, task = report.METRIC[study["task"]], study["task"]
    quality = mt_quality(root, study)
    out = []
    for row in ROWS:
        values = [float(table["runs"][k][metric]) for k in table["runs"] if k[0] == row]
        if not values:
            continue
        entry = {"condition": str(root), **quality, "row": report.row_label(row), "mode": row[0],
                 "fusion_fn": row[1], "metric": metric, "mean": round(100 * float(np.mean(values)), 2),
                 "runs": len(values), "seeds": table["seeds"]}
        if row != LORA and (diff := report.compare(table, metric, task, row, LORA)) is not None:
            entry["minus_lora"] = {"mean": round(100 * diff["mean"], 2),
                                   "ci": [round(100 * v, 2) for v in diff["ci"]], "p": diff["p"],
                                   "resampled": diff["resampled"], "pairs": diff["n"],
                                   "per_seed": {str(k): round(100 * v, 2) for k, v in diff["per_seed"].items()}}
        out.append(entry)
    return out


def crossings(curve: list[dict]) -> dict:
    """Per row: the test chrF at which its mean difference to LoRA changes sign, interpolated linearly between the
    adjacent levels (None where it never does); rows in the order they first appear, so curve.json is the same on
    every run."""
    out = {}
    for row in dict.fromkeys(e["row"] for e in curve if "minus_lora" in e):
        points = sorted((e["chrf_test"], e["minus_lora"]["mean"]) for e in curve if e["row"] == row and
                        "minus_lora" in e)
        out[row] = None
        for (x0, y0), (x1, y1) in zip(points, points[1:]):
            if y0 == 0 or (y0 < 0) != (y1 < 0):
                at = x0 if y0 == 0 else x0 + (x1 - x0) * (0 - y0) / (y1 - y0)
                out[row] = {"chrf_test": round(at, 1), "between": [x0, x1]}
                break
    return out


def markdown(curve: list[dict], crossing: dict) -> str:
    lines = ["| condition | test chrF | train chrF | row | mean | − LoRA | 95 % CI | resampled |",
             "|---|---|---|---|---|---|---|---|"]
    for e in sorted(curve, key=lambda e: (-e["chrf_test"], e["row"])):
        d = e.get("minus_lora")
        lines.append(f"| {e['mt']} | {e['chrf_test']:.1f} | {e['chrf_train']:.1f} | {e['row']} | {e['mean']:.2f} | "
                     + (f"{d['mean']:+.2f} | [{d['ci'][0]:+.2f}, {d['ci'][1]:+.2f}] | {d['resampled']} |" if d
                        else "| | |"))
    lines.append("")
    for row, x in sorted(crossing.items()):
        lines.append(f"- {row} − LoRA changes sign between the levels at test chrF {x['between'][0]:.1f} and "
                     f"{x['between'][1]:.1f}; linear interpolation puts the crossing at ≈ {x['chrf_test']:.1f} (the "
                     "straight line between two levels is an assumption: more levels narrow it)" if x is not None
                     else f"- {row} − LoRA keeps its sign over the measured levels")
    return "\n".join(lines) + "\n"


def plot(curve: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for row in sorted({e["row"] for e in curve if "minus_lora" in e}):
        pts = sorted((e["chrf_test"], e["minus_lora"]) for e in curve if e["row"] == row and "minus_lora" in e)
        x = [p[0] for p in pts]
        y = [p[1]["mean"] for p in pts]
        err = np.array([[p[1]["mean"] - p[1]["ci"][0] for p in pts], [p[1]["ci"][1] - p[1]["mean"] for p in pts]])
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=f"{row} − LoRA")
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xlabel("MT quality: chrF of the test sets translated into English")
    ax.set_ylabel("difference to translate-train LoRA (×100)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="FLARE's and input-level fusion's margin over translate-train LoRA "
                                            "against MT quality, from study folders of several MT conditions.")
    p.add_argument("roots", nargs="+", metavar="root", help="study results folders, one per MT condition")
    p.add_argument("--out", required=True, help="folder for curve.json, curve.md and curve.png")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        curve = [e for root in args.roots for e in entries(Path(root))]
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    crossing = crossings(curve)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from flare.files import write_json_atomic

    write_json_atomic(out / "curve.json", {"levels": curve, "crossing_chrf_test": crossing})
    (out / "curve.md").write_text(markdown(curve, crossing), encoding="utf-8")
    plot(curve, out / "curve.png")
    print(markdown(curve, crossing))
    print(f"wrote {out / 'curve.json'}, {out / 'curve.md'}, {out / 'curve.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
