"""Head-adaptive budgets (``+adaptive``): the allocation against brute force, real storage, clear refusals.
(The cache against the masked full-cache reference and the unmodified model: tests/test_cache.py, through METHODS.)"""

import itertools

import pytest
import torch

from caote import EvictingCache, EvictionConfig, hf
from caote.head_adaptive import HeadAdaptiveLayer, allocate_across_heads
from conftest import tiny_llama


def _brute_force_allocation(scores, protected, keep, floor):
    """The subset of ``keep`` entries with the largest score sum among those that hold every protected entry and
    at least ``min(floor, open entries)`` open entries of each head."""
    entries = [(h, i) for h, s in enumerate(scores) for i in range(len(s))]
    best, best_sum = None, -float("inf")
    for subset in itertools.combinations(entries, keep):
        chosen = set(subset)
        ok = all((h, i) in chosen for h, p in enumerate(protected) for i in range(len(p)) if p[i])
        for h, p in enumerate(protected):
            open_kept = sum(1 for i in range(len(p)) if not p[i] and (h, i) in chosen)
            ok &= open_kept >= min(floor, int((~p).sum()))
        total = sum(float(scores[h][i]) for h, i in subset)
        if ok and total > best_sum:
            best, best_sum = chosen, total
    return [sorted(i for h2, i in best if h2 == h) for h in range(len(scores))]


@pytest.mark.parametrize("seed", range(8))
def test_allocation_is_the_best_subset_under_the_floor_and_protection(seed):
    gen = torch.Generator().manual_seed(seed)
    lengths = [5, 3, 6]
    scores = [torch.rand(n, generator=gen) ** (3 * h + 1) for h, n in enumerate(lengths)]  # heads of unlike scales
    protected = [torch.rand(n, generator=gen) < 0.2 for n in lengths]
    keep, floor = 7, seed % 3
    forced = sum(int(p.sum()) + min(floor, int((~p).sum())) for p in protected)
    if forced > keep:
        with pytest.raises(ValueError, match="exceed the layer's budget"):
            allocate_across_heads(scores, protected, keep, floor)
        return
    kept = allocate_across_heads(scores, protected, keep, floor)
    assert [k.tolist() for k in kept] == _brute_force_allocation(scores, protected, keep, floor)


def test_allocation_refuses_more_forced_entries_than_the_budget():
    with pytest.raises(ValueError, match="exceed the layer's budget"):
        allocate_across_heads([torch.ones(3), torch.ones(3)], [torch.ones(3, dtype=torch.bool)] * 2, keep=4, floor=0)


def test_heads_hold_different_counts_in_the_bytes_of_the_uniform_cache(tiny_model):
    ids = torch.randint(0, 128, (1, 90), generator=torch.Generator().manual_seed(1))
    budget, block = 16, 8
    caches = {m: EvictingCache(tiny_model, budget=budget, method=m, block_size=block, snapkv_window=4)
              for m in ("snapkv+caote", "snapkv+caote+adaptive")}
    lengths_seen = set()
    with torch.inference_mode():
        for start in range(0, ids.shape[1], block):
            for cache in caches.values():
                hf.forward(tiny_model, ids[:, start : start + block], cache)
            layer = caches["snapkv+caote+adaptive"].layers[0]
            lengths_seen.add(tuple(layer.head_lengths()[0]))
            assert sum(layer.head_lengths()[0]) == min(start + block, budget) * layer.heads
    uniform, adaptive = caches["snapkv+caote"], caches["snapkv+caote+adaptive"]
    assert any(len(set(lengths)) > 1 for lengths in lengths_seen), "every head kept the same count"
    assert isinstance(adaptive.layers[0], HeadAdaptiveLayer)
    # what is stored and what is allocated: the same bytes as the uniform cache (per-head segments, no padding)
    assert adaptive.kv_bytes() == uniform.kv_bytes()
    assert adaptive.peak_kv_bytes() == uniform.peak_kv_bytes()
    for layer in adaptive.layers:
        pool_entries = layer._keys.shape[0] * layer._keys.shape[1]
        assert pool_entries <= layer.heads * (budget + block)
    assert adaptive.allocated_kv_bytes() <= uniform.allocated_kv_bytes()


def test_model_generate_with_adaptive_budget_stays_bounded(tiny_model):
    ids = torch.randint(0, 128, (1, 70), generator=torch.Generator().manual_seed(2))
    cache = EvictingCache(tiny_model, budget=20, method="expected+caote+adaptive", block_size=8)
    out = tiny_model.generate(ids, cache=cache, prefill_chunk_size=8, max_new_tokens=12, do_sample=False,
                              min_new_tokens=12)
    assert out.shape[1] == 70 + 12
    assert cache.peak_stored_tokens <= 20 + 8
    assert all(sum(layer.head_lengths()[0]) == 20 * layer.heads for layer in cache.layers)


@pytest.mark.parametrize("method,message", [
    ("streaming+adaptive", "scores no entry from the attention step"),
    ("caote+joint+adaptive", "not implemented"),
])
def test_compositions_that_cannot_work_are_refused(method, message):
    with pytest.raises(ValueError, match=message):
        EvictionConfig(budget=8, method=method)


@pytest.mark.parametrize("floor", [-0.1, 1.5, "0.2", True])
def test_head_floor_must_be_a_fraction(floor):
    with pytest.raises(ValueError, match="head_floor"):
        EvictionConfig(budget=8, method="snapkv+adaptive", head_floor=floor)


def test_question_aware_with_adaptive_is_refused_clearly():
    model = tiny_llama()
    cache = EvictingCache(model, budget=8, method="snapkv+caote+adaptive")
    with pytest.raises(ValueError, match="question-aware mode with '\\+adaptive' is not implemented"):
        cache.start_block(question=True)


def test_batch_rows_follow_reorder_with_their_own_head_counts(tiny_model):
    """Each row of a batch evicts on its own (different counts per head); reorder_cache then equals fresh caches run
    on the reordered prompts."""
    ids = torch.randint(0, 128, (2, 48), generator=torch.Generator().manual_seed(3))
    options = dict(budget=10, method="snapkv+caote+adaptive", block_size=8, snapkv_window=4)
    order = torch.tensor([1, 0, 1])
    cache = EvictingCache(tiny_model, **options)
    with torch.inference_mode():
        for start in range(0, 32, 8):
            hf.forward(tiny_model, ids[:, start : start + 8], cache)
        cache.reorder_cache(order)
        got = [hf.forward(tiny_model, ids[order, start : start + 8], cache).logits for start in range(32, 48, 8)]
        fresh = EvictingCache(tiny_model, **options)
        want = [hf.forward(tiny_model, ids[order, start : start + 8], fresh).logits for start in range(0, 48, 8)][-2:]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    assert cache.layers[0].head_lengths() == fresh.layers[0].head_lengths()
    assert any(layer.head_lengths()[0] != layer.head_lengths()[1] for layer in cache.layers), "rows evicted alike"
