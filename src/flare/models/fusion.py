"""FLARE: fuse a source representation into the LoRA bottleneck of the query/value projections, with hooks.

For a fused projection with frozen ``W``, LoRA ``A`` (r x d), ``B`` (d_out x r) and scaling ``s = alpha / r``::

    y = W x_t + B . phi(A x_s, A x_t) . s          (the SAME down-projection A for source and target)

Nothing of transformers or peft is copied or patched. Two kinds of ``torch.nn`` hooks do the work:

* capture: a forward pre-hook on every transformer layer records the layer's input hidden state during a no-grad
  pass of the model on the SOURCE (English) inputs with the new adapter disabled (= the merged English task model).
  That is the original's ``x_source[i] = hidden_states[i]``. FLARE MT instead takes the frozen NLLB encoder's states
  of the TARGET text, mapped to the model width by a trainable projection, the same tensor for every layer.
* fuse: a forward hook on ``lora_A[adapter]`` of every fused projection replaces its output ``A(dropout(x_t))`` by
  ``phi(A(dropout(x_s)), A(dropout(x_t)))``; peft then applies ``lora_B`` and the scaling as usual. ``A x_s`` is
  computed with ``F.linear`` on ``A``'s weight (calling the module would re-enter the hook).

The source of a batch is set with :meth:`Fusion.source` (a context manager); it must stay set until ``backward()``
returns, because gradient-checkpointed layers run their forward again during backward (the trainer wraps the whole
training step). A fused projection called with no source set raises :class:`FusionError`: fusion can never be
skipped silently (the original's Llama/Gemma training lost it under gradient checkpointing).

Alignment (position-wise, as the original, see :func:`align`): right-padded encoders fuse token j with source token
j. Left-padded decoders align the END of the source prompt with the end of the target prompt; target positions
after the prompt (answer tokens in training, every decode step in generation) get the LAST source prompt position.
So training, validation and test use one rule. Source padding positions are masked (zero), which makes a row's result
independent of how the batch was padded.

Causality (decoders): the functions that mix target positions (cross-attention, matmul, matmul_relu) let position j
see only target positions <= j (a causal mask), so the gold answer in a teacher-forced sequence cannot leak into
earlier positions. A decode step sees the bottleneck states ``A x_t`` of every earlier target position: the KV
cache does not hold them, so the fusion keeps its own per-batch cache of them (one per fused projection), reset
whenever a new source is set. Encoders fuse bidirectionally. The position-wise functions need neither.

The source pass runs the stage-1 model exactly (:func:`flare.models.stack.stage1_only`: the new adapter off, the
frozen stage-1 adapter on), in eval mode (no dropout).

Source cache (``cache_source_states``, run.py ``--cache_source_states``): that pass runs the FROZEN stage-1 model
(FLARE MT: the frozen NLLB encoder), so an example's layer inputs never change during training. The cache keeps
them per example (keyed by the example's source token ids, its padding removed) in CPU memory, on first use, and
reuses them in every later epoch and validation: a batch whose examples are all cached skips the source pass. A
batch with any new example runs the pass as without the cache (so the first epoch is computed exactly as uncached)
and stores the new examples. Later epochs differ from the uncached run only in floating-point rounding (the
cached states were computed in another batch, with other padding). ``cache_limit_mb`` bounds the memory: past it,
new examples are no longer stored (they are recomputed).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from flare.config import DECODER_FUSION_FNS, FUSION_FNS, MIXING_FNS  # noqa: F401 (re-exported)
from flare.errors import FusionError  # noqa: F401 (re-exported)
from flare.models.stack import stage1_only

if TYPE_CHECKING:
    from flare.models.loading import MTEncoder

logger = logging.getLogger(__name__)

FUSION_FILE = "fusion_model.safetensors"


class _Captured(Exception):
    """Ends the source pass once every fused layer's input is captured (raised from a forward pre-hook)."""


