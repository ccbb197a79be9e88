"""flare.curve: the margin over LoRA against MT quality, from study folders of several MT conditions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from flare import curve, report

REPO = Path(__file__).resolve().parents[1]
ORACLE, LEXICAL = REPO / "results" / "embedded-nusax", REPO / "results" / "embedded-nusax-lexical"


def test_the_committed_conditions_give_the_reports_differences_and_the_mts_measured_chrf(tmp_path):
    """On the committed oracle and lexical studies: the oracle is the human translation (chrF 100); the lexical
    level's chrF is the mean of its meta.json files over the four languages (test sets into English; English
    training set into the languages); FLARE − LoRA is the report's comparison (same mean, same interval)."""
    assert curve.main([str(ORACLE), str(LEXICAL), "--out", str(tmp_path)]) == 0
    out = json.loads((tmp_path / "curve.json").read_text())
    by = {(e["mt"], e["row"]): e for e in out["levels"]}
    assert by[("reference", "FLARE (add_relu)")]["chrf_test"] == 100.0
    langs = ("jav", "sun", "ace", "mad")
    back = json.loads((LEXICAL / "translations" / "translate-en-lexical" / "meta.json").read_text())["splits"]
    expected = np.mean([back[f"test_{lang}-en"]["against_human"]["chrf"] for lang in langs])
    lexical = by[("lexical", "FLARE (add_relu)")]
    assert lexical["chrf_test"] == pytest.approx(expected, abs=0.01) and 27 < lexical["chrf_test"] < 30
    assert lexical["chrf_train"] > lexical["chrf_test"]  # into the target languages: 32.6-39
    for root, key in ((ORACLE, "reference"), (LEXICAL, "lexical")):
        study = report.load_study(root)
        table = report.build_tables(report.load_results(root), study)[("nusax", "me5-small")]
        sig = report.compare(table, "test_f1", "nusax", ("flare", "add_relu"), ("translate-train", None))
        entry = by[(key, "FLARE (add_relu)")]["minus_lora"]
        assert entry["mean"] == round(100 * sig["mean"], 2) and entry["ci"] == [round(100 * v, 2) for v in sig["ci"]]
        assert entry["resampled"] == "seeds and items" and entry["pairs"] == len(table["langs"]) * len(study["seeds"])
        lora = [r["test_f1"] for (row, _, _), r in table["runs"].items() if row == ("translate-train", None)]
        assert len(lora) == len(table["langs"]) * len(study["seeds"]) == 4 * len(study["seeds"])  # 4 languages
        assert by[(key, "Translate-train LoRA")]["mean"] == round(100 * float(np.mean(lora)), 2)
        assert "minus_lora" not in by[(key, "Translate-train LoRA")]
    # two levels only: the sign change is bracketed by them, and the note says the line between is an assumption
    assert out["crossing_chrf_test"]["FLARE (add_relu)"]["between"] == [lexical["chrf_test"], 100.0]
    assert "an assumption" in (tmp_path / "curve.md").read_text() and (tmp_path / "curve.png").stat().st_size > 0


def test_crossings_interpolate_between_the_adjacent_levels():
    def level(chrf, diff, row="FLARE (add_relu)"):
        return {"row": row, "chrf_test": chrf, "minus_lora": {"mean": diff}}

    points = [level(100.0, 10.0), level(60.0, 2.0), level(40.0, -2.0), level(28.0, -4.0),
              level(100.0, 1.0, "Input-level fusion"), level(28.0, 0.5, "Input-level fusion")]
    crossing = curve.crossings(points)
    assert crossing["FLARE (add_relu)"] == {"chrf_test": 50.0, "between": [40.0, 60.0]}
    assert crossing["Input-level fusion"] is None  # never changes sign
    assert list(crossing) == ["FLARE (add_relu)", "Input-level fusion"]  # first appearance, not a set's hash order
    assert list(curve.crossings(points[4:] + points[:4])) == ["Input-level fusion", "FLARE (add_relu)"]


def test_a_folder_without_a_study_is_an_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert curve.main([str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 2
    assert "no study.json" in capsys.readouterr().err
