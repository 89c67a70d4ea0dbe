"""Ask a question about your own text under a KV budget: :func:`ask` (Python) and ``caote ask`` (command line).

The whole text is read block by block through the evicting cache, the question after it
(``generate(prompt=text, question=question)``); the answer is greedy and can be streamed. :func:`read_text_file`
checks a text file (exists, not empty, UTF-8) before any model loads; :func:`answer_credit` scores an answer
against an expected one with partial credit (``caote demo``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass

from caote import validation
from caote.generation import GenerationResult, generate

DEFAULT_METHOD = "snapkv+caote"
DEFAULT_BUDGET = 256
MIB = 1024**2


def read_text_file(value: str | os.PathLike, name: str = "text_file") -> str:
    """The text of file ``value``; a missing, empty (blank) or non-UTF-8 file raises a one-line ``ValueError``
    naming ``name`` (the flag or parameter) and the fix (:func:`caote.validation.read_text_file`)."""
    return validation.read_text_file(value, name, wanted="the text to ask about")


def ask(
    model,
    tokenizer,
    text: str,
    question: str,
    budget: int | float | str | None = DEFAULT_BUDGET,
    method: str = DEFAULT_METHOD,
    question_aware: bool = False,
    max_new_tokens: int = 64,
    stream: Callable[[str], None] | None = None,
    block_size: int = 128,
    chat: bool = True,
    progress: bool = False,
    **options,
) -> GenerationResult:
    """Answer ``question`` about ``text`` (any length) read block by block under ``budget`` entries per layer and
    KV head (or a fraction of the prompt: ``"12.5%"``, ``0.125``); the question comes after the text.

    ``question_aware=True`` lets the question steer eviction while the text is read (question-aware mode,
    :mod:`caote.question`); the default is query-agnostic. ``stream`` receives the answer's text piece by piece as
    it is generated. ``options`` are :class:`~caote.policy.EvictionConfig` fields. Returns the
    :class:`~caote.generation.GenerationResult` (``text``, ``kv_bytes``, ``full_kv_bytes``, ``evicted_tokens``,
    ``prefill_seconds``, ...). A prompt that fits in the budget is read whole (nothing evicted).
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError("text is empty; give the text to ask about")
    if not isinstance(question, str) or not question.strip():
        raise ValueError("question is empty; e.g. question='What is the passphrase?'")
    from caote.validation import check_method

    method = check_method(method)
    if method == "full":
        budget = None
    return generate(model, tokenizer, text, budget=budget, method=method, block_size=block_size,
                    max_new_tokens=max_new_tokens, chat=chat, progress=progress, question=question.strip(),
                    question_aware=question_aware, on_token=stream, **options)


def mode_label(method: str, question_aware: bool) -> str:
    """``"snapkv+caote"``, or ``"snapkv+caote, question-aware"``; ``"full cache"`` for ``full``."""
    label = "full cache" if method == "full" else method
    return f"{label}, question-aware" if question_aware else label


def kv_line(result: GenerationResult) -> str:
    """KV memory held at the end and at its peak, as MiB and as a share of the full cache (the model's own cache:
    every token in the global layers, the window in the sliding-window layers of a hybrid model)."""
    full = result.full_kv_bytes
    held = result.kv_bytes / full if full else 0.0
    return (f"KV held     {result.kv_bytes / MIB:.2f} MiB = {held:.1%} of the full cache ({full / MIB:.2f} MiB); "
            f"peak {result.peak_kv_bytes / MIB:.2f} MiB ({result.peak_kv_fraction:.1%}) while reading")


def layers_line(result: GenerationResult, width: int = 12) -> str | None:
    """For a hybrid model (sliding-window layers), one line on which layers the budget applies to and what each kind
    holds (its label padded to ``width``); ``None`` for a model whose layers are all global."""
    if not result.window_layers:
        return None
    total = result.global_layers + result.window_layers
    held_global = result.kv_bytes - result.window_kv_bytes
    return (f"{'layers':<{width}}the budget applies to the {result.global_layers} global layers of {total} "
            f"({held_global / MIB:.2f} MiB held); the {result.window_layers} sliding-window layers keep their "
            f"{result.sliding_window}-token window ({result.window_kv_bytes / MIB:.2f} MiB)")


