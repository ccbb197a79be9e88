"""X-Mixup (run.py --xmixup) on tiny encoders and a tiny 4-bit decoder: the mixed layer against a hand computation,
equivalence with translate-train LoRA when the mixing and the extra losses are off, decoders never attend to the
source's label tokens nor to later target tokens, the English is not read at test time, and bad flags."""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from run_checks import assert_metrics_match_predictions
from safetensors.torch import load_file
from stage2_helpers import FAST, QA, write_identity_tydiqa

from flare import stage1, stage2
from flare.common_args import UsageError
from flare.config import resolve_model
from flare.models.xmixup import XMIXUP_FILE, default_layers
from flare.translate import TranslateJob, run_job

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("xmixup")
    ck, tr = root / "ck", root / "translations"
    for family, task, extra in (("xlm-roberta", "nusax", []), ("llama", "nusax", ["--quantize", "4bit"]),
                                ("xlm-roberta", "tydiqa", QA)):
        assert stage1.main(["--task", task, "--plm", str(tiny_models / family), "--output_dir", str(ck), *FAST,
                            *extra]) == 0
    for src, tgt in (("en", "jav"), ("jav", "en")):
        run_job(TranslateJob("nusax", src, tgt, "reference", output_dir=tr, data_dir=str(DATA)))
    write_identity_tydiqa(tr, DATA)
    return {"ck": ck, "tr": tr, "models": tiny_models}


def train_argv(world, family, task, out, *extra, plm=None):
    tgt, mt = {"nusax": ("jav", "reference"), "tydiqa": ("sw", "identity")}[task]
    return ["--task", task, "--plm", str(plm or world["models"] / family), "--target_lang", tgt,
            "--output_dir", str(out), "--load_ckpt", str(world["ck"] / f"{task}-en-{family}-3"), *FAST,
            *(QA if task == "tydiqa" else []), "--adapter", "lora", "--translate-train", "--path_mt",
            str(world["tr"] / task / f"translate-{tgt}-{mt}"), *extra]


@pytest.mark.parametrize("family,task", [("xlm-roberta", "nusax"), ("llama", "nusax"), ("xlm-roberta", "tydiqa")])
def test_xmixup_trains_and_records_lambda_per_mixed_layer(world, tmp_path, family, task):
    assert stage2.main(train_argv(world, family, task, tmp_path, "--xmixup")) == 0
    run_dir = next(tmp_path.glob("*-xmixup"))
    res = json.loads((run_dir / "results_test.json").read_text())
    assert res["mode"] == "xmixup" and res["adapter_name"] == "xmixup" and res["run_name"] == run_dir.name
    assert res["xmixup_layers"] == [1, 2]  # X-Mixup's [1, 20) of 24 layers, scaled to 2
    lam = res["xmixup_lambda_last_epoch"]
    assert list(lam) == ["1"] and 0 < lam["1"] < 0.5  # λ0 · sigmoid(·) with λ0 = 0.5
    assert res["stage1_start_max_abs_diff"] == 0.0 and res["fusion_calls_train"] == 0
    assert_metrics_match_predictions(run_dir, res)
    gates = load_file(str(run_dir / XMIXUP_FILE))
    assert set(gates) == {"w", "b"} and gates["w"].shape == (1,)
    assert any(g.abs().sum() > 0 for g in gates.values())  # the gates are trained


def test_default_layers_scale_xmixups_1_to_20_of_24():
    assert default_layers(24) == (1, 20)
    assert default_layers(12) == (1, 10)
    assert default_layers(32) == (1, 27)
    assert default_layers(42) == (2, 35)
    assert default_layers(2) == (1, 2)


