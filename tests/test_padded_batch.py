"""Padded batches through the evicting cache (docs/decisions.md 10): each row of a left-padded batch read by
``model.generate`` (with ``prefill_chunk_size``) and of a list of prompts read by ``caote.generate`` produces the
tokens and logits its prompt produces alone; padding is never attended, is evicted first and never displaces a token;
the stored entries stay bounded.

"Alone" with eviction means alone *in the same blocks*: eviction after a block depends on the tokens the block held.
``caote.generate`` lays a batch out so that every row is read in the blocks it has alone (``align_prompts``);
``model.generate`` splits the padded batch into chunks from its first column, so a row whose padding is not a multiple
of the chunk size is read in blocks shifted by its padding (the reference below reads the prompt alone in those
blocks; a row whose padding is a multiple of the chunk is compared with ``model.generate`` on the prompt alone).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import caote
from caote import EvictingCache, hf
from caote.layers import PADDING
from caote.generation import align_prompts, decode_greedy_rows, prefill
from conftest import tiny_llama

PAD = 127
"""The padding id: no prompt uses it (prompts draw from 0..119), so its embedding can be made huge."""
LENGTHS = (23, 15, 9)
"""Left-padded to 23: paddings 0, 8 (a multiple of the chunk) and 14 (not one)."""
CHUNK, BUDGET, NEW = 4, 8, 6
METHODS = ["caote", "snapkv+caote", "h2o+caote", "expected+caote", "streaming"]
OPTIONS = {"snapkv+caote": {"snapkv_window": 3}}


class Tokenizer:
    """What caote.generate asks of a tokenizer, for token-id prompts: no end of sequence, :data:`PAD` as padding."""

    eos_token_id = None
    pad_token_id = PAD

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return " ".join(map(str, ids))


def _prompts(lengths=LENGTHS, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 120, (1, length), generator=generator) for length in lengths]


def _left_padded(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, attention_mask)`` of the prompts left-padded to the longest (``tokenizer.padding_side = "left"``)."""
    total = max(p.shape[1] for p in prompts)
    ids = torch.full((len(prompts), total), PAD)
    mask = torch.zeros(len(prompts), total, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, total - prompt.shape[1]:], mask[row, total - prompt.shape[1]:] = prompt[0], 1
    return ids, mask


