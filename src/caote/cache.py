"""The evicting KV cache: storage, absolute positions and eviction, one object per layer.

Each :class:`EvictingLayer` owns preallocated buffers of ``budget + block_size`` entries per KV head
(keys, values, the absolute position of every entry and, for H2O, its accumulated attention). A step
writes its new entries after the stored ones, attention runs over ``stored + new`` entries, and the layer
then keeps the ``budget`` best-scored entries of every KV head, compacting them in place at the front of
the buffers, in position order. So the stored KV never exceeds ``budget + block_size`` entries per layer and
KV head, during prefill as during decoding (method.md §1).

Positions: ``get_seq_length()`` is the number of tokens *seen*, so the model gives new tokens their absolute
positions; ``get_mask_sizes()`` is ``(stored + new, seen - stored)``, so the causal mask lines up with the
compacted cache (every stored entry precedes every new token).
"""

from __future__ import annotations

import functools

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from caote import hf
from caote.policy import EvictionConfig, score_entries
from caote.scores import attention_mass


class EvictingLayer(CacheLayerMixin):
    """One layer's bounded KV cache (see the module docstring)."""

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, config: EvictionConfig):
        super().__init__()
        self.config = config
        self.seen = 0
        """Tokens seen so far: the absolute position of the next token."""
        self.stored = 0
        """Entries held per KV head."""
        self.peak_stored = 0
        """Largest number of entries per KV head ever held (at attention time, new tokens included)."""
        self.evicted = 0
        """Entries evicted per KV head, summed over steps."""
        self.capacity = 0
        self._keys: torch.Tensor | None = None  # (B, H, capacity, D)
        self._values: torch.Tensor | None = None
        self._positions: torch.Tensor | None = None  # (B, H, capacity) int64
        self._attention_sum: torch.Tensor | None = None  # (B, H, capacity) float32, H2O only

    # ----------------------------------------------------------------------------------------- storage
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        self.is_initialized = True
        self._allocate(self._steady_capacity(key_states.shape[-2]), key_states, value_states)

    def _steady_capacity(self, step_len: int) -> int:
        if self.config.evicts:
            return self.config.budget + max(self.config.block_size, step_len)
        return max(self.config.block_size, step_len)

    def _allocate(self, capacity: int, key_like: torch.Tensor, value_like: torch.Tensor) -> None:
        """(Re)allocate the buffers for ``capacity`` entries, keeping the stored ones."""
        batch, heads = key_like.shape[:2]
        new_keys = key_like.new_empty(batch, heads, capacity, key_like.shape[-1])
        new_values = value_like.new_empty(batch, heads, capacity, value_like.shape[-1])
        new_positions = torch.empty(batch, heads, capacity, dtype=torch.long, device=key_like.device)
        new_sum = None
        if self.config.accumulates_attention:
            new_sum = torch.zeros(batch, heads, capacity, dtype=torch.float32, device=key_like.device)
        if self.stored:
            s = self.stored
            new_keys[:, :, :s] = self._keys[:, :, :s]
            new_values[:, :, :s] = self._values[:, :, :s]
            new_positions[:, :, :s] = self._positions[:, :, :s]
            if new_sum is not None:
                new_sum[:, :, :s] = self._attention_sum[:, :, :s]
        self._keys, self._values, self._positions, self._attention_sum = new_keys, new_values, new_positions, new_sum
        self.capacity = capacity
        self._publish()

    def _publish(self) -> None:
        """Expose the stored entries as ``keys``/``values`` (views, as transformers' layers do)."""
        self.keys = self._keys[:, :, : self.stored]
        self.values = self._values[:, :, : self.stored]

    @property
    def positions(self) -> torch.Tensor:
        """Absolute position of every stored entry, ``(B, H_kv, stored)``, increasing along the last axis."""
        return self._positions[:, :, : self.stored]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append a step's post-RoPE keys and values; return all stored entries for attention."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        step = key_states.shape[-2]
        if key_states.shape[0] != self._keys.shape[0]:
            raise ValueError(
                f"batch size changed from {self._keys.shape[0]} to {key_states.shape[0]} within one evicting cache"
            )
        if self.stored + step > self.capacity:
            # an evicting layer only overflows on a step longer than block_size (e.g. a whole prompt in one
            # forward): grow to fit, shrink back after eviction. A never-evicting layer grows geometrically.
            grown = self.stored + step if self.config.evicts else max(self.stored + step, 2 * self.capacity)
            self._allocate(grown, key_states, value_states)
        start, end = self.stored, self.stored + step
        self._keys[:, :, start:end] = key_states
        self._values[:, :, start:end] = value_states
        self._positions[:, :, start:end] = torch.arange(self.seen, self.seen + step, device=self.device)
        if self._attention_sum is not None:
            self._attention_sum[:, :, start:end] = 0.0
        self.stored, self.seen = end, self.seen + step
        self.peak_stored = max(self.peak_stored, end)
        self._publish()
        hf.expect_attention(self, self.keys)
        return self.keys, self.values

    # ---------------------------------------------------------------------------------------- eviction
    def wants_attention(self) -> bool:
        """Whether this step needs the float32 attention weights (to accumulate, or to score and evict)."""
        cfg = self.config
        return cfg.needs_attention and (cfg.accumulates_attention or self.stored > cfg.budget)

    def after_attention(
        self, weights: torch.Tensor | None, values: torch.Tensor | None, outputs: torch.Tensor | None
    ) -> None:
        """Called by the attention function once the step's attention is computed: score and evict.

        ``weights`` ``(B, H_kv, G, Q, stored)`` (only the last ``config.query_rows`` queries when the policy
        reads no more), ``values`` ``(B, H_kv, stored, D)`` and ``outputs`` ``(B, H_kv, G, Q, D)`` (only when the
        weights cover every query) are float32, or ``None`` when :meth:`wants_attention` said no.
        """
        cfg = self.config
        if cfg.accumulates_attention and weights is not None:
            self._attention_sum[:, :, : self.stored] += attention_mass(weights)
        if not cfg.evicts or self.stored <= cfg.budget:
            return
        attention_sum = None if self._attention_sum is None else self._attention_sum[:, :, : self.stored]
        scores = score_entries(cfg, weights, values, outputs, self.positions, attention_sum)
        self.evict(scores)

    def protected(self) -> torch.Tensor:
        """``(B, H_kv, stored)`` mask of the entries no policy may evict: sinks and the recent window."""
        pos = self.positions
        return (pos < self.config.sink_tokens) | (pos >= self.seen - self.config.recent_window)

    def evict(self, scores: torch.Tensor) -> None:
        """Drop the ``stored - budget`` lowest-scored entries of each KV head (never a protected one)."""
        excess = self.stored - self.config.budget
        if self.config.sink_tokens or self.config.recent_window:
            scores = scores.masked_fill(self.protected(), float("inf"))
        dropped = scores.topk(excess, dim=-1, largest=False).indices
        first = int(dropped.min())  # slots before it are kept by every head and stay where they are
        kept = torch.ones_like(scores[..., first:], dtype=torch.bool).scatter_(-1, dropped - first, False)
        # nonzero() lists each row's kept slots in increasing order; every row keeps the same number
        tail = kept.nonzero()[:, -1].view(*scores.shape[:2], self.config.budget - first) + first
        self._move(first, tail)
        if self.capacity > self._steady_capacity(0):
            self._allocate(self._steady_capacity(0), self._keys, self._values)

    def _move(self, first: int, tail: torch.Tensor) -> None:
        """Keep slots ``0..first-1`` and move slots ``tail`` ``(B, H_kv, m)`` to ``first..first+m-1``.

        Only the entries after the first dropped one move, so evicting one entry during decoding does not
        copy the whole cache. Entries move as whole rows of the flattened buffers (``index_select`` +
        ``index_copy_``), keeping position order.
        """
        batch, heads, n_tail = tail.shape
        if n_tail:
            row_base = (torch.arange(batch * heads, device=tail.device) * self.capacity).view(batch, heads, 1)
            source = (row_base + tail).flatten()
            target = (row_base + torch.arange(first, first + n_tail, device=tail.device)).flatten()
            for buffer in (self._keys, self._values, self._positions, self._attention_sum):
                if buffer is not None:
                    rows = buffer.view(batch * heads * self.capacity, -1)
                    rows.index_copy_(0, target, rows.index_select(0, source))
        kept = first + n_tail
        self.evicted += self.stored - kept
        self.stored = kept
        self._publish()

    # ------------------------------------------------------------------------- transformers' layer API
    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.stored + query_length, self.seen - self.stored

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.seen = self.stored = self.peak_stored = self.evicted = self.capacity = 0
        self._keys = self._values = self._positions = self._attention_sum = None
        self.keys = self.values = None
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("beam search is not supported with an evicting cache")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("an evicting cache cannot be cropped (assisted decoding is not supported)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("expanding an evicting cache over the batch is not supported")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("selecting batch rows of an evicting cache is not supported")

    # ------------------------------------------------------------------------------------ accounting
    def entry_bytes(self) -> int:
        """Bytes of one stored entry across the batch and KV heads (key + value)."""
        if self._keys is None:
            return 0
        batch, heads, _, dim = self._keys.shape
        return batch * heads * (dim + self._values.shape[-1]) * self._keys.element_size()


class EvictingCache(Cache):
    """A transformers ``Cache`` that keeps at most ``budget`` entries per layer and KV head.

    >>> cache = EvictingCache(model, budget=512, method="h2o+fastcaote")
    >>> model.generate(input_ids, past_key_values=cache, prefill_chunk_size=128, max_new_tokens=32)

    Passing ``model`` checks its architecture and switches it to caote's attention function (required for
    eviction). Without ``prefill_chunk_size`` transformers prefills the whole prompt in one forward: the
    result is the same policy applied once, but the peak memory is then the whole prompt;
    :func:`caote.generate` always prefills block by block.
    """

    def __init__(
        self,
        model=None,
        budget: int | None = None,
        method: str = "caote",
        block_size: int = 128,
        *,
        config: EvictionConfig | None = None,
        **options,
    ):
        if config is None:
            config = EvictionConfig(budget=budget, method=method, block_size=block_size, **options)
        elif budget is not None or options:
            raise ValueError("pass either config= or budget/method/options, not both")
        self.config = config
        if model is not None:
            hf.attach(model)
            num_layers = hf.model_shape(model.config)[0]
            super().__init__(layers=[EvictingLayer(config) for _ in range(num_layers)])
        else:
            hf.register()
            super().__init__(layer_class_to_replicate=functools.partial(EvictingLayer, config))

    @property
    def seen_tokens(self) -> int:
        return self.layers[0].seen if self.layers else 0

    @property
    def stored_tokens(self) -> int:
        """Entries held per layer and KV head now."""
        return max((layer.stored for layer in self.layers), default=0)

    @property
    def peak_stored_tokens(self) -> int:
        """Most entries per layer and KV head ever held at once (new tokens of a step included)."""
        return max((layer.peak_stored for layer in self.layers), default=0)

    @property
    def evicted_tokens(self) -> int:
        """Entries evicted, summed over layers (per KV head)."""
        return sum(layer.evicted for layer in self.layers)

    def kv_bytes(self) -> int:
        """Bytes of the keys and values stored now, all layers."""
        return sum(layer.stored * layer.entry_bytes() for layer in self.layers)

    def peak_kv_bytes(self) -> int:
        """Peak bytes of stored keys and values, all layers (each layer's peak, summed)."""
        return sum(layer.peak_stored * layer.entry_bytes() for layer in self.layers)

    def allocated_kv_bytes(self) -> int:
        """Bytes of the key/value buffers as allocated (``budget + block_size`` entries per layer)."""
        return sum(layer.capacity * layer.entry_bytes() for layer in self.layers)

    def full_kv_bytes(self) -> int:
        """Bytes a full (never-evicting) cache would hold for the tokens seen so far."""
        return sum(layer.seen * layer.entry_bytes() for layer in self.layers)