def eviction_line(result: GenerationResult) -> str:
    """One line on what was evicted; says so when nothing was (the prompt fits in the budget, or the model has no
    global layer)."""
    if result.budget is None:
        return f"nothing evicted: method full keeps all {result.prompt_tokens} prompt tokens"
    if result.window_layers and not result.global_layers:
        return (f"nothing evicted: every layer of this model is a sliding-window layer, which keeps its "
                f"{result.sliding_window}-token window; the budget applies to global (full-attention) layers only")
    if result.evicted_tokens == 0:
        return (f"nothing evicted: the prompt ({result.prompt_tokens} tokens) and the answer fit in the budget "
                f"({result.budget} entries per layer and KV head)")
    where = (f"while generating: the prompt ({result.prompt_tokens:,} tokens) fits in the budget ({result.budget})"
             if result.prompt_tokens <= result.budget
             else f"the prompt ({result.prompt_tokens:,} tokens) is longer than the budget ({result.budget})")
    return f"evicted     {result.evicted_tokens:,} entries (per KV head, summed over layers) {where}"


def time_line(result: GenerationResult) -> str:
    new = len(result.new_token_ids)
    return (f"time        prefill {result.prefill_seconds:.2f} s "
            f"({result.prompt_tokens / max(result.prefill_seconds, 1e-9):,.0f} tok/s), decode "
            f"{result.decode_seconds:.2f} s ({new} tokens, {new / max(result.decode_seconds, 1e-9):.1f} tok/s)")


# ---------------------------------------------------------------------------------------------- partial credit
_WORD = re.compile(r"[a-z]+|\d+")


@dataclass(frozen=True)
class Credit:
    """How much of an expected answer survived in a generated one (:func:`answer_credit`).

    Attributes:
        found: the expected answer appears as a whole word sequence (see :func:`answer_credit`).
        parts: each expected word and what survived of it: the word itself, a number's leading digits followed by
            ``..`` (``"73.."``), the number followed by ``+`` when the answer's digits run on (``"7312+"``), or
            ``""`` when nothing did.
        score: the share of the expected words present as whole words, a number's leading digits counting
            for their share of its digits and a number whose digits run on for half (1.0 when ``found``).
    """

    found: bool
    parts: tuple[tuple[str, str], ...]
    score: float

    def summary(self) -> str:
        """``"yes"``, ``"no"`` or ``"partial: violet harbour 73.."`` (``_`` for a lost word)."""
        if self.found:
            return "yes"
        if not any(kept for _, kept in self.parts):
            return "no"
        return "partial: " + " ".join(kept or "_" for _, kept in self.parts)


def answer_credit(answer: str, expected: str) -> Credit:
    """Score ``answer`` against ``expected`` (e.g. ``"violet harbour 7312"``), case-insensitively.

    Found: the expected words appear in order, as whole words (no letter or digit just before the first, none
    just after the last, only non-word characters between them). So a number must be followed by a non-digit:
    ``"violet harbour 73121212"`` is not found (a degenerate answer that repeats digits), ``"Violet Harbour
    7312."`` is. Partial credit, word by word: a word present as a whole word counts 1; a number not present
    counts the share of its leading digits that begin a digit run of the answer (``"73"`` of ``7312``: 0.5, shown
    ``"73.."``); a run that continues past the whole number (``"73121212"``: another number) counts 0.5 and is
    shown ``"7312+"``.
    """
    text = answer.lower()
    words = _WORD.findall(expected.lower())
    if not words:
        raise ValueError("expected answer has no words")
    sequence = r"[^a-z0-9]+".join(re.escape(w) for w in words)
    found = re.search(rf"(?<![a-z0-9]){sequence}(?![a-z0-9])", text) is not None
    answer_words = set(_WORD.findall(text))
    runs = re.findall(r"\d+", text)
    parts, total = [], 0.0
    for word in words:
        if word in answer_words:
            parts.append((word, word))
            total += 1.0
        elif word.isdigit():
            best = max((_common_prefix(run, word) for run in runs), default=0)
            if best == len(word):  # the digits run on: a different number that starts with this one
                parts.append((word, word + "+"))
                total += 0.5
            else:
                parts.append((word, f"{word[:best]}.." if best else ""))
                total += best / len(word)
        else:
            parts.append((word, ""))
    return Credit(found=found, parts=tuple(parts), score=1.0 if found else total / len(words))


def _common_prefix(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n
