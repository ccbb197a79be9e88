"""flare.crossed and ``embedded_nusax_study.py --crossed``: train-side against test-side MT (issue 29, item 4)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_study_script import load_study_script

from flare import crossed, report

N, LANGS, SEEDS = 200, ("jav", "sun"), (1, 2, 3)


def _run(root: Path, name: str, mode: str, fn, lang: str, seed: int, preds, golds, **extra) -> None:
    from flare.metrics import classification_metrics

    d = root / name
    d.mkdir(parents=True)
    m = classification_metrics(list(preds), list(golds), 3)
    res = {"task": "nusax", "plm_name": "m", "mode": mode, "fusion_fn": fn, "target_lang": lang, "source_lang": "en",
           "seed": seed, "test_f1": m["f1"], "test_accuracy": m["accuracy"], **extra}
    (d / "results_test.json").write_text(json.dumps(res))
    (d / "predictions_test.jsonl").write_text("".join(json.dumps({"id": str(i), "prediction": int(p), "gold": int(g)})
                                                      + "\n" for i, (p, g) in enumerate(zip(preds, golds))))


def _study(root: Path, mt: str) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "study.json").write_text(json.dumps({"task": "nusax", "model": "m", "languages": list(LANGS),
                                                 "seeds": list(SEEDS), "translations": mt}))


@pytest.fixture
def folders(tmp_path):
    """A known world: FLARE is perfect wherever it reads the GOLD English, whatever it was trained on, and makes
    exactly LoRA's mistakes wherever it reads the MT's English: the test side is everything, the train side
    nothing."""
    rng = np.random.default_rng(0)
    golds = rng.integers(0, 3, N)
    oracle, lexical, cross = tmp_path / "oracle", tmp_path / "lexical", tmp_path / "crossed"
    _study(oracle, "reference")
    _study(lexical, "lexical")
    for lang in LANGS:
        for seed in SEEDS:
            lora = {mt: np.where(rng.random(N) < acc, golds, rng.integers(0, 3, N))
                    for mt, acc in (("reference", 0.75), ("lexical", 0.7))}
            for root, mt in ((oracle, "reference"), (lexical, "lexical")):
                ttrain = f"nusax-en-{lang}-m-{seed}-lora-8-translate-{lang}-{mt}-ttrain"
                _run(root, ttrain, "translate-train", None, lang, seed, lora[mt], golds)
                flare = f"nusax-en-{lang}-m-{seed}-lora-8_add_relu-translate-{lang}-{mt}-ttrain"
                _run(root, flare, "flare", "add_relu", lang, seed, golds if mt == "reference" else lora["lexical"],
                     golds)
                other = "lexical" if mt == "reference" else "reference"
                preds = lora["reference"] if mt == "reference" else golds  # the other test English
                _run(cross, f"{flare}-evaltest-translate-{lang}-{other}", "flare", "add_relu", lang, seed, preds,
                     golds, evaluated_run=f"checkpoints/x/{flare}",
                     test_translations=f"checkpoints/translations/nusax/translate-{lang}-{other}")
    return oracle, lexical, cross


def test_the_four_cells_and_both_sides_on_a_known_world(folders):
    oracle, lexical, cross = folders
    assert crossed.main([str(oracle), str(lexical), str(cross)]) == 0
    out = json.loads((cross / "crossed.json").read_text())
    cells = {(c["train"], c["test_english"]): c for c in out["cells"] if c["mode"] == "flare"}
    assert set(cells) == {("human", "gold"), ("human", "mt"), ("mt", "gold"), ("mt", "mt")}
    assert cells[("human", "gold")]["mean"] == cells[("mt", "gold")]["mean"] == 100.0
    assert cells[("human", "gold")]["runs"] == len(LANGS) * len(SEEDS)
    # FLARE reading the MT's English makes LoRA's mistakes: its difference to LoRA trained on the same text is 0
    for cell in (("human", "mt"), ("mt", "mt")):
        assert cells[cell]["minus_lora"]["mean"] == 0.0 and cells[cell]["minus_lora"]["ci"] == [0.0, 0.0]
    assert cells[("human", "gold")]["minus_lora"]["ci"][0] > 0
    effects = {(e["effect"], e["held_fixed"]): e for e in out["effects"]}
    assert len(effects) == 4
    for fixed in ("trained on the human text", "trained on the MT"):
        assert effects[("test side", fixed)]["ci"][1] < 0  # the MT's English costs, whatever the training
    assert effects[("train side", "tested with the gold English")]["mean"] == 0.0
    assert effects[("train side", "tested with the gold English")]["p"] == 1.0
    assert effects[("train side", "tested with the MT's English")]["resampled"] == "seeds and items"
    family = len(out["effects"]) + sum(c["minus_lora"] is not None for c in out["cells"])
    assert all(e["holm_family"] == family and e["p_holm"] >= e["p"] for e in out["effects"])
    md = (cross / "crossed.md").read_text()
    # a (language, seed) without its crossed evaluations is left out of every cell, the conditions' runs included
    for d in cross.glob("nusax-en-sun-m-3-*"):
        shutil.rmtree(d)
    shutil.rmtree(next(cross.glob("nusax-en-jav-m-2-*-lexical-ttrain-evaltest-*")))
    out = crossed.analyse(oracle, lexical, cross)
    assert {c["runs"] for c in out["cells"]} == {4} and out["seeds"] == [1, 2, 3]
    assert out["pairs"] == [["jav", 1], ["jav", 3], ["sun", 1], ["sun", 2]]
    assert "| FLARE (add_relu) | test side | trained on the MT | MT / MT − MT / gold |" in md


def test_the_report_leaves_re_evaluations_out_of_a_studys_tables(folders):
    _, _, cross = folders
    assert report.load_results(cross) == []


def test_a_condition_that_is_not_an_mt_or_has_no_crossed_runs_is_an_error(folders, tmp_path, capsys):
    oracle, lexical, _ = folders
    assert crossed.main([str(oracle), str(oracle), str(tmp_path / "none")]) == 2
    assert "not an MT condition" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert crossed.main([str(oracle), str(lexical), str(tmp_path / "empty")]) == 2
    assert "no crossed evaluations" in capsys.readouterr().err


def test_the_study_script_evaluates_each_model_with_the_other_conditions_english(tmp_path, monkeypatch, capsys):
    """`--mt lexical --crossed`: per seed, row and language the trained models of both conditions (the sweep;
    finished runs skip) and two evaluations, the oracle-trained model with the lexical English and the
    lexical-trained one with the gold English, into the crossed folder; then flare.crossed."""
    study = load_study_script()
    work, results = tmp_path / "work", tmp_path / "results"
    sweeps, evals, analysed = [], [], []

    def fake_sweep(argv):
        sweeps.append(argv)
        out, mt = Path(argv[argv.index("--output_dir") + 1]), argv[argv.index("--mt") + 1]
        mode = argv[argv.index("--modes") + 1]
        for lang in argv[argv.index("--langs") + 1:argv.index("--seeds")]:
            seed = int(argv[argv.index("--seeds") + 1])
            fn = argv[argv.index("--fusion_fns") + 1] if mode == "flare" else None
            d = out / f"nusax-en-{lang}-me5-small-{seed}-{mode}-{fn}-translate-{lang}-{mt}-ttrain"
            d.mkdir(parents=True, exist_ok=True)
            (d / "results_test.json").write_text(json.dumps({"mode": mode, "fusion_fn": fn, "seed": seed,
                                                             "target_lang": lang}))
        return True

    def fake_eval(argv):
        evals.append(argv)
        run, path_mt = Path(argv[argv.index("--eval_stage2") + 1]), Path(argv[argv.index("--path_mt") + 1])
        res = json.loads((run / "results_test.json").read_text())
        d = Path(argv[argv.index("--output_dir") + 1]) / f"{run.name}-evaltest-{path_mt.name}"
        d.mkdir(parents=True)
        (d / "results_test.json").write_text(json.dumps({**res, "evaluated_run": str(run),
                                                         "test_translations": str(path_mt)}))
        return 0

    monkeypatch.setattr(study, "run_sweep", fake_sweep)
    monkeypatch.setattr(study.sweep, "script_main", lambda script: fake_eval)
    monkeypatch.setattr("flare.crossed.main", lambda argv: analysed.append(argv) or 0)
    argv = ["--mt", "lexical", "--crossed", "--seeds", "1", "--langs", "jav", "--work_dir", str(work), "--results",
            str(results), "--budgets_from", str(Path(__file__).resolve().parents[1] / "results" / "embedded-nusax")]
    assert study.main(argv) == 0
    # input fusion (6 epochs) and FLARE add_relu (3 epochs), each in both conditions
    assert sorted((a[a.index("--modes") + 1], a[a.index("--mt") + 1], Path(a[a.index("--output_dir") + 1]).parent.name)
                  for a in sweeps) == [("flare", "lexical", "grid-lexical"), ("flare", "reference", "grid"),
                                       ("input-fusion", "lexical", "grid-lexical"),
                                       ("input-fusion", "reference", "grid")]
    pairs = sorted((Path(a[a.index("--eval_stage2") + 1]).parent.parent.name, Path(a[a.index("--path_mt") + 1]).name)
                   for a in evals)
    assert pairs == [("grid", "translate-jav-lexical"), ("grid", "translate-jav-lexical"),
                     ("grid-lexical", "translate-jav-reference"), ("grid-lexical", "translate-jav-reference")]
    assert len(list((results / "runs").iterdir())) == 4
    meta = json.loads((results / "study.json").read_text())
    assert meta["crossed"]["rows"] == ["input-fusion", "flare/add_relu"]
    assert meta["command"] == "python scripts/embedded_nusax_study.py --mt lexical --crossed --seeds 1"
    assert analysed == [[argv[-1], "results/embedded-nusax-lexical", str(results)]]
    # a re-run evaluates nothing again; rows can be chosen
    evals.clear()
    assert study.main(argv) == 0 and evals == []
    sweeps.clear()
    assert study.main([*argv[:2], "--crossed", "flare/add_relu", "flare/mul", *argv[3:]]) == 0
    assert sorted(a[a.index("--fusion_fns") + 1] for a in sweeps) == ["add_relu", "add_relu", "mul", "mul"]
    command = json.loads((results / "study.json").read_text())["command"]
    assert command.endswith("--crossed flare/add_relu flare/mul --seeds 1")
    # refused without an MT condition
    assert study.main(["--crossed", "--work_dir", str(work)]) == 2
    assert "pass --mt lexical" in capsys.readouterr().err


def test_the_study_page_block_is_what_flare_crossed_makes_of_the_committed_results():
    """docs/study.md's crossed block is regenerated exactly from the committed results by the command its marker
    names (the repository's own folders, relative paths as the command takes them)."""
    repo = Path(__file__).resolve().parents[1]
    roots = ("results/embedded-nusax", "results/embedded-nusax-lexical", "results/embedded-nusax-lexical-crossed")
    result = crossed.analyse(*(repo / root for root in roots))
    command = f"python -m flare.crossed {' '.join(roots)} --readme docs/study.md"
    begin = report.README_BEGIN.format(root=roots[2], command=command)
    text = (repo / "docs" / "study.md").read_text()
    block = text.split(begin, 1)[1].split(report.README_END.format(root=roots[2]), 1)[0]
    assert block == "\n" + crossed.markdown(result)
    assert result["mt"] == "lexical" and result["languages"] == ["ace", "jav", "mad", "sun"]
    assert {e["row"] for e in result["cells"]} == {"Input-level fusion", "FLARE (add_relu)"}
