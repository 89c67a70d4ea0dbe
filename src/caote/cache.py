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

Padded batches (docs/decisions.md 10): a padding token is stored like any other (every row keeps the same number of
slots per KV head) with the position :data:`PADDING`; every other entry's position is its row's own (the count of the
row's tokens before it, as transformers' ``generate`` numbers them). The cache learns which of a step's tokens are
padding from the 2-D attention mask its mask function receives (:meth:`EvictingCache.slot_padding`, shared with
the layers through :class:`StepPadding`) and builds the mask of its own slots from the stored positions, so padding
is never attended. Eviction drops padding first (the earliest first, the same slots in every KV head, so the slot
mask is one per row); each row then evicts among its own tokens, scored on a view of its tokens and its step's
queries alone (:meth:`EvictingLayer._choose_by_row`): a row evicts what it would evict alone with the same blocks.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

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

PADDING = -1
"""The position of a stored padding entry (a real entry's position is its row's own, from 0)."""


def padding_inside(attention_mask: torch.Tensor) -> bool:
    """Whether any row of a 2-D attention mask ``(B, L)`` has padding (0) after its first token."""
    mask = attention_mask.bool()
    return bool((mask.long().cummax(-1).values.bool() & ~mask).any())


@dataclass
class StepPadding:
    """Which tokens of the forward step about to run are padding, per batch row: recorded by the cache's mask
    function (:meth:`EvictingCache.slot_padding`, before any layer runs) and read by every global layer's
    ``update``, which numbers the step's tokens and keeps the padding's queries out of the scores."""

    start: int = -1
    """Tokens seen before the step (its first token's index in the rows)."""
    valid: torch.Tensor | None = None
    """``(B, Q)`` bool, ``False`` = padding; ``None`` = no padding in the step."""

    def record(self, start: int, valid: torch.Tensor | None) -> None:
        self.start, self.valid = start, valid

    def valid_for(self, start: int, batch: int, step: int) -> torch.Tensor | None:
        """The step's validity ``(B, Q)`` if the recorded step is the one starting at ``start``, else ``None`` (no
        mask was built for it: no padding)."""
        if self.valid is None or self.start != start:
            return None
        if tuple(self.valid.shape) != (batch, step):
            raise RuntimeError(f"the attention mask covered {tuple(self.valid.shape)} (batch, step) tokens, the step "
                               f"writes {(batch, step)}")
        return self.valid


