"""Question-aware mode (caote.question) and the kvpress perplexity protocols: bounded memory, the probe leaves no
trace, the shared spans are kept in every layer, and a budget that holds everything reproduces the full model."""

import math

import pytest
import torch
from transformers import DynamicCache

from caote import EvictingCache, hf, question
from caote.eval.runner import continuation_nll
from caote.generation import generate, prefill
from caote.question import QuestionAware


def test_rank_fusion_prefers_what_many_layers_rank_high():
    # position 1 is first in two layers; position 2 is first in one layer and last in the other two
    dense = torch.tensor([[[0.1, 0.5, 0.3, 0.1]], [[0.1, 0.6, 0.0, 0.3]], [[0.2, 0.2, 0.5, 0.1]]])
    fused = question.rank_fusion(dense)
    assert fused.argmax(-1).item() == 1
    # a position a layer does not hold (score 0) gets nothing from that layer
    assert fused[0, 2] == pytest.approx(1 / (1 + 2) + 1 / (1 + 1))


def test_shared_spans_follow_the_ranking_within_the_quota():
    ranking = torch.zeros(1, 40)
    ranking[0, 20], ranking[0, 5], ranking[0, 30] = 3.0, 2.0, 1.0
    ranking[0, 1] = 9.0  # a sink: never a centre
    kept, centers = question.shared_spans(ranking, quota=10, before=1, after=4, sinks=4)
    assert kept[0].nonzero().flatten().tolist() == [4, 5, 6, 7, 19, 20, 21, 22, 23, 24]  # 20 (6 tokens), 5 (cut to 4)
    assert centers[0].nonzero().flatten().tolist() == [5, 20]
    masked = ranking.masked_fill(torch.arange(40) < 25, -1.0)  # the caller's non-candidates
    kept, _ = question.shared_spans(masked, quota=10, before=1, after=4, sinks=4)
    assert kept[0].nonzero().flatten().tolist() == [29, 30, 31, 32, 33, 34]


@pytest.mark.parametrize("method", ["caote", "snapkv+caote", "h2o"])
def test_question_aware_prefill_is_bounded_and_keeps_its_spans_in_every_layer(tiny_model, method):
    ids = torch.randint(0, 128, (1, 300), generator=torch.Generator().manual_seed(1))
    budget, block, m = 48, 16, 10
    cache = EvictingCache(tiny_model, budget=budget, method=method, block_size=block)
    settings = QuestionAware(span_before=1, span_after=3, quota=0.25)
    prefill(tiny_model, ids, cache, block, question_ids=ids[:, -m:], question_settings=settings)
    assert cache.seen_tokens == 300 and cache.stored_tokens == budget
    assert cache.peak_stored_tokens <= budget + block + m
    spans = cache.layers[0].kept_spans
    assert 0 < int(spans.sum()) <= int(0.25 * budget)
    for layer in cache.layers:
        assert layer.probe_len == 0 and layer.pending is None and not layer.defer
        assert (layer.positions.diff(dim=-1) > 0).all() and int(layer.positions.max()) < 300
        # every shared position chosen from the last block is held by every layer and KV head
        recent = spans[0].nonzero().flatten()
        recent = recent[recent >= 300 - block]
        for head in layer.positions[0]:
            assert torch.isin(recent, head).all()


def test_question_probe_scores_are_the_question_attention_at_its_final_positions(tiny_model):
    """The probe's attention over the stored context equals a plain forward of the question at its final
    positions over the same (unevicted) keys: brute force with a DynamicCache holding the same prefix."""
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(2))
    q_ids = ids[:, -6:]
    cache = EvictingCache(tiny_model, budget=30, method="tova", block_size=40)
    cache.start_block(True)
    with torch.inference_mode():
        hf.forward(tiny_model, ids, cache)
    for layer in cache.layers:
        layer.probe_len = 6
    with torch.inference_mode():
        hf.forward(tiny_model, q_ids, cache, position_ids=torch.arange(34, 40)[None])
    got = [layer.question_scores.clone() for layer in cache.layers]
    # brute force: eager attention of the same question tokens over the same prefix
    captured = {}

    def hook(module, args, kwargs, output):
        captured[module.layer_idx] = output[1]

    tiny_model.set_attn_implementation("eager")
    handles = [layer.self_attn.register_forward_hook(hook, with_kwargs=True) for layer in tiny_model.model.layers]
    try:
        ref = DynamicCache()
        with torch.inference_mode():
            tiny_model(input_ids=ids, cache=ref, use_cache=True)
            values = [ref.layers[i].values.clone() for i in range(len(tiny_model.model.layers))]
            tiny_model(input_ids=q_ids, cache=ref, use_cache=True, position_ids=torch.arange(34, 40)[None],
                       output_attentions=True)
    finally:
        for h in handles:
            h.remove()
    for i, scores in enumerate(got):
        weights = captured[i][..., :40].float()  # (B, H_q, 6, 40): the question over the context
        kv_heads = values[i].shape[1]
        grouped = weights.view(1, kv_heads, -1, 6, 40)
        expected = grouped.amax(dim=3).mean(dim=2) * values[i].float().norm(dim=-1)
        torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("compress_once", [False, True])
