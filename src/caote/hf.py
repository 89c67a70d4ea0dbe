"""The one module that talks to transformers' internals (written against transformers 5.24).

How the pieces meet (see shared/docs/transformers-notes.md):

* Llama/Qwen2-style attention computes RoPE, calls ``cache.update(...)`` and then the attention function
  named by ``config._attn_implementation``. The attention function does not receive the cache, so
  :class:`caote.layers.EvictingLayer` announces itself in ``update`` (:func:`expect_attention`) and the
  attention function registered here picks it up, computes attention (with float32 weights when the
  policy needs them) and hands weights, values and per-head outputs back to the layer, which scores and
  evicts right away: the layer's entries are not read again in that forward pass.
* The mask function is registered under the same name (otherwise prefill would silently run unmasked). It
  is transformers' ``eager_mask``: a float mask valid for both the SDPA path and the float32 path; with
  ``get_mask_sizes() = (stored + new, seen - stored)`` the causal mask lines up with the compacted cache.
* Padding (left-padded batches): transformers indexes the 2-D padding mask by cache slot, which no longer matches
  the tokens after eviction. The cache announces itself in ``get_mask_sizes``, which transformers calls right before
  the mask function (:func:`expect_mask`); the mask function hands it the 2-D mask, and the cache returns the mask of
  its own slots (:meth:`caote.cache.EvictingCache.slot_padding`: which stored entries and which of the step's
  tokens are padding) and records the step's padding for its layers' ``update``.
* Hybrid models (Gemma 2/3, Qwen2 with ``use_sliding_window``, Mistral/Phi-3 with ``sliding_window``): a layer whose
  type is ``"sliding_attention"`` (:func:`layer_windows`, read with transformers' own
  ``get_layer_types_and_kwargs``, as ``DynamicCache(config=...)`` does) keeps its window in transformers' own
  sliding-window cache layer and never evicts; the budget applies to the full-attention (global) layers. The model
  builds one mask per layer type from the first cache layer of that type (``create_causal_mask`` /
  ``create_sliding_window_causal_mask`` read its ``get_mask_sizes``), through the mask function registered here, so
  every global layer gets the compacted causal mask and every sliding layer transformers' own sliding mask; caote's
  attention function, registered for the whole model, runs a sliding layer's step as plain attention over that mask.

Registration uses transformers' own extension points (``AttentionInterface``, ``AttentionMaskInterface``)
and happens when a cache is attached to a model, never at import.
"""

from __future__ import annotations

import contextlib
import threading
from typing import TYPE_CHECKING

import torch
from transformers import AttentionInterface
from transformers.cache_utils import get_layer_types_and_kwargs
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask

if TYPE_CHECKING:
    from caote.cache import EvictingCache
    from caote.layers import EvictingLayer

ATTENTION_NAME = "caote"

MODEL_LOAD_KWARGS = {"use_kernels": False}
"""Passed to every ``from_pretrained`` of a model: transformers 5.25 turns hub kernels on by default (fetched at load
time, and an error without the ``kernels`` package); caote runs offline on the model's own layers. 5.24's default."""

FULL_ATTENTION, SLIDING_ATTENTION = "full_attention", "sliding_attention"
"""transformers' layer types (``config.layer_types``) that caote caches: global layers evict under the budget,
sliding-window layers keep their window."""

REFUSED_LAYER_TYPES = {
    "linear_attention": "linear-attention layers keep a recurrent state, not one key and value per token",
    "conv": "convolution/SSM layers keep a recurrent state, not one key and value per token",
    "hybrid": "layers mixing a linear-attention (SSM) state with attention keep a recurrent state besides their keys",
    "hybrid_sliding": "layers mixing a linear-attention (SSM) state with attention keep a recurrent state besides "
                      "their keys",
    "dummy": "layers that reuse another layer's keys and values (shared KV) or have no attention store no entries "
             "of their own to evict",
    "chunked_attention": "chunked-attention layers (Llama 4) mask by chunk of absolute positions; caote keeps "
                         "sliding-window layers as they are but does not handle chunked ones",
}
"""Why each layer type caote cannot cache is refused (any other type than these and :data:`FULL_ATTENTION` /
:data:`SLIDING_ATTENTION` is refused too, as not plain softmax attention over cached keys)."""

