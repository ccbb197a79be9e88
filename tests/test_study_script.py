"""scripts/embedded_nusax_study.py: the parts that need no training."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from flare import sweep

REPO = Path(__file__).resolve().parents[1]


def load_study_script():
    return sweep.load_script("scripts/embedded_nusax_study.py")


def test_a_later_seed_keeps_the_committed_budgets(tmp_path):
    """`--seeds 3` on a fresh machine (no budget runs in the work folder) reads the committed study's budget runs of
    its selection seed (1), not runs of seed 3 that never existed, and chooses what the study chose."""
    study = load_study_script()
    committed = json.loads((REPO / "results" / "embedded-nusax" / "study.json").read_text())["selection"]
    args = study.build_parser().parse_args(["--seeds", "3", "--xmixup", "--work_dir", str(tmp_path / "work"),
                                            "--budgets_from", str(REPO / "results" / "embedded-nusax")])
    assert study.selection_seed(args) == committed["seed"] == 1
    choice = study.choose_budgets(args)
    assert {row: c["epochs"] for row, c in choice.items()} == {row: c["epochs"] for row, c in
                                                                 committed["chosen"].items()}
    # without a committed study, the first of --seeds selects (a new study)
    args = study.build_parser().parse_args(["--seeds", "3", "--budgets_from", str(tmp_path / "none")])
    assert study.selection_seed(args) == 3


def test_equal_budget_trains_every_function_for_the_same_epochs_and_collects_only_them(tmp_path, monkeypatch):
    """`--equal_budget 3`: FLARE with the four functions at 3 epochs in every language and seed (no zero-shot,
    translate-test, LoRA or input fusion, no budget selection); collect copies those runs only (not a LoRA run the
    grid trained for 3 epochs too) into their own folder, whose study.json names add_relu as the comparison."""
    study = load_study_script()
    work, results = tmp_path / "work", tmp_path / "results"
    calls, collected, real_collect = [], [], study.collect
    monkeypatch.setattr(study, "run_sweep", lambda argv: calls.append(argv) or True)
    monkeypatch.setattr(study, "collect", lambda args, choice: collected.append(args.results))
    monkeypatch.setattr(study, "committed", lambda *cell: False)  # as if nothing were committed yet
    monkeypatch.setattr("flare.report.main", lambda argv: 0)
    assert study.main(["--equal_budget", "3", "--seeds", "1", "2", "--work_dir", str(work)]) == 0
    assert collected == ["results/embedded-nusax-equal-budget"]  # the default folder: the condition's + suffix
    assert len(calls) == 2 * 4  # seeds x functions, nothing else
    for argv in calls:
        assert argv[argv.index("--modes") + 1] == "flare" and "--epochs 3 --num_evals 3" in \
            argv[argv.index("--stage2_args") + 1]
        assert argv[argv.index("--output_dir") + 1] == str(work / "grid" / "epochs-3")
    assert sorted({argv[argv.index("--fusion_fns") + 1] for argv in calls}) == sorted(study.FUSION_FNS)

    def result(mode, fn, lang, seed=1):
        d = work / "grid" / "epochs-3" / f"nusax-en-{lang}-me5-small-{seed}-{mode}-{fn}"
        d.mkdir(parents=True)
        (d / "results_test.json").write_text(json.dumps({"mode": mode, "fusion_fn": fn, "target_lang": lang,
                                                         "seed": seed}))
    for fn in ("add", "add_relu"):
        result("flare", fn, "jav")
    result("translate-train", None, "jav")
    args = study.build_parser().parse_args(["--equal_budget", "3", "--seeds", "1", "--work_dir", str(work),
                                            "--results", str(results)])
    real_collect(args, study.choose_budgets(args))
    assert sorted(p.name for p in (results / "runs" / "epochs-3").iterdir()) == [
        "nusax-en-jav-me5-small-1-flare-add", "nusax-en-jav-me5-small-1-flare-add_relu"]
    meta = json.loads((results / "study.json").read_text())
    assert meta["equal_budget"] == 3 and meta["compare_with"] == [["flare", "add_relu"]]
    assert meta["selection"] is None
    assert meta["command"] == "python scripts/embedded_nusax_study.py --equal_budget 3 --seeds 1"
    # the oracle study's collect, sharing the work folder, takes each row from its own budget's folder only: FLARE
    # add trained for 1 epoch (its chosen budget), not the ablation's 3-epoch run, nor LoRA (chosen: 6 epochs);
    # add_relu's chosen budget is 3 epochs, so its run is the same in both
    d = work / "grid" / "epochs-1" / "nusax-en-jav-me5-small-1-flare-add"
    d.mkdir(parents=True)
    (d / "results_test.json").write_text(json.dumps({"mode": "flare", "fusion_fn": "add", "target_lang": "jav",
                                                     "seed": 1}))
    args = study.build_parser().parse_args(["--seeds", "1", "--work_dir", str(work), "--results",
                                            str(tmp_path / "oracle"),
                                            "--budgets_from", str(REPO / "results" / "embedded-nusax")])
    real_collect(args, study.choose_budgets(args))
    runs = tmp_path / "oracle" / "runs"
    assert sorted(str(p.relative_to(runs)) for p in runs.glob("*/*")) == [
        "epochs-1/nusax-en-jav-me5-small-1-flare-add", "epochs-3/nusax-en-jav-me5-small-1-flare-add_relu"]


def test_validation_set_target_runs_the_training_rows_with_the_flag_into_their_own_folder(tmp_path, monkeypatch,
                                                                                           capsys):
    """`--mt lexical --validation_set target`: the training rows (LoRA, input fusion, FLARE add_relu and mul) at the
    oracle's budgets with run.py's --validation_set target, in their own grid and results folders; no
    evaluation-only rows (they select nothing); refused under --mt reference (the same data)."""
    study = load_study_script()
    work, calls, collected = tmp_path / "work", [], []
    monkeypatch.setattr(study, "run_sweep", lambda argv: calls.append(argv) or True)
    monkeypatch.setattr(study, "collect", lambda args, choice: collected.append(args.results))
    monkeypatch.setattr(study, "committed", lambda *cell: False)  # as if nothing were committed yet
    monkeypatch.setattr("flare.report.main", lambda argv: 0)
    assert study.main(["--mt", "lexical", "--validation_set", "target", "--seeds", "1", "--work_dir", str(work),
                       "--budgets_from", str(REPO / "results" / "embedded-nusax")]) == 0
    assert collected == ["results/embedded-nusax-lexical-valtarget"]
    modes = sorted((argv[argv.index("--modes") + 1], argv[argv.index("--fusion_fns") + 1]) for argv in calls)
    assert modes == [("flare", "add_relu"), ("flare", "mul"), ("input-fusion", "add_relu"), ("lora", "add_relu")]
    for argv in calls:
        assert argv[argv.index("--stage2_args") + 1].endswith("--validation_set target")
        assert Path(argv[argv.index("--output_dir") + 1]).parent == work / "grid-lexical-valtarget"
    assert study.main(["--validation_set", "target", "--work_dir", str(work)]) == 2
    assert "use it with --mt lexical" in capsys.readouterr().err


def test_xmixup_adds_its_row_and_trains_only_its_own_budget_runs(tmp_path, monkeypatch):
    """`--xmixup` on a fresh machine: the selection trains X-Mixup's budget runs only (the other rows' are in the
    committed study), its budget is chosen on their validation scores and joins the chosen budgets; the grid trains
    it after LoRA; the lexical condition needs the oracle's X-Mixup budget and says how to get it."""
    study = load_study_script()
    work, calls = tmp_path / "work", []
    # the committed study as it was before its X-Mixup row: study.json and selection runs without X-Mixup's
    oracle = tmp_path / "oracle"
    shutil.copytree(REPO / "results" / "embedded-nusax" / "selection", oracle / "selection",
                    ignore=shutil.ignore_patterns("*xmixup*"))
    meta = json.loads((REPO / "results" / "embedded-nusax" / "study.json").read_text())
    meta["selection"]["chosen"].pop("xmixup")
    (oracle / "study.json").write_text(json.dumps(meta))

    def fake_sweep(argv):
        calls.append(argv)
        if argv[argv.index("--modes") + 1] == "xmixup" and "/select/" in argv[argv.index("--output_dir") + 1]:
            out = Path(argv[argv.index("--output_dir") + 1])
            epochs = int(out.name.split("-")[1])
            d = out / f"nusax-en-ind-me5-small-1-xmixup-{epochs}"
            d.mkdir(parents=True)
            (d / "results_test.json").write_text(json.dumps({"mode": "xmixup", "fusion_fn": None, "target_lang":
                                                             "ind", "seed": 1, "validation_best": {1: 0.5, 3: 0.7,
                                                                                                   6: 0.6}[epochs]}))
        return True

    monkeypatch.setattr(study, "run_sweep", fake_sweep)
    monkeypatch.setattr(study, "collect", lambda args, choice: None)
    monkeypatch.setattr("flare.report.main", lambda argv: 0)
    assert study.main(["--xmixup", "--seeds", "1", "--work_dir", str(work), "--budgets_from", str(oracle),
                       "--phase", "select"]) == 0
    assert [a[a.index("--modes") + 1] for a in calls] == ["xmixup"] * 3  # 1, 3, 6 epochs; nothing else
    args = study.build_parser().parse_args(["--xmixup", "--seeds", "1", "--work_dir", str(work), "--budgets_from",
                                            str(oracle)])
    choice = study.choose_budgets(args)
    assert choice["xmixup"] == {"epochs": 3, "validation": {"1": 0.5, "3": 0.7, "6": 0.6}}
    committed = json.loads((oracle / "study.json").read_text())["selection"]["chosen"]
    assert {k: v["epochs"] for k, v in choice.items() if k != "xmixup"} == {k: v["epochs"] for k, v in
                                                                             committed.items()}
    assert study.training_rows(args)[:2] == [("lora", None), ("xmixup", None)]
    calls.clear()
    results = tmp_path / "results"  # an empty results folder: the grid trains every row
    assert study.main(["--xmixup", "--seeds", "1", "--work_dir", str(work), "--budgets_from", str(oracle),
                       "--phase", "grid", "--results", str(results)]) == 0
    xm = [a for a in calls if a[a.index("--modes") + 1] == "xmixup"]
    assert len(xm) == 1 and "--epochs 3 --num_evals 3" in xm[0][xm[0].index("--stage2_args") + 1]
    assert [a[a.index("--modes") + 1] for a in calls][:4] == ["zero-shot", "translate-test", "lora", "xmixup"]
    # the lexical condition keeps the oracle's budgets: an oracle study without an X-Mixup budget (this one) says how
    # to get one
    lexical = study.build_parser().parse_args(["--mt", "lexical", "--xmixup", "--budgets_from", str(oracle)])
    try:
        study.choose_budgets(lexical)
        raise AssertionError("no error")
    except SystemExit as e:
        assert "chose no budget for xmixup" in str(e) and "--xmixup" in str(e)


