"""How low can the bounded perplexity gap go at a budget? An oracle that knows the future attention.

``caote eval ppl``'s bounded protocol reads a window block by block and keeps ``budget`` entries per layer and KV
head after each block. This script replaces the method's score by what the *full-cache* model's later queries
actually attend to (recorded in one full forward of the window, float32 eager attention, mean over the query heads
of a KV head):

* ``oracle-next``: the attention mass the next block's queries put on each entry — the entries the next block's
  perplexity depends on, as seen by the unevicted model;
* ``oracle-future``: the mass of every later query (entries needed anywhere after this point).

Per-layer, per-head top-``budget`` selection by these masses is what an attention-score policy could at best aim
for; if its gap stays above a target, no attention-score ranking reaches that target at that budget.
(An oracle of attention mass, not of the perplexity itself: a lower bound on what ranking by future attention
gives, not on every conceivable selection.)

Usage (records appended to a JSON-lines file, one per window and method; printed as a table)::

    python scripts/oracle_gap.py --length 4096 --budget 512 --samples 2 --out results/smollm2/oracle.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from caote import EvictingCache, hf, load_model
from caote.eval.runner import book_windows, evicted_nll
from caote.methods import Base, registry

RECORDER = "caote_oracle_recorder"


class FutureAttention:
    """Per layer, the attention mass every block of queries puts on every entry: ``(blocks, H_kv, L)``."""

    def __init__(self, block_size: int):
        self.block_size = block_size
        self.mass: dict[int, torch.Tensor] = {}

    def attention(self, module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        batch, q_heads, q_len, dim = query.shape
        kv_heads = key.shape[1]
        group = q_heads // kv_heads
        out = torch.empty(batch, q_heads, q_len, dim, dtype=torch.float32)
        blocks = []
        for start in range(0, q_len, self.block_size):  # one block of queries at a time: bounded memory
            q = query[:, :, start : start + self.block_size].float()
            logits = torch.einsum("bhqd,bhkd->bhqk", q, key.float().repeat_interleave(group, dim=1)) * scaling
            logits = logits + attention_mask[:, :, start : start + self.block_size].float()
            weights = torch.softmax(logits, dim=-1)
            out[:, :, start : start + self.block_size] = weights @ value.float().repeat_interleave(group, dim=1)
            blocks.append(weights[0].view(kv_heads, group, -1, key.shape[2]).sum(dim=2).mean(dim=1))
        self.mass[module.layer_idx] = torch.stack(blocks)
        return out.transpose(1, 2).to(query.dtype).contiguous(), None


def record_future_attention(model, ids: torch.Tensor, block_size: int) -> dict[int, torch.Tensor]:
    recorder = FutureAttention(block_size)
    AttentionInterface.register(RECORDER, recorder.attention)
    AttentionMaskInterface.register(RECORDER, eager_mask)
    previous = model.config._attn_implementation
    model.set_attn_implementation(RECORDER)
    try:
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
    finally:
        model.set_attn_implementation(previous)
    return recorder.mass


def oracle_base(name: str, tables: dict[int, torch.Tensor], block_size: int, future: bool) -> Base:
    """A base whose score is the recorded future attention (needs the layer: each cache layer's facts carry it)."""

    def importance(view):
        layer_mass = view.facts.oracle_mass  # (blocks, H_kv, L)
        next_block = view.seen // block_size  # the step just read ends at ``seen``: the next block's queries
        if next_block >= layer_mass.shape[0]:
            chosen = torch.zeros_like(layer_mass[0])
        elif future:
            chosen = layer_mass[next_block:].sum(dim=0)
        else:
            chosen = layer_mass[next_block]
        return chosen.unsqueeze(0).gather(-1, view.positions)

    return Base(name, "oracle: recorded future attention", importance, correctable=False)


def oracle_nll(model, ids: torch.Tensor, name: str, budget: int, block_size: int, tables) -> tuple[float, int]:
    """The bounded protocol's NLL (:func:`caote.eval.runner.evicted_nll`) with the oracle: each cache layer's facts
    carry its recorded masses."""
    cache = EvictingCache(model, budget=budget, method=name, block_size=block_size)
    for index, layer in enumerate(cache.layers):
        layer.facts.oracle_mass = tables[index]
    return evicted_nll(model, ids, name, budget, block_size, cache=cache)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--budget", type=int, default=512)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--methods", default="full,caote,oracle-next,oracle-future")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = load_model()
    hf.attach(model)
    done = set()
    if args.out.exists():
        done = {(r["sample"], r["method"], r["budget"]) for r in map(json.loads, args.out.read_text().splitlines())}
    for sample, tokens in book_windows(tokenizer, args.length, args.samples):
        ids = torch.tensor([tokens])
        tables = None
        for method in args.methods.split(","):
            budget = None if method == "full" else args.budget
            if (sample, method, budget) in done:
                continue
            start = time.perf_counter()
            if method.startswith("oracle"):
                if tables is None:
                    tables = record_future_attention(model, ids, args.block_size)
                registry.BASE_BY_NAME[method] = oracle_base(method, tables, args.block_size, method == "oracle-future")
                registry.resolve.cache_clear()
                nll, count = oracle_nll(model, ids, method, budget, args.block_size, tables)
            else:
                nll, count = evicted_nll(model, ids, method, budget, args.block_size)
            record = {"sample": sample, "length": args.length, "method": method, "budget": budget,
                      "block_size": args.block_size, "ppl": math.exp(nll / count),
                      "seconds": round(time.perf_counter() - start, 1)}
            with args.out.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
            print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
