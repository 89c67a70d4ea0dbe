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
import warnings

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from caote import hf, question
from caote.methods import ModelFacts, Reads, StepView
from caote.policy import EvictionConfig
from caote.question import QuestionAware
from caote.scores import attention_mass, output_space_factors


def _warn_unbounded_step(step: int, config: EvictionConfig) -> None:
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
                _warn_unbounded_step(step, self.config)
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
        self._centers: torch.Tensor | None = None
        """``(B, seen)`` bool: the positions that chose the question-aware spans (their centres)."""
        self._spans_seen = 0
        """Tokens seen when the spans were last chosen: later positions are the block just read."""
        if model is not None:
            hf.attach(model)
            num_layers = hf.model_shape(model.config)[0]
            inv_freq = hf.rope_inv_freq(model)
            super().__init__(layers=[EvictingLayer(config, ModelFacts(inv_freq=inv_freq)) for _ in range(num_layers)])
        else:
            if config.spec.reads.queries:
                raise ValueError(f"method {config.method!r} needs the model's RoPE frequencies: pass the model, "
                                 "EvictingCache(model, ...)")
            hf.register()
            super().__init__(layer_class_to_replicate=functools.partial(EvictingLayer, config))

    def stop_evicting(self) -> None:
        """Keep every entry from now on (kvpress's perplexity protocol keeps the continuation's own entries); the
        buffers then grow with the tokens, as a full cache's do."""
        keep_all = EvictionConfig(budget=None, method="full", block_size=self.config.block_size)
        for layer in self.layers:
            layer.config = keep_all
            layer.kept_spans = None

    # ------------------------------------------------------------------------------- question-aware mode
    def start_block(self, question: bool) -> None:
        """Before a prefill block: with ``question``, the layers keep their scores and wait for the probe."""
        for layer in self.layers:
            layer.defer = question

    def probe_question(self, model, question_ids: torch.Tensor, final_position: int, settings: QuestionAware) -> None:
        """Question-aware step (:mod:`caote.question`), after a block read with ``start_block(True)``: run the
        question ``(B, M)`` at the positions it will have at the end of the prompt (``final_position − M + 1 ..
        final_position``) through the cache, fuse the layers' rankings of the probe's attention, keep the best spans
        in every layer, drop the probe's entries and evict what the block scored."""
        if any(layer.pending is not None for layer in self.layers):
            length = question_ids.shape[1]
            for layer in self.layers:
                layer.reserve = max(layer.reserve, length)
                layer.probe_len = length
            positions = torch.arange(final_position - length + 1, final_position + 1, device=question_ids.device)
            hf.forward(model, question_ids, self, logits_to_keep=1, position_ids=positions.expand(question_ids.shape[0], -1))
            for layer in self.layers:
                layer.drop_probe()
            self._share_spans(settings)
        for layer in self.layers:
            layer.defer = False
            layer.evict_pending()

    def _share_spans(self, settings: QuestionAware) -> None:
        seen = self.layers[0].seen
        dense = torch.stack([question.dense_scores(layer.question_scores, layer.positions, seen)
                             for layer in self.layers])
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
        for layer in self.layers:
            layer.kept_spans = spans
            layer.question_scores = None

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