def test_the_grid_trains_only_the_cells_not_committed_yet(tmp_path, monkeypatch):
    """A fresh clone has the committed results but no checkpoints: adding a row (--xmixup) trains that row only, and
    only in the languages whose cell is not committed; a committed cell of another budget does not count."""
    study = load_study_script()
    work, results, calls = tmp_path / "work", tmp_path / "results", []
    monkeypatch.setattr(study, "run_sweep", lambda argv: calls.append(argv) or True)
    monkeypatch.setattr(study, "collect", lambda args, choice: None)
    monkeypatch.setattr("flare.report.main", lambda argv: 0)
    args = study.build_parser().parse_args(["--seeds", "1", "--budgets_from", str(REPO / "results" /
                                                                                   "embedded-nusax")])
    chosen = {row: c["epochs"] for row, c in study.choose_budgets(args).items()}

    def commit(mode, fn, lang, epochs):
        folder = results / "runs" / (f"epochs-{epochs}" if epochs else "eval-only")
        d = folder / f"nusax-en-{lang}-me5-small-1-{mode}-{fn}"
        d.mkdir(parents=True)
        name = "results_zs.json" if mode == "zero-shot" else "results_test.json"
        (d / name).write_text(json.dumps({"mode": study.RESULT_MODE.get(mode, mode), "fusion_fn": fn,
                                          "target_lang": lang, "seed": 1}))

    for lang in args.langs:
        commit("zero-shot", None, lang, None)
        commit("translate-test", None, lang, None)
        for mode, fn in study.TRAINING_ROWS:
            commit(mode, fn, lang, chosen[study.row_name(mode, fn)])
    commit("xmixup", None, "jav", 3)  # X-Mixup's chosen budget below is 6 epochs: this cell is not the study's
    commit("xmixup", None, "sun", 6)
    oracle = tmp_path / "oracle"
    oracle.mkdir()
    meta = json.loads((REPO / "results" / "embedded-nusax" / "study.json").read_text())
    meta["selection"]["chosen"]["xmixup"] = {"epochs": 6}
    (oracle / "study.json").write_text(json.dumps(meta))
    assert study.main(["--mt", "lexical", "--xmixup", "--seeds", "1", "--work_dir", str(work), "--budgets_from",
                       str(oracle), "--results", str(results), "--phase", "grid"]) == 0
    assert len(calls) == 1 and calls[0][calls[0].index("--modes") + 1] == "xmixup"
    langs = calls[0][calls[0].index("--langs") + 1:calls[0].index("--seeds")]
    assert langs == ["jav", "ace", "mad"]
    assert "--epochs 6 --num_evals 6" in calls[0][calls[0].index("--stage2_args") + 1]