# ------------------------------------------------------------------------------------------- the mixed layer by hand
def _xmixup_model(world, family, *flags):
    """(model with a random new LoRA B and non-zero gates, its XMixup, one training batch (source, target))."""
    from flare.data.features import PadCollator
    from flare.models.loading import load_tokenizer

    args = stage2.build_parser().parse_args(train_argv(world, family, "nusax", world["ck"] / "unused", "--xmixup",
                                                       *flags))
    cfg = stage2.resolve_config(args)
    tok = load_tokenizer(cfg.spec)
    feats = stage2._features(cfg, stage2.load_data(cfg).train.select(range(4)), tok, None, train=True)
    batch = PadCollator(tok.pad_token_id, tok.padding_side)([dict(r) for r in feats])
    batch = {k: v for k, v in batch.items() if k != "truncated"}
    model, _, _ = stage2.build_model(cfg, tok)
    xm = stage2.make_xmixup(model, cfg)
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B.default" in name:
            p.data.normal_(0, 0.3)
    xm.gates.w.data.fill_(0.4)
    xm.gates.b.data.fill_(-0.3)
    model.eval()  # no dropout: the hand computation is deterministic
    return model, xm, *xm.split(batch)


def _capture(module, store, key, pre=False):
    if pre:
        return module.register_forward_pre_hook(
            lambda m, args, kwargs: store.setdefault(key, []).append(args[0] if args else kwargs["hidden_states"]),
            with_kwargs=True)
    return module.register_forward_hook(
        lambda m, args, out: store.setdefault(key, []).append(out[0] if isinstance(out, tuple) else out))


def _captured_passes(model, xm, source, target, layer, extra) -> dict:
    """X-Mixup's two passes (no grad) with the mixed layer's inputs and outputs, and ``extra`` = (module, key,
    pre-hook?), captured by hooks that run before X-Mixup's (its own output, unmixed)."""
    store: dict = {}
    xm.detach()
    handles = [_capture(layer, store, "in", pre=True), _capture(layer, store, "out"),
               _capture(extra[0], store, extra[1], pre=extra[2])]
    xm.attach()
    try:
        with torch.no_grad():
            xm.passes(model, source, target)
    finally:
        for h in handles:
            h.remove()
    return store


def _heads(x, h):  # (B, L, H*d) -> (B, H, L, d)
    return x.view(x.shape[0], x.shape[1], h, -1).transpose(1, 2)


def _probs(q, k, key_mask, scale):
    s = (q @ k.transpose(-1, -2)) * scale
    return torch.softmax(s.masked_fill(~key_mask[:, None, None, :], float("-inf")), -1)


def _ent(p):
    return -(p * torch.log(p.clamp_min(1e-12))).sum(-1)


def test_encoder_mixed_layer_equals_a_hand_computation(world):
    """Post-LN encoder, layer 1: LN(λ·(x + O·CA(h_T; h_S)) + (1 − λ)·(x + O·SA(x))) then the feed-forward, with
    λ = λ0·sigmoid(w·H + b) and H the mean entropy of both cross-attention directions."""
    model, xm, source, target = _xmixup_model(world, "xlm-roberta")
    layer = xm.layers[0]
    store = _captured_passes(model, xm, source, target, layer, (layer.attention.output.LayerNorm, "ln_in", True))
    (x_s, x_t), (_, out_t) = store["in"], store["out"]
    att, cfg = layer.attention, model.get_base_model().config
    heads, d = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    ln = att.output.LayerNorm
    m_s, m_t = source["attention_mask"].bool(), target["attention_mask"].bool()

    def self_attention_sum(x, mask):  # x + O·SA(x): what the attention block's LayerNorm normalises
        q, k, v = (_heads(f(x), heads) for f in (att.self.query, att.self.key, att.self.value))
        ctx = (_probs(q, k, mask, d ** -0.5) @ v).transpose(1, 2).reshape(x.shape)
        return x + att.output.dense(ctx)

    with torch.no_grad():
        t_t, t_s = self_attention_sum(x_t, m_t), self_attention_sum(x_s, m_s)
        assert torch.allclose(t_s, store["ln_in"][0], atol=1e-5)  # the hand self-attention is the model's
        h_t, h_s = ln(t_t), ln(t_s)
        q_t, k_s, v_s = _heads(att.self.query(h_t), heads), _heads(att.self.key(h_s), heads), _heads(
            att.self.value(h_s), heads)
        p_ts = _probs(q_t, k_s, m_s, d ** -0.5)
        cross = x_t + att.output.dense((p_ts @ v_s).transpose(1, 2).reshape(x_t.shape))
        p_st = _probs(_heads(att.self.query(h_s), heads), _heads(att.self.key(h_t), heads), m_t, d ** -0.5)
        ent = 0.5 * ((_ent(p_ts).mean(1) * m_t).sum(-1) / m_t.sum(-1) + (_ent(p_st).mean(1) * m_s).sum(-1)
                     / m_s.sum(-1))
        lam = 0.5 * torch.sigmoid(0.4 * ent - 0.3)
        mixed = ln(lam[:, None, None] * cross + (1 - lam[:, None, None]) * t_t)
        expected = layer.output(layer.intermediate(mixed), mixed)
    assert torch.allclose(out_t[m_t], expected[m_t], atol=1e-5)
    assert not torch.allclose(out_t[m_t], layer(x_t)[0][m_t] if isinstance(layer(x_t), tuple) else layer(x_t)[m_t],
                              atol=1e-3)  # the mixing changed the layer
    assert 0.0 < float(lam.min()) and float(lam.max()) < 0.5


