"""The evicting cache against the unmodified model and against a full cache that masks evicted entries."""

import pytest
import torch
from transformers import DynamicCache

from caote import METHODS, EvictingCache, EvictionConfig, hf
from caote.layers import EvictingLayer
from caote.generation import prefill
from conftest import tiny_llama
from reference import masked_reference

EVICTING = [m for m in METHODS if m != "full"]


def _steps(prompt_len, block, decode, seed=0):
    """Token blocks: the prompt in ``block``-sized chunks, then ``decode`` single tokens (teacher forced)."""
    ids = torch.randint(0, 128, (1, prompt_len + decode), generator=torch.Generator().manual_seed(seed))
    blocks = [ids[:, s : min(s + block, prompt_len)] for s in range(0, prompt_len, block)]
    return blocks + [ids[:, prompt_len + i : prompt_len + i + 1] for i in range(decode)]


def _run(model, cache, steps):
    with torch.inference_mode():
        return [hf.forward(model, step, cache).logits for step in steps]


@pytest.mark.parametrize("method", METHODS)
def test_budget_at_least_sequence_reproduces_unmodified_model(tiny_model, method):
    steps = _steps(prompt_len=37, block=8, decode=6)
    total = sum(s.shape[1] for s in steps)
    tiny_model.set_attn_implementation("sdpa")
    expected = torch.cat(_run(tiny_model, DynamicCache(), steps), dim=1)
    chunks = {"chunk_size": 4} if "+chunks" in method else {}  # 16-position chunks need a budget of 64 with snapkv
    cache = EvictingCache(tiny_model, budget=total if method != "full" else None, method=method, block_size=8, **chunks)
    got = torch.cat(_run(tiny_model, cache, steps), dim=1)
    assert cache.evicted_tokens == 0
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", EVICTING)
@pytest.mark.parametrize("budget,block", [(12, 5), (9, 16)])
def test_evicting_cache_matches_masked_full_cache_reference(tiny_model, method, budget, block):
    sinks = 2 if method in ("streaming", "tova+caote") else None
    config = EvictionConfig(budget=budget, method=method, block_size=block, sink_tokens=sinks,
                            recent_window=3 if method.startswith("h2o") else None, snapkv_window=4, chunk_size=2)
    steps = _steps(prompt_len=41, block=block, decode=7, seed=budget)
    with masked_reference(tiny_model, config) as ref:
        expected = []
        for step in steps:
            with torch.inference_mode():
                logits = hf.forward(tiny_model, step, ref.cache).logits
            expected.append((logits, ref.kept_positions(0), ref.kept_positions(1)))
    cache = EvictingCache(tiny_model, config=config)
    seen = 0
    for step, (logits_ref, kept0, kept1) in zip(steps, expected):
        with torch.inference_mode():
            logits = hf.forward(tiny_model, step, cache).logits
        seen += step.shape[1]
        torch.testing.assert_close(logits, logits_ref, atol=1e-5, rtol=1e-5)
        for layer, kept in zip(cache.layers, (kept0, kept1)):
            heads = [layer.head_positions(0, h) for h in range(len(kept[0]))]
            assert [[p.tolist() for p in heads]] == kept
            # invariants: bounded (per head, or per layer for +adaptive), positions strictly increasing and right
            if config.spec.adaptive:
                assert sum(len(p) for p in heads) == min(seen, budget) * len(heads)
            elif config.spec.chunked:  # whole chunks go: between budget − chunk + 1 and budget entries
                assert all(len(p) == layer.stored for p in heads)
                assert min(seen, budget - config.chunk_size + 1) <= layer.stored <= min(seen, budget)
            else:
                assert all(len(p) == min(seen, budget) for p in heads)
            if not config.spec.chunked:
                assert layer.stored == min(seen, budget)
            assert layer.peak_stored <= budget + block
            assert all((p.diff() > 0).all() and int(p.max()) < seen for p in heads)
            assert layer.seen == seen


