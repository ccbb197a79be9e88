"""flare.report beyond the tables: the paired significance analysis, the cost table and a study folder's budget."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from flare import report


def _run(root: Path, mode, lang, seed, f1, fn=None, acc=None, **extra):
    d = root / f"nusax-en-{lang}-m-{seed}-{mode}-{fn}"
    d.mkdir(parents=True)
    res = {"task": "nusax", "plm_name": "m", "mode": mode, "fusion_fn": fn, "target_lang": lang, "source_lang": "en",
           "seed": seed, "test_f1": f1, **extra}
    if acc is not None:
        res["test_accuracy"] = acc
    (d / ("results_zs.json" if mode == "zero-shot" else "results_test.json")).write_text(json.dumps(res))


def test_sign_test_is_the_exact_two_sided_binomial():
    assert report.sign_test(8, 0) == pytest.approx(2 / 2 ** 8)
    assert report.sign_test(0, 8) == pytest.approx(2 / 2 ** 8)
    assert report.sign_test(5, 5) == 1.0 and report.sign_test(0, 0) == 1.0
    # 9 wins, 3 losses: P(X <= 3) for Binomial(12, 1/2), doubled
    assert report.sign_test(9, 3) == pytest.approx(2 * sum(math.comb(12, i) for i in range(4)) / 4096)
    from scipy.stats import binomtest

    for w, losses in ((7, 2), (3, 10), (6, 6), (1, 0)):
        assert report.sign_test(w, losses) == pytest.approx(binomtest(w, w + losses, 0.5).pvalue)


def test_bootstrap_interval_is_reproducible_and_brackets_the_mean():
    diffs = [0.02, 0.01, -0.005, 0.03, 0.015, 0.0, 0.025, 0.01]
    lo, hi = report.bootstrap_ci(diffs)
    assert (lo, hi) == report.bootstrap_ci(diffs)  # fixed seed: the same report every time
    assert lo < np.mean(diffs) < hi and lo > -0.005 and hi < 0.03
    assert report.bootstrap_ci([0.01] * 5) == pytest.approx((0.01, 0.01))  # no spread, no width
    # the interval narrows as the pairs grow (same spread, 4x the pairs -> about half the width)
    lo4, hi4 = report.bootstrap_ci(diffs * 4)
    assert (hi4 - lo4) < 0.7 * (hi - lo)


def test_flare_vs_baselines_paired_per_language_and_seed(tmp_path):
    root = tmp_path / "res"
    rng = np.random.default_rng(1)
    for lang in ("jav", "sun", "ace"):
        for seed in (1, 2, 3, 4):
            base = 0.6 + 0.05 * rng.random()
            _run(root, "translate-train", lang, seed, base, acc=base + 0.01)
            _run(root, "flare", lang, seed, base + 0.02 + 0.01 * rng.random(), fn="add_relu", acc=base)
            # input fusion: as good as FLARE on average, up and down
            _run(root, "input-fusion", lang, seed, base + 0.025 + (0.03 if seed % 2 else -0.03))
    _run(root, "flare", "jav", 1, 0.5, fn="mul")  # one pair only: still reported, with n = 1
    table = report.build_tables(report.load_results(root))[("nusax", "m")]
    rows = {(s["row"], s["baseline"]): s for s in report.significance(table, "test_f1")}
    vs_lora = rows[(("flare", "add_relu"), ("translate-train", None))]
    assert vs_lora["n"] == 12 and vs_lora["wins"] == 12 and vs_lora["losses"] == 0
    assert vs_lora["p_sign"] == pytest.approx(2 / 2 ** 12)
    assert 0.02 <= vs_lora["mean"] <= 0.03 and vs_lora["ci"][0] > 0.02 and vs_lora["ci"][1] < 0.03
    diffs = [d for _, _, d in report.paired(table, "test_f1", ("flare", "add_relu"), ("translate-train", None))]
    assert vs_lora["mean"] == pytest.approx(np.mean(diffs))
    vs_input = rows[(("flare", "add_relu"), ("input-fusion", None))]
    assert vs_input["n"] == 12 and vs_input["ci"][0] < 0 < vs_input["ci"][1]
    assert rows[(("flare", "mul"), ("translate-train", None))]["n"] == 1
    md = report.markdown("nusax", "m", table)
    assert "| FLARE (add_relu) − Translate-train LoRA | 12 |" in md and "better (interval above 0)" in md
    assert "| FLARE (add_relu) − Input-level fusion | 12 |" in md and "not distinguishable" in md
    # the accuracy table follows the macro-F1 table; rows without accuracy show a dash
    assert md.index("· macro-F1 (") < md.index("· accuracy (")
    assert "| Input-level fusion | – | – | – | – |" in md.split("· accuracy (")[1]


def test_cost_table_and_study_budget(tmp_path):
    root = tmp_path / "study"
    for seed, t in ((1, 10.0), (2, 14.0), (3, 11.0)):
        _run(root / "runs", "translate-train", "jav", seed, 0.7, param_train=296451, train_runtime=t,
             test_runtime=3.0, args={"epochs": 3})
        _run(root / "runs", "zero-shot", "jav", seed, 0.6, param_train=0, test_runtime=2.0, args={"epochs": 1})
    # a budget-selection run on another language: not a row of the study's tables
    _run(root / "selection" / "epochs-6", "translate-train", "ind", 1, 0.9, param_train=296451, train_runtime=50.0)
    (root / "study.json").write_text(json.dumps({"task": "nusax", "model": "m", "languages": ["jav", "sun"],
                                                 "seeds": [1, 2, 3, 4], "selection": {
        "folder": "selection", "language": "ind", "seed": 1, "budgets": [1, 3, 6],
        "metric": "validation macro-F1 of the best checkpoint",
        "chosen": {"lora": {"epochs": 3, "validation": {"1": 0.81, "3": 0.84, "6": 0.84}},
                   "flare/add_relu": {"epochs": 6, "validation": {"1": 0.8, "3": 0.82, "6": 0.85}}}}}))
    assert report.main([str(root), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "nusax-m.md").read_text()
    assert md.count("| mode | jav | sun | avg |") == 1 and "ind |" not in md
    # an unfinished study lists what its study.json declares but has no results for: seed 4, and Sundanese
    missing = md.split("Missing for a full table (10): ")[1].strip().split("; ")
    assert "Translate-train LoRA / jav / seed 4" in missing and "Zero-shot / sun / seed 1" in missing
    assert len(missing) == 10 and "| Zero-shot | 60.00 ± 0.00 | – | – |" in md
    assert "| Translate-train LoRA | 296,451 | 3 | 11 [10–14] | 3.0 [3.0–3.0] |" in md
    assert "| Zero-shot | 0 | – (no training) | – | 2.0 [2.0–2.0] |" in md
    assert "| Translate-train LoRA | 81.00 | 84.00 | 84.00 | 3 |" in md
    assert "| FLARE (add_relu) | 80.00 | 82.00 | 85.00 | 6 |" in md


def test_readme_block_is_replaced_between_its_markers(tmp_path):
    root = tmp_path / "res"
    _run(root, "translate-train", "jav", 1, 0.7)
    _run(root, "flare", "jav", 1, 0.75, fn="add_relu")
    readme = tmp_path / "README.md"
    begin, end = report.README_BEGIN.format(root=str(root)), report.README_END.format(root=str(root))
    readme.write_text(f"# title\n\ntext before\n{begin}\nold table\n{end}\ntext after\n")
    assert report.main([str(root), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old table" not in text and text.startswith("# title\n\ntext before\n") and text.endswith("text after\n")
    assert "| FLARE (add_relu) | 75.00 | 75.00 |" in text and "nusax-m.png)" in text
    assert report.main([str(root), "--readme", str(readme)]) == 0 and readme.read_text() == text  # idempotent
    readme.write_text("no markers\n")
    assert report.main([str(root), "--readme", str(readme)]) == 2 and readme.read_text() == "no markers\n"


def test_readme_results_section_is_what_the_report_makes_of_the_committed_results():
    """README "Results on the embedded model": regenerated from results/embedded-nusax, exactly."""
    repo = Path(__file__).resolve().parents[1]
    root = "results/embedded-nusax"
    results = repo / root
    study = report.load_study(results)
    tables = report.build_tables(report.load_results(results), study)
    block = report.readme_block(tables, study, root, Path(root) / "report")
    text = (repo / "README.md").read_text()
    begin, end = report.README_BEGIN.format(root=root), report.README_END.format(root=root)
    assert text.split(begin, 1)[1].split(end, 1)[0] == "\n" + block
