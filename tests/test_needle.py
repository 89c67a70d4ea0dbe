"""Needle-in-a-haystack grid: positions, lengths, determinism and scoring (tokenizer only, no model)."""

from __future__ import annotations


import pytest

from caote.eval.needle import (
    count_tokens,
    depth_grid,
    format_prompt,
    make_needle_samples,
    needle_for_cell,
    needle_prefix_recovered,
    needle_recovered,
)

LENGTHS = [2000, 4000]
DEPTHS = [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0]




@pytest.fixture(scope="module")
def grid(tokenizer):
    return make_needle_samples(tokenizer, LENGTHS, DEPTHS, seed=0)


def test_grid_shape(grid):
    assert [(s.context_length, s.depth) for s in grid] == [(L, d) for L in LENGTHS for d in DEPTHS]


def test_prompt_length_matches_request(tokenizer, grid):
    for s in grid:
        n = count_tokens(tokenizer, s.prompt)
        assert n == s.prompt_tokens
        assert abs(n - s.context_length) <= 2, (s.context_length, s.depth, n)


def test_needle_at_requested_depth(tokenizer, grid):
    for s in grid:
        ids = tokenizer.encode(s.context, add_special_tokens=False)
        char = s.context.index(s.needle)
        idx = len(tokenizer.encode(s.context[:char], add_special_tokens=False))
        assert abs(idx - s.context_needle_start) <= 1
        assert abs(idx - s.depth * len(ids)) <= 0.02 * len(ids), (s.context_length, s.depth, idx, len(ids))


def test_needle_token_start_points_at_needle_in_prompt(tokenizer, grid):
    for s in grid:
        ids = tokenizer.encode(s.prompt, add_special_tokens=False)
        tail = tokenizer.decode(ids[s.needle_token_start : s.needle_token_start + 40])
        assert tail.lstrip().startswith(s.needle.strip()[:25]), tail
        assert s.needle_token_start > s.context_needle_start  # chat template + instruction come first


def test_prompt_layout(grid):
    for s in grid:
        assert s.prompt.count(s.answer) == 1  # the value is in the context only
        assert s.key in s.needle and s.key in s.question and s.answer in s.needle
        c, q = s.prompt.index(s.context), s.prompt.index(s.question)
        assert c + len(s.context) <= q  # context, then the question
        assert s.prompt.rstrip().endswith(s.answer_prefix)
        assert "<|im_start|>user" in s.prompt and "<|im_start|>assistant" in s.prompt


def test_needles_vary_over_the_grid(grid):
    answers = [s.answer for s in grid]
    assert len(set(answers)) == len(answers)  # 14 draws of 9e6 values (a collision is allowed, not expected)
    assert len({s.key for s in grid}) > 1
    assert all(len(a) == 7 and a.isdigit() for a in answers)
    assert all(s.needle == f" The special magic number for {s.key} is: {s.answer}." for s in grid)


def test_a_cells_needle_does_not_depend_on_the_rest_of_the_grid(tokenizer, grid):
    """The defect this guards against: needles drawn in grid order gave the cell (2000, 0.75) another needle when
    the depths were asked in another order or with others beside them, so results of two grids compared
    different needles under one cell name."""
    by_cell = {(s.context_length, s.depth): s for s in grid}
    for lengths, depths in (([4000], [0.75, 0.1]), ([2000], [0.9]), ([4000, 2000], [1.0, 0.25])):
        for s in make_needle_samples(tokenizer, lengths, depths, seed=0):
            assert s == by_cell[(s.context_length, s.depth)]
            assert (s.key, s.answer) == needle_for_cell(0, s.context_length, s.depth)
    assert needle_for_cell(0, 2000, 0.5) == needle_for_cell(0, 2000.0, 0.50)  # the same cell however it is typed
    assert needle_for_cell(0, 2000, 0.5) != needle_for_cell(0, 4000, 0.5) != needle_for_cell(0, 4000, 0.25)


def test_deterministic_and_seed_dependent(tokenizer, grid):
    again = make_needle_samples(tokenizer, LENGTHS[:1], DEPTHS[:2], seed=0)
    assert again == grid[: len(again)]
    other = make_needle_samples(tokenizer, LENGTHS[:1], DEPTHS[:2], seed=1)
    assert [s.answer for s in other] != [s.answer for s in again]
    assert [s.prompt for s in other] != [s.prompt for s in again]


def test_needle_recovered():
    assert needle_recovered("The special magic number for Oslo is 4670536.", "4670536")
    assert needle_recovered(" 4670536", " 4670536 ")
    assert not needle_recovered("The number is 467053.", "4670536")
    assert not needle_recovered("", "4670536")


def test_format_prompt(tokenizer):
    chat = format_prompt(tokenizer, "CONTEXT", "QUESTION?")
    assert chat.index("CONTEXT") < chat.index("QUESTION?")
    assert chat.endswith("<|im_start|>assistant\n")
    plain = format_prompt(tokenizer, "CONTEXT", "QUESTION?", "Answer:", chat=False)
    assert plain == "CONTEXT\nQUESTION?\nAnswer:"


def test_depth_grid():
    assert depth_grid(5) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert depth_grid(1) == [0.5]


def test_too_short_context_rejected(tokenizer):
    with pytest.raises(ValueError):
        make_needle_samples(tokenizer, [40], [0.5], seed=0)


def test_needle_prefix_recovered():
    assert needle_prefix_recovered(" 6112099.", "6112099") == 1.0
    assert needle_prefix_recovered("It is 6112099", "6112099") == 1.0      # recovered anywhere counts fully
    assert needle_prefix_recovered(" 612.", "6112099") == pytest.approx(2 / 7)   # "61" then a wrong digit
    assert needle_prefix_recovered(" 61.", "6112099") == pytest.approx(2 / 7)
    assert needle_prefix_recovered(" 6122.", "6112099") == pytest.approx(2 / 7)
    assert needle_prefix_recovered(" 1.", "6112099") == 0.0                 # wrong first digit
    assert needle_prefix_recovered("no number here", "6112099") == 0.0
    assert needle_prefix_recovered(" 46 and 4641705", "4641705") == 1.0
    assert needle_prefix_recovered(" 46, 4641", "4641705") == pytest.approx(2 / 7)  # only the first number
