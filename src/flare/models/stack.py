"""The stage-2 model as a stack of two LoRA adapters: the frozen English task adapter under a new trainable one.

Stage 2 must start from the stage-1 model EXACTLY, and "new adapter off" must mean the stage-1 model (FLARE's
English source pass runs it). The original merged the stage-1 LoRA into the base weights. For a 4-bit (NF4) base,
that means dequantise, add ``B A s``, re-quantise: every 64-value block gets a new absmax and most of the small
update rounds away (measured: docs/fusion.md, "Stage 1 and 4-bit merging"). So by default nothing is merged:

* the stage-1 adapter (``STAGE1``) stays on the, possibly quantised, base as a frozen peft adapter;
* the new adapter (``NEW``, peft's ``default`` name, which Trainer checkpoints reload) is added on the same layers;
  every LoRA layer runs both (peft sums the active adapters' updates), only ``NEW`` is trainable;
* trained heads (``modules_to_save``): ``NEW``'s copy starts as the stage-1 head; a tied head (Gemma: ``lm_head`` IS
  the input embedding) stays tied: ``NEW``'s embedding and head are one trainable matrix, as in stage 1 and in the
  original, which trained the tied matrix in both stages (peft cannot see the tie through the stage-1 wrappers and
  would train a head copy that drifts from a frozen embedding). A wrapped module that ``NEW`` does not train keeps
  its frozen stage-1 copy.

With a fresh ``NEW`` (``lora_B`` = 0) the model computes the stage-1 function bit for bit, quantised or not.
:func:`stage1_only` switches ``NEW`` off for a block (the FLARE source pass) whether the model is stacked or merged.
Only public peft calls are used: ``add_adapter``, ``set_adapter`` of the model and of its tuner layers.
"""

from __future__ import annotations

import contextlib
import logging
import warnings

from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

logger = logging.getLogger(__name__)

STAGE1 = "lora"  # the original's name of the stage-1 adapter
NEW = "default"  # peft's default name: Trainer's checkpoint saving and best-model reloading use it


def _layers(model) -> list[BaseTunerLayer]:
    return [m for m in model.modules()
            if isinstance(m, BaseTunerLayer) and not isinstance(m, AuxiliaryTrainingWrapper)]


def _wrappers(model) -> list[AuxiliaryTrainingWrapper]:
    return [m for m in model.modules() if isinstance(m, AuxiliaryTrainingWrapper)]


def _freeze(module, adapter: str) -> None:
    """``adapter`` frozen on ``module``, and without dropout: a frozen adapter is part of the fixed stage-1 function,
    so stage-2 training must see it exactly as evaluation does (a stage 1 trained with --lora_dropout would otherwise
    drop its own update at random in every stage-2 training step)."""
    for name in module.adapter_layer_names:
        params = getattr(module, name)
        if adapter in params:
            params[adapter].requires_grad_(False)
    dropout = getattr(module, "lora_dropout", None)
    if dropout is not None and adapter in dropout and not isinstance(dropout[adapter], nn.Identity):
        dropout[adapter] = nn.Identity()


def is_stacked(model) -> bool:
    return isinstance(model, PeftModel) and STAGE1 in model.peft_config and NEW in model.peft_config


def stack_new_adapter(model: PeftModel, config) -> PeftModel:
    """Add ``NEW`` (from ``config``) on top of the loaded, frozen ``STAGE1`` adapter; returns the same model."""
    with warnings.catch_warnings():  # peft looks for the tie through the stage-1 wrappers, misses it and says so;
        # _keep_tied restores it (and logs that it did)
        warnings.filterwarnings("ignore", message="You have requested `ensure_weight_tying`, but no tied modules")
        model.add_adapter(NEW, config)
    model.set_adapter(NEW)  # model level: the Trainer sees one active, trainable adapter
    _keep_tied(model)
    _share_unused_originals(model)
    for wrapper in _wrappers(model):
        copies = wrapper.modules_to_save if hasattr(wrapper, "modules_to_save") else {}
        if NEW in copies and STAGE1 in copies:  # the new head starts as the stage-1 head
            copies[NEW].load_state_dict(copies[STAGE1].state_dict())
    activate(model)
    return model


