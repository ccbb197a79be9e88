"""What FLARE costs per training step against plain LoRA and input-level fusion, measured in ONE process.

Each model is built once; the cells run interleaved (round r: every mode, then round r + 1), so load drifts on a
shared machine hit every mode alike. A training step is forward + backward + AdamW step on a batch of 8 examples
whose token lengths are drawn from the real NusaX English / Javanese training texts (``--lengths``, the me5-small
tokenizer; decoders add their prompt template and a 2-token answer):

* ``lora``: plain LoRA on the target input;
* ``flare``: the same + the no-grad English source pass (stopped after the last fused layer) + fusion
  (add, add_relu, mul, cross-attention);
* ``input-fusion``: plain LoRA on English + target in one input (about twice as long);
* ``xmixup``: X-Mixup's two trained passes (English with its labels, then the target mixed with it in the mixed
  layers; ``flare.models.xmixup``, default layers) and its loss.

Models: ``me5-small`` (the real encoder, CPU), ``llama-small-4bit`` (random, 4 layers, width 512, 32k vocab, NF4),
``llama3.1-8b-4bit`` (random weights shaped like Llama 3.1 8B, NF4, bf16 compute; a GPU). The new adapter is LoRA
r 8 on the model table's targets with the head frozen, so the ratios isolate the adapters' and fusion's own cost.
Per cell: median step time, evaluation throughput (no-grad forward, examples/s), peak GPU memory (CUDA only), and
``ratio_to_lora``.

    python bench/step_cost.py --quick                                   # CPU cells, <= 5 min on 2 cores
    python bench/step_cost.py --device cuda --models llama3.1-8b-4bit   # a GPU node
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # also runs from a plain checkout (the GPU node)

FLARE_FNS = ("add", "add_relu", "mul", "cross-attention")
NLLB_SHAPES = {  # FLARE MT encoders (random weights)
    "nllb-600m": dict(d_model=1024, encoder_layers=12, encoder_ffn_dim=4096, encoder_attention_heads=16,
                      decoder_ffn_dim=4096, decoder_attention_heads=16, vocab_size=256206),
    "tiny": dict(d_model=64, encoder_layers=2, encoder_ffn_dim=128, encoder_attention_heads=2, decoder_ffn_dim=128,
                 decoder_attention_heads=2, vocab_size=1000),
}
LLAMA_SHAPES = {
    "llama-small-4bit": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                             num_key_value_heads=8, vocab_size=32000),
    "llama3.1-8b-4bit": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                             num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
}


def write_lengths(path: Path) -> None:
    """Token lengths of the paired NusaX training texts (English, Javanese) with the me5-small (XLM-R) tokenizer."""
    from flare.config import resolve_model
    from flare.data import load_task
    from flare.models.loading import load_tokenizer

    tok = load_tokenizer(resolve_model("me5-small"))
    en, jav = (load_task("nusax", lang, "train", str(REPO / "data")) for lang in ("en", "jav"))
    by_id = {i: t for i, t in zip(jav["id"], jav["text"])}
    pairs = [(len(tok(e)["input_ids"]), len(tok(by_id[i])["input_ids"])) for i, e in zip(en["id"], en["text"])]
    path.write_text(json.dumps({"tokenizer": "me5-small (XLM-R sentencepiece)", "en_jav": pairs}) + "\n")


def random_4bit_llama(shape: dict, device: str):
    """A Llama with random weights, its decoder-layer linears quantised to NF4 (bitsandbytes), bf16 on a GPU."""
    import bitsandbytes as bnb
    import torch
    from torch import nn
    from transformers import LlamaConfig, LlamaForCausalLM

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config = LlamaConfig(**shape, max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise in the compute dtype: an 8B model in fp32 would need 32 GB
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    for layer in model.model.layers:
        for parent in [m for m in layer.modules()]:
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=dtype, quant_type="nf4", device="meta")
                    q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4").to(device)
                    setattr(parent, name, q)
    model.config.use_cache = False
    return model.requires_grad_(False)


def build(model_key: str, device: str):
    """(model with a fresh LoRA, spec, kind, vocab size)."""
    import torch
    from peft import get_peft_model

    from flare.config import FAMILY_DEFAULTS, ModelSpec, resolve_model
    from flare.models.loading import load_model, lora_config

    if model_key == "me5-small":
        spec = resolve_model("me5-small")
        base = load_model(spec, "nusax", quantize="none", device=device, bf16=False)
        vocab = base.config.vocab_size
    else:
        spec = ModelSpec(key=model_key, hub_id=model_key, model_type="llama", **FAMILY_DEFAULTS["llama"])
        base = random_4bit_llama(LLAMA_SHAPES[model_key], device)
        vocab = base.config.vocab_size
    model = get_peft_model(base, lora_config(spec, "nusax", r=8, alpha=16, dropout=0.0, target_modules=None,
                                             freeze_head=True))
    torch.manual_seed(1)
    for name, p in model.named_parameters():  # a trained-looking adapter (B = 0 would make fusion a no-op)
        if "lora_B" in name:
            p.data.normal_(0, 0.01)
    return model, spec, vocab


def make_batch(pairs, mode: str, decoder: bool, vocab: int, device: str, gen, mt_vocab: int = 1000):
    """Random token ids with the lengths of 8 real NusaX pairs; decoders: template + 2-token answer, left padded."""
    import torch

    extra = 6 if decoder else 0  # "\nSentiment: " and the answer's 2 tokens
    if mode == "input-fusion":
        tgt = [e + j + extra for e, j in pairs]
    else:
        tgt = [j + extra for _, j in pairs]
    src = [e + extra - 2 for e, _ in pairs]

    def pad(lengths, vocab=vocab):
        width = max(lengths)
        ids = torch.randint(5, vocab, (len(lengths), width), generator=gen)
        mask = torch.zeros(len(lengths), width, dtype=torch.long)
        for i, n in enumerate(lengths):
            if decoder:
                mask[i, width - n:] = 1
            else:
                mask[i, :n] = 1
        return ids.to(device), mask.to(device)

    ids, mask = pad(tgt)
    batch = {"input_ids": ids, "attention_mask": mask}
    if decoder:
        labels = torch.full_like(ids, -100)
        labels[:, -2:] = ids[:, -2:]
        batch["labels"] = labels
    else:
        batch["labels"] = torch.randint(0, 3, (len(pairs),), generator=gen).to(device)
    if mode == "flare":
        batch["src_input_ids"], batch["src_attention_mask"] = pad(src)
    if mode == "xmixup":  # the English training side with its labels (decoders: prompt + the same answer)
        batch["src_input_ids"], batch["src_attention_mask"] = pad([e + extra for e, _ in pairs])
        if decoder:
            batch["src_labels"] = torch.full_like(batch["src_input_ids"], -100)
            batch["src_labels"][:, -2:] = batch["labels"][:, -2:]
            batch["src_input_ids"][:, -2:] = batch["labels"][:, -2:]
        else:
            batch["src_labels"] = batch["labels"].clone()
    if mode == "flare-mt":  # the NLLB encoder reads the target text (decoders: the prompt without its answer)
        batch["mt_input_ids"], batch["mt_attention_mask"] = pad([j + extra - 2 for _, j in pairs], mt_vocab)
    return batch


def random_mt_encoder(shape: str, device: str):
    """FLARE MT's frozen encoder: a random M2M100 (NLLB) model of the given shape (its decoder is 1 layer: unused)."""
    import torch
    from transformers import M2M100Config, M2M100ForConditionalGeneration

    from flare.models.loading import MTEncoder

    torch.manual_seed(2)
    config = M2M100Config(**NLLB_SHAPES[shape], decoder_layers=1, max_position_embeddings=1024)
    with torch.device(device):
        seq2seq = M2M100ForConditionalGeneration(config)
    return MTEncoder.from_model(seq2seq, tokenizer=None, device=device)


