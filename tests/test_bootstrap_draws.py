"""scripts/bootstrap_draws.py: a page's judgements under several random draws of the bootstrap, on the committed
lexical study (real predictions)."""
from __future__ import annotations

import json
from pathlib import Path

from flare import report, sweep

REPO = Path(__file__).resolve().parents[1]


def load_script():
    return sweep.load_script("scripts/bootstrap_draws.py")


def test_draw_zero_is_the_committed_report_and_other_draws_move_only_p(tmp_path, capsys):
    script = load_script()
    root = str(REPO / "results" / "embedded-nusax-lexical")
    assert script.main([root, "--draws", "3", "--out", str(tmp_path)]) == 0
    meta = json.loads((tmp_path / "draws.json").read_text())
    assert meta["draws"] == 3 and meta["n_boot"] == report.N_BOOTSTRAP
    rows = {r["comparison"]: r for r in meta["comparisons"]}
    # the same comparisons, differences and draw-0 judgements as flare.report on this folder alone
    (_, _, tables), = report.load_page([root])
    table, = tables.values()
    committed = report.significance(table, "test_f1", "nusax")
    assert len(rows) == len(committed) == 7
    for s in committed:
        r = rows[f"{report.row_label(s['row'])} − {report.row_label(s['baseline'])}"]
        assert r["mean"] == s["mean"] and r["judged_draw0"] == report.verdict(s)
        assert r["p_min"] <= s["p"] <= r["p_max"] and sum(r["judged"].values()) == 3
    assert any(r["p_min"] < r["p_max"] for r in rows.values())  # another draw, other p-values
    assert "Judgements over 3 bootstrap draws" in (tmp_path / "draws.md").read_text()
    assert script.main([root, "--draws", "1", "--out", str(tmp_path / "no")]) == 2
    assert "--draws must be at least 2" in capsys.readouterr().err and not (tmp_path / "no").exists()
