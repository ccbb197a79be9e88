"""Invariants of the FLARE fusion (flare.models.fusion) on tiny real transformers + peft models."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from flare.config import resolve_model
from flare.models.fusion import (
    FUSION_FILE,
    FUSION_FNS,
    CrossAttentionFusion,
    Fusion,
    FusionError,
    align,
    find_layers,
    fuse,
)
from flare.models.loading import MTEncoder, load_model, load_tokenizer, lora_config


# ---------------------------------------------------------------------------------------------- pure functions
def test_align_right_padding_is_position_wise_and_masks_padding():
    src = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    tgt = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    index, valid = align(src, tgt, "right")
    assert index[0].tolist() == [0, 1, 2, 3, 3]
    assert valid.tolist() == [[True, True, True, False, False], [True, True, False, False, False]]


def test_align_left_padding_aligns_prompt_ends_and_maps_answers_to_last_source_position():
    # source prompts (left padded, Ls=4): row 0 has 2 tokens, row 1 has 4
    src = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    # targets (Lt=6): row 0 = 3 prompt + 2 answer tokens; row 1 = 4 prompt + 2 answer
    tgt = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    index, valid = align(src, tgt, "left", answer_len=torch.tensor([2, 2]))
    # row 0: target prompt end at 3 <-> source 3; positions 4, 5 (answer) -> 3 (last source prompt position)
    assert index[0].tolist() == [0, 1, 2, 3, 3, 3]
    assert valid[0].tolist() == [False, False, True, True, True, True]  # target pad (0) and source pad (1)
    assert index[1].tolist() == [0, 1, 2, 3, 3, 3]
    # evaluation (prompt only): the same prompt alignment
    index_eval, _ = align(src, tgt[:, :4], "left")
    assert index_eval[0].tolist() == [0, 1, 2, 3]


def test_fusion_functions():
    s, t = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    assert torch.equal(fuse("add", torch.zeros_like(s), t), t)
    assert torch.equal(fuse("add_relu", s, t), s.relu() + t.relu())
    assert torch.equal(fuse("mul", s, t), s * t)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    # matmul: S T^T T over the unmasked target positions; matmul_relu the same on relu(S), relu(T)
    keep = t * mask[..., None]
    assert torch.allclose(fuse("matmul", s, t, mask), s @ keep.transpose(1, 2) @ keep, atol=1e-6)
    rs, rk = s.relu(), t.relu() * mask[..., None]
    assert torch.allclose(fuse("matmul_relu", s, t, mask), rs @ rk.transpose(1, 2) @ rk, atol=1e-6)
    # causal: query i uses target positions <= i only (offset shifts the query positions: decode steps)
    causal = fuse("matmul", s, t, causal=True)
    for i in range(3):
        assert torch.allclose(causal[:, i], (s[:, i:i + 1] @ t[:, :i + 1].transpose(1, 2) @ t[:, :i + 1])[:, 0],
                              atol=1e-6)
    step = fuse("matmul", s[:, 2:], t, causal=True, offset=2)
    assert torch.allclose(step, causal[:, 2:], atol=1e-6)
    xattn = CrossAttentionFusion(4, heads=2)
    out = fuse("cross-attention", s, t, torch.tensor([[1, 1, 0], [1, 1, 1]]), xattn)
    assert out.shape == (2, 3, 4)
    # a masked target key changes nothing
    t2 = t.clone()
    t2[0, 2] = 100.0
    out2 = fuse("cross-attention", s, t2, torch.tensor([[1, 1, 0], [1, 1, 1]]), xattn)
    assert torch.allclose(out[0], out2[0])
    with pytest.raises(ValueError, match="unknown fusion function"):
        fuse("mul_relu", s, t)


# ---------------------------------------------------------------------------------------------- on models
def _model(tiny_models, family, task="nusax", **kwargs):
    spec = resolve_model(str(tiny_models / family))
    tok = load_tokenizer(spec)
    base = load_model(spec, task, quantize="none", device="cpu", bf16=False, **kwargs)
    cfg = lora_config(spec, task, r=4, alpha=8, dropout=0.0, target_modules=None, freeze_head=False)
    return spec, tok, get_peft_model(base, cfg)


def _batch(tok, texts, src_texts):
    t = tok(texts, return_tensors="pt", padding=True)
    s = tok(src_texts, return_tensors="pt", padding=True)
    return {"input_ids": t["input_ids"], "attention_mask": t["attention_mask"],
            "src_input_ids": s["input_ids"], "src_attention_mask": s["attention_mask"]}


REPO_DATA = str(__import__('pathlib').Path(__file__).resolve().parents[1] / "data")
TEXTS = ["aku seneng banget karo panganan iki", "ora apik"]
SOURCES = ["I really like this food very much", "not good at all"]


def _randomise_b(model):
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)


def _logits(model, batch, fusion=None, hidden=False):
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    ctx = fusion.source(batch) if fusion is not None else torch.no_grad()
    with torch.no_grad(), ctx:
        out = model(**inputs, output_hidden_states=hidden)
        return out.hidden_states[-1] if hidden else out.logits


@pytest.mark.parametrize("family", ["xlm-roberta", "llama"])
def test_fresh_adapter_changes_nothing_and_fusion_is_active_and_removable(tiny_models, family):
    spec, tok, model = _model(tiny_models, family)
    model.eval()
    batch = _batch(tok, TEXTS, SOURCES)
    with model.disable_adapter():
        base = _logits(model, batch)
    fusion = Fusion(model, layers=spec.layers, targets=spec.fusion_targets, adapter="default", fusion_fn="add_relu",
                    padding_side=tok.padding_side).attach()
    # B = 0: the fused adapter leaves the model unchanged, whatever the source
    assert torch.allclose(_logits(model, batch, fusion), base, atol=1e-6)
    assert fusion.calls == {"train": 0, "eval": len(fusion.projections)}  # one forward: every q/v projection fused

    _randomise_b(model)
    fusion.detach()
    plain = _logits(model, batch)
    fusion.attach()
    fused = _logits(model, batch, fusion)
    assert not torch.allclose(fused, plain, atol=1e-4), "fusion had no effect"
    # a different source gives a different output: the source really reaches the projections
    other = dict(batch, **{k: v for k, v in _batch(tok, TEXTS, ["something else entirely", "yes"]).items()
                           if k.startswith("src_")})
    assert not torch.allclose(_logits(model, other, fusion), fused, atol=1e-4)
    # a fused projection without a source is an error, never a silent plain-LoRA pass
    with pytest.raises(FusionError, match="without a fusion source"):
        _logits(model, batch)
    # removing the hooks restores plain LoRA exactly
    fusion.detach()
    assert torch.equal(_logits(model, batch), plain)


def test_add_with_zero_source_equals_plain_lora(tiny_models):
    spec, tok, model = _model(tiny_models, "xlm-roberta")
    model.eval()
    _randomise_b(model)
    batch = _batch(tok, TEXTS, SOURCES)
    plain = _logits(model, batch)
    fusion = Fusion(model, layers=spec.layers, targets=spec.fusion_targets, adapter="default", fusion_fn="add",
                    padding_side=tok.padding_side).attach()
    zero_source = dict(batch, src_attention_mask=torch.zeros_like(batch["src_attention_mask"]))  # every x_s masked
    assert torch.allclose(_logits(model, zero_source, fusion), plain, atol=1e-6)
    assert not torch.allclose(_logits(model, batch, fusion), plain, atol=1e-4)


def _grads(model, fusion, batch, labels):
    model.zero_grad()
    model.train()
    with fusion.source(batch):
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
        loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_keeps_fusion_and_gradients(tiny_models):
    spec, tok, model = _model(tiny_models, "llama", task="nusax")
    _randomise_b(model)
    fusion = Fusion(model, layers=spec.layers, targets=spec.fusion_targets, adapter="default", fusion_fn="add_relu",
                    padding_side=tok.padding_side).attach()
    batch = _batch(tok, TEXTS, SOURCES)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    hf = model.get_base_model()
    loss0, grads0 = _grads(model, fusion, batch, labels)
    calls0 = fusion.calls["train"]
    assert calls0 == len(fusion.projections)
    for reentrant in (False, True):
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        hf.enable_input_require_grads()
        assert hf.model.layers[0].gradient_checkpointing and hf.is_gradient_checkpointing
        before = fusion.calls["train"]
        loss, grads = _grads(model, fusion, batch, labels)
        assert fusion.calls["train"] - before >= len(fusion.projections)  # forward (+ recomputation) fused
        assert loss == pytest.approx(loss0, abs=1e-6)
        lora = [n for n in grads0 if "lora_" in n]
        assert lora and all(torch.allclose(grads[n], grads0[n], atol=1e-6) for n in lora)
        hf.gradient_checkpointing_disable()
    # plain LoRA (hooks removed) gives another loss: the fusion was in the graph
    fusion.detach()
    model.zero_grad()
    assert model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 labels=labels).loss.item() != pytest.approx(loss0, abs=1e-6)


def _decoder(tiny_models, fn, quantize):
    """Tiny Llama with a fused fresh adapter whose lora_B is random (so fusion changes the output)."""
    spec = resolve_model(str(tiny_models / "llama"))
    tok = load_tokenizer(spec)
    base = load_model(spec, "nusax", quantize=quantize, device="cpu", bf16=False)
    model = get_peft_model(base, lora_config(spec, "nusax", r=4, alpha=8, dropout=0.0, target_modules=None,
                                             freeze_head=False))
    model.eval()
    _randomise_b(model)
    fusion = Fusion(model, layers=spec.layers, targets=spec.fusion_targets, adapter="default", fusion_fn=fn,
                    padding_side=tok.padding_side, cross_attention_heads=2).attach()
    torch.manual_seed(1)
    for p in fusion.modules.parameters():  # cross-attention: weights large enough to matter
        p.data.normal_(0, 1.0)
    return tok, model, fusion


def _prompt_answer(tok):
    prompt = tok("ora apik\nSentiment: ")["input_ids"]
    answer = tok("negative positive", add_special_tokens=False)["input_ids"][:3]
    src = tok("not good\nSentiment: ")["input_ids"]
    full = torch.tensor([prompt + answer])
    return prompt, answer, {"input_ids": full, "attention_mask": torch.ones_like(full),
                            "labels": torch.tensor([[-100] * len(prompt) + answer]),
                            "src_input_ids": torch.tensor([src]),
                            "src_attention_mask": torch.ones(1, len(src), dtype=torch.long)}


@pytest.mark.parametrize("quantize", ["none", "4bit"])
@pytest.mark.parametrize("fn", FUSION_FNS)
def test_decoder_fusion_is_causal(tiny_models, fn, quantize):
    """Changing the last (answer) token changes no logit at an earlier position, for every fusion function."""
    tok, model, fusion = _decoder(tiny_models, fn, quantize)
    prompt, answer, batch = _prompt_answer(tok)
    changed = dict(batch, input_ids=batch["input_ids"].clone())
    changed["input_ids"][0, -1] = (answer[-1] + 7) % tok.vocab_size
    logits = [_logits(model, b, fusion) for b in (batch, changed)]
    assert torch.equal(logits[0][0, :-1], logits[1][0, :-1]), (logits[0][0, :-1] - logits[1][0, :-1]).abs().max()
    # the source still matters (fusion is on), at every position
    other = dict(batch, src_input_ids=tok("quite good\nSentiment: ", return_tensors="pt")["input_ids"])
    other["src_attention_mask"] = torch.ones_like(other["src_input_ids"])
    assert not torch.allclose(_logits(model, other, fusion)[0, -1], logits[0][0, -1], atol=1e-4)


@pytest.mark.parametrize("quantize", ["none", "4bit"])
@pytest.mark.parametrize("fn", FUSION_FNS)
def test_generation_uses_the_training_alignment(tiny_models, fn, quantize):
    """Teacher-forced training logits of prompt + answer equal prefill + decode-step logits (same fusion rule, the
    mixing functions reading their own cache of earlier bottleneck states), for every fusion function."""
    tok, model, fusion = _decoder(tiny_models, fn, quantize)
    # 4-bit: a one-token decode step and a full pass use different CPU kernels (rounding ~1e-7), which matmul_relu's
    # cubic S T^T T amplifies to ~1e-4 on this random adapter; unquantised the paths agree to 1e-5
    tol = dict(atol=1e-5, rtol=1e-5) if quantize == "none" else dict(atol=5e-4, rtol=1e-3)
    prompt, answer, batch = _prompt_answer(tok)
    with torch.no_grad(), fusion.source(batch):
        train_logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    p = torch.tensor([prompt])
    gen_batch = {"input_ids": p, "attention_mask": torch.ones_like(p), "src_input_ids": batch["src_input_ids"],
                 "src_attention_mask": batch["src_attention_mask"]}
    with torch.no_grad(), fusion.source(gen_batch):
        out = model(input_ids=p, attention_mask=torch.ones_like(p), use_cache=True)
        torch.testing.assert_close(out.logits[0, -1], train_logits[0, len(prompt) - 1], **tol)
        cache = out.past_key_values
        for k, token in enumerate(answer):
            mask = torch.ones(1, len(prompt) + k + 1, dtype=torch.long)
            step = model(input_ids=torch.tensor([[token]]), attention_mask=mask, past_key_values=cache,
                         use_cache=True)
            cache = step.past_key_values
            torch.testing.assert_close(step.logits[0, -1], train_logits[0, len(prompt) + k], **tol)
    # generate() runs the same prefill/decode path under the fusion, and its greedy tokens are the argmax of the
    # teacher-forced logits of its own output (the decode cache reproduces the full pass)
    with torch.no_grad(), fusion.source(gen_batch):
        generated = model.generate(input_ids=p, attention_mask=torch.ones_like(p), max_new_tokens=3,
                                   do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=None)
    new = generated[0, len(prompt):].tolist()
    assert len(new) == 3
    forced = dict(batch, input_ids=generated, attention_mask=torch.ones_like(generated),
                  labels=torch.tensor([[-100] * len(prompt) + new]))
    with torch.no_grad(), fusion.source(forced):
        forced_logits = model(input_ids=generated, attention_mask=forced["attention_mask"]).logits
    assert forced_logits[0, len(prompt) - 1:-1].argmax(-1).tolist() == new


def test_encoder_mixing_fusion_stays_bidirectional(tiny_models):
    spec, tok, model = _model(tiny_models, "xlm-roberta")
    model.eval()
    _randomise_b(model)
    fusion = Fusion(model, layers=spec.layers, targets=spec.fusion_targets, adapter="default",
                    fusion_fn="cross-attention", padding_side=tok.padding_side).attach()
    assert not fusion.causal
    batch = _batch(tok, TEXTS, SOURCES)
    changed = dict(batch, input_ids=batch["input_ids"].clone())
    changed["input_ids"][0, 5] = 17
    a, b = (_logits(model, x, fusion, hidden=True) for x in (batch, changed))
    assert not torch.allclose(a[0, 1], b[0, 1], atol=1e-6)  # an earlier position sees a later token


@pytest.mark.parametrize("fn,mt", [("cross-attention", False), ("add", True), ("cross-attention", True)])
def test_fusion_modules_survive_save_and_load(tiny_models, tmp_path, fn, mt):
    spec, tok, model = _model(tiny_models, "xlm-roberta")
    encoder = MTEncoder(str(tiny_models / "nllb"), "cpu") if mt else None
    kwargs = dict(layers=spec.layers, targets=spec.fusion_targets, adapter="default", fusion_fn=fn,
                  padding_side=tok.padding_side, cross_attention_heads=2, mt_encoder=encoder)
    fusion = Fusion(model, **kwargs)
    state = {k: v.clone() for k, v in fusion.modules.state_dict().items()}
    assert state and any(p.requires_grad for p in fusion.modules.parameters())
    assert all(f"flare_fusion.{k}" in dict(model.named_parameters()) for k in fusion.modules.state_dict())
    fusion.save(tmp_path)
    assert (tmp_path / FUSION_FILE).is_file()
    _, _, model2 = _model(tiny_models, "xlm-roberta")
    other = Fusion(model2, **kwargs)
    assert not all(torch.equal(v, other.modules.state_dict()[k]) for k, v in state.items())
    other.load(tmp_path)
    assert all(torch.equal(v, other.modules.state_dict()[k]) for k, v in state.items())
    with pytest.raises(FusionError, match=FUSION_FILE):
        other.load(tmp_path / "nowhere")


def test_mt_fusion_gets_gradients_in_its_projection(tiny_models):
    spec, tok, model = _model(tiny_models, "xlm-roberta")
    _randomise_b(model)
    mt = MTEncoder(str(tiny_models / "nllb"), "cpu")
    fusion = Fusion(model, layers=spec.layers, targets=spec.fusion_targets, adapter="default", fusion_fn="add",
                    padding_side=tok.padding_side, mt_encoder=mt).attach()
    t = tok(TEXTS, return_tensors="pt", padding=True)
    mt.tokenizer.src_lang = "jav_Latn"
    m = mt.tokenizer(TEXTS, return_tensors="pt", padding=True)
    assert m["input_ids"][0, 0].item() == mt.lang_token_id("jav_Latn")  # tagged with the text's real language
    batch = {**t, "mt_input_ids": m["input_ids"], "mt_attention_mask": m["attention_mask"]}
    model.train()
    with fusion.source(batch):
        model(**t, labels=torch.tensor([0, 1])).loss.backward()
    assert fusion.modules.proj.weight.grad is not None and fusion.modules.proj.weight.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in mt.encoder.parameters())


def test_source_pass_runs_the_stage1_model_in_eval_mode_and_stops_after_the_last_layer(tiny_models):
    """Regression: the original's source pass ran in train mode (dropout noise on the English states) and computed
    the whole model with its head. Here it is deterministic during training and skips the last layer's compute."""
    spec, tok, model = _model(tiny_models, "xlm-roberta")
    fusion = Fusion(model, layers=spec.layers, targets=spec.fusion_targets, adapter="default", fusion_fn="add",
                    padding_side=tok.padding_side)
    batch = _batch(tok, TEXTS, SOURCES)
    model.train()  # dropout 0.1 in the tiny XLM-R
    first, second = fusion.capture(batch), fusion.capture(batch)
    assert model.training and all(torch.equal(a, b) for a, b in zip(first, second))
    model.eval()
    with torch.no_grad(), model.disable_adapter():
        hidden = model(input_ids=batch["src_input_ids"], attention_mask=batch["src_attention_mask"],
                       output_hidden_states=True).hidden_states
    assert all(torch.equal(a, b) for a, b in zip(first, hidden[:-1]))
    calls = []
    last = model.get_base_model().roberta.encoder.layer[-1]
    handle = last.register_forward_hook(lambda *a: calls.append(1))
    fusion.capture(batch)
    handle.remove()
    assert calls == []  # the last layer never ran: only its input is needed