def test_decoder_mixed_layer_equals_a_hand_computation(world):
    """Pre-LN 4-bit decoder, layer 1: x + λ_j·O·CA + (1 − λ_j)·O·SA then the feed-forward; the cross-attention reads
    the source's prompt tokens only, λ_j from the running mean of the target-over-source entropy up to j."""
    model, xm, source, target = _xmixup_model(world, "llama")
    layer = xm.layers[0]
    store = _captured_passes(model, xm, source, target, layer, (layer.self_attn, "attn", False))
    (x_s, x_t), (a_s, a_t), (_, out_t) = store["in"], store["attn"], store["out"]
    cfg, attn = model.get_base_model().config, layer.self_attn
    heads, d = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    groups = heads // cfg.num_key_value_heads  # grouped-query attention: each key/value head serves `groups` heads
    assert groups > 1
    prompt = source["attention_mask"].bool() & (source["labels"] == -100)
    m_t = target["attention_mask"].bool()
    with torch.no_grad():
        t, s = x_t + a_t, x_s + a_s
        q = _heads(attn.q_proj(layer.input_layernorm(t)), heads)
        k, v = (_heads(f(layer.input_layernorm(s)), cfg.num_key_value_heads).repeat_interleave(groups, dim=1)
                for f in (attn.k_proj, attn.v_proj))
        p = _probs(q, k, prompt, d ** -0.5)
        a_c = attn.o_proj((p @ v).transpose(1, 2).reshape(t.shape))
        per_pos = _ent(p).mean(1) * m_t
        running = per_pos.cumsum(-1) / m_t.float().cumsum(-1).clamp_min(1)
        lam = (0.5 * torch.sigmoid(0.4 * running - 0.3))[..., None]
        h = x_t + lam * a_c + (1 - lam) * a_t
        expected = h + layer.mlp(layer.post_attention_layernorm(h))
    assert torch.allclose(out_t[m_t], expected[m_t], atol=1e-4)


# ------------------------------------------------------------------------------------------- decoders: no leaks
def test_decoder_target_never_sees_the_source_labels_nor_later_target_tokens(world):
    model, xm, source, target = _xmixup_model(world, "llama")
    with torch.no_grad():
        _, out = xm.passes(model, source, target)
        base_logits, base_ce = out.logits.clone(), float(out.loss)
        # the source's answer (label) tokens changed: the target's outputs and loss do not move
        changed = dict(source)
        answer = source["labels"] != -100
        changed["input_ids"] = torch.where(answer, (source["input_ids"] + 7) % 4000, source["input_ids"])
        changed["labels"] = torch.where(answer, changed["input_ids"], source["labels"])
        _, out2 = xm.passes(model, changed, target)
        assert torch.equal(out2.logits, base_logits) and float(out2.loss) == base_ce
        # a later target token changed: no earlier target position moves (left padding: the last column is the end)
        j = target["input_ids"].shape[1] - 2
        later = dict(target)
        later["input_ids"] = target["input_ids"].clone()
        later["input_ids"][:, j] = (later["input_ids"][:, j] + 11) % 4000
        _, out3 = xm.passes(model, source, later)
        assert torch.allclose(out3.logits[:, :j], base_logits[:, :j], atol=1e-6)
        assert not torch.allclose(out3.logits[:, j:], base_logits[:, j:], atol=1e-4)
        # and the source's prompt does reach the target (the mixing is on)
        other = dict(source)
        prompt = (source["labels"] == -100) & source["attention_mask"].bool()
        other["input_ids"] = torch.where(prompt, (source["input_ids"] + 5) % 4000, source["input_ids"])
        _, out4 = xm.passes(model, other, target)
        assert not torch.allclose(out4.logits, base_logits, atol=1e-4)


