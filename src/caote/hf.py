"""The one module that talks to transformers' internals (written against transformers 5.24).

How the pieces meet (see shared/docs/transformers-notes.md):

* Llama/Qwen2-style attention computes RoPE, calls ``cache.update(...)`` and then the attention function
  named by ``config._attn_implementation``. The attention function does not receive the cache, so
  :class:`caote.cache.EvictingLayer` announces itself in ``update`` (:func:`expect_attention`) and the
  attention function registered here picks it up, computes attention (with float32 weights when the
  policy needs them) and hands weights, values and per-head outputs back to the layer, which scores and
  evicts right away: the layer's entries are not read again in that forward pass.
* The mask function is registered under the same name (otherwise prefill would silently run unmasked). It
  is transformers' ``eager_mask``: a float mask valid for both the SDPA path and the float32 path; with
  ``get_mask_sizes() = (stored + new, seen - stored)`` the causal mask lines up with the compacted cache.
* Padding is refused: the 2-D padding mask is indexed by physical slot, which no longer matches after
  eviction.

Registration uses transformers' own extension points (``AttentionInterface``, ``AttentionMaskInterface``)
and happens when a cache is attached to a model, never at import.
"""

from __future__ import annotations

import contextlib
import threading
from typing import TYPE_CHECKING

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask

if TYPE_CHECKING:
    from caote.cache import EvictingLayer

ATTENTION_NAME = "caote"

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")
"""Architectures whose attention is RoPE -> ``cache.update`` -> attention function, one global causal
attention per layer, keys cached after RoPE (checked by the test suite on tiny random models)."""

_pending = threading.local()


def expect_attention(layer: EvictingLayer, keys: torch.Tensor) -> None:
    """Called by ``EvictingLayer.update``: the next attention call over ``keys`` belongs to ``layer``."""
    previous = getattr(_pending, "entry", None)
    if previous is not None:
        _pending.entry = None
        raise RuntimeError(
            "an EvictingCache layer was updated but its attention never reached caote's attention function: "
            f"the model must use attn_implementation={ATTENTION_NAME!r} (EvictingCache(model, ...) sets it; "
            "do not change it afterwards)"
        )
    _pending.entry = (keys, layer)


def _take_pending(key: torch.Tensor) -> EvictingLayer | None:
    entry = getattr(_pending, "entry", None)
    if entry is None:
        return None
    _pending.entry = None
    keys, layer = entry
    if keys is not key:
        raise RuntimeError("caote attention received keys that are not the ones its cache layer returned")
    return layer


