"""StreamingLLM as a ring buffer (issue 13): the ``streaming`` method without scoring nor compaction.

``streaming`` keeps the first ``sink_tokens`` positions and the most recent ``budget − sink_tokens``. The generic
:class:`~caote.layers.EvictingLayer` scores every entry by its position and compacts its buffer after every step;
:class:`RingLayer` gets the same kept set by construction: the sinks live in slots ``0 .. sinks − 1`` and position
``p >= sinks`` in slot ``sinks + (p − sinks) mod R`` (``R = capacity − sinks``), so a step writes its new entries
over the oldest ones and a decode step copies one entry per KV head, never the buffer.

Attention: after wrap-around slot order is not position order, so the layer builds the step's mask from the stored
positions (:meth:`RingLayer.slot_mask`, used by :func:`caote.hf.caote_attention` instead of transformers' mask):
query ``q`` sees a stored key at ``k`` iff ``k`` is still kept (a sink, or ``k >= window_start``) and ``k <= q``.
Keys are post-RoPE, so their order does not matter to attention, only which are visible. The ring holds
``budget + slack + block_size`` slots (``slack``: :class:`~caote.policy.EvictionConfig`, 0 by default): a step's new
tokens overwrite only entries that were evicted before the step, so every query of the step sees the entries kept
before it and the step's own tokens up to itself (the generic layer's ``stored + new``); once more than
``budget + slack`` are kept the window advances and ``budget`` entries stay visible. A step
longer than the block grows the ring (re-laid out by position) and shrinks it back after the step.

Not supported by the ring (the cache uses the generic layer instead, when it learns of them before any entry is
stored, :meth:`caote.cache.EvictingCache.use_generic_layers`; refused once entries are stored): padded batches and
the question-aware mode. Beams and batch-row operations work (every row holds the same slots); ``crop`` is exact
before any eviction, as the generic layer's.
"""

from __future__ import annotations

import torch

from caote import hf
from caote.layers import PADDING, EvictingLayer, warn_if_unbounded_step

EMPTY = PADDING
"""The position of a slot that holds no entry."""