@pytest.mark.parametrize("family,mt", [("xlm-roberta", False), ("llama", False), ("xlm-roberta", True)])
def test_source_cache_reuses_states_and_gives_the_uncached_outputs(tiny_models, family, mt):
    """--cache_source_states: a batch of cached examples skips the source pass and fuses the same states; in a new
    batch composition (other padding) the outputs agree up to rounding."""
    spec, tok, model = _model(tiny_models, family)
    model.eval()
    _randomise_b(model)
    encoder = MTEncoder(str(tiny_models / "nllb"), "cpu") if mt else None
    kwargs = dict(layers=spec.layers, targets=spec.fusion_targets, adapter="default", fusion_fn="add_relu",
                  padding_side=tok.padding_side, mt_encoder=encoder)
    texts, sources = TEXTS + ["apik tenan"], SOURCES + ["very good indeed, a long sentence to force padding"]

    def batch_of(rows):
        b = _batch(tok, [texts[i] for i in rows], [sources[i] for i in rows])
        if mt:
            m = encoder.tokenizer([texts[i] for i in rows], return_tensors="pt", padding=True)
            b |= {"mt_input_ids": m["input_ids"], "mt_attention_mask": m["attention_mask"]}
        return b

    both, all3, two = batch_of([0, 1]), batch_of([1, 2, 0]), batch_of([2, 0])
    plain = Fusion(model, **kwargs).attach()
    expected_both, expected_all3, expected_two = (_logits(model, b, plain) for b in (both, all3, two))
    plain.detach()
    cached = Fusion(model, **kwargs, cache_source_states=True).attach()
    cached.modules.load_state_dict(plain.modules.state_dict())  # FLARE MT: the same (random) projection
    assert torch.equal(_logits(model, both, cached), expected_both)  # computed: exactly the uncached pass
    assert cached.cache.stats == {"hits": 0, "misses": 1, "full": 0} and len(cached.cache.entries) == 2
    passes = []
    source_model = encoder.encoder if mt else find_layers(model, spec.layers)[0]
    handle = source_model.register_forward_pre_hook(lambda *a: passes.append(1))
    assert torch.equal(_logits(model, both, cached), expected_both)  # served from the cache, bit for bit
    assert cached.cache.stats["hits"] == 1 and passes == ([] if mt else [1])  # (the target pass runs layer 0)
    passes.clear()
    assert torch.allclose(_logits(model, all3, cached), expected_all3, atol=1e-5)  # one new example: computed
    assert len(passes) == (1 if mt else 2) and len(cached.cache.entries) == 3
    passes.clear()
    assert torch.allclose(_logits(model, two, cached), expected_two, atol=1e-5)  # every row cached, other padding
    assert len(passes) == (0 if mt else 1) and cached.cache.stats["hits"] == 2
    handle.remove()
    cached.detach()
    full = Fusion(model, **kwargs, cache_source_states=True, cache_limit_mb=0).attach()
    stacks = []
    real_stack = torch.stack
    torch.stack = lambda tensors, *a, **k: stacks.append(len(tensors)) or real_stack(tensors, *a, **k)
    try:
        _logits(model, both, full)
    finally:
        torch.stack = real_stack
    assert full.cache.entries == {} and full.cache.stats["full"] == 2  # past the bound: computed, not stored
    assert stacks == []  # and nothing copied to the CPU for it (every layer's states used to be, then dropped)