# name -> (batch layout, fusion function, cache the source states, FLARE MT)
CELLS = {
    "lora": ("lora", None, False, False),
    **{f"flare {fn}": ("flare", fn, False, False) for fn in FLARE_FNS},
    "flare add_relu, cached": ("flare", "add_relu", True, False),
    "flare-mt add_relu": ("flare-mt", "add_relu", False, True),
    "flare-mt add_relu, cached": ("flare-mt", "add_relu", True, True),
    "input-fusion": ("input-fusion", None, False, False),
    "xmixup": ("xmixup", None, False, False),
}


def measure(model_key: str, args, pairs_all: list, mt) -> list[dict]:
    """Every cell of one model, interleaved over ``args.rounds`` rounds. Cached cells are timed in the steady state
    of epoch 2 and later: the source states of the round's batches are stored (untimed) before its timed steps."""
    import random

    import torch

    from flare.models.fusion import Fusion

    cuda = args.device == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    model, spec, vocab = build(model_key, args.device)
    decoder = spec.family == "decoder"
    mt_vocab = mt.encoder.config.vocab_size
    cells = {name: CELLS[name] for name in CELLS if name in args.cells}
    fusions = {}
    for name, (_, fn, cache, use_mt) in cells.items():
        if fn is not None:
            fusions[name] = Fusion(model, layers=spec.layers, targets=spec.fusion_targets, adapter="default",
                                   fusion_fn=fn, padding_side=spec.padding_side, causal=decoder,
                                   mt_encoder=mt if use_mt else None, cache_source_states=cache)
    xmixup = None
    if "xmixup" in cells:
        from flare.models.fusion import find_layers
        from flare.models.xmixup import XMixup, default_layers

        start, end = default_layers(len(find_layers(model, spec.layers)))
        xmixup = XMixup(model, layers=spec.layers, family=spec.family, start=start, end=end)
    # every fusion registers its modules on the model (the last one's under flare_fusion): each parameter once
    params = list({id(q): q for q in [*(q for q in model.parameters() if q.requires_grad),
                                      *(q for f in fusions.values() for q in f.modules.parameters()),
                                      *(xmixup.gates.parameters() if xmixup else ())]}.values())
    opt = torch.optim.AdamW(params, lr=1e-5)
    rng, gen = random.Random(0), torch.Generator().manual_seed(0)
    times = {c: [] for c in cells}
    tokens = {c: [] for c in cells}  # target tokens (not padding) of each timed step
    eval_rates = {c: [] for c in cells}
    peaks = {c: 0 for c in cells}

    def run(name, batch, train: bool):
        fusion = fusions.get(name)
        inputs = {k: v for k, v in batch.items() if not k.startswith(("src_", "mt_")) and (train or k != "labels")}
        model.train(train)
        if fusion is not None:
            fusion.attach()
        if name == "xmixup" and train:
            xmixup.attach()
            try:
                xmixup.loss(model, batch).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            finally:
                xmixup.detach()
            return
        try:
            with torch.set_grad_enabled(train), fusion.source(batch) if fusion is not None else _null():
                out = model(**inputs)
                if train:
                    out.loss.backward()
            if train:
                opt.step()
                opt.zero_grad(set_to_none=True)
        finally:
            if fusion is not None:
                fusion.detach()

    per_round = max(args.steps // args.rounds, 1)
    for r in range(args.rounds):
        for name, (layout, _, cache, _) in cells.items():
            draws = [rng.sample(pairs_all, 8) for _ in range(per_round + (args.warmup if r == 0 else 0))]
            batches = [make_batch(d, layout, decoder, vocab, args.device, gen, mt_vocab) for d in draws]
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            if cache:  # epoch >= 2: every example's source states are in the cache before the steps
                for batch in batches:
                    with torch.no_grad(), fusions[name].source(batch):
                        pass
            for i, batch in enumerate(batches):
                sync()
                t0 = time.perf_counter()
                run(name, batch, train=True)
                sync()
                if not (r == 0 and i < args.warmup):
                    times[name].append(time.perf_counter() - t0)
                    tokens[name].append(int(batch["attention_mask"].sum()))
            sync()
            t0 = time.perf_counter()
            for batch in batches[-per_round:]:
                run(name, batch, train=False)
            sync()
            eval_rates[name].append(8 * per_round / (time.perf_counter() - t0))
            if cuda:
                peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated() / 2**20)
    lora_ms = statistics.median(times["lora"]) * 1000
    rows = []
    for name, (_, fn, cache, _) in cells.items():
        ms = statistics.median(times[name]) * 1000
        rows.append({"model": model_key, "mode": name.split(" ")[0], "fusion_fn": fn, "cached": cache,
                     "train_step_ms": round(ms, 2),
                     # the target input's tokens trained per second (input fusion: English + target)
                     "train_tokens_per_s": round(sum(tokens[name]) / sum(times[name]), 1),
                     "eval_examples_per_s": round(statistics.median(eval_rates[name]), 1),
                     "peak_mb": round(peaks[name]) if cuda else None, "ratio_to_lora": round(ms / lora_ms, 3),
                     "steps": len(times[name])})
    return rows


