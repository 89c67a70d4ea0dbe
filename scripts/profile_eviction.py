"""Where an evicting cache's time goes (issue 13): per op, and the share spent scoring and evicting.

Decode (default): prefills ``--length`` tokens of the bench's text (Paul Graham's essays) block by block under each
method (budget ``--budget``), then decodes ``--tokens`` greedy tokens twice: once timed step by step, once under
``torch.profiler``. ``--prefill``: times the block-wise prefill itself, then profiles a second one; the method
``one-forward`` is the bench's full-cache baseline (transformers' SDPA and a ``DynamicCache``, one forward over the
whole prompt), so a prefill's time can be split against it. Prints a Markdown summary: step (or prefill) times, the
time in ``after_attention`` and its kinds' own scoring (:class:`caote.bench.EvictionTimer`), where the profiled time
went by kind of op (:data:`OP_KINDS`: the linear layers, the attention kernels, everything else, and the time
outside any op), and the top ops by self CPU time.

    python scripts/profile_eviction.py --length 2048 --budget 512 --methods streaming,caote,h2o --option slack=15
    python scripts/profile_eviction.py --prefill --length 8192 --budget 512 --methods one-forward,streaming,caote
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function
from transformers import DynamicCache

from caote import hf
from caote.bench import EvictionTimer, prompt_ids
from caote.cache import EvictingCache
from caote.generation import prefill
from caote.models import load_model
from caote.validation import check_option

ONE_FORWARD = "one-forward"
"""The full-cache baseline of ``caote bench`` (``full``): SDPA, a ``DynamicCache``, the whole prompt in one forward."""

OP_KINDS = {
    "linear layers": ("aten::mm", "aten::addmm"),
    "attention kernels": ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::bmm", "aten::_softmax"),
}
"""Ops by self CPU time grouped for the summary (everything else is "other ops"): the model's projections, and the
attention itself (SDPA's kernel; the float32 eager attention's products and softmax)."""


def op_kinds(prof, region_name: str) -> dict[str, float]:
    """Seconds of self CPU time per kind of op (:data:`OP_KINDS`), "other ops", and "outside ops": the wall time of
    the profiled region ``region_name`` (its ``record_function``) not spent in any op (Python, the framework's
    dispatch; the profiler's own overhead included)."""
    seconds = dict.fromkeys([*OP_KINDS, "other ops"], 0.0)
    region = 0.0
    for event in prof.key_averages():
        if event.key == region_name:
            region = event.cpu_time_total / 1e6
            continue
        kind = next((k for k, names in OP_KINDS.items() if event.key in names), "other ops")
        seconds[kind] += event.self_cpu_time_total / 1e6
    seconds["outside ops"] = max(region - sum(seconds.values()), 0.0)
    return seconds


def _decode(model, cache, first: torch.Tensor, tokens: int, times: list[float] | None = None) -> torch.Tensor:
    next_ids = first
    with torch.inference_mode():
        for _ in range(tokens):
            start = time.perf_counter()
            logits = hf.forward(model, next_ids[:, None], cache, logits_to_keep=1).logits[:, -1]
            next_ids = logits.argmax(-1)
            if times is not None:
                times.append(time.perf_counter() - start)
    return next_ids


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--budget", type=int, default=512)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--prefill", action="store_true", help="profile the block-wise prefill instead of decoding")
    p.add_argument("--methods", default="streaming,caote,tova,h2o,snapkv,snapkv+caote")
    p.add_argument("--option", action="append", default=[], type=check_option, metavar="NAME=VALUE")
    p.add_argument("--top", type=int, default=12)
    args = p.parse_args()
    torch.set_num_threads(1)
    options = dict(args.option)
    model, tokenizer = load_model()
    ids = prompt_ids(tokenizer, model.config.vocab_size, args.length)
    phase = "prefill" if args.prefill else "decode"
    what = f"block-wise prefill (block {args.block_size})" if args.prefill else f"{args.tokens} decode tokens"
    print(f"# {phase.title()} profile: SmolLM2-135M, {ids.shape[1]} prompt tokens, budget {args.budget}, {what}, "
          f"one thread, options {options or 'none'}\n")
    print(f"Command: `python scripts/profile_eviction.py{' --prefill' if args.prefill else ''} --length {args.length} "
          f"--budget {args.budget} --block-size {args.block_size} --tokens {args.tokens} --methods {args.methods}"
          + "".join(f" --option {k}={v}" for k, v in options.items()) + "`\n")
    methods = args.methods.split(",")
    if ONE_FORWARD in methods and not args.prefill:
        raise SystemExit(f"{ONE_FORWARD!r} is a prefill baseline: use it with --prefill")
    rows = []
    timer = EvictionTimer()
    for method in methods:
        def new_cache():
            if method == ONE_FORWARD:
                model.set_attn_implementation("sdpa")  # an evicting cache switched it to caote's
                return DynamicCache(config=model.config)
            return EvictingCache(model, budget=args.budget, method=method, block_size=args.block_size, **options)

        def read_prompt(cache):
            if method == ONE_FORWARD:
                with torch.inference_mode():
                    return hf.forward(model, ids, cache, logits_to_keep=1).logits
            return prefill(model, ids, cache, args.block_size)

        times: list[float] = []
        timer.reset()
        with timer.installed(), timer.phase_of(phase):
            cache = new_cache()
            start = time.perf_counter()
            logits = read_prompt(cache)
            if args.prefill:
                times.append(time.perf_counter() - start)
            else:
                timer.reset()
                _decode(model, cache, logits[:, -1].argmax(-1), args.tokens, times)
        evict_s = timer.seconds.get(phase, 0.0)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            with record_function(phase):
                if args.prefill:
                    read_prompt(new_cache())
                else:
                    _decode(model, cache, logits[:, -1].argmax(-1), args.tokens)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=40)
        rows.append((method, statistics.median(times), sum(times), evict_s, table, op_kinds(prof, phase)))
        del cache
        print(f"{method} done", file=sys.stderr, flush=True)
    if args.prefill:
        print("| method | prefill s | scoring + eviction s | share |")
        print("|---|---|---|---|")
        for method, _, total, evict, *_ in rows:
            print(f"| {method} | {total:.2f} | {evict:.2f} | {100 * evict / total:.1f} % |")
    else:
        print("| method | median step ms | mean step ms | scoring + eviction ms/token | share |")
        print("|---|---|---|---|---|")
        for method, median, total, evict, _ in rows:
            print(f"| {method} | {1e3 * median:.1f} | {1e3 * total / args.tokens:.1f} | {1e3 * evict / args.tokens:.2f} "
                  f"| {100 * evict / total:.1f} % |")
    _print_kinds(rows, phase)
    for method, *_, table, _ in rows:
        read = "the whole prompt in one forward" if method == ONE_FORWARD else what
        print(f"\n## {method}: top {args.top} ops by self CPU time ({read})\n\n```\n{table}```")


def _print_kinds(rows: list, phase: str) -> None:
    """Where the profiled time went by kind of op; with a ``one-forward`` row, each kind also as a fraction of that
    baseline's whole profiled prefill (the bench's ``×full``, split into its parts)."""
    base = next((sum(kinds.values()) for method, *_, kinds in rows if method == ONE_FORWARD), None)
    names = [*OP_KINDS, "other ops", "outside ops"]
    unit = " (×one-forward)" if base else ""
    print(f"\n## Profiled {phase} time by kind of op, seconds{unit}\n")
    print("| method | " + " | ".join(names) + " | total |")
    print("|---|" + "---:|" * (len(names) + 1))
    for method, *_, kinds in rows:
        cells = [kinds[name] for name in names] + [sum(kinds.values())]
        print(f"| {method} | " + " | ".join(f"{c:.2f}" + (f" ({c / base:.3f})" if base else "") for c in cells) + " |")


if __name__ == "__main__":
    main()