UNREPRODUCED_ATTENTION_ARGUMENTS = {
    "s_aux": "attention sinks (a learned logit per head, GPT-OSS)",
    "sinks": "attention sinks (a learned logit per head)",
    "position_bias": "an additive position bias (ALiBi/T5-style)",
}
"""Arguments of the attention call that caote's float32 attention does not reproduce: a model passing one of them
(not ``None``) is refused on its first step, naming it. Logit soft-capping (``softcap``, Gemma 2) is reproduced."""

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
    """Attention that feeds an :class:`~caote.layers.EvictingLayer`.

    Without a pending evicting layer (a sliding-window layer of a hybrid model, under the sliding mask the model
    built for it), or when the layer needs no weights this step, it is transformers' SDPA. Otherwise it is eager
    attention computed in float32 (the weights drive the scores: method.md §2 asks for float32), returning
    ``(B, Q, H_q, D)`` in the query dtype like every attention function. Attention logit soft-capping (``softcap``,
    Gemma 2), which SDPA cannot apply, always runs the float32 path; arguments it does not reproduce
    (:data:`UNREPRODUCED_ATTENTION_ARGUMENTS`) are refused.
    """
    layer = _take_pending(key)
    _refuse_unreproduced(module, query, value, kwargs)
    softcap = kwargs.get("softcap")
    if layer is not None and kwargs.get("sliding_window") is not None:
        raise ValueError(
            f"layer {getattr(module, 'layer_idx', '?')} is a sliding-window layer but its cache layer evicts: create "
            "the cache with EvictingCache(model, ...), which keeps sliding-window layers in their own window")
    if layer is not None and layer.attends_itself:  # per-head storage: the layer runs attention head by head
        if softcap is not None:
            raise ValueError(f"method {layer.config.method!r}: per-head attention does not implement attention "
                             f"logit soft-capping (softcap={softcap}, Gemma 2); use the method without '+adaptive'")
        return layer.attend(module, query, scaling), None
    if layer is not None:  # a layer whose slot order is not position order masks its own slots (caote.ring)
        own_mask = layer.slot_mask(query.shape[2], query.dtype)
        attention_mask = own_mask if own_mask is not None else attention_mask
    if layer is None or not layer.wants_attention():
        output = _plain_attention(module, query, key, value, attention_mask, dropout, scaling, softcap, kwargs)
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
        weights, outputs = _float32_attention(query, key, value, attention_mask, scaling, outputs=True, softcap=softcap)
        layer.after_attention(weights, values, outputs, **extra)
        return _heads_last(outputs, query), None
    # plain attention computes the output; float32 weights (and outputs), if read, only for the rows the scores read
    output = _plain_attention(module, query, key, value, attention_mask, dropout, scaling, softcap, kwargs)
    weights = outputs = None
    if reads.attention:
        mask = None if attention_mask is None else attention_mask[..., -rows:, :]
        weights, outputs = _float32_attention(query[..., -rows:, :], key, value, mask, scaling, outputs=reads.outputs,
                                              softcap=softcap)
    layer.after_attention(weights, values, outputs, **extra)
    return output, None


def _refuse_unreproduced(module: torch.nn.Module, query: torch.Tensor, value: torch.Tensor, kwargs: dict) -> None:
    """Refuse, naming it, an attention call whose arguments caote's attention does not reproduce
    (:data:`UNREPRODUCED_ATTENTION_ARGUMENTS`, or values whose head size differs from the queries')."""
    for name, what in UNREPRODUCED_ATTENTION_ARGUMENTS.items():
        if kwargs.get(name) is not None:
            raise ValueError(f"{type(module).__name__} passes {name}= to its attention function: {what}, which "
                             "caote's attention does not reproduce; this model cannot use the evicting cache")
    if value.shape[-1] != query.shape[-1]:
        raise ValueError(f"{type(module).__name__} has values of head size {value.shape[-1]} and queries of "
                         f"{query.shape[-1]} (e.g. multi-head latent attention): caote's attention assumes one "
                         "head size")