def test_eval_forwards_leave_4bit_layers_differentiable(tiny_models, monkeypatch):
    """As on a CPU with AVX512-BF16 (forced here: bitsandbytes' probe says yes), a 4-bit layer run in eval mode
    under no_grad would repack its weight in place for gemv_4bit, which has no autograd kernel, and later training
    steps would lose the input gradient through the frozen 4-bit weights. The loaded model never repacks: the FLARE
    source pass (eval, no_grad) and an eval forward change none of the next training step's gradients."""
    import bitsandbytes as bnb
    import bitsandbytes.nn.modules as bnb_modules

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    tok, model, fusion = _decoder(tiny_models, "add_relu", "4bit")
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)
    _, _, batch = _prompt_answer(tok)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}

    def step_grads():
        model.train()
        model.zero_grad()
        with fusion.source(batch):  # the source pass runs in eval mode under no_grad
            model(**inputs).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    first = step_grads()
    model.eval()
    with torch.no_grad(), fusion.source(batch):  # an evaluation: eval mode, no grad
        model(**{k: v for k, v in inputs.items() if k != "labels"})
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    second = step_grads()
    assert first.keys() == second.keys() and any("lora_A" in n for n in first)
    assert all(torch.equal(first[n], second[n]) for n in first)


def test_a_batch_holds_one_set_of_source_states(tiny_models):
    """Memory: inside ``Fusion.source`` the captured layer inputs are gone once aligned, so a batch holds one set of
    n_layers x (B, L, D) states, not two (regression: the captured and the gathered sets were both kept through the
    step; for Gemma 2 9B at batch 32 x 384 in fp32 about 15 GB)."""
    import gc
    import weakref

    spec, tok, model = _model(tiny_models, "llama")
    fusion = Fusion(model, layers=spec.layers, targets=spec.fusion_targets, adapter="default", fusion_fn="add_relu",
                    padding_side=tok.padding_side).attach()
    captured = []
    capture = fusion.capture

    def recording_capture(batch):
        states = capture(batch)
        captured.extend(weakref.ref(h) for h in states)
        return states

    fusion.capture = recording_capture  # this instance only: watch what the source pass returns
    batch = _batch(tok, TEXTS, SOURCES)
    with fusion.source(batch):
        gc.collect()
        assert len(captured) == len(find_layers(model, spec.layers))
        assert all(ref() is None for ref in captured), "a captured layer input outlived its alignment"
        assert len(fusion._state.sources) == len(captured)