def _chunk_blocks(length: int, padding: int, chunk: int) -> list[tuple[int, int]]:
    """The blocks a row of ``length`` tokens after ``padding`` is read in when the padded batch is split into chunks
    from its first column (model.generate's ``prefill_chunk_size``), in the row's own positions."""
    cuts = {0, length} | {k * chunk - padding for k in range(1, (padding + length) // chunk + 1)}
    cuts = sorted(c for c in cuts if 0 <= c <= length)
    return list(zip(cuts[:-1], cuts[1:]))


def _alone(model, prompt: torch.Tensor, blocks: list[tuple[int, int]], new: int, **options):
    """The prompt alone through a fresh evicting cache, read in ``blocks`` then decoded greedily: ``(new tokens,
    logits (new, V) of each, cache)``."""
    cache = EvictingCache(model, **options)
    tokens, logits = [], []
    with torch.inference_mode():
        for start, end in blocks:
            step = hf.forward(model, prompt[:, start:end], cache).logits[0, -1]
        for index in range(new):
            logits.append(step)
            tokens.append(int(step.argmax()))
            if index < new - 1:
                step = hf.forward(model, torch.tensor([tokens[-1:]]), cache).logits[0, -1]
    return tokens, torch.stack(logits), cache


def _generate_padded(model, ids, mask, new: int = NEW, **options):
    """``model.generate`` on the padded batch through an evicting cache: ``(new tokens (B, new), logits (B, new, V),
    cache)``."""
    with caote.attached(model):
        cache = EvictingCache(model, **{"block_size": CHUNK, **options})
        out = model.generate(ids, attention_mask=mask, cache=cache, prefill_chunk_size=CHUNK, max_new_tokens=new,
                             do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=PAD)
    return out.sequences[:, ids.shape[1]:], torch.stack(out.logits, dim=1), cache


def _kept(cache: EvictingCache, row: int) -> list[list[list[int]]]:
    """The positions of the tokens every global layer and KV head of ``row`` holds."""
    return [[layer.head_positions(row, head).tolist() for head in range(layer.keys.shape[1])]
            for layer in cache.evicting_layers]


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


# ------------------------------------------------------------------------------------ model.generate, left padding
@pytest.mark.parametrize("method", METHODS)
def test_left_padded_generate_with_room_for_everything_is_the_plain_model_alone(model, method):
    prompts = _prompts()
    ids, mask = _left_padded(prompts)
    tokens, logits, cache = _generate_padded(model, ids, mask, budget=64, method=method, **OPTIONS.get(method, {}))
    assert cache.evicted_tokens == 0
    model.set_attn_implementation("sdpa")
    for row, prompt in enumerate(prompts):
        plain = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW, do_sample=False,
                               output_logits=True, return_dict_in_generate=True, pad_token_id=PAD)
        assert tokens[row].tolist() == plain.sequences[0, prompt.shape[1]:].tolist()
        torch.testing.assert_close(logits[row], torch.cat(plain.logits), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_left_padded_generate_with_eviction_is_each_prompt_alone(model, method):
    prompts = _prompts()
    ids, mask = _left_padded(prompts)
    options = dict(budget=BUDGET, method=method, block_size=CHUNK, **OPTIONS.get(method, {}))
    tokens, logits, cache = _generate_padded(model, ids, mask, **options)
    assert cache.evicted_tokens > 0
    for row, prompt in enumerate(prompts):
        padding = ids.shape[1] - prompt.shape[1]
        want, want_logits, alone = _alone(model, prompt, _chunk_blocks(prompt.shape[1], padding, CHUNK), NEW, **options)
        assert tokens[row].tolist() == want
        torch.testing.assert_close(logits[row], want_logits, atol=1e-4, rtol=1e-4)
        assert _kept(cache, row) == _kept(alone, 0)
        assert cache.row_evicted_tokens(row) == alone.evicted_tokens
    # every row read more tokens than the budget: its padding went first, none is left
    assert all(bool((layer.positions != PADDING).all()) for layer in cache.evicting_layers)
    assert cache.stored_tokens == BUDGET and cache.peak_stored_tokens <= BUDGET + CHUNK


def test_a_row_whose_padding_is_a_multiple_of_the_chunk_is_model_generate_alone(model):
    """Row 1's padding (8) is a multiple of the chunk: its blocks are those of the prompt alone through
    ``model.generate`` with the same ``prefill_chunk_size``."""
    prompts = _prompts()
    ids, mask = _left_padded(prompts)
    options = dict(budget=BUDGET, method="snapkv+caote", snapkv_window=3)
    tokens, logits, _ = _generate_padded(model, ids, mask, **options)
    alone_tokens, alone_logits, _ = _generate_padded(model, prompts[1], torch.ones_like(prompts[1]), **options)
    assert tokens[1].tolist() == alone_tokens[0].tolist()
    torch.testing.assert_close(logits[1], alone_logits[0], atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------------------- caote.generate([...])
@pytest.mark.parametrize("method", METHODS + ["tova", "caote+joint", "dropkv"])
def test_generate_list_is_each_prompt_alone(model, method):
    """caote.generate reads each row in its own blocks (padding before a shorter last block included): with and
    without eviction every answer, and what each row evicted, are the prompt's alone."""
    prompts = _prompts((23, 15, 9, 4, 16), seed=1)
    options = dict(method=method, block_size=CHUNK, max_new_tokens=NEW, snapkv_window=3)
    for budget in (64, BUDGET):
        batch = caote.generate(model, Tokenizer(), prompts, budget=budget, **options)
        alone = [caote.generate(model, Tokenizer(), prompt, budget=budget, **options) for prompt in prompts]
        assert [r.new_token_ids for r in batch] == [r.new_token_ids for r in alone]
        assert [r.evicted_tokens for r in batch] == [r.evicted_tokens for r in alone]
        assert [r.prompt_tokens for r in batch] == [23, 15, 9, 4, 16]
        assert (max(r.evicted_tokens for r in batch) > 0) == (budget == BUDGET)


@pytest.mark.parametrize("method", METHODS)
def test_aligned_batch_logits_and_kept_entries_are_each_prompt_alone(model, method):
    prompts = _prompts((23, 15, 9, 4, 16), seed=2)
    options = dict(budget=BUDGET, method=method, block_size=CHUNK, **OPTIONS.get(method, {}))
    ids, mask = align_prompts(prompts, CHUNK, PAD)
    cache = EvictingCache(model, **options)
    first = prefill(model, ids, cache, attention_mask=mask)[:, -1]
    assert cache.peak_stored_tokens <= BUDGET + CHUNK
    kept = [_kept(cache, row) for row in range(len(prompts))]
    rows = decode_greedy_rows(model, cache, first, NEW, set(), attention_mask=mask)
    for row, prompt in enumerate(prompts):
        blocks = [(s, min(s + CHUNK, prompt.shape[1])) for s in range(0, prompt.shape[1], CHUNK)]
        tokens, logits, _ = _alone(model, prompt, blocks, NEW, **options)
        torch.testing.assert_close(first[row], logits[0], atol=1e-4, rtol=1e-4)
        assert rows[row] == tokens
        assert kept[row] == _kept(_alone(model, prompt, blocks, 1, **options)[2], 0)  # after the prompt


def test_align_prompts_reads_every_prompt_in_its_own_blocks():
    ids, mask = align_prompts([torch.arange(1, 10)[None], torch.arange(1, 7)[None], torch.arange(1, 3)[None]], 4, 0)
    assert mask.tolist() == [[1, 1, 1, 1, 1, 1, 1, 1, 0, 1],   # 9 = 4 + 4 + 1
                             [0, 0, 0, 0, 1, 1, 1, 1, 1, 1],   # 6 = 4 + 2
                             [0, 0, 0, 0, 0, 0, 0, 0, 1, 1]]   # 2
    assert ids[0].tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 0, 9]
    assert ids[1, 4:].tolist() == [1, 2, 3, 4, 5, 6]


# ------------------------------------------------------------------------------ padding is never attended or kept
def test_padding_is_never_attended(model):
    """A huge padding embedding changes nothing; the same batch with an all-ones mask (padding attended as tokens)
    would."""
    loud = tiny_llama()
    with torch.no_grad():
        loud.model.embed_tokens.weight[PAD] = 1e3
    prompts = _prompts()
    ids, mask = _left_padded(prompts)
    options = dict(budget=BUDGET, method="caote")
    tokens, logits, _ = _generate_padded(loud, ids, mask, **options)
    quiet_tokens, quiet_logits, _ = _generate_padded(model, ids, mask, **options)
    assert tokens.tolist() == quiet_tokens.tolist()
    torch.testing.assert_close(logits, quiet_logits, atol=1e-4, rtol=1e-4)
    attended, _, _ = _generate_padded(loud, ids, torch.ones_like(mask), **options)
    assert attended[2].tolist() != tokens[2].tolist()


@pytest.mark.parametrize("method", ["caote", "h2o+caote", "streaming"])
def test_padding_never_displaces_a_token_and_storage_stays_bounded(model, method):
    """After every step each row holds ``min(its tokens, budget)`` of its own tokens; the rest of the shared slots is
    padding, and the slots never exceed ``budget + block``."""
    prompts = _prompts((30, 12, 3), seed=3)
    ids, mask = _left_padded(prompts)
    cache = EvictingCache(model, budget=BUDGET, method=method, block_size=CHUNK)
    with torch.inference_mode():
        for end in list(range(CHUNK, ids.shape[1], CHUNK)) + [ids.shape[1]] + list(range(ids.shape[1] + 1, 45)):
            if end > ids.shape[1]:  # decoding: one token more, no padding
                ids = torch.cat([ids, torch.full((3, 1), 5)], dim=1)
                mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], dim=1)
            start = cache.seen_tokens
            hf.forward(model, ids[:, start:end], cache, attention_mask=mask[:, :end],
                       position_ids=(mask.cumsum(-1) - 1).clamp_min(0)[:, start:end])
            own = mask[:, :end].sum(-1)
            for layer in cache.evicting_layers:
                assert layer.stored == min(end, BUDGET) and layer.peak_stored <= BUDGET + CHUNK
                assert layer.capacity <= BUDGET + CHUNK
                for row in range(3):
                    held = layer.positions[row]
                    assert ((held != PADDING).sum(-1) == min(int(own[row]), BUDGET)).all()
                    assert all(int(h.max()) < int(own[row]) for h in held)


