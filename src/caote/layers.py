"""The cache's layer kinds for one decoder layer each: the bounded, evicting :class:`EvictingLayer` and the
sliding-window :class:`WindowLayer` (the ring buffer, :class:`caote.ring.RingLayer`, and the per-head segments,
:class:`caote.head_adaptive.HeadAdaptiveLayer`, subclass :class:`EvictingLayer`); :class:`caote.cache.EvictingCache`
chooses one per layer.

Storage, absolute positions and eviction, one object per layer.

Each :class:`EvictingLayer` owns preallocated buffers of ``budget + block_size`` entries per KV head
(keys, values, the absolute position of every entry and, for H2O, its accumulated attention). A step
writes its new entries after the stored ones, attention runs over ``stored + new`` entries, and the layer
then keeps the ``budget`` best-scored entries of every KV head, compacting them in place at the front of
the buffers, in position order. So the stored KV never exceeds ``budget + block_size`` entries per layer and
KV head, during prefill as during decoding (method.md §1). With ``slack`` (:class:`~caote.policy.EvictionConfig`) a
layer evicts only once it holds more than ``budget + slack`` entries: the bound is ``budget + slack + block_size``.

Positions: ``get_seq_length()`` is the number of tokens *seen*, so the model gives new tokens their absolute
positions; ``get_mask_sizes()`` is ``(stored + new, seen - stored)``, so the causal mask lines up with the
compacted cache (every stored entry precedes every new token).

Hybrid models (Gemma 2/3, Qwen2 with sliding layers, ...): the budget applies to the global (full-attention) layers.
A sliding-window layer is a :class:`WindowLayer`, transformers' own ``DynamicSlidingWindowLayer`` (never evicting:
it holds its last ``window - 1`` tokens, ``window - 1 + step`` while a step attends), with the counters the cache
reports; :func:`caote.cache._make_layer` chooses each layer's kind from the model's layer types (:func:`caote.hf.layer_windows`).

Padded batches (docs/decisions.md 10): a padding token is stored like any other (every row keeps the same number of
slots per KV head) with the position :data:`PADDING`; every other entry's position is its row's own (the count of the
row's tokens before it, as transformers' ``generate`` numbers them). The cache learns which of a step's tokens are
padding from the 2-D attention mask its mask function receives (:meth:`caote.cache.EvictingCache.slot_padding`, shared with
the layers through :class:`StepPadding`) and builds the mask of its own slots from the stored positions, so padding
is never attended. Eviction drops padding first (the earliest first, the same slots in every KV head, so the slot
mask is one per row); each row then evicts among its own tokens, scored on a view of its tokens and its step's
queries alone (:meth:`EvictingLayer._choose_by_row`): a row evicts what it would evict alone with the same blocks.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from transformers.cache_utils import CacheLayerMixin, DynamicSlidingWindowLayer

from caote import hf
from caote.methods import ModelFacts, Reads, StepView
from caote.policy import EvictionConfig
from caote.scores import add_attention_mass, output_space_factors


def warn_if_unbounded_step(step: int, config: EvictionConfig) -> None:
    """Warn once per process when an evicting layer receives a step longer than ``budget + block_size``: it is held
    whole before eviction."""
    if not config.evicts or step <= config.budget + config.block_size:
        return
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
    function (:meth:`caote.cache.EvictingCache.slot_padding`, before any layer runs) and read by every global layer's
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
        self.question_start: int | None = None
        """Question-aware mode with ``protect_question``, while a block's eviction is decided: the first position of
        the prompt's question, protected instead of the recent window (:meth:`recent_start`); ``None`` otherwise."""
        self.question_read = False
        """Whether a question-aware prefill block was read (``protect_question`` refuses eviction without one)."""

    # ----------------------------------------------------------------------------------------- storage
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        self.is_initialized = True
        # what this step needs, not budget + block up front: a budget far above the prompt allocates nothing extra
        self._allocate(key_states.shape[-2], key_states, value_states)

    def _steady_capacity(self, step_len: int) -> int:
        return self.config.steady_entries(step_len) + (self.reserve if self.config.evicts else 0)

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
            warn_if_unbounded_step(step, self.config)
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
        return self.probe_len > 0 or (cfg.needs_step_inputs and (cfg.accumulates_attention or cfg.must_evict(self.stored)))

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
            add_attention_mass(self._attention_sum[:, :, : self.stored], weights)
        if not cfg.must_evict(self.stored):
            return
        if cfg.protect_question and not (self.defer or self.question_read):
            raise ValueError("protect_question protects the prompt's question in the question-aware mode, but this "
                             "cache evicts a prompt read without its question: use generate(..., question=..., "
                             "question_aware=True) or caote.generation.prefill(..., question_ids=...), or drop the "
                             "option")
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
            spans = self.kept_spans.to(pos.device)[:, None, :].expand(-1, pos.shape[1], -1)
            mask |= spans.gather(-1, pos.clamp_max(spans.shape[-1] - 1)) & (pos < spans.shape[-1])
        return mask

    def protected_positions(self, positions: torch.Tensor, seen: int) -> torch.Tensor:
        """Which of the tokens at ``positions`` (any shape) no policy may evict when ``seen`` tokens were seen: the
        first ``sink_tokens`` and the last ``recent_window`` (never padding)."""
        cfg = self.config
        return (positions != PADDING) & ((positions < cfg.sink_tokens) | (positions >= self.recent_start(seen)))

    def recent_start(self, seen: int) -> int:
        """The first position of the protected recent window when ``seen`` tokens were seen: ``seen -
        recent_window``, or, while a question-aware block with ``protect_question`` is evicted, the question's
        first position (before the block that holds it, no stored entry is that recent)."""
        return self.question_start if self.question_start is not None else seen - self.config.recent_window

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
        self.question_start, self.question_read = None, False
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
        :meth:`batch_repeat_interleave`, and :class:`caote.cache.EvictingCache`'s): a layer class with other per-row state
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
    :class:`caote.cache.EvictingCache` reports (``seen``, ``stored``, ``peak_stored``, ``capacity``, :meth:`entry_bytes`, as
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
        """Remember the window before a question probe (:meth:`caote.cache.EvictingCache.probe_question`) runs through it."""
        self._before_probe = (self.keys, self.values, self.cumulative_length)

    def drop_probe(self) -> None:
        """Forget the question probe's entries: the window is as before :meth:`begin_probe` (the probe's tokens pushed
        context entries out of it)."""
        if self._before_probe is not None:
            self.keys, self.values, self.cumulative_length = self._before_probe
            self._before_probe = None