def decoder_eval_modes(model_key: str, args, pairs_all: list) -> dict:
    """Classification on a decoder: greedy generation (label word + EOS: 4 new tokens) against --eval_mode score
    (one pass, the last position's logits only), examples/s on NusaX-length prompts of the random model."""
    import random

    import torch

    model, spec, vocab = build(model_key, args.device)
    model.eval()
    model.config.use_cache = True
    rng, gen = random.Random(1), torch.Generator().manual_seed(1)
    batches = [make_batch(rng.sample(pairs_all, 8), "lora", True, vocab, args.device, gen)
               for _ in range(max(args.steps // 2, 4))]
    for b in batches:  # prompts only (the answer columns belong to training)
        b["input_ids"], b["attention_mask"] = b["input_ids"][:, :-2], b["attention_mask"][:, :-2]
    rates = {"generate": [], "score": []}
    for _ in range(2):
        for mode in rates:
            t0 = time.perf_counter()
            with torch.no_grad():
                for b in batches:
                    inputs = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
                    if mode == "generate":
                        model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                                       pad_token_id=0)
                    else:
                        model(**inputs, logits_to_keep=1)
            if args.device == "cuda":
                torch.cuda.synchronize()
            rates[mode].append(8 * len(batches) / (time.perf_counter() - t0))
    gen_rate, score_rate = max(rates["generate"]), max(rates["score"])
    return {"model": model_key, "generate_examples_per_s": round(gen_rate, 1),
            "score_examples_per_s": round(score_rate, 1), "score_speedup": round(score_rate / gen_rate, 2),
            "new_tokens_generated": 4}


def score_agreement(args) -> dict:
    """How often --eval_mode score and generation give the same label on the same trained model: a tiny Llama
    (flare.tiny_models) trained by run_task_ft.py on English NusaX, evaluated on the Javanese test set."""
    import tempfile

    from flare import stage1, tiny_models
    from flare.config import resolve_model
    from flare.data import load_task
    from flare.evaluation import Evaluator
    from flare.models.loading import load_checked, load_model, load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tiny_models.main([str(tmp / "models"), "--families", "llama"])
        plm = str(tmp / "models" / "llama")
        flags = ["--task", "nusax", "--plm", plm, "--seed", "1", "--output_dir", str(tmp / "ck"), "--data_dir",
                 str(REPO / "data"), "--lr", "2e-3", "--batch_size", "16", "--max_steps", str(args.agreement_steps),
                 "--num_evals", "1", "--max_eval_samples", "8", "--save_total_limit", "1"]
        assert stage1.main(flags) == 0, "stage 1 of the tiny Llama failed"
        spec = resolve_model(plm)
        tok = load_tokenizer(spec)
        model = load_checked(load_model(spec, "nusax", quantize="none", device="cpu", bf16=False),
                             tmp / "ck" / "nusax-en-llama-1", is_trainable=False).eval()
        examples = load_task("nusax", "jav", "test", str(REPO / "data"))
        out = {}
        for mode in ("generate", "score"):
            ev = Evaluator("nusax", spec, tok, examples, 128, batch_size=16, eval_mode=mode)
            t0 = time.perf_counter()
            preds = ev.predict(model)
            out[mode] = (preds, len(examples) / (time.perf_counter() - t0), ev.score(preds))
    (gp, g_rate, g_metrics), (sp, s_rate, s_metrics) = out["generate"], out["score"]
    return {"model": f"tiny Llama (flare.tiny_models), stage 1 {args.agreement_steps} steps on English NusaX",
            "test": "NusaX jav test", "n": len(gp),
            "agreement": round(sum(a == b for a, b in zip(gp, sp)) / len(gp), 4),
            "generate_accuracy": round(g_metrics["accuracy"], 4), "score_accuracy": round(s_metrics["accuracy"], 4),
            "generate_unparseable": g_metrics["unparseable"], "generate_examples_per_s": round(g_rate, 1),
            "score_examples_per_s": round(s_rate, 1), "score_speedup": round(s_rate / g_rate, 2)}


GOALS = {"flare": 1.30, "flare, cached": 1.10, "flare-mt": 1.15, "flare / input-fusion": 0.75, "score speedup": 5.0}
EXPECTED = {"xmixup": 2.0}  # not a goal: X-Mixup trains two passes per step, about twice LoRA's


def cell_name(row: dict) -> str:
    if not row["fusion_fn"]:
        return {"xmixup": "X-Mixup"}.get(row["mode"], row["mode"])
    return (f"{'FLARE MT' if row['mode'] == 'flare-mt' else 'FLARE'} {row['fusion_fn']}"
            f"{', cached' if row['cached'] else ''}")


def table(out: dict) -> str:
    lines = [f"{out['machine']}; batch 8, NusaX token lengths; FLARE MT encoder: random {out['mt_shape']}-shaped "
             "NLLB encoder", "", "| model | mode | train step ms | ratio to LoRA | eval examples/s | peak GPU MB |",
             "|---|---|---|---|---|---|"]
    for row in out["rows"]:
        lines.append(f"| {row['model']} | {cell_name(row)} | {row['train_step_ms']:.1f} | {row['ratio_to_lora']:.2f} "
                     f"| {row['eval_examples_per_s']:.1f} | {row['peak_mb'] if row['peak_mb'] is not None else '-'} |")
    by_model: dict = {}
    for row in out["rows"]:
        by_model.setdefault(row["model"], {})[cell_name(row)] = row
    lines += ["", "| model | FLARE add_relu / LoRA (goal <= 1.30) | cached (<= 1.10) | FLARE MT (<= 1.15) | "
              "FLARE MT cached | FLARE add_relu / input fusion (<= 0.75) | X-Mixup / LoRA (about 2) |",
              "|---|---|---|---|---|---|---|"]
    for model, cells in by_model.items():
        def ratio(name, cells=cells):  # "-" for a cell not measured (--cells)
            return f"{cells[name]['ratio_to_lora']:.2f}" if name in cells else "-"

        fl, inp = cells.get("FLARE add_relu"), cells.get("input-fusion")
        to_input = f"{fl['train_step_ms'] / inp['train_step_ms']:.2f}" if fl and inp else "-"
        lines.append(f"| {model} | {ratio('FLARE add_relu')} | {ratio('FLARE add_relu, cached')} "
                     f"| {ratio('FLARE MT add_relu')} | {ratio('FLARE MT add_relu, cached')} | {to_input} "
                     f"| {ratio('X-Mixup')} |")
    if out.get("eval_modes"):
        lines += ["", "| decoder classification | generate examples/s | score examples/s | "
                  "score speedup (goal >= 5) |", "|---|---|---|---|"]
        for row in out["eval_modes"]:
            lines.append(f"| {row['model']} | {row['generate_examples_per_s']} | {row['score_examples_per_s']} | "
                         f"{row['score_speedup']:.2f} |")
    if out.get("score_agreement"):
        a = out["score_agreement"]
        lines += ["", f"Same trained model ({a['model']}), {a['test']} ({a['n']} examples): score and generate "
                  f"agree on {100 * a['agreement']:.1f} %; accuracy generate {a['generate_accuracy']:.4f} "
                  f"({a['generate_unparseable']} unparseable), score {a['score_accuracy']:.4f}; "
                  f"{a['generate_examples_per_s']} vs {a['score_examples_per_s']} examples/s "
                  f"({a['score_speedup']:.2f}x)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["me5-small", "llama-small-4bit"],
                   choices=["me5-small", *LLAMA_SHAPES])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--steps", type=int, default=24, help="timed steps per cell (split over the rounds)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per cell before timing")
    p.add_argument("--rounds", type=int, default=4, help="interleaving rounds")
    p.add_argument("--mt_shape", default="nllb-600m", choices=list(NLLB_SHAPES),
                   help="shape of FLARE MT's random NLLB encoder (default nllb-600m: the paper's smaller MT model)")
    p.add_argument("--agreement_steps", type=int, default=300,
                   help="stage-1 steps of the tiny Llama on which score and generate are compared (0: skip)")
    p.add_argument("--quick", action="store_true",
                   help="fewer steps (6 per cell, 2 rounds) and a shorter agreement run: same cells")
    p.add_argument("--cells", nargs="+", choices=list(CELLS), default=list(CELLS),
                   help="the cells to measure (default: all; LoRA is always measured, every ratio is to it)")
    p.add_argument("--skip_eval_modes", action="store_true",
                   help="do not time a decoder's generate against --eval_mode score")
    p.add_argument("--lengths", default=str(REPO / "bench" / "nusax_token_lengths.json"))
    p.add_argument("--write_lengths", action="store_true", help="(re)compute --lengths from data/ and exit")
    p.add_argument("--out", default=None, help="default bench/results/step_cost[_cuda][_quick].json")
    args = p.parse_args(argv)
    if args.write_lengths:
        write_lengths(Path(args.lengths))
        return 0
    if "lora" not in args.cells:
        args.cells = ["lora", *args.cells]
    if args.quick:
        args.steps, args.rounds, args.warmup = 6, 2, 1
        args.agreement_steps = min(args.agreement_steps, 100)
    import torch

    pairs_all = json.loads(Path(args.lengths).read_text())["en_jav"]
    cuda = args.device == "cuda"
    t_start = time.perf_counter()
    mt = random_mt_encoder(args.mt_shape, args.device)
    rows, eval_modes = [], []
    for model_key in args.models:
        rows += measure(model_key, args, pairs_all, mt)
        if model_key != "me5-small" and not args.skip_eval_modes:
            eval_modes.append(decoder_eval_modes(model_key, args, pairs_all))
        if cuda:
            torch.cuda.empty_cache()
    agreement = score_agreement(args) if args.agreement_steps > 0 and not cuda else None

    device_name = torch.cuda.get_device_name() if cuda else f"{platform.processor() or platform.machine()} CPU"
    out = {"machine": f"{device_name}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
           "date": datetime.date.today().isoformat(), "device": args.device, "batch_size": 8,
           "lengths": Path(args.lengths).name, "quick": args.quick, "cells": args.cells,
           "mt_shape": args.mt_shape, "goals": GOALS, "expected": EXPECTED,
           "rows": rows, "eval_modes": eval_modes, "score_agreement": agreement,
           "bench_wall_s": round(time.perf_counter() - t_start, 1)}
    name = f"step_cost{'_cuda' if cuda else ''}{'_quick' if args.quick else ''}.json"
    path = Path(args.out or REPO / "bench" / "results" / name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(table(out))
    print(f"\n{out['bench_wall_s']:.0f} s; wrote {path}")
    return 0


def _null():
    import contextlib

    return contextlib.nullcontext()


if __name__ == "__main__":
    sys.exit(main())
