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


def _predicted_run(root: Path, mode, lang, seed, preds, golds, fn=None, ids=None, **extra):
    """A run with a predictions file; its recorded metrics are those of the predictions."""
    from flare.metrics import classification_metrics

    m = classification_metrics(preds, golds, 3)
    _run(root, mode, lang, seed, m["f1"], fn=fn, acc=m["accuracy"], **extra)
    d = root / f"nusax-en-{lang}-m-{seed}-{mode}-{fn}"
    ids = ids or [str(i) for i in range(len(preds))]
    name = "predictions_zs.jsonl" if mode == "zero-shot" else "predictions_test.jsonl"
    (d / name).write_text("".join(json.dumps({"id": i, "prediction": int(p), "gold": int(g)}) + "\n"
                                  for i, p, g in zip(ids, preds, golds)))


def test_holm_adjustment_known_answer():
    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> monotone: 0.02, 0.03, 0.06, 0.06
    assert report.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert report.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert report.holm([0.02]) == pytest.approx([0.02]) and report.holm([]) == []


def test_weighted_item_statistics_reproduce_the_recorded_metrics():
    """With every item drawn once, the per-item statistics give exactly sklearn's macro-F1 and the accuracy."""
    from flare.metrics import classification_metrics

    rng = np.random.default_rng(3)
    golds = rng.integers(0, 3, 400)
    preds = np.where(rng.random(400) < 0.7, golds, rng.integers(0, 3, 400))
    preds[:5] = -1  # unparseable: wrong for their gold class
    recs = [{"id": str(i), "prediction": int(p), "gold": int(g)} for i, (p, g) in enumerate(zip(preds, golds))]
    ids = [r["id"] for r in recs]
    expected = classification_metrics(list(preds), list(golds), 3)
    for metric, key in (("test_f1", "f1"), ("test_accuracy", "accuracy")):
        stats = report.item_statistics("nusax", metric, recs, ids)
        assert float(report.metric_from_sums(metric, stats.sum(axis=0), 400)) == pytest.approx(expected[key],
                                                                                                abs=1e-12)


def test_item_bootstrap_known_answer_and_shared_draw():
    """Row right on every item, baseline wrong on the same 20 of 400 items in every language: accuracy difference
    0.05, whose item-level standard error is sqrt(0.05 * 0.95 / 400) = 0.0109. The draw of items is shared by every
    language, so four identical languages give the interval of one (pairs resampled as if independent would
    shrink it by half, and resampling the identical pairs would give no width at all)."""
    golds = [i % 3 for i in range(400)]
    base = [(g + 1) % 3 if i < 20 else g for i, g in enumerate(golds)]
    one = report.item_bootstrap("nusax", "test_accuracy", [(_recs(golds, golds), _recs(base, golds))])
    four = report.item_bootstrap("nusax", "test_accuracy", [(_recs(golds, golds), _recs(base, golds))] * 4)
    assert one["mean"] == pytest.approx(0.05) and one["items"] == 400
    se = math.sqrt(0.05 * 0.95 / 400)
    assert one["ci"][0] == pytest.approx(0.05 - 1.96 * se, abs=0.004)
    assert one["ci"][1] == pytest.approx(0.05 + 1.96 * se, abs=0.004)
    assert four["ci"] == pytest.approx(one["ci"]) and one["p"] == pytest.approx(2 / 10001)
    # no difference: a zero-width interval at 0 and p = 1
    same = report.item_bootstrap("nusax", "test_f1", [(_recs(base, golds), _recs(base, golds))])
    assert same["mean"] == 0 and same["ci"] == (0.0, 0.0) and same["p"] == 1.0
    # items are matched by id, not by line: a shuffled file is the same run
    order = list(reversed(range(400)))
    shuffled = [_recs(golds, golds)[i] for i in order]
    assert report.item_bootstrap("nusax", "test_accuracy", [(shuffled, _recs(base, golds))]) == one


