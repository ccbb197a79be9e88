"""run.py end to end on tiny encoder and decoder models with real data and real translation files; bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from run_checks import assert_metrics_match_predictions
from safetensors.torch import load_file
from stage2_helpers import FAST, QA, write_identity_tydiqa

from flare import stage1, stage2
from flare.models.fusion import FUSION_FILE, FUSION_FNS
from flare.translate import TranslateJob, run_job

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_models):
    """Stage-1 runs of tiny models and translation files, as the scripts would leave them."""
    root = tmp_path_factory.mktemp("stage2")
    ck, tr = root / "ck", root / "translations"
    for family, task, extra, out in (("xlm-roberta", "nusax", [], ck), ("llama", "nusax", ["--quantize", "4bit"], ck),
                                     ("gemma2", "tydiqa", QA, ck), ("xlm-roberta", "tydiqa", QA, ck),
                                     ("xlm-roberta", "nusax", ["--quantize", "4bit"], ck / "q4")):
        assert stage1.main(["--task", task, "--plm", str(tiny_models / family), "--output_dir", str(out),
                            *FAST, *extra]) == 0
    for src, tgt in (("en", "jav"), ("jav", "en")):  # human translations of the parallel NusaX corpus
        run_job(TranslateJob("nusax", src, tgt, "reference", output_dir=tr, data_dir=str(DATA)))
    write_identity_tydiqa(tr, DATA)
    return {"root": root, "ck": ck, "tr": tr, "models": tiny_models}


def run2(world, family, task, *extra, tgt=None, out=None):
    tgt = tgt or {"nusax": "jav", "tydiqa": "sw"}[task]
    argv = ["--task", task, "--plm", str(world["models"] / family), "--target_lang", tgt,
            "--output_dir", str(out or world["ck"]), "--load_ckpt", str(world["ck"] / f"{task}-en-{family}-3"),
            *FAST, *(QA if task == "tydiqa" else []), *extra]
    return stage2.main(argv)


def results(world, name, prefix="test"):
    run_dir = world["ck"] / name
    return run_dir, json.loads((run_dir / f"results_{prefix}.json").read_text())


def train_flags(world, task, tgt, mt="reference"):
    return ["--adapter", "lora", "--translate-train", "--path_mt", str(world["tr"] / task / f"translate-{tgt}-{mt}")]


MODES = {
    # mode: (extra flags given the train flags, run-name suffix, adapter name)
    "translate-train": ([], "-lora-8-translate-jav-reference-ttrain", "lora-default"),
    "input-fusion": (["--input_fusion"], "-lora-8-translate-jav-reference-ttrain-inputfusion", "inputfusion"),
    "flare": (["--fusion_fn", "add_relu"], "-lora-8_add_relu-translate-jav-reference-ttrain", "flare-add_relu"),
    "flare-mt": (["--fusion_fn", "cross-attention", "--fuse_mt", "--mt_model", "MT"],
                 "-lora-8_cross-attention-translate-jav-reference-ttrain-fusemt", "flare-fusemt"),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_training_modes_encoder(world, mode):
    extra, suffix, adapter = MODES[mode]
    extra = [str(world["models"] / "nllb") if e == "MT" else e for e in extra]
    assert run2(world, "xlm-roberta", "nusax", *train_flags(world, "nusax", "jav"), *extra) == 0
    run_dir, res = results(world, f"nusax-en-jav-xlm-roberta-3{suffix}")
    assert res["mode"] == mode and res["adapter_name"] == adapter and res["run_name"] == run_dir.name
    assert res["n_test"] == 8
    assert_metrics_match_predictions(run_dir, res)
    assert res["param_total"] > res["param_train"] > 0 and res["args"]["target_lang"] == "jav"
    assert not any(k.startswith("test_test_") for k in res)
    if mode.startswith("flare"):
        # 2 steps x 2 layers x (query, value); eval: validation (2x) + test
        assert res["fusion_calls_train"] == 2 * 2 * 2 and res["fusion_calls_eval"] > 0
    else:
        assert res["fusion_calls_train"] == res["fusion_calls_eval"] == 0
    saved = load_file(str(run_dir / "adapter_model.safetensors"))
    assert any("lora_A" in k for k in saved) and any("classifier" in k for k in saved)
    assert (run_dir / FUSION_FILE).is_file() == (mode == "flare-mt")  # cross-attention + MT projection
    if mode == "flare-mt":
        fusion = load_file(str(run_dir / FUSION_FILE))
        assert "proj.weight" in fusion and any("cross_attention" in k for k in fusion)
    lines = (run_dir / "predictions_test.jsonl").read_text().splitlines()
    assert len(lines) == 8


def test_zero_shot_and_translate_test(world):
    assert run2(world, "xlm-roberta", "nusax", "--eval_zs", "--eval_only") == 0
    run_dir, res = results(world, "nusax-en-jav-xlm-roberta-3", "zs")
    assert res["mode"] == "zero-shot" and "test_accuracy" in res and (run_dir / "predictions_zs.jsonl").is_file()
    assert run2(world, "xlm-roberta", "nusax", "--translate-test", "--path_mt",
                str(world["tr"] / "nusax" / "translate-en-reference")) == 0
    _, res = results(world, "nusax-en-jav-xlm-roberta-3-translate-en-reference-ttest")
    assert res["mode"] == "translate-test"


def test_nusax_translate_test_reads_the_translation(world):
    """Regression: the original evaluated NusaX translate-test on the untranslated target data (if/elif slip)."""
    from flare.data import load_task

    args = stage2.build_parser().parse_args(
        ["--task", "nusax", "--plm", str(world["models"] / "xlm-roberta"), "--target_lang", "jav", "--seed", "3",
         "--load_ckpt", str(world["ck"] / "nusax-en-xlm-roberta-3"), "--data_dir", str(DATA), "--translate-test",
         "--path_mt", str(world["tr"] / "nusax" / "translate-en-reference")])
    data = stage2.load_data(stage2.resolve_config(args))
    english, javanese = load_task("nusax", "en", "test", DATA), load_task("nusax", "jav", "test", DATA)
    assert list(data.test["text"]) == list(english["text"]) != list(javanese["text"])
    assert list(data.test["label"]) == list(javanese["label"])


@pytest.mark.parametrize("family,task", [("xlm-roberta", "nusax"), ("llama", "nusax"), ("gemma2", "tydiqa")])
def test_zero_shot_on_english_reproduces_stage1(world, family, task, tmp_path):
    """The stage-1 checkpoint is really loaded (the original never loaded it for LLM TyDiQA)."""
    assert run2(world, family, task, "--eval_zs", "--eval_only", tgt="en", out=tmp_path) == 0
    zs = json.loads((tmp_path / f"{task}-en-en-{family}-3" / "results_zs.json").read_text())
    s1 = json.loads((world["ck"] / f"{task}-en-{family}-3" / "results_test.json").read_text())
    metrics = [k for k in s1 if k.startswith("test_") and k != "test_runtime"]
    assert metrics and all(zs[k] == s1[k] for k in metrics)
    # the parsed predictions, line by line (decoders also write the raw "output": on this CPU bitsandbytes repacks a
    # 4-bit weight in place the first time it runs in eval mode, so a random tiny model's near-tie greedy tokens
    # can differ between the trained model in memory and its reload, while the parsed labels agree)
    def lines(path):
        return [{k: v for k, v in json.loads(x).items() if k != "output"} for x in path.read_text().splitlines()]

    zs_lines = lines(tmp_path / f"{task}-en-en-{family}-3" / "predictions_zs.jsonl")
    assert zs_lines == lines(world["ck"] / f"{task}-en-{family}-3" / "predictions_test.jsonl")


@pytest.mark.parametrize("family,extra", [
    ("xlm-roberta", ["--fusion_fn", "add_relu"]),
    pytest.param("llama", ["--fusion_fn", "cross-attention"], marks=pytest.mark.slow),
    pytest.param("xlm-roberta", ["--fusion_fn", "add", "--fuse_mt", "--mt_model", "MT"], marks=pytest.mark.slow)])
def test_cached_source_states_give_the_uncached_run(world, tmp_path, family, extra):
    """--cache_source_states: 3 epochs (2 steps each) and 3 validations reuse the first epoch's source states; the
    losses, metrics and predictions equal the uncached run's."""
    extra = [str(world["models"] / "nllb") if e == "MT" else e for e in extra]
    flags = [*train_flags(world, "nusax", "jav"), *extra, "--max_steps", "6", "--num_evals", "3"]
    out = {}
    for cache in (False, True):
        assert run2(world, family, "nusax", *flags, *(["--cache_source_states"] if cache else []),
                    out=tmp_path / str(cache)) == 0
        (run_dir,) = (tmp_path / str(cache)).iterdir()
        out[cache] = (json.loads((run_dir / "results_test.json").read_text()),
                      (run_dir / "predictions_test.jsonl").read_text())
    (plain, plain_pred), (cached, cached_pred) = out[False], out[True]
    assert "source_cache_examples" not in plain
    # 16 training + 8 validation examples stored once; every later epoch and validation batch is served
    assert cached["source_cache_examples"] == 16 + 8 + 8  # + the 8 test examples (computed once)
    # served: epochs 2-3 (2 batches each) and the 2nd and 3rd validation (1 batch); computed: the start check's
    # probe (4 validation rows), epoch 1, the first validation (the probe held only half its rows) and the test
    assert cached["source_cache_hit_batches"] == 2 * 2 + 2
    assert cached["source_cache_miss_batches"] == 1 + 2 + 1 + 1
    # later epochs reuse states computed in another batch (other padding): rounding only. The 4-bit decoder's CPU
    # kernels round differently per input shape (about 1e-4 relative), which 6 steps at lr 1e-3 carry into the loss
    assert cached["train_loss"] == pytest.approx(plain["train_loss"], rel=1e-3 if family == "llama" else 1e-5)
    assert {k: v for k, v in cached.items() if k.startswith("test_") and k != "test_runtime"} == \
        {k: v for k, v in plain.items() if k.startswith("test_") and k != "test_runtime"}
    assert cached_pred == plain_pred


