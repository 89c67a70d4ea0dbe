"""Every scoring rule checked as a fact against brute force: evict the entry, recompute, compare."""

import math
import os

import hypothesis.strategies as st
import torch
from hypothesis import given, settings

from caote import scores

SETTINGS = settings(max_examples=int(os.environ.get("CAOTE_HYPOTHESIS_EXAMPLES", 60)), deadline=None)


def _attention(q, k, v, mask=None):
    """Plain float64 attention: q (Q, D), k/v (N, D), mask (Q, N) bool (True = visible)."""
    logits = q @ k.T / math.sqrt(q.shape[-1])
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(logits, dim=-1)
    return weights, weights @ v


@SETTINGS
@given(n=st.integers(2, 24), d=st.integers(1, 16), seed=st.integers(0, 10_000), scale=st.floats(0.1, 6.0))
def test_caote_single_query_equals_brute_force(n, d, seed, scale):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, d, generator=g, dtype=torch.float64) * scale
    k = torch.randn(n, d, generator=g, dtype=torch.float64) * scale
    v = torch.randn(n, d, generator=g, dtype=torch.float64)
    weights, out = _attention(q, k, v)
    got = scores.caote_scores(
        weights.float().view(1, 1, 1, 1, n), v.float().view(1, 1, n, d), out.float().view(1, 1, 1, 1, d)
    ).view(n)
    for j in range(n):
        if 1 - weights.float()[0, j] < scores.EPS:  # float32 cannot resolve it: never evicted (method.md §2)
            assert got[j] == float("inf")
            continue
        keep = [i for i in range(n) if i != j]
        _, out_without = _attention(q, k[keep], v[keep])
        expected = (out - out_without).norm().item()
        assert math.isclose(got[j].item(), expected, rel_tol=5e-3, abs_tol=2e-5), (j, got[j].item(), expected)


@SETTINGS
@given(
    n_past=st.integers(0, 12),
    q_len=st.integers(1, 6),
    group=st.integers(1, 3),
    d=st.integers(1, 8),
    seed=st.integers(0, 10_000),
)
def test_caote_block_gqa_aggregation_equals_frobenius_norm_of_output_change(n_past, q_len, group, d, seed):
    """Root-sum-square over queries and grouped query heads = ‖ΔX‖_F of the whole KV head's block output."""
    g = torch.Generator().manual_seed(seed)
    n = n_past + q_len
    qs = torch.randn(group, q_len, d, generator=g, dtype=torch.float64) * 2
    k = torch.randn(n, d, generator=g, dtype=torch.float64) * 2
    v = torch.randn(n, d, generator=g, dtype=torch.float64)
    causal = torch.arange(n)[None, :] <= (n_past + torch.arange(q_len))[:, None]
    weights, outs = zip(*(_attention(qs[h], k, v, causal) for h in range(group)))
    weights, outs = torch.stack(weights), torch.stack(outs)
    got = scores.caote_scores(weights.float()[None, None], v.float()[None, None], outs.float()[None, None]).view(n)
    for j in range(n):
        if (1 - weights.float()[..., j] < scores.EPS).any():
            assert got[j] == float("inf")
            continue
        keep = [i for i in range(n) if i != j]
        total = 0.0
        for h in range(group):
            # a query that saw only token j has no output left to compare: j is then never cheap; skip such cases
            visible = causal[:, keep]
            if not visible.any(dim=1).all():
                total = None
                break
            _, out_without = _attention(qs[h], k[keep], v[keep], visible)
            total += ((outs[h] - out_without) ** 2).sum().item()
        if total is None:
            continue
        assert math.isclose(got[j].item(), math.sqrt(total), rel_tol=5e-3, abs_tol=5e-5), (j, got[j].item(), total)


@SETTINGS
@given(n=st.integers(2, 20), d=st.integers(1, 8), seed=st.integers(0, 10_000), zeros=st.integers(0, 3))
def test_caote_meta_equals_brute_force_on_normalised_base_scores(n, d, seed, zeros):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, generator=g, dtype=torch.float64) * 5
    base[: min(zeros, n - 1)] = 0.0  # arbitrary non-negative scores, zeros included
    v = torch.randn(n, d, generator=g, dtype=torch.float64)
    weights = base / base.sum()
    estimate = weights @ v
    got = scores.caote_meta_scores(base.float().view(1, 1, n), v.float().view(1, 1, n, d)).view(n)
    for j in range(n):
        keep = [i for i in range(n) if i != j]
        if weights[keep].sum() == 0:  # nothing left to renormalise: undefined, skip
            continue
        if 1 - weights[j] < scores.EPS:
            assert got[j] == float("inf")
            continue
        renormalised = weights[keep] / weights[keep].sum()
        expected = (estimate - renormalised @ v[keep]).norm().item()
        assert math.isclose(got[j].item(), expected, rel_tol=5e-3, abs_tol=2e-5)