@pytest.mark.parametrize("method", ["caote", "h2o", "snapkv+caote", "expected+caote", "streaming", "caote+adaptive"])
def test_slack_evicts_only_above_budget_plus_slack_and_matches_the_masked_reference(tiny_model, method):
    """``slack``: a layer holds up to ``budget + slack`` entries and then evicts back to ``budget`` (decode steps in
    between score nothing), exactly as the masked reference does; the bound is ``budget + slack + block``."""
    budget, slack, block = 10, 3, 6
    config = EvictionConfig(budget=budget, method=method, block_size=block, slack=slack,
                            sink_tokens=2 if method == "streaming" else None,
                            recent_window=3 if method == "h2o" else None)
    steps = _steps(prompt_len=23, block=block, decode=12, seed=5)
    with masked_reference(tiny_model, config) as ref:
        expected = []
        for step in steps:
            with torch.inference_mode():
                expected.append((hf.forward(tiny_model, step, ref.cache).logits, ref.kept_positions(0)))
    cache = EvictingCache(tiny_model, config=config)
    held = scored = 0
    fed: list[bool] = []  # per step: whether layer 0's attention handed over the scoring inputs
    if not config.spec.adaptive:  # (the per-head layer runs its own attention)
        after_attention = cache.layers[0].after_attention

        def recording(weights, values, outputs, **kwargs):
            fed.append(weights is not None or kwargs.get("queries") is not None)
            return after_attention(weights, values, outputs, **kwargs)

        cache.layers[0].after_attention = recording
    evicting_steps = []
    for step, (logits_ref, kept0) in zip(steps, expected):
        with torch.inference_mode():
            logits = hf.forward(tiny_model, step, cache).logits
        held += step.shape[1]
        evicts = held > budget + slack
        held = budget if evicts else held
        scored += evicts
        evicting_steps.append(evicts)
        torch.testing.assert_close(logits, logits_ref, atol=1e-5, rtol=1e-5)
        layer = cache.layers[0]
        heads = [layer.head_positions(0, h).tolist() for h in range(len(kept0[0]))]
        assert [heads] == kept0
        assert sum(map(len, heads)) == held * len(heads)
        assert layer.stored == held and layer.peak_stored <= budget + slack + block
    assert scored >= 5  # the prompt's blocks and several decode steps evicted
    assert cache.layers[0].evicted == sum(s.shape[1] for s in steps) - held
    if fed and method != "streaming":  # scoring inputs exactly at the evicting steps (every step for H2O)
        assert fed == ([True] * len(steps) if config.accumulates_attention else evicting_steps)


@pytest.mark.parametrize("method", ["snapkv+fastcaote", "streaming"])  # the generic layer and the ring buffer
def test_peak_storage_is_bounded_for_any_prompt_length(tiny_model, method):
    for length in (1, 64, 257, 700):
        cache = EvictingCache(tiny_model, budget=32, method=method, block_size=16)
        prefill(tiny_model, torch.randint(0, 128, (1, length)), cache)
        assert cache.peak_stored_tokens == min(length, 32 + 16)
        assert cache.stored_tokens == min(length, 32)
        assert all(layer.capacity <= 48 for layer in cache.layers)
        assert cache.peak_kv_bytes() <= 48 * cache.layers[0].entry_bytes() * len(cache.layers)
        assert cache.allocated_kv_bytes() <= 48 * cache.layers[0].entry_bytes() * len(cache.layers)


def test_whole_prompt_in_one_forward_grows_then_shrinks_back(tiny_model):
    cache = EvictingCache(tiny_model, budget=16, method="caote", block_size=4)
    with torch.inference_mode():
        hf.forward(tiny_model, torch.randint(0, 128, (1, 50)), cache)
    assert cache.stored_tokens == 16 and all(layer.capacity == 20 for layer in cache.layers)


def test_decode_eviction_moves_only_entries_after_the_evicted_one():
    layer = EvictingLayer(EvictionConfig(budget=6, method="tova"))
    keys = torch.arange(7.0).view(1, 1, 7, 1).expand(1, 2, 7, 3).contiguous()
    layer.update(keys, keys.clone())
    hf._take_pending(layer.keys)
    buffer, before = layer._keys, layer._keys.clone()
    scores = torch.tensor([[[5.0, 6, 7, 8, 1, 9, 9], [5.0, 6, 7, 8, 9, 1, 9]]])  # head 0 drops slot 4, head 1 slot 5
    layer.evict(layer.config.spec.choose_evicted(None, scores, None, 1))
    assert layer._keys is buffer  # in place, no reallocation
    assert torch.equal(buffer[:, :, :4], before[:, :, :4])  # slots before the first dropped one untouched
    assert layer.positions.tolist() == [[[0, 1, 2, 3, 5, 6], [0, 1, 2, 3, 4, 6]]]
    assert layer.keys[0, 0, :, 0].tolist() == [0, 1, 2, 3, 5, 6]
    assert layer.keys[0, 1, :, 0].tolist() == [0, 1, 2, 3, 4, 6]
    assert layer.evicted == 1 and layer.stored == 6


