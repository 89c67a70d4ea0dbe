"""Needle-in-a-haystack grid over context lengths x depths (Paul Graham essays as haystack).

Every sample hides its own random fact, RULER style::

    The special magic number for <city> is: <7-digit number>.

so a model cannot answer from prior knowledge. A cell's needle is drawn from the seed and the cell's own
(length, depth) (:func:`needle_for_cell`), so it does not depend on the rest of the grid. Samples are built
with :func:`caote.texts.insert_needle`, which cuts the haystack, places the needle at the requested depth
(moved back to the previous sentence end) and returns the context.

Lengths and positions, all in tokens of the given tokenizer:

* ``context_length`` is the length of the whole formatted prompt (chat template, instruction, question
  and answer prefix included), i.e. what the model's KV cache holds after prefill. The haystack is
  sized so that the prompt hits it (usually exactly; a token or two off at worst).
* ``depth`` is the fraction of the *context* (haystack + needle) that comes before the needle.
* ``context_needle_start`` is the needle's first token within the context alone;
  ``needle_token_start`` is the same token's index within the whole prompt.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Sequence

from caote.texts import insert_needle, paul_graham_essays

# Cities as needle keys (the needlehaystack / RULER style "special magic number for <city>").
CITIES: tuple[str, ...] = (
    "Amsterdam", "Athens", "Auckland", "Bangkok", "Barcelona", "Beijing", "Berlin", "Bogota",
    "Boston", "Brussels", "Budapest", "Buenos Aires", "Cairo", "Cape Town", "Casablanca", "Chicago",
    "Copenhagen", "Dakar", "Dublin", "Edinburgh", "Florence", "Geneva", "Hanoi", "Havana",
    "Helsinki", "Istanbul", "Jakarta", "Karachi", "Kyoto", "Lagos", "Lima", "Lisbon",
    "London", "Madrid", "Manila", "Marseille", "Melbourne", "Mexico City", "Montreal", "Moscow",
    "Mumbai", "Munich", "Nairobi", "Naples", "Oslo", "Ottawa", "Panama City", "Paris",
    "Prague", "Quito", "Reykjavik", "Riga", "Rome", "Santiago", "Seoul", "Singapore",
    "Stockholm", "Sydney", "Taipei", "Tallinn", "Tokyo", "Toronto", "Valencia", "Vancouver",
    "Venice", "Vienna", "Vilnius", "Warsaw", "Wellington", "Zagreb", "Zurich", "Osaka",
)

INSTRUCTION = (
    "A special magic number is hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the number afterwards."
)
NEEDLE_TEMPLATE = " The special magic number for {key} is: {value}."
QUESTION_TEMPLATE = "What is the special magic number for {key} mentioned in the provided text?"
ANSWER_PREFIX_TEMPLATE = "The special magic number for {key} mentioned in the provided text is"


@dataclass(frozen=True)
class NeedleSample:
    """One cell of the needle grid."""

    context_length: int  # requested prompt length in tokens
    depth: float  # requested needle depth, fraction of the context
    key: str  # the city the question asks about
    answer: str  # the needle's value (7-digit number) to look for in the generated answer
    needle: str  # the inserted sentence
    context: str  # haystack with the needle inside (instruction not included)
    question: str
    answer_prefix: str  # already at the end of ``prompt`` (after the assistant turn start)
    prompt: str  # fully formatted model input (chat template applied when the tokenizer has one)
    prompt_tokens: int  # actual token count of ``prompt``
    context_tokens: int  # actual token count of ``context``
    context_needle_start: int  # needle's first token index within ``context``
    needle_token_start: int  # needle's first token index within ``prompt``

    @property
    def actual_depth(self) -> float:
        return self.context_needle_start / max(1, self.context_tokens)


# ----------------------------------------------------------------------------------------------
# prompt formatting


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def wrap_chat(tokenizer, user_text: str, answer_prefix: str = "", *, chat: bool | None = None) -> str:
    """Put ``user_text`` in a user turn (when the tokenizer has a chat template) and open the reply.

    ``answer_prefix`` is appended after the start of the assistant turn, as RULER does, so that the
    model continues it. Without a chat template (or with ``chat=False``) the result is plain text.
    """
    use_chat = has_chat_template(tokenizer) if chat is None else chat
    if use_chat:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": user_text}], tokenize=False, add_generation_prompt=True
        )
        return text + answer_prefix
    return user_text + ("\n" + answer_prefix if answer_prefix else "\n")


def format_prompt(
    tokenizer,
    context: str,
    question: str,
    answer_prefix: str = "",
    *,
    instruction: str | None = None,
    chat: bool | None = None,
) -> str:
    """Model input: (instruction,) context, then the question; chat template applied if present."""
    parts = [instruction] if instruction else []
    parts += [context, question]
    return wrap_chat(tokenizer, "\n".join(parts), answer_prefix, chat=chat)


def count_tokens(tokenizer, text: str) -> int:
    """Token count of ``text`` as fed to the model (no extra special tokens: templates carry theirs)."""
    return len(tokenizer.encode(text, add_special_tokens=False))


def token_index_of_char(tokenizer, text: str, char_index: int) -> int:
    """Index of the token of ``text`` that contains (or first follows) character ``char_index``."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
    except (NotImplementedError, TypeError, ValueError, KeyError):
        offsets = None
    if offsets:
        for i, (_, end) in enumerate(offsets):
            if end > char_index:
                return i
        return len(offsets)
    return count_tokens(tokenizer, text[:char_index])