def test_a_difference_that_flips_sign_between_seeds_is_not_significant():
    """Seed-level inference (issue 29): three training seeds, 400 items. Seeds 1 and 2: the row is right on 40 items
    more than the baseline; seed 3: on 40 items fewer. Every seed's difference is far outside item noise, so the
    items-only bootstrap (these trained models) calls the +3.3-point mean significant at its floor; resampling the
    seeds too, a re-run of training can give any sign: about 7 draws in 27 put seed 3 at least twice, so p is far
    above 0.05. The same differences in every seed are significant either way; an identical row is tied."""
    golds = [i % 3 for i in range(400)]
    wrong = lambda k: [(g + 1) % 3 if i < k else g for i, g in enumerate(golds)]  # noqa: E731 - first k items wrong
    better = (_recs(wrong(20), golds), _recs(wrong(60), golds))
    worse = (better[1], better[0])
    flips = report.item_bootstrap("nusax", "test_accuracy", [better, better, worse], groups=[1, 2, 3])
    assert flips["mean"] == pytest.approx(0.1 / 3) and flips["seeds"] == 3
    assert flips["p"] == pytest.approx(report.p_floor()) and flips["ci"][0] > 0  # items only: "significant"
    assert flips["p_seeds"] > 0.3 and flips["ci_seeds"][0] < 0 < flips["ci_seeds"][1]  # seeds too: no evidence
    steady = report.item_bootstrap("nusax", "test_accuracy", [better] * 3, groups=[1, 2, 3])
    assert steady["p_seeds"] == pytest.approx(report.p_floor()) and steady["ci_seeds"][0] > 0
    same = report.item_bootstrap("nusax", "test_accuracy", [(better[0], better[0])] * 3, groups=[1, 2, 3])
    assert same["p_seeds"] == same["p"] == 1.0 and same["ci_seeds"] == (0.0, 0.0)
    # fewer than 3 seeds: no seed-level interval (the report says the seed variation is not in it)
    assert "p_seeds" not in report.item_bootstrap("nusax", "test_accuracy", [better, worse], groups=[1, 2])


def test_p_values_at_the_bootstrap_floor_print_as_a_bound():
    floor = report.p_floor()
    assert floor == pytest.approx(2 / 10001)
    assert report.fmt_p(floor) == "< 0.0002" and report.fmt_p(0.0123) == "0.012" and report.fmt_p(1.0) == "1"
    assert report.fmt_holm({"p": floor, "p_holm": 15 * floor}) == "< 0.003"
    assert report.fmt_holm({"p": 0.01, "p_holm": 0.04}) == "0.04"


def _recs(preds, golds):
    return [{"id": str(i), "prediction": p, "gold": g} for i, (p, g) in enumerate(zip(preds, golds))]


def test_flare_vs_baselines_item_bootstrap_and_holm_in_the_table(tmp_path):
    root = tmp_path / "res"
    rng = np.random.default_rng(1)
    golds = list(rng.integers(0, 3, 200))
    for lang in ("jav", "sun", "ace"):
        for seed in (1, 2, 3):
            lora = [g if rng.random() < 0.6 else (g + 1) % 3 for g in golds]
            _predicted_run(root, "translate-train", lang, seed, lora, golds)
            better = [g if rng.random() < 0.85 else p for g, p in zip(golds, lora)]
            _predicted_run(root, "flare", lang, seed, better, golds, fn="add_relu")
            # input fusion: FLARE with 4 right items made wrong and 4 wrong ones made right (as good, other items)
            right = [i for i, (p, g) in enumerate(zip(better, golds)) if p == g][:4]
            wrong = [i for i, (p, g) in enumerate(zip(better, golds)) if p != g][:4]
            swapped = [(g + 1) % 3 if i in right else g if i in wrong else p
                       for i, (p, g) in enumerate(zip(better, golds))]
            _predicted_run(root, "input-fusion", lang, seed, swapped, golds)
    table = report.build_tables(report.load_results(root))[("nusax", "m")]
    rows = {(s["row"], s["baseline"]): s for s in report.significance(table, "test_f1")}
    vs_lora = rows[(("flare", "add_relu"), ("translate-train", None))]
    diffs = [d for _, _, d in report.paired(table, "test_f1", ("flare", "add_relu"), ("translate-train", None))]
    assert vs_lora["n"] == 9 and vs_lora["wins"] == 9 and vs_lora["mean"] == pytest.approx(np.mean(diffs))
    assert vs_lora["ci"][0] > 0.1 and vs_lora["p_holm"] == pytest.approx(2 * vs_lora["p"])  # two comparisons
    vs_input = rows[(("flare", "add_relu"), ("input-fusion", None))]
    assert vs_input["ci"][0] < 0 < vs_input["ci"][1] and vs_input["p_holm"] > 0.05
    md = report.markdown("nusax", "m", table)
    assert "| FLARE (add_relu) − Translate-train LoRA | 9 |" in md and "| better |" in md
    assert "| FLARE (add_relu) − Input-level fusion | 9 |" in md and "no evidence of a difference" in md
    assert "mean over seeds [1, 2, 3], ± std over them" in md and " ± " in md.split("| ace |")[1].split("\n")[2]
    # the accuracy table follows the macro-F1 table
    assert md.index("· macro-F1 (") < md.index("· accuracy (")