# ------------------------------------------------------------------------------------------- equivalence with LoRA
def test_xmixup_without_mixing_and_extra_losses_is_translate_train_lora_step_for_step(world, tmp_path):
    """λ0 = 0, α = 0, no KL, no MSE: X-Mixup's target pass is the plain model and its loss the target CE, so training
    equals translate-train LoRA (a dropout-free copy of the model: the English pass would draw dropout masks)."""
    plm = tmp_path / "models" / "xlm-roberta"
    shutil.copytree(world["models"] / "xlm-roberta", plm)
    config = json.loads((plm / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
    (plm / "config.json").write_text(json.dumps(config))
    flags = ["--lora_dropout", "0", "--max_steps", "3"]
    assert stage2.main(train_argv(world, "xlm-roberta", "nusax", tmp_path / "lora", *flags, plm=plm)) == 0
    assert stage2.main(train_argv(world, "xlm-roberta", "nusax", tmp_path / "xm", *flags, "--xmixup",
                                  "--xmixup_lambda0", "0", "--xmixup_alpha", "0", "--xmixup_kl", "0",
                                  "--xmixup_mse", "0", plm=plm)) == 0
    lora_dir, xm_dir = next((tmp_path / "lora").iterdir()), next((tmp_path / "xm").iterdir())
    lora, xm = (load_file(str(d / "adapter_model.safetensors")) for d in (lora_dir, xm_dir))
    assert set(lora) == set(xm)
    for k in lora:
        assert torch.allclose(lora[k], xm[k], atol=1e-6, rtol=0), k
    assert any(not torch.equal(lora[k], torch.zeros_like(lora[k])) for k in lora if "lora_B" in k)  # trained
    res_l = json.loads((lora_dir / "results_test.json").read_text())
    res_x = json.loads((xm_dir / "results_test.json").read_text())
    assert math.isclose(res_l["train_loss"], res_x["train_loss"], rel_tol=1e-6)
    assert res_l["test_f1"] == res_x["test_f1"]
    # with its defaults X-Mixup trains something else
    assert stage2.main(train_argv(world, "xlm-roberta", "nusax", tmp_path / "xm2", *flags, "--xmixup", plm=plm)) == 0
    xm2 = load_file(str(next((tmp_path / "xm2").iterdir()) / "adapter_model.safetensors"))
    assert any(not torch.allclose(lora[k], xm2[k], atol=1e-6) for k in lora if "lora_B" in k)


def test_test_time_reads_no_english(world, tmp_path):
    """X-Mixup predicts from the target text alone: re-evaluated with no English test translation at all, the
    predictions are the run's own."""
    assert stage2.main(train_argv(world, "xlm-roberta", "nusax", tmp_path / "run", "--xmixup")) == 0
    run_dir = next((tmp_path / "run").iterdir())
    alone = tmp_path / "tr" / "nusax" / "translate-jav-reference"
    shutil.copytree(world["tr"] / "nusax" / "translate-jav-reference", alone)  # no translate-en-* beside it
    assert stage2.main(["--eval_stage2", str(run_dir), "--path_mt", str(alone), "--output_dir",
                        str(tmp_path / "eval")]) == 0
    again = next((tmp_path / "eval").iterdir())
    assert (again / "predictions_test.jsonl").read_bytes() == (run_dir / "predictions_test.jsonl").read_bytes()


# ------------------------------------------------------------------------------------------- bad flags
@pytest.mark.parametrize("flags,message", [
    (["--xmixup", "--xmixup_layers", "1", "1"], "need 0 <= START < END"),
    (["--xmixup", "--xmixup_layers", "0", "3"], "the model has 2 layers"),
    (["--xmixup", "--xmixup_lambda0", "1.5"], "--xmixup_lambda0 1.5 must lie in [0, 1]"),
    (["--xmixup", "--xmixup_alpha", "-0.1"], "--xmixup_alpha -0.1 must lie in [0, 1]"),
    (["--xmixup", "--xmixup_kl", "-1"], "is a loss weight"),
    (["--xmixup_alpha", "0.5"], "only apply to X-Mixup: add --xmixup"),
    (["--xmixup_layers", "0", "1"], "only apply to X-Mixup"),
    (["--xmixup", "--fusion_fn", "add"], "--xmixup and --fusion_fn are two different methods"),
    (["--xmixup", "--input_fusion"], "--xmixup and --input_fusion are two different methods"),
    (["--xmixup", "--gradient_checkpointing"], "cannot tell"),
])
def test_bad_xmixup_flags_fail_before_any_model_is_loaded(world, tmp_path, capsys, monkeypatch, flags, message):
    import flare.models.loading

    def no_model(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(flare.models.loading, "load_model", no_model)
    out = tmp_path / "out"
    assert stage2.main(train_argv(world, "xlm-roberta", "nusax", out, *flags)) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


def test_a_family_whose_attention_cannot_be_reused_is_refused_by_name(world, tiny_models):
    args = argparse.Namespace(xmixup_layers=None, xmixup_alpha=0.4, xmixup_lambda0=0.5, xmixup_kl=1.0,
                              xmixup_mse=1.0, gradient_checkpointing=False, plm=str(tiny_models / "xlm-roberta-xl"))
    with pytest.raises(UsageError, match="pre-LN"):
        stage2.check_xmixup(args, "xmixup", resolve_model(args.plm), world["ck"] / "nusax-en-xlm-roberta-3")


# ------------------------------------------------------------------------------------------- drivers
@pytest.mark.parametrize("family", ["xlm-roberta", "llama"])
def test_train_flare_sh_mode_xmixup_on_a_tiny_encoder_and_a_tiny_4bit_decoder(world, tmp_path, family):
    import os
    import subprocess
    import sys

    out = tmp_path / "ck"
    shutil.copytree(world["ck"] / f"nusax-en-{family}-3", out / f"nusax-en-{family}-3")
    env = dict(os.environ, TASK="nusax", PLM=str(world["models"] / family), TGT="jav", MODE="xmixup",
               MT="reference", SEED="3", OUTPUT_DIR=str(out), TRANSLATIONS=str(world["tr"]), DATA_DIR=str(DATA),
               BF16="0", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    proc = subprocess.run(["bash", "train_flare.sh", "--max_train_samples", "16", "--max_eval_samples", "8",
                           "--max_steps", "2", "--batch_size", "8"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run_dir = out / f"nusax-en-jav-{family}-3-lora-8-translate-jav-reference-ttrain-xmixup"
    res = json.loads((run_dir / "results_test.json").read_text())
    assert res["mode"] == "xmixup" and res["xmixup_lambda_last_epoch"]["1"] > 0
    assert res["quantize"] == ("4bit" if family == "llama" else "none")


def test_the_sweep_runs_xmixup_as_a_mode(tmp_path):
    from flare import sweep

    args = sweep.build_parser().parse_args(
        ["--task", "nusax", "--plm", "me5-small", "--langs", "jav", "--modes", "lora", "xmixup", "--seeds", "1",
         "--mt", "reference", "--output_dir", str(tmp_path / "ck"), "--translations", str(tmp_path / "tr")])
    job = next(j for j in sweep.plan(args) if j.name == "xmixup jav seed 1")
    assert "--xmixup" in job.argv and "--translate-train" in job.argv
    (done,) = job.done_files
    assert done.parent.name == "nusax-en-jav-me5-small-1-lora-8-translate-jav-reference-ttrain-xmixup"