# ------------------------------------------------------------------------------------ batch-row ops, beam search
def test_beam_search_on_a_padded_batch_with_room_for_everything_is_the_plain_model(model):
    ids, mask = _left_padded(_prompts())
    kwargs = dict(max_new_tokens=NEW, num_beams=2, num_return_sequences=2, do_sample=False, pad_token_id=PAD)
    model.set_attn_implementation("sdpa")
    plain = model.generate(ids, attention_mask=mask, **kwargs)
    with caote.attached(model):
        cache = EvictingCache(model, budget=64, method="h2o+caote", block_size=CHUNK)
        got = model.generate(ids, attention_mask=mask, cache=cache, prefill_chunk_size=CHUNK, **kwargs)
    assert got.tolist() == plain.tolist()


def test_row_operations_carry_each_rows_padding(model):
    """batch_repeat_interleave after a padded prefill with eviction: every copy decodes as its row did."""
    prompts = _prompts()
    ids, mask = align_prompts(prompts, CHUNK, PAD)
    options = dict(budget=BUDGET, method="snapkv+caote", block_size=CHUNK, snapkv_window=3)
    once, twice = EvictingCache(model, **options), EvictingCache(model, **options)
    first = prefill(model, ids, once, attention_mask=mask)[:, -1]
    prefill(model, ids, twice, attention_mask=mask)
    twice.batch_repeat_interleave(2)
    want = decode_greedy_rows(model, once, first, NEW, set(), attention_mask=mask)
    got = decode_greedy_rows(model, twice, first.repeat_interleave(2, dim=0), NEW, set(),
                             attention_mask=mask.repeat_interleave(2, dim=0))
    assert got == [rows for rows in want for _ in range(2)]