class EvictingLayer(CacheLayerMixin):
    """One layer's bounded KV cache (see the module docstring)."""

    is_compileable = False
    is_croppable = False
    is_sliding = False
    attends_itself = False
    """Whether caote's attention function hands the whole step to the layer's ``attend`` (storage that is not one
    ``(B, H_kv, N, D)`` tensor, e.g. :class:`caote.head_adaptive.HeadAdaptiveLayer`)."""

    def __init__(self, config: EvictionConfig, facts: ModelFacts | None = None, padding: StepPadding | None = None):
        super().__init__()
        self.config = config
        self.facts = facts if facts is not None else ModelFacts()
        """Model facts some scores need (RoPE frequencies, o_proj factors), see :class:`caote.methods.ModelFacts`."""
        self.step_padding = padding if padding is not None else StepPadding()
        """The padding of the step about to run, shared by the cache's layers (:class:`StepPadding`)."""
        self.seen = 0
        """Tokens seen so far, padding included: the index of the next token in the rows."""
        self.row_seen: torch.Tensor | None = None
        """``(B,)`` each row's own tokens seen (padding excluded), its next token's position; ``None`` while no
        padding was seen (every row: ``seen``)."""
        self._step_valid: torch.Tensor | None = None
        """``(B, Q)`` which of the current step's tokens are not padding (``None``: all)."""
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
        """Absolute position of every stored entry, ``(B, H_kv, stored)``, increasing along the last axis (padding,
        :data:`PADDING`, aside)."""
        return self._positions[:, :, : self.stored]

    def head_positions(self, row: int, head: int) -> torch.Tensor:
        """Absolute positions of the tokens KV head ``head`` of batch row ``row`` holds, increasing (padding left
        out)."""
        positions = self.positions[row, head]
        return positions if self.row_seen is None else positions[positions != PADDING]

    def slot_validity(self) -> torch.Tensor | None:
        """``(B, stored)`` which stored slots hold a token (``False`` = padding; the same slots in every KV head), or
        ``None`` while no padding was seen."""
        return None if self.row_seen is None else self._positions[:, 0, : self.stored] != PADDING

    def _step_positions(self, step: int) -> torch.Tensor:
        """The positions ``(B, step)`` of the step's tokens, each row's own (:data:`PADDING` for padding), and the
        rows' counts of their own tokens advanced past them."""
        batch = self._keys.shape[0]
        valid = self.step_padding.valid_for(self.seen, batch, step)
        valid = None if valid is None else valid.to(self.device)
        if valid is not None and self.config.spec.chunked and not bool(valid.all()):
            raise ValueError(f"method {self.config.method!r}: '+chunks' does not support padded batches (rows with "
                             "different padding would evict different numbers of entries); read the prompts one at a "
                             "time or use the method without '+chunks'")
        self._step_valid = valid
        offsets = torch.arange(step, device=self.device)
        if valid is None and self.row_seen is None:
            return (self.seen + offsets).expand(batch, -1)
        if self.row_seen is None:
            self.row_seen = torch.full((batch,), self.seen, dtype=torch.long, device=self.device)
        if valid is None:
            positions = self.row_seen[:, None] + offsets
            self.row_seen = self.row_seen + step
        else:
            positions = (self.row_seen[:, None] + valid.long().cumsum(-1) - 1).masked_fill(~valid, PADDING)
            self.row_seen = self.row_seen + valid.sum(-1)
        return positions

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
        self._positions[:, :, start:end] = self._step_positions(step)[:, None, :]
        if self._attention_sum is not None:
            self._attention_sum[:, :, start:end] = 0.0
        self.stored, self.seen = end, self.seen + step
        self.peak_stored = max(self.peak_stored, end)
        self._publish()
        hf.expect_attention(self, self.keys)
        return self.keys, self.values

    def slot_mask(self, query_length: int, dtype: torch.dtype) -> torch.Tensor | None:
        """The step's attention mask over the slots, when the layer builds it itself (its slot order is not position
        order, :class:`caote.ring.RingLayer`); ``None``: transformers' causal mask (from :meth:`get_mask_sizes`)
        lines up with the slots."""
        return None

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
        if self.row_seen is not None and (self.probe_len or self.defer):
            raise ValueError("the question-aware mode does not support padded batches (its probe and the spans it "
                             "keeps are positions shared by every row); read the prompts one at a time")
        if self.probe_len:  # question probe: its attention over the context entries times their value norms
            n_context = self.stored - self.probe_len
            self.question_scores = (weights[..., :n_context].amax(dim=3).mean(dim=2)
                                    * values[:, :, :n_context].norm(dim=-1))
            return
        if weights is not None and self._step_valid is not None:  # a padding token's query reads nothing
            weights = weights * self._step_valid[:, None, None, -weights.shape[3]:, None]
        if cfg.accumulates_attention and weights is not None:
            self._attention_sum[:, :, : self.stored] += attention_mass(weights)
        if not cfg.evicts or self.stored <= cfg.budget:
            return
        if cfg.spec.output_space:
            self._fill_output_factors(module, self._keys.shape[1])
        view = StepView(
            config=cfg, values=values, positions=self.positions, seen=self.seen, weights=weights, outputs=outputs,
            queries=queries, keys=keys, scaling=scaling, facts=self.facts,
            attention_sum=None if self._attention_sum is None else self._attention_sum[:, :, : self.stored],
        )
        if view.values is None:  # a score that reads no attention (streaming) still gets the shapes right
            view.values = self.values.to(torch.float32)
        if self.row_seen is not None:
            self.evict(self._choose_by_row(view))
            return
        scores = cfg.spec.score(view)
        if self.defer:
            self.pending = (view, scores)
            return
        self._evict_scored(view, scores)

    def _fill_output_factors(self, module: torch.nn.Module | None, kv_heads: int) -> None:
        """``+out``: the o_proj factors of this layer's ``kv_heads`` KV heads in :attr:`facts`, computed once from the
        attention ``module`` (:func:`caote.scores.output_space_factors`)."""
        if self.facts.per_head_factors is not None:
            return
        if module is None or not hasattr(module, "o_proj"):
            raise ValueError(f"method {self.config.method!r} needs the attention module's o_proj (+out)")
        self.facts.per_head_factors, self.facts.per_group_factors = output_space_factors(
            module.o_proj.weight, kv_heads, self._values.shape[-1])

    def _evict_scored(self, view: StepView, scores: torch.Tensor) -> None:
        cfg = self.config
        protected = self.protected() if (cfg.sink_tokens or cfg.recent_window or self.kept_spans is not None) else None
        self.evict(cfg.spec.choose_evicted(view, scores, protected, self.stored - cfg.budget))

    def _choose_by_row(self, view: StepView) -> torch.Tensor:
        """The slots ``(B, H_kv, n)`` to evict once padding was seen (``n = stored - budget`` for every row).

        Padding goes first, the earliest first (the same slots in every KV head). A row that must evict more chooses
        the rest among its own tokens with the method's scores computed on the view of its tokens and its step's
        queries alone (:meth:`_row_view`), at its own positions: what it would evict alone with the same blocks (the
        padding's weights are 0, and scores that normalise over the entries or pool neighbours never see it). Rows
        alike (the same slots of padding, queries of padding and tokens seen) are scored together.
        """
        cfg = self.config
        n_evict = self.stored - cfg.budget
        valid = self.slot_validity()
        real_queries = (self._step_valid.sum(-1) if self._step_valid is not None
                        else torch.full_like(self.row_seen, -1))  # -1: every query of the step
        alike = torch.cat([valid.long(), real_queries[:, None], self.row_seen[:, None]], dim=-1)
        kinds, kind_of_row = torch.unique(alike, dim=0, return_inverse=True)
        heads = self._keys.shape[1]
        chosen: list[tuple[torch.Tensor, torch.Tensor]] = []
        for kind in range(kinds.shape[0]):
            rows = (kind_of_row == kind).nonzero().flatten()
            row_valid = valid[rows[0]]
            padding, tokens = (~row_valid).nonzero().flatten(), row_valid.nonzero().flatten()
            n_tokens = n_evict - padding.numel()
            if n_tokens <= 0:
                chosen.append((rows, padding[:n_evict].expand(rows.numel(), heads, -1)))
                continue
            queries = int(real_queries[rows[0]])
            if queries == 0:
                raise RuntimeError("a row whose step is all padding would evict its own tokens")
            sub = self._row_view(view, rows, tokens, None if queries < 0 else queries, int(self.row_seen[rows[0]]))
            protected = (self.protected_positions(sub.positions, sub.seen)
                         if (cfg.sink_tokens or cfg.recent_window) else None)
            picked = cfg.spec.choose_evicted(sub, cfg.spec.score(sub), protected, n_tokens)
            chosen.append((rows, torch.cat([padding.expand(rows.numel(), heads, -1), tokens[picked]], dim=-1)))
        widths = sorted({dropped.shape[-1] for _, dropped in chosen})
        if len(widths) > 1:
            raise ValueError(f"method {cfg.method!r} would evict {widths} entries in rows with different padding "
                             "(every row must keep the same number of slots); read these prompts one at a time")
        dropped = torch.empty(valid.shape[0], heads, widths[0], dtype=torch.long, device=valid.device)
        for rows, row_dropped in chosen:
            dropped[rows] = row_dropped
        return dropped

    @staticmethod
    def _row_view(view: StepView, rows: torch.Tensor, tokens: torch.Tensor, queries: int | None,
                  seen: int) -> StepView:
        """``view`` for the batch rows ``rows`` alone, restricted to their tokens: the stored slots ``tokens`` and the
        step's last ``queries`` queries (``None`` = all; within a step a row's padding precedes its tokens), at the
        rows' own ``seen``."""
        def by_entry(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.index_select(0, rows).index_select(2, tokens)

        def by_query(tensor: torch.Tensor | None, entries: bool) -> torch.Tensor | None:
            if tensor is None:
                return None
            tensor = tensor.index_select(0, rows)
            if queries is not None:
                tensor = tensor[..., tensor.shape[3] - min(tensor.shape[3], queries):, :]
            return tensor.index_select(-1, tokens) if entries else tensor

        return StepView(
            config=view.config, values=by_entry(view.values), positions=by_entry(view.positions), seen=seen,
            weights=by_query(view.weights, True), outputs=by_query(view.outputs, False),
            queries=by_query(view.queries, False), keys=by_entry(view.keys), scaling=view.scaling,
            attention_sum=by_entry(view.attention_sum), facts=view.facts,
        )

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
        """``(B, H_kv, stored)`` mask of the entries no policy may evict: sinks, the recent window and the
        question-aware spans."""
        pos = self.positions
        mask = self.protected_positions(pos, self.seen)
        if self.kept_spans is not None:
            spans = self.kept_spans[:, None, :].expand(-1, pos.shape[1], -1)
            mask |= spans.gather(-1, pos.clamp_max(spans.shape[-1] - 1)) & (pos < spans.shape[-1])
        return mask

    def protected_positions(self, positions: torch.Tensor, seen: int) -> torch.Tensor:
        """Which of the tokens at ``positions`` (any shape) no policy may evict when ``seen`` tokens were seen: the
        first ``sink_tokens`` and the last ``recent_window`` (never padding)."""
        cfg = self.config
        return (positions != PADDING) & ((positions < cfg.sink_tokens) | (positions >= seen - cfg.recent_window))

    def evict(self, dropped: torch.Tensor) -> None:
        """Drop the entries at slots ``dropped`` ``(B, H_kv, n)`` of each KV head (``n >= stored - budget``; more with
        ``+chunks``), compacting."""
        first = int(dropped.min())  # slots before it are kept by every head and stay where they are
        kept = torch.ones(*dropped.shape[:2], self.stored - first, dtype=torch.bool, device=dropped.device)
        kept.scatter_(-1, dropped - first, False)
        # nonzero() lists each row's kept slots in increasing order; every row keeps the same number
        tail = kept.nonzero()[:, -1].view(*dropped.shape[:2], self.stored - dropped.shape[-1] - first) + first
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
        self.row_seen = self._step_valid = None
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
        the absolute positions (padding's included), the rows' own token counts, H2O's accumulated attention and the
        question-aware state (``kept_spans``, ``question_scores``, a deferred step's view and scores).

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
        self.row_seen, self._step_valid = rows(self.row_seen), rows(self._step_valid)
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
        if self.row_seen is not None:
            removed = self._positions[:, 0, self.stored - count : self.stored]
            self.row_seen = self.row_seen - (removed != PADDING).sum(-1)
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

    def row_evicted(self, row: int) -> int:
        """Entries of batch row ``row``'s own tokens evicted per KV head so far (padding not counted)."""
        if self.row_seen is None:
            return self.evicted
        return int(self.row_seen[row]) - int(self.slot_validity()[row].sum())


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


def uses_ring(config: EvictionConfig) -> bool:
    """Whether a global layer of ``config`` can be a ring buffer (:class:`caote.ring.RingLayer`): plain
    ``streaming`` (sinks + most recent), not with ``+chunks``."""
    return config.spec.base.name == "streaming" and not config.spec.chunked


def _make_layer(config: EvictionConfig, sliding_window: int | None = None, inv_freq: torch.Tensor | None = None,
                padding: StepPadding | None = None, ring: bool = True) -> EvictingLayer | WindowLayer:
    """The cache layer of one decoder layer, the one place that chooses layer kinds: a sliding-window layer
    (``sliding_window``, from :func:`caote.hf.layer_windows`) keeps its window (:class:`WindowLayer`, never
    evicting); a global layer stores its entries in one ``(B, H_kv, N, D)`` buffer (:class:`EvictingLayer`), in
    per-head segments for head-adaptive budgets, or, for ``streaming`` (:func:`uses_ring`) unless ``ring`` is
    ``False`` (padded batches, the question-aware mode: :meth:`EvictingCache.use_generic_layers`), in a ring of
    slots (:class:`caote.ring.RingLayer`). ``inv_freq``: the global layers' RoPE frequencies (``expected``);
    ``padding``: the cache's record of the step's padding, shared by its global layers."""
    if sliding_window is not None:
        return WindowLayer(sliding_window)
    facts = ModelFacts(inv_freq=inv_freq)
    if config.spec.adaptive:
        from caote.head_adaptive import HeadAdaptiveLayer  # it subclasses EvictingLayer, defined above

        return HeadAdaptiveLayer(config, facts, padding)
    if ring and uses_ring(config):
        from caote.ring import RingLayer  # it subclasses EvictingLayer, defined above

        return RingLayer(config, facts, padding)
    return EvictingLayer(config, facts, padding)


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
        self._step_padding = StepPadding()
        """Which tokens of the step about to run are padding (:meth:`slot_padding`), read by the layers."""
        self._centers: torch.Tensor | None = None
        """``(B, seen)`` bool: the positions that chose the question-aware spans (their centres)."""
        self._spans_seen = 0
        """Tokens seen when the spans were last chosen: later positions are the block just read."""
        self._ring = True
        """Whether new global layers of a ``streaming`` cache may be ring buffers (:meth:`use_generic_layers`)."""
        if model is not None:
            windows = hf.attach(model)
            inv_freq = hf.rope_inv_freq(model)
            if config.spec.reads.queries and inv_freq is None and None in windows:
                raise ValueError(f"method {config.method!r} needs the model's RoPE frequencies, which caote cannot "
                                 f"use for this model: {hf.rope_unavailable_reason(model)}; choose another method")
            super().__init__(layers=[_make_layer(config, window, inv_freq, self._step_padding) for window in windows])
        else:
            if config.spec.reads.queries:
                raise ValueError(f"method {config.method!r} needs the model's RoPE frequencies: pass the model, "
                                 "EvictingCache(model, ...)")
            hf.register()
            super().__init__(layer_class_to_replicate=self._new_layer)

    def _new_layer(self) -> EvictingLayer:
        """A global layer appended on first use (a cache built without the model)."""
        return _make_layer(self.config, padding=self._step_padding, ring=self._ring)

    def use_generic_layers(self, reason: str) -> None:
        """Replace the ring-buffer layers (``streaming``, :class:`caote.ring.RingLayer`) by generic layers
        (:class:`EvictingLayer`, which keep the same tokens) because of ``reason`` (padding, the question-aware mode),
        which the ring does not support; refused (``ValueError``) once a ring layer holds entries."""
        from caote.ring import RingLayer

        self._ring = False
        for index, layer in enumerate(self.layers):
            if not isinstance(layer, RingLayer):
                continue
            if layer.is_initialized:
                raise ValueError(f"method {self.config.method!r}: {reason} after the streaming ring buffer stored "
                                 "entries is not supported (it keeps the same slots in every row and no spans); "
                                 "start it before the first step, or read the prompts one at a time")
            self.layers[index] = _make_layer(self.config, None, layer.facts.inv_freq, self._step_padding, ring=False)

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

    # ------------------------------------------------------------------------------------ masks and padding
    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        """transformers' mask sizes for layer ``layer_idx``; transformers calls this right before the mask function,
        so the cache announces itself to caote's (:func:`caote.hf.expect_mask`), which asks
        :meth:`slot_padding` for the padding of the cache's slots."""
        hf.expect_mask(self, layer_idx)
        return super().get_mask_sizes(query_length, layer_idx)

    def slot_padding(self, layer_idx: int, attention_mask: torch.Tensor | None, q_length: int, kv_length: int,
                     kv_offset: int) -> torch.Tensor | None:
        """Which of the ``kv_length`` slots layer ``layer_idx`` attends over this step hold a token, ``(B, kv_length)``
        (``False`` = padding), given the model's 2-D ``attention_mask`` ``(B, seen + Q)`` (by token, 0 = padding) and
        transformers' mask sizes; ``None`` when no slot is padding. Called by caote's mask function
        (:func:`caote.hf.caote_mask`) before any layer runs.

        A sliding-window layer keeps its tokens in order: its slots are the tokens from ``kv_offset`` on. An evicting
        layer's slots hold other tokens after eviction: the stored entries' validity comes from their positions, then
        the step's tokens'; the step's padding is recorded for the layers' ``update`` (:class:`StepPadding`).

        Refused (``ValueError``, naming why): padding after a row's tokens within one step (right padding: the step's
        last queries, which TOVA and SnapKV read, would be padding); padding after a row's first token in a model with
        sliding-window layers (their window counts tokens, padding included); a mask that does not cover every token
        seen and the step's.
        """
        padded = attention_mask is not None and not bool(attention_mask.all())
        if padded:
            self._check_padding(attention_mask, q_length)
            if self._ring:
                self.use_generic_layers("a padded batch")
        layer = self.layers[layer_idx] if layer_idx < len(self.layers) else None
        if isinstance(layer, WindowLayer):
            return attention_mask[:, kv_offset:].bool() if padded else None
        seen = layer.seen if layer is not None else 0
        step = None
        if padded:
            if attention_mask.shape[-1] != seen + q_length:
                raise ValueError(f"the 2-D attention mask has {attention_mask.shape[-1]} columns; with padding it must "
                                 f"cover every token the cache has seen and the step's ({seen} + {q_length})")
            step = attention_mask[:, seen:].bool()
        self._step_padding.record(seen, step)
        stored = layer.slot_validity() if layer is not None else None
        if step is None and stored is None:
            return None
        like = step if step is not None else stored
        stored = (stored.to(like.device) if stored is not None
                  else torch.ones(like.shape[0], kv_length - q_length, dtype=torch.bool, device=like.device))
        step = step if step is not None else torch.ones(like.shape[0], q_length, dtype=torch.bool, device=like.device)
        return torch.cat([stored, step], dim=-1)

    def _check_padding(self, attention_mask: torch.Tensor, q_length: int) -> None:
        """Refuse padding the cache cannot make exact (see :meth:`slot_padding`)."""
        mask = attention_mask.bool()
        step = mask[:, -q_length:]
        if bool((step[:, :-1] & ~step[:, 1:]).any()):
            raise ValueError("padding after a row's tokens within one step (right padding) is not supported by the "
                             "evicting cache: the step's last queries, which TOVA and SnapKV score with, would be "
                             "padding. Pad on the left (tokenizer.padding_side = 'left')")
        if self.window_layers and padding_inside(mask):
            raise ValueError("padding after a row's first token is not supported with sliding-window layers: their "
                             "window counts tokens, padding included, so the row would see fewer of its own. Pad on "
                             "the left, or read the prompts one at a time")

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
        if question and self._ring:
            self.use_generic_layers("the question-aware mode")
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

    def row_evicted_tokens(self, row: int) -> int:
        """Entries of batch row ``row``'s own tokens evicted, summed over layers (per KV head; padding not counted):
        what :attr:`evicted_tokens` is for that prompt read alone."""
        return sum(layer.row_evicted(row) for layer in self.evicting_layers)

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