def test_xmixup_rows_sit_between_lora_and_input_fusion_and_are_compared_with_both_sides(tmp_path):
    """X-Mixup is labelled as in the paper's tables, placed after translate-train LoRA, compared with LoRA, and FLARE
    rows are compared with it (one Holm family)."""
    root = tmp_path / "res"
    rng = np.random.default_rng(2)
    golds = list(rng.integers(0, 3, 120))
    for lang in ("jav", "sun"):
        for seed in (1, 2, 3):
            lora = [g if rng.random() < 0.6 else (g + 1) % 3 for g in golds]
            _predicted_run(root, "translate-train", lang, seed, lora, golds)
            _predicted_run(root, "xmixup", lang, seed, [g if rng.random() < 0.7 else p for g, p in zip(golds, lora)],
                           golds)
            _predicted_run(root, "input-fusion", lang, seed, lora, golds)
            _predicted_run(root, "flare", lang, seed, [g if rng.random() < 0.8 else p for g, p in zip(golds, lora)],
                           golds, fn="add_relu")
    table = report.build_tables(report.load_results(root))[("nusax", "m")]
    assert [r[0] for r in table["rows"]] == ["translate-train", "xmixup", "input-fusion", "flare"]
    pairs = {(s["row"], s["baseline"]) for s in report.significance(table, "test_f1")}
    assert pairs == {(("xmixup", None), ("translate-train", None)), (("flare", "add_relu"), ("translate-train", None)),
                     (("flare", "add_relu"), ("xmixup", None)), (("flare", "add_relu"), ("input-fusion", None))}
    md = report.markdown("nusax", "m", table)
    assert "| X-Mixup |" in md and md.index("| Translate-train LoRA |") < md.index("| X-Mixup |") < md.index(
        "| Input-level fusion |")
    assert "| X-Mixup − Translate-train LoRA | 6 |" in md and "| FLARE (add_relu) − X-Mixup | 6 |" in md


def test_translate_test_with_one_input_for_every_language_is_shown_apart(tmp_path):
    """Translate-test on the human English is the English model on one test set: identical predictions in every
    language; it is shown as one value, not as a row of languages (nor averaged as four results). With per-language
    MT its predictions differ and it is a row like the others. Fewer than 3 seeds: means without ±."""
    golds = [i % 3 for i in range(60)]
    for root, varies in ((tmp_path / "oracle", False), (tmp_path / "mt", True)):
        for k, lang in enumerate(("jav", "sun")):
            for seed in (1, 2):
                preds = [(g + 1) % 3 if i < 10 + (k * 5 if varies else 0) else g for i, g in enumerate(golds)]
                _predicted_run(root, "translate-test", lang, seed, preds, golds)
                _predicted_run(root, "translate-train", lang, seed, golds, golds)
        table = report.build_tables(report.load_results(root))[("nusax", "m")]
        md = report.markdown("nusax", "m", table)
        first_table = md.split("| mode |")[1].split("\n\n")[0]
        assert ("| Translate-test |" in first_table) == varies
        assert ("Translate-test: 83.33. Not a row of the table" in md) != varies
        assert "no ± with fewer than 3 seeds" in md and " ± " not in first_table
        report.write_report({("nusax", "m"): table}, tmp_path / f"rep-{varies}")


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
    assert len(missing) == 10 and "| Zero-shot | 60.00 ± 0.00 | – | – |" in md  # 3 seeds: ± shown
    assert "| Translate-train LoRA | 296,451 | 3 | 11 [10–14] | 4 [3–5] | 3.0 [3.0–3.0] |" in md
    assert "| Zero-shot | 0 | – (no training) | – | – | 2.0 [2.0–2.0] |" in md
    assert "| Translate-train LoRA | 81.00 | 84.00 | 84.00 | 3 |" in md
    assert "| FLARE (add_relu) | 80.00 | 82.00 | 85.00 | 6 |" in md