def test_crop_before_eviction_takes_back_each_rows_tokens(model):
    ids, mask = _left_padded(_prompts())
    cache = EvictingCache(model, budget=64, method="caote", block_size=CHUNK)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.inference_mode():
        hf.forward(model, ids[:, :-3], cache, attention_mask=mask[:, :-3], position_ids=positions[:, :-3])
        want = hf.forward(model, ids[:, -3:], cache, attention_mask=mask, position_ids=positions[:, -3:]).logits
        cache.crop(-3)
        assert cache.layers[0].row_seen.tolist() == [20, 12, 6]
        got = hf.forward(model, ids[:, -3:], cache, attention_mask=mask, position_ids=positions[:, -3:]).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------- refusals
def test_right_padding_is_refused(model):
    ids, mask = torch.randint(0, 120, (2, 8)), torch.ones(2, 8, dtype=torch.long)
    mask[1, -3:] = 0
    with pytest.raises(ValueError, match="right padding"):
        hf.forward(model, ids, EvictingCache(model, budget=4, method="tova"), attention_mask=mask)


def test_head_adaptive_budgets_refuse_padding(model):
    ids, mask = _left_padded(_prompts())
    with pytest.raises(ValueError, match="padded batches are not supported with '\\+adaptive'"):
        _generate_padded(model, ids, mask, budget=BUDGET, method="snapkv+adaptive", snapkv_window=3)


def test_chunk_eviction_refuses_padding_before_any_eviction(model):
    ids, mask = _left_padded(_prompts())
    with pytest.raises(ValueError, match="'\\+chunks' does not support padded batches"):
        _generate_padded(model, ids, mask, budget=BUDGET, method="caote+chunks", chunk_size=2)


def test_question_aware_mode_takes_one_prompt(model):
    with pytest.raises(ValueError, match="one prompt at a time"):
        caote.generate(model, Tokenizer(), _prompts(), budget=BUDGET, question_aware=True, question_tokens=3)


def _tiny_hybrid():
    config = AutoConfig.for_model(
        "gemma3_text", vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], sliding_window=6,
        attn_implementation="sdpa")
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def test_hybrid_model_left_padding_is_each_prompt_alone_and_inner_padding_is_refused():
    """Sliding-window layers keep their window in transformers' own layer, whose mask handles left padding; padding
    after a row's first token (caote.generate's layout for rows of different last blocks) would shorten the row's
    window and is refused."""
    hybrid = _tiny_hybrid()
    prompts = _prompts((19, 11))
    ids, mask = _left_padded(prompts)
    options = dict(budget=6, method="caote", block_size=CHUNK)
    tokens, logits, cache = _generate_padded(hybrid, ids, mask, **options)
    assert cache.evicted_tokens > 0
    for row, prompt in enumerate(prompts):
        blocks = _chunk_blocks(prompt.shape[1], ids.shape[1] - prompt.shape[1], CHUNK)
        want, want_logits, _ = _alone(hybrid, prompt, blocks, NEW, **options)
        assert tokens[row].tolist() == want
        torch.testing.assert_close(logits[row], want_logits, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="sliding-window layers count that padding"):
        caote.generate(hybrid, Tokenizer(), _prompts((19, 10)), **options, max_new_tokens=2)  # last blocks 3 and 2


# ------------------------------------------------------------------------------------------------ the real model
@pytest.mark.slow
def test_smollm2_batch_of_questions_is_each_question_alone(smollm2):
    model, tokenizer = smollm2
    questions = ["Name three colours of the rainbow.",
                 "My cat is called Violet and my dog is called Harbour. They live in a small house by the sea with "
                 "a lighthouse keeper. What is my dog called?"]
    options = dict(budget=24, method="snapkv+caote", block_size=16, snapkv_window=8, max_new_tokens=8)
    batch = caote.generate(model, tokenizer, questions, **options)
    alone = [caote.generate(model, tokenizer, question, **options) for question in questions]
    assert [r.new_token_ids for r in batch] == [r.new_token_ids for r in alone]
    assert all(r.evicted_tokens > 0 for r in batch)
