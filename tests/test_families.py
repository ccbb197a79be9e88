"""The newer model families, each a FAMILY_DEFAULTS row: a tiny model through stage 1, FLARE (fusion counted) and
X-Mixup (its mixed layer ran), and the families a method cannot serve refused with the reason (FLARE: Phi-3's fused
q/k/v; X-Mixup: XLM-R XL's pre-LN attention block)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flare import stage1, stage2
from flare.config import resolve_model
from flare.tiny_models import EXTRA_FAMILIES
from flare.translate import TranslateJob, run_job

DATA = Path(__file__).resolve().parents[1] / "data"
FAST = ["--data_dir", str(DATA), "--max_train_samples", "8", "--max_eval_samples", "8", "--max_steps", "1",
        "--batch_size", "8", "--num_evals", "1", "--seed", "2"]


@pytest.fixture(scope="module")
def families(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("families")
    (root / "models").symlink_to(tiny_models)
    for src, tgt in (("en", "jav"), ("jav", "en")):  # FLARE's test set pairs the target with its English side
        run_job(TranslateJob("nusax", src, tgt, "reference", output_dir=root / "tr", data_dir=str(DATA)))
    return root


@pytest.mark.parametrize("family", EXTRA_FAMILIES)
def test_family_runs_stage1_and_flare(families, family, capsys):
    plm = str(families / "models" / family)
    spec = resolve_model(plm)
    assert spec.model_type == family and spec.family == ("encoder" if family == "xlm-roberta-xl" else "decoder")
    out = families / "ck"
    assert stage1.main(["--task", "nusax", "--plm", plm, "--output_dir", str(out), *FAST]) == 0
    stage1_dir = out / f"nusax-en-{family}-2"
    s1 = json.loads((stage1_dir / "results_test.json").read_text())
    assert s1["n_test"] == 8 and s1["model_type"] == family
    train = ["--task", "nusax", "--plm", plm, "--target_lang", "jav", "--output_dir", str(out), "--load_ckpt",
             str(stage1_dir), "--adapter", "lora", "--translate-train", "--path_mt",
             str(families / "tr" / "nusax" / "translate-jav-reference"), *FAST]
    check_xmixup(out, family, train, capsys)
    if spec.no_fusion:  # Phi-3: LoRA trains on the fused projections; FLARE is refused with the reason
        assert stage2.main(train) == 0
        res = json.loads(next(out.glob(f"nusax-en-jav-{family}-2-lora-8-*/results_test.json")).read_text())
        assert res["mode"] == "translate-train" and res["stage1_start_max_abs_diff"] == 0.0
        assert stage2.main([*train, "--fusion_fn", "add_relu"]) == 2
        assert "qkv_proj" in capsys.readouterr().err
        return
    assert stage2.main([*train, "--fusion_fn", "add_relu"]) == 0
    res = json.loads(next(out.glob(f"nusax-en-jav-{family}-2-lora-8_add_relu-*/results_test.json")).read_text())
    layers, fused = 2, 2  # tiny models: 2 layers, fusion into the query and value projections
    assert res["fusion_calls_train"] == layers * fused  # one training step
    assert res["fusion_calls_eval"] > 0 and res["stage1_start_max_abs_diff"] == 0.0


def check_xmixup(out: Path, family: str, train: list[str], capsys) -> None:
    """X-Mixup on the family: its mixed layer ran (a mean λ recorded) from the exact stage-1 start; XLM-R XL (pre-LN,
    no LayerNorm after the attention residual) is refused by name before a model loads."""
    code = stage2.main([*train, "--xmixup"])
    if family == "xlm-roberta-xl":
        assert code == 2 and "pre-LN" in capsys.readouterr().err
        return
    assert code == 0
    res = json.loads(next(out.glob(f"nusax-en-jav-{family}-2-lora-8-*-xmixup/results_test.json")).read_text())
    assert res["mode"] == "xmixup" and res["stage1_start_max_abs_diff"] == 0.0
    assert 0 < res["xmixup_lambda_last_epoch"]["1"] < 0.5


@pytest.mark.parametrize("family", ["llama", "gemma2", "xlm-roberta", "bert", "nllb", *EXTRA_FAMILIES])
def test_inspector_suggests_the_table_row(tiny_models, family, capsys):
    """python -m flare.models.inspect, on every tiny model: the row it suggests is the one the table holds."""
    from flare.config import FAMILY_DEFAULTS
    from flare.models.inspect import inspect_model, main

    ins = inspect_model(str(tiny_models / family))
    row = FAMILY_DEFAULTS[ins.model_type]
    assert (ins.family, ins.layers, ins.fusion_targets) == (row["family"], row["layers"], row["fusion_targets"])
    assert set(ins.lora_targets) == set(row["lora_targets"]) and ins.n_layers == 2
    assert all(set(ins.heads.get(k, ())) == set(v) for k, v in row.get("heads", {}).items())
    assert ins.padding_side and ins.pad_token
    assert bool(ins.warnings) == (family == "phi3")  # fused q/k/v is the one case it cannot decide
    assert main([str(tiny_models / family)]) == 0
    printed = capsys.readouterr().out
    assert f'"{ins.model_type}": dict(family="{row["family"]}"' in printed
    if family == "phi3":
        assert "WARNING: q, k and v are computed by ONE linear (qkv_proj)" in printed


def test_inspector_without_a_config(tmp_path, capsys):
    from flare.models.inspect import main

    assert main([str(tmp_path)]) == 2 and "cannot read its config" in capsys.readouterr().err