def test_tydiqa_study_chooses_the_stage1_rate_on_english_dev_and_runs_every_cell(tmp_path, monkeypatch):
    """scripts/embedded_tydiqa_study.py (issue 32) with a fake sweep: the selection trains stage 1 of the first seed
    per learning rate; the best English dev F1 chooses (ties to the smaller); zero-shot runs the eight languages seed
    by seed, translate-train LoRA / input fusion / FLARE run Indonesian with the lexical MT; collect writes
    study.json."""
    study = sweep.load_script("scripts/embedded_tydiqa_study.py")
    work, calls = tmp_path / "work", []
    f1 = {"3e-4": 0.41, "1e-3": 0.44}

    def fake_sweep(argv):
        calls.append(argv)
        stage1 = Path(argv[argv.index("--stage1_dir") + 1])
        lr = stage1.name.split("-", 1)[1]
        for seed in argv[argv.index("--seeds") + 1:argv.index("--modes")]:
            d = stage1 / f"tydiqa-en-me5-small-{seed}"
            d.mkdir(parents=True, exist_ok=True)
            (d / "results_test.json").write_text(json.dumps({"seed": int(seed), "test_f1": f1[lr]}))
        return True

    monkeypatch.setattr(study, "run_sweep", fake_sweep)
    monkeypatch.setattr("flare.report.main", lambda argv: 0)
    results = tmp_path / "results"
    assert study.main(["--work_dir", str(work), "--results", str(results)]) == 0
    select = [a for a in calls if "/select/" in a[a.index("--output_dir") + 1]]
    assert [a[a.index("--stage1_args") + 1].split("--lr ")[1] for a in select] == ["3e-4", "1e-3"]
    assert all(a[a.index("--seeds") + 1:a.index("--modes")] == ["1"] for a in select)
    grid = [a for a in calls if a not in select]
    assert all("--lr 1e-3" in a[a.index("--stage1_args") + 1] for a in grid)  # the better English dev F1
    zero = [a for a in grid if a[a.index("--modes") + 1] == "zero-shot"]
    assert len(zero) == 3 and zero[0][zero[0].index("--langs") + 1:zero[0].index("--seeds")] == list(study.TARGETS)
    train = [a for a in grid if a[a.index("--modes") + 1] != "zero-shot"]
    assert sorted(a[a.index("--modes") + 1] for a in train) == sorted(study.TRAIN_MODES * 3)
    assert all(a[a.index("--mt") + 1] == "lexical" and a[a.index("--langs") + 1] == "id" for a in train)
    meta = json.loads((results / "study.json").read_text())
    assert meta["task"] == "tydiqa" and meta["stage1_selection"]["lr"] == "1e-3"
    assert meta["stage1_selection"]["english_dev_f1"] == f1 and meta["selection"] is None
    assert (results / "stage1" / "tydiqa-en-me5-small-2" / "results_test.json").is_file()
    assert (results / "stage1-candidates" / "lr-3e-4" / "results_test.json").is_file()