def needle_recovered(answer_text: str, expected: str) -> bool:
    """Whether the needle's value appears in the generated answer (case-insensitive)."""
    return expected.strip().lower() in answer_text.lower()


def needle_prefix_recovered(answer_text: str, expected: str) -> float:
    """Partial credit: the share of the needle value's leading characters that the answer reproduces.

    The answer's first number (first run of digits) is compared with the value from its first character on;
    the length of their common prefix is divided by the value's length. 1.0 whenever
    :func:`needle_recovered` holds; 0.0 when the answer has no digits. Not a RULER metric: it is reported
    beside the binary recall because a model whose cache lost the needle's later tokens often starts the
    value correctly and then stops (``" 61."`` for ``6112099``), which the binary score cannot tell from a
    guess.
    """
    value = expected.strip()
    if not value or needle_recovered(answer_text, value):
        return 1.0 if value else 0.0
    match = re.search(r"\d+", answer_text)
    if match is None:
        return 0.0
    number = match.group(0)
    prefix = 0
    while prefix < min(len(number), len(value)) and number[prefix] == value[prefix]:
        prefix += 1
    return prefix / len(value)


# ----------------------------------------------------------------------------------------------
# haystack


_ESSAYS: str | None = None


def essays() -> str:
    """Paul Graham essays (read once per process)."""
    global _ESSAYS
    if _ESSAYS is None:
        _ESSAYS = paul_graham_essays()
    return _ESSAYS


def haystack_prefix(tokenizer, haystack: str, min_tokens: int) -> str:
    """A character prefix of ``haystack`` with at least ``min_tokens`` tokens, so that callers do not
    tokenize the whole ~150k-token corpus for every sample. Repeats the haystack if it is too short."""
    n_chars = max(4096, 6 * min_tokens)
    while True:
        if n_chars >= len(haystack):
            if count_tokens(tokenizer, haystack) >= min_tokens:
                return haystack
            haystack = haystack + "\n\n" + haystack
            continue
        prefix = haystack[:n_chars]
        if count_tokens(tokenizer, prefix) >= min_tokens:
            return prefix
        n_chars *= 2


def needle_for_cell(seed: int, context_length: int, depth: float) -> tuple[str, str]:
    """The (city, 7-digit number) hidden in the cell ``(context_length, depth)`` of the grid drawn with ``seed``.

    Drawn from the cell's own coordinates, never from its place in a grid: the same cell gets the same needle
    whatever other lengths and depths are asked for and in whatever order, so methods run on different grids are
    compared on the same needles and a resumed run never meets a needle another grid drew there. (Two cells may
    share a city or a number; each prompt holds only its own needle.)"""
    rng = random.Random(f"caote-needle:{int(seed)}:{int(context_length)}:{float(depth)!r}")
    return rng.choice(CITIES), str(rng.randint(1_000_000, 9_999_999))


