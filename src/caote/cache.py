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

Hybrid models (Gemma 2/3, Qwen2 with sliding layers, ...): the budget applies to the global (full-attention) layers.
A sliding-window layer is a :class:`WindowLayer`, transformers' own ``DynamicSlidingWindowLayer`` (never evicting:
it holds its last ``window - 1`` tokens, ``window - 1 + step`` while a step attends), with the counters the cache
reports; :func:`_make_layer` chooses each layer's kind from the model's layer types (:func:`caote.hf.layer_windows`).
"""

from __future__ import annotations

import functools
import warnings

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicSlidingWindowLayer

from caote import hf, question
from caote.methods import ModelFacts, Reads, StepView
from caote.policy import EvictionConfig
from caote.question import QuestionAware
from caote.scores import attention_mass, output_space_factors


def warn_unbounded_step(step: int, config: EvictionConfig) -> None:
    """Warn once per process: a step longer than ``budget + block_size`` is held whole before eviction."""
    warnings.warn(
        f"caote: a forward step of {step} tokens reached an evicting cache (budget {config.budget}, block_size "
        f"{config.block_size}): the memory is not bounded during this step. Pass prefill_chunk_size="
        f"{config.block_size} to model.generate (or use caote.generate) to read the prompt block by block.",
        UnboundedStepWarning, stacklevel=4)


class UnboundedStepWarning(UserWarning):
    """A step longer than ``budget + block_size`` reached an evicting cache (shown once per call site)."""


PROBE_READS = Reads(attention=True)
"""A question probe reads every probe query's float32 attention (caote.question)."""


