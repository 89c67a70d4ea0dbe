"""Block-wise prefill and greedy decoding through an evicting cache (method.md §1).

The prompt goes through the model ``block_size`` tokens at a time; after each block every global layer evicts back
to ``budget`` entries per KV head, so the KV memory never exceeds ``budget + block_size`` entries per layer and
KV head, however long the prompt (the sliding-window layers of a hybrid model hold their window, ``window - 1 +
block_size`` at most). Each generated token is appended and evicted back to the budget.

Several prompts are read as one padded batch (:func:`align_prompts`): each row is read in the blocks it has alone and
evicts as it would alone; padding is never attended and is evicted first (docs/decisions.md 10).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from caote import hf
from caote.cache import EvictingCache
from caote.layers import padding_inside
from caote.question import QuestionAware
from caote.validation import check_positive_int, resolve_budget


def padded_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Each token's position in its row, ``(B, L)``: the count of the row's tokens before it (padding, 0 in
    ``attention_mask``, gets 0), as transformers' ``generate`` numbers a padded batch."""
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)


def align_prompts(prompts: Sequence[torch.Tensor], block_size: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``(B, T)`` and attention mask ``(B, T)`` (1 = token, 0 = padding) of several prompts ``(1, L_b)`` laid
    out so that a prefill in blocks of ``block_size`` from the first column reads every prompt in the blocks it has
    alone (full blocks from its first token, the last one partial) and ends every prompt at the last column.

    A prompt with fewer blocks than the longest is preceded by whole blocks of padding; its last block, by the padding
    that completes it to the batch's last block (the longest last block; with several blocks that padding sits between
    the prompt's tokens). Eviction after a block depends on which tokens the block held, so this is what makes each
    row evict as it does alone; plain left padding would shift the row's blocks by its padding.
    """
    lengths = [prompt.shape[-1] for prompt in prompts]
    if not lengths or min(lengths) == 0:
        raise ValueError("every prompt needs at least one token")
    blocks = [-(-length // block_size) for length in lengths]
    last = [length - block_size * (count - 1) for length, count in zip(lengths, blocks)]
    total = block_size * (max(blocks) - 1) + max(last)
    ids = torch.full((len(prompts), total), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), total, dtype=torch.long)
    for row, (prompt, length, count, tail) in enumerate(zip(prompts, lengths, blocks, last)):
        prompt = prompt.reshape(-1)
        start, head = block_size * (max(blocks) - count), length - tail
        ids[row, start : start + head], mask[row, start : start + head] = prompt[:head], 1
        ids[row, total - tail :], mask[row, total - tail :] = prompt[head:], 1
    return ids, mask


def prefill(
    model,
    input_ids: torch.Tensor,
    cache: EvictingCache,
    block_size: int | None = None,
    progress: bool = False,
    logits_to_keep: int = 1,
    question_ids: torch.Tensor | None = None,
    question_settings: QuestionAware | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Feed ``input_ids`` ``(B, L)`` through ``cache`` in blocks; return the logits of the last block.

    ``logits_to_keep=1`` computes only the last position's logits (``(B, 1, V)``); 0 keeps all.
    ``question_ids`` ``(B, M)`` (the prompt's last ``M`` tokens: the question) turns on the question-aware mode
    (:mod:`caote.question`): after each block the question probes the cache at its final positions.
    ``attention_mask`` ``(B, L)`` (0 = padding, e.g. from :func:`align_prompts`) reads a padded batch: each block with
    the mask so far and each row's own positions.
    """
    block_size = block_size or cache.config.block_size
    if input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be (batch, length>0), got shape {tuple(input_ids.shape)}")
    if attention_mask is not None and question_ids is not None:
        raise ValueError("the question-aware mode reads one prompt at a time, not a padded batch")
    positions = None if attention_mask is None else padded_positions(attention_mask)
    starts = range(0, input_ids.shape[1], block_size)
    logits = None
    with torch.inference_mode():
        for start in tqdm(starts, desc="prefill blocks", unit="block", disable=not progress, leave=False):
            end = start + block_size
            block = input_ids[:, start:end]
            padding = {} if attention_mask is None else {"attention_mask": attention_mask[:, :end],
                                                         "position_ids": positions[:, start:end]}
            cache.start_block(question_ids is not None)
            logits = hf.forward(model, block, cache, logits_to_keep=logits_to_keep, **padding).logits
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
    return decode_greedy_rows(model, cache, first_logits[:1], max_new_tokens, eos_ids, on_token=on_token)[0]


def decode_greedy_rows(model, cache: EvictingCache, first_logits: torch.Tensor, max_new_tokens: int, eos_ids,
                       attention_mask: torch.Tensor | None = None,
                       on_token: Callable[[int], None] | None = None) -> list[list[int]]:
    """Greedy decoding of every batch row from the prefill's last logits ``(B, V)``, one evicting step per token,
    until every row has produced an end-of-sequence id or ``max_new_tokens``; returns each row's new ids. A finished
    row's later tokens are computed but not kept (rows never see each other). ``attention_mask`` ``(B, L)``: the
    padded batch's mask (0 = padding), extended by each new token. ``on_token``: one row only, see
    :func:`decode_greedy`."""
    batch = first_logits.shape[0]
    if on_token is not None and batch != 1:
        raise ValueError("on_token streams one prompt's answer; decode a batch without it")
    new_ids: list[list[int]] = [[] for _ in range(batch)]
    finished = [False] * batch
    next_ids = first_logits.argmax(-1)
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            for row, token in enumerate(next_ids.tolist()):
                if not finished[row]:
                    new_ids[row].append(token)
                    finished[row] = token in eos_ids
            if on_token is not None:
                on_token(new_ids[0][-1])
            if all(finished):
                break
            padding = {}
            if attention_mask is not None:
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=-1)
                padding = {"attention_mask": attention_mask, "position_ids": padded_positions(attention_mask)[:, -1:]}
            logits = hf.forward(model, next_ids[:, None], cache, logits_to_keep=1, **padding).logits[:, -1]
            next_ids = logits.argmax(-1)
    return new_ids