def test_a_study_compare_with_replaces_the_baselines(tmp_path):
    """An equal-budget ablation of the fusion functions (study.json ``compare_with``: FLARE add_relu): every other
    function is compared with add_relu (not with itself, nor with LoRA, which the folder lacks), Holm over those."""
    root = tmp_path / "ablation"
    rng = np.random.default_rng(2)
    golds = list(rng.integers(0, 3, 150))
    for lang in ("jav", "sun"):
        for seed in (1, 2, 3):
            best = [g if rng.random() < 0.9 else (g + 1) % 3 for g in golds]
            _predicted_run(root, "flare", lang, seed, best, golds, fn="add_relu")
            worse = [(g + 1) % 3 if i % 3 == 0 else p for i, (g, p) in enumerate(zip(golds, best))]
            _predicted_run(root, "flare", lang, seed, worse, golds, fn="cross-attention")
            _predicted_run(root, "flare", lang, seed, best, golds, fn="mul")
    (root / "study.json").write_text(json.dumps({"task": "nusax", "model": "m", "languages": ["jav", "sun"],
                                                 "seeds": [1, 2, 3], "selection": None, "equal_budget": 3,
                                                 "compare_with": [["flare", "add_relu"]]}))
    study = report.load_study(root)
    table = report.build_tables(report.load_results(root), study)[("nusax", "m")]
    rows = {(s["row"], s["baseline"]): s for s in report.significance(table, "test_f1")}
    base = ("flare", "add_relu")
    assert set(rows) == {(("flare", "cross-attention"), base), (("flare", "mul"), base)}
    xattn, mul = rows[(("flare", "cross-attention"), base)], rows[(("flare", "mul"), base)]
    assert xattn["losses"] == 6 and xattn["ci"][1] < 0 and xattn["p_holm"] < 0.05  # a third of the items made wrong
    assert mul["mean"] == 0 and mul["ties"] == 6 and mul["p_holm"] == 1  # the same predictions
    md = report.markdown("nusax", "m", table, study)
    assert "| FLARE (cross-attention) − FLARE (add_relu) | 6 |" in md and "Translate-train LoRA" not in md
    # without compare_with, the same folder has no baseline rows, so no comparisons
    assert report.significance(report.build_tables(report.load_results(root))[("nusax", "m")], "test_f1") == []


