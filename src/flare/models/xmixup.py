"""X-Mixup (Yang et al., "Enhancing Cross-lingual Transfer by Manifold Mixup", ICLR 2022) for a peft model.

Training runs two passes of the SAME model (the new LoRA active in both, trained through both) per batch: the English
source, whose states after self-attention are recorded in the mixed layers ``[start, end)``, then the target
translation, whose states after self-attention attend to them through the layer's own attention projections (query
from the target, key and value from the source) and are mixed with the cross-attention output::

    encoders (post-LN):  h = LN(λ · (x + O·CA) + (1 − λ) · (x + O·SA))     LN: the attention block's own LayerNorm
    decoders (pre-LN):   h = x + λ · P(O·CA) + (1 − λ) · P(O·SA)          P: Gemma's post-attention norm, else identity

i.e. the residual sum that the layer normalises (or, pre-LN, carries on) takes the cross-attention output in the
share λ. λ = λ0 · sigmoid(w · H + b), one (w, b) per mixed layer, H the entropy of the cross-attention distributions:
encoders: both directions (target over source, source over target), averaged over heads and positions, one λ per
example; decoders: target over source only, averaged over heads and over the target positions up to j (a running
mean), one λ per position, so that position j depends on no later target position. Decoders attend to the source's
PROMPT tokens only (never its answer/label tokens). With λ = 0 the layer is exactly the plain layer. At test time the
hooks do nothing: the target text alone goes through the model, as translate-train LoRA.

The loss (:meth:`XMixup.loss`): ``α·CE(source) + (1 − α)·CE(target) + w_kl·KL(p_source ‖ p_target) +
w_mse·MSE(first-token representations)`` (decoders: the last prompt token's; KL over the label tokens' vocabulary
distributions; extractive QA has no KL: the two texts' positions do not correspond).

Not supported: gradient checkpointing (a recomputed layer could not tell the source pass from the target pass), and
attention modules other than separate ``q/k/v`` (or one fused ``qkv_proj``) with ``o_proj`` (decoders) or BERT's
``attention.self``/``attention.output`` (encoders): :func:`check_supported` says which.
"""

from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from flare.errors import FlareError
from flare.models.fusion import find_layers

logger = logging.getLogger(__name__)

XMIXUP_FILE = "xmixup_model.safetensors"
IGNORE_INDEX = -100


class XMixupError(FlareError, RuntimeError):
    """X-Mixup cannot run on this model (or was used wrongly)."""


def default_layers(n_layers: int) -> tuple[int, int]:
    """X-Mixup's mixed layers [1, 20) of a 24-layer encoder, scaled to ``n_layers`` (at least one layer)."""
    if n_layers <= 1:
        return 0, n_layers
    start = max(1, round(n_layers / 24))
    end = min(n_layers, max(start + 1, round(20 * n_layers / 24)))
    return start, end


class XMixupGates(nn.Module):
    """The trained (w, b) of λ = λ0 · sigmoid(w · H + b), one pair per mixed layer (initialised to 0: λ = λ0 / 2)."""

    def __init__(self, n: int):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(n))
        self.b = nn.Parameter(torch.zeros(n))


def _entropy(p: torch.Tensor) -> torch.Tensor:
    """Entropy over the last dimension of attention probabilities (zeros where p is 0)."""
    return -(p * torch.log(p.clamp_min(1e-12))).sum(-1)


def attention_probs(q: torch.Tensor, k: torch.Tensor, key_mask: torch.Tensor, scale: float,
                    softcap: float | None = None) -> torch.Tensor:
    """q (B, H, Lq, d), k (B, H, Lk, d), key_mask (B, Lk) bool -> softmax probabilities (B, H, Lq, Lk) in fp32; a row
    with no valid key gets all zeros."""
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    p = torch.softmax(scores, dim=-1)
    return torch.nan_to_num(p, nan=0.0)


