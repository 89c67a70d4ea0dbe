"""Eviction scores as pure tensor functions: higher score = more worth keeping.

Shapes (one transformer layer, one forward step over ``Q`` new queries):

* ``attn``     ``(B, H_kv, G, Q, N)`` float32 attention weights of the step's queries over the ``N`` stored
  entries (new tokens included), query heads grouped by the KV head they share (``G = H_q / H_kv``).
* ``values``   ``(B, H_kv, N, D)`` float32 cached values.
* ``outputs``  ``(B, H_kv, G, Q, D)`` float32 per-head attention outputs ``X = Σ_i a_i v_i`` (before ``o_proj``).
* every score function returns ``(B, H_kv, N)``.

Every formula cites ``shared/docs/method.md`` (CAOTE, arXiv 2504.14051) or the reference code it follows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-4
"""Smallest ``1 - a_j`` that is resolved (method.md §2: ``a_j -> 1`` sends the error to infinity). Below it the
float32 rounding of ``X`` (~6e-8 relative), multiplied by ``a/(1-a) > 1e4``, would exceed ~0.1% of the error:
such an entry scores infinite and is never evicted."""


def _error_ratio(weights: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """``a / (1 - a)``: how much evicting an entry of weight ``a`` renormalises the others (method.md §2).

    Where ``1 - a < eps`` float32 cannot resolve the error any more (``a`` rounds to 1 and ``X`` to ``v_j``):
    the ratio is infinite, so the entry that carries all the attention is never evicted (method.md §2).
    """
    rest = 1.0 - weights
    return torch.where(rest < eps, torch.inf, weights / rest.clamp_min(eps))


def _times_ratio(ratio: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:
    """``ratio · distance`` with an infinite ratio staying infinite (not ``inf · 0 = nan``)."""
    return torch.where(torch.isinf(ratio), torch.inf, ratio * distance)


def caote_scores(attn: torch.Tensor, values: torch.Tensor, outputs: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """CAOTE, exact (method.md §2, aggregated as in §4).

    Per query ``q`` and query head ``g``: ``c = a_j / (1 - a_j) · ‖X - v_j‖₂`` is the norm of the change of
    that head's output when entry ``j`` is evicted and attention renormalised. DECISION (method.md §4):
    the errors of all the step's queries and of the query heads sharing a KV head combine by root-sum-square,
    ``c_j = sqrt(Σ_{q,g} c_{q,g,j}²)``, the Frobenius norm of the KV head's whole output change.
    A query that cannot see ``j`` (causal mask, ``a = 0``) contributes 0.

    Computed without materialising any ``(G·Q) × N × D`` difference: with ``r = (a/(1-a))²``,
    ``Σ r ‖X - v_j‖² = Σ r ‖X‖² - 2 (Σ r X)·v_j + ‖v_j‖² Σ r`` (one matmul). That expansion cancels
    catastrophically when ``X ≈ v_j``: the pairs with ``a > 1/2`` (at most one per query row, and the ones
    whose large ratio would amplify the error) are computed as direct differences, and so is every entry whose
    expanded sum comes out below 1e-3 of its terms.
    """
    batch, heads, group, q_len, n = attn.shape
    flat_attn = attn.reshape(batch, heads, group * q_len, n)
    flat_out = outputs.reshape(batch, heads, group * q_len, -1)
    dominant = flat_attn > 0.5
    small = (flat_attn / (1.0 - flat_attn)).square_().masked_fill_(dominant, 0.0)  # a ≤ 1/2: no clamp needed
    magnitude = (
        torch.matmul(flat_out.square().sum(-1).unsqueeze(-2), small).squeeze(-2)
        + values.square().sum(-1) * small.sum(-2)
    )
    total = magnitude - 2.0 * (torch.matmul(small.transpose(-1, -2), flat_out) * values).sum(-1)
    # where the expansion lost its precision (result tiny against its terms), recompute that entry directly
    b, h, j = (total < 1e-3 * magnitude).nonzero(as_tuple=True)
    if len(b):
        exact = (small[b, h, :, j] * (flat_out[b, h] - values[b, h, j].unsqueeze(-2)).square().sum(-1)).sum(-1)
        total = total.index_put((b, h, j), exact)
    b, h, row, j = dominant.nonzero(as_tuple=True)
    if len(b):
        ratio_sq = _error_ratio(flat_attn[b, h, row, j], eps).square()
        direct = _times_ratio(ratio_sq, (flat_out[b, h, row] - values[b, h, j]).square().sum(-1))
        total = total.index_put((b, h, j), direct, accumulate=True)
    return total.clamp_min(0.0).sqrt()


def normalise(base: torch.Tensor) -> torch.Tensor:
    """``ĥ_j = h_j / Σ_k h_k`` over the stored entries (method.md §3)."""
    return base / base.sum(-1, keepdim=True).clamp_min(torch.finfo(base.dtype).tiny)


def caote_meta_scores(base: torch.Tensor, values: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """CAOTE on top of a base policy's scores ``h ≥ 0`` (method.md §3, the "meta-heuristic").

    ``ĥ = h / Σh`` plays the attention weights: ``X̂ = Σ_i ĥ_i v_i``, ``c_j = ĥ_j / (1 - ĥ_j) · ‖X̂ - v_j‖₂``.
    """
    weights = normalise(base)
    estimate = torch.einsum("bhn,bhnd->bhd", weights, values)
    return _times_ratio(_error_ratio(weights, eps), (estimate[:, :, None, :] - values).norm(dim=-1))


def fastcaote_meta_scores(base: torch.Tensor, values: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """FastCAOTE (method.md §3): as :func:`caote_meta_scores` with ``X̂`` replaced by the mean stored value."""
    weights = normalise(base)
    mean_value = values.mean(dim=-2, keepdim=True)
    return _times_ratio(_error_ratio(weights, eps), (mean_value - values).norm(dim=-1))


def tova_scores(attn: torch.Tensor) -> torch.Tensor:
    """TOVA (Oren et al. 2024, reference ``schwartz-lab-NLP/TOVA``): attention of the last query only.

    GQA: averaged over the query heads that share the KV head (kvpress convention, method.md §4).
    """
    return attn[..., -1, :].mean(dim=2)


def attention_mass(attn: torch.Tensor) -> torch.Tensor:
    """Attention received by each entry, summed over the step's queries and averaged over the group.

    H2O (Zhang et al. 2023, reference ``FMInference/H2O``) accumulates this over every query seen so far,
    prompt and decoding; the accumulator lives in the cache and follows the entries it scores.
    """
    return attn.sum(dim=3).mean(dim=2)


def snapkv_scores(attn: torch.Tensor, window: int = 32, kernel: int = 5) -> torch.Tensor:
    """SnapKV (Li et al. 2024, reference ``FasterDecoding/SnapKV``, ``snapkv_utils.py``).

    Attention of the last ``window`` queries (the observation window) summed over those queries, averaged
    over the group, then 1-D average-pooled over the entries outside the window (kernel ``kernel``,
    ``padding = kernel // 2``, zero padding counted, as the reference's ``avg_pool1d``). The window's own
    entries keep their raw votes; the reference always keeps them, and the cache protects them
    (``recent_window = window`` by default). Entries are neighbours in cache order.
    """
    votes = attn[..., -window:, :].sum(dim=3).mean(dim=2)
    n_prefix = votes.shape[-1] - window
    if n_prefix <= 0:
        return votes
    prefix = votes[..., :n_prefix]
    pooled = F.avg_pool1d(prefix.reshape(-1, 1, n_prefix), kernel, stride=1, padding=kernel // 2)
    return torch.cat([pooled.reshape(prefix.shape), votes[..., n_prefix:]], dim=-1)


def streaming_scores(positions: torch.Tensor) -> torch.Tensor:
    """StreamingLLM (Xiao et al. 2024, reference ``mit-han-lab/streaming-llm``): the most recent entries win.

    The attention sinks (first ``sink_tokens`` positions) are protected by the cache, not scored here.
    """
    return positions.to(torch.float32)