def test_model_generate_with_evicting_cache_matches_manual_loop(tiny_model):
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(3))
    cache = EvictingCache(tiny_model, budget=16, method="h2o+caote", block_size=8)
    out = tiny_model.generate(ids, attention_mask=torch.ones_like(ids), cache=cache, prefill_chunk_size=8,
                              max_new_tokens=6, do_sample=False)
    manual = EvictingCache(tiny_model, budget=16, method="h2o+caote", block_size=8)
    logits = prefill(tiny_model, ids, manual)
    tokens = []
    for _ in range(6):
        tokens.append(int(logits[0, -1].argmax()))
        with torch.inference_mode():
            logits = hf.forward(tiny_model, torch.tensor([[tokens[-1]]]), manual).logits
    assert out[0, 40:].tolist() == tokens
    assert cache.stored_tokens == 16 and cache.seen_tokens == 45


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["caote", "snapkv+caote+adaptive", "streaming"])
def test_half_precision_runs_and_scores_in_float32(dtype, method):
    model = tiny_llama().to(dtype)
    cache = EvictingCache(model, budget=10, method=method, block_size=4, snapkv_window=3)
    logits = prefill(model, torch.randint(0, 128, (1, 30)), cache)
    assert logits.dtype == dtype and torch.isfinite(logits.float()).all()
    assert cache.layers[0].keys.dtype == dtype and cache.stored_tokens == 10


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_with_room_for_everything_is_the_plain_model(dtype):
    """The float32 scoring path must not change the half-precision model's output when nothing is evicted."""
    model = tiny_llama().to(dtype)
    ids = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(4))
    model.set_attn_implementation("sdpa")
    with torch.inference_mode():
        want = hf.forward(model, ids, DynamicCache()).logits.float()
    got = prefill(model, ids, EvictingCache(model, budget=64, method="caote", block_size=24)).float()
    torch.testing.assert_close(got, want[:, -got.shape[1]:], atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3", "mistral"])
def test_other_supported_families_match_the_masked_reference(model_type):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(model_type, vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                               head_dim=16, sliding_window=None, attn_implementation="sdpa")
    model = AutoModelForCausalLM.from_config(cfg).eval()
    config = EvictionConfig(budget=10, method="caote", block_size=6)
    steps = _steps(prompt_len=25, block=6, decode=3)
    with masked_reference(model, config) as ref:
        expected = _run(model, ref.cache, steps)
    got = _run(model, EvictingCache(model, config=config), steps)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_unsupported_architecture_is_refused_by_name():
    """A model caote cannot cache is refused naming the architecture and the reason (more in test_architectures.py:
    encoder-decoder, shared KV, cross-attention, chunked attention, attention sinks)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("qwen3_next", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                               num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_experts=2,
                               num_experts_per_tok=1, moe_intermediate_size=32, shared_expert_intermediate_size=32,
                               linear_num_value_heads=2, linear_num_key_heads=1, linear_key_head_dim=8,
                               linear_value_head_dim=8)
    with pytest.raises(ValueError, match="qwen3_next.*linear-attention"):
        EvictingCache(AutoModelForCausalLM.from_config(cfg), budget=8)


def test_equal_length_batch_evicts_per_sequence(tiny_model):
    ids = torch.randint(0, 128, (2, 30), generator=torch.Generator().manual_seed(5))
    batched = EvictingCache(tiny_model, budget=10, method="caote", block_size=7)
    logits = prefill(tiny_model, ids, batched, logits_to_keep=0)
    for row in range(2):
        single = EvictingCache(tiny_model, budget=10, method="caote", block_size=7)
        torch.testing.assert_close(prefill(tiny_model, ids[row : row + 1], single, logits_to_keep=0), logits[row : row + 1],
                                   atol=1e-5, rtol=1e-5)
        assert single.layers[1].positions[0].tolist() == batched.layers[1].positions[row].tolist()


def test_attention_implementation_changed_behind_the_cache_is_an_error(tiny_model):
    cache = EvictingCache(tiny_model, budget=8)
    tiny_model.set_attn_implementation("sdpa")
    with pytest.raises(RuntimeError, match="attn_implementation"):
        hf.forward(tiny_model, torch.randint(0, 128, (1, 12)), cache)
    hf._pending.entry = None
