"""How much a study page's judgements owe to the bootstrap's random draw.

``flare.report`` judges each comparison at Holm p < 0.05 from one random draw of its bootstrap (draw 0). A p-value
near that threshold can fall on either side of it under another draw. This script recomputes every comparison of a
page (the same folders, so the same Holm family) with draws 0 to N-1 (``flare.report --bootstrap_seed``) and writes,
per comparison, how often each judgement came out and the range of its raw and Holm p-values:

    python scripts/bootstrap_draws.py results/embedded-nusax results/embedded-nusax-lexical \\
        results/embedded-nusax-equal-budget --draws 21 --out results/embedded-nusax-draws

writes ``OUT/draws.json`` and ``OUT/draws.md`` (the comparisons whose judgement is not the same in every draw, or
whose Holm p crosses 0.05 in some draw). The observed differences do not depend on the draw, only the p-values."""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from flare import report
from flare.files import atomic_write


def draws(roots: list[str], n: int) -> list[dict]:
    """Every comparison of the page of ``roots`` under bootstrap draws 0..n-1: its mean difference, the judgement
    of draw 0 (the committed reports'), the judgements' counts and the range of raw and Holm p-values."""
    page = report.load_page(roots)
    tables = [(root, table) for root, _, tables in page for _, table in sorted(tables.items())]
    seen: dict[tuple[str, str], dict] = {}
    for draw in range(n):
        report.redraw([table for _, table in tables], draw)
        for root, table in tables:
            for s in report.significance(table, report.METRIC[table["task"]], table["task"]):
                name = f"{report.row_label(s['row'])} − {report.row_label(s['baseline'])}"
                entry = seen.setdefault((root, name), dict(root=root, comparison=name, mean=s["mean"], p=[],
                                                           p_holm=[], judged=[]))
                entry["p"].append(s["p"])
                entry["p_holm"].append(s["p_holm"])
                entry["judged"].append(report.verdict(s))
    out = []
    for e in seen.values():
        out.append(dict(root=e["root"], comparison=e["comparison"], mean=e["mean"], judged_draw0=e["judged"][0],
                        judged=dict(Counter(e["judged"])), p_min=min(e["p"]), p_max=max(e["p"]),
                        p_holm_min=min(e["p_holm"]), p_holm_max=max(e["p_holm"])))
    return out


def markdown(rows: list[dict], n: int) -> str:
    unsettled = [r for r in rows if len(r["judged"]) > 1 or r["p_holm_min"] < 0.05 <= r["p_holm_max"]]
    lines = [f"Judgements over {n} bootstrap draws (0 to {n - 1}; draw 0 is the committed reports'), "
             f"{report.N_BOOTSTRAP} resamples each; {len(rows)} comparisons, {len(unsettled)} of them not judged "
             "alike in every draw:", "",
             "| folder | comparison | mean difference | judged in draw 0 | judged over the draws | raw p | Holm p |",
             "|---|---|---|---|---|---|---|"]
    for r in unsettled:
        counts = ", ".join(f"{k}: {v}" for k, v in sorted(r["judged"].items()))
        lines.append(f"| {r['root']} | {r['comparison']} | {100 * r['mean']:+.2f} | {r['judged_draw0']} | {counts} | "
                     f"{r['p_min']:.2g}-{r['p_max']:.2g} | {r['p_holm_min']:.2g}-{r['p_holm_max']:.2g} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="A study page's judgements under several random draws of its bootstrap "
                                            "(see the module docstring).")
    p.add_argument("roots", nargs="+", metavar="root", help="the results folders of one page, as flare.report takes")
    p.add_argument("--draws", type=int, default=21, help="draws 0 to N-1 (default 21)")
    p.add_argument("--out", required=True, help="folder for draws.json and draws.md")
    args = p.parse_args(argv)
    if args.draws < 2:
        print("error: --draws must be at least 2 (draw 0 alone is the committed report)", file=sys.stderr)
        return 2
    try:
        rows = draws(args.roots, args.draws)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(roots=args.roots, draws=args.draws, n_boot=report.N_BOOTSTRAP,
                command="python scripts/bootstrap_draws.py " + " ".join(args.roots) + f" --draws {args.draws} "
                        f"--out {args.out}", comparisons=rows)
    atomic_write(out / "draws.json", lambda f: f.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8"))
    text = markdown(rows, args.draws)
    atomic_write(out / "draws.md", lambda f: f.write_text(text, encoding="utf-8"))
    print(text)
    print(f"wrote {out / 'draws.json'}, {out / 'draws.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
