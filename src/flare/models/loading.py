"""Load tokenizers and models for a :class:`~flare.config.ModelSpec`, add LoRA, save and verifiably reload it."""

from __future__ import annotations

import contextlib
import json
import logging
import re
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, prepare_model_for_kbit_training
from torch import nn

from flare.config import MODEL_SPECS, TASKS, ModelSpec
from flare.errors import CheckpointError, FusionError  # noqa: F401 (re-exported)
from flare.files import ADAPTER_FILE, read_run_config  # noqa: F401 (re-exported)

logger = logging.getLogger(__name__)

# reserved tokens that serve as pad without resizing the embeddings (Llama 3.x ships several)
_RESERVED_PAD = ("<|finetune_right_pad_id|>", "<|reserved_special_token_0|>", "<pad>")


# model keys whose weights ship inside a Python package: key -> converter in flare.models.embedded (returns a folder)
EMBEDDED = {"me5-small": "ensure_me5_small"}


def model_files(spec: ModelSpec) -> str:
    """What ``from_pretrained`` loads for ``spec``: its hub id or folder, or, for a model shipped inside a Python
    package (``EMBEDDED``), the converted folder (converted on first use, then cached). Called when a model or
    tokenizer is loaded, never during flag checks, so the run config records the machine-independent reference."""
    if spec.key in EMBEDDED and spec.hub_id == MODEL_SPECS[spec.key].hub_id:
        from flare.models import embedded

        return str(getattr(embedded, EMBEDDED[spec.key])())
    return spec.hub_id


def task_kind(spec: ModelSpec, task: str) -> str:
    """Which head a model needs: ``lm`` for decoders (all tasks generate), else the task's ``cls`` / ``qa``."""
    return "lm" if spec.family == "decoder" else TASKS[task].kind


def load_tokenizer(spec: ModelSpec):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_files(spec), padding_side=spec.padding_side)
    if tok.pad_token is None:
        vocab = tok.get_vocab()
        reserved = next((t for t in _RESERVED_PAD if t in vocab), None)
        # labels are built explicitly (-100 on prompt and padding), so EOS can safely double as pad
        tok.pad_token = reserved or tok.eos_token
        logger.info("tokenizer has no pad token: using %r (no embedding resize)", tok.pad_token)
    return tok


def bnb_config(spec: ModelSpec, kind: str, quantize: str, compute_dtype: torch.dtype):
    if quantize == "none":
        return None
    from transformers import BitsAndBytesConfig

    skip = None
    if spec.family == "encoder":  # heads stay in full precision, also when nested (BERT's "bert.pooler.dense"):
        # transformers matches a skip name from the start of a module name or as its suffix, so also give it as a
        # pattern that may follow any prefix
        names = spec.head_modules(kind)
        skip = [*names, *(rf"(?:.*\.)?{re.escape(n)}" for n in names)]
    if quantize == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype,
                                  bnb_4bit_use_double_quant=False, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)


def load_model(spec: ModelSpec, task: str, *, quantize: str, device: str, bf16: bool,
               gradient_checkpointing: bool = False, fp16: bool = False):
    """The pretrained model with its task head (random for encoders), quantised if asked, on ``device``."""
    from transformers import AutoModelForCausalLM, AutoModelForQuestionAnswering, AutoModelForSequenceClassification

    kind = task_kind(spec, task)
    compute_dtype = torch.bfloat16 if bf16 else torch.float16 if fp16 else torch.float32
    kwargs: dict = {}
    quant = bnb_config(spec, kind, quantize, compute_dtype)
    if quant is not None:
        kwargs.update(quantization_config=quant, device_map={"": device}, dtype=compute_dtype)
    if spec.attn_implementation:
        kwargs["attn_implementation"] = spec.attn_implementation
    if kind == "cls":
        labels = TASKS[task].labels
        kwargs.update(num_labels=len(labels), id2label=dict(enumerate(labels)),
                      label2id={w: i for i, w in enumerate(labels)})
    auto = {"lm": AutoModelForCausalLM, "cls": AutoModelForSequenceClassification,
            "qa": AutoModelForQuestionAnswering}[kind]
    with _without_load_report():
        model, info = auto.from_pretrained(model_files(spec), output_loading_info=True, **kwargs)
    report_loading(spec, kind, info)
    if quant is not None:
        keep_4bit_differentiable(model)
        # peft's own checkpointing switch calls transformers' deprecated gradient_checkpointing_enable: ours below
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model.to(device)
    if gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        if quant is None:
            model.enable_input_require_grads()
    return model


# heads of pretraining checkpoints that a task model drops (masked-LM, next-sentence, BERT's pooler in QA models)
PRETRAINING_HEADS = ("lm_head", "cls", "pooler")


class _LoadReportFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)


@contextlib.contextmanager
def _without_load_report():
    """transformers logs a "LOAD REPORT" table, as a warning, for every key a checkpoint lacks; a pretrained model
    always lacks the task head we add. ``report_loading`` says what matters instead."""
    log, quiet = logging.getLogger("transformers.modeling_utils"), _LoadReportFilter()
    log.addFilter(quiet)
    try:
        yield
    finally:
        log.removeFilter(quiet)


