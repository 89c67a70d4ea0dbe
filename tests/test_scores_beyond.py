"""The scores beyond the paper (method.md §6), each checked as a fact against brute force: evict the entry or the
set, recompute attention (and the residual-stream write through o_proj), compare."""

import itertools
import math
import os
import re

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import example, given, settings

from caote import EvictionConfig, scores
from caote.methods import StepView

SETTINGS = settings(max_examples=int(os.environ.get("CAOTE_HYPOTHESIS_EXAMPLES", 40)), deadline=None)


def _attention(q, k, v, alive=None):
    """float64 attention of queries q (R, D) over k/v (N, D); ``alive`` (N,) bool drops entries."""
    logits = q @ k.T / math.sqrt(q.shape[-1])
    if alive is not None:
        logits = logits.masked_fill(~alive, float("-inf"))
    w = torch.softmax(logits, -1)
    return w, w @ v


# ------------------------------------------------------------------------------------------ output space (+out)
@SETTINGS
@given(n=st.integers(3, 16), d=st.integers(2, 8), group=st.integers(1, 3), q_len=st.integers(1, 4),
       seed=st.integers(0, 10_000))
def test_output_space_error_equals_residual_change_through_o_proj(n, d, group, q_len, seed):
    """``a/(1−a)·‖W_o,g (X − v_j)‖`` per query head, root-sum-square over heads and queries = the norm of each head's
    write to the residual stream changing when j is evicted (brute force: recompute attention, project by W_o,g)."""
    g = torch.Generator().manual_seed(seed)
    d_model = 3 * d + 1
    w_o = torch.randn(d_model, group * d, generator=g, dtype=torch.float64)
    qs = torch.randn(group, q_len, d, generator=g, dtype=torch.float64) * 1.5
    k = torch.randn(n, d, generator=g, dtype=torch.float64) * 1.5
    v = torch.randn(n, d, generator=g, dtype=torch.float64)
    ws, outs = zip(*(_attention(qs[h], k, v) for h in range(group)))
    ws, outs = torch.stack(ws), torch.stack(outs)
    per_head, _ = scores.output_space_factors(w_o.float(), 1, d)
    got = scores.row_error_scores(ws.float()[None, None], v.float()[None, None], outs.float()[None, None],
                                  per_head).view(n)
    for j in range(n):
        if (1 - ws.float()[..., j] < scores.EPS).any():
            assert got[j] == float("inf")
            continue
        alive = torch.arange(n) != j
        total = 0.0
        for h in range(group):
            _, without = _attention(qs[h], k, v, alive)
            slice_h = w_o[:, h * d : (h + 1) * d]
            total += ((outs[h] - without) @ slice_h.T).square().sum().item()
        assert math.isclose(got[j].item(), math.sqrt(total), rel_tol=5e-3, abs_tol=5e-5), (j, got[j], total)


@SETTINGS
@given(n=st.integers(3, 16), d=st.integers(2, 8), group=st.integers(1, 3), seed=st.integers(0, 10_000))
def test_output_space_meta_error_uses_the_groups_summed_slice(n, d, group, seed):
    """``+caote+out``: ĥ is shared by the group, so the residual change is ``Σ_g W_o,g ΔX̂`` = ``(Σ_g W_o,g) ΔX̂``."""
    g = torch.Generator().manual_seed(seed)
    w_o = torch.randn(2 * d + 3, group * d, generator=g, dtype=torch.float64)
    base = torch.rand(n, generator=g, dtype=torch.float64) + 0.05
    v = torch.randn(n, d, generator=g, dtype=torch.float64)
    h = base / base.sum()
    estimate = h @ v
    _, per_group = scores.output_space_factors(w_o.float(), 1, d)
    rows = h.float().view(1, 1, 1, 1, n)
    got = scores.row_error_scores(rows, v.float()[None, None], (rows @ v.float()[None, None, None]), per_group).view(n)
    summed = sum(w_o[:, i * d : (i + 1) * d] for i in range(group))
    for j in range(n):
        keep = torch.arange(n) != j
        renorm = h[keep] / h[keep].sum()
        expected = (summed @ (estimate - renorm @ v[keep])).norm().item()
        assert math.isclose(got[j].item(), expected, rel_tol=5e-3, abs_tol=5e-5)


