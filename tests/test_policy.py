"""Configuration errors, and each policy's kept set against a plain loop-by-loop reference."""


import pytest
import torch

from caote import METHODS, EvictingCache, EvictionConfig, hf, parse_method
from caote.methods import PAPER_METHODS, canonical_method
from caote.layers import EvictingLayer


def test_method_names():
    assert parse_method("snapkv+caote") == ("snapkv", "caote")
    assert parse_method("H2O+FastCAOTE") == ("h2o", "fastcaote")
    assert len(PAPER_METHODS) == 12 and set(PAPER_METHODS) <= set(METHODS)
    # compositions resolve to one canonical spelling; every named method resolves
    assert canonical_method("Expected+CAOTE+Out") == "expected+caote+out"
    assert canonical_method("h2o+caote+joint") == "h2o+caote+joint"
    assert all(canonical_method(m) == m for m in METHODS)


@pytest.mark.parametrize(
    "method,match",
    [
        ("snapkv+joint", "'\\+joint' needs"),
        ("tova+out", "'\\+out' measures a CAOTE error"),
        ("caote+caote", "does not apply to 'caote'"),
        ("snapkv+fastcaote+joint", "'\\+joint' needs"),
        ("caote+out+out", "unknown method"),
        ("snapkv+caote+out+joint", "not implemented"),
        ("snapvk", "did you mean 'snapkv'"),
    ],
)
def test_invalid_compositions_name_the_problem(method, match):
    with pytest.raises(ValueError, match=match):
        EvictionConfig(budget=64, method=method)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(budget=0), "budget must be a positive integer"),
        (dict(budget=-5), "budget must be a positive integer"),
        (dict(budget=None, method="caote"), "budget must be a positive integer"),
        (dict(budget=64, block_size=0), "block_size must be a positive integer"),
        (dict(budget=64, method="tova+h2o"), "unknown method 'tova\\+h2o'; valid methods: full, streaming"),
        (dict(budget=64, method="caote+caote"), "valid methods"),
        (dict(budget=8, method="streaming", sink_tokens=10), "smaller than the protected tokens"),
        (dict(budget=8, method="caote", sink_tokens=4, recent_window=5), "smaller than the protected tokens"),
        (dict(budget=8, snapkv_kernel=4, method="snapkv"), "snapkv_kernel"),
    ],
)
def test_bad_configuration_is_a_clear_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EvictionConfig(**kwargs)


def test_method_defaults_follow_the_reference_code():
    assert (EvictionConfig(budget=100, method="streaming").sink_tokens, EvictionConfig(budget=100, method="streaming").recent_window) == (4, 96)
    assert EvictionConfig(budget=100, method="h2o+caote").recent_window == 50
    assert EvictionConfig(budget=100, method="snapkv+fastcaote").recent_window == 32
    assert EvictionConfig(budget=100, method="caote").recent_window == 0
    assert EvictionConfig(budget=100, method="tova").sink_tokens == 0
    assert EvictionConfig(budget=None, method="full").budget is None


def test_cache_rejects_bad_input_before_running(tiny_model):
    with pytest.raises(ValueError, match="unknown method"):
        EvictingCache(tiny_model, budget=16, method="quest")
    with pytest.raises(ValueError, match="budget"):
        EvictingCache(tiny_model, budget=0)