def test_tydiqa_study_adds_seeds_without_training_the_committed_ones_again(tmp_path, monkeypatch):
    """On a fresh clone (no checkpoints): the committed choice of the rate stands (no selection runs), and only the
    cells not committed under --results are trained (seed 1 committed: seed 2 alone)."""
    study = sweep.load_script("scripts/embedded_tydiqa_study.py")
    results, calls = tmp_path / "results", []
    choice = {"lr": "1e-3", "english_dev_f1": {"3e-4": 0.41, "1e-3": 0.44}, "seed": 1}
    results.mkdir()
    (results / "study.json").write_text(json.dumps({"stage1_selection": choice}))
    for mode, lang in [("zero-shot", code) for code in ("ar", "ben", "fi", "ind", "ko", "ru", "sw", "tel")] + \
            [("translate-train", "ind"), ("input-fusion", "ind"), ("flare", "ind")]:
        d = results / "runs" / f"tydiqa-en-{lang}-me5-small-1-{mode}"
        d.mkdir(parents=True)
        (d / "results_test.json").write_text(json.dumps({"mode": mode, "target_lang": lang, "seed": 1}))
    monkeypatch.setattr(study, "run_sweep", lambda argv: calls.append(argv) or True)
    monkeypatch.setattr(study, "collect", lambda args, choice: None)
    monkeypatch.setattr("flare.report.main", lambda argv: 0)
    assert study.main(["--work_dir", str(tmp_path / "work"), "--results", str(results), "--seeds", "1", "2"]) == 0
    assert all(a[a.index("--seeds") + 1:a.index("--modes")] == ["2"] for a in calls)
    assert all("--lr 1e-3" in a[a.index("--stage1_args") + 1] for a in calls)
    assert sorted(a[a.index("--modes") + 1] for a in calls) == sorted(["zero-shot", *study.TRAIN_MODES])
    calls.clear()  # --train_modes: those rows only, in the order given
    assert study.main(["--work_dir", str(tmp_path / "work"), "--results", str(results), "--seeds", "1", "2",
                       "--phase", "train", "--train_modes", "flare", "lora"]) == 0
    assert [a[a.index("--modes") + 1] for a in calls] == ["flare", "lora"]


def test_sweep_names_runs_with_the_canonical_language_code(tmp_path):
    """`--langs id` (TyDiQA's Indonesian) names the run and translation folders as run.py does (ind): a finished
    job is recognised as finished."""

    args = sweep.build_parser().parse_args(
        ["--task", "tydiqa", "--plm", "me5-small", "--langs", "id", "bn", "--modes", "zero-shot", "lora", "--seeds",
         "1", "--mt", "lexical", "--output_dir", str(tmp_path / "ck"), "--translations", str(tmp_path / "tr")])
    jobs = {j.name: j for j in sweep.plan(args)}
    (done,) = jobs["zero-shot ind seed 1"].done_files
    assert done.parent.name == "tydiqa-en-ind-me5-small-1"
    (done,) = jobs["lora ben seed 1"].done_files
    assert done.parent.name == "tydiqa-en-ben-me5-small-1-lora-8-translate-ben-lexical-ttrain"
