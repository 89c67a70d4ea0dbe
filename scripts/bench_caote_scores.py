"""Time CAOTE's two exact forms (:func:`caote.scores._direct_caote_scores`, :func:`caote.scores._expanded_caote_scores`)
on the same random attention rows, for a range of rows per KV head (``G · Q``): the measurement behind
:data:`caote.scores.DIRECT_ROWS` (docs/decisions.md 25). One thread; medians of ``--repeats`` timings.

    python scripts/bench_caote_scores.py --entries 768 --head-dim 64 --rows 1,2,3,4,6,8,16
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from caote import scores


def _time(fn, repeats: int, calls: int) -> float:
    for _ in range(calls // 10 + 1):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - start) / calls)
    return statistics.median(samples)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--entries", type=int, default=768, help="stored entries N (budget + block)")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--rows", default="1,2,3,4,6,8,16", help="rows per KV head (G·Q) to time")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--calls", type=int, default=200)
    args = p.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(1, args.kv_heads, args.entries, args.head_dim, generator=gen)
    print(f"N = {args.entries}, D = {args.head_dim}, {args.kv_heads} KV heads, one thread, "
          f"DIRECT_ROWS = {scores.DIRECT_ROWS}\n")
    print("| rows per KV head | direct µs | expanded µs | max relative difference |")
    print("|---:|---:|---:|---:|")
    for rows in (int(r) for r in args.rows.split(",")):
        weights = torch.softmax(torch.randn(1, args.kv_heads, 1, rows, args.entries, generator=gen) * 3, dim=-1)
        outputs = weights @ values.unsqueeze(2)
        direct = scores._direct_caote_scores(weights, values, outputs, scores.EPS)
        expanded = scores._expanded_caote_scores(weights, values, outputs, scores.EPS)
        difference = ((direct - expanded).abs() / expanded.abs().clamp_min(1e-12)).max().item()
        t_direct = _time(lambda: scores._direct_caote_scores(weights, values, outputs, scores.EPS), args.repeats,
                         args.calls)
        t_expanded = _time(lambda: scores._expanded_caote_scores(weights, values, outputs, scores.EPS), args.repeats,
                           args.calls)
        print(f"| {rows} | {1e6 * t_direct:.0f} | {1e6 * t_expanded:.0f} | {difference:.1e} |")


if __name__ == "__main__":
    main()
