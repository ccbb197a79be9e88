"""What FLARE needs to know about a model, read from its config: ``python -m flare.models.inspect MODEL``.

The model is built from its config on the meta device (no weights are read or allocated: seconds, no GPU). Prints
the family, the transformer layer list, the linear modules of one layer, the task heads, the tokenizer's padding
side and pad token, and a ``FAMILY_DEFAULTS`` row to paste into ``flare/config.py``; warns where it cannot decide
(q, k and v fused into one linear: FLARE's query/value fusion needs a decision). See ``docs/adding-a-model.md``.

    python -m flare.models.inspect /path/to/model_dir       # a local Hugging Face folder
    python -m flare.models.inspect Qwen/Qwen3-8B            # a hub id (needs the network or the hub cache)
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field

from torch import nn

# leaf names of attention projections, by naming convention: (query, key, value)
QKV_NAMES = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"), ("q", "k", "v"))
FUSED_QKV = ("qkv_proj", "query_key_value", "c_attn", "Wqkv", "qkv")


@dataclass
class Inspection:
    model_type: str
    family: str  # encoder | decoder | seq2seq
    layers: str  # dotted suffix of the layer list, below the base model
    n_layers: int
    linears: dict[str, tuple[int, int]]  # leaf name -> (in, out) of the first layer's linear modules
    lora_targets: tuple[str, ...]
    fusion_targets: tuple[str, ...]
    heads: dict[str, tuple[str, ...]]
    padding_side: str | None = None  # the tokenizer's own
    pad_token: str | None = None
    warnings: list[str] = field(default_factory=list)

    def row(self) -> str:
        """A ready-to-paste FAMILY_DEFAULTS entry."""
        side = ', padding_side="left"' if self.family == "decoder" else ""
        heads = "{" + ", ".join(f'"{k}": {v!r}' for k, v in self.heads.items()) + "}"
        return (f'    "{self.model_type}": dict(family="{self.family}", layers="{self.layers}", '
                f"lora_targets={self.lora_targets!r}, fusion_targets={self.fusion_targets!r}{side}, heads={heads}),")


def _family(config) -> str:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and config.model_type not in \
            MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "decoder"
    return "encoder"


def _meta_model(config, auto_class):
    import torch

    with torch.device("meta"):
        return auto_class.from_config(config)


def _layer_list(model: nn.Module, n_layers: int | None) -> tuple[str, nn.ModuleList]:
    """(dotted name, module) of the transformer layer list: the ModuleList with the most parameters (of the
    expected length when the config says it); for an encoder-decoder, the encoder's."""
    best = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or not len(module):
            continue
        if n_layers and len(module) != n_layers:
            continue
        if "decoder" in name.split(".") and "encoder" not in name:
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[0]:
            best = (size, name, module)
    if best is None:
        raise ValueError("no transformer layer list (nn.ModuleList) found in this model")
    return best[1], best[2]


def inspect_model(model: str) -> Inspection:
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForQuestionAnswering,
        AutoModelForSeq2SeqLM,
        AutoModelForSequenceClassification,
    )

    try:
        config = AutoConfig.from_pretrained(model)
    except (OSError, ValueError) as e:
        raise ValueError(f"{model}: cannot read its config ({e}); pass a local model folder with config.json, or a "
                         "hub id with network access") from e
    family = _family(config)
    auto = {"decoder": AutoModelForCausalLM, "seq2seq": AutoModelForSeq2SeqLM,
            "encoder": AutoModelForSequenceClassification}[family]
    built = _meta_model(config, auto)
    n_layers = getattr(config, "num_hidden_layers", None) or getattr(config, "encoder_layers", None)
    name, layers = _layer_list(built, n_layers)
    prefix = built.base_model_prefix
    suffix = name[len(prefix) + 1:] if name.startswith(prefix + ".") else name
    linears = {n.split(".")[-1]: (m.in_features, m.out_features) for n, m in layers[0].named_modules()
               if isinstance(m, nn.Linear)}
    warnings = []
    if not linears:
        warnings.append("the layer has no torch.nn.Linear modules (e.g. GPT-2's Conv1D): LoRA targets must be set "
                        "by hand, and FLARE's hooks expect peft LoRA layers on nn.Linear")
    fused = [n for n in linears if n in FUSED_QKV or "qkv" in n.lower()]
    fusion_targets: tuple[str, ...] = ()
    for q, _, v in QKV_NAMES:
        if q in linears and v in linears:
            fusion_targets = (q, v)
            break
    if fused:
        warnings.append(f"q, k and v are computed by ONE linear ({', '.join(fused)}): FLARE fuses into the query "
                        "and value bottlenecks only, so it cannot run on this family without changing the keys "
                        "too; give the row fusion_targets=() and a no_fusion reason (see the phi3 row)")
    elif not fusion_targets and family != "seq2seq":
        warnings.append("no query/value projections found by name: set fusion_targets by hand")
    if family == "decoder":
        lora_targets = tuple(linears)
        heads = {"lm": ("lm_head",)}
    elif family == "encoder":
        lora_targets = fusion_targets or tuple(linears)
        heads = {}
        for kind, cls in (("cls", AutoModelForSequenceClassification), ("qa", AutoModelForQuestionAnswering)):
            task_model = built if kind == "cls" else _meta_model(config, cls)
            names = [n for n, m in task_model.named_children() if n != prefix and any(True for _ in m.parameters())]
            base = getattr(task_model, prefix, None)
            if base is not None and getattr(base, "pooler", None) is not None and kind == "cls":
                names.append("pooler")  # BERT-style: the classifier reads the pooler
            heads[kind] = tuple(names)
    else:  # an MT model: FLARE MT reads its encoder, nothing is fused into it
        lora_targets, fusion_targets = fusion_targets, ()
        heads = {}
    out = Inspection(model_type=config.model_type, family=family, layers=suffix, n_layers=len(layers),
                     linears=linears, lora_targets=lora_targets, fusion_targets=() if fused else fusion_targets,
                     heads=heads, warnings=warnings)
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model)
        out.padding_side, out.pad_token = tok.padding_side, tok.pad_token
        if tok.pad_token is None:
            out.warnings.append("the tokenizer has no pad token: flare.models.loading picks a reserved token or EOS")
    except (OSError, ValueError, TypeError) as e:
        out.warnings.append(f"no tokenizer could be loaded ({type(e).__name__}): the folder needs tokenizer files")
    return out


def report(ins: Inspection) -> str:
    lines = [f"model_type: {ins.model_type}", f"family: {ins.family}",
             f"layer list: *.{ins.layers} ({ins.n_layers} layers)", "linear modules of one layer (in -> out):"]
    lines += [f"  {name}: {a} -> {b}" for name, (a, b) in ins.linears.items()]
    lines += [f"task heads: {ins.heads}", f"tokenizer: padding side {ins.padding_side}, pad token {ins.pad_token!r}"
              + (" (decoders are always padded on the left here)" if ins.family == "decoder" else ""),
              "", "FAMILY_DEFAULTS row (flare/config.py):", ins.row()]
    lines += [f"WARNING: {w}" for w in ins.warnings]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="a local Hugging Face model folder or a hub id")
    args = p.parse_args(argv)
    try:
        ins = inspect_model(args.model)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report(ins))
    return 0


if __name__ == "__main__":
    sys.exit(main())