def _plain_attention(module, query, key, value, attention_mask, dropout: float, scaling: float,
                     softcap: float | None, kwargs: dict) -> torch.Tensor:
    """A step's output ``(B, Q, H_q, D)`` when no weights are read: transformers' SDPA, or, with logit soft-capping
    (which SDPA cannot apply), the float32 eager attention (as transformers' Gemma 2 eager attention computes it)."""
    if softcap is None:
        output, _ = sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
        return output
    _, outputs = _float32_attention(query, key, value, attention_mask, scaling, outputs=True, softcap=softcap)
    return _heads_last(outputs, query)


def _heads_last(outputs: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Grouped float32 outputs ``(B, H_kv, G, Q, D)`` as an attention function returns them: ``(B, Q, H_q, D)`` in the
    query dtype."""
    batch, q_heads, q_len, head_dim = query.shape
    return outputs.reshape(batch, q_heads, q_len, head_dim).transpose(1, 2).to(query.dtype).contiguous()


def _float32_attention(query, key, value, attention_mask, scaling: float, outputs: bool, softcap: float | None = None):
    """Eager attention in float32, grouped by KV head: weights ``(B, H_kv, G, Q, N)`` and, if asked, per-head
    outputs ``(B, H_kv, G, Q, D)`` (query head ``h`` uses KV head ``h // G``, transformers' repeat_kv layout).
    ``softcap``: attention logit soft-capping ``softcap · tanh(logits / softcap)`` before the mask (Gemma 2, as
    transformers' ``gemma2.eager_attention_forward``)."""
    batch, q_heads, q_len, head_dim = query.shape
    kv_heads, n_keys = key.shape[1], key.shape[2]
    group = q_heads // kv_heads
    q = query.to(torch.float32).reshape(batch, kv_heads, group * q_len, head_dim)
    logits = torch.matmul(q, key.to(torch.float32).transpose(-1, -2)).mul_(scaling)
    logits = logits.view(batch, kv_heads, group, q_len, n_keys)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    if attention_mask is not None:
        logits.add_(attention_mask.to(torch.float32).unsqueeze(2))
    weights = torch.softmax(logits, dim=-1)
    if not outputs:
        return weights, None
    out = torch.matmul(weights.view(batch, kv_heads, group * q_len, n_keys), value.to(torch.float32))
    return weights, out.view(batch, kv_heads, group, q_len, head_dim)


def segment_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float, float32: bool):
    """One KV head's attention over its own entries: ``query`` ``(G, Q, D)`` (the query heads sharing it), ``keys`` /
    ``values`` ``(N, D)`` whose last ``Q`` are the step's own tokens (every earlier entry precedes them; they attend
    causally among themselves). Returns float32 ``weights`` ``(G, Q, N)`` and ``outputs`` ``(G, Q, D)`` when
    ``float32``, else ``(None, outputs)`` from SDPA in the input dtype."""
    q_len, n_keys = query.shape[1], keys.shape[0]
    causal = None
    if q_len > 1:
        causal = torch.ones(q_len, n_keys, dtype=torch.bool, device=query.device).tril(n_keys - q_len)
    if not float32:
        return None, torch.nn.functional.scaled_dot_product_attention(
            query, keys.expand(query.shape[0], -1, -1), values.expand(query.shape[0], -1, -1), attn_mask=causal,
            scale=scaling)
    logits = torch.matmul(query.to(torch.float32), keys.to(torch.float32).T).mul_(scaling)
    if causal is not None:
        logits.masked_fill_(~causal, float("-inf"))
    weights = torch.softmax(logits, dim=-1)
    return weights, torch.matmul(weights, values.to(torch.float32))


def expect_mask(cache: EvictingCache, layer_idx: int) -> None:
    """Called by ``EvictingCache.get_mask_sizes``, which transformers 5.24 calls (``_preprocess_mask_arguments``) right
    before the mask function: the next mask is built for layer ``layer_idx`` of ``cache``."""
    _pending.mask_owner = (cache, layer_idx)


def caote_mask(*args, attention_mask: torch.Tensor | None = None, **kwargs):
    """transformers' ``eager_mask`` over the cache's own slots (see module docstring).

    For an evicting cache the 2-D padding mask (``(B, seen + Q)``, by token) is replaced by the validity of the cache's
    slots (:meth:`caote.cache.EvictingCache.slot_padding`), which also records the step's padding for the layers; for
    any other cache (or none) it is transformers' own."""
    owner = getattr(_pending, "mask_owner", None)
    _pending.mask_owner = None
    if owner is not None:
        cache, layer_idx = owner
        kv_offset = kwargs.get("kv_offset", 0)
        slots = cache.slot_padding(layer_idx, attention_mask, kwargs["q_length"], kwargs["kv_length"], kv_offset)
        # transformers' eager_mask reads a 2-D mask at column kv_offset + slot
        attention_mask = None if slots is None else torch.cat([slots.new_ones(slots.shape[0], kv_offset), slots], -1)
    return eager_mask(*args, attention_mask=attention_mask, **kwargs)


def register() -> None:
    """Register caote's attention and mask functions under :data:`ATTENTION_NAME` (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, caote_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, caote_mask)


def layer_windows(config) -> list[int | None]:
    """Each decoder layer's sliding window, ``None`` for a global (full-attention) layer, the one kind the budget
    applies to; any model caote cannot cache is refused with a ``ValueError`` naming the reason.

    What the evicting cache needs (instead of a list of architectures): a causal decoder-only model whose layers
    each run softmax attention over one cache of their own keys and values, written by ``cache.update`` after RoPE
    and read through transformers' attention interface (:func:`attach` checks that part). The layer types come from
    transformers' ``get_layer_types_and_kwargs`` (what ``DynamicCache(config=...)`` builds its layers from; a
    model-wide ``sliding_window`` makes every layer a sliding one). Refused: encoder-decoder models, bidirectional
    attention, cross-attention, shared-KV layers and every layer type of :data:`REFUSED_LAYER_TYPES` (linear
    attention/SSM, chunked attention, ...).
    """
    name = getattr(config, "model_type", None)

    def refuse(reason: str) -> ValueError:
        return ValueError(f"model architecture {name!r} is not supported by caote: {reason}")

    if getattr(config, "is_encoder_decoder", False):
        raise refuse("it is an encoder-decoder model (its decoder's cross-attention reads the encoder's keys, not a "
                     "causal cache); caote supports decoder-only models")
    text = config.get_text_config(decoder=True)
    if not getattr(text, "is_causal", True):
        raise refuse("its attention is bidirectional (is_causal=False); eviction needs causal attention")
    if getattr(text, "add_cross_attention", False):
        raise refuse("it has cross-attention layers (add_cross_attention=True), whose keys come from another input")
    if getattr(text, "num_kv_shared_layers", 0):
        raise refuse(f"its last {text.num_kv_shared_layers} layers reuse earlier layers' keys and values (shared KV): "
                     "evicting in one layer would change another's")
    try:
        layer_types, layer_kwargs = get_layer_types_and_kwargs(text)
    except (AttributeError, ValueError) as error:
        raise refuse(f"its layer types cannot be read ({error})") from error
    windows: list[int | None] = []
    for index, (layer_type, kwargs) in enumerate(zip(layer_types, layer_kwargs)):
        if layer_type == FULL_ATTENTION:
            windows.append(None)
        elif layer_type == SLIDING_ATTENTION:
            windows.append(int(kwargs["sliding_window"]))
        else:
            reason = REFUSED_LAYER_TYPES.get(layer_type,
                                             "it is not softmax attention over one cache of keys and values")
            raise refuse(f"layer {index} is of type {layer_type!r}: {reason}")
    return windows


def attach(model) -> list[int | None]:
    """Check ``model`` and switch it to caote's attention function (an explicit, per-model change); return its
    layers' sliding windows (:func:`layer_windows`)."""
    windows = layer_windows(model.config)
    register()
    if model.config._attn_implementation != ATTENTION_NAME:
        model.set_attn_implementation(ATTENTION_NAME)
    if model.config._attn_implementation != ATTENTION_NAME:  # transformers only warns for such a model
        raise ValueError(
            f"model architecture {getattr(model.config, 'model_type', None)!r} is not supported by caote: "
            f"{type(model).__name__} does not run its attention through transformers' AttentionInterface, so "
            "caote's attention function (which scores and evicts) cannot be installed")
    return windows


def _rope(model) -> tuple[torch.Tensor | None, str | None]:
    """The global layers' RoPE inverse frequencies ``(D/2,)`` (float32, CPU) and ``None``, or ``None`` and why they
    cannot be used to rotate queries to another position (:func:`rope_inv_freq`)."""
    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    if rotary is None:
        return None, "the model has no rotary embedding module (model.model.rotary_emb)"
    rope_type = getattr(rotary, "rope_type", "default")
    if hasattr(rotary, f"{FULL_ATTENTION}_inv_freq"):  # per-layer-type RoPE (Gemma 3): the global layers' settings
        inv_freq = getattr(rotary, f"{FULL_ATTENTION}_inv_freq")
        scaling = getattr(rotary, f"{FULL_ATTENTION}_attention_scaling", 1.0)
        rope_type = rope_type.get(FULL_ATTENTION, "default") if isinstance(rope_type, dict) else rope_type
    elif isinstance(getattr(rotary, "inv_freq", None), torch.Tensor):
        inv_freq, scaling = rotary.inv_freq, getattr(rotary, "attention_scaling", 1.0)
    else:
        return None, f"its rotary embedding ({type(rotary).__name__}) has no inverse frequencies for the global layers"
    if rope_type in ("dynamic", "longrope"):
        return None, f"its RoPE ({rope_type!r}) changes its frequencies with the sequence length"
    if float(scaling) != 1.0:
        return None, f"its RoPE ({rope_type!r}) rescales cos/sin (attention_scaling={float(scaling):g})"
    head_dim = model_shape(model.config.get_text_config(decoder=True))[2]
    if 2 * inv_freq.numel() != head_dim:
        return None, f"its RoPE rotates {2 * inv_freq.numel()} of the {head_dim} dimensions of a head (partial rotary)"
    return inv_freq.detach().to(torch.float32).cpu(), None


def rope_inv_freq(model) -> torch.Tensor | None:
    """The global (full-attention) layers' RoPE inverse frequencies ``(D/2,)`` (float32, CPU) that ``expected``
    rotates queries with, or ``None`` where they cannot be used (:func:`rope_unavailable_reason` says why): no rotary
    module where transformers keeps it (``model.model.rotary_emb``), RoPE that rescales cos/sin
    (``attention_scaling != 1``) or changes its frequencies with the length (``dynamic``, ``longrope``), or partial
    rotary. Models with separate local/global RoPE settings (Gemma 3: ``full_attention_inv_freq``) give their global
    layers' frequencies: only global layers evict."""
    return _rope(model)[0]


def rope_unavailable_reason(model) -> str | None:
    """Why :func:`rope_inv_freq` is ``None`` for ``model`` (``None`` when it is not)."""
    return _rope(model)[1]


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


def forward(model, input_ids: torch.Tensor, cache, logits_to_keep: int = 0, position_ids: torch.Tensor | None = None,
            attention_mask: torch.Tensor | None = None):
    """One forward step through ``cache`` (transformers 5.24 names it ``cache``; earlier 5.x ``past_key_values``).

    Positions are left to the model, which derives them from ``cache.get_seq_length()`` (tokens seen), unless
    ``position_ids`` ``(B, Q)`` places the step elsewhere (the question probe, padded rows; the causal mask still
    follows the cache's ``get_mask_sizes``). ``attention_mask`` ``(B, seen + Q)``: 0 marks padding (transformers'
    2-D mask, every token seen so far and the step's).
    """
    extra = {} if position_ids is None else {"position_ids": position_ids}
    if attention_mask is not None:
        extra["attention_mask"] = attention_mask
    return model(input_ids=input_ids, cache=cache, use_cache=True, logits_to_keep=logits_to_keep, **extra)