# -------------------------------------------------------------------------------------------- joint eviction
@SETTINGS
@given(n=st.integers(3, 12), d=st.integers(1, 6), n_rows=st.integers(1, 4), seed=st.integers(0, 10_000),
       size=st.integers(1, 4))
@example(n=3, d=1, n_rows=4, seed=10000, size=2)  # the set holds almost all of a row's mass (cancellation)
def test_joint_error_equals_removing_the_set_by_brute_force(n, d, n_rows, seed, size):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n_rows, d, generator=g, dtype=torch.float64) * 2
    k = torch.randn(n, d, generator=g, dtype=torch.float64) * 2
    v = torch.randn(n, d, generator=g, dtype=torch.float64)
    w, out = _attention(q, k, v)
    evicted = torch.zeros(n, dtype=torch.bool)
    evicted[torch.randperm(n, generator=g)[: min(size, n - 1)]] = True
    got = scores.joint_eviction_error(w[None, None], v[None, None], evicted[None, None]).item()
    _, without = _attention(q, k, v, ~evicted)
    expected = (out - without).norm().item()
    assert math.isclose(got, expected, rel_tol=1e-6, abs_tol=1e-9)
    # for a single entry it is the paper's single-token error (method.md §2)
    if evicted.sum() == 1:
        single = scores.caote_scores(w[None, None, None], v[None, None], out[None, None, None]).view(n)
        if (1 - w[:, evicted] < scores.EPS).any():  # float32 cannot resolve it: scored infinite (decisions 4)
            assert single[evicted].item() == float("inf")
        else:
            assert math.isclose(single[evicted].item(), expected, rel_tol=1e-4, abs_tol=1e-7)


def _brute_greedy(q, k, v, n_evict, candidates):
    removed: list[int] = []
    _, out = _attention(q, k, v)
    for _ in range(n_evict):
        best, best_err = None, math.inf
        for j in range(k.shape[0]):
            if j in removed or not candidates[j]:
                continue
            alive = torch.ones(k.shape[0], dtype=torch.bool)
            alive[removed + [j]] = False
            _, without = _attention(q, k, v, alive)
            err = (out - without).square().sum().item()
            if err < best_err:
                best, best_err = j, err
        removed.append(best)
    return removed


@SETTINGS
@given(n=st.integers(4, 12), d=st.integers(1, 6), n_rows=st.integers(1, 4), seed=st.integers(0, 10_000),
       n_evict=st.integers(1, 4))
def test_greedy_joint_eviction_equals_brute_force_greedy(n, d, n_rows, seed, n_evict):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n_rows, d, generator=g, dtype=torch.float64) * 1.5
    k = torch.randn(n, d, generator=g, dtype=torch.float64) * 1.5
    v = torch.randn(n, d, generator=g, dtype=torch.float64)
    candidates = torch.ones(n, dtype=torch.bool)
    candidates[0] = False  # a protected entry is never chosen
    n_evict = min(n_evict, n - 2)
    w, _ = _attention(q, k, v)
    got = scores.greedy_joint_eviction(w[None, None].float(), v[None, None].float(), n_evict, candidates[None, None])
    expected = _brute_greedy(q, k, v, n_evict, candidates)
    # compare the joint error reached after each pick (robust to exact ties)
    for t in range(1, n_evict + 1):
        sets = []
        for chosen in (got[0, 0, :t].tolist(), expected[:t]):
            mask = torch.zeros(n, dtype=torch.bool)
            mask[chosen] = True
            sets.append(scores.joint_eviction_error(w[None, None], v[None, None], mask[None, None]).item())
        assert math.isclose(sets[0], sets[1], rel_tol=1e-4, abs_tol=1e-7), (t, got, expected, sets)
    assert 0 not in got.flatten().tolist()


