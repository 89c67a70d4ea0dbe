"""Block-wise prefill and greedy decoding through an evicting cache (method.md §1).

The prompt goes through the model ``block_size`` tokens at a time; after each block every global layer evicts back
to ``budget`` entries per KV head, so the KV memory never exceeds ``budget + block_size`` entries per layer and
KV head, however long the prompt (the sliding-window layers of a hybrid model hold their window, ``window - 1 +
block_size`` at most). Each generated token is appended and evicted back to the budget.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from caote import hf
from caote.cache import EvictingCache
from caote.question import QuestionAware
from caote.validation import check_positive_int, resolve_budget


def prefill(
    model,
    input_ids: torch.Tensor,
    cache: EvictingCache,
    block_size: int | None = None,
    progress: bool = False,
    logits_to_keep: int = 1,
    question_ids: torch.Tensor | None = None,
    question_settings: QuestionAware | None = None,
) -> torch.Tensor:
    """Feed ``input_ids`` ``(B, L)`` through ``cache`` in blocks; return the logits of the last block.

    ``logits_to_keep=1`` computes only the last position's logits (``(B, 1, V)``); 0 keeps all.
    ``question_ids`` ``(B, M)`` (the prompt's last ``M`` tokens: the question) turns on the question-aware mode
    (:mod:`caote.question`): after each block the question probes the cache at its final positions.
    """
    block_size = block_size or cache.config.block_size
    if input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be (batch, length>0), got shape {tuple(input_ids.shape)}")
    starts = range(0, input_ids.shape[1], block_size)
    logits = None
    with torch.inference_mode():
        for start in tqdm(starts, desc="prefill blocks", unit="block", disable=not progress, leave=False):
            block = input_ids[:, start : start + block_size]
            cache.start_block(question_ids is not None)
            logits = hf.forward(model, block, cache, logits_to_keep=logits_to_keep).logits
            if question_ids is not None:
                cache.probe_question(model, question_ids, input_ids.shape[1] - 1,
                                     question_settings or QuestionAware())
    return logits


@dataclass
class GenerationResult:
    """What :func:`generate` produced and what it cost."""

    text: str
    new_token_ids: list[int]
    prompt_tokens: int
    method: str
    budget: int | None
    block_size: int
    kv_bytes: int
    """Keys and values held at the end, all layers (sliding-window layers included)."""
    peak_kv_bytes: int
    """Peak keys and values held (new block included), all layers."""
    full_kv_bytes: int
    """What a full cache (the model's own: the window in sliding-window layers) would hold for the same tokens."""
    evicted_tokens: int
    """Entries evicted per KV head, summed over layers."""
    prefill_seconds: float
    decode_seconds: float
    question_aware: bool = False
    """Whether the question steered eviction during prefill (question-aware mode, :mod:`caote.question`)."""
    global_layers: int = 0
    """Layers the budget applies to (full attention)."""
    window_layers: int = 0
    """Sliding-window layers of a hybrid model: each keeps its window (never evicting)."""
    sliding_window: int | None = None
    """The largest window of those layers (``None`` without any)."""
    window_kv_bytes: int = 0
    """Of ``kv_bytes``, what the sliding-window layers hold."""
    full_peak_kv_bytes: int = 0
    """The full cache's peak for the same steps (its sliding-window layers hold a step beyond their window while it
    attends); 0 = ``full_kv_bytes``."""
    extra: dict = field(default_factory=dict)

    @property
    def peak_kv_fraction(self) -> float:
        """Peak KV memory as a share of the full cache's peak (for a model without sliding-window layers, of
        ``full_kv_bytes``)."""
        full = self.full_peak_kv_bytes or self.full_kv_bytes
        return self.peak_kv_bytes / full if full else 0.0


def encode_prompt(tokenizer, prompt: str, chat: bool = True) -> torch.Tensor:
    """Token ids ``(1, L)``; with ``chat`` the tokenizer's chat template (when it has one) wraps the prompt."""
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    else:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
    return ids


def question_window(tokenizer, context: str, question: str, chat: bool = True) -> tuple[torch.Tensor, int]:
    """Token ids ``(1, L)`` of the prompt ``context + "\\n\\n" + question`` (chat template as
    :func:`encode_prompt`) and the length ``M`` of its question window: every token after the longest common prefix
    with the context-only prompt (the question and the template's closing tokens)."""
    ids = encode_prompt(tokenizer, f"{context}\n\n{question}", chat)
    context_ids = encode_prompt(tokenizer, context, chat)
    common = 0
    for a, b in zip(ids[0].tolist(), context_ids[0].tolist()):
        if a != b:
            break
        common += 1
    return ids, max(ids.shape[1] - common, 1)


class TextStream:
    """Turns token ids, one at a time, into the new text they add (for streaming): each call decodes the ids so far
    (special tokens skipped) and passes what was not yet emitted to ``on_token``; text that ends in an incomplete
    character (``\ufffd``) waits for the next token. The pieces join to ``tokenizer.decode(ids, skip_special_tokens=
    True)``."""

    def __init__(self, tokenizer, on_token: Callable[[str], None]):
        self.tokenizer, self.on_token = tokenizer, on_token
        self.ids: list[int] = []
        self.emitted = ""

    def __call__(self, token_id: int) -> None:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            self._emit(text)

    def flush(self) -> None:
        self._emit(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    def _emit(self, text: str) -> None:
        if text.startswith(self.emitted) and len(text) > len(self.emitted):
            self.on_token(text[len(self.emitted):])
            self.emitted = text


def decode_greedy(model, cache: EvictingCache, first_logits: torch.Tensor, max_new_tokens: int, eos_ids,
                  on_token: Callable[[int], None] | None = None) -> list[int]:
    """Greedy decoding from the prefill's last logits ``(1, V)``, one evicting step per token; ``on_token`` (if
    given) is called with each new token id as soon as it is chosen (:class:`TextStream` turns ids into text)."""
    new_ids: list[int] = []
    next_id = int(first_logits[0].argmax())
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            new_ids.append(next_id)
            if on_token is not None:
                on_token(next_id)
            if next_id in eos_ids:
                break
            step = torch.tensor([[next_id]], device=first_logits.device)
            logits = hf.forward(model, step, cache, logits_to_keep=1).logits[:, -1]
            next_id = int(logits[0].argmax())
    return new_ids


def generate(
    model,
    tokenizer,
    prompt: str | torch.Tensor,
    budget: int | None = None,
    method: str = "caote",
    block_size: int = 128,
    max_new_tokens: int = 64,
    chat: bool = True,
    progress: bool = False,
    question: str | None = None,
    question_aware: bool | QuestionAware = False,
    question_tokens: int | None = None,
    on_token: Callable[[str], None] | None = None,
    **options,
) -> GenerationResult:
    """Read ``prompt`` block by block under a ``budget``-entry cache and answer greedily.

    ``prompt`` is text (the chat template is applied when ``chat`` and the tokenizer has one) or token ids
    ``(1, L)``. ``budget`` is entries per layer and KV head, or a fraction of the prompt (``0.125`` or
    ``"12.5%"``, rounded up). ``options`` are :class:`~caote.policy.EvictionConfig` fields (``sink_tokens``, ...).
    ``question`` is appended to a text prompt (``prompt + "\\n\\n" + question``). ``question_aware`` (``True`` or
    :class:`~caote.question.QuestionAware` settings) lets the question steer eviction during prefill; with token
    ids as the prompt, ``question_tokens`` says how many of its last tokens are the question. ``on_token`` (off by
    default) receives the answer's text piece by piece while it is generated (streaming); the pieces join to
    ``result.text``.
    """
    question_len = question_tokens
    if question is not None:
        if isinstance(prompt, torch.Tensor):
            raise ValueError("question= needs a text prompt; with token ids pass question_tokens= instead")
        input_ids, question_len = question_window(tokenizer, prompt, question, chat)
    else:
        input_ids = prompt if isinstance(prompt, torch.Tensor) else encode_prompt(tokenizer, prompt, chat)
    check_positive_int(max_new_tokens, "max_new_tokens", 64)
    budget = resolve_budget(budget, input_ids.shape[1])
    settings = question_aware if isinstance(question_aware, QuestionAware) else (QuestionAware() if question_aware else None)
    if settings is not None and not question_len:
        raise ValueError("question_aware needs the question: pass question= (text prompt) or question_tokens=")
    if input_ids.shape[0] != 1:
        raise ValueError("generate() takes one prompt; use EvictingCache directly for equal-length batches")
    input_ids = input_ids.to(model.device)
    cache = EvictingCache(model, budget=budget, method=method, block_size=block_size, **options)
    start = time.perf_counter()
    question_ids = input_ids[:, -question_len:] if settings is not None else None
    logits = prefill(model, input_ids, cache, block_size, progress=progress, question_ids=question_ids,
                     question_settings=settings)
    prefill_seconds = time.perf_counter() - start
    eos = tokenizer.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
    start = time.perf_counter()
    stream = TextStream(tokenizer, on_token) if on_token is not None else None
    new_ids = decode_greedy(model, cache, logits[:, -1], max_new_tokens, eos_ids, on_token=stream)
    if stream is not None:
        stream.flush()
    decode_seconds = time.perf_counter() - start
    return GenerationResult(
        text=tokenizer.decode(new_ids, skip_special_tokens=True),
        new_token_ids=new_ids,
        prompt_tokens=input_ids.shape[1],
        method=cache.config.method,
        budget=cache.config.budget,
        block_size=block_size,
        kv_bytes=cache.kv_bytes(),
        peak_kv_bytes=cache.peak_kv_bytes(),
        full_kv_bytes=cache.full_kv_bytes(),
        evicted_tokens=cache.evicted_tokens,
        prefill_seconds=prefill_seconds,
        decode_seconds=decode_seconds,
        question_aware=settings is not None,
        global_layers=len(cache.evicting_layers),
        window_layers=len(cache.window_layers),
        sliding_window=max((layer.sliding_window for layer in cache.window_layers), default=None),
        window_kv_bytes=cache.window_kv_bytes(),
        full_peak_kv_bytes=cache.full_peak_kv_bytes(),
    )