def report_loading(spec: ModelSpec, kind: str, info: dict) -> None:
    """One line on what loading initialised or dropped as expected (the task head is new; a pretraining head such
    as XLM-R's ``lm_head`` is not used), and a warning with the keys for anything else. A decoder's ``lm_head`` is
    pretrained: missing, it is warned about like any other key."""
    heads = spec.head_modules(kind) if kind != "lm" else ()

    def module(key: str, names) -> str | None:  # the key's module up to the first part in ``names``
        parts = key.split(".")
        return next((".".join(parts[:i + 1]) for i, part in enumerate(parts) if part in names), None)

    missing, unexpected = sorted(info.get("missing_keys", ())), sorted(info.get("unexpected_keys", ()))
    mismatched = list(info.get("mismatched_keys", ()))
    new = sorted({m for k in missing if (m := module(k, heads))})
    dropped = sorted({m for k in unexpected if (m := module(k, PRETRAINING_HEADS))})
    if new or dropped:
        logger.info("%s: task head %s newly initialised (stage 1 trains it; stage 2 loads it from the stage-1 run)%s",
                    spec.key, ", ".join(new) or "-", f"; pretraining head {', '.join(dropped)} not used" if dropped
                    else "")
    odd_missing = [k for k in missing if not module(k, heads)]
    odd_unexpected = [k for k in unexpected if not module(k, PRETRAINING_HEADS)]
    if odd_missing or odd_unexpected or mismatched:
        logger.warning("%s: the checkpoint does not match the model outside the task head: missing %s, unexpected "
                       "%s, other shape %s", spec.key, odd_missing or "-", odd_unexpected or "-", mismatched or "-")


def keep_4bit_differentiable(model) -> int:
    """Turn off bitsandbytes' CPU repacking of 4-bit weights; returns the number of 4-bit layers.

    On a CPU with AVX512-BF16, a ``Linear4bit`` that runs in eval mode on an input without grad repacks its weight IN
    PLACE into a layout that only ``gemv_4bit`` reads, and ``gemv_4bit`` has no autograd kernel: every later training
    forward drops the input gradient through the frozen 4-bit weights (torch only warns). FLARE's source pass and the
    stage-1 start check are such forwards, so training after them would get wrong gradients. Off, the layers always
    use the differentiable dequantise-and-matmul path (GPUs never repack; on other CPUs nothing changes)."""
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for m in layers:
        m.support_avx512bf16_for_cpu = False  # read by Linear4bit.forward before it repacks
    return len(layers)


def lora_config(spec: ModelSpec, task: str, *, r: int, alpha: int, dropout: float,
                target_modules: tuple[str, ...] | None, freeze_head: bool) -> LoraConfig:
    kind = task_kind(spec, task)
    task_type = {"lm": "CAUSAL_LM", "cls": "SEQ_CLS", "qa": "QUESTION_ANS"}[kind]
    heads = [] if freeze_head else list(spec.head_modules(kind))
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                      target_modules=list(target_modules or spec.lora_targets),
                      modules_to_save=heads or None, task_type=task_type,
                      # Gemma ties lm_head to the input embedding: train them as one matrix, as the original did
                      ensure_weight_tying=bool(heads) and kind == "lm")


def add_lora(model, config: LoraConfig, adapter_name: str = "default") -> PeftModel:
    return get_peft_model(model, config, adapter_name=adapter_name)


def count_parameters(model) -> tuple[int, int]:
    """(param_total, param_train); 4-bit weights count as their unpacked size."""
    total = trainable = 0
    for p in model.parameters():
        n = p.numel()
        if p.__class__.__name__ == "Params4bit":
            n *= 2
        total += n
        trainable += n if p.requires_grad else 0
    return total, trainable


TIED_METADATA = "flare_tied"  # safetensors metadata of an adapter file: {"stored key": ["key it stands for too"]}


def tied_keys(model: PeftModel, adapter: str) -> dict[str, str]:
    """{head key: embedding key} of a saved adapter state dict when ``adapter``'s trained input embedding and output
    head are one matrix (Gemma's tie), else {}."""
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    copies_e, copies_h = (getattr(m, "modules_to_save", {}) for m in (embed, head))
    if adapter not in copies_e or adapter not in copies_h or copies_e[adapter].weight is not copies_h[adapter].weight:
        return {}
    names = {id(m): n for n, m in model.named_modules()}
    return {f"{names[id(head)]}.weight": f"{names[id(embed)]}.weight"}


