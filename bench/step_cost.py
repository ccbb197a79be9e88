"""What FLARE costs per training step against plain LoRA and input-level fusion, measured in ONE process.

Each model is built once; the cells run interleaved (round r: every mode, then round r + 1), so load drifts on a
shared machine hit every mode alike. A training step is forward + backward + AdamW step on a batch of 8 examples
whose token lengths are drawn from the real NusaX English / Javanese training texts (``--lengths``, the me5-small
tokenizer; decoders add their prompt template and a 2-token answer):

* ``lora``: plain LoRA on the target input;
* ``flare``: the same + the no-grad English source pass (stopped after the last fused layer) + fusion
  (add, add_relu, mul, cross-attention);
* ``input-fusion``: plain LoRA on English + target in one input (about twice as long).

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


def make_batch(pairs, mode: str, decoder: bool, vocab: int, device: str, gen):
    """Random token ids with the lengths of 8 real NusaX pairs; decoders: template + 2-token answer, left padded."""
    import torch

    extra = 6 if decoder else 0  # "\nSentiment: " and the answer's 2 tokens
    if mode == "input-fusion":
        tgt = [e + j + extra for e, j in pairs]
    else:
        tgt = [j + extra for _, j in pairs]
    src = [e + extra - 2 for e, _ in pairs]

    def pad(lengths):
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
    return batch


def measure(model_key: str, args, pairs_all: list) -> list[dict]:
    """Every cell of one model, interleaved over ``args.rounds`` rounds."""
    import random

    import torch

    from flare.models.fusion import Fusion

    cuda = args.device == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    rows = []
    model, spec, vocab = build(model_key, args.device)
    decoder = spec.family == "decoder"
    cells = [("lora", None), *[("flare", fn) for fn in FLARE_FNS], ("input-fusion", None)]
    fusions = {}
    for mode, fn in cells:
        if mode == "flare":
            fusions[fn] = Fusion(model, layers=spec.layers, targets=spec.fusion_targets, adapter="default",
                                 fusion_fn=fn, padding_side=spec.padding_side, causal=decoder)
    params = [q for q in model.parameters() if q.requires_grad]
    params += [q for f in fusions.values() for q in f.modules.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-5)
    rng, gen = random.Random(0), torch.Generator().manual_seed(0)
    times = {c: [] for c in cells}
    eval_rates = {c: [] for c in cells}
    peaks = {c: 0 for c in cells}

    def step(cell, batch):
        mode, fn = cell
        fusion = fusions.get(fn) if mode == "flare" else None
        inputs = {k: v for k, v in batch.items() if not k.startswith("src_")}
        model.train()
        if fusion is not None:
            fusion.attach()
        try:
            with fusion.source(batch) if fusion is not None else _null():
                loss = model(**inputs).loss
                loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        finally:
            if fusion is not None:
                fusion.detach()

    def forward_only(cell, batch):
        mode, fn = cell
        fusion = fusions.get(fn) if mode == "flare" else None
        inputs = {k: v for k, v in batch.items() if not k.startswith("src_") and k != "labels"}
        model.eval()
        if fusion is not None:
            fusion.attach()
        try:
            with torch.no_grad(), fusion.source(batch) if fusion is not None else _null():
                model(**inputs)
        finally:
            if fusion is not None:
                fusion.detach()

    per_round = max(args.steps // args.rounds, 1)
    for r in range(args.rounds):
        for cell in cells:
            draws = [rng.sample(pairs_all, 8) for _ in range(per_round + (args.warmup if r == 0 else 0))]
            batches = [make_batch(d, cell[0], decoder, vocab, args.device, gen) for d in draws]
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            for i, batch in enumerate(batches):
                sync()
                t0 = time.perf_counter()
                step(cell, batch)
                sync()
                if not (r == 0 and i < args.warmup):
                    times[cell].append(time.perf_counter() - t0)
            sync()
            t0 = time.perf_counter()
            for batch in batches[-per_round:]:
                forward_only(cell, batch)
            sync()
            eval_rates[cell].append(8 * per_round / (time.perf_counter() - t0))
            if cuda:
                peaks[cell] = max(peaks[cell], torch.cuda.max_memory_allocated() / 2**20)
    lora_ms = statistics.median(times[("lora", None)]) * 1000
    for cell in cells:
        ms = statistics.median(times[cell]) * 1000
        rows.append({"model": model_key, "mode": cell[0], "fusion_fn": cell[1], "train_step_ms": round(ms, 2),
                     "eval_examples_per_s": round(statistics.median(eval_rates[cell]), 1),
                     "peak_mb": round(peaks[cell]) if cuda else None, "ratio_to_lora": round(ms / lora_ms, 3),
                     "steps": len(times[cell])})

    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["me5-small", "llama-small-4bit"],
                   choices=["me5-small", *LLAMA_SHAPES])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--steps", type=int, default=24, help="timed steps per cell (split over the rounds)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per cell before timing")
    p.add_argument("--rounds", type=int, default=4, help="interleaving rounds")
    p.add_argument("--quick", action="store_true", help="fewer steps (8 per cell, 2 rounds): same cells")
    p.add_argument("--lengths", default=str(REPO / "bench" / "nusax_token_lengths.json"))
    p.add_argument("--write_lengths", action="store_true", help="(re)compute --lengths from data/ and exit")
    p.add_argument("--out", default=None, help="default bench/results/step_cost[_cuda].json")
    args = p.parse_args(argv)
    if args.write_lengths:
        write_lengths(Path(args.lengths))
        return 0
    if args.quick:
        args.steps, args.rounds, args.warmup = 8, 2, 2
    import torch

    pairs_all = json.loads(Path(args.lengths).read_text())["en_jav"]
    cuda = args.device == "cuda"
    rows = []
    for model_key in args.models:
        rows += measure(model_key, args, pairs_all)
        if cuda:
            torch.cuda.empty_cache()

    device_name = torch.cuda.get_device_name() if cuda else f"{platform.processor() or platform.machine()} CPU"
    out = {"machine": f"{device_name}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
           "date": datetime.date.today().isoformat(), "device": args.device, "batch_size": 8,
           "lengths": Path(args.lengths).name, "quick": args.quick, "rows": rows}
    path = Path(args.out or REPO / "bench" / "results" / f"step_cost{'_cuda' if cuda else ''}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"{out['machine']}, batch 8, NusaX lengths\n")
    print("| model | mode | train step ms | ratio to LoRA | eval examples/s | peak GPU MB |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        mode = f"FLARE {row['fusion_fn']}" if row["fusion_fn"] else row["mode"]
        print(f"| {row['model']} | {mode} | {row['train_step_ms']:.1f} | {row['ratio_to_lora']:.2f} | "
              f"{row['eval_examples_per_s']:.1f} | {row['peak_mb'] if row['peak_mb'] is not None else '-'} |")
    print(f"\nwrote {path}")
    return 0


def _null():
    import contextlib

    return contextlib.nullcontext()


if __name__ == "__main__":
    sys.exit(main())