class RingLayer(EvictingLayer):
    """One layer's ``streaming`` cache as a ring of slots (see the module docstring).

    Buffers as :class:`~caote.layers.EvictingLayer`'s (``(B, H_kv, capacity, D)``, positions ``(B, H_kv,
    capacity)``, the same slots in every row and KV head); ``stored`` counts the entries kept (visible), not the
    slots in use.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sinks = self.config.sink_tokens
        """Positions ``0 .. sinks − 1`` are kept for good (fixed here: :meth:`EvictingCache.stop_evicting` swaps the
        config for one that keeps everything from then on)."""
        self.window_start = self.sinks
        """The first non-sink position kept: positions ``< sinks`` and ``window_start .. seen − 1`` are kept."""

    # ----------------------------------------------------------------------------------------- slots
    def _slots_of(self, positions: torch.Tensor, capacity: int) -> torch.Tensor:
        """The slot of every position (``>= 0``) in a ring of ``capacity`` slots."""
        ring = max(capacity - self.sinks, 1)
        return torch.where(positions < self.sinks, positions, self.sinks + (positions - self.sinks) % ring)

    def _kept(self, positions: torch.Tensor) -> torch.Tensor:
        """Which slots (by their ``positions``) hold an entry kept now: a sink or a position from ``window_start``
        on, before ``seen``."""
        return ((positions >= 0) & (positions < self.seen)
                & ((positions < self.sinks) | (positions >= self.window_start)))

    def _count_kept(self, seen: int) -> int:
        return min(seen, self.sinks) + max(seen - self.window_start, 0)

    def _allocate(self, capacity: int, key_like: torch.Tensor, value_like: torch.Tensor) -> None:
        """(Re)allocate a ring of ``capacity`` slots and lay the kept entries out in it by position (zeros and
        :data:`EMPTY` elsewhere: a masked slot must not hold NaN, which a zero weight would still spread)."""
        batch, heads = key_like.shape[:2]
        keys = key_like.new_zeros(batch, heads, capacity, key_like.shape[-1])
        values = value_like.new_zeros(batch, heads, capacity, value_like.shape[-1])
        positions = torch.full((batch, heads, capacity), EMPTY, dtype=torch.long, device=key_like.device)
        if self._positions is not None and self.stored:
            source = self._kept(self._positions[0, 0]).nonzero().flatten()
            target = self._slots_of(self._positions[0, 0, source], capacity)
            keys[:, :, target] = self._keys[:, :, source]
            values[:, :, target] = self._values[:, :, source]
            positions[:, :, target] = self._positions[:, :, source]
        self._keys, self._values, self._positions = keys, values, positions
        self.capacity = capacity
        self._publish()

    def _publish(self) -> None:
        """``keys``/``values``: the slots in use (``min(seen, capacity)`` from the front), in slot order."""
        filled = min(self.seen, self.capacity)
        self.keys = self._keys[:, :, :filled]
        self.values = self._values[:, :, :filled]

    @property
    def positions(self) -> torch.Tensor:
        """Absolute positions of the kept entries, ``(B, H_kv, stored)``, increasing (gathered from the ring)."""
        held = self._positions[0, 0]
        kept = self._kept(held).nonzero().flatten()
        order = kept[held[kept].argsort()]
        return self._positions[:, :, order]

    # ----------------------------------------------------------------------------------------- a step
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write a step's post-RoPE keys and values over the oldest slots; return the slots in use for attention
        (masked by :meth:`slot_mask`)."""
        batch, _, step = key_states.shape[:3]
        if self.defer or self.probe_len:
            raise ValueError("the question-aware mode is not supported by the streaming ring buffer once it holds "
                             "entries (its spans are kept outside sinks + recent); start the question-aware mode "
                             "before the first block, the cache then uses the generic layer")
        if self.step_padding.valid_for(self.seen, batch, step) is not None:
            raise ValueError("padding reached the streaming ring buffer after it stored entries (it keeps the same "
                             "slots in every row); a batch padded from its first step uses the generic layer, or "
                             "read the prompts one at a time")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        elif batch != self._keys.shape[0]:
            raise ValueError(f"batch size changed from {self._keys.shape[0]} to {batch} within one evicting cache")
        needed = self.stored + step
        if needed > self.capacity:
            if self.config.evicts:
                grown = max(needed, min(2 * self.capacity, self._steady_capacity(0)))
                warn_if_unbounded_step(step, self.config)
            else:
                grown = max(needed, 2 * self.capacity)
            self._allocate(grown, key_states, value_states)
        positions = torch.arange(self.seen, self.seen + step, device=self.device)
        slots = self._slots_of(positions, self.capacity)
        self._keys[:, :, slots] = key_states
        self._values[:, :, slots] = value_states
        self._positions[:, :, slots] = positions
        self.seen += step
        self.stored = needed
        self.peak_stored = max(self.peak_stored, needed)
        self._publish()
        hf.expect_attention(self, self.keys)
        return self.keys, self.values

    def slot_mask(self, query_length: int, dtype: torch.dtype) -> torch.Tensor:
        """The step's additive attention mask over the slots in use, ``(1, 1, Q, filled)``, from the positions:
        query ``seen − Q + i`` sees the kept entries (before the step's eviction) at positions up to its own."""
        held = self._positions[0, 0, : self.keys.shape[-2]]
        queries = torch.arange(self.seen - query_length, self.seen, device=held.device)
        visible = self._kept(held)[None, :] & (held[None, :] <= queries[:, None])
        mask = torch.zeros(visible.shape, dtype=dtype, device=held.device)
        return mask.masked_fill_(~visible, torch.finfo(dtype).min)[None, None]

    def after_attention(self, weights, values, outputs, **kwargs) -> None:
        """After the step's attention: keep the sinks and the most recent ``budget − sinks`` positions (the window
        advances; nothing moves), and shrink a ring grown for a long step back to ``budget + block_size``."""
        if not self.config.must_evict(self.stored):
            return
        self.window_start = max(self.window_start, self.seen - (self.config.budget - self.sinks))
        kept = self._count_kept(self.seen)
        self.evicted += self.stored - kept
        self.stored = kept
        if self.capacity > self._steady_capacity(0):
            self._allocate(self._steady_capacity(0), self._keys, self._values)

    # ------------------------------------------------------------------------- transformers' layer API
    def crop(self, tokens_to_remove: int) -> None:
        """As :meth:`EvictingLayer.crop` (exact before any eviction: no slot wrapped yet); the removed slots are
        marked empty."""
        super().crop(tokens_to_remove)
        if self.is_initialized:  # out of place: transformers may crop outside the inference mode the step ran in
            self._positions = self._positions.masked_fill(self._positions >= self.seen, EMPTY)
            self._publish()

    def reset(self) -> None:
        super().reset()
        self.window_start = self.sinks
