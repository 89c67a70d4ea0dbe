"""Reference evicting cache for the tests: the full cache is kept, evicted entries are only *masked*, per
layer and KV head. It shares nothing with ``caote.cache`` (no buffers, no compaction, no mask-size
arithmetic); it uses the score functions, which test_scores.py checks against brute force. A sliding-window layer of a
hybrid model (the model passes ``sliding_window=``) keeps every entry under transformers' own sliding mask and never
evicts (the budget applies to the global layers)."""

from __future__ import annotations

import contextlib

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from caote.methods import ModelFacts, StepView
from caote.policy import EvictionConfig
from caote.scores import add_attention_mass, output_space_factors

NAME = "caote_masked_reference"


class MaskedReference:
    def __init__(self, config: EvictionConfig, inv_freq=None):
        self.config = config
        self.inv_freq = inv_freq
        self.cache = DynamicCache()
        self.alive: dict[int, torch.Tensor] = {}  # layer -> (B, H, seen) bool
        self.mass: dict[int, torch.Tensor] = {}  # layer -> (B, H, seen) float32 (H2O)

    def kept_positions(self, layer: int) -> list[list[list[int]]]:
        alive = self.alive[layer]
        return [[row.nonzero().flatten().tolist() for row in heads] for heads in alive]


_active: MaskedReference | None = None


def _attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    ref, layer, cfg = _active, module.layer_idx, _active.config
    batch, q_heads, q_len, dim = query.shape
    heads, n = key.shape[1], key.shape[2]
    group = q_heads // heads
    new = torch.ones(batch, heads, n - ref.alive.get(layer, torch.empty(0, 0, 0)).shape[-1], dtype=torch.bool)
    alive = torch.cat([ref.alive[layer], new], -1) if layer in ref.alive else new
    mass = torch.cat([ref.mass[layer], torch.zeros(new.shape)], -1) if layer in ref.mass else torch.zeros(new.shape)
    q = query.float().view(batch, heads, group, q_len, dim)
    logits = torch.einsum("bhgqd,bhnd->bhgqn", q, key.float()) * scaling
    logits = logits + attention_mask.float()[:, :, None] + torch.where(alive, 0.0, float("-inf"))[:, :, None, None]
    weights = torch.softmax(logits, -1)
    out = torch.einsum("bhgqn,bhnd->bhgqd", weights, value.float())
    if cfg.accumulates_attention:
        mass = add_attention_mass(mass, weights)
    if cfg.evicts and kwargs.get("sliding_window") is None:
        facts = ModelFacts(inv_freq=ref.inv_freq)
        if cfg.spec.output_space:
            facts.per_head_factors, facts.per_group_factors = output_space_factors(module.o_proj.weight, heads, dim)
        rows = cfg.query_rows if cfg.needs_attention else 0
        for b in range(batch):
            if cfg.spec.adaptive:  # +adaptive: the layer's budget × heads shared by its heads, scored per head
                if int(alive[b].sum()) <= (cfg.budget + cfg.slack) * heads:
                    continue
                candidates = []  # (forced, score, head, position)
                floor = min(int(cfg.head_floor * cfg.budget), cfg.budget - cfg.sink_tokens - cfg.recent_window)
            for h in range(heads):
                idx = alive[b, h].nonzero().flatten()
                if len(idx) <= cfg.budget + cfg.slack and not cfg.spec.adaptive:
                    continue
                sl = (slice(b, b + 1), slice(h, h + 1))
                w = weights[sl][..., idx]
                o = out[sl]
                if rows is not None:
                    w, o = w[..., -rows:, :], o[..., -rows:, :]
                f = ModelFacts(facts.inv_freq, *(None if x is None else x[h : h + 1] for x in
                                                 (facts.per_head_factors, facts.per_group_factors)))
                view = StepView(config=cfg, values=value.float()[sl][:, :, idx], positions=idx.view(1, 1, -1),
                                seen=n, weights=w, outputs=o, queries=q[sl], keys=key.float()[sl][:, :, idx],
                                scaling=scaling, attention_sum=mass[sl][..., idx], facts=f)
                s = cfg.spec.score(view)
                protected = ((idx < cfg.sink_tokens) | (idx >= n - cfg.recent_window)).view(1, 1, -1)
                if cfg.spec.adaptive:
                    head = [(bool(p), float(x), h, int(i)) for p, x, i in zip(protected.flatten(), s.flatten(), idx)]
                    by_score = sorted((e for e in head if not e[0]), key=lambda e: -e[1])
                    best = {e[3] for e in by_score[:floor]}
                    candidates += [(p or i in best, x, h, i) for p, x, h, i in head]
                    continue
                dropped = cfg.spec.choose_evicted(view, s, protected, len(idx) - cfg.budget)[0, 0]
                keep = idx[[i for i in range(len(idx)) if i not in set(dropped.tolist())]]
                alive[b, h] = False
                alive[b, h, keep] = True
            if cfg.spec.adaptive:
                ranked = sorted(candidates, key=lambda e: (not e[0], -e[1]))[: cfg.budget * heads]
                alive[b] = False
                for _, _, h, i in ranked:
                    alive[b, h, i] = True
    ref.alive[layer], ref.mass[layer] = alive, mass
    return out.reshape(batch, q_heads, q_len, dim).transpose(1, 2).to(query.dtype), None


AttentionInterface.register(NAME, _attention)
AttentionMaskInterface.register(NAME, eager_mask)


@contextlib.contextmanager
def masked_reference(model, config: EvictionConfig):
    global _active
    from caote import hf

    _active = MaskedReference(config, hf.rope_inv_freq(model))
    previous = model.config._attn_implementation
    model.set_attn_implementation(NAME)
    try:
        yield _active
    finally:
        model.set_attn_implementation(previous)
        _active = None
