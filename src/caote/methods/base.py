"""The shapes every eviction method shares: what a layer shows a score at one step (:class:`StepView`), what a
method reads (:class:`Reads`), a base policy (:class:`Base`) and a correction on top of it (:class:`Correction`).

A method name is ``base[+correction][+out][+joint]`` (:mod:`caote.methods.registry`). This mirrors kvpress's
one-``score()``-per-press contract with wrapper presses: a base scores entries, a correction re-scores them from the
base's attention-like rows, and the modifiers change where the error is measured (``+out``, method.md §6) or how
the evicted set is chosen (``+joint``, method.md §6).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from caote import scores

if TYPE_CHECKING:
    from caote.policy import EvictionConfig


@dataclass(frozen=True)
class Reads:
    """What a method needs from the attention step.

    Attributes:
        attention: float32 attention weights of the step's queries over the stored entries.
        rows: how many of the step's last queries the weights must cover (``None`` = all; a function of the
            configuration, e.g. SnapKV's observation window).
        outputs: the per-head attention outputs ``X`` of those rows.
        queries: the step's post-RoPE queries and the stored keys (float32) and the model's RoPE frequencies.
        accumulates: a running attention sum over every query seen (H2O), so weights are needed at every step.
    """

    attention: bool = False
    rows: Callable[[EvictionConfig], int | None] | None = None
    outputs: bool = False
    queries: bool = False
    accumulates: bool = False

    def query_rows(self, config: EvictionConfig) -> int | None:
        return None if self.rows is None else self.rows(config)


@dataclass
class ModelFacts:
    """Per-layer facts about the model that some scores need, filled in by the integration (:mod:`caote.hf`).

    Attributes:
        inv_freq: RoPE inverse frequencies ``(D/2,)`` (expected-attention scores).
        per_head_factors: ``(H_kv, G, D, D)`` output-space factors of each query head's ``o_proj`` slice.
        per_group_factors: ``(H_kv, 1, D, D)`` factors of each group's summed slice (``+out`` on meta-scores).
    """

    inv_freq: torch.Tensor | None = None
    per_head_factors: torch.Tensor | None = None
    per_group_factors: torch.Tensor | None = None


@dataclass
class StepView:
    """One layer at one step, as a score sees it (float32 tensors; ``N`` stored entries, new ones included).

    Attributes:
        config: the cache's :class:`~caote.policy.EvictionConfig`.
        values: ``(B, H_kv, N, D)``.
        positions: ``(B, H_kv, N)`` absolute positions, increasing.
        seen: tokens seen so far (the step's queries are at positions ``seen − Q .. seen − 1``).
        weights: ``(B, H_kv, G, R, N)`` attention of the step's last ``R`` queries, if read.
        outputs: ``(B, H_kv, G, R, D)`` their per-head outputs, if read.
        queries: ``(B, H_kv, G, Q, D)`` the step's post-RoPE queries, if read.
        keys: ``(B, H_kv, N, D)`` post-RoPE keys, if queries are read.
        scaling: the attention's logit scale (``1/√D`` usually).
        attention_sum: ``(B, H_kv, N)`` H2O's accumulated attention, if accumulated.
        facts: :class:`ModelFacts` of this layer.
        output_space: measure CAOTE errors through ``o_proj`` (the ``+out`` modifier).
    """

    config: EvictionConfig
    values: torch.Tensor
    positions: torch.Tensor
    seen: int
    weights: torch.Tensor | None = None
    outputs: torch.Tensor | None = None
    queries: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    scaling: float | None = None
    attention_sum: torch.Tensor | None = None
    facts: ModelFacts = field(default_factory=ModelFacts)
    output_space: bool = False

    def error(self, rows: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
        """CAOTE's error of evicting each entry from ``rows`` with output estimate ``outputs``
        (:func:`caote.scores.row_error_scores`), in value space or, with ``+out``, in the residual stream."""
        factors = self.output_factors(rows) if self.output_space else None
        return scores.row_error_scores(rows, self.values, outputs, factors)

    def output_factors(self, rows: torch.Tensor) -> torch.Tensor:
        """Output-space factors matching ``rows`` ``(B, H, G', R, N)``: per query head when ``G'`` is the model's
        group, the group's summed slice when the rows are shared by the group (``G' = 1``)."""
        facts = self.facts
        factors = facts.per_group_factors if rows.shape[2] == 1 else facts.per_head_factors
        if factors is None:
            raise ValueError("'+out' needs the model's o_proj: create the cache with EvictingCache(model, ...)")
        if factors.shape[1] != rows.shape[2]:
            raise ValueError(f"'+out': rows of {rows.shape[2]} heads per group, o_proj factors of {factors.shape[1]}")
        return factors


Importance = Callable[[StepView], torch.Tensor]
"""A base's score of every stored entry ``(B, H_kv, N)`` (higher = keep)."""

Rows = Callable[[StepView], torch.Tensor]
"""A base's attention-like rows ``(B, H_kv, G', R, N)`` (each a distribution over the entries) for corrections."""


def _zero(config: EvictionConfig, *_: int) -> int:
    return 0


@dataclass(frozen=True)
class Base:
    """A base eviction policy: one score, what it reads, its protected-token defaults.

    Attributes:
        name: the method name's first part.
        summary: one line for the README's method table (score of entry ``j``).
        importance: :data:`Importance`.
        reads: :class:`Reads`.
        rows: :data:`Rows` handed to a correction; ``None`` = the importance normalised over the entries
            (method.md §3's meta-heuristic ``ĥ = h / Σh``, shared by the group).
        joint_rows: for a base whose own score *is* CAOTE's error of real attention rows (``caote``), those rows:
            ``+joint`` then selects the evicted set on their joint error.
        correctable: whether ``+caote``/``+fastcaote`` may wrap it.
        default_sinks / default_recent: protected tokens when the configuration leaves them ``None``.
        evicts: ``False`` only for ``full``.
    """

    name: str
    summary: str
    importance: Importance | None
    reads: Reads = Reads()
    rows: Rows | None = None
    joint_rows: Rows | None = None
    correctable: bool = True
    default_sinks: Callable[[EvictionConfig], int] = _zero
    default_recent: Callable[[EvictionConfig, int], int] = _zero
    evicts: bool = True


@dataclass(frozen=True)
class Correction:
    """A re-scoring of a base's rows (method.md §3).

    Attributes:
        name: the method name's second part (``snapkv+caote``).
        summary: one line for the README.
        estimate: the output the rows are compared with, ``(rows, values) -> X̂`` ``(B, H, G', R, D)``.
        joint: whether ``+joint`` applies (the estimate must be ``Σ r v``, so that removing a set renormalises it).
    """

    name: str
    summary: str
    estimate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    joint: bool = True