# ---------------------------------------------------------------------------------------------- fusion functions
class CrossAttentionFusion(nn.Module):
    """r-dimensional multi-head cross-attention: query from the source, key and value from the target (as the
    original: no output projection, no residual; output length = source length). Padded target keys are masked."""

    def __init__(self, r: int, heads: int = 1, dropout: float = 0.0):
        super().__init__()
        if r % heads:
            raise ValueError(f"--cross_attention_heads {heads} must divide --lora_r {r}")
        self.heads, self.head_dim = heads, r // heads
        self.query, self.key, self.value = nn.Linear(r, r), nn.Linear(r, r), nn.Linear(r, r)
        self.dropout = nn.Dropout(dropout)

    def forward(self, s: torch.Tensor, t: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``key_mask``: (B, Lt) or (B, Ls, Lt), true where query i may attend target position j."""
        b, ls, r = s.shape
        lt = t.shape[1]
        q = self.query(s).view(b, ls, self.heads, self.head_dim).transpose(1, 2)  # (B, h, Ls, dh)
        k = self.key(t).view(b, lt, self.heads, self.head_dim).transpose(1, 2)  # (B, h, Lt, dh)
        v = self.value(t).view(b, lt, self.heads, self.head_dim).transpose(1, 2)  # (B, h, Lt, dh)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)  # (B, h, Ls, Lt)
        if key_mask is not None:
            allowed = key_mask.bool()[:, None, None, :] if key_mask.dim() == 2 else key_mask.bool()[:, None]
            scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        probs = self.dropout(scores.softmax(-1))
        return (probs @ v).transpose(1, 2).reshape(b, ls, r)  # (B, Ls, r)


def key_mask(t_mask: torch.Tensor | None, ls: int, causal: bool, offset: int = 0) -> torch.Tensor | None:
    """Which target positions each query may use: padding masked; if ``causal``, query i (at target position
    ``offset + i``) sees positions <= its own. ``t_mask`` (B, Lt) -> (B, Lt), or (B, Ls, Lt) when causal."""
    if not causal:
        return t_mask
    lt = t_mask.shape[1]
    pos = torch.arange(lt, device=t_mask.device)
    query_pos = offset + torch.arange(ls, device=t_mask.device)
    return t_mask.bool()[:, None, :] & (pos[None, :] <= query_pos[:, None])[None]  # (B, Ls, Lt)


def fuse(fn: str, s: torch.Tensor, t: torch.Tensor, t_mask: torch.Tensor | None = None,
         cross_attention: CrossAttentionFusion | None = None, causal: bool = False, offset: int = 0) -> torch.Tensor:
    """phi(S, T) for S = A x_s (B, Ls, r) and T = A x_t (B, Lt, r); returns (B, Ls, r).

    The position-wise functions need Ls = Lt. The mixing ones (matmul, cross-attention) let each query use the
    target positions that ``t_mask`` allows and, if ``causal``, only those at or before its own position ``offset +
    i`` (a decode step passes the cached earlier positions as ``t`` and its own position as ``offset``).
    """
    if fn == "add":
        return s + t
    if fn == "add_relu":
        return F.relu(s) + F.relu(t)
    if fn == "mul":
        return s * t
    if t_mask is None:
        t_mask = torch.ones(t.shape[:2], dtype=torch.bool, device=t.device)
    allowed = key_mask(t_mask, s.shape[1], causal, offset)
    if fn in ("matmul", "matmul_relu"):
        if fn == "matmul_relu":
            s, t = F.relu(s), F.relu(t)
        scores = s @ t.transpose(-1, -2)  # (B, Ls, Lt)
        mask = allowed if allowed.dim() == 3 else allowed[:, None, :]
        return (scores * mask.to(scores.dtype)) @ t  # S T^T T over the allowed positions: (B, Ls, r)
    if fn == "cross-attention":
        if cross_attention is None:
            raise FusionError("cross-attention fusion needs its module")
        dtype = cross_attention.query.weight.dtype
        return cross_attention(s.to(dtype), t.to(dtype), allowed).to(t.dtype)
    raise ValueError(f"unknown fusion function {fn!r}; choose one of: {', '.join(FUSION_FNS)}")


# ---------------------------------------------------------------------------------------------- alignment
def align(src_mask: torch.Tensor, tgt_mask: torch.Tensor, padding_side: str,
          answer_len: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Which source position each target position is fused with, and whether that pair is valid.

    ``src_mask`` (B, Ls), ``tgt_mask`` (B, Lt): attention masks. ``answer_len`` (B,): tokens after the prompt in
    the target (decoder training: answer + EOS), else 0. Returns ``index`` (B, Lt) and ``valid`` (B, Lt) bool.
    """
    b, ls = src_mask.shape
    lt = tgt_mask.shape[1]
    j = torch.arange(lt, device=tgt_mask.device).expand(b, lt)  # (B, Lt)
    if padding_side == "right":
        index = j
    else:
        n_after = answer_len if answer_len is not None else torch.zeros(b, dtype=torch.long, device=j.device)
        prompt_end = (lt - 1 - n_after)[:, None]  # (B, 1) last target prompt position
        index = torch.where(j > prompt_end, ls - 1, j - prompt_end + ls - 1)
    inside = (index >= 0) & (index < ls)
    index = index.clamp(0, ls - 1)
    valid = inside & src_mask.gather(1, index).bool() & tgt_mask.bool()
    return index, valid


def gather_positions(x: torch.Tensor, index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """x (B, Ls, D) -> (B, Lt, D): x[b, index[b, j]], zero where not valid."""
    out = x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))
    return out * valid[..., None].to(out.dtype)


