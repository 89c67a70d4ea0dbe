"""``streaming`` as a ring buffer (caote.ring, issue 13): exact against the masked full-cache reference, bounded,
one slot written per decode step; the kinds it hands over to the generic layer or refuses."""

import pytest
import torch
from transformers import DynamicCache

from caote import EvictingCache, EvictionConfig, hf
from caote.layers import EvictingLayer
from caote.generation import prefill
from caote.ring import RingLayer
from reference import masked_reference
from test_cache import _run, _steps


@pytest.mark.parametrize("budget,block,sinks", [(12, 5, 2), (9, 16, 2), (6, 3, 4), (7, 1, 0), (16, 4, None)])
def test_ring_matches_masked_full_cache_reference_through_many_wraps(tiny_model, budget, block, sinks):
    config = EvictionConfig(budget=budget, method="streaming", block_size=block, sink_tokens=sinks)
    steps = _steps(prompt_len=41, block=block, decode=30, seed=budget)  # 71 tokens: the ring wraps many times
    with masked_reference(tiny_model, config) as ref:
        expected = []
        for step in steps:
            with torch.inference_mode():
                expected.append((hf.forward(tiny_model, step, ref.cache).logits, ref.kept_positions(0),
                                 ref.kept_positions(1)))
    cache = EvictingCache(tiny_model, config=config)
    assert all(isinstance(layer, RingLayer) for layer in cache.layers)
    seen = 0
    for step, (logits_ref, *kept) in zip(steps, expected):
        with torch.inference_mode():
            logits = hf.forward(tiny_model, step, cache).logits
        seen += step.shape[1]
        torch.testing.assert_close(logits, logits_ref, atol=1e-5, rtol=1e-5)
        for layer, layer_kept in zip(cache.layers, kept):
            assert [[layer.head_positions(0, h).tolist() for h in range(2)]] == layer_kept
            assert layer.stored == min(seen, budget) and layer.seen == seen
            assert layer.peak_stored <= budget + block and layer.capacity <= budget + block
    assert cache.evicted_tokens == 2 * (seen - budget)


def test_budget_at_least_sequence_reproduces_the_plain_model(tiny_model):
    steps = _steps(prompt_len=37, block=8, decode=6)
    tiny_model.set_attn_implementation("sdpa")
    expected = torch.cat(_run(tiny_model, DynamicCache(), steps), dim=1)
    cache = EvictingCache(tiny_model, budget=43, method="streaming", block_size=8)
    got = torch.cat(_run(tiny_model, cache, steps), dim=1)
    assert cache.evicted_tokens == 0
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_whole_prompt_in_one_forward_grows_then_shrinks_back_exactly(tiny_model):
    ids = torch.randint(0, 128, (1, 50), generator=torch.Generator().manual_seed(1))
    config = EvictionConfig(budget=16, method="streaming", block_size=4)
    with masked_reference(tiny_model, config) as ref, torch.inference_mode():
        expected = hf.forward(tiny_model, ids, ref.cache).logits
        kept = ref.kept_positions(0)
    cache = EvictingCache(tiny_model, config=config)
    with torch.inference_mode():
        got = hf.forward(tiny_model, ids, cache).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert [[cache.layers[0].head_positions(0, h).tolist() for h in range(2)]] == kept
    assert cache.stored_tokens == 16 and all(layer.capacity == 20 for layer in cache.layers)


def test_a_decode_step_writes_one_slot_in_place(tiny_model):
    cache = EvictingCache(tiny_model, budget=12, method="streaming", block_size=4)
    prefill(tiny_model, torch.randint(0, 128, (1, 50)), cache)
    for _ in range(20):  # across the wrap-around of the ring
        layer = cache.layers[0]
        pointers = (layer._keys.data_ptr(), layer._values.data_ptr(), layer._positions.data_ptr())
        before = (layer._keys.clone(), layer._values.clone())
        with torch.inference_mode():
            hf.forward(tiny_model, torch.randint(0, 128, (1, 1)), cache)
        assert (layer._keys.data_ptr(), layer._values.data_ptr(), layer._positions.data_ptr()) == pointers
        for buffer, old in zip((layer._keys, layer._values), before):
            changed = (buffer != old).any(-1).any(1)[0]  # slots that differ, any head or dimension
            assert int(changed.sum()) == 1