@pytest.mark.parametrize("fn", ["add_relu", "cross-attention"])
def test_score_mode_with_fusion_labels_every_example(world, tmp_path, fn):
    """--eval_mode score on a 4-bit decoder with FLARE: the fused model ranks the label words (fusion runs in the
    scoring passes), every example gets a label."""
    assert run2(world, "llama", "nusax", *train_flags(world, "nusax", "jav"), "--fusion_fn", fn, "--eval_mode",
                "score", out=tmp_path) == 0
    (run_dir,) = tmp_path.iterdir()
    res = json.loads((run_dir / "results_test.json").read_text())
    assert res["fusion_calls_eval"] > 0 and res["test_unparseable"] == 0 and res["args"]["eval_mode"] == "score"


def test_qlora_decoder_trains_flare_with_gradient_checkpointing(world):
    assert run2(world, "llama", "nusax", *train_flags(world, "nusax", "jav"), "--fusion_fn", "add_relu",
                "--gradient_checkpointing") == 0
    _, res = results(world, "nusax-en-jav-llama-3-lora-8_add_relu-translate-jav-reference-ttrain")
    assert res["quantize"] == "4bit" and res["mode"] == "flare"
    assert res["fusion_calls_train"] >= 2 * 2 * 2 and res["fusion_calls_eval"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["translate-train", "input-fusion", "flare-mt"])