def test_joint_selection_beats_ranking_single_errors_when_errors_cancel():
    """Two entries whose value deviations cancel: removing both changes the output less than either alone, and
    greedy joint selection (round 1) finds a set whose joint error is no larger than the myopic set's."""
    v = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 3.0], [0.0, -0.2], [0.2, 0.1]], dtype=torch.float64)
    logits = torch.tensor([[2.0, 2.0, 0.0, 0.3, 1.0]], dtype=torch.float64)
    w = torch.softmax(logits, -1)
    out = w @ v
    single = scores.caote_scores(w[None, None, None], v[None, None], out[None, None, None]).view(-1)
    myopic = torch.zeros(5, dtype=torch.bool)
    myopic[single.topk(2, largest=False).indices] = True
    joint = torch.zeros(5, dtype=torch.bool)
    joint[scores.greedy_joint_eviction(w[None, None], v[None, None], 2, torch.ones(1, 1, 5, dtype=torch.bool))[0, 0]] = True
    err = lambda m: scores.joint_eviction_error(w[None, None], v[None, None], m[None, None]).item()  # noqa: E731
    assert err(joint) <= err(myopic) + 1e-12
    all_pairs = [err(torch.tensor([i in p for i in range(5)])) for p in itertools.combinations(range(5), 2)]
    assert err(joint) <= sorted(all_pairs)[1] + 1e-12  # greedy is at worst second best of the 10 pairs here


# ------------------------------------------------------------------------------------------ expected attention
def _rope_matrix(delta: float, inv_freq: torch.Tensor) -> torch.Tensor:
    """Explicit D×D RoPE rotation by ``delta`` positions, rotate_half layout (pair i with i + D/2)."""
    half = inv_freq.numel()
    m = torch.zeros(2 * half, 2 * half, dtype=torch.float64)
    for i, f in enumerate(inv_freq.tolist()):
        c, s = math.cos(delta * f), math.sin(delta * f)
        m[i, i], m[i, i + half], m[i + half, i], m[i + half, i + half] = c, -s, s, c
    return m