# ------------------------------------------------------------------ plain references, one loop at a time
def _plain_scores(method, attn, values, positions, mass, window=4, kernel=3):
    """Scores for one KV head from scratch. attn: [g][q][n] lists; values: [n][d]; returns [n]."""
    G, Q, N = len(attn), len(attn[0]), len(values)
    D = len(values[0])
    base, _, fix = method.partition("+")

    def output(weights):
        return [sum(weights[i] * values[i][c] for i in range(N)) for c in range(D)]

    def without(weights, j):  # renormalised output with entry j evicted (brute force)
        rest = sum(weights[i] for i in range(N) if i != j)
        return [sum(weights[i] * values[i][c] for i in range(N) if i != j) / rest for c in range(D)]

    def dist(x, y):
        return sum((a - b) ** 2 for a, b in zip(x, y))

    if base == "streaming":
        return [float(p) for p in positions]
    if base == "caote":
        return [sum(dist(output(attn[g][q]), without(attn[g][q], j)) for g in range(G) for q in range(Q)) ** 0.5
                for j in range(N)]
    if base == "tova":
        h = [sum(attn[g][Q - 1][j] for g in range(G)) / G for j in range(N)]
    elif base == "h2o":
        h = list(mass)
    else:  # snapkv
        votes = [sum(attn[g][q][j] for g in range(G) for q in range(max(Q - window, 0), Q)) / G for j in range(N)]
        prefix = N - window
        h = [sum(votes[i] for i in range(j - kernel // 2, j + kernel // 2 + 1) if 0 <= i < prefix) / kernel
             if j < prefix else votes[j] for j in range(N)]
    if not fix:
        return h
    total = sum(h)
    w = [x / total for x in h]
    if fix == "caote":
        return [dist(output(w), without(w, j)) ** 0.5 for j in range(N)]
    mean = [sum(values[i][c] for i in range(N)) / N for c in range(D)]
    return [w[j] / (1 - w[j]) * dist(mean, values[j]) ** 0.5 for j in range(N)]


@pytest.mark.parametrize("method", [m for m in PAPER_METHODS if m != "full"])
def test_kept_set_equals_plain_reference(method):
    budget, n_old, n_new, G, D, H = 7, 6, 5, 2, 3, 2
    config = EvictionConfig(budget=budget, method=method, block_size=n_new, snapkv_window=4, snapkv_kernel=3,
                            sink_tokens=1 if method == "streaming" else None,
                            recent_window=2 if method.startswith("h2o") else None)
    layer = EvictingLayer(config)
    g = torch.Generator().manual_seed(7)
    # first step: n_old entries, no eviction (budget not reached) but H2O accumulates
    for n in (n_old, n_new):
        kv = torch.randn(1, H, n, D, generator=g)
        layer.update(kv, kv.clone())
        hf._take_pending(layer.keys)
        N = layer.stored
        attn = torch.softmax(torch.randn(1, H, G, n, N, generator=g) * 2, -1)
        values = layer.values.float().clone()  # a view of the buffer that eviction compacts
        outputs = attn @ values[:, :, None]
        if n == n_old:
            mass_before = attn.sum(3).mean(2)
            layer.after_attention(attn, values, outputs)
            continue
        positions_before = layer.positions.clone()
        layer.after_attention(attn, values, outputs)
    for h in range(H):
        mass = torch.cat([mass_before[0, h], torch.zeros(n_new)]) + attn[0, h].sum(1).mean(0)
        s = _plain_scores(method, attn[0, h].tolist(), values[0, h].tolist(), positions_before[0, h].tolist(),
                          mass.tolist(), window=4, kernel=3)
        pos = positions_before[0, h].tolist()
        seen = n_old + n_new
        protected = [p < config.sink_tokens or p >= seen - config.recent_window for p in pos]
        order = sorted(range(len(pos)), key=lambda j: (not protected[j], -s[j]))
        expected = sorted(pos[j] for j in order[:budget])
        assert layer.positions[0, h].tolist() == expected, (method, h)


@pytest.mark.parametrize("slack", [-1, 1.5, True, "4"])
def test_bad_slack_is_refused_by_name(slack):
    with pytest.raises(ValueError, match="slack must be an integer >= 0"):
        EvictionConfig(budget=8, method="caote", slack=slack)


def test_slack_widens_the_bound_by_exactly_itself():
    config = EvictionConfig(budget=8, method="caote", block_size=4, slack=3)
    assert config.steady_entries() == 8 + 3 + 4 and config.steady_entries(10) == 8 + 3 + 10
    assert not config.must_evict(11) and config.must_evict(12)
    assert EvictionConfig(budget=None, method="full", block_size=4, slack=3).steady_entries(2) == 4  # grows, no slack