def generate(
    model,
    tokenizer,
    prompt: str | torch.Tensor | Sequence[str | torch.Tensor],
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
) -> GenerationResult | list[GenerationResult]:
    """Read ``prompt`` block by block under a ``budget``-entry cache and answer greedily.

    ``prompt`` is text (the chat template is applied when ``chat`` and the tokenizer has one) or token ids
    ``(1, L)``. ``budget`` is entries per layer and KV head, or a fraction of the prompt (``0.125`` or
    ``"12.5%"``, rounded up). ``options`` are :class:`~caote.policy.EvictionConfig` fields (``sink_tokens``, ...).
    ``question`` is appended to a text prompt (``prompt + "\\n\\n" + question``). ``question_aware`` (``True`` or
    :class:`~caote.question.QuestionAware` settings) lets the question steer eviction during prefill; with token
    ids as the prompt, ``question_tokens`` says how many of its last tokens are the question. ``on_token`` (off by
    default) receives the answer's text piece by piece while it is generated (streaming); the pieces join to
    ``result.text``.

    A list of prompts is read as one padded batch (:func:`align_prompts`) and returns one result per prompt, each
    the answer that prompt gets alone (each row is read in its own blocks and evicts among its own tokens; a fractional
    budget is of the longest prompt). Their memory fields are the whole batch's cache (all rows, padding slots
    included); ``prompt_tokens`` and ``evicted_tokens`` are the row's. Not with ``question``/``question_aware`` or
    ``on_token``.
    """
    if isinstance(prompt, (list, tuple)):
        if question is not None or question_aware or question_tokens or on_token is not None:
            raise ValueError("a list of prompts is read as one batch: question=, question_aware=, question_tokens= and "
                             "on_token= take one prompt at a time")
        prompts = [_prompt_ids(tokenizer, item, chat) for item in prompt]
        if not prompts:
            raise ValueError("generate() got an empty list of prompts")
        question_len = None
    elif question is not None:
        if isinstance(prompt, torch.Tensor):
            raise ValueError("question= needs a text prompt; with token ids pass question_tokens= instead")
        input_ids, question_len = question_window(tokenizer, prompt, question, chat)
        prompts = [input_ids]
    else:
        prompts, question_len = [_prompt_ids(tokenizer, prompt, chat)], question_tokens
    check_positive_int(max_new_tokens, "max_new_tokens", 64)
    lengths = [ids.shape[1] for ids in prompts]
    budget = resolve_budget(budget, max(lengths))
    settings = question_aware if isinstance(question_aware, QuestionAware) else (QuestionAware() if question_aware else None)
    check_question_options(options, settings is not None)
    if settings is not None and not question_len:
        raise ValueError("question_aware needs the question: pass question= (text prompt) or question_tokens=")
    if any(ids.shape[0] != 1 for ids in prompts):
        raise ValueError("generate() takes one prompt (1, L); pass a list of prompts to read several as a batch")
    cache = EvictingCache(model, budget=budget, method=method, block_size=block_size, **options)
    if len(prompts) == 1:
        input_ids, attention_mask = prompts[0], None
    else:
        input_ids, attention_mask = align_prompts(prompts, block_size, _pad_id(tokenizer))
        if cache.window_layers and padding_inside(attention_mask):
            raise ValueError("these prompts cannot be read as one batch by this model: each is read in its own blocks, "
                             "so padding completes a shorter last block after the prompt's first tokens, and the "
                             "sliding-window layers count that padding in their window. Read them one at a time, or "
                             "batch prompts of the same length modulo block_size (or of one block each)")
        attention_mask = attention_mask.to(model.device)
    input_ids = input_ids.to(model.device)
    start = time.perf_counter()
    question_ids = input_ids[:, -question_len:] if settings is not None else None
    logits = prefill(model, input_ids, cache, block_size, progress=progress, question_ids=question_ids,
                     question_settings=settings, attention_mask=attention_mask)
    prefill_seconds = time.perf_counter() - start
    start = time.perf_counter()
    stream = TextStream(tokenizer, on_token) if on_token is not None else None
    rows = decode_greedy_rows(model, cache, logits[:, -1], max_new_tokens, _eos_ids(tokenizer), attention_mask,
                              on_token=stream)
    if stream is not None:
        stream.flush()
    decode_seconds = time.perf_counter() - start
    results = [GenerationResult(
        text=tokenizer.decode(new_ids, skip_special_tokens=True),
        new_token_ids=new_ids,
        prompt_tokens=length,
        method=cache.config.method,
        budget=cache.config.budget,
        block_size=block_size,
        kv_bytes=cache.kv_bytes(),
        peak_kv_bytes=cache.peak_kv_bytes(),
        full_kv_bytes=cache.full_kv_bytes(),
        evicted_tokens=cache.row_evicted_tokens(row),
        prefill_seconds=prefill_seconds,
        decode_seconds=decode_seconds,
        question_aware=settings is not None,
        global_layers=len(cache.evicting_layers),
        window_layers=len(cache.window_layers),
        sliding_window=max((layer.sliding_window for layer in cache.window_layers), default=None),
        window_kv_bytes=cache.window_kv_bytes(),
        full_peak_kv_bytes=cache.full_peak_kv_bytes(),
        extra={} if attention_mask is None else {"batch_rows": len(prompts), "row": row},
    ) for row, (new_ids, length) in enumerate(zip(rows, lengths))]
    return results if isinstance(prompt, (list, tuple)) else results[0]


def check_question_options(options: dict, question_aware: bool) -> None:
    """Refuse eviction options that belong to the question-aware mode when it is off (``protect_question``)."""
    if options.get("protect_question") and not question_aware:
        raise ValueError("protect_question protects the prompt's question in the question-aware mode: turn it on "
                         "(question_aware=True, --question-aware) or drop the option")


def _prompt_ids(tokenizer, prompt: str | torch.Tensor, chat: bool) -> torch.Tensor:
    """A prompt's token ids ``(1, L)``: text through :func:`encode_prompt`, ids ``(L,)`` or ``(1, L)`` as given."""
    if isinstance(prompt, torch.Tensor):
        return prompt.view(1, -1) if prompt.ndim == 1 else prompt
    return encode_prompt(tokenizer, prompt, chat)


def _eos_ids(tokenizer) -> set[int]:
    eos = tokenizer.eos_token_id
    return set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()


def _pad_id(tokenizer) -> int:
    """The id written where a padded batch has padding (never attended, so any id does): the tokenizer's pad token,
    else its end of sequence, else 0."""
    for token in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if token is not None:
            return token[0] if isinstance(token, list) else int(token)
    return 0
