"""Block-wise prefill and greedy decoding through an evicting cache (method.md §1).

The prompt goes through the model ``block_size`` tokens at a time; after each block every layer evicts back
to ``budget`` entries per KV head, so the KV memory never exceeds ``budget + block_size`` entries per layer and
KV head, however long the prompt. Each generated token is appended and evicted back to the budget.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from caote import hf
from caote.cache import EvictingCache


def prefill(
    model,
    input_ids: torch.Tensor,
    cache: EvictingCache,
    block_size: int | None = None,
    progress: bool = False,
    logits_to_keep: int = 1,
) -> torch.Tensor:
    """Feed ``input_ids`` ``(B, L)`` through ``cache`` in blocks; return the logits of the last block.

    ``logits_to_keep=1`` computes only the last position's logits (``(B, 1, V)``); 0 keeps all.
    """
    block_size = block_size or cache.config.block_size
    if input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be (batch, length>0), got shape {tuple(input_ids.shape)}")
    starts = range(0, input_ids.shape[1], block_size)
    logits = None
    with torch.inference_mode():
        for start in tqdm(starts, desc="prefill blocks", unit="block", disable=not progress, leave=False):
            block = input_ids[:, start : start + block_size]
            logits = hf.forward(model, block, cache, logits_to_keep=logits_to_keep).logits
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
    """Keys and values held at the end, all layers."""
    peak_kv_bytes: int
    """Peak keys and values held (new block included), all layers."""
    full_kv_bytes: int
    """What a full cache would hold for the same tokens."""
    evicted_tokens: int
    """Entries evicted per KV head, summed over layers."""
    prefill_seconds: float
    decode_seconds: float
    extra: dict = field(default_factory=dict)

    @property
    def peak_kv_fraction(self) -> float:
        return self.peak_kv_bytes / self.full_kv_bytes if self.full_kv_bytes else 0.0


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


def decode_greedy(model, cache: EvictingCache, first_logits: torch.Tensor, max_new_tokens: int, eos_ids) -> list[int]:
    """Greedy decoding from the prefill's last logits ``(1, V)``, one evicting step per token."""
    new_ids: list[int] = []
    next_id = int(first_logits[0].argmax())
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            new_ids.append(next_id)
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
    **options,
) -> GenerationResult:
    """Read ``prompt`` block by block under a ``budget``-entry cache and answer greedily.

    ``prompt`` is text (the chat template is applied when ``chat`` and the tokenizer has one) or token ids
    ``(1, L)``. ``options`` are :class:`~caote.policy.EvictionConfig` fields (``sink_tokens``, ...).
    """
    input_ids = prompt if isinstance(prompt, torch.Tensor) else encode_prompt(tokenizer, prompt, chat)
    if input_ids.shape[0] != 1:
        raise ValueError("generate() takes one prompt; use EvictingCache directly for equal-length batches")
    input_ids = input_ids.to(model.device)
    cache = EvictingCache(model, budget=budget, method=method, block_size=block_size, **options)
    start = time.perf_counter()
    logits = prefill(model, input_ids, cache, block_size, progress=progress)
    prefill_seconds = time.perf_counter() - start
    eos = tokenizer.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
    start = time.perf_counter()
    new_ids = decode_greedy(model, cache, logits[:, -1], max_new_tokens, eos_ids)
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
    )