class _EncoderSite:
    """One post-LN layer (BERT, XLM-R): ``attention.self.{query,key,value}``, ``attention.output.{dense,dropout,
    LayerNorm}``."""

    def __init__(self, layer: nn.Module, config):
        attention = layer.attention
        self.self_attn, self.out = attention.self, attention.output
        self.heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.heads
        self.scale = 1.0 / math.sqrt(self.head_dim)

    def split(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, H*d) -> (B, H, L, d)
        b, n, _ = x.shape
        return x.view(b, n, self.heads, -1).transpose(1, 2)

    def layer_norm(self, x: torch.Tensor) -> torch.Tensor:
        ln = self.out.LayerNorm
        return F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)


class _DecoderSite:
    """One pre-LN decoder layer: ``input_layernorm``, ``self_attn.{q,k,v}_proj`` (or ``qkv_proj``) and ``o_proj``,
    optional ``q_norm``/``k_norm`` (Qwen3, Gemma 3) and, with Gemma's sandwich norms, ``post_attention_layernorm``
    on the attention output."""

    def __init__(self, layer: nn.Module, config):
        self.layer, self.attn = layer, layer.self_attn
        self.norm = layer.input_layernorm
        # Gemma 2/3 normalise the attention output before the residual (and have a pre-feed-forward norm); in
        # Llama-like layers post_attention_layernorm is the feed-forward's input norm instead
        self.post = layer.post_attention_layernorm if hasattr(layer, "pre_feedforward_layernorm") else None
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(self.attn, "head_dim", None) or config.hidden_size // self.heads
        self.scale = getattr(self.attn, "scaling", None) or self.head_dim ** -0.5
        self.softcap = getattr(self.attn, "attn_logit_softcapping", None)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The layer's own projections of the normed state x (B, L, D): q (B, H, L, d), k and v (B, H, L, d) with
        the key/value heads repeated for grouped-query attention. No rotary embedding: see docs/fusion.md."""
        b, n, _ = x.shape
        if hasattr(self.attn, "qkv_proj"):
            qkv = self.attn.qkv_proj(x)
            q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
            q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        else:
            q, k, v = self.attn.q_proj(x), self.attn.k_proj(x), self.attn.v_proj(x)
        q = q.view(b, n, self.heads, self.head_dim)
        k = k.view(b, n, self.kv_heads, self.head_dim)
        v = v.view(b, n, self.kv_heads, self.head_dim)
        if getattr(self.attn, "q_norm", None) is not None:
            q, k = self.attn.q_norm(q), self.attn.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if self.kv_heads != self.heads:
            k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
            v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
        return q, k, v


def check_supported(model: nn.Module, layers_suffix: str, family: str) -> None:
    """Raise :class:`XMixupError` naming what is missing when X-Mixup cannot reuse the layers' attention."""
    layer = find_layers(model, layers_suffix)[0]
    if family == "encoder":
        att = getattr(layer, "attention", None)
        needed = ("self.query", "self.key", "self.value", "output.dense", "output.LayerNorm")
        base = att
    else:
        base = layer
        fused = hasattr(getattr(layer, "self_attn", None), "qkv_proj")
        needed = ("input_layernorm", "self_attn.o_proj",
                  *(("self_attn.qkv_proj",) if fused else ("self_attn.q_proj", "self_attn.k_proj",
                                                           "self_attn.v_proj")))
    missing = [n for n in needed if base is None or _get(base, n) is None]
    if missing:
        raise XMixupError(f"X-Mixup reuses each layer's attention projections, but {type(layer).__name__} has no "
                          f"{', '.join(missing)}; this family's attention cannot be reused (use translate-train "
                          "LoRA, input-level fusion or FLARE)")


def _get(module: nn.Module, dotted: str):
    for part in dotted.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