def test_readme_block_is_replaced_between_its_markers(tmp_path):
    root = tmp_path / "res"
    _run(root, "translate-train", "jav", 1, 0.7)
    _run(root, "flare", "jav", 1, 0.75, fn="add_relu")
    readme = tmp_path / "README.md"
    begin = report.README_BEGIN.format(root=str(root), command=report.page_command([str(root)], str(readme)))
    end = report.README_END.format(root=str(root))
    readme.write_text(f"# title\n\ntext before\n{begin}\nold table\n{end}\ntext after\n")
    assert report.main([str(root), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old table" not in text and text.startswith("# title\n\ntext before\n") and text.endswith("text after\n")
    assert "| FLARE (add_relu) | 75.00 | 75.00 |" in text and "(res/report/nusax-m.png)" in text  # relative link
    assert report.main([str(root), "--readme", str(readme)]) == 0 and readme.read_text() == text  # idempotent
    readme.write_text("no markers\n")
    assert report.main([str(root), "--readme", str(readme)]) == 2 and readme.read_text() == "no markers\n"


STUDY_ROOTS = ["results/embedded-nusax", "results/embedded-nusax-lexical", "results/embedded-nusax-equal-budget"]


def test_the_study_page_is_what_the_report_makes_of_the_committed_results():
    """docs/study.md (both MT conditions and the equal-budget ablation, one page: Holm over all its comparisons):
    every block regenerated from the committed results, exactly, by the command its marker names."""
    repo = Path(__file__).resolve().parents[1]
    page = repo / "docs" / "study.md"
    text = page.read_text()
    loaded = report.load_page([str(repo / root) for root in STUDY_ROOTS])
    for root, (_, study, tables) in zip(STUDY_ROOTS, loaded):
        block = report.readme_block(tables, study, root, repo / root / "report", page=page)
        begin = report.README_BEGIN.format(root=root, command=report.page_command(STUDY_ROOTS, "docs/study.md"))
        end = report.README_END.format(root=root)
        assert text.split(begin, 1)[1].split(end, 1)[0] == "\n" + block, root
    family = {s["holm_family"] for _, _, tables in loaded for t in tables.values()
              for s in report.significance(t, "test_f1")}
    # 13 oracle (8 + X-Mixup against LoRA + 4 FLARE functions against X-Mixup), 7 lexical (4 + 1 + 2) and 3
    # equal-budget comparisons, corrected together
    assert family == {23}


def test_a_report_of_some_seeds(tmp_path, capsys):
    """--seeds: the tables of those seeds only (to set a condition beside one with fewer seeds), nothing counted as
    missing for the others, written apart from the full report; not into a --readme page."""
    repo = Path(__file__).resolve().parents[1]
    root = str(repo / "results" / "embedded-nusax-lexical")
    assert report.main([root, "--seeds", "1", "--out", str(tmp_path / "one")]) == 0
    md = (tmp_path / "one" / "nusax-me5-small.md").read_text()
    assert "mean over seeds [1]" in md and "seed 2" not in md and "seed 3" not in md
    assert "fewer than 3 seeds" in md  # the interval resamples items only, and says so
    assert report.main([root, "--seeds", "1", "--readme", str(tmp_path / "page.md")]) == 2
    assert "--seeds makes a partial report" in capsys.readouterr().err


def test_a_study_names_languages_as_given_and_trains_in_one_of_them():
    """TyDiQA's study declares its languages as its command took them ("id", "te") while the runs record the
    canonical codes ("ind", "tel"): one column each, not two; with ``train_language`` the training rows are expected
    in that language only (the zero-shot rows everywhere)."""
    def res(mode, lang):
        return {"task": "tydiqa", "plm_name": "m", "mode": mode, "fusion_fn": None, "target_lang": lang,
                "source_lang": "en", "seed": 1, "test_f1": 0.5}

    results = [res("zero-shot", "ind"), res("zero-shot", "tel"), res("translate-train", "ind")]
    study = {"task": "tydiqa", "model": "m", "languages": ["id", "te"], "seeds": [1, 2], "train_language": "id"}
    table = report.build_tables(results, study)[("tydiqa", "m")]
    assert table["langs"] == ["ind", "tel"]
    assert sorted(table["missing"]) == ["Translate-train LoRA / ind / seed 2", "Zero-shot / ind / seed 2",
                                        "Zero-shot / tel / seed 2"]
    table = report.build_tables(results, {**study, "train_language": None})[("tydiqa", "m")]
    assert "Translate-train LoRA / tel / seed 1" in table["missing"]  # a study that trains everywhere


def test_the_tydiqa_section_is_what_the_report_makes_of_its_committed_results():
    """docs/study.md's TyDiQA block (a page command of its own: another task, its own Holm family) is regenerated
    exactly from results/embedded-tydiqa by the command its marker names."""
    repo = Path(__file__).resolve().parents[1]
    page, root = repo / "docs" / "study.md", "results/embedded-tydiqa"
    ((_, study, tables),) = report.load_page([str(repo / root)])
    block = report.readme_block(tables, study, root, repo / root / "report", page=page)
    begin = report.README_BEGIN.format(root=root, command=report.page_command([root], "docs/study.md"))
    assert page.read_text().split(begin, 1)[1].split(report.README_END.format(root=root), 1)[0] == "\n" + block
    assert tables[("tydiqa", "me5-small")]["langs"] == ["ar", "ben", "fi", "ind", "ko", "ru", "sw", "tel"]


def test_another_bootstrap_draw_moves_the_p_values_not_the_differences(tmp_path, capsys):
    """--bootstrap_seed: the same tables and mean differences from another random draw of the bootstrap (to see how
    much a p-value near a threshold owes to the draw), said in the note, written apart; not into a --readme page."""
    repo = Path(__file__).resolve().parents[1]
    root = str(repo / "results" / "embedded-nusax-lexical")

    def comparisons(folder):
        md = (folder / "nusax-me5-small.md").read_text()
        rows = [line.split(" | ") for line in md.splitlines()
                if line.startswith("| ") and " − " in line.split(" | ")[0]]
        return md, {r[0]: (r[2], r[-3]) for r in rows}  # comparison: (mean difference, p)

    assert report.main([root, "--seeds", "1", "2", "3", "--out", str(tmp_path / "draw0")]) == 0
    assert report.main([root, "--seeds", "1", "2", "3", "--bootstrap_seed", "3",
                        "--out", str(tmp_path / "draw3")]) == 0
    md0, first = comparisons(tmp_path / "draw0")
    md3, other = comparisons(tmp_path / "draw3")
    assert len(first) == 7 and first.keys() == other.keys()
    assert all(first[k][0] == other[k][0] for k in first)  # the observed differences do not depend on the draw
    assert any(first[k][1] != other[k][1] for k in first)  # the p-values do
    assert "random draw 3 of the bootstrap" in md3 and "random draw" not in md0
    assert report.main([root, "--bootstrap_seed", "3", "--readme", str(tmp_path / "page.md")]) == 2
    assert "--bootstrap_seed draws other bootstrap samples" in capsys.readouterr().err