def save_adapter(model: PeftModel, out_dir: Path) -> None:
    """Adapter + head weights in safetensors (never the, possibly 4-bit, base model); of a stage-2 stack only the
    new adapter (the frozen stage-1 adapter is the ``--load_ckpt`` run's). A tied embedding/head (Gemma) is stored
    once (peft writes it twice: about 7 GB each at Gemma 2 9B in fp32), the other key named in the file's metadata;
    :func:`load_checked` restores it. (Trainer checkpoints keep peft's own format: they are reloaded by peft, and
    their optimizer state is larger still.)"""
    from flare.files import atomic_write
    from flare.models.stack import NEW, is_stacked

    stacked = is_stacked(model)
    model.save_pretrained(out_dir, safe_serialization=True, selected_adapters=[NEW] if stacked else None)
    tied = tied_keys(model, NEW if stacked else model.active_adapter)
    path = Path(out_dir) / ADAPTER_FILE
    if not tied or not path.is_file():
        return
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:
        metadata = dict(f.metadata() or {})
        state = {k: f.get_tensor(k) for k in f.keys() if k not in tied}
    stored: dict[str, list[str]] = {}
    for head_key, embed_key in tied.items():
        stored.setdefault(embed_key, []).append(head_key)
    metadata[TIED_METADATA] = json.dumps(stored)
    atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=metadata))


def load_adapter_state(weights: Path) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """An adapter file's tensors, a tied matrix stored once restored under every key it stands for; and the ties."""
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as f:
        tied = json.loads((f.metadata() or {}).get(TIED_METADATA, "{}"))
        state = {k: f.get_tensor(k) for k in f.keys()}
    for stored, others in tied.items():
        for key in others:
            state[key] = state[stored]
    return state, tied


def load_checked(base_model, ckpt_dir: str | Path, *, is_trainable: bool, adapter_name: str = "default") -> PeftModel:
    """Load a saved adapter (+ head) onto ``base_model`` and PROVE it loaded: every adapter/head tensor the model
    expects must be in the file and equal to it afterwards. Missing weights are an error, not a warning."""
    ckpt_dir = Path(ckpt_dir)
    weights = ckpt_dir / ADAPTER_FILE
    if not weights.is_file():
        raise CheckpointError(f"{ckpt_dir}: no {ADAPTER_FILE}; pass a run directory written by run_task_ft.py")
    saved, tied = load_adapter_state(weights)
    try:
        if not tied:
            model = PeftModel.from_pretrained(base_model, ckpt_dir, adapter_name=adapter_name,
                                              is_trainable=is_trainable)
        else:  # peft reads the file itself and would miss the key stored once: the same steps, on the full state
            from peft import PeftConfig, set_peft_model_state_dict

            config = PeftConfig.from_pretrained(ckpt_dir)
            config.inference_mode = not is_trainable
            model = get_peft_model(base_model, config, adapter_name=adapter_name)
            set_peft_model_state_dict(model, saved, adapter_name=adapter_name)
            if not is_trainable:
                model.eval()
    except KeyError as e:  # peft's own message for a missing modules_to_save tensor is a bare key
        raise CheckpointError(f"{weights}: adapter/head weights missing from the checkpoint, e.g. {e}") from e
    verify_loaded(model, saved, adapter_name, weights)
    return model


def verify_loaded(model: PeftModel, saved: dict[str, torch.Tensor], adapter_name: str, weights: Path) -> None:
    """Every adapter/head tensor ``adapter_name`` has is in ``saved`` (the file ``weights``) and equal to it in the
    model: a missing or unloaded weight is a :class:`CheckpointError`, not a warning."""
    current = get_peft_model_state_dict(model, adapter_name=adapter_name)
    missing = sorted(set(current) - set(saved))
    if missing:
        raise CheckpointError(f"{weights}: {len(missing)} adapter/head weights missing from the checkpoint, "
                              f"e.g. {missing[:3]}")
    differ = [k for k, v in current.items() if not torch.equal(v.detach().cpu().to(saved[k].dtype), saved[k])]
    if differ:
        raise CheckpointError(f"{weights}: {len(differ)} weights did not load into the model, e.g. {differ[:3]}")
    logger.info("loaded %d adapter/head tensors from %s (verified)", len(saved), weights)


class MTEncoder:
    """The frozen encoder of an NLLB (M2M100) model and its tokenizer (FLARE MT); never trained, never saved."""

    def __init__(self, hub_id: str, device: str):
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        seq2seq = AutoModelForSeq2SeqLM.from_pretrained(hub_id, dtype=torch.float32)
        self._setup(seq2seq, AutoTokenizer.from_pretrained(hub_id), device)

    @classmethod
    def from_model(cls, seq2seq: nn.Module, tokenizer, device: str) -> MTEncoder:
        """An MT encoder from a loaded seq2seq model (e.g. a random one built from a config, for benchmarks)."""
        self = cls.__new__(cls)
        self._setup(seq2seq, tokenizer, device)
        return self

    def _setup(self, seq2seq: nn.Module, tokenizer, device: str) -> None:
        self.tokenizer = tokenizer
        self.encoder = seq2seq.get_encoder().to(device).eval().requires_grad_(False)
        self.dim = seq2seq.config.d_model
        self.device = device

    def lang_token_id(self, code: str) -> int:
        token_id = self.tokenizer.convert_tokens_to_ids(code)
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            raise FusionError(f"the MT tokenizer does not know the language code {code!r}")
        return token_id

    @torch.no_grad()
    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_ids=input_ids.to(self.device),
                            attention_mask=attention_mask.to(self.device)).last_hidden_state  # (B, L, d_mt)