class XMixup:
    """X-Mixup on the peft ``model``: the hooks of the mixed layers, the gates (registered on the model as
    ``flare_xmixup`` so the optimizer trains them, saved beside the adapter) and the two-pass loss.

    The hooks act only inside :meth:`loss` (training); evaluation and prediction run the target text alone."""

    def __init__(self, model: nn.Module, *, layers: str, family: str, start: int, end: int, lambda0: float = 0.5,
                 alpha: float = 0.4, kl_weight: float = 1.0, mse_weight: float = 1.0, qa: bool = False):
        check_supported(model, layers, family)
        all_layers = find_layers(model, layers)
        if not 0 <= start < end <= len(all_layers):
            raise XMixupError(f"mixed layers [{start}, {end}) outside the model's {len(all_layers)} layers")
        config = model.get_base_model().config.get_text_config()
        self.model, self.family, self.start, self.end = model, family, start, end
        self.lambda0, self.alpha, self.kl_weight, self.mse_weight, self.qa = lambda0, alpha, kl_weight, mse_weight, qa
        self.layers = [all_layers[i] for i in range(start, end)]
        self.sites = [(_EncoderSite(layer, config) if family == "encoder"
                       else _DecoderSite(layer, config)) for layer in self.layers]
        device = next(p.device for p in model.parameters())
        self.gates = XMixupGates(len(self.layers)).to(device)
        model.add_module("flare_xmixup", self.gates)
        self._mode: str | None = None  # None (hooks idle) | "record" (source pass) | "mix" (target pass)
        self._source: dict[int, torch.Tensor] = {}
        self._x: dict[int, torch.Tensor] = {}
        self._masks: dict = {}
        self._inside = False
        self._handles: list = []
        self.reset_lambda_stats()
        self.last_parts: dict[str, float] = {}

    # ------------------------------------------------------------------ hooks
    def attach(self) -> XMixup:
        if self._handles:
            return self
        for k, site in enumerate(self.sites):
            if self.family == "encoder":
                self._handles += [
                    site.out.register_forward_pre_hook(self._remember_residual(k)),
                    site.out.LayerNorm.register_forward_pre_hook(self._encoder_hook(k, site)),
                ]
            else:
                self._handles.append(site.layer.register_forward_pre_hook(self._remember_layer_input(k),
                                                                          with_kwargs=True))
                target = site.post if site.post is not None else site.attn
                self._handles.append(target.register_forward_hook(self._decoder_hook(k, site)))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _remember_residual(self, k: int):
        def pre_hook(module, args):  # BertSelfOutput(hidden_states, input_tensor): input_tensor is the residual
            if self._mode is not None:
                self._x[k] = args[1]
        return pre_hook

    def _remember_layer_input(self, k: int):
        def pre_hook(module, args, kwargs):
            if self._mode is not None:
                self._x[k] = args[0] if args else kwargs["hidden_states"]
        return pre_hook

    def _encoder_hook(self, k: int, site: _EncoderSite):
        def pre_hook(ln, args):  # the LayerNorm's input t = x + dropout(O·SA): (B, Lt, D)
            if self._mode is None:
                return None
            t = args[0]
            if self._mode == "record":
                self._source[k] = site.layer_norm(t)  # h_S: the source state after self-attention
                return None
            x, h_s = self._x.pop(k), self._source[k]
            h_t = site.layer_norm(t)
            src_mask, tgt_mask = self._masks["source_keys"], self._masks["target"]
            q_t = site.split(site.self_attn.query(h_t))
            k_s, v_s = site.split(site.self_attn.key(h_s)), site.split(site.self_attn.value(h_s))
            p_ts = attention_probs(q_t, k_s, src_mask, site.scale)  # (B, H, Lt, Ls)
            dropout = getattr(site.self_attn, "dropout", None)
            p = dropout(p_ts) if isinstance(dropout, nn.Module) else p_ts
            ctx = torch.matmul(p.to(v_s.dtype), v_s).transpose(1, 2).reshape(t.shape[0], t.shape[1], -1)
            cross = x + site.out.dropout(site.out.dense(ctx))
            with torch.no_grad():  # the entropy measures the translation; it is not trained
                q_s, k_t = site.split(site.self_attn.query(h_s)), site.split(site.self_attn.key(h_t))
                p_st = attention_probs(q_s, k_t, tgt_mask, site.scale)  # (B, H, Ls, Lt)
                h = 0.5 * (_masked_mean(_entropy(p_ts).mean(1), tgt_mask) + _masked_mean(_entropy(p_st).mean(1),
                                                                                         src_mask))
            lam = self._lambda(k, h)[:, None, None].to(t.dtype)  # (B, 1, 1)
            self._record_lambda(k, lam.expand(-1, t.shape[1], 1), tgt_mask)
            return (lam * cross + (1 - lam) * t,)
        return pre_hook

    def _decoder_hook(self, k: int, site: _DecoderSite):
        def hook(module, args, output):
            if self._mode is None or self._inside:
                return None
            a_t = output[0] if isinstance(output, tuple) else output  # the attention's residual contribution
            t = self._x.pop(k) + a_t  # the state after self-attention
            if self._mode == "record":
                self._source[k] = t
                return None
            src_mask, tgt_mask = self._masks["source_keys"], self._masks["target"]
            self._inside = True
            try:
                q_t, _, _ = site.qkv(site.norm(t))
                _, k_s, v_s = site.qkv(site.norm(self._source[k]))
                p = attention_probs(q_t, k_s, src_mask, site.scale, site.softcap)  # (B, H, Lt, Ls)
                ctx = torch.matmul(p.to(v_s.dtype), v_s).transpose(1, 2).reshape(t.shape[0], t.shape[1], -1)
                a_c = site.attn.o_proj(ctx)
                if site.post is not None:
                    a_c = site.post(a_c)
            finally:
                self._inside = False
            with torch.no_grad():  # causal: a running mean over the target positions up to j
                per_pos = _entropy(p).mean(1) * tgt_mask  # (B, Lt)
                h = per_pos.cumsum(-1) / tgt_mask.to(per_pos.dtype).cumsum(-1).clamp_min(1)
            lam = self._lambda(k, h)[..., None].to(a_t.dtype)  # (B, Lt, 1)
            self._record_lambda(k, lam, tgt_mask)
            mixed = lam * a_c + (1 - lam) * a_t
            return (mixed, *output[1:]) if isinstance(output, tuple) else mixed
        return hook

    def _lambda(self, k: int, entropy: torch.Tensor) -> torch.Tensor:
        w, b = self.gates.w[k], self.gates.b[k]
        return self.lambda0 * torch.sigmoid(w * entropy.to(w.dtype) + b)

    # ------------------------------------------------------------------ λ statistics
    def reset_lambda_stats(self) -> None:
        self._lam_sum = [0.0] * len(self.sites)
        self._lam_n = [0] * len(self.sites)

    def _record_lambda(self, k: int, lam: torch.Tensor, mask: torch.Tensor) -> None:
        m = mask.to(lam.dtype)[..., None]
        self._lam_sum[k] += float((lam.detach() * m).sum())
        self._lam_n[k] += int(mask.sum())

    def lambda_means(self) -> dict[str, float | None]:
        """Mean λ per mixed layer (over target positions) since the last reset, keyed by layer index."""
        return {str(self.start + k): (s / n if n else None) for k, (s, n) in enumerate(zip(self._lam_sum,
                                                                                             self._lam_n))}

    # ------------------------------------------------------------------ the training loss
    @contextlib.contextmanager
    def _pass(self, mode: str):
        self._mode = mode
        try:
            yield
        finally:
            self._mode = None
            self._x.clear()

    @staticmethod
    def split(batch: dict) -> tuple[dict, dict]:
        """(source, target) model inputs of a training batch (its ``src_*`` fields and the rest)."""
        source = {k[len("src_"):]: v for k, v in batch.items() if k.startswith("src_")}
        return source, {k: v for k, v in batch.items() if not k.startswith("src_")}

    def passes(self, model: nn.Module, source: dict, target: dict):
        """The source pass (its states after self-attention recorded in the mixed layers), then the target pass
        mixed with them; returns both model outputs (with hidden states)."""
        if not self._handles:
            raise XMixupError("XMixup.passes before attach()")
        src_keys = source["attention_mask"].bool()
        if self.family == "decoder":  # the source's prompt only: its answer/label tokens are never attended
            src_keys = src_keys & (source["labels"] == IGNORE_INDEX)
        self._masks = {"source_keys": src_keys, "target": target["attention_mask"].bool()}
        self._source = {}
        try:
            with self._pass("record"):
                out_s = model(**source, output_hidden_states=True)
            with self._pass("mix"):
                out_t = model(**target, output_hidden_states=True)
        finally:
            self._source, self._masks = {}, {}
        return out_s, out_t

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """The X-Mixup loss of one training batch (target fields + ``src_*`` fields with the source's labels)."""
        source, target = self.split(batch)
        out_s, out_t = self.passes(model, source, target)
        loss = self.alpha * out_s.loss + (1 - self.alpha) * out_t.loss
        parts = {"ce_source": out_s.loss.detach(), "ce_target": out_t.loss.detach()}
        if self.kl_weight and not self.qa:
            kl = self._kl(out_s, out_t, source, target)
            loss = loss + self.kl_weight * kl
            parts["kl"] = kl.detach()
        if self.mse_weight:
            mse = F.mse_loss(self._first_token(out_s, source), self._first_token(out_t, target))
            loss = loss + self.mse_weight * mse
            parts["mse"] = mse.detach()
        self.last_parts = {k: float(v) for k, v in parts.items()}
        return loss

    def _kl(self, out_s, out_t, source: dict, target: dict) -> torch.Tensor:
        """KL(p_source ‖ p_target): class distributions, or (decoders) the label tokens' next-token distributions
        (both answers are the same label word, aligned from the end: left padding)."""
        if self.family == "decoder":
            ls = out_s.logits[:, :-1][source["labels"][:, 1:] != IGNORE_INDEX]
            lt = out_t.logits[:, :-1][target["labels"][:, 1:] != IGNORE_INDEX]
            if ls.shape != lt.shape:
                raise XMixupError("X-Mixup's KL term needs the same label tokens in source and target (a "
                                  "classification task); got different answer lengths")
        else:
            ls, lt = out_s.logits, out_t.logits
        log_ps, log_pt = F.log_softmax(ls.float(), -1), F.log_softmax(lt.float(), -1)
        return F.kl_div(log_pt, log_ps, log_target=True, reduction="batchmean")

    def _first_token(self, out, inputs: dict) -> torch.Tensor:
        """Encoders: the first token's last hidden state; decoders: the last prompt token's."""
        hidden = out.hidden_states[-1]
        if self.family == "encoder":
            return hidden[:, 0].float()
        answer = inputs["labels"] != IGNORE_INDEX
        last_prompt = (answer.int().argmax(-1) - 1).clamp_min(0)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last_prompt].float()

    # ------------------------------------------------------------------ save / load
    def save(self, out_dir: str | Path) -> None:
        from safetensors.torch import save_file

        from flare.files import atomic_write

        state = {k: v.detach().cpu().contiguous() for k, v in self.gates.state_dict().items()}
        atomic_write(Path(out_dir) / XMIXUP_FILE, lambda p: save_file(state, str(p)))

    def load(self, ckpt_dir: str | Path) -> None:
        from safetensors.torch import load_file

        path = Path(ckpt_dir) / XMIXUP_FILE
        if not path.is_file():
            raise XMixupError(f"{ckpt_dir}: no {XMIXUP_FILE}; this run's X-Mixup gates were not saved there")
        try:
            self.gates.load_state_dict(load_file(str(path)), strict=True)
        except RuntimeError as e:
            raise XMixupError(f"{path}: does not match this X-Mixup configuration: {e}") from e


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x (B, L), mask (B, L) bool -> (B,) mean over the valid positions."""
    m = mask.to(x.dtype)
    return (x * m).sum(-1) / m.sum(-1).clamp_min(1)