class EvictingLayer(CacheLayerMixin):
    """One layer's bounded KV cache (see the module docstring)."""

    is_compileable = False
    is_croppable = False
    is_sliding = False
    attends_itself = False
    """Whether caote's attention function hands the whole step to the layer's ``attend`` (storage that is not one
    ``(B, H_kv, N, D)`` tensor, e.g. :class:`caote.head_adaptive.HeadAdaptiveLayer`)."""

    def __init__(self, config: EvictionConfig, facts: ModelFacts | None = None):
        super().__init__()
        self.config = config
        self.facts = facts if facts is not None else ModelFacts()
        """Model facts some scores need (RoPE frequencies, o_proj factors), see :class:`caote.methods.ModelFacts`."""
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
        # question-aware mode (caote.question): eviction deferred to the end of the probe, probe rows, kept spans
        self.defer = False
        self.reserve = 0
        """Extra slots for a question probe after a full block (question-aware mode)."""
        self.probe_len = 0
        self.question_scores: torch.Tensor | None = None
        self.pending: tuple[StepView, torch.Tensor] | None = None
        self.kept_spans: torch.Tensor | None = None
        """``(B, seen)`` bool: positions every layer keeps (question-aware shared spans); ``None`` = none."""

    # ----------------------------------------------------------------------------------------- storage
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        self.is_initialized = True
        # what this step needs, not budget + block up front: a budget far above the prompt allocates nothing extra
        self._allocate(key_states.shape[-2], key_states, value_states)

    def _steady_capacity(self, step_len: int) -> int:
        if self.config.evicts:
            return self.config.budget + max(self.config.block_size, step_len) + self.reserve
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

    def head_positions(self, row: int, head: int) -> torch.Tensor:
        """Absolute positions of the entries KV head ``head`` of batch row ``row`` holds, increasing."""
        return self.positions[row, head]

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
            # grow geometrically up to the steady capacity (budget + block): buffers follow what the prompt needs;
            # a step longer than block_size (a whole prompt in one forward) grows past it and shrinks back after
            # eviction. A never-evicting layer grows geometrically without bound.
            doubled = 2 * self.capacity
            if self.config.evicts:
                doubled = min(doubled, self._steady_capacity(0))
            grown = max(self.stored + step, doubled)
            if self.config.evicts and step > self.config.budget + self.config.block_size:
                warn_unbounded_step(step, self.config)
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
        """Whether this step needs the attention step's inputs to score (float32 weights, or queries and keys):
        to accumulate, or to score and evict; a question probe always needs its weights."""
        cfg = self.config
        return self.probe_len > 0 or (cfg.needs_step_inputs and (cfg.accumulates_attention or self.stored > cfg.budget))

    def step_reads(self) -> Reads:
        """What the attention function must hand over this step: the method's reads, or every probe row."""
        return PROBE_READS if self.probe_len else self.config.spec.reads

    def after_attention(
        self,
        weights: torch.Tensor | None,
        values: torch.Tensor | None,
        outputs: torch.Tensor | None,
        *,
        queries: torch.Tensor | None = None,
        keys: torch.Tensor | None = None,
        scaling: float | None = None,
        module: torch.nn.Module | None = None,
    ) -> None:
        """Called by the attention function once the step's attention is computed: score and evict.

        ``weights`` ``(B, H_kv, G, R, stored)`` (the last ``config.query_rows`` queries), ``values``
        ``(B, H_kv, stored, D)``, ``outputs`` ``(B, H_kv, G, R, D)`` of the same rows, and, for scores that read
        them, the step's post-RoPE ``queries`` ``(B, H_kv, G, Q, D)`` and the stored ``keys``; all float32, ``None``
        when the method reads no such thing or :meth:`wants_attention` said no. ``module`` is the attention module
        (its ``o_proj`` gives ``+out`` its factors, computed once).
        """
        cfg = self.config
        if self.probe_len:  # question probe: its attention over the context entries times their value norms
            n_context = self.stored - self.probe_len
            self.question_scores = (weights[..., :n_context].amax(dim=3).mean(dim=2)
                                    * values[:, :, :n_context].norm(dim=-1))
            return
        if cfg.accumulates_attention and weights is not None:
            self._attention_sum[:, :, : self.stored] += attention_mass(weights)
        if not cfg.evicts or self.stored <= cfg.budget:
            return
        if cfg.spec.output_space and self.facts.per_head_factors is None:
            if module is None or not hasattr(module, "o_proj"):
                raise ValueError(f"method {cfg.method!r} needs the attention module's o_proj (+out)")
            self.facts.per_head_factors, self.facts.per_group_factors = output_space_factors(
                module.o_proj.weight, self._keys.shape[1], self._values.shape[-1])
        view = StepView(
            config=cfg, values=values, positions=self.positions, seen=self.seen, weights=weights, outputs=outputs,
            queries=queries, keys=keys, scaling=scaling, facts=self.facts,
            attention_sum=None if self._attention_sum is None else self._attention_sum[:, :, : self.stored],
        )
        if view.values is None:  # a score that reads no attention (streaming) still gets the shapes right
            view.values = self.values.to(torch.float32)
        scores = cfg.spec.score(view)
        if self.defer:
            self.pending = (view, scores)
            return
        self._evict_scored(view, scores)

    def _evict_scored(self, view: StepView, scores: torch.Tensor) -> None:
        cfg = self.config
        protected = self.protected() if (cfg.sink_tokens or cfg.recent_window or self.kept_spans is not None) else None
        self.evict(cfg.spec.choose_evicted(view, scores, protected, self.stored - cfg.budget))

    # ------------------------------------------------------------------------------- question-aware mode
    def drop_probe(self) -> None:
        """Forget the question probe's entries (the last ``probe_len`` slots): the context is as before the probe."""
        self.stored -= self.probe_len
        self.seen -= self.probe_len
        self.probe_len = 0
        self._publish()

    def evict_pending(self) -> None:
        """Evict what the deferred step scored, now that the shared spans (``kept_spans``) are known."""
        if self.pending is not None:
            view, scores = self.pending
            self.pending = None
            self._evict_scored(view, scores)

    def protected(self) -> torch.Tensor:
        """``(B, H_kv, stored)`` mask of the entries no policy may evict: sinks and the recent window."""
        pos = self.positions
        mask = (pos < self.config.sink_tokens) | (pos >= self.seen - self.config.recent_window)
        if self.kept_spans is not None:
            spans = self.kept_spans[:, None, :].expand(-1, pos.shape[1], -1)
            mask |= spans.gather(-1, pos.clamp_max(spans.shape[-1] - 1)) & (pos < spans.shape[-1])
        return mask

    def evict(self, dropped: torch.Tensor) -> None:
        """Drop the entries at slots ``dropped`` ``(B, H_kv, stored - budget)`` of each KV head, compacting."""
        first = int(dropped.min())  # slots before it are kept by every head and stay where they are
        kept = torch.ones(*dropped.shape[:2], self.stored - first, dtype=torch.bool, device=dropped.device)
        kept.scatter_(-1, dropped - first, False)
        # nonzero() lists each row's kept slots in increasing order; every row keeps the same number
        tail = kept.nonzero()[:, -1].view(*dropped.shape[:2], self.config.budget - first) + first
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
        self.seen = self.stored = self.peak_stored = self.evicted = self.capacity = self.probe_len = 0
        self.defer, self.question_scores, self.pending, self.kept_spans = False, None, None, None
        self._keys = self._values = self._positions = self._attention_sum = None
        self.keys = self.values = None
        self.is_initialized = False

    # ------------------------------------------------------------- batch rows (beam search, num_return_sequences)
    # Every per-row operation is one row index: batch row ``i`` becomes the old row ``index[i]`` (rows may be
    # reordered, repeated or dropped), applied by :meth:`_index_rows`. Stored counts are shared by all rows (every
    # row of an unpadded batch holds the same number of entries per KV head: eviction drops the same number from
    # every row and KV head), so a row operation changes no count and keeps that invariant. transformers 5.24's
    # generate expands the inputs (num_beams, num_return_sequences) before the prefill and calls reorder_cache after
    # every beam-search step; batch_repeat_interleave / batch_select_indices are for callers (e.g. read a prompt
    # once, then sample several continuations of it).
    _VIEW_ROW_FIELDS = ("values", "positions", "weights", "outputs", "queries", "keys", "attention_sum")
    """The :class:`~caote.methods.StepView` fields with a batch axis (a deferred question-aware step's view)."""

    @property
    def batch_size(self) -> int:
        """Batch rows held (0 before the first step)."""
        return self._keys.shape[0] if self._keys is not None else 0

    @staticmethod
    def repeated_rows(batch: int, repeats: int) -> torch.LongTensor:
        """The row index of ``batch_repeat_interleave(repeats)``: ``0, 0, …, 1, 1, …`` (each row ``repeats``
        times)."""
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise ValueError(f"repeats must be a positive integer, got {repeats!r}")
        return torch.arange(batch).repeat_interleave(repeats)

    @staticmethod
    def selected_rows(batch: int, indices) -> torch.LongTensor:
        """The row index of ``batch_select_indices(indices)``: ``indices`` as transformers' layers apply it
        (``keys[indices, ...]``: integer indices, a boolean mask or a slice), as a 1-D index."""
        device = indices.device if isinstance(indices, torch.Tensor) else None
        return torch.arange(batch, device=device)[indices].reshape(-1)

    def _index_rows(self, index: torch.LongTensor) -> None:
        """Make batch row ``i`` the old row ``index[i]`` for every per-row state of the layer: the key/value buffers,
        the absolute positions, H2O's accumulated attention and the question-aware state (``kept_spans``,
        ``question_scores``, a deferred step's view and scores).

        The one method a batch-row operation goes through (:meth:`reorder_cache`, :meth:`batch_select_indices`,
        :meth:`batch_repeat_interleave`, and :class:`EvictingCache`'s): a layer class with other per-row state
        overrides it, calls it, and reindexes its own. Counts (``stored``, ``seen``, ``capacity``, ``evicted``,
        ``peak_stored``) are per KV head and shared by all rows, so they do not change.
        """
        if not self.is_initialized:
            return
        index = index.to(self.device)

        def rows(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.index_select(0, index)

        self._keys, self._values = rows(self._keys), rows(self._values)
        self._positions, self._attention_sum = rows(self._positions), rows(self._attention_sum)
        self.kept_spans, self.question_scores = rows(self.kept_spans), rows(self.question_scores)
        if self.pending is not None:
            view, scores = self.pending
            for name in self._VIEW_ROW_FIELDS:
                setattr(view, name, rows(getattr(view, name)))
            self.pending = (view, rows(scores))
        self._publish()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: batch row ``i`` becomes the old row ``beam_idx[i]`` (every per-row state follows)."""
        self._index_rows(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every batch row ``repeats`` times, each copy next to its row."""
        self._index_rows(self.repeated_rows(self.batch_size, repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the batch rows ``indices`` (integer indices or a boolean mask), in that order."""
        self._index_rows(self.selected_rows(self.batch_size, indices))

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last ``-tokens_to_remove`` tokens (transformers 5.x passes a negative count; 0 does nothing).

        Exact only while the layer holds everything it has seen, unchanged: before any eviction, for a method that
        accumulates nothing, outside a question-aware step. After an eviction it is refused (``ValueError``, saying
        why): which entries were evicted depended on the tokens to remove, and evicted entries cannot be restored.
        So the cache stays ``is_croppable = False`` and transformers refuses assisted decoding with it.
        """
        if tokens_to_remove > 0:
            raise ValueError(f"crop({tokens_to_remove}): pass a negative number, the count of tokens to remove "
                             "(transformers 5.x); a positive value (a length to keep) is not supported")
        count = -tokens_to_remove
        if count == 0 or not self.is_initialized:
            return
        reason = self._crop_refusal()
        if reason is not None:
            raise ValueError(f"an evicting cache cannot be cropped {reason}")
        if count > self.seen:
            raise ValueError(f"crop({tokens_to_remove}): the cache holds only {self.seen} tokens")
        self.seen -= count
        self.stored -= count
        self._publish()

    def _crop_refusal(self) -> str | None:
        """Why :meth:`crop` cannot be exact now (the end of an error message), or ``None``."""
        if self.evicted:
            return (f"after eviction ({self.evicted} entries per KV head evicted so far): the tokens to remove took "
                    "part in choosing what was evicted, and evicted entries cannot be restored; crop is exact only "
                    "before any eviction (a budget above every token seen)")
        if self._attention_sum is not None:
            return (f"with method {self.config.method!r}: it accumulates attention, and the attention of the tokens "
                    "to remove is already added to the kept entries' scores")
        if self.probe_len or self.pending is not None:
            return "during a question-aware step (the question probe's entries and a deferred eviction are pending)"
        if self.attends_itself:
            return f"with {type(self).__name__}: its per-head storage has no crop"
        return None

    # ------------------------------------------------------------------------------------ accounting
    def entry_bytes(self) -> int:
        """Bytes of one stored entry across the batch and KV heads (key + value)."""
        if self._keys is None:
            return 0
        batch, heads, _, dim = self._keys.shape
        return batch * heads * (dim + self._values.shape[-1]) * self._keys.element_size()


class WindowLayer(DynamicSlidingWindowLayer):
    """A sliding-window layer of a hybrid model: transformers' own ``DynamicSlidingWindowLayer`` (it keeps the last
    ``sliding_window - 1`` tokens and never evicts; the budget applies to the global layers), plus the counters
    :class:`EvictingCache` reports (``seen``, ``stored``, ``peak_stored``, ``capacity``, :meth:`entry_bytes`, as
    :class:`EvictingLayer` has them), the question probe's undo and the batch-row index."""

    evicted = 0
    """Entries evicted per KV head: none (the window drops what the model's own cache drops)."""

    def __init__(self, sliding_window: int):
        super().__init__(sliding_window=sliding_window)
        self.peak_stored = 0
        """Most entries per KV head ever held at attention time (``window - 1 + step`` once the window is full)."""
        self._before_probe: tuple[torch.Tensor | None, torch.Tensor | None, int] | None = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """transformers' sliding-window update; records the entries the step attends over."""
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        self.peak_stored = max(self.peak_stored, keys.shape[-2])
        return keys, values

    @property
    def seen(self) -> int:
        """Tokens seen so far."""
        return self.cumulative_length

    @property
    def stored(self) -> int:
        """Entries held per KV head (at most ``sliding_window - 1`` between steps)."""
        return 0 if self.keys is None or self.keys.numel() == 0 else self.keys.shape[-2]

    @property
    def capacity(self) -> int:
        """Entries per KV head the key buffer really occupies: transformers keeps the window as a view of the last
        step's concatenation, which stays allocated (``window - 1 + step``) until the next step."""
        if self.stored == 0:
            return 0
        batch, heads, _, dim = self.keys.shape
        return self.keys.untyped_storage().nbytes() // (batch * heads * dim * self.keys.element_size())

    @property
    def batch_size(self) -> int:
        """Batch rows held (0 before the first step)."""
        return self.keys.shape[0] if self.stored else 0

    def entry_bytes(self) -> int:
        """Bytes of one stored entry across the batch and KV heads (key + value)."""
        if self.stored == 0:
            return 0
        batch, heads, _, dim = self.keys.shape
        return batch * heads * (dim + self.values.shape[-1]) * self.keys.element_size()

    def reset(self) -> None:
        super().reset()
        self.peak_stored, self._before_probe = 0, None

    def _index_rows(self, index: torch.LongTensor) -> None:
        """Batch row ``i`` becomes the old row ``index[i]`` (as :meth:`EvictingLayer._index_rows`)."""
        if self.stored:
            index = index.to(self.device)
            self.keys, self.values = self.keys.index_select(0, index), self.values.index_select(0, index)

    def begin_probe(self) -> None:
        """Remember the window before a question probe (:meth:`EvictingCache.probe_question`) runs through it."""
        self._before_probe = (self.keys, self.values, self.cumulative_length)

    def drop_probe(self) -> None:
        """Forget the question probe's entries: the window is as before :meth:`begin_probe` (the probe's tokens pushed
        context entries out of it)."""
        if self._before_probe is not None:
            self.keys, self.values, self.cumulative_length = self._before_probe
            self._before_probe = None


def _make_layer(config: EvictionConfig, sliding_window: int | None = None,
                inv_freq: torch.Tensor | None = None) -> EvictingLayer | WindowLayer:
    """The cache layer of one decoder layer, the one place that chooses layer kinds: a sliding-window layer
    (``sliding_window``, from :func:`caote.hf.layer_windows`) keeps its window (:class:`WindowLayer`, never
    evicting); a global layer stores its entries in one ``(B, H_kv, N, D)`` buffer (:class:`EvictingLayer`), or in
    per-head segments for head-adaptive budgets. ``inv_freq``: the global layers' RoPE frequencies (``expected``)."""
    if sliding_window is not None:
        return WindowLayer(sliding_window)
    facts = ModelFacts(inv_freq=inv_freq)
    if config.spec.adaptive:
        from caote.head_adaptive import HeadAdaptiveLayer  # it subclasses EvictingLayer, defined above

        return HeadAdaptiveLayer(config, facts)
    return EvictingLayer(config, facts)


class EvictingCache(Cache):
    """A transformers ``Cache`` that keeps at most ``budget`` entries per global layer and KV head.

    >>> cache = EvictingCache(model, budget=512, method="h2o+fastcaote")
    >>> model.generate(input_ids, cache=cache, prefill_chunk_size=128, max_new_tokens=32)  # transformers 5.24: cache=

    Passing ``model`` checks its architecture (:func:`caote.hf.layer_windows`) and switches it to caote's attention
    function (required for eviction). The budget applies to the global (full-attention) layers; the sliding-window
    layers of a hybrid model (Gemma 2/3, ...) keep their window in transformers' own sliding-window layer
    (:class:`WindowLayer`), and the memory counted below includes them. Without the model every layer is a global
    one (for models without sliding layers). Without ``prefill_chunk_size`` transformers prefills the whole prompt
    in one forward: the result is the same policy applied once, but the peak memory is then the whole prompt;
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
        self._centers: torch.Tensor | None = None
        """``(B, seen)`` bool: the positions that chose the question-aware spans (their centres)."""
        self._spans_seen = 0
        """Tokens seen when the spans were last chosen: later positions are the block just read."""
        if model is not None:
            windows = hf.attach(model)
            inv_freq = hf.rope_inv_freq(model)
            if config.spec.reads.queries and inv_freq is None and None in windows:
                raise ValueError(f"method {config.method!r} needs the model's RoPE frequencies, which caote cannot "
                                 f"use for this model: {hf.rope_unavailable_reason(model)}; choose another method")
            super().__init__(layers=[_make_layer(config, window, inv_freq) for window in windows])
        else:
            if config.spec.reads.queries:
                raise ValueError(f"method {config.method!r} needs the model's RoPE frequencies: pass the model, "
                                 "EvictingCache(model, ...)")
            hf.register()
            super().__init__(layer_class_to_replicate=functools.partial(_make_layer, config))

    @property
    def evicting_layers(self) -> list[EvictingLayer]:
        """The global layers, the ones the budget applies to."""
        return [layer for layer in self.layers if isinstance(layer, EvictingLayer)]

    @property
    def window_layers(self) -> list[WindowLayer]:
        """The sliding-window layers (hybrid models), each keeping its window."""
        return [layer for layer in self.layers if isinstance(layer, WindowLayer)]

    def stop_evicting(self) -> None:
        """Keep every entry from now on (kvpress's perplexity protocol keeps the continuation's own entries); the
        buffers then grow with the tokens, as a full cache's do."""
        keep_all = EvictionConfig(budget=None, method="full", block_size=self.config.block_size)
        for layer in self.evicting_layers:
            layer.config = keep_all
            layer.kept_spans = None

    # ------------------------------------------------------------- batch rows (beam search, num_return_sequences)
    # transformers' Cache dispatches these to every layer; the cache's own per-row state (the question-aware
    # centres) must follow too, so the cache applies one row index to its layers and to itself.
    @property
    def batch_size(self) -> int:
        """Batch rows held (0 before the first step)."""
        return max((layer.batch_size for layer in self.layers), default=0)

    def _index_rows(self, index: torch.LongTensor) -> None:
        """Batch row ``i`` becomes the old row ``index[i]`` in every layer (:meth:`EvictingLayer._index_rows`) and in
        the question-aware centres ``(B, seen)``."""
        for layer in self.layers:
            layer._index_rows(index)
        if self._centers is not None:
            self._centers = self._centers.index_select(0, index.to(self._centers.device))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: batch row ``i`` becomes the old row ``beam_idx[i]``."""
        self._index_rows(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every batch row ``repeats`` times, each copy next to its row: e.g. read a prompt once, then
        ``cache.batch_repeat_interleave(n)`` before sampling ``n`` continuations of it."""
        self._index_rows(EvictingLayer.repeated_rows(self.batch_size, repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the batch rows ``indices`` (integer indices or a boolean mask), in that order."""
        self._index_rows(EvictingLayer.selected_rows(self.batch_size, indices))

    # ------------------------------------------------------------------------------- question-aware mode
    def start_block(self, question: bool) -> None:
        """Before a prefill block: with ``question``, the layers keep their scores and wait for the probe."""
        if question and self.config.spec.adaptive:
            raise ValueError(f"method {self.config.method!r}: the question-aware mode with '+adaptive' is not "
                             "implemented (its spans are shared positions in every head)")
        for layer in self.evicting_layers:
            layer.defer = question

    def probe_question(self, model, question_ids: torch.Tensor, final_position: int, settings: QuestionAware) -> None:
        """Question-aware step (:mod:`caote.question`), after a block read with ``start_block(True)``: run the
        question ``(B, M)`` at the positions it will have at the end of the prompt (``final_position − M + 1 ..
        final_position``) through the cache, fuse the layers' rankings of the probe's attention, keep the best spans
        in every layer, drop the probe's entries and evict what the block scored."""
        if any(layer.pending is not None for layer in self.evicting_layers):
            length = question_ids.shape[1]
            for layer in self.evicting_layers:
                layer.reserve = max(layer.reserve, length)
                layer.probe_len = length
            for layer in self.window_layers:
                layer.begin_probe()
            positions = torch.arange(final_position - length + 1, final_position + 1, device=question_ids.device)
            hf.forward(model, question_ids, self, logits_to_keep=1, position_ids=positions.expand(question_ids.shape[0], -1))
            for layer in self.layers:
                layer.drop_probe()
            self._share_spans(settings)
        for layer in self.evicting_layers:
            layer.defer = False
            layer.evict_pending()

    def _share_spans(self, settings: QuestionAware) -> None:
        layers = self.evicting_layers
        seen = layers[0].seen
        dense = torch.stack([question.dense_scores(layer.question_scores, layer.positions, seen)
                             for layer in layers])
        ranking = question.rank_fusion(dense)
        # candidates: the block just read (held by every layer: its ranking is fair) and the current centres (their
        # spans are held by every layer too); an older position that some layers already evicted cannot come back
        candidate = torch.zeros_like(ranking, dtype=torch.bool)
        candidate[:, self._spans_seen:] = True
        if self._centers is not None:
            candidate[:, : self._centers.shape[-1]] |= self._centers
        ranking = ranking.masked_fill(~candidate, -1.0)
        cfg = self.config
        quota = min(int(settings.quota * cfg.budget), cfg.budget - cfg.sink_tokens - cfg.recent_window)
        spans, centers = question.shared_spans(ranking, max(quota, 0), settings.span_before, settings.span_after,
                                               settings.sinks)
        self._centers, self._spans_seen = centers, seen
        for layer in layers:
            layer.kept_spans = spans
            layer.question_scores = None

    @property
    def seen_tokens(self) -> int:
        return self.layers[0].seen if self.layers else 0

    @property
    def stored_tokens(self) -> int:
        """Entries held per layer and KV head now, the most of any layer (a sliding-window layer holds up to its
        window: ``max(layer.stored for layer in cache.evicting_layers)`` is the global layers' count)."""
        return max((layer.stored for layer in self.layers), default=0)

    @property
    def peak_stored_tokens(self) -> int:
        """Most entries per layer and KV head ever held at once (new tokens of a step included), any layer."""
        return max((layer.peak_stored for layer in self.layers), default=0)

    @property
    def evicted_tokens(self) -> int:
        """Entries evicted, summed over layers (per KV head); sliding-window layers evict none."""
        return sum(layer.evicted for layer in self.layers)

    def kv_bytes(self) -> int:
        """Bytes of the keys and values stored now, all layers (sliding-window layers included)."""
        return sum(layer.stored * layer.entry_bytes() for layer in self.layers)

    def window_kv_bytes(self) -> int:
        """Bytes of the keys and values the sliding-window layers store now (part of :meth:`kv_bytes`)."""
        return sum(layer.stored * layer.entry_bytes() for layer in self.window_layers)

    def peak_kv_bytes(self) -> int:
        """Peak bytes of stored keys and values, all layers (each layer's peak, summed)."""
        return sum(layer.peak_stored * layer.entry_bytes() for layer in self.layers)

    def allocated_kv_bytes(self) -> int:
        """Bytes of the key/value buffers as allocated (``budget + block_size`` entries per global layer; a
        sliding-window layer's window and the last step, see :attr:`WindowLayer.capacity`)."""
        return sum(layer.capacity * layer.entry_bytes() for layer in self.layers)

    def full_kv_bytes(self) -> int:
        """Bytes the model's own cache (transformers' ``DynamicCache(config=...)``) would hold for the tokens seen so
        far: every token in the global layers, the window in the sliding-window layers."""
        return sum((layer.stored if layer.is_sliding else layer.seen) * layer.entry_bytes() for layer in self.layers)

    def full_peak_kv_bytes(self) -> int:
        """Peak bytes the model's own cache would hold for the same steps: every token seen in the global layers, and
        each sliding-window layer's own peak (its window plus the step attending, whatever the global layers evict).
        Equal to :meth:`full_kv_bytes` for a model without sliding-window layers."""
        return sum((layer.peak_stored if layer.is_sliding else layer.seen) * layer.entry_bytes()
                   for layer in self.layers)
