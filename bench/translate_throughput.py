"""Sentences/s of the translation pipeline vs the original's loop, on the real shipped XNLI and NusaX texts.

Original loop: input order, every string translated (no dedup), each batch padded to --max_length, fp32.
This pipeline: unique strings only, sorted by length, dynamic padding, inference_mode (bf16 on GPU with --bf16).
Both use the same model, batch size and greedy decoding. Writes a JSON file and prints a markdown table.

Two decode-length modes, both reported:

* ``free``: the model decides when to stop. A random model never emits EOS, so every output runs to max_length and
  the decode cost is the same for every string: the pipeline's length sorting cannot help.
* ``reference``: each output is forced (a logits processor: no EOS before, EOS at) to the token length of the human
  reference translation of its string (XNLI English -> Spanish, NusaX English -> Javanese: parallel data shipped in
  data/), so the decode cost follows the real length distribution, as with a trained NLLB.

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


def texts(data_dir: Path, max_strings: int) -> dict[str, tuple[list[str], list[str], str]]:
    """data name -> (English strings, their human reference translations, the target NLLB code)."""
    from flare.data import load_task

    xnli_en, xnli_es = (load_task("xnli", lang, "test", data_dir) for lang in ("en", "es"))
    nusax_en, nusax_jav = (load_task("nusax", lang, "test", data_dir) for lang in ("en", "jav"))
    jav_by_id = dict(zip(nusax_jav["id"], nusax_jav["text"]))
    return {
        "xnli (premise+hypothesis)": ((list(xnli_en["premise"]) + list(xnli_en["hypothesis"]))[:max_strings],
                                      (list(xnli_es["premise"]) + list(xnli_es["hypothesis"]))[:max_strings],
                                      "spa_Latn"),
        "nusax (text)": (list(nusax_en["text"])[:max_strings],
                         [jav_by_id[i] for i in nusax_en["id"]][:max_strings], "jav_Latn"),
    }


class ReferenceLength:
    """A logits processor: row i of a batch emits exactly ``lengths[i]`` text tokens, then EOS (after the decoder
    start and the forced language token)."""

    def __init__(self, lengths: list[int], eos: int, prefix: int = 2):
        self.lengths, self.eos, self.prefix = torch.tensor(lengths), eos, prefix

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        written = input_ids.shape[1] - self.prefix  # text tokens so far
        if written < 0:
            return scores
        done = (written >= self.lengths).to(scores.device)  # (B,)
        low = torch.finfo(scores.dtype).min
        scores = scores.clone()
        scores[~done, self.eos] = low  # not yet: no EOS
        forced = torch.full_like(scores[done], low)
        forced[:, self.eos] = 0
        scores[done] = forced  # reached: EOS only
        return scores


def processors_for(tr, reference: dict[str, str] | None):
    """``logits_processors(batch)`` forcing each string's reference length, or None (free decoding)."""
    if reference is None:
        return None
    budget = tr.max_length - 3  # decoder start, language token, EOS

    def make(batch: list[str]) -> list:
        return [ReferenceLength([min(tr.token_length(reference[t]), budget) for t in batch],
                                tr.tokenizer.eos_token_id)]

    return make


def check_forced(tr, chunk: list[str], reference: dict[str, str], tgt: str) -> None:
    """The processor really forces each output to its reference's token length (counted on the generated ids)."""
    tok = tr.tokenizer
    tok.src_lang = "eng_Latn"
    enc = tok(chunk, return_tensors="pt", padding=True).to(tr.device)
    with torch.no_grad():
        gen = tr.model.generate(**enc, forced_bos_token_id=tok.convert_tokens_to_ids(tgt), max_length=tr.max_length,
                                do_sample=False, logits_processor=processors_for(tr, reference)(chunk))
    written = (gen[:, 2:] == tok.eos_token_id).int().argmax(1).tolist()  # text tokens before the first EOS
    wanted = [min(tr.token_length(reference[t]), tr.max_length - 3) for t in chunk]
    assert written == wanted, f"reference lengths not forced: {written} != {wanted}"


def original_loop(tr, batch: list[str], src: str, tgt: str, reference: dict[str, str] | None = None) -> list[str]:
    tok, out = tr.tokenizer, []
    tok.src_lang = src
    forced = tok.convert_tokens_to_ids(tgt)
    make = processors_for(tr, reference)
    for i in range(0, len(batch), tr.batch_size):
        chunk = batch[i:i + tr.batch_size]
        enc = tok(chunk, return_tensors="pt", padding="max_length", truncation=True,
                  max_length=tr.max_length).to(tr.device)
        with torch.no_grad():
            gen = tr.model.generate(**enc, forced_bos_token_id=forced, max_length=tr.max_length, do_sample=False,
                                    logits_processor=make(chunk) if make else None)
        out += tok.batch_decode(gen, skip_special_tokens=True)
    return out


def ours(tr, batch: list[str], src: str, tgt: str, reference: dict[str, str] | None = None) -> list[str]:
    from flare.translate import Stats, plan_batches

    unique, _ = plan_batches(batch, tr.batch_size, tr.token_length)
    mapping = dict(zip(unique, tr.translate(unique, src, tgt, Stats(), processors_for(tr, reference))))
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
        for name, (batch, refs, tgt) in texts(Path(args.data_dir), args.max_strings).items():
            reference = dict(zip(batch, refs))  # a repeated string keeps one reference (its output is one)
            ours(tr, batch[:8], "eng_Latn", tgt)  # warm-up
            check_forced(tr, batch[:8], reference, tgt)
            for mode in ("free", "reference"):
                ref = reference if mode == "reference" else None
                t0 = time.perf_counter()
                a = original_loop(tr, batch, "eng_Latn", tgt, ref)
                t_orig = time.perf_counter() - t0
                t0 = time.perf_counter()
                b = ours(tr, batch, "eng_Latn", tgt, ref)
                t_ours = time.perf_counter() - t0
                assert len(a) == len(b) == len(batch)
                rows.append({"data": name, "decode_length": mode, "strings": len(batch), "unique": len(set(batch)),
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
    print("| data | decode length | strings | unique | original sent/s | ours sent/s | speed-up |\n"
          "|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['data']} | {r['decode_length']} | {r['strings']} | {r['unique']} | "
              f"{r['original_sent_per_s']:.1f} | {r['ours_sent_per_s']:.1f} | {r['speedup']:.2f}x |")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
