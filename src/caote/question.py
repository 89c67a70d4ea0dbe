"""Question-aware eviction (labelled everywhere it is used): when the question is known before the context is read,
each prefill block is followed by a *probe* — the question's tokens at the positions they will have at the end of
the prompt, run through the cache so that their queries see the context read so far — and the probe's attention
decides which spans of the context every layer keeps.

Why spans shared by every layer (``shared/docs/quality-findings.md`` §1): per-layer question attention keeps the
words of a fact that echo the question and drops the answer tokens; the middle layers that need the fact to
answer attend to it least, while a few layers find it well. So every layer's probe ranks the positions it holds,
the rankings are fused (a position many layers rank high wins; chosen at every step from the probe itself, never
from the answer), and the best positions are kept as short spans in every layer and KV head, within a quota of the
budget; the rest of the budget is filled by the base method's query-agnostic scores. docs/decisions.md 14 records
what was tried on the way. The memory stays bounded: a layer holds at most
``budget + block + question`` entries, the probe's own entries are dropped after each block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class QuestionAware:
    """Settings of the question-aware mode.

    Attributes:
        span_before / span_after: tokens kept before and after a ranked position (a fact is a sentence, not a
            word). More after than before: the question's words match a fact's key ("the passphrase for the
            lighthouse is"), and the value the answer needs follows its key.
        quota: fraction of the budget given to the shared spans (the rest follows the base method).
        sinks: first positions ignored when ranking (attention sinks draw attention from every query).
    """

    span_before: int = 2
    span_after: int = 14
    quota: float = 0.75
    sinks: int = 4

    def __post_init__(self) -> None:
        for name in ("span_before", "span_after"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 0):
                raise ValueError(f"question-aware {name} must be an integer >= 0, got {getattr(self, name)!r}")
        if not (0.0 < self.quota <= 1.0):
            raise ValueError(f"question-aware quota must be in (0, 1], got {self.quota!r}")


def dense_scores(scores: torch.Tensor, positions: torch.Tensor, seen: int) -> torch.Tensor:
    """One layer's question attention ``(B, H, N)`` at ``positions`` ``(B, H, N)`` as ``(B, seen)``: the mean over
    KV heads (an entry a head evicted scores 0 in that head), normalised to sum 1 per row."""
    batch, heads, _ = scores.shape
    dense = torch.zeros(batch, heads, seen, dtype=torch.float32, device=scores.device)
    dense.scatter_(-1, positions, scores.to(torch.float32))
    dense = dense.mean(1)
    return dense / dense.sum(-1, keepdim=True).clamp_min(1e-30)


def rank_fusion(dense: torch.Tensor, k: float = 1.0) -> torch.Tensor:
    """Reciprocal-rank fusion (Cormack et al. 2009) of the layers' question attention ``dense`` ``(L, B, seen)``:
    ``Σ_l 1 / (k + rank_l(p))`` over the layers that hold ``p`` (rank 1 = the layer's most attended position).
    A position that many layers rank high wins over one that a few layers attend to heavily (early layers
    concentrate on nearby or template tokens). Returns ``(B, seen)``."""
    order = dense.argsort(dim=-1, descending=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(1, dense.shape[-1] + 1, device=dense.device).expand_as(order))
    fused = torch.where(dense > 0, 1.0 / (k + ranks.to(torch.float32)), torch.zeros((), device=dense.device))
    return fused.sum(0)


def shared_spans(
    ranking: torch.Tensor, quota: int, before: int, after: int, sinks: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions ``(B, seen)`` bool kept by every layer: the best positions of ``ranking`` ``(B, seen)``, each with
    ``before`` tokens before and ``after`` after it, added in rank order until ``quota`` positions are taken (the
    last span is cut). Returns ``(kept, centers)``: the kept positions and the ranked positions that chose them."""
    ranking = ranking.clone()
    batch, seen = ranking.shape
    ranking[:, : min(sinks, seen)] = -1.0  # candidates masked out by the caller are -1 too
    keep = torch.zeros(batch, seen, dtype=torch.bool, device=ranking.device)
    centers = torch.zeros_like(keep)
    quota = min(quota, seen)
    order = ranking.argsort(dim=-1, descending=True)
    for b in range(batch):
        taken = 0
        for center in order[b].tolist():
            if taken >= quota or ranking[b, center] <= 0:  # no layer attends to it (or not a candidate)
                break
            lo, hi = max(center - before, 0), min(center + after + 1, seen)
            new = (~keep[b, lo:hi]).nonzero().flatten() + lo
            new = new[: quota - taken]
            keep[b, new] = True
            centers[b, center] = len(new) > 0
            taken += len(new)
    return keep, centers