# ---------------------------------------------------------------------------------------------- model structure
def find_layers(model: nn.Module, suffix: str) -> nn.ModuleList:
    """The transformer layer list whose dotted name ends with ``suffix`` (``layers``, ``encoder.layer``)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and (name == suffix or name.endswith("." + suffix)):
            return module
    raise FusionError(f"no layer list named '*{suffix}' in {type(model).__name__}; fix 'layers' in its MODEL_SPECS "
                      "row")


def fused_projections(model: nn.Module, layers_suffix: str, targets: tuple[str, ...],
                      adapter: str) -> list[tuple[int, str, nn.Module]]:
    """(layer index, projection name, peft LoRA layer) for every fused projection of ``adapter``."""
    from peft.tuners.lora import LoraLayer

    found = []
    for i, layer in enumerate(find_layers(model, layers_suffix)):
        for name, module in layer.named_modules():
            if name.split(".")[-1] in targets and isinstance(module, LoraLayer) and adapter in module.lora_A:
                found.append((i, name.split(".")[-1], module))
    if not found:
        raise FusionError(f"adapter {adapter!r} has no LoRA on the fusion targets {targets}; the new adapter's "
                          "target modules must include them")
    return found


class FusionModules(nn.Module):
    """FLARE's own trainable modules: one cross-attention per fused projection, and the FLARE MT projection."""

    def __init__(self, keys: list[str], fn: str, r: int, heads: int, dropout: float, mt_dim: int | None,
                 d_model: int):
        super().__init__()
        self.cross_attention = (nn.ModuleDict({k: CrossAttentionFusion(r, heads, dropout) for k in keys})
                                if fn == "cross-attention" else None)
        self.proj = nn.Linear(mt_dim, d_model) if mt_dim else None  # d_mt -> model width


class SourceCache:
    """Source states per example, on the CPU: key (the example's unpadded source ids) -> (n, L_example, D)."""

    def __init__(self, limit_mb: float = 4096):
        self.limit_bytes = limit_mb * 2**20
        self.entries: dict[bytes, torch.Tensor] = {}
        self.bytes = 0
        self.stats = {"hits": 0, "misses": 0, "full": 0}  # batches served, batches computed, examples not stored

    @staticmethod
    def keys(ids: torch.Tensor, mask: torch.Tensor) -> list[bytes]:
        ids, mask = ids.cpu(), mask.cpu().bool()
        return [ids[b][mask[b]].numpy().tobytes() for b in range(ids.shape[0])]

    def lookup(self, keys: list[bytes], mask: torch.Tensor) -> list[torch.Tensor] | None:
        """n x (B, Ls, D) with every row's states at its unmasked positions (zeros elsewhere), or None."""
        if not all(k in self.entries for k in keys):
            return None
        first = self.entries[keys[0]]
        n, d = first.shape[0], first.shape[-1]
        out = first.new_zeros(n, len(keys), mask.shape[1], d)  # (n, B, Ls, D)
        rows = mask.cpu().bool()
        for b, key in enumerate(keys):
            out[:, b, rows[b]] = self.entries[key]
        self.stats["hits"] += 1
        return list(out.to(mask.device).unbind(0))

    def store(self, keys: list[bytes], mask: torch.Tensor, states: list[torch.Tensor]) -> None:
        """Keep the batch's new examples that fit under the limit. The sizes are known before any copy: once the
        cache is full, a batch copies nothing to the CPU (it used to copy every layer's states, then drop them)."""
        self.stats["misses"] += 1
        rows = mask.cpu().bool()
        per_position = len(states) * states[0].shape[-1] * states[0].element_size()  # bytes of one position
        fits = []
        for b, key in enumerate(keys):
            if key in self.entries or key in fits:
                continue
            size = int(rows[b].sum()) * per_position
            if self.bytes + size > self.limit_bytes:
                self.stats["full"] += 1
                continue
            fits.append(key)
            self.bytes += size
        if not fits:
            return
        stacked = torch.stack([s.detach() for s in states]).cpu()  # (n, B, Ls, D)
        for b, key in enumerate(keys):
            if key in fits and key not in self.entries:
                self.entries[key] = stacked[:, b, rows[b]].clone()  # (n, L_example, D)

    def summary(self) -> dict:
        return {"source_cache_examples": len(self.entries), "source_cache_mb": round(self.bytes / 2**20, 1),
                "source_cache_hit_batches": self.stats["hits"], "source_cache_miss_batches": self.stats["misses"],
                "source_cache_not_stored": self.stats["full"]}


