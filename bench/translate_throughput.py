"""Sentences/s of the translation pipeline vs the original's loop, on the real shipped XNLI and NusaX texts.

Original loop: input order, every string translated (no dedup), each batch padded to --max_length, fp32.
This pipeline: unique strings only, sorted by length, dynamic padding, inference_mode (bf16 on GPU with --bf16).
Both use the same model, batch size and greedy decoding. Writes a JSON file and prints a markdown table.

    python bench/translate_throughput.py                         # tiny random NLLB (built on the fly), CPU
    python bench/translate_throughput.py --model nllb-600m --device cuda --bf16   # on a GPU node
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def texts(data_dir: Path, max_strings: int) -> dict[str, list[str]]:
    from flare.data import load_task

    xnli = load_task("xnli", "en", "test", data_dir)
    nusax = load_task("nusax", "en", "test", data_dir)
    return {"xnli (premise+hypothesis)": (list(xnli["premise"]) + list(xnli["hypothesis"]))[:max_strings],
            "nusax (text)": list(nusax["text"])[:max_strings]}


def original_loop(tr, batch: list[str], src: str, tgt: str) -> list[str]:
    tok, out = tr.tokenizer, []
    tok.src_lang = src
    forced = tok.convert_tokens_to_ids(tgt)
    for i in range(0, len(batch), tr.batch_size):
        enc = tok(batch[i:i + tr.batch_size], return_tensors="pt", padding="max_length", truncation=True,
                  max_length=tr.max_length).to(tr.device)
        with torch.no_grad():
            gen = tr.model.generate(**enc, forced_bos_token_id=forced, max_length=tr.max_length, do_sample=False)
        out += tok.batch_decode(gen, skip_special_tokens=True)
    return out


def ours(tr, batch: list[str], src: str, tgt: str) -> list[str]:
    from flare.translate import Stats, plan_batches

    unique, _ = plan_batches(batch, tr.batch_size, tr.token_length)
    mapping = dict(zip(unique, tr.translate(unique, src, tgt, Stats())))
    return [mapping.get(t, "") for t in batch]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="nllb key or directory (default: a tiny random NLLB)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--max_length", type=int, default=128)
    p.add_argument("--max_strings", type=int, default=400)
    p.add_argument("--data_dir", default=str(REPO / "data"))
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "translate_throughput.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    from flare.translate import NLLBTranslator

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from flare.tiny_models import write_tiny_models

            model = str(write_tiny_models(tmp, args.data_dir, families=("nllb",))["nllb"])
        tr = NLLBTranslator(model, device=args.device, max_length=args.max_length, batch_size=args.batch_size,
                            bf16=args.bf16)
        rows = []
        for name, batch in texts(Path(args.data_dir), args.max_strings).items():
            ours(tr, batch[:8], "eng_Latn", "spa_Latn")  # warm-up
            t0 = time.perf_counter()
            a = original_loop(tr, batch, "eng_Latn", "spa_Latn")
            t_orig = time.perf_counter() - t0
            t0 = time.perf_counter()
            b = ours(tr, batch, "eng_Latn", "spa_Latn")
            t_ours = time.perf_counter() - t0
            assert len(a) == len(b) == len(batch)
            rows.append({"data": name, "strings": len(batch), "unique": len(set(batch)),
                         "original_sent_per_s": len(batch) / t_orig, "ours_sent_per_s": len(batch) / t_ours,
                         "speedup": t_orig / t_ours})
    result = {"model": args.model or "tiny random NLLB (flare.tiny_models)", "device": args.device,
              "bf16": args.bf16, "batch_size": args.batch_size, "max_length": args.max_length,
              "torch_threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
              "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"model: {result['model']}, device {args.device}, batch {args.batch_size}, max_length {args.max_length}")
    print("| data | strings | unique | original sent/s | ours sent/s | speed-up |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['data']} | {r['strings']} | {r['unique']} | {r['original_sent_per_s']:.1f} | "
              f"{r['ours_sent_per_s']:.1f} | {r['speedup']:.2f}x |")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