def _keep_tied(model) -> None:
    """If stage 1 trained the input embedding and the output head as one tied matrix (its two wrapped copies share
    one weight) and ``NEW`` trains the head, ``NEW``'s embedding copy and head copy become one weight too."""
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if not (isinstance(embed, AuxiliaryTrainingWrapper) and isinstance(head, AuxiliaryTrainingWrapper)):
        return
    copies_e, copies_h = embed.modules_to_save, head.modules_to_save
    if STAGE1 not in copies_e or STAGE1 not in copies_h or copies_e[STAGE1].weight is not copies_h[STAGE1].weight:
        return  # not tied in stage 1 (Llama)
    if NEW not in copies_h:
        return  # --freeze_lm_head: the stage-1 copy stays, frozen
    if NEW not in copies_e:
        embed.update(NEW)  # peft's own copy of the embedding module for NEW
    copies_h[NEW].weight = copies_e[NEW].weight  # one Parameter: the head computes with the trained embedding
    logger.info("tied input embedding and output head: the new adapter trains them as one matrix, as stage 1 did")


def _share_unused_originals(model) -> None:
    """In the stack every wrapped module (a trained head, Gemma's tied embedding/head) computes with its ``NEW`` or
    its ``STAGE1`` copy, never with the pretrained ``original_module`` it wraps: that one's weights become the frozen
    ``STAGE1`` copy's (the stage-1 model is stage 2's base), so the model holds no third, unused copy (Gemma 2 9B: a
    256000 x 3584 vocabulary matrix, 3.7 GB in fp32 after peft's k-bit preparation; Llama 3.1 8B: its 2.1 GB head)."""
    freed = 0
    for wrapper in _wrappers(model):
        copies = getattr(wrapper, "modules_to_save", {})
        if STAGE1 not in copies:
            continue
        stage1 = dict(copies[STAGE1].named_parameters())
        for name, param in list(wrapper.original_module.named_parameters()):
            if name in stage1 and stage1[name] is not param and stage1[name].shape == param.shape:
                owner, _, leaf = name.rpartition(".")
                module = wrapper.original_module.get_submodule(owner) if owner else wrapper.original_module
                setattr(module, leaf, stage1[name])
                freed += param.numel()
    if freed:
        logger.debug("stage-2 stack: %d unused pretrained head/embedding parameters share the stage-1 copy", freed)


def activate(model) -> None:
    """Both adapters active on every LoRA layer, ``STAGE1`` frozen, ``NEW`` trainable; a wrapped module without a
    ``NEW`` copy uses its frozen stage-1 copy. Idempotent; re-applied after anything that calls ``set_adapter``."""
    for layer in _layers(model):
        names = [a for a in (STAGE1, NEW) if a in layer._all_available_adapter_names()]
        layer.set_adapter(names)
        _freeze(layer, STAGE1)
    for wrapper in _wrappers(model):
        if NEW in wrapper._adapters:
            wrapper.set_adapter(NEW)
        elif STAGE1 in wrapper._adapters:
            wrapper.set_adapter(STAGE1, inference_mode=True)


@contextlib.contextmanager
def stage1_only(model):
    """Run the block with the new adapter off: exactly the stage-1 model (stacked: ``STAGE1`` alone; merged or
    plain: every adapter disabled, the stage-1 update being part of the base weights)."""
    if not is_stacked(model):
        with model.disable_adapter():
            yield
        return
    for layer in _layers(model):
        names = [STAGE1] if STAGE1 in layer._all_available_adapter_names() else []
        layer.set_adapter(names, inference_mode=True)
    for wrapper in _wrappers(model):
        wrapper.set_adapter(STAGE1 if STAGE1 in wrapper._adapters else [], inference_mode=True)
    try:
        yield
    finally:
        activate(model)


def active_adapters(model) -> dict[str, list[str]]:
    """Adapter names active per LoRA layer (for checks and tests)."""
    return {name: list(m.active_adapters) for name, m in model.named_modules()
            if isinstance(m, BaseTunerLayer) and not isinstance(m, AuxiliaryTrainingWrapper)}
