"""The evicting KV cache: transformers' ``Cache`` over one layer object per decoder layer (:mod:`caote.layers`: the
bounded :class:`~caote.layers.EvictingLayer`, its ring-buffer and per-head kinds, the sliding-window
:class:`~caote.layers.WindowLayer`), chosen by :func:`_make_layer`; the question-aware probes (:mod:`caote.question`)
and the memory counts of the whole cache.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from caote import hf, question
from caote.head_adaptive import HeadAdaptiveLayer
from caote.layers import EvictingLayer, StepPadding, WindowLayer, padding_inside
from caote.methods import ModelFacts
from caote.policy import EvictionConfig
from caote.question import QuestionAware
from caote.ring import RingLayer


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
        return HeadAdaptiveLayer(config, facts, padding)
    if ring and uses_ring(config):
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
        in every layer, drop the probe's entries and evict what the block scored. With ``protect_question`` the
        question's positions are the protected recent window of this eviction (:meth:`EvictingLayer.recent_start`)."""
        cfg = self.config
        question_start = final_position - question_ids.shape[1] + 1
        if cfg.protect_question and cfg.sink_tokens + question_ids.shape[1] > cfg.budget:
            raise ValueError(f"protect_question: the question's {question_ids.shape[1]} tokens and sink_tokens="
                             f"{cfg.sink_tokens} do not fit in budget={cfg.budget}; raise the budget, shorten the "
                             "question or protect fewer sinks")
        for layer in self.evicting_layers:
            layer.question_start = question_start if cfg.protect_question else None
            layer.question_read = True
        if any(layer.pending is not None for layer in self.evicting_layers):
            self._share_spans(settings, self._probe(model, question_ids, final_position))
        for layer in self.evicting_layers:
            layer.defer = False
            layer.evict_pending()
            layer.question_start = None

    def _probe(self, model, probe_ids: torch.Tensor, final_position: int) -> torch.Tensor:
        """Run ``probe_ids`` ``(B, M)`` at positions ``final_position − M + 1 .. final_position`` through the cache and
        drop its entries; returns every evicting layer's probe attention over the context, ``(L, B, seen)``
        (:func:`caote.question.dense_scores`)."""
        length = probe_ids.shape[1]
        for layer in self.evicting_layers:
            layer.reserve = max(layer.reserve, length)
            layer.probe_len = length
        for layer in self.window_layers:
            layer.begin_probe()
        positions = torch.arange(final_position - length + 1, final_position + 1, device=probe_ids.device)
        hf.forward(model, probe_ids, self, logits_to_keep=1, position_ids=positions.expand(probe_ids.shape[0], -1))
        for layer in self.layers:
            layer.drop_probe()
        seen = self.evicting_layers[0].seen
        # on the input's device: a model spread over devices (device_map) keeps each cache layer by its attention
        dense = torch.stack([question.dense_scores(layer.question_scores, layer.positions, seen).to(probe_ids.device)
                             for layer in self.evicting_layers])
        for layer in self.evicting_layers:
            layer.question_scores = None
        return dense

    def _share_spans(self, settings: QuestionAware, dense: torch.Tensor) -> None:
        """Keep the best-ranked spans of the probe's attention ``dense`` ``(L, B, seen)`` in every layer."""
        layers = self.evicting_layers
        seen = layers[0].seen
        ranking = question.rank_fusion(dense)
        # candidates: the block just read (held by every layer: its ranking is fair) and the current centres (their
        # spans are held by every layer too); an older position that some layers already evicted cannot come back
        candidate = torch.zeros_like(ranking, dtype=torch.bool)
        candidate[:, self._spans_seen:] = True
        if self._centers is not None:
            candidate[:, : self._centers.shape[-1]] |= self._centers
        ranking = ranking.masked_fill(~candidate, -1.0)
        cfg = self.config
        recent = max(seen - layers[0].recent_start(seen), 0)  # the protected recent window's positions
        quota = min(int(settings.quota * cfg.budget), cfg.budget - cfg.sink_tokens - recent)
        spans, centers = question.shared_spans(ranking, max(quota, 0), settings.span_before, settings.span_after,
                                               settings.sinks)
        self._centers, self._spans_seen = centers, seen
        for layer in layers:
            layer.kept_spans = spans

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
        """Bytes of the key/value buffers as allocated (``budget + slack + block_size`` entries per global layer; a
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