def test_layer_kinds_for_streaming():
    config = EvictionConfig(budget=16, method="streaming", block_size=4)
    assert isinstance(EvictingCache(config=config)._new_layer(), RingLayer)
    chunks = EvictingCache(budget=32, method="streaming+chunks", block_size=4, chunk_size=4, recent_window=8)
    assert type(chunks._new_layer()) is EvictingLayer
    assert type(EvictingCache(budget=16, method="tova")._new_layer()) is EvictingLayer


def test_padded_batch_uses_the_generic_layer_and_late_padding_is_refused(tiny_model):
    ids = torch.randint(0, 120, (2, 20), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    cache = EvictingCache(tiny_model, budget=8, method="streaming", block_size=4)
    with torch.inference_mode():
        hf.forward(tiny_model, ids[:, :4], cache, attention_mask=mask[:, :4],
                   position_ids=(mask.cumsum(-1) - 1).clamp_min(0)[:, :4])
    assert all(type(layer) is EvictingLayer for layer in cache.layers)
    late = EvictingCache(tiny_model, budget=8, method="streaming", block_size=4)
    with torch.inference_mode():
        hf.forward(tiny_model, ids[:, :4], late)
        with pytest.raises(ValueError, match="padded batch after the streaming ring buffer stored entries"):
            hf.forward(tiny_model, ids[:, 4:8], late, attention_mask=torch.cat([mask[:, 5:9], mask[:, :4]], -1))


def test_question_aware_mode_uses_the_generic_layer_before_the_first_block(tiny_model):
    cache = EvictingCache(tiny_model, budget=8, method="streaming", block_size=4)
    cache.start_block(True)
    assert all(type(layer) is EvictingLayer for layer in cache.layers)
    started = EvictingCache(tiny_model, budget=8, method="streaming", block_size=4)
    prefill(tiny_model, torch.randint(0, 128, (1, 10)), started)
    with pytest.raises(ValueError, match="question-aware mode after the streaming ring buffer"):
        started.start_block(True)


def _generic(model, **options) -> EvictingCache:
    cache = EvictingCache(model, **options)
    cache.use_generic_layers("the test's comparison")
    return cache


def test_beam_search_matches_the_generic_layer(tiny_model):
    ids = torch.randint(0, 128, (1, 30), generator=torch.Generator().manual_seed(4))
    options = dict(budget=10, method="streaming", block_size=4)
    kwargs = dict(attention_mask=torch.ones_like(ids), prefill_chunk_size=4, max_new_tokens=12, num_beams=3,
                  num_return_sequences=2, do_sample=False)
    ring = tiny_model.generate(ids, cache=EvictingCache(tiny_model, **options), **kwargs)
    generic = tiny_model.generate(ids, cache=_generic(tiny_model, **options), **kwargs)
    assert ring.tolist() == generic.tolist()


def test_stop_evicting_keeps_everything_from_then_on(tiny_model):
    steps = _steps(prompt_len=30, block=4, decode=12, seed=6)
    ring, generic = (EvictingCache(tiny_model, budget=8, method="streaming", block_size=4),
                     _generic(tiny_model, budget=8, method="streaming", block_size=4))
    for cache in (ring, generic):
        _run(tiny_model, cache, steps[:8])
        cache.stop_evicting()
    for got, expected in zip(_run(tiny_model, ring, steps[8:]), _run(tiny_model, generic, steps[8:])):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert ring.stored_tokens == generic.stored_tokens == 8 + 12


def test_crop_is_exact_before_eviction_and_refused_after(tiny_model):
    steps = _steps(prompt_len=12, block=4, decode=3, seed=7)
    cache = EvictingCache(tiny_model, budget=32, method="streaming", block_size=4)
    _run(tiny_model, cache, steps)
    cache.crop(-3)
    plain = EvictingCache(tiny_model, budget=32, method="streaming", block_size=4)
    _run(tiny_model, plain, steps[:3])
    following = torch.randint(0, 128, (1, 2))
    torch.testing.assert_close(_run(tiny_model, cache, [following])[0], _run(tiny_model, plain, [following])[0],
                               atol=1e-5, rtol=1e-5)
    evicted = EvictingCache(tiny_model, budget=8, method="streaming", block_size=4)
    _run(tiny_model, evicted, steps)
    with pytest.raises(ValueError, match="after eviction"):
        evicted.crop(-1)