@pytest.mark.parametrize("family", ["xlm-roberta", "llama"])
def test_bf16_source_states_change_nothing_under_bf16_autocast(tiny_models, family):
    """``state_dtype=bfloat16`` (stage 2 under --bf16) keeps half the bytes per source state, and a training forward
    under bf16 autocast computes exactly what it computes from fp32 states: the LoRA A matmul rounds its input to
    bf16 anyway (the adapter's dropout is off here)."""
    spec, tok, model = _model(tiny_models, family)
    _randomise_b(model)
    model.eval()
    batch = _batch(tok, TEXTS, SOURCES)
    kwargs = dict(layers=spec.layers, targets=spec.fusion_targets, adapter="default", fusion_fn="add_relu",
                  padding_side=tok.padding_side)
    out = {}
    for dtype in (None, torch.bfloat16):
        fusion = Fusion(model, **kwargs, state_dtype=dtype).attach()
        with torch.no_grad(), fusion.source(batch), torch.autocast("cpu", dtype=torch.bfloat16):
            assert fusion._state.sources[0].dtype == (dtype or torch.float32)
            out[dtype] = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        fusion.detach()
    assert torch.equal(out[None], out[torch.bfloat16])


@pytest.mark.parametrize("family", ["xlm-roberta", "llama"])
def test_the_source_pass_runs_under_the_training_autocast(tiny_models, family):
    """--bf16: the Trainer's autocast wraps the model's forward only; the source pass (a separate forward of the
    frozen model) runs under the same autocast (its matmuls in bf16: before, in fp32, a full fp32 forward per step),
    the kept states are bf16, and a fresh adapter still gives exactly the stage-1 model's outputs."""
    spec, tok, model = _model(tiny_models, family)
    model.eval()
    batch = _batch(tok, TEXTS, SOURCES)
    kwargs = dict(layers=spec.layers, targets=spec.fusion_targets, adapter="default", fusion_fn="add_relu",
                  padding_side=tok.padding_side)
    first_linear = next(m for n, m in model.get_base_model().named_modules()
                        if isinstance(m, torch.nn.Linear) and ".0." in n and "lora" not in n)
    seen = []
    handle = first_linear.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
    try:
        for autocast, expected in ((None, torch.float32), (torch.bfloat16, torch.bfloat16)):
            seen.clear()
            fusion = Fusion(model, **kwargs, state_dtype=autocast, autocast_dtype=autocast).attach()
            with torch.no_grad(), fusion.source(batch):
                assert seen and set(seen) == {expected}, (autocast, seen)  # the source pass's matmuls
                assert fusion._state.sources[0].dtype == expected
                with torch.autocast("cpu", dtype=torch.bfloat16):  # the training forward, as the Trainer runs it
                    fused = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            fusion.detach()
            with torch.no_grad(), model.disable_adapter(), torch.autocast("cpu", dtype=torch.bfloat16):
                plain = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            assert torch.equal(fused, plain)  # a fresh adapter (B = 0) changes nothing, under autocast too
    finally:
        handle.remove()


