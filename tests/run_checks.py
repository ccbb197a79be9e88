"""Claims a test can make about any finished run directory, beyond "the metric is a number in [0, 1]"."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sklearn.metrics import accuracy_score, f1_score

from flare.config import TASKS
from flare.metrics import qa_metrics


def assert_metrics_match_predictions(run_dir: Path, res: dict, prefix: str = "test") -> list[dict]:
    """The results' test metrics are the ones the predictions file gives: one line per test example (unique ids),
    accuracy and macro-F1 recomputed with scikit-learn (classification), SQuAD EM/F1 (QA)."""
    rows = [json.loads(line) for line in (Path(run_dir) / f"predictions_{prefix}.jsonl").read_text().splitlines()]
    assert len(rows) == res["n_test"] > 0 and len({r["id"] for r in rows}) == len(rows)
    info = TASKS[res["task"]]
    preds, golds = [r["prediction"] for r in rows], [r["gold"] for r in rows]
    if info.kind == "cls":
        assert res["test_accuracy"] == pytest.approx(accuracy_score(golds, preds), abs=1e-12)
        f1 = f1_score(golds, preds, labels=list(range(len(info.labels))), average="macro", zero_division=0)
        assert res["test_f1"] == pytest.approx(f1, abs=1e-12)
        assert res["test_unparseable"] == sum(p == -1 for p in preds)
    else:
        expected = qa_metrics(preds, golds)
        assert res["test_exact_match"] == pytest.approx(expected["exact_match"], abs=1e-12)
        assert res["test_f1"] == pytest.approx(expected["f1"], abs=1e-12)
    return rows


def write_checkpoint(path, trainer_state: bool = True, optimizer: bool = True, cut_weights: bool = False):
    """A checkpoint folder with the files a resume needs (the weights a real, tiny safetensors file)."""
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    save_file({"w": torch.zeros(64)}, str(path / "adapter_model.safetensors"))
    if cut_weights:
        data = (path / "adapter_model.safetensors").read_bytes()
        (path / "adapter_model.safetensors").write_bytes(data[:-10])
    (path / "scheduler.pt").write_bytes(b"x")
    if optimizer:
        (path / "optimizer.pt").write_bytes(b"x")
    if trainer_state:
        (path / "trainer_state.json").write_text("{}")