@dataclass
class _State:
    sources: list[torch.Tensor] | torch.Tensor  # per layer (B, Lt, D), or one MT tensor (B, Lt, d_mt) for all
    valid: torch.Tensor  # (B, Lt) bool
    tgt_mask: torch.Tensor  # (B, Lt)
    # per fused projection: the target bottleneck states A x_t seen so far and their mask (decoders: decode steps)
    seen: dict = dataclasses.field(default_factory=dict)

    def for_layer(self, i: int) -> torch.Tensor:
        return self.sources if isinstance(self.sources, torch.Tensor) else self.sources[i]


class Fusion:
    """Fusion of one adapter of a peft model: owns the hooks, the fusion modules and the per-batch source.

    ``model`` is the peft model; the fusion modules are registered on it as ``flare_fusion`` so the optimizer
    trains them, and saved beside the adapter in ``fusion_model.safetensors``.
    """

    def __init__(self, model: nn.Module, *, layers: str, targets: tuple[str, ...], adapter: str, fusion_fn: str,
                 padding_side: str, cross_attention_heads: int = 1, attention_dropout: float = 0.0,
                 mt_encoder: MTEncoder | None = None, causal: bool | None = None,
                 cache_source_states: bool = False, cache_limit_mb: float = 4096,
                 state_dtype: torch.dtype | None = None, autocast_dtype: torch.dtype | None = None):
        if fusion_fn not in FUSION_FNS:
            raise ValueError(f"unknown fusion function {fusion_fn!r}; choose one of: {', '.join(FUSION_FNS)}")
        self.model, self.adapter, self.fn = model, adapter, fusion_fn
        self.layers_suffix, self.padding_side, self.mt = layers, padding_side, mt_encoder
        self.causal = padding_side == "left" if causal is None else causal  # left-padded models are decoders
        if self.causal and fusion_fn not in DECODER_FUSION_FNS:
            raise FusionError(f"--fusion_fn {fusion_fn} is not causal, so a decoder cannot use it; choose one of: "
                              f"{', '.join(DECODER_FUSION_FNS)}")
        self.projections = fused_projections(model, layers, targets, adapter)
        first = self.projections[0][2]
        r, d_model = first.r[adapter], first.in_features
        device = first.lora_A[adapter].weight.device
        self.modules = FusionModules([self._key(i, n) for i, n, _ in self.projections], fusion_fn, r,
                                     cross_attention_heads, attention_dropout, mt_encoder.dim if mt_encoder else None,
                                     d_model).to(device)
        model.add_module("flare_fusion", self.modules)
        self.calls = {"train": 0, "eval": 0}
        self.cache = SourceCache(cache_limit_mb) if cache_source_states else None
        # the dtype the source states are kept in (None: as computed). Stage 2 passes bf16/fp16 under --bf16/--fp16:
        # the LoRA A matmul runs under that autocast anyway, so nothing is lost without dropout (with dropout, one
        # extra rounding before its 1/(1-p) scaling); 4-bit models compute their residual stream in fp32
        # (peft upcasts the norms and embeddings), so this halves the states of every batch and of the cache
        self.state_dtype = state_dtype
        # the source pass (and the FLARE MT encoder) run under the autocast training runs in (--bf16 / --fp16):
        # the Trainer's autocast wraps the model's forward only, so without this every step would pay a full fp32
        # forward of the frozen model
        self.autocast_dtype = autocast_dtype
        self._state: _State | None = None
        self._handles: list = []

    @staticmethod
    def _key(layer: int, name: str) -> str:
        return f"{layer}_{name}"

    # ------------------------------------------------------------------ hooks
    def attach(self) -> Fusion:
        if not self._handles:
            for i, name, lora_layer in self.projections:
                hook = self._make_hook(i, self._key(i, name), lora_layer.lora_dropout[self.adapter])
                self._handles.append(lora_layer.lora_A[self.adapter].register_forward_hook(hook))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _make_hook(self, layer: int, key: str, dropout: nn.Module):
        def hook(lora_a: nn.Linear, args, t: torch.Tensor) -> torch.Tensor:  # t = A(dropout(x_t)): (B, L, r)
            state = self._state
            if state is None:
                raise FusionError("a fused LoRA projection ran without a fusion source; run the model inside "
                                  "Fusion.source(batch) (or detach the fusion for plain LoRA)")
            x_s, valid, t_mask = state.for_layer(layer), state.valid, state.tgt_mask
            keys, key_mask, offset = t, t_mask, 0
            if self._is_decode_step(state, key, t, x_s, lora_a.training):
                # one new target position after the prompt: aligned with the last source prompt position; the
                # mixing functions see every earlier position's bottleneck state (cached) and this one
                x_s, valid = x_s[:, -1:], valid[:, -1:]
                if self.fn in MIXING_FNS:
                    prev, prev_mask = state.seen[key]
                    keys = torch.cat([prev, t], 1)  # (B, L_seen + 1, r)
                    key_mask = torch.cat([prev_mask, torch.ones_like(prev_mask[:, :1])], 1)
                    offset = prev.shape[1]
                    state.seen[key] = (keys, key_mask)
                else:
                    key_mask = torch.ones_like(valid)
            elif t.shape[1] != x_s.shape[1]:
                raise FusionError(f"target length {t.shape[1]} matches neither the source alignment "
                                  f"({x_s.shape[1]}) nor a decode step (1)")
            elif self.causal and self.fn in MIXING_FNS:
                state.seen[key] = (t, t_mask)  # the prompt (prefill), for the decode steps that may follow
            s = self._down(lora_a, dropout, x_s) * valid[..., None].to(t.dtype)  # (B, L, r)
            self.calls["train" if lora_a.training else "eval"] += 1
            xattn = self.modules.cross_attention[key] if self.modules.cross_attention is not None else None
            return fuse(self.fn, s, keys, key_mask, xattn, causal=self.causal, offset=offset)

        return hook

    def _is_decode_step(self, state: _State, key: str, t: torch.Tensor, x_s: torch.Tensor, training: bool) -> bool:
        """One new position of a generation with a KV cache (not a full pass over the aligned sequence)."""
        if t.shape[1] != 1 or not self.causal:
            return False
        if x_s.shape[1] != 1:
            return True
        # a one-token prompt: the first call is the prefill, later eval-mode calls are decode steps
        return not training and (key in state.seen or self.fn not in MIXING_FNS)

    def _down(self, lora_a: nn.Linear, dropout: nn.Module, x_s: torch.Tensor) -> torch.Tensor:
        """A(dropout(x_s)); for FLARE MT A(dropout(proj(x_mt))), folded into one (r x d_mt) map without dropout."""
        weight, bias = lora_a.weight, lora_a.bias
        proj = self.modules.proj
        if proj is not None:
            if isinstance(dropout, nn.Identity):
                w = weight @ proj.weight.to(weight.dtype)  # (r, d_mt)
                b = weight @ proj.bias.to(weight.dtype) + (bias if bias is not None else 0)
                return F.linear(x_s.to(weight.dtype), w, b)
            x_s = proj(x_s.to(proj.weight.dtype))
        return F.linear(dropout(x_s.to(weight.dtype)), weight, bias)

    # ------------------------------------------------------------------ per-batch source
    @contextlib.contextmanager
    def source(self, batch: dict):
        """Set the fusion source for one batch (its target and ``src_*``/``mt_*`` fields) for the block's duration."""
        if self._state is not None:
            raise FusionError("nested Fusion.source")
        tgt_mask = batch["attention_mask"]
        answer_len = (batch["labels"] != -100).sum(-1) if "labels" in batch and batch["labels"].dim() == 2 else None
        if self.mt is not None:
            ids, src_mask = batch["mt_input_ids"], batch["mt_attention_mask"].to(tgt_mask.device)
            states = list(self._cached(ids, src_mask, lambda: self._kept([self._autocast(self.mt.encode, ids,
                                                                                         src_mask)])))
            index, valid = align(src_mask, tgt_mask, self.padding_side, answer_len)
            sources = gather_positions(states.pop(0).to(tgt_mask.device), index, valid)
        else:
            src_mask = batch["src_attention_mask"].to(tgt_mask.device)
            pending = list(self._cached(batch["src_input_ids"], src_mask,
                                        lambda: self._kept(self._autocast(self.capture, batch))))
            index, valid = align(src_mask, tgt_mask, self.padding_side, answer_len)
            # layer by layer, each captured state freed once gathered (unless the cache keeps it): the batch holds
            # one set of n_layers x (B, L, D) states, not the captured and the aligned set both
            sources = []
            while pending:
                sources.append(gather_positions(pending.pop(0), index, valid))
        self._state = _State(sources, valid, tgt_mask)
        try:
            yield
        finally:
            self._state = None

    def _autocast(self, fn, *args):
        """``fn(*args)`` under ``autocast_dtype`` (when set) on the device of its first tensor argument."""
        if self.autocast_dtype is None:
            return fn(*args)
        first = args[0] if isinstance(args[0], torch.Tensor) else args[0]["src_input_ids"]
        with torch.autocast(device_type=first.device.type, dtype=self.autocast_dtype):
            return fn(*args)

    def _kept(self, states: list[torch.Tensor]) -> list[torch.Tensor]:
        """The states in ``state_dtype`` (the list emptied as it goes: no two copies of every layer at once)."""
        if self.state_dtype is None:
            return states
        kept = []
        while states:
            kept.append(states.pop(0).to(self.state_dtype))
        return kept

    def _cached(self, ids: torch.Tensor, mask: torch.Tensor, compute) -> list[torch.Tensor]:
        """``compute()`` (n x (B, Ls, D)), or the same states from the source cache when it holds every row."""
        if self.cache is None:
            return compute()
        keys = self.cache.keys(ids, mask)
        hit = self.cache.lookup(keys, mask)
        if hit is not None:
            return hit
        states = compute()
        self.cache.store(keys, mask, states)
        return states

    @torch.no_grad()
    def capture(self, batch: dict) -> list[torch.Tensor]:
        """Input hidden state of every layer for the ``src_*`` inputs, run by the stage-1 model (new adapter off,
        eval mode): n_layers x (B, Ls, D). The pass stops once the last layer's input is captured: that layer, the
        final norm and the head never run."""
        captured: list[torch.Tensor] = []
        layers = find_layers(self.model, self.layers_suffix)

        def pre_hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            captured.append(hidden.detach())
            if len(captured) == len(layers):
                raise _Captured

        handles = [layer.register_forward_pre_hook(pre_hook, with_kwargs=True) for layer in layers]
        hf_model = self.model.get_base_model()
        body = getattr(hf_model, hf_model.base_model_prefix)  # the transformer without its head (no logits)
        inputs = {k[len("src_"):]: v for k, v in batch.items() if k.startswith("src_")}
        if "use_cache" in inspect.signature(body.forward).parameters:
            inputs["use_cache"] = False  # no KV cache for a single pass
        was_training = self.model.training
        self.model.eval()  # the English task model as it predicts: no dropout, deterministic
        try:
            with stage1_only(self.model):
                body(**inputs)
        except _Captured:
            pass
        finally:
            self.model.train(was_training)
            for handle in handles:
                handle.remove()
        if len(captured) != len(layers):
            raise FusionError(f"captured {len(captured)} layer inputs for {len(layers)} layers")
        return captured

    # ------------------------------------------------------------------ save / load
    def has_weights(self) -> bool:
        return any(True for _ in self.modules.parameters())

    def save(self, out_dir: str | Path) -> None:
        if not self.has_weights():
            return
        from safetensors.torch import save_file

        from flare.files import atomic_write

        state = {k: v.detach().cpu().contiguous() for k, v in self.modules.state_dict().items()}
        atomic_write(Path(out_dir) / FUSION_FILE, lambda p: save_file(state, str(p)))

    def load(self, ckpt_dir: str | Path) -> None:
        """Load the fusion modules strictly (every tensor present, shapes equal)."""
        if not self.has_weights():
            return
        from safetensors.torch import load_file

        path = Path(ckpt_dir) / FUSION_FILE
        if not path.is_file():
            raise FusionError(f"{ckpt_dir}: no {FUSION_FILE}; this run's fusion modules were not saved there")
        state = load_file(str(path))
        try:
            self.modules.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise FusionError(f"{path}: does not match this fusion configuration: {e}") from e
        logger.info("loaded %d fusion tensors from %s", len(state), path)