def test_training_modes_decoder(world, mode):
    extra, suffix, _ = MODES[mode]
    extra = [str(world["models"] / "nllb") if e == "MT" else e for e in extra]
    assert run2(world, "llama", "nusax", *train_flags(world, "nusax", "jav"), *extra) == 0
    run_dir, res = results(world, f"nusax-en-jav-llama-3{suffix}")
    assert res["mode"] == mode
    assert_metrics_match_predictions(run_dir, res)


@pytest.mark.parametrize("family", ["gemma2", "xlm-roberta"])
def test_tydiqa_modes(world, family):
    # zero-shot needs no translation files (the original crashed without --translate-train)
    assert run2(world, family, "tydiqa", "--eval_zs", "--eval_only") == 0
    flags = ["--adapter", "lora", "--translate-train", "--path_mt",
             str(world["tr"] / "tydiqa" / "translate-sw-identity")]
    assert run2(world, family, "tydiqa", *flags, "--fusion_fn", "add") == 0
    run_dir, res = results(world, f"tydiqa-en-sw-{family}-3-lora-8_add-translate-sw-identity-ttrain")
    assert res["fusion_calls_train"] > 0 and res["fusion_calls_eval"] > 0
    rows = assert_metrics_match_predictions(run_dir, res)
    assert all(isinstance(r["prediction"], str) and r["gold"] for r in rows)  # answer text vs the gold answers
    assert res["n_train"] == 16 and res["n_validation"] == 4  # every 10th of the 40 translated rows validates
    if family == "xlm-roberta":
        assert run2(world, family, "tydiqa", *flags, "--input_fusion") == 0
        assert run2(world, family, "tydiqa", "--translate-test", "--path_mt",
                    str(world["tr"] / "tydiqa" / "translate-en-identity")) == 0


def test_qa_validation_is_every_tenth_translated_row():
    import datasets

    from flare.data.paired import split_qa_validation

    train, val = split_qa_validation(datasets.Dataset.from_dict({"id": [str(i) for i in range(30)]}))
    assert list(val["id"]) == ["9", "19", "29"] and len(train) == 27 and not set(val["id"]) & set(train["id"])


def test_failed_answer_projections_are_dropped_and_counted(world, tmp_path):
    folder = tmp_path / "tr" / "tydiqa" / "translate-sw-identity"
    folder.mkdir(parents=True)
    src = world["tr"] / "tydiqa" / "translate-sw-identity" / "train_en-sw.parquet"
    df = pd.read_parquet(src)
    df.loc[:4, "answers_translated"] = [{"text": [""], "answer_start": [-1]}] * 5
    df.to_parquet(folder / "train_en-sw.parquet", index=False)
    assert run2(world, "xlm-roberta", "tydiqa", "--adapter", "lora", "--translate-train", "--path_mt", str(folder),
                "--max_train_samples", "100", out=tmp_path / "ck") == 0
    res = json.loads(next((tmp_path / "ck").glob("*/results_test.json")).read_text())
    assert res["train_dropped_projection"] == 5 and res["n_train"] + res["n_validation"] == len(df) - 5


def test_flare_mt_needs_no_english_text(world, tmp_path):
    folder = tmp_path / "tr" / "nusax" / "translate-jav-reference"
    folder.mkdir(parents=True)
    for name in ("train_en-jav.parquet", "val_en-jav.parquet"):
        df = pd.read_parquet(world["tr"] / "nusax" / "translate-jav-reference" / name)
        df.drop(columns=["text"]).to_parquet(folder / name, index=False)  # the English column is gone
    assert run2(world, "xlm-roberta", "nusax", "--adapter", "lora", "--translate-train", "--path_mt", str(folder),
                "--fusion_fn", "add", "--fuse_mt", "--mt_model", str(world["models"] / "nllb"),
                out=tmp_path / "ck") == 0
    res = json.loads(next((tmp_path / "ck").glob("*/results_test.json")).read_text())
    assert res["mode"] == "flare-mt" and res["fusion_calls_train"] > 0 and res["fusion_calls_eval"] > 0


@pytest.mark.slow
def test_flare_on_tiny_nllb_translations(world, tmp_path):
    tr = tmp_path / "tr"
    for src, tgt, splits in (("en", "sun", ("train", "validation")), ("sun", "en", ("test",))):
        run_job(TranslateJob("nusax", src, tgt, str(world["models"] / "nllb"), output_dir=tr, data_dir=str(DATA),
                             splits=splits, max_length=12, batch_size=64,
                             max_samples=None if src == "sun" else 24))
    out = tmp_path / "ck"
    assert run2(world, "xlm-roberta", "nusax", "--adapter", "lora", "--translate-train", "--path_mt",
                str(tr / "nusax" / "translate-sun-nllb"), "--fusion_fn", "mul", tgt="sun", out=out) == 0
    res = json.loads(next(out.glob("*/results_test.json")).read_text())
    assert res["fusion_calls_train"] > 0 and res["fusion_calls_eval"] > 0