def test_generation_runs_under_the_training_autocast(tiny_models):
    """generate() does not go through the Trainer's autocast-wrapped forward: the Evaluator runs every prediction
    (generation included) under the run's autocast, so a --bf16 run does not evaluate in fp32."""
    from flare.data import load_task
    from flare.evaluation import Evaluator

    spec, tok, model = _model(tiny_models, "llama")
    examples = load_task("nusax", "jav", "test", data_dir=REPO_DATA).select(range(4))
    head = model.get_base_model().lm_head
    for autocast, expected in ((None, torch.float32), (torch.bfloat16, torch.bfloat16)):
        seen = []
        handle = head.register_forward_hook(lambda mod, args, out, seen=seen: seen.append(out.dtype))
        try:
            Evaluator("nusax", spec, tok, examples, 128, batch_size=4, generate_max_tokens=3,
                      autocast=autocast).predict(model)
        finally:
            handle.remove()
        assert seen and set(seen) == {expected}, (autocast, seen)


def test_tf32_stays_on_under_bf16_on_ampere(monkeypatch):
    """With --bf16 / --fp16 what runs outside autocast still uses TF32 matmuls on Ampere+ (it used to fall back to
    full fp32); before Ampere and on the CPU torch's default is left alone."""
    from types import SimpleNamespace

    from flare.stages import use_tf32

    for flags in ({}, {"bf16": True}, {"fp16": True}):
        opts = SimpleNamespace(**{"bf16": False, "fp16": False, **flags})
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
        assert use_tf32("cuda:0", opts) is True, flags
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
        assert use_tf32("cuda:0", opts) is None, flags
        assert use_tf32("cpu", opts) is None