def caote_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention that feeds an :class:`~caote.cache.EvictingLayer`.

    Without a pending evicting layer, or when the layer needs no weights this step, it is transformers'
    SDPA. Otherwise it is eager attention computed in float32 (the weights drive the scores: method.md §2
    asks for float32), returning ``(B, Q, H_q, D)`` in the query dtype like every attention function.
    """
    layer = _take_pending(key)
    if layer is None or not layer.wants_attention():
        output, _ = sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
        if layer is not None:
            layer.after_attention(None, None, None)
        return output, None
    reads = layer.step_reads()
    batch, q_heads, q_len, head_dim = query.shape
    rows = reads.query_rows(layer.config) if reads.attention else 0
    extra = {"scaling": scaling, "module": module}
    if reads.queries:
        extra["queries"] = query.to(torch.float32).view(batch, key.shape[1], q_heads // key.shape[1], q_len, head_dim)
        extra["keys"] = key.to(torch.float32)
    values = value.to(torch.float32)
    if reads.attention and (rows is None or rows >= q_len):
        # every query's weights are read: the float32 eager attention is the layer's output too
        weights, outputs = _float32_attention(query, key, value, attention_mask, scaling, outputs=True)
        layer.after_attention(weights, values, outputs, **extra)
        attn_output = outputs.reshape(batch, q_heads, q_len, head_dim).transpose(1, 2).to(query.dtype)
        return attn_output.contiguous(), None
    # SDPA computes the output; float32 weights (and outputs), if read, only for the rows the scores read
    output, _ = sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
    )
    weights = outputs = None
    if reads.attention:
        mask = None if attention_mask is None else attention_mask[..., -rows:, :]
        weights, outputs = _float32_attention(query[..., -rows:, :], key, value, mask, scaling, outputs=reads.outputs)
    layer.after_attention(weights, values, outputs, **extra)
    return output, None


def _float32_attention(query, key, value, attention_mask, scaling: float, outputs: bool):
    """Eager attention in float32, grouped by KV head: weights ``(B, H_kv, G, Q, N)`` and, if asked, per-head
    outputs ``(B, H_kv, G, Q, D)`` (query head ``h`` uses KV head ``h // G``, transformers' repeat_kv layout)."""
    batch, q_heads, q_len, head_dim = query.shape
    kv_heads, n_keys = key.shape[1], key.shape[2]
    group = q_heads // kv_heads
    q = query.to(torch.float32).reshape(batch, kv_heads, group * q_len, head_dim)
    logits = torch.matmul(q, key.to(torch.float32).transpose(-1, -2)).mul_(scaling)
    logits = logits.view(batch, kv_heads, group, q_len, n_keys)
    if attention_mask is not None:
        logits = logits + attention_mask.to(torch.float32).unsqueeze(2)
    weights = torch.softmax(logits, dim=-1)
    if not outputs:
        return weights, None
    out = torch.matmul(weights.view(batch, kv_heads, group * q_len, n_keys), value.to(torch.float32))
    return weights, out.view(batch, kv_heads, group, q_len, head_dim)


def caote_mask(*args, attention_mask: torch.Tensor | None = None, **kwargs):
    """transformers' ``eager_mask``, refusing padded batches (see module docstring)."""
    if attention_mask is not None and attention_mask.ndim == 2 and not bool(attention_mask.all()):
        raise ValueError(
            "padded batches are not supported by caote's evicting cache: the padding mask is indexed by "
            "cache slot, which no longer matches positions after eviction. Run sequences one at a time or "
            "batch prompts of equal length without padding."
        )
    return eager_mask(*args, attention_mask=attention_mask, **kwargs)


def register() -> None:
    """Register caote's attention and mask functions under :data:`ATTENTION_NAME` (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, caote_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, caote_mask)


def check_supported(config) -> None:
    """Refuse, naming it, any architecture the evicting cache is not verified for."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model architecture {model_type!r} is not supported by caote: eviction is implemented for "
            f"attention that caches post-RoPE keys in one global causal attention per layer "
            f"({', '.join(SUPPORTED_MODEL_TYPES)}); other architectures (sliding-window or hybrid layers, "
            "shared KV, linear attention, encoder-decoder) would get wrong masks or positions"
        )
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    sliding = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    if layer_types != {"full_attention"} or sliding is not None:
        raise ValueError(
            f"model architecture {model_type!r} with layer types {sorted(layer_types)} and sliding_window="
            f"{sliding} is not supported by caote: an evicting cache on top of sliding-window attention "
            "would evict tokens the window already dropped and break the mask"
        )
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"model architecture {model_type!r} is encoder-decoder; caote supports decoder-only models")


def attach(model) -> None:
    """Check ``model`` and switch it to caote's attention function (an explicit, per-model change)."""
    check_supported(model.config)
    register()
    if model.config._attn_implementation != ATTENTION_NAME:
        model.set_attn_implementation(ATTENTION_NAME)


def rope_inv_freq(model) -> torch.Tensor | None:
    """The model's RoPE inverse frequencies ``(D/2,)`` (float32, CPU), or ``None`` when the model has no rotary
    embedding module where Llama-style models keep it. Refused when RoPE rescales its cos/sin
    (``attention_scaling != 1``): relative rotation of queries (``expected``) assumes a pure rotation."""
    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    inv_freq = getattr(rotary, "inv_freq", None)
    if inv_freq is None:
        return None
    if float(getattr(rotary, "attention_scaling", 1.0)) != 1.0:
        return None
    return inv_freq.detach().to(torch.float32).cpu()


@contextlib.contextmanager
def attached(model):
    """``with caote.attached(model): ...`` — caote's attention for the block, the model's own afterwards.

    ``EvictingCache(model, ...)`` switches the model's attention implementation (scores need the weights); this
    restores the previous implementation on exit, errors included.
    """
    previous = model.config._attn_implementation
    attach(model)
    try:
        yield model
    finally:
        if model.config._attn_implementation != previous:
            model.set_attn_implementation(previous)


def model_shape(config) -> tuple[int, int, int]:
    """``(num_layers, num_kv_heads, head_dim)`` from a transformers config."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


def forward(model, input_ids: torch.Tensor, cache, logits_to_keep: int = 0, position_ids: torch.Tensor | None = None):
    """One forward step through ``cache`` (transformers 5.24 names it ``cache``; earlier 5.x ``past_key_values``).

    Positions are left to the model, which derives them from ``cache.get_seq_length()`` (tokens seen), unless
    ``position_ids`` ``(B, Q)`` places the step elsewhere (the question probe; the causal mask still follows the
    cache's ``get_mask_sizes``).
    """
    extra = {} if position_ids is None else {"position_ids": position_ids}
    return model(input_ids=input_ids, cache=cache, use_cache=True, logits_to_keep=logits_to_keep, **extra)