def test_train_flare_sh_runs_with_overrides(world, tmp_path):
    env = dict(os.environ, TASK="nusax", PLM=str(world["models"] / "xlm-roberta"), TGT="jav", MODE="flare",
               FUSION_FN="mul", MT="reference", SEED="3", OUTPUT_DIR=str(world["ck"]), TRANSLATIONS=str(world["tr"]),
               DATA_DIR=str(DATA), BF16="0", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    proc = subprocess.run(["bash", "train_flare.sh", "--max_train_samples", "16", "--max_eval_samples", "8",
                           "--max_steps", "2", "--batch_size", "8"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--load_ckpt" in proc.stdout  # the original script forgot it and crashed
    _, res = results(world, "nusax-en-jav-xlm-roberta-3-lora-8_mul-translate-jav-reference-ttrain")
    assert res["mode"] == "flare" and res["fusion_calls_train"] > 0
    bad = subprocess.run(["bash", "train_flare.sh"], cwd=REPO, env=dict(env, MODE="nope"), capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "unknown MODE" in bad.stderr


# ---------------------------------------------------------------------------------------------- bad input
def bad(world, tmp_path, capsys, *argv, family="xlm-roberta", task="nusax", load=True):
    out = tmp_path / "out"
    args = ["--task", task, "--plm", str(world["models"] / family), "--target_lang", "jav", "--seed", "3",
            "--data_dir", str(DATA), "--output_dir", str(out), *argv]
    if load:
        args += ["--load_ckpt", str(world["ck"] / f"{task}-en-{family}-3")]
    code = stage2.main(args)
    assert code == 2
    assert not out.exists() or not any(out.iterdir()), "a failed run wrote files"
    return capsys.readouterr().err


def test_flare_without_translation_files_names_the_command(world, tmp_path, capsys):
    err = bad(world, tmp_path, capsys, "--adapter", "lora", "--translate-train", "--path_mt",
              str(world["tr"] / "nusax" / "translate-jav-nllb-3.3b"), "--fusion_fn", "add")
    assert "missing translation file" in err and "python run_translate.py --task nusax" in err


def test_translation_rows_must_line_up(world, tmp_path, capsys):
    tr = tmp_path / "tr" / "nusax"
    for name in ("translate-jav-reference", "translate-en-reference"):
        (tr / name).mkdir(parents=True)
        for f in (world["tr"] / "nusax" / name).glob("*.parquet"):
            df = pd.read_parquet(f)
            if f.name.startswith("test_"):
                df = df.iloc[::-1].reset_index(drop=True)  # rows shuffled against the target test set
            df.to_parquet(tr / name / f.name, index=False)
    err = bad(world, tmp_path, capsys, "--adapter", "lora", "--translate-train", "--path_mt",
              str(tr / "translate-jav-reference"), "--fusion_fn", "add")
    assert "does not line up" in err and "--overwrite" in err


@pytest.mark.parametrize("argv,message", [
    (["--adapter", "lora", "--fusion_fn", "add", "--input_fusion"], "--fusion_fn and --input_fusion"),
    (["--adapter", "lora", "--fuse_mt", "--mt_model", "nllb-600m"], "--fuse_mt needs --fusion_fn"),
    (["--adapter", "lora", "--fusion_fn", "add", "--fuse_mt"], "--fuse_mt needs --mt_model"),
    (["--adapter", "lora", "--fusion_fn", "add"], "--translate-train --path_mt"),
    (["--fusion_fn", "add"], "add --adapter lora"),
    ([], "no mode selected"),
    (["--eval_zs", "--translate-test"], "select different modes"),
    (["--translate-test"], "--translate-test needs --path_mt"),
    (["--adapter", "lora", "--translate-train", "--path_mt", "x", "--fusion_fn", "cross-attention",
      "--cross_attention_heads", "3"], "must be positive and"),
])
def test_bad_flags(world, tmp_path, capsys, argv, message):
    assert message in bad(world, tmp_path, capsys, *argv)


def test_adapter_without_load_ckpt(world, tmp_path, capsys):
    err = bad(world, tmp_path, capsys, "--adapter", "lora", "--translate-train", "--path_mt", "x", load=False)
    assert "--load_ckpt is required" in err and "run_task_ft.py" in err


def test_load_ckpt_of_another_task_or_model(world, tmp_path, capsys):
    other_task = ["--load_ckpt", str(world["ck"] / "tydiqa-en-xlm-roberta-3"), "--eval_zs"]
    assert "was trained for task 'tydiqa'" in bad(world, tmp_path, capsys, *other_task, load=False)
    other_model = ["--load_ckpt", str(world["ck"] / "nusax-en-llama-3"), "--eval_zs"]
    assert "with model 'llama'" in bad(world, tmp_path, capsys, *other_model, load=False)


def test_mt_columns_are_padded_like_the_model(world):
    """Regression: the original right-padded the MT sequence and left-padded the LLM's."""
    from flare.data.features import PadCollator

    collate = PadCollator(0, "left", pad_values={"mt_input_ids": 1})
    batch = collate([{"input_ids": [5, 6], "attention_mask": [1, 1], "mt_input_ids": [7, 8, 9],
                      "mt_attention_mask": [1, 1, 1]},
                     {"input_ids": [5], "attention_mask": [1], "mt_input_ids": [7], "mt_attention_mask": [1]}])
    assert batch["mt_input_ids"][1].tolist() == [1, 1, 7] and batch["mt_attention_mask"][1].tolist() == [0, 0, 1]
    assert batch["input_ids"][1].tolist() == [0, 5]


def _stage2(world, family, quantize, *flags):
    """(cfg, tokenizer, probe batch, stage-1 model loaded on its own) for a FLARE/LoRA stage-2 run."""
    from flare.data.features import PadCollator
    from flare.models.loading import load_checked, load_model, load_tokenizer

    ck = world["ck"] / ("q4" if family == "xlm-roberta" and quantize == "4bit" else "")
    args = stage2.build_parser().parse_args(
        ["--task", "nusax", "--plm", str(world["models"] / family), "--target_lang", "jav", "--seed", "3",
         "--load_ckpt", str(ck / f"nusax-en-{family}-3"), "--data_dir", str(DATA), "--adapter", "lora",
         "--translate-train", "--path_mt", str(world["tr"] / "nusax" / "translate-jav-reference"),
         "--max_eval_samples", "4", "--cross_attention_heads", "2", *flags])
    cfg = stage2.resolve_config(args)
    assert cfg.quantize == quantize
    tok = load_tokenizer(cfg.spec)
    feats = stage2._features(cfg, stage2.load_data(cfg).validation, tok, None, train=False)
    probe = PadCollator(tok.pad_token_id, tok.padding_side)([dict(r) for r in feats])
    stage1_model = load_checked(load_model(cfg.spec, "nusax", quantize=quantize, device="cpu", bf16=False),
                                cfg.load_ckpt, is_trainable=False, adapter_name="lora").eval()
    return cfg, tok, probe, stage1_model


def _randomise_new_b(model):
    import torch

    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B.default" in name:
            p.data.normal_(0, 0.5)


EXACT_CASES = [("xlm-roberta", "none"), ("xlm-roberta", "4bit"), ("llama", "4bit")]


@pytest.mark.parametrize("fn", [None, *FUSION_FNS])
@pytest.mark.parametrize("family,quantize", EXACT_CASES)
def test_fresh_stage2_model_is_exactly_the_stage1_model(world, family, quantize, fn):
    """Stage 2 starts where stage 1 ended, bit for bit, on 4-bit encoders and decoders too: the stage-1 adapter stays
    unmerged and frozen under the new one (merging into NF4 re-quantises), for every fusion function."""
    import torch

    from flare.models.stack import active_adapters

    cfg, tok, probe, stage1_model = _stage2(world, family, quantize, *(["--fusion_fn", fn] if fn else []))
    model, fusion, start = stage2.build_model(cfg, tok, probe)
    assert start == {"stage1_start_max_abs_diff": 0.0}  # the guard, on the same object before/after stacking
    assert (fusion is None) == (fn is None)
    with torch.no_grad():
        expected = stage2.model_outputs(stage1_model, probe)
    assert torch.equal(stage2.model_outputs(model, probe, fusion), expected)  # an independently loaded stage 1
    assert all(names == ["lora", "default"] for names in active_adapters(model).values())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and not any(".lora." in n for n in trainable)  # the stage-1 adapter is frozen
    if fusion is None:
        return
    # the English source pass is the stage-1 model's, whatever the new adapter has learnt
    _randomise_new_b(model)
    src = {k[len("src_"):]: v for k, v in probe.items() if k.startswith("src_")}
    with torch.no_grad():
        hidden = stage1_model(**src, output_hidden_states=True).hidden_states
    captured = fusion.capture(probe)
    assert len(captured) == len(hidden) - 1
    assert all(torch.equal(c, h) for c, h in zip(captured, hidden))
    if fn == "add":  # a zero source: FLARE add is the plain stacked LoRA, exactly
        zero = dict(probe, src_attention_mask=torch.zeros_like(probe["src_attention_mask"]))
        fused = stage2.model_outputs(model, zero, fusion)
        fusion.detach()
        assert torch.equal(fused, stage2.model_outputs(model, probe))
        assert not torch.equal(fused, expected)


def test_requantized_merge_is_recorded_not_exact(world):
    """--stage1_merge requantize reproduces the original's merge into 4-bit weights: the start differs from the
    stage-1 model, which the run records (and does not refuse)."""
    cfg, tok, probe, _ = _stage2(world, "llama", "4bit", "--fusion_fn", "add_relu", "--stage1_merge", "requantize")
    model, fusion, start = stage2.build_model(cfg, tok, probe)
    assert start["stage1_start_max_abs_diff"] > stage2.STAGE1_TOLERANCE
    assert "lora" not in model.peft_config  # merged away


def test_stage2_run_records_its_exact_start_and_saves_only_the_new_adapter(world):
    assert run2(world, "llama", "nusax", *train_flags(world, "nusax", "jav"), "--fusion_fn", "cross-attention") == 0
    run_dir, res = results(world, "nusax-en-jav-llama-3-lora-8_cross-attention-translate-jav-reference-ttrain")
    assert res["stage1_start_max_abs_diff"] == 0.0 and res["stage1_merge"] == "none"
    assert not (run_dir / "lora").exists() and not any((run_dir).glob("checkpoint-*/lora"))
    saved = load_file(str(run_dir / "adapter_model.safetensors"))
    stage1_saved = load_file(str(world["ck"] / "nusax-en-llama-3" / "adapter_model.safetensors"))
    assert saved.keys() == stage1_saved.keys()  # the new adapter alone, in stage 1's layout
    lines = [json.loads(x) for x in (run_dir / "predictions_test.jsonl").read_text().splitlines()]
    assert all(isinstance(x["output"], str) for x in lines)  # decoders keep the raw generated text


def test_input_fusion_formats(tiny_models):
    """Regression: the original joined NusaX texts with no separator and its TyDiQA LLM prompt lacked the newline
    before "Answer: "."""
    from transformers import AutoTokenizer

    from flare.config import resolve_model
    from flare.data.stage2_features import target_features
    from flare.prompts import INPUT_FUSION_TEMPLATES, decoder_prompt

    tok = AutoTokenizer.from_pretrained(tiny_models / "xlm-roberta")
    batch = {"text": ["aku seneng"], "src_text": ["I like it"], "label": [2]}
    enc = target_features(batch, task="nusax", spec=resolve_model(str(tiny_models / "xlm-roberta")), tokenizer=tok,
                          max_length=64, doc_stride=16, train=True, input_fusion=True)
    ids = enc["input_ids"][0]
    assert ids.count(tok.sep_token_id) >= 2 and enc["labels"] == [2]  # <s> English </s></s> target </s>
    first_sep = ids.index(tok.sep_token_id)
    assert tok.decode(ids[1:first_sep]).strip() == "I like it"
    prompt = decoder_prompt("tydiqa", {"src_context": "c1", "src_question": "q1", "context": "c2", "question": "q2"},
                            INPUT_FUSION_TEMPLATES["tydiqa"])
    assert prompt == "Context: c1\nQuestion: q1\n\nContext: c2\nQuestion: q2\nAnswer: "


def test_match_windows_pairs_window_k_with_english_window_k():
    from flare.data.stage2_features import match_windows

    # example 0: 3 target windows, 2 English windows; example 1: 1 and 1
    assert match_windows([0, 0, 0, 1], [0, 0, 1]) == [0, 1, 1, 2]


def test_encoder_qa_windows_fuse_with_the_matching_english_window(tiny_models):
    """Regression: every doc-stride window of a long context was fused with the same English sequence."""
    from transformers import AutoTokenizer

    from flare.config import resolve_model
    from flare.data.stage2_features import stage2_features

    tok = AutoTokenizer.from_pretrained(tiny_models / "xlm-roberta")
    spec = resolve_model(str(tiny_models / "xlm-roberta"))
    words = " ".join(f"w{i}" for i in range(120))
    batch = {"id": ["a"], "question": ["q?"], "context": [words], "src_question": ["q?"], "src_context": [words],
             "answers": [{"text": ["w3"], "answer_start": [words.index("w3")]}]}
    out = stage2_features(batch, task="tydiqa", spec=spec, tokenizer=tok, max_length=64, doc_stride=16, train=True,
                          mode="flare")
    n = len(out["input_ids"])
    assert n >= 3
    assert out["src_input_ids"] == out["input_ids"]  # same text: window k of the target is English window k
    short = dict(batch, src_context=[" ".join(f"w{i}" for i in range(40))])
    out = stage2_features(short, task="tydiqa", spec=spec, tokenizer=tok, max_length=64, doc_stride=16, train=True,
                          mode="flare")
    src = out["src_input_ids"]
    assert src[0] != src[1] and src[-1] == src[-2]  # fewer English windows: the later ones reuse the last


@pytest.mark.parametrize("train", [False, True])
def test_flare_mt_text_is_truncated_like_the_model_prompt(tiny_models, train):
    """Regression: the MT text was the full prompt cut on the right (losing "Sentiment: ") while the model's prompt
    was shortened inside its text; both now keep the template's end and read the same shortened text."""
    from transformers import AutoTokenizer

    from flare.config import resolve_model
    from flare.data.features import decoder_features
    from flare.data.stage2_features import mt_texts

    tok = AutoTokenizer.from_pretrained(tiny_models / "llama")
    mt_tok = AutoTokenizer.from_pretrained(tiny_models / "nllb")
    spec = resolve_model(str(tiny_models / "llama"))
    text = " ".join(["panganan iki enak banget lan regane murah"] * 30)
    batch = {"text": [text], "label": [2]}
    (mt_text,) = mt_texts(batch, task="nusax", spec=spec, tokenizer=tok, mt_tokenizer=mt_tok, max_length=48,
                          train=train)
    assert mt_text.endswith("\nSentiment: ") and len(mt_text) < len(text)
    assert len(mt_tok(mt_text, truncation=False)["input_ids"]) <= 48
    model_ids = decoder_features(batch, "nusax", tok, 48, train=train)["input_ids"][0]
    model_prompt = tok.decode(model_ids, skip_special_tokens=True)
    shown = mt_text[: -len("\nSentiment: ")]
    assert model_prompt.startswith(shown.strip()[:40]) and text.startswith(shown)


def test_frozen_stage1_adapter_applies_no_dropout_in_stage2_training(world, tmp_path):
    """A stage 1 trained with --lora_dropout 0.5: in stage 2 its adapter is a frozen part of the start model, so a
    training-mode forward of the fresh stage-2 model (base dropout off) equals the eval-mode one (regression: the
    frozen adapter kept dropping its update at random in every stage-2 training step; the start check, in eval
    mode, could not see it)."""
    import torch

    ck = tmp_path / "ck"
    assert stage1.main(["--task", "nusax", "--plm", str(world["models"] / "xlm-roberta"), "--output_dir", str(ck),
                        *FAST, "--lora_dropout", "0.5"]) == 0
    world = dict(world, ck=ck)
    cfg, tok, probe, _ = _stage2(world, "xlm-roberta", "none", "--stage1_merge", "none")  # stacked, not merged
    model, _, start = stage2.build_model(cfg, tok, probe)
    assert start == {"stage1_start_max_abs_diff": 0.0}
    for name, m in model.named_modules():  # the base model's own dropout off: only the adapters' could differ
        if isinstance(m, torch.nn.Dropout) and "lora_dropout" not in name:
            m.p = 0.0
    inputs = {k: v for k, v in probe.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.no_grad():
        model.eval()
        evaluated = model(**inputs).logits
        model.train()
        trained = model(**inputs).logits
    assert torch.equal(trained, evaluated)


def test_gemma_tied_embedding_is_trained_as_one_matrix_in_stage2(world, tmp_path):
    """Gemma ties lm_head to the input embedding. Stage 1 trains the tied matrix (one weight for both); stage 2 must
    train it as one too, as the original did: the new adapter's embedding copy and head copy are one trainable
    Parameter, active, starting from stage 1's, and after training steps the embedding the model reads equals the
    head it predicts with. Regression: the new adapter trained a head copy only, which drifted from a frozen
    stage-1 embedding (0.02 after 2 steps)."""
    import torch

    from flare.config import resolve_model
    from flare.models.loading import load_checked, load_model, lora_config
    from flare.models.stack import NEW, STAGE1, stack_new_adapter

    spec = resolve_model(str(world["models"] / "gemma2"))
    model = load_checked(load_model(spec, "tydiqa", quantize="none", device="cpu", bf16=False),
                         world["ck"] / "tydiqa-en-gemma2-3", is_trainable=False, adapter_name=STAGE1)
    stage1_weight = model.get_input_embeddings().modules_to_save[STAGE1].weight.detach().clone()
    model = stack_new_adapter(model, lora_config(spec, "tydiqa", r=4, alpha=8, dropout=0.0, target_modules=None,
                                                 freeze_head=False))
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert embed.modules_to_save[NEW].weight is head.modules_to_save[NEW].weight
    assert embed.active_adapters == head.active_adapters == [NEW]
    # two vocabulary matrices, the trained one and the frozen stage-1 one: the pretrained original that neither
    # computes with shares the stage-1 copy (it used to be a third, unused one: 3.7 GB at Gemma 2 9B in fp32)
    vocab = {id(p) for p in model.parameters() if p.shape[0] == model.config.vocab_size}
    assert len(vocab) == 2 and embed.original_module.weight is embed.modules_to_save[STAGE1].weight
    assert embed.modules_to_save[NEW].weight.requires_grad and torch.equal(embed.modules_to_save[NEW].weight,
                                                                           stage1_weight)
    ids = torch.tensor([[5, 9, 17, 33, 2]])
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    used = embed.modules_to_save[embed.active_adapters[0]].weight
    assert not torch.equal(used, stage1_weight)  # the embedding the model reads was trained
    assert torch.equal(used, head.modules_to_save[head.active_adapters[0]].weight)

    # end to end: the run's saved adapter restores one tied matrix
    assert run2(world, "gemma2", "tydiqa", *train_flags(world, "tydiqa", "sw", "identity"), "--lr", "1e-2",
                out=tmp_path) == 0
    path = next(tmp_path.glob("tydiqa-en-sw-gemma2-3-*")) / "adapter_model.safetensors"
    saved = load_file(str(path))
    tied = [k for k in saved if k.endswith(("embed_tokens.weight", "lm_head.weight"))]
    assert len(tied) == 1 and tied[0].endswith("embed_tokens.weight")  # stored once (peft writes it twice)
    assert not torch.equal(saved[tied[0]], stage1_weight)
    from flare.models.loading import load_adapter_state

    restored, ties = load_adapter_state(path)  # the head key comes back from the file's metadata
    assert ties == {tied[0]: [tied[0].replace("model.embed_tokens", "lm_head")]}
    assert restored[ties[tied[0]][0]] is restored[tied[0]]


def test_validation_set_target_selects_on_what_the_test_set_looks_like(world, tmp_path):
    """--validation_set target (issue 29, item 5): under a real MT the fusion modes used to select their checkpoint
    on the GOLD English validation set (paired with the MT of it into the target language), while at test time they
    read the MT English of the real target text. With the flag, validation is paired as the test set is: the human
    target-language validation set and its MT into English; LoRA validates on the human target text alone. The
    default keeps the original's translated validation set; the run name says which (-valtarget)."""
    from flare.data import load_task
    from flare.data.layout import split_file

    tr = tmp_path / "tr"
    for src, tgt, splits in (("en", "jav", None), ("jav", "en", ("validation", "test"))):
        run_job(TranslateJob("nusax", src, tgt, "lexical", output_dir=tr, data_dir=str(DATA), splits=splits))

    def loaded(*flags):
        argv = ["--task", "nusax", "--plm", str(world["models"] / "xlm-roberta"), "--target_lang", "jav",
                "--output_dir", str(tmp_path / "out"), "--load_ckpt", str(world["ck"] / "nusax-en-xlm-roberta-3"),
                *FAST, "--adapter", "lora", "--translate-train", "--path_mt",
                str(tr / "nusax" / "translate-jav-lexical"), *flags]
        cfg = stage2.resolve_config(stage2.build_parser().parse_args(argv))
        return cfg, stage2.load_data(cfg).validation

    human = load_task("nusax", "jav", "validation", str(DATA))
    gold_en = load_task("nusax", "en", "validation", str(DATA))
    mt_en = pd.read_parquet(tr / "nusax" / "translate-en-lexical" / split_file("validation", "jav", "en"))
    cfg, val = loaded("--fusion_fn", "add_relu", "--validation_set", "target")
    n = len(val)
    assert cfg.run_name.endswith("-ttrain-valtarget") and n == 8
    assert val["text"] == human["text"][:n] and val["label"] == human["label"][:n]
    assert val["src_text"] == list(mt_en["text_translated"])[:n] != gold_en["text"][:n]
    cfg, val = loaded("--fusion_fn", "add_relu")  # the original's: gold English, MT target text
    assert not cfg.run_name.endswith("-valtarget")
    assert val["src_text"] == gold_en["text"][:n] and val["text"] != human["text"][:n]
    _, val = loaded("--validation_set", "target")  # translate-train LoRA: the target text alone, as at test time
    assert val["text"] == human["text"][:n] and "src_text" not in val.column_names
    # end to end, and the sweep translates the backward validation split when asked
    assert run2(world, "xlm-roberta", "nusax", "--adapter", "lora", "--translate-train", "--path_mt",
                str(tr / "nusax" / "translate-jav-lexical"), "--fusion_fn", "add_relu", "--validation_set", "target",
                out=tmp_path / "ck") == 0
    (res,) = [json.loads(p.read_text()) for p in (tmp_path / "ck").glob("*-valtarget/results_test.json")]
    assert res["validation_set"] == "target" and res["fusion_calls_train"] > 0
    from flare import sweep

    plan = sweep.plan(sweep.build_parser().parse_args(
        ["--task", "nusax", "--plm", "xlmr", "--langs", "jav", "--modes", "flare", "--mt", "lexical",
         "--stage2_args", "--validation_set target"]))
    backward = next(j for j in plan if j.name == "translate nusax jav->en")
    assert backward.argv[backward.argv.index("--splits") + 1:][:2] == ["validation", "test"]


@pytest.mark.parametrize("argv, message", [
    (["--eval_zs", "--eval_only", "--validation_set", "target"], "trains none"),
])
def test_validation_set_target_needs_a_training_mode(world, tmp_path, capsys, argv, message):
    assert run2(world, "xlm-roberta", "nusax", *argv, out=tmp_path) == 2
    assert message in capsys.readouterr().err
    assert run2(world, "xlm-roberta", "tydiqa", "--validation_set", "target", *train_flags(world, "tydiqa", "sw",
                                                                                          "identity"),
                out=tmp_path) == 2
    assert "TyDiQA has no target-language validation set" in capsys.readouterr().err


@pytest.mark.parametrize("mode_flags", [["--fusion_fn", "cross-attention"], ["--input_fusion"]])
def test_eval_stage2_reevaluates_a_trained_run_exactly_and_with_other_test_english(world, tmp_path, mode_flags):
    """--eval_stage2 RUN (issue 29, item 4: a model trained with one MT, tested with another's English): the trained
    adapter, head and fusion modules loaded on the stage-1 model (verified); with the run's own translations it gives
    the run's own test predictions exactly; with another MT's English (here the lexical MT's) the test input
    changes, the model does not; the result names the run and the translations, in a directory of its own."""
    flags = [*train_flags(world, "nusax", "jav"), *mode_flags]
    assert run2(world, "xlm-roberta", "nusax", *flags, "--lr", "1e-2", out=tmp_path / "trained") == 0
    (trained,) = [p.parent for p in (tmp_path / "trained").glob("*/results_test.json")]
    again = ["--eval_stage2", str(trained), "--output_dir", str(tmp_path / "again")]
    assert stage2.main(again) == 0
    (same,) = [p.parent for p in (tmp_path / "again").glob("*/results_test.json")]
    assert same.name == trained.name + "-evaltest-translate-jav-reference"
    assert (same / "predictions_test.jsonl").read_text() == (trained / "predictions_test.jsonl").read_text()
    res = json.loads((same / "results_test.json").read_text())
    assert res["evaluated_run"] == str(trained) and res["mode"] == json.loads(
        (trained / "results_test.json").read_text())["mode"] and "train_runtime" not in res
    lexical = tmp_path / "tr"
    run_job(TranslateJob("nusax", "jav", "en", "lexical", output_dir=lexical, data_dir=str(DATA), splits=("test",)))
    other = lexical / "nusax" / "translate-en-lexical"
    assert stage2.main([*again, "--path_mt", str(other), "--output_dir", str(tmp_path / "other")]) == 0
    (moved,) = [p.parent for p in (tmp_path / "other").glob("*/results_test.json")]
    assert moved.name == trained.name + "-evaltest-translate-en-lexical"
    assert json.loads((moved / "results_test.json").read_text())["test_translations"] == str(other)
    cfg = stage2.resolve_config(stage2.build_parser().parse_args(stage2.with_evaluated_run_identity(
        [*again, "--path_mt", str(other)])))
    test = stage2.load_data(cfg).test  # the English the fusion reads at test time is the lexical MT's
    mt = pd.read_parquet(other / "test_jav-en.parquet")["text_translated"]
    assert cfg.eval_stage2 == trained and not cfg.trains and test["src_text"] == list(mt)[:len(test)]


def test_eval_stage2_refuses_what_is_not_a_trained_stage2_run(world, tmp_path, capsys):
    assert stage2.main(["--eval_stage2", str(world["ck"] / "nusax-en-xlm-roberta-3"), "--output_dir",
                        str(tmp_path)]) == 2
    assert "not a trained stage-2 run" in capsys.readouterr().err


def test_an_encoder_input_longer_than_its_positions_is_capped(world):
    """Input-level fusion doubles max_length (TyDiQA: 384 -> 768), past XLM-R's and me5-small's 512 positions: it is
    capped at the tokenizer's model_max_length (it failed inside the position embeddings); decoders are not."""
    from types import SimpleNamespace

    args = stage2.build_parser().parse_args(
        ["--task", "tydiqa", "--plm", str(world["models"] / "xlm-roberta"), "--target_lang", "sw", "--seed", "3",
         "--load_ckpt", str(world["ck"] / "tydiqa-en-xlm-roberta-3"), "--data_dir", str(DATA), "--adapter", "lora",
         "--translate-train", "--path_mt", str(world["tr"] / "tydiqa" / "translate-sw-identity"), "--input_fusion",
         "--max_length", "384"])
    cfg = stage2.resolve_config(args)
    assert cfg.max_length == 768
    assert stage2.within_positions(cfg, SimpleNamespace(model_max_length=512)).max_length == 512
    assert stage2.within_positions(cfg, SimpleNamespace(model_max_length=1024)).max_length == 768
    assert stage2.within_positions(cfg, SimpleNamespace(model_max_length=int(1e30))).max_length == 768  # unset
