"""The mistakes a newcomer makes in Python get a clear answer: budgets as fractions, huge budgets, unbounded steps,
configurations that destroy the output, and a model's attention restored after use."""

import warnings

import pytest
import torch

import caote
from caote import EvictingCache, EvictionConfig, hf
from caote.layers import UnboundedStepWarning
from caote.generation import generate, prefill
from caote.validation import check_budget, resolve_budget


class _Tok:
    """Just enough tokenizer for generate() with token-id prompts."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def test_budget_as_a_fraction_of_the_prompt(tiny_model):
    ids = torch.randint(0, 128, (1, 80))
    out = generate(tiny_model, _Tok(), ids, budget="12.5%", method="snapkv+caote", block_size=8, max_new_tokens=2,
                   snapkv_window=4)
    assert out.budget == 10  # ceil(0.125 * 80)
    assert generate(tiny_model, _Tok(), ids, budget=0.5, method="tova", block_size=8, max_new_tokens=1).budget == 40
    assert resolve_budget(None, 10) is None and resolve_budget(7, 1000) == 7
    for bad in ("0%", "150%", "x%", 1.5, 0.0, -3, "many"):
        with pytest.raises(ValueError, match="budget"):
            check_budget(bad)


def test_bad_generation_length_is_refused_before_any_work(tiny_model):
    for bad in (0, -5, 2.5):
        with pytest.raises(ValueError, match="max_new_tokens"):
            generate(tiny_model, _Tok(), torch.randint(0, 128, (1, 20)), budget=8, max_new_tokens=bad)


def test_a_huge_budget_allocates_only_what_the_prompt_needs(tiny_model):
    cache = EvictingCache(tiny_model, budget=10**9, method="caote", block_size=128)
    prefill(tiny_model, torch.randint(0, 128, (1, 300)), cache, 128)
    assert all(layer.capacity <= 2 * 300 for layer in cache.layers)
    assert cache.evicted_tokens == 0 and cache.stored_tokens == 300


def test_a_step_longer_than_budget_plus_block_warns_once(tiny_model):
    cache = EvictingCache(tiny_model, budget=16, method="tova", block_size=8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        with torch.inference_mode():
            for _ in range(3):
                hf.forward(tiny_model, torch.randint(0, 128, (1, 64)), cache)
    unbounded = [w for w in caught if issubclass(w.category, UnboundedStepWarning)]
    assert len(unbounded) == 1 and "prefill_chunk_size=8" in str(unbounded[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnboundedStepWarning)  # block-wise reading never warns
        prefill(tiny_model, torch.randint(0, 128, (1, 64)), EvictingCache(tiny_model, budget=16, method="tova",
                                                                           block_size=8), 8)


def test_h2o_without_a_grace_period_is_refused():
    with pytest.raises(ValueError, match="recent_window >= 1"):
        EvictionConfig(budget=64, method="h2o+caote", recent_window=0)
    assert EvictionConfig(budget=64, method="h2o", recent_window=1).recent_window == 1
    assert EvictionConfig(budget=64, method="tova", recent_window=0).recent_window == 0


def test_attached_restores_the_models_attention(tiny_model):
    tiny_model.set_attn_implementation("sdpa")
    with caote.attached(tiny_model):
        assert tiny_model.config._attn_implementation == hf.ATTENTION_NAME
        cache = EvictingCache(tiny_model, budget=8, method="caote", block_size=4)
        prefill(tiny_model, torch.randint(0, 128, (1, 20)), cache, 4)
    assert tiny_model.config._attn_implementation == "sdpa"
    with pytest.raises(RuntimeError):
        with caote.attached(tiny_model):
            raise RuntimeError("boom")
    assert tiny_model.config._attn_implementation == "sdpa"
