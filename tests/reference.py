"""Reference evicting cache for the tests: the full cache is kept, evicted entries are only *masked*, per
layer and KV head. It shares nothing with ``caote.cache`` (no buffers, no compaction, no mask-size
arithmetic); it uses the score functions, which test_scores.py checks against brute force."""

from __future__ import annotations

import contextlib

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from caote.policy import EvictionConfig, score_entries
from caote.scores import attention_mass

NAME = "caote_masked_reference"


class MaskedReference:
    def __init__(self, config: EvictionConfig):
        self.config = config
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
        mass = mass + attention_mass(weights)
    if cfg.evicts:
        for b in range(batch):
            for h in range(heads):
                idx = alive[b, h].nonzero().flatten()
                if len(idx) <= cfg.budget:
                    continue
                sl = (slice(b, b + 1), slice(h, h + 1))
                s = score_entries(
                    cfg, weights[sl][..., idx], value.float()[sl][:, :, idx], out[sl], idx.view(1, 1, -1), mass[sl][..., idx]
                )[0, 0]
                protected = (idx < cfg.sink_tokens) | (idx >= n - cfg.recent_window)
                s = s.masked_fill(protected, float("inf"))
                keep = idx[s.topk(cfg.budget).indices]
                alive[b, h] = False
                alive[b, h, keep] = True
    ref.alive[layer], ref.mass[layer] = alive, mass
    return out.reshape(batch, q_heads, q_len, dim).transpose(1, 2).to(query.dtype), None


AttentionInterface.register(NAME, _attention)
AttentionMaskInterface.register(NAME, eager_mask)


@contextlib.contextmanager
def masked_reference(model, config: EvictionConfig):
    global _active
    _active = MaskedReference(config)
    previous = model.config._attn_implementation
    model.set_attn_implementation(NAME)
    try:
        yield _active
    finally:
        model.set_attn_implementation(previous)
        _active = None
