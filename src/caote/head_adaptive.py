"""Head-adaptive budgets with real storage: the ``+adaptive`` modifier (issue 10; AdaKV, Feng et al. 2024,
arXiv 2407.11550, and kvpress's ``AdaKVPress``).

A uniform cache keeps ``budget`` entries in *every* KV head. Heads differ: some spread their attention over the
whole context, others look at a handful of tokens. ``+adaptive`` gives each layer ``budget × H_kv`` entries shared by
its KV heads: after each step every head scores its entries with the method's own score (computed per head, exactly
as the uniform cache does), each head keeps its protected entries and its best ``head_floor × budget`` (AdaKV's
safeguard, default 0.2), and the rest of the layer's budget goes to the best scores of any head (one top-k over the
layer's heads). Scores are compared across heads as they are: attention-like scores are distributions per head, and
CAOTE's errors are per-head contributions to the layer's output error (in the residual stream with ``+out``).

Deviation from AdaKV/kvpress: those keep the full cache and *mask* the entries a head dropped, so no memory is
saved. :class:`HeadAdaptiveLayer` stores each KV head's entries as a segment of one flat buffer per batch row,
``budget + room`` slots per head on average (``room`` = the block size, where the next step's entries go), so
the bytes held are those of the uniform cache with the same budget and a head may hold many more or fewer entries
than ``budget``. Attention runs per KV head over its segment (the stored entries all precede the step's tokens,
which attend causally among themselves).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from caote import hf
from caote.layers import EvictingLayer, StepPadding, warn_if_unbounded_step
from caote.methods import ModelFacts, StepView
from caote.policy import EvictionConfig
from caote.scores import add_attention_mass


def allocate_across_heads(
    scores: Sequence[torch.Tensor], protected: Sequence[torch.Tensor], keep: int, floor: int
) -> list[torch.Tensor]:
    """Which entries each head keeps when ``keep`` entries are shared by the heads (AdaKV's allocation).

    ``scores[h]`` / ``protected[h]`` ``(N_h,)``: head ``h``'s scores (higher = keep) and its entries no policy may
    evict. Every head keeps its protected entries and its ``floor`` best other entries (fewer if it holds fewer); the
    remaining slots go to the highest scores over all heads. Returns each head's kept indices, increasing.
    """
    ranked = []
    for head_scores, head_protected in zip(scores, protected):
        open_scores = head_scores.masked_fill(head_protected, float("-inf"))
        best = open_scores.topk(min(floor, int((~head_protected).sum()))).indices
        ranked.append(head_scores.masked_fill(head_protected, float("inf")).index_fill(0, best, float("inf")))
    flat = torch.cat(ranked)
    if keep > flat.numel():
        raise ValueError(f"cannot keep {keep} entries out of {flat.numel()}")
    forced = int(torch.isinf(flat).sum())
    if forced > keep:
        raise ValueError(f"the heads' protected entries and floors ({forced}) exceed the layer's budget ({keep})")
    chosen = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    chosen[flat.topk(keep).indices] = True
    return [part.nonzero().flatten() for part in chosen.split([s.numel() for s in scores])]


class HeadAdaptiveLayer(EvictingLayer):
    """One layer's KV cache holding ``budget × H_kv`` entries shared by its KV heads (see the module docstring).

    Storage: ``_keys``/``_values`` ``(B, P, D)``, ``_positions`` ``(B, P)`` (and H2O's ``_attention_sum``), one
    segment per KV head: head ``h`` of row ``b`` holds ``_lengths[b][h]`` entries from slot ``_offsets[b][h]``,
    in position order, with free slots after them up to ``_offsets[b][h + 1]``. ``stored`` is the mean number of
    entries per KV head (every row holds the same total), so ``stored × entry_bytes()`` stays the bytes held.
    """

    attends_itself = True

    def __init__(self, config: EvictionConfig, facts: ModelFacts | None = None, padding: StepPadding | None = None):
        super().__init__(config, facts, padding)
        self.heads = 0
        self._lengths: list[list[int]] = []
        self._offsets: list[list[int]] = []
        self._head_facts: list[ModelFacts] | None = None

    # ----------------------------------------------------------------------------------------- storage
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype, self.is_initialized = key_states.device, key_states.dtype, True
        batch, self.heads = key_states.shape[:2]
        self._keys = key_states.new_empty(batch, 0, key_states.shape[-1])
        self._values = value_states.new_empty(batch, 0, value_states.shape[-1])
        self._positions = torch.empty(batch, 0, dtype=torch.long, device=self.device)
        if self.config.accumulates_attention:
            self._attention_sum = torch.zeros(batch, 0, dtype=torch.float32, device=self.device)
        self._lengths = [[0] * self.heads for _ in range(batch)]
        self._offsets = [[0] * (self.heads + 1) for _ in range(batch)]

    def _publish(self) -> None:
        """``keys``/``values`` are the flat buffers (``(B, P, D)``, segments per head): transformers only checks
        their device."""
        self.keys, self.values = self._keys, self._values

    @property
    def positions(self) -> torch.Tensor:
        raise AttributeError("a head-adaptive layer holds a different number of entries per head: use head_positions")

    def head_positions(self, row: int, head: int) -> torch.Tensor:
        """Absolute positions of the entries head ``head`` of batch row ``row`` holds, increasing."""
        start = self._offsets[row][head]
        return self._positions[row, start : start + self._lengths[row][head]]

    def _segment(self, buffer: torch.Tensor, row: int, head: int) -> torch.Tensor:
        start = self._offsets[row][head]
        return buffer[row, start : start + self._lengths[row][head]]

    def _relayout(self, kept: list[list[torch.Tensor]] | None, room: int) -> None:
        """Rewrite the buffers so head ``h`` of row ``b`` holds its entries ``kept[b][h]`` (indices into its segment;
        ``None`` = all) followed by ``room`` free slots."""
        batch = len(self._lengths)
        lengths = [[len(k) for k in row] for row in kept] if kept is not None else self._lengths
        offsets = [[0] * (self.heads + 1) for _ in range(batch)]
        for b in range(batch):
            for h in range(self.heads):
                offsets[b][h + 1] = offsets[b][h] + lengths[b][h] + room
        capacity = max(row[-1] for row in offsets)
        old_capacity = self._keys.shape[1]
        source, target = [], []
        for b in range(batch):
            for h in range(self.heads):
                index = (torch.arange(self._lengths[b][h], device=self.device) if kept is None
                         else kept[b][h].to(self.device))
                source.append(b * old_capacity + self._offsets[b][h] + index)
                target.append(b * capacity + offsets[b][h] + torch.arange(lengths[b][h], device=self.device))
        source, target = torch.cat(source), torch.cat(target)
        buffers = []
        for buffer in (self._keys, self._values, self._positions, self._attention_sum):
            if buffer is None:
                buffers.append(None)
                continue
            width = buffer.shape[2] if buffer.dim() == 3 else 1
            moved = buffer.reshape(batch * old_capacity, width).index_select(0, source)
            new = buffer if capacity == old_capacity else buffer.new_zeros(batch, capacity, *buffer.shape[2:])
            new.view(batch * capacity, width).index_copy_(0, target, moved)
            buffers.append(new)
        self._keys, self._values, self._positions, self._attention_sum = buffers
        self._lengths, self._offsets = [list(row) for row in lengths], offsets
        self.capacity = capacity // self.heads
        self._publish()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append a step's post-RoPE keys and values to every head's segment. Returns the step's own keys and
        values: the attention (:meth:`attend`) reads the segments."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        batch, heads, step = key_states.shape[:3]
        if batch != len(self._lengths):
            raise ValueError(f"batch size changed from {len(self._lengths)} to {batch} within one evicting cache")
        if self.step_padding.valid_for(self.seen, batch, step) is not None:
            raise ValueError(f"method {self.config.method!r}: padded batches are not supported with '+adaptive' (each "
                             "head attends over its own segment, without a mask); read the prompts one at a time or "
                             "use the method without '+adaptive'")
        room = min(self._offsets[b][h + 1] - self._offsets[b][h] - self._lengths[b][h]
                   for b in range(batch) for h in range(heads))
        if room < step:
            self._relayout(None, max(step, self.config.block_size))
        capacity = self._keys.shape[1]
        starts = torch.tensor([b * capacity + self._offsets[b][h] + self._lengths[b][h]
                               for b in range(batch) for h in range(heads)], device=self.device)
        target = (starts[:, None] + torch.arange(step, device=self.device)).flatten()
        self._keys.view(-1, self._keys.shape[-1]).index_copy_(0, target, key_states.reshape(-1, key_states.shape[-1]))
        self._values.view(-1, self._values.shape[-1]).index_copy_(
            0, target, value_states.reshape(-1, value_states.shape[-1]))
        self._positions.view(-1).index_copy_(
            0, target, torch.arange(self.seen, self.seen + step, device=self.device).repeat(batch * heads))
        if self._attention_sum is not None:
            self._attention_sum.view(-1).index_fill_(0, target, 0.0)
        for row in self._lengths:
            for h in range(heads):
                row[h] += step
        self.seen += step
        self.stored = sum(self._lengths[0]) // heads
        self.peak_stored = max(self.peak_stored, self.stored)
        warn_if_unbounded_step(step, self.config)
        hf.expect_attention(self, key_states)
        return key_states, value_states

    # -------------------------------------------------------------------------------- attention + eviction
    def attend(self, module: torch.nn.Module, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """The step's attention over each head's segment, ``(B, Q, H_q, D)`` in the query's dtype; then score and
        evict (float32 weights when the method reads them, as the uniform layer's)."""
        batch, q_heads, q_len, head_dim = query.shape
        group = q_heads // self.heads
        scoring = self.wants_attention()
        reads = self.config.spec.reads
        output = query.new_empty(batch, q_len, q_heads, head_dim)
        steps: list[list[dict]] = []
        for b in range(batch):
            steps.append([])
            for h in range(self.heads):
                q = query[b, h * group : (h + 1) * group]
                keys, values = self._segment(self._keys, b, h), self._segment(self._values, b, h)
                weights, out = hf.segment_attention(q, keys, values, scaling, float32=scoring)
                output[b, :, h * group : (h + 1) * group] = out.transpose(0, 1).to(query.dtype)
                if scoring:
                    steps[b].append({"weights": weights, "outputs": out, "values": values.to(torch.float32),
                                     "queries": q.to(torch.float32) if reads.queries else None,
                                     "keys": keys.to(torch.float32) if reads.queries else None})
        if scoring:
            self._score_and_evict(steps, scaling, module)
        return output

    def _facts_for(self, module: torch.nn.Module | None) -> list[ModelFacts]:
        if self._head_facts is None:
            if self.config.spec.output_space:
                self._fill_output_factors(module, self.heads)
            per_head, per_group = self.facts.per_head_factors, self.facts.per_group_factors
            self._head_facts = [
                ModelFacts(self.facts.inv_freq, *(None if f is None else f[h : h + 1] for f in (per_head, per_group)))
                for h in range(self.heads)]
        return self._head_facts

    def _score_and_evict(self, steps: list[list[dict]], scaling: float, module: torch.nn.Module | None) -> None:
        cfg = self.config
        rows = cfg.query_rows
        if cfg.accumulates_attention:
            for b, row in enumerate(steps):
                for h, step in enumerate(row):
                    segment = self._segment(self._attention_sum, b, h)
                    add_attention_mass(segment[None, None], step["weights"][None, None])
        if not cfg.must_evict(self.stored):
            return
        facts = self._facts_for(module)
        floor = min(int(cfg.head_floor * cfg.budget), cfg.budget - cfg.sink_tokens - cfg.recent_window)
        kept = []
        for b, row in enumerate(steps):
            head_scores, head_protected = [], []
            for h, step in enumerate(row):
                weights, outputs = step["weights"][None, None], step["outputs"][None, None]
                if rows is not None:
                    weights, outputs = weights[..., -rows:, :], outputs[..., -rows:, :]
                positions = self.head_positions(b, h)
                view = StepView(
                    config=cfg, values=step["values"][None, None], positions=positions[None, None], seen=self.seen,
                    weights=weights if cfg.needs_attention else None, outputs=outputs,
                    queries=None if step["queries"] is None else step["queries"][None, None],
                    keys=None if step["keys"] is None else step["keys"][None, None], scaling=scaling, facts=facts[h],
                    attention_sum=(None if self._attention_sum is None
                                   else self._segment(self._attention_sum, b, h)[None, None]),
                )
                head_scores.append(cfg.spec.score(view)[0, 0])
                head_protected.append(self.protected_positions(positions, self.seen))
            kept.append(allocate_across_heads(head_scores, head_protected, cfg.budget * self.heads, floor))
        evicted = sum(self._lengths[0]) - cfg.budget * self.heads
        self._relayout(kept, cfg.block_size + cfg.slack)
        self.evicted += evicted // self.heads
        self.stored = cfg.budget

    def head_lengths(self) -> list[list[int]]:
        """Entries held by each KV head of each batch row."""
        return [list(row) for row in self._lengths]

    # ------------------------------------------------------------------------- transformers' layer API
    def _index_rows(self, index: torch.LongTensor) -> None:
        """Batch-row operations (beams, repeats, selection): the flat buffers follow in the base class, and each
        row's segment table with them."""
        super()._index_rows(index)
        rows = index.tolist()
        self._lengths = [list(self._lengths[i]) for i in rows]
        self._offsets = [list(self._offsets[i]) for i in rows]

    def reset(self) -> None:
        super().reset()
        self._lengths, self._offsets, self._head_facts = [], [], None

    def entry_bytes(self) -> int:
        """Bytes of one entry per KV head across the batch (key + value): ``stored × entry_bytes()`` is the layer's
        bytes because ``stored`` is the mean entries per head."""
        if self._keys is None:
            return 0
        batch, _, dim = self._keys.shape
        return batch * self.heads * (dim + self._values.shape[-1]) * self._keys.element_size()