def needle_id(key: str, value: str) -> str:
    """How a record names its needle (part of its cell's key, :data:`caote.eval.runner.GRID_FIELDS`)."""
    return f"{key}: {value}"


def make_needle_sample(
    tokenizer,
    context_length: int,
    depth: float,
    key: str,
    value: str,
    *,
    haystack: str | None = None,
    chat: bool | None = None,
    answer_prefix: bool = True,
    max_adjust: int = 4,
) -> NeedleSample:
    """One needle sample whose formatted prompt has (about) ``context_length`` tokens."""
    needle = NEEDLE_TEMPLATE.format(key=key, value=value)
    question = QUESTION_TEMPLATE.format(key=key)
    prefix = ANSWER_PREFIX_TEMPLATE.format(key=key) if answer_prefix else ""

    def build(context: str) -> str:
        return format_prompt(tokenizer, context, question, prefix, instruction=INSTRUCTION, chat=chat)

    overhead = count_tokens(tokenizer, build(""))
    target_ctx = context_length - overhead
    if target_ctx <= count_tokens(tokenizer, needle) + 8:
        raise ValueError(f"context_length={context_length} is too short for the prompt overhead ({overhead} tokens)")
    hay = haystack_prefix(tokenizer, haystack if haystack is not None else essays(), target_ctx + 64)

    ctx_budget = target_ctx
    context = prompt = ""
    n_prompt = 0
    for _ in range(max_adjust):
        context = insert_needle(tokenizer, hay, needle, ctx_budget, depth)
        prompt = build(context)
        n_prompt = count_tokens(tokenizer, prompt)
        if n_prompt == context_length:
            break
        ctx_budget += context_length - n_prompt  # retokenization at the seams moved it by a few tokens

    char_ctx = context.index(needle)
    char_prompt = prompt.index(context) + char_ctx
    return NeedleSample(
        context_length=context_length,
        depth=float(depth),
        key=key,
        answer=value,
        needle=needle,
        context=context,
        question=question,
        answer_prefix=prefix,
        prompt=prompt,
        prompt_tokens=n_prompt,
        context_tokens=count_tokens(tokenizer, context),
        context_needle_start=token_index_of_char(tokenizer, context, char_ctx),
        needle_token_start=token_index_of_char(tokenizer, prompt, char_prompt),
    )


def make_needle_samples(
    tokenizer,
    lengths: Sequence[int],
    depths: Sequence[float],
    seed: int = 0,
    *,
    haystack: str | None = None,
    chat: bool | None = None,
    answer_prefix: bool = True,
) -> list[NeedleSample]:
    """The grid ``lengths x depths`` (lengths outer), one sample per cell, each with its own needle
    (:func:`needle_for_cell`: a function of the seed and the cell alone).

    ``lengths`` are prompt lengths in tokens; ``depths`` fractions in [0, 1]. Deterministic for a seed.
    """
    return [
        make_needle_sample(
            tokenizer, int(L), float(d), *needle_for_cell(seed, L, d), haystack=haystack, chat=chat,
            answer_prefix=answer_prefix,
        )
        for L in lengths
        for d in depths
    ]


def depth_grid(n: int) -> list[float]:
    """``n`` evenly spaced depths from 0 to 1 inclusive (the usual needle plot's y axis)."""
    if n < 1:
        raise ValueError("n must be >= 1")
    if n == 1:
        return [0.5]
    return [round(i / (n - 1), 4) for i in range(n)]


__all__ = [
    "CITIES",
    "NeedleSample",
    "count_tokens",
    "depth_grid",
    "format_prompt",
    "has_chat_template",
    "haystack_prefix",
    "make_needle_sample",
    "make_needle_samples",
    "needle_for_cell",
    "needle_id",
    "needle_recovered",
    "token_index_of_char",
    "wrap_chat",
]
