"""The base policies: StreamingLLM, the paper's attention-score policies (TOVA, H2O, SnapKV), CAOTE itself, and
the query-agnostic scores beyond the paper (DropKV's window form, ExpectedAttention). Each is one :class:`Base`;
the formulas are the pure tensor functions of :mod:`caote.scores`."""

from __future__ import annotations

import torch

from caote import scores
from caote.methods.base import Base, Reads, StepView

STREAMING_SINKS = 4
"""StreamingLLM reference default: four attention-sink tokens."""
EXPECTED_SINKS = 4
"""kvpress ``ExpectedAttentionPress`` default ``n_sink = 4``."""


def _all_rows(view: StepView) -> torch.Tensor:
    return view.weights


def _caote(view: StepView) -> torch.Tensor:
    return view.error(view.weights, view.outputs)


def _dropkv(view: StepView) -> torch.Tensor:
    """DropKV (kvpress issue/PR #284/#285): ``Σ_{i∈W} (a/(1−a))² ‖v_j − X_i‖²`` over the observation window,
    mean over the query heads of the group, SnapKV-pooled. The window sum of squares is CAOTE's root-sum-square
    squared (docs/decisions.md 1), so the two rank alike before pooling."""
    group = view.weights.shape[2]
    squared = view.error(view.weights, view.outputs).square() / group
    return scores.pool_outside_window(squared, view.config.snapkv_window, view.config.snapkv_kernel)


def _expected_rows(view: StepView) -> torch.Tensor:
    if view.facts.inv_freq is None:
        raise ValueError("'expected' needs the model's RoPE frequencies: create the cache with EvictingCache(model, ...)")
    q_len = view.queries.shape[-2]
    positions = torch.arange(view.seen - q_len, view.seen, device=view.queries.device)
    return scores.expected_attention_weights(
        view.queries, positions, view.keys, view.seen - 1, view.facts.inv_freq, view.scaling,
        future=view.config.expected_future,
    )


def _expected(view: StepView) -> torch.Tensor:
    """kvpress ``ExpectedAttentionPress``: expected attention averaged over the group, times ``‖v_j‖``."""
    return _expected_rows(view).mean(dim=(2, 3)) * view.values.norm(dim=-1)


def _snapkv_window(config) -> int:
    return config.snapkv_window


def _window_recent(config, sinks: int) -> int:
    return min(config.snapkv_window, config.budget - sinks)


BASES: tuple[Base, ...] = (
    Base("full", "no eviction", None, evicts=False, correctable=False),
    Base(
        "streaming", "recency (sinks + most recent)",
        lambda view: scores.streaming_scores(view.positions), correctable=False,
        default_sinks=lambda config: STREAMING_SINKS,
        default_recent=lambda config, sinks: max(config.budget - sinks, 0),
    ),
    Base(
        "caote", "exact output error of evicting *j*: `a_j/(1−a_j)·‖X−v_j‖`, root-sum-square over the block's "
        "queries and the query heads sharing the KV head",
        _caote, Reads(attention=True, outputs=True), joint_rows=_all_rows, correctable=False,
    ),
    Base(
        "tova", "attention of the last query (mean over the query heads of a KV head)",
        lambda view: scores.tova_scores(view.weights), Reads(attention=True, rows=lambda config: 1),
    ),
    Base(
        "h2o", "attention accumulated over every query so far, prompt and decoding",
        lambda view: view.attention_sum, Reads(attention=True, accumulates=True),
        default_recent=lambda config, sinks: config.budget // 2,
    ),
    Base(
        "snapkv", "attention of the last 32 queries, average-pooled (kernel 5)",
        lambda view: scores.snapkv_scores(view.weights, view.config.snapkv_window, view.config.snapkv_kernel),
        Reads(attention=True, rows=_snapkv_window), default_recent=_window_recent,
    ),
    Base(
        "dropkv", "CAOTE's error squared and summed over the last 32 queries, mean over the group, pooled "
        "(kvpress's open DropKV press)",
        _dropkv, Reads(attention=True, rows=_snapkv_window, outputs=True),
        correctable=False, default_recent=_window_recent,
    ),
    Base(
        "expected", "ExpectedAttention: attention expected from the next 512 queries (Gaussian fitted on the "
        "step's queries, rotary phase advanced), times `‖v_j‖`",
        _expected, Reads(queries=True), rows=_expected_rows,
        default_sinks=lambda config: min(EXPECTED_SINKS, config.budget),
    ),
)