@SETTINGS
@given(n=st.integers(2, 20), d=st.integers(1, 8), seed=st.integers(0, 10_000))
def test_fastcaote_is_the_meta_error_with_the_mean_value_as_output(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, generator=g) + 0.01
    v = torch.randn(n, d, generator=g)
    got = scores.fastcaote_meta_scores(base.view(1, 1, n), v.view(1, 1, n, d)).view(n)
    weights = base / base.sum()
    mean = v.mean(0)
    for j in range(n):
        # error of evicting j when the output estimate is the mean value and the remaining weights renormalise:
        # X̄ - (X̄ - ĥ_j v_j)/(1 - ĥ_j) with X̄ in place of Σ ĥ_i v_i
        expected = (mean - (mean - weights[j] * v[j]) / (1 - weights[j])).norm().item()
        assert math.isclose(got[j].item(), expected, rel_tol=1e-4, abs_tol=1e-5)
    # with uniform base scores the weighted output *is* the mean: FastCAOTE = CAOTE-meta
    uniform = torch.ones(1, 1, n)
    assert torch.allclose(
        scores.fastcaote_meta_scores(uniform, v.view(1, 1, n, d)),
        scores.caote_meta_scores(uniform, v.view(1, 1, n, d)),
        atol=1e-5,
    )


def test_caote_never_evicts_the_token_holding_all_attention():
    weights = torch.tensor([1.0, 0.0, 0.0]).view(1, 1, 1, 1, 3)
    v = torch.randn(1, 1, 3, 4)
    out = v[:, :, None, None, 0]
    c = scores.caote_scores(weights, v, out).view(3)
    assert c[0] == float("inf") and torch.isfinite(c[1:]).all()
    meta = scores.caote_meta_scores(torch.tensor([5.0, 0.0, 0.0]).view(1, 1, 3), v).view(3)
    assert meta[0] == float("inf") and not torch.isnan(meta).any()


@SETTINGS
@given(
    group=st.integers(1, 3), q_len=st.integers(1, 6), n=st.integers(2, 40), d=st.integers(1, 16),
    seed=st.integers(0, 10_000), sharpness=st.floats(0.5, 12.0),
)
def test_caote_direct_and_expanded_forms_agree(group, q_len, n, d, seed, sharpness):
    """The two ways caote_scores computes the same error (directly up to DIRECT_ROWS rows, expanded beyond) give the
    same scores on the same rows, peaks above 1/2, masked zeros and the never-evicted a -> 1 entries included."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 2, group, q_len, n, generator=gen) * sharpness
    logits[..., 0, -1] = -math.inf  # a masked entry for the first query (weight 0)
    weights = torch.softmax(logits, dim=-1)
    values = torch.randn(2, 2, n, d, generator=gen)
    outputs = weights @ values.unsqueeze(2)
    direct = scores._direct_caote_scores(weights, values, outputs, scores.EPS)
    expanded = scores._expanded_caote_scores(weights, values, outputs, scores.EPS)
    assert torch.equal(torch.isinf(direct), torch.isinf(expanded))
    finite = torch.isfinite(direct)
    assert torch.allclose(direct[finite], expanded[finite], rtol=1e-3, atol=1e-5)
    public = scores.caote_scores(weights, values, outputs)
    assert torch.equal(public, direct if group * q_len <= scores.DIRECT_ROWS else expanded)


def _random_attention(b, h, g, q, n, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(b, h, g, q, n, generator=gen) * 3, dim=-1)


def test_tova_is_last_query_mean_over_group():
    attn = _random_attention(2, 3, 2, 5, 11, 0)
    ref = torch.zeros(2, 3, 11)
    for b in range(2):
        for h in range(3):
            for j in range(11):
                ref[b, h, j] = sum(attn[b, h, gq, -1, j] for gq in range(2)) / 2
    assert torch.allclose(scores.tova_scores(attn), ref, atol=1e-6)


def test_attention_mass_adds_queries_summed_and_group_averaged_in_place():
    attn = _random_attention(1, 2, 3, 4, 7, 1)
    ref = torch.zeros(1, 2, 7)
    for h in range(2):
        for j in range(7):
            ref[0, h, j] = sum(attn[0, h, gq, qi, j] for gq in range(3) for qi in range(4)) / 3
    total = torch.full((1, 2, 7), 0.5)
    got = scores.add_attention_mass(total, attn)
    assert got is total and torch.allclose(total, ref + 0.5, atol=1e-6)


def test_snapkv_window_votes_then_zero_padded_average_pool_outside_window():
    window, kernel, n = 3, 5, 12
    attn = _random_attention(1, 2, 2, 6, n, 2)
    got = scores.snapkv_scores(attn, window, kernel)
    for h in range(2):
        votes = [sum(attn[0, h, gq, qi, j] for gq in range(2) for qi in range(6 - window, 6)) / 2 for j in range(n)]
        prefix = n - window
        for j in range(n):
            if j < prefix:
                neighbours = [votes[i] if 0 <= i < prefix else 0.0 for i in range(j - kernel // 2, j + kernel // 2 + 1)]
                expected = sum(neighbours) / kernel
            else:
                expected = votes[j]
            assert math.isclose(got[0, h, j].item(), float(expected), rel_tol=1e-5, abs_tol=1e-7)
    # a window longer than the entries: raw votes
    assert torch.allclose(scores.snapkv_scores(attn[..., :2], window=4), attn[..., -4:, :2].sum(3).mean(2))


def test_streaming_prefers_recent_positions():
    pos = torch.tensor([[[0, 3, 9, 20]]])
    assert scores.streaming_scores(pos).argsort(-1).tolist() == [[[0, 1, 2, 3]]]
