"""RULER-style synthetic tasks: target lengths, answers in context, determinism, scoring."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from caote.eval.needle import count_tokens
from caote.eval.ruler import (
    DEFAULT_TASKS,
    canonical_task,
    make_ruler_samples,
    score_sample,
    split_sentences,
)

TARGET = 2048
N_OUTPUTS = {
    "niah_single_2": 1,
    "niah_multikey_1": 1,
    "niah_multivalue": 4,
    "variable_tracking": 5,
    "common_words_extraction": 10,
}




@pytest.fixture(scope="module")
def samples(tokenizer):
    return {task: make_ruler_samples(task, tokenizer, TARGET, n=2, seed=0) for task in DEFAULT_TASKS}


def _within(length: int, target: int) -> bool:
    return target - 0.02 * target <= length <= target


@pytest.mark.parametrize("task", DEFAULT_TASKS)
def test_length_and_answers(tokenizer, samples, task):
    name = canonical_task(task)
    for s in samples[task]:
        assert s.task == name and s.metric == "string_match_all"
        assert s.length == count_tokens(tokenizer, s.prompt)
        assert _within(s.length, TARGET), (task, s.length)
        assert len(s.outputs) == N_OUTPUTS[name]
        assert len(set(s.outputs)) == len(s.outputs)
        for answer in s.outputs:
            assert answer in s.context, (task, answer)
        assert s.context in s.input and s.input in s.prompt
        assert s.prompt.endswith(s.answer_prefix.lstrip())


@pytest.mark.parametrize("task", DEFAULT_TASKS)
def test_deterministic_and_seed_dependent(tokenizer, samples, task):
    again = make_ruler_samples(task, tokenizer, TARGET, n=1, seed=0)[0]
    assert again == samples[task][0]
    assert samples[task][0].outputs != samples[task][1].outputs
    other = make_ruler_samples(task, tokenizer, TARGET, n=1, seed=1)[0]
    assert other.outputs != again.outputs and other.prompt != again.prompt


def test_niah_structure(samples):
    single = samples["niah_single"][0]
    (value,) = single.outputs
    key = re.search(r"special magic number for (\S+) mentioned", single.input).group(1)
    assert f"One of the special magic numbers for {key} is: {value}." in single.context
    assert single.input.startswith("A special magic number is hidden")
    multikey = samples["niah_multikey"][0]
    assert multikey.context.count("One of the special magic numbers for") == 4
    multivalue = samples["niah_multivalue"][0]
    key = re.search(r"special magic numbers for (\S+) mentioned", multivalue.input).group(1)
    for v in multivalue.outputs:
        assert f"One of the special magic numbers for {key} is: {v}." in multivalue.context


def test_variable_tracking_chain_resolves(samples):
    for s in samples["vt"]:
        value = re.findall(r"assigned the value (\d+) in the text above", s.input)[-1]  # [0] is the one-shot
        assigns = dict(re.findall(r"VAR (\w+) = (VAR \w+|\d+)", s.context))
        resolved = set()
        changed = True
        while changed:
            changed = False
            for var, rhs in assigns.items():
                if var not in resolved and (rhs == value or rhs.removeprefix("VAR ") in resolved):
                    resolved.add(var)
                    changed = True
        assert resolved == set(s.outputs)
        assert "Answer: According to the chain(s)" in s.input  # the one-shot example


def _word_counts(context: str) -> Counter:
    return Counter(re.findall(r"\d+\. (\S+)", context))


def test_common_words_frequencies(tokenizer, samples):
    for s in samples["cwe"]:  # short-context setting: common words 6x, others once
        counts = _word_counts(s.context)
        assert all(counts[w] == 6 for w in s.outputs)
        assert {c for w, c in counts.items() if w not in s.outputs} == {1}
    long = make_ruler_samples("cwe", tokenizer, 4096, n=1, seed=0)[0]  # RULER's 30x / 3x setting
    assert _within(long.length, 4096)
    counts = _word_counts(long.context)
    assert all(counts[w] == 30 for w in long.outputs)
    assert {c for w, c in counts.items() if w not in long.outputs} == {3}


def test_include_generation_budget(tokenizer):
    s = make_ruler_samples("niah_single", tokenizer, TARGET, n=1, seed=0, include_generation=True)[0]
    assert s.tokens_to_generate == 128
    assert _within(s.length + s.tokens_to_generate, TARGET)


def test_plain_prompt_without_chat(tokenizer):
    s = make_ruler_samples("niah_single", tokenizer, 1024, n=1, seed=0, chat=False)[0]
    assert "<|im_start|>" not in s.prompt
    assert s.prompt == s.input + s.answer_prefix
    assert _within(s.length, 1024)


def test_score_sample(samples):
    s = samples["niah_multivalue"][0]
    assert score_sample(s, " ".join(s.outputs)) == 1.0
    assert score_sample(s, " ".join(s.outputs[:2]).upper()) == 0.5
    assert score_sample(s, "no idea") == 0.0


def test_names_and_errors(tokenizer):
    assert canonical_task("vt") == "variable_tracking"
    assert canonical_task("cwe") == "common_words_extraction"
    with pytest.raises(KeyError):
        canonical_task("qa_1")
    with pytest.raises(ValueError):
        make_ruler_samples("niah_single", tokenizer, 50, n=1, seed=0)


def test_split_sentences():
    assert split_sentences("One. Two! Three? \"Four.\" Five") == ["One.", "Two!", "Three?", "\"Four.\"", "Five"]
