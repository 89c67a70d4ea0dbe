"""The rest of transformers' Cache contract on the evicting cache: batch-row operations (beam search,
num_return_sequences, batch_select_indices / batch_repeat_interleave), crop, and multi-turn generation."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import caote
from caote import EvictingCache, hf
from caote.generation import encode_prompt, prefill
from caote.question import QuestionAware


def _ids(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def _generate(model, ids: torch.Tensor, cache=None, **kwargs) -> torch.Tensor:
    """``model.generate`` on unpadded ``ids`` (transformers 5.24 takes the cache as ``cache=``)."""
    extra = {} if cache is None else {"cache": cache}
    return model.generate(ids, attention_mask=torch.ones_like(ids), **extra, **kwargs)


def _plain_and_evicting(model, ids: torch.Tensor, seed: int, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """The same ``generate`` call on the unmodified model (SDPA, DynamicCache) and through an evicting cache whose
    budget holds the prompt and every new token; the RNG reseeded before each."""
    model.set_attn_implementation("sdpa")
    torch.manual_seed(seed)
    plain = _generate(model, ids, **kwargs)
    budget = ids.shape[1] + kwargs["max_new_tokens"]
    with caote.attached(model):
        cache = EvictingCache(model, budget=budget, method="h2o+caote", block_size=8)
        torch.manual_seed(seed)
        got = _generate(model, ids, cache, prefill_chunk_size=8, **kwargs)
    assert cache.evicted_tokens == 0
    return plain, got


# ------------------------------------------------------------------------- (1) no eviction: the plain model
@pytest.mark.parametrize("kwargs", [
    dict(num_beams=3, num_return_sequences=3, do_sample=False),
    dict(num_return_sequences=2, do_sample=True),
    dict(num_beams=3, num_return_sequences=2, do_sample=True),  # beam sampling
], ids=["beam", "sample", "beam-sample"])
def test_generation_with_room_for_everything_is_the_plain_model(tiny_model, kwargs):
    ids = _ids(1, 21, seed=1)
    plain, got = _plain_and_evicting(tiny_model, ids, seed=0, max_new_tokens=8, **kwargs)
    assert plain.shape[0] == kwargs["num_return_sequences"]
    assert got.tolist() == plain.tolist()


@pytest.mark.slow
def test_smollm2_beam_search_with_room_for_everything_is_the_plain_model(smollm2):
    model, tokenizer = smollm2
    ids = encode_prompt(tokenizer, "Name three colours of the rainbow.")
    plain, got = _plain_and_evicting(model, ids, seed=0, max_new_tokens=8, num_beams=3, num_return_sequences=3,
                                     do_sample=False)
    assert got.tolist() == plain.tolist()


# -------------------------------------------------------------------- (2) row operations are exact after eviction
ROW_OPS: list[tuple[str, Callable[[EvictingCache], None], list[int]]] = [
    ("reorder_cache", lambda cache: cache.reorder_cache(torch.tensor([1, 0, 1])), [1, 0, 1]),
    ("batch_select_indices", lambda cache: cache.batch_select_indices(torch.tensor([1])), [1]),
    ("batch_select_mask", lambda cache: cache.batch_select_indices(torch.tensor([False, True])), [1]),
    ("batch_repeat_interleave", lambda cache: cache.batch_repeat_interleave(2), [0, 0, 1, 1]),
]


def _run_blocks(model, cache: EvictingCache, ids: torch.Tensor, block: int, decode: torch.Tensor,
                question: int | None = None, settings: QuestionAware | None = None, at: tuple[int, str] | None = None,
                op: Callable[[EvictingCache], None] | None = None, rows: list[int] | None = None) -> list[torch.Tensor]:
    """Read ``ids`` ``(B, L)`` block by block (question-aware when ``question`` tokens are given: each block then
    probed with the prompt's last ``question`` tokens), then the ``decode`` tokens ``(B', n)`` one at a time. At
    ``at = (block index, "block" | "probe")`` (after the block's forward, before its probe; or after the probe)
    ``op`` is applied to the cache and the rows ``rows`` of the prompts are read from then on. Returns the logits
    of every step from the op on (all steps when there is none)."""
    logits, recording = [], at is None

    def maybe_apply(index: int, stage: str) -> None:
        nonlocal ids, recording
        if at == (index, stage):
            op(cache)
            ids, recording = ids[rows], True

    with torch.inference_mode():
        for index, start in enumerate(range(0, ids.shape[1], block)):
            cache.start_block(question is not None)
            out = hf.forward(model, ids[:, start : start + block], cache).logits
            if recording:
                logits.append(out)
            maybe_apply(index, "block")
            if question is not None:
                cache.probe_question(model, ids[:, -question:], ids.shape[1] - 1, settings)
            maybe_apply(index, "probe")
        for step in range(decode.shape[1]):
            logits.append(hf.forward(model, decode[:, step : step + 1], cache).logits)
    return logits


def _assert_same_state(cache: EvictingCache, fresh: EvictingCache) -> None:
    """Every per-row state of the two caches is equal: entries, positions, H2O's accumulator, the question-aware
    spans and centres."""
    def same(a: torch.Tensor | None, b: torch.Tensor | None) -> None:
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)

    for layer, ref in zip(cache.layers, fresh.layers):
        assert (layer.stored, layer.seen, layer.evicted) == (ref.stored, ref.seen, ref.evicted)
        assert torch.equal(layer.positions, ref.positions)
        same(layer.keys, ref.keys)
        same(layer.values, ref.values)
        same(layer._attention_sum, ref._attention_sum)
        same(layer.kept_spans, ref.kept_spans)
    same(cache._centers, fresh._centers)


@pytest.mark.parametrize("name,op,rows", ROW_OPS, ids=[o[0] for o in ROW_OPS])
@pytest.mark.parametrize("method", ["caote", "h2o+caote", "snapkv+fastcaote", "expected+caote"])
def test_row_operations_after_eviction_equal_fresh_caches_on_the_chosen_rows(tiny_model, method, name, op, rows):
    ids, block = _ids(2, 36, seed=7), 6
    decode = _ids(len(rows), 4, seed=8)
    options = dict(budget=10, method=method, block_size=block, snapkv_window=3,
                   recent_window=3 if method.startswith("h2o") else None)
    # the op after the 3rd block (18 tokens seen, 8 already evicted): the rest of the prompt and 4 decoding steps
    cache = EvictingCache(tiny_model, **options)
    got = _run_blocks(tiny_model, cache, ids, block, decode, at=(2, "probe"), op=op, rows=rows)
    assert cache.evicted_tokens > 0 and cache.batch_size == len(rows)
    fresh = EvictingCache(tiny_model, **options)
    expected = _run_blocks(tiny_model, fresh, ids[rows], block, decode)
    for a, b in zip(got, expected[3:], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    _assert_same_state(cache, fresh)


@pytest.mark.parametrize("method", ["caote", "caote+joint"])  # +joint reads the deferred view, not only its scores
@pytest.mark.parametrize("at", [(4, "block"), (4, "probe"), (7, "probe")], ids=["before-probe", "after-probe", "last"])
def test_row_operations_carry_the_question_aware_state(tiny_model, at, method):
    """Question-aware mode: the shared spans, their centres (cache-level) and, between a block and its probe, the
    deferred eviction's view and scores follow the rows."""
    ids, block, question = _ids(2, 64, seed=9), 8, 5
    settings = QuestionAware(span_before=1, span_after=3, quota=0.5)
    decode = _ids(3, 3, seed=10)
    options = dict(budget=16, method=method, block_size=block)
    cache = EvictingCache(tiny_model, **options)
    got = _run_blocks(tiny_model, cache, ids, block, decode, question, settings, at=at, op=ROW_OPS[0][1],
                      rows=[1, 0, 1])
    assert cache._centers.shape[0] == 3 and cache.layers[0].kept_spans.shape[0] == 3
    fresh = EvictingCache(tiny_model, **options)
    expected = _run_blocks(tiny_model, fresh, ids[[1, 0, 1]], block, decode, question, settings)
    for a, b in zip(got, expected[-len(got):], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    _assert_same_state(cache, fresh)


def test_repeat_interleave_checks_its_argument(tiny_model):
    cache = EvictingCache(tiny_model, budget=8)
    prefill(tiny_model, _ids(1, 12, seed=0), cache)
    with pytest.raises(ValueError, match="positive integer"):
        cache.batch_repeat_interleave(0)


# ------------------------------------------------------------------ (3) beam search with eviction stays bounded
@pytest.mark.parametrize("method", ["snapkv+caote", "h2o+fastcaote"])
def test_beam_search_with_eviction_is_bounded(tiny_model, method):
    ids = _ids(1, 40, seed=11)
    budget, block = 16, 8
    with caote.attached(tiny_model):
        cache = EvictingCache(tiny_model, budget=budget, method=method, block_size=block, snapkv_window=4)
        out = _generate(tiny_model, ids, cache, prefill_chunk_size=block, max_new_tokens=10, num_beams=3,
                        num_return_sequences=3, do_sample=False)
    assert out.shape[0] == 3 and (out[:, :40] == ids).all()
    assert cache.batch_size == 3 and cache.evicted_tokens > 0
    assert cache.stored_tokens == budget and cache.peak_stored_tokens <= budget + block
    for layer in cache.layers:
        assert (layer.positions.diff(dim=-1) > 0).all()


def test_read_once_then_sample_several_continuations(tiny_model):
    """batch_repeat_interleave on a cache that read the prompt once equals generate expanding the prompt itself."""
    ids, block = _ids(1, 41, seed=12), 8
    options = dict(budget=16, method="snapkv+caote", block_size=block, snapkv_window=4)
    kwargs = dict(prefill_chunk_size=block, max_new_tokens=6, num_return_sequences=2, do_sample=True)
    with caote.attached(tiny_model):
        once = EvictingCache(tiny_model, **options)
        prefill(tiny_model, ids[:, :40], once)  # 5 blocks of 8; generate then reads the last token
        once.batch_repeat_interleave(2)
        torch.manual_seed(3)
        got = _generate(tiny_model, ids, once, **kwargs)
        torch.manual_seed(3)
        expected = _generate(tiny_model, ids, EvictingCache(tiny_model, **options), **kwargs)
    assert got.tolist() == expected.tolist() and once.peak_stored_tokens <= 16 + block


# ---------------------------------------------------------------------------------------- (4) multi-turn chat
def test_second_generate_on_the_same_cache_continues_the_conversation(tiny_model):
    """Turn 2 passes the whole conversation; generate reads only what the cache has not seen. Reference: the same
    steps fed by hand through a fresh cache (the same blocks, so the same evictions)."""
    budget, block, new = 16, 8, 5
    turn1, turn2 = _ids(1, 40, seed=13), _ids(1, 11, seed=14)
    options = dict(budget=budget, method="h2o+caote", block_size=block)
    with caote.attached(tiny_model):
        cache = EvictingCache(tiny_model, **options)
        first = _generate(tiny_model, turn1, cache, prefill_chunk_size=block, max_new_tokens=new, do_sample=False)
        conversation = torch.cat([first, turn2], dim=1)
        second = _generate(tiny_model, conversation, cache, prefill_chunk_size=block, max_new_tokens=new,
                           do_sample=False)
        reference = EvictingCache(tiny_model, **options)
        with torch.inference_mode():
            logits = prefill(tiny_model, turn1, reference)
            assert int(logits[0, -1].argmax()) == int(first[0, 40])
            for token in first[0, 40:-1]:  # generate feeds each new token but the last
                logits = hf.forward(tiny_model, token.view(1, 1), reference).logits
            # turn 2: the unseen tokens (turn 1's last answer token and the new message), block by block
            logits = prefill(tiny_model, conversation[:, reference.seen_tokens:], reference)
            answer = []
            for _ in range(new):
                answer.append(int(logits[0, -1].argmax()))
                logits = hf.forward(tiny_model, torch.tensor([answer[-1:]]), reference).logits
    assert second[0, : conversation.shape[1]].tolist() == conversation[0].tolist()
    assert second[0, conversation.shape[1]:].tolist() == answer
    assert cache.seen_tokens == second.shape[1] - 1 and cache.stored_tokens == budget
    assert cache.peak_stored_tokens <= budget + block


# ---------------------------------------------------------------------------------------------------- (5) crop
def test_crop_after_eviction_is_refused_and_says_why(tiny_model):
    cache = EvictingCache(tiny_model, budget=8, method="caote", block_size=4)
    prefill(tiny_model, _ids(1, 20, seed=15), cache)
    with pytest.raises(ValueError, match=r"cannot be cropped after eviction .*evicted entries cannot be restored"):
        cache.crop(-2)
    cache.crop(0)  # nothing to remove: allowed
    with pytest.raises(ValueError, match="negative number"):
        cache.crop(5)


def test_crop_of_an_accumulating_method_is_refused(tiny_model):
    cache = EvictingCache(tiny_model, budget=64, method="h2o", block_size=4)
    prefill(tiny_model, _ids(1, 20, seed=16), cache)
    with pytest.raises(ValueError, match="accumulates attention"):
        cache.crop(-2)


def test_crop_before_any_eviction_is_exact(tiny_model):
    ids = _ids(1, 24, seed=17)
    cache = EvictingCache(tiny_model, budget=30, method="snapkv+caote", block_size=8, snapkv_window=4)
    prefill(tiny_model, ids, cache)
    cache.crop(-5)
    assert cache.seen_tokens == 19 and cache.stored_tokens == 19
    fresh = EvictingCache(tiny_model, budget=30, method="snapkv+caote", block_size=8, snapkv_window=4)
    prefill(tiny_model, ids[:, :19], fresh)
    steps = _ids(1, 16, seed=18)  # crosses the budget: eviction after the crop is the fresh cache's too
    with torch.inference_mode():
        for start in range(0, 16, 8):
            a = hf.forward(tiny_model, steps[:, start : start + 8], cache).logits
            b = hf.forward(tiny_model, steps[:, start : start + 8], fresh).logits
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert cache.evicted_tokens > 0
    assert [layer.positions.tolist() for layer in cache.layers] == [layer.positions.tolist() for layer in fresh.layers]


@pytest.mark.slow
@pytest.mark.parametrize("budget", [None, 48], ids=["room-for-everything", "evicting"])
def test_smollm2_chat_second_turn_continues_the_conversation(smollm2, budget):
    """The README's multi-turn example: the second turn appends to the ids generate returned. With room for
    everything the answer is the plain model's; with eviction the conversation goes on within the budget."""
    model, tokenizer = smollm2
    ids = encode_prompt(tokenizer, "My cat is called Violet and my dog is called Harbour. What is my cat called?")
    turn2 = tokenizer("\n<|im_start|>user\nAnd my dog?<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False,
                      return_tensors="pt").input_ids
    kwargs = dict(max_new_tokens=12, do_sample=False)
    with caote.attached(model):
        cache = EvictingCache(model, budget=budget or 512, method="snapkv+caote", block_size=16, snapkv_window=8)
        out = _generate(model, ids, cache, prefill_chunk_size=16, **kwargs)
        conversation = torch.cat([out, turn2], dim=1)
        second = _generate(model, conversation, cache, prefill_chunk_size=16, **kwargs)
    assert second[0, : conversation.shape[1]].tolist() == conversation[0].tolist()
    assert second.shape[1] > conversation.shape[1] and cache.seen_tokens == second.shape[1] - 1
    if budget is None:
        assert cache.evicted_tokens == 0
        model.set_attn_implementation("sdpa")
        assert second.tolist() == _generate(model, conversation, **kwargs).tolist()
    else:
        assert cache.evicted_tokens > 0 and cache.stored_tokens == budget
        assert cache.peak_stored_tokens <= budget + 16
