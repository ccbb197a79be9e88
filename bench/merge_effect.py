"""What merging a stage-1 LoRA into 4-bit (NF4) weights keeps: the original's stage 2 did this, this project does not.

Trains stage 1 on the real embedded model (me5-small, English NusaX, the demo's flags) with ``--quantize 4bit``
(unless the run exists), then, with the project's own loading code:

1. metrics of the stage-1 model on the English and a target-language test set, (a) with the adapter unmerged (what
   stage 2 starts from here) and (b) merged into the NF4 weights (peft ``merge_and_unload``: dequantise, add
   ``B A s``, re-quantise: what the original's stage 2 started from);
2. per fused projection, how much of ``dW = B A s`` survives the merge: cosine(W_merged - W, dW), relative norm of
   the surviving change, and the fraction of weights that changed at all.

    python bench/merge_effect.py                  # -> bench/results/merge_effect.json and a markdown table

Runs on the CPU in about 4 minutes (stage 1 included).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGE1_FLAGS = ["--epochs", "3", "--lr", "5e-4", "--batch_size", "8", "--num_evals", "3", "--group_by_length",
                "--save_total_limit", "1"]  # demo.sh's stage 1


def evaluate(spec, tokenizer, model, lang: str, data_dir: str) -> dict:
    from flare.data import load_task
    from flare.evaluation import Evaluator

    ds = load_task("nusax", lang, "test", data_dir)
    ev = Evaluator("nusax", spec, tokenizer, ds, 128, batch_size=32)
    return ev.score(ev.predict(model))


def weight_stats(model) -> dict:
    """Per projection name: how much of the stage-1 update survives a merge into its NF4 weights (before any
    forward: bitsandbytes repacks CPU weights in place at the first eval-mode call)."""
    import bitsandbytes.functional as bnbf
    import torch
    from peft.tuners.lora import LoraLayer

    stats: dict[str, list] = {}
    for name, layer in model.named_modules():
        if not isinstance(layer, LoraLayer) or "lora" not in layer.lora_A:
            continue
        w = layer.get_base_layer().weight
        w0 = bnbf.dequantize_4bit(w.data, w.quant_state).float()
        delta = layer.get_delta_weight("lora").float()  # B A s
        merged = w0 + delta
        w1 = bnbf.dequantize_4bit(*bnbf.quantize_4bit(merged, blocksize=w.quant_state.blocksize,
                                                      quant_type=w.quant_state.quant_type)).float()
        kept = w1 - w0
        cos = torch.nn.functional.cosine_similarity(kept.flatten(), delta.flatten(), dim=0).item()
        stats.setdefault(name.split(".")[-1], []).append(dict(
            layer=name, cosine=cos, kept_norm_ratio=(kept.norm() / delta.norm()).item(),
            changed_fraction=(kept != 0).float().mean().item(),
            delta_rel_norm=(delta.norm() / w0.norm()).item()))
    return stats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work_dir", default=str(REPO / "bench" / "results" / "merge_effect"),
                   help="holds the 4-bit stage-1 run (reused if present)")
    p.add_argument("--lang", default="jav", help="target language evaluated beside English")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "merge_effect.json"))
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch

    from flare import stage1
    from flare.config import resolve_model
    from flare.models.loading import load_checked, load_model, load_tokenizer

    torch.manual_seed(0)
    data_dir = str(REPO / "data")
    run_dir = Path(args.work_dir) / f"nusax-en-me5-small-{args.seed}"
    if not (run_dir / "results_test.json").is_file():
        rc = stage1.main(["--task", "nusax", "--plm", "me5-small", "--quantize", "4bit", "--seed", str(args.seed),
                          "--data_dir", data_dir, "--output_dir", args.work_dir, *STAGE1_FLAGS])
        if rc:
            return rc
    spec = resolve_model("me5-small")
    tok = load_tokenizer(spec)

    def stage1_model():
        base = load_model(spec, "nusax", quantize="4bit", device="cpu", bf16=False)
        return load_checked(base, run_dir, is_trainable=False, adapter_name="lora").eval()

    unmerged = stage1_model()
    stats = weight_stats(unmerged)
    metrics = {"unmerged": {lang: evaluate(spec, tok, unmerged, lang, data_dir) for lang in ("en", args.lang)}}
    merged = stage1_model().merge_and_unload().eval()
    metrics["merged_requantized"] = {lang: evaluate(spec, tok, merged, lang, data_dir) for lang in ("en", args.lang)}
    summary = {proj: {k: sum(r[k] for r in rows) / len(rows) for k in ("cosine", "kept_norm_ratio",
                                                                        "changed_fraction", "delta_rel_norm")}
               for proj, rows in stats.items()}
    out = {"machine": f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
           "date": datetime.date.today().isoformat(), "model": "me5-small (multilingual-e5-small), NF4 4-bit",
           "stage1_run": str(run_dir.relative_to(REPO)) if run_dir.is_relative_to(REPO) else str(run_dir),
           "stage1_flags": STAGE1_FLAGS, "seed": args.seed, "metrics": metrics, "weights_mean": summary,
           "weights": stats}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print("| stage-1 model (4-bit me5-small) | " + " | ".join(f"{lang} acc | {lang} F1" for lang in ("en", args.lang))
          + " |")
    print("|---" * 5 + "|")
    for key, label in (("unmerged", "adapter unmerged (here)"), ("merged_requantized", "merged into NF4 (original)")):
        cells = [f"{100 * metrics[key][lang][m]:.2f}" for lang in ("en", args.lang) for m in ("accuracy", "f1")]
        print(f"| {label} | " + " | ".join(cells) + " |")
    print()
    print("| projection | cosine(kept, dW) | norm(kept) / norm(dW) | weights changed | norm(dW) / norm(W) |")
    print("|---|---|---|---|---|")
    for proj, s in summary.items():
        print(f"| {proj} | {s['cosine']:.3f} | {s['kept_norm_ratio']:.2f} | {100 * s['changed_fraction']:.0f} % | "
              f"{s['delta_rel_norm']:.4f} |")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