def test_rotate_matches_transformers_rope_at_the_advanced_position(tiny_model):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from caote import hf

    inv_freq = hf.rope_inv_freq(tiny_model)
    rotary = tiny_model.model.rotary_emb
    dim = 2 * inv_freq.numel()
    pre = torch.randn(1, 1, 3, dim)
    pos = torch.tensor([[5, 17, 40]])
    cos, sin = rotary(pre, pos)
    at_pos, _ = apply_rotary_pos_emb(pre, pre, cos, sin)
    cos2, sin2 = rotary(pre, pos + 11)
    later, _ = apply_rotary_pos_emb(pre, pre, cos2, sin2)
    torch.testing.assert_close(scores.rotate(at_pos, torch.full((3,), 11), inv_freq), later, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("covariance", [False, True])
def test_expected_attention_equals_explicit_rotation_matrices(covariance):
    g = torch.Generator().manual_seed(3)
    d, n, q_len, future = 8, 11, 5, 7
    inv_freq = 1.0 / (100.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    pre = torch.randn(q_len, d, generator=g, dtype=torch.float64)
    positions = torch.arange(20, 20 + q_len)
    queries = torch.stack([_rope_matrix(float(p), inv_freq) @ pre[i] for i, p in enumerate(positions)])
    keys = torch.randn(n, d, generator=g, dtype=torch.float64)
    now, scale = int(positions[-1]), 1 / math.sqrt(d)
    got = scores.expected_attention_weights(queries.float()[None, None, None], positions, keys.float()[None, None],
                                            now, inv_freq.float(), scale, future, covariance).view(n)
    # brute force: pre-RoPE statistics, explicit average of the rotations to now + 1 .. now + future
    mean_rot = sum(_rope_matrix(float(now + t), inv_freq) for t in range(1, future + 1)) / future
    mu = mean_rot @ pre.mean(0)
    logits = scale * keys @ mu
    if covariance:
        sigma = mean_rot @ torch.cov(pre.T) @ mean_rot.T
        logits = logits + 0.5 * scale**2 * torch.einsum("nd,de,ne->n", keys, sigma, keys)
    torch.testing.assert_close(got.double(), torch.softmax(logits, 0), atol=2e-6, rtol=1e-4)


def test_gaussian_moment_behind_the_expected_logits():
    """``E[exp(s q·k)] = exp(s μ·k + s² kᵀΣk/2)`` for ``q ~ N(μ, Σ)`` (Monte Carlo, 400k draws)."""
    g = torch.Generator().manual_seed(0)
    d, s = 4, 0.5
    mu = torch.randn(d, generator=g, dtype=torch.float64)
    a = torch.randn(d, d, generator=g, dtype=torch.float64) * 0.5
    sigma = a @ a.T
    k = torch.randn(d, generator=g, dtype=torch.float64)
    draws = mu + torch.randn(400_000, d, generator=g, dtype=torch.float64) @ a.T
    mc = torch.exp(s * draws @ k).mean().item()
    closed = math.exp(s * (mu @ k).item() + 0.5 * s**2 * (k @ sigma @ k).item())
    assert math.isclose(mc, closed, rel_tol=0.02)


# ------------------------------------------------------------------------------------------------------ DropKV
def test_dropkv_is_the_window_sum_of_squared_caote_errors_pooled():
    g = torch.Generator().manual_seed(1)
    group, rows, n, d, window, kernel = 2, 4, 13, 3, 4, 3
    w = torch.softmax(torch.randn(1, 1, group, rows, n, generator=g) * 2, -1)
    v = torch.randn(1, 1, n, d, generator=g)
    out = w @ v[:, :, None]
    cfg = EvictionConfig(budget=6, method="dropkv", snapkv_window=window, snapkv_kernel=kernel)
    view = StepView(config=cfg, values=v, positions=torch.arange(n).view(1, 1, n), seen=n, weights=w, outputs=out)
    got = cfg.spec.score(view).view(n)
    raw = []
    for j in range(n):
        total = 0.0
        for h in range(group):
            for i in range(rows):
                a = w[0, 0, h, i, j].item()
                total += (a / (1 - a)) ** 2 * (v[0, 0, j] - out[0, 0, h, i]).square().sum().item()
        raw.append(total / group)
    prefix = n - window
    expected = [sum(raw[i] for i in range(j - kernel // 2, j + kernel // 2 + 1) if 0 <= i < prefix) / kernel
                if j < prefix else raw[j] for j in range(n)]
    torch.testing.assert_close(got, torch.tensor(expected), atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------------------- +chunks
@pytest.mark.parametrize("seed", range(6))
def test_chunk_eviction_is_the_lowest_summed_whole_chunks(seed):
    """Against brute force: every set of k evictable whole chunks, the one with the smallest summed score."""
    gen = torch.Generator().manual_seed(seed)
    chunk, seen = 3, 31  # the newest chunk (30..) is incomplete
    kept_chunks = sorted(torch.randperm(10, generator=gen)[:6].tolist())
    positions = torch.tensor([c * chunk + i for c in kept_chunks for i in range(chunk)] + [30])
    entry = torch.rand(len(positions), generator=gen)
    protected = positions < 2 if seed % 2 else torch.zeros(len(positions), dtype=torch.bool)
    n_evict = 4  # rounds up to 2 chunks
    got = scores.chunk_eviction(entry.view(1, 1, -1), positions.view(1, 1, -1), protected.view(1, 1, -1), n_evict, chunk,
                         seen)[0, 0].tolist()
    chunks = positions // chunk
    eligible = [c for c in kept_chunks if not protected[chunks == c].any()]
    best = min(itertools.combinations(eligible, 2), key=lambda s: sum(float(entry[chunks == c].sum()) for c in s))
    assert got == [i for i in range(len(positions)) if int(chunks[i]) in best]


def test_chunk_eviction_refuses_when_protection_covers_the_chunks():
    positions = torch.arange(8).view(1, 1, -1)
    with pytest.raises(ValueError, match="cover too many chunks"):
        scores.chunk_eviction(torch.rand(1, 1, 8), positions, torch.ones(1, 1, 8, dtype=torch.bool), 2, 2, 8)


@pytest.mark.parametrize("method,options,message", [
    ("caote+joint+chunks", {}, "does not combine"),
    ("snapkv+adaptive+chunks", {}, "does not combine"),
    ("snapkv+caote+chunks", {"budget": 40}, "too small for '+chunks' of 16"),
])
def test_chunk_compositions_are_checked(method, options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        EvictionConfig(**({"budget": 256} | options), method=method)