def test_continuation_protocol_with_room_for_everything_is_the_full_model(tiny_model, compress_once):
    ids = torch.randint(0, 128, (1, 70), generator=torch.Generator().manual_seed(3))
    context, cont = ids[:, :50], ids[:, 50:]
    nll, n = continuation_nll(tiny_model, context, cont, "snapkv+caote", 64, block_size=16,
                              compress_once=compress_once)
    tiny_model.set_attn_implementation("sdpa")
    with torch.inference_mode():
        logits = tiny_model(input_ids=ids).logits[0, 49:69].float()
    expected = torch.nn.functional.cross_entropy(logits, ids[0, 50:70], reduction="sum").item()
    assert n == 20 and math.isclose(nll, expected, rel_tol=1e-5)


def test_continuation_keeps_its_own_entries_after_the_compression(tiny_model):
    ids = torch.randint(0, 128, (1, 90), generator=torch.Generator().manual_seed(4))
    cache = EvictingCache(tiny_model, budget=20, method="caote", block_size=60)
    with torch.inference_mode():
        prefill(tiny_model, ids[:, :60], cache, 60)  # compress once: 60 -> 20
        assert cache.stored_tokens == 20
        cache.stop_evicting()
        hf.forward(tiny_model, ids[:, 60:], cache)
    assert cache.stored_tokens == 50 and cache.seen_tokens == 90
    assert all(layer.positions[0, 0, -30:].tolist() == list(range(60, 90)) for layer in cache.layers)


def _quotas(monkeypatch) -> list[int]:
    """Record the spans' quota of every question-aware eviction."""
    seen = []
    real = question.shared_spans

    def spy(ranking, quota, *args):
        seen.append(quota)
        return real(ranking, quota, *args)

    monkeypatch.setattr(question, "shared_spans", spy)
    return seen


@pytest.mark.parametrize("protect", [False, True])
def test_protect_question_gives_the_recent_window_to_the_spans_and_keeps_the_question(tiny_model, monkeypatch,
                                                                                        protect):
    """``protect_question``: blocks before the question protect no recent entry (the spans' quota is ``budget -
    sinks``), the block that holds the question protects the question whole (quota ``budget - sinks - M``); without
    it every block protects the method's recent window."""
    ids = torch.randint(0, 128, (1, 300), generator=torch.Generator().manual_seed(3))
    budget, block, m, sinks, window = 48, 16, 10, 4, 8
    cache = EvictingCache(tiny_model, budget=budget, method="snapkv+caote", block_size=block, sink_tokens=sinks,
                          snapkv_window=window, protect_question=protect)
    quotas = _quotas(monkeypatch)
    prefill(tiny_model, ids, cache, block, question_ids=ids[:, -m:], question_settings=QuestionAware(quota=1.0))
    assert cache.stored_tokens == budget and cache.peak_stored_tokens <= budget + block + m
    blocks = -(-300 // block)
    early = budget - sinks if protect else budget - sinks - window
    last = budget - sinks - m if protect else early
    assert quotas[-1] == last and set(quotas[:-1]) == {early} and len(quotas) == blocks - 3  # full after 3 blocks
    question_positions = torch.arange(300 - m, 300)
    for layer in cache.evicting_layers:
        assert layer.question_start is None  # decoding protects the recent window again
        for head in layer.positions[0]:
            assert torch.isin(torch.arange(sinks), head).all()
            assert torch.isin(question_positions, head).all() or not protect


def test_protected_positions_follow_the_question_while_it_is_set(tiny_model):
    cache = EvictingCache(tiny_model, budget=20, method="snapkv", block_size=8, snapkv_window=6, sink_tokens=2)
    layer = cache.evicting_layers[0]
    positions = torch.arange(40)
    assert layer.protected_positions(positions, 40).nonzero().flatten().tolist() == [0, 1, *range(34, 40)]
    layer.question_start = 45  # the question is not read yet: no stored entry is protected as recent
    assert layer.protected_positions(positions, 40).nonzero().flatten().tolist() == [0, 1]
    layer.question_start = 30
    assert layer.protected_positions(positions, 40).nonzero().flatten().tolist() == [0, 1, *range(30, 40)]


def test_protect_question_is_refused_without_the_question_or_when_it_does_not_fit(tiny_model,
                                                                                  tiny_with_tokenizer):
    ids = torch.randint(0, 128, (1, 100), generator=torch.Generator().manual_seed(4))
    cache = EvictingCache(tiny_model, budget=32, method="snapkv+caote", block_size=16, protect_question=True)
    with pytest.raises(ValueError, match="protect_question protects the prompt's question"):
        prefill(tiny_model, ids, cache, 16)
    cache = EvictingCache(tiny_model, budget=32, method="snapkv+caote", block_size=16, protect_question=True,
                          sink_tokens=20)
    with pytest.raises(ValueError, match="question's 16 tokens and sink_tokens=20 do not fit in budget=32"):
        prefill(tiny_model, ids, cache, 16, question_ids=ids[:, -16:])
    with pytest.raises(ValueError, match="protect_question protects the prompt's question.*turn it on"):
        generate(tiny_with_tokenizer[0], tiny_with_tokenizer[1], "a long text " * 40, budget=32, block_size=16,
                 protect_question=True, max_new_tokens=1)
    with pytest.raises(ValueError, match="protect_question must be true or false"):
        EvictingCache(tiny_model, budget=32, method="snapkv", protect_question=2)
