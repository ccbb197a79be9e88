"""scripts/embedded_nusax_study.py: the parts that need no training."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_study_script():
    spec = importlib.util.spec_from_file_location("embedded_nusax_study", REPO / "scripts" / "embedded_nusax_study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_later_seed_keeps_the_committed_budgets(tmp_path):
    """`--seeds 3` on a fresh machine (no budget runs in the work folder) reads the committed study's budget runs of
    its selection seed (1), not runs of seed 3 that never existed, and chooses what the study chose."""
    study = load_study_script()
    committed = json.loads((REPO / "results" / "embedded-nusax" / "study.json").read_text())["selection"]
    args = study.build_parser().parse_args(["--seeds", "3", "--work_dir", str(tmp_path / "work"),
                                            "--budgets_from", str(REPO / "results" / "embedded-nusax")])
    assert study.selection_seed(args) == committed["seed"] == 1
    choice = study.choose_budgets(args)
    assert {row: c["epochs"] for row, c in choice.items()} == {row: c["epochs"] for row, c in
                                                                 committed["chosen"].items()}
    # without a committed study, the first of --seeds selects (a new study)
    args = study.build_parser().parse_args(["--seeds", "3", "--budgets_from", str(tmp_path / "none")])
    assert study.selection_seed(args) == 3
