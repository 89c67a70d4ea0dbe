"""``caote eval {ppl,niah,tasks}`` and ``caote report``: subcommands added to the main ``caote`` parser
(:func:`add_parsers`) and run by :func:`handle` (see :mod:`caote.cli`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from caote.policy import METHODS

COMMANDS = ("eval", "report")


def _common(p: argparse.ArgumentParser, lengths: str, budgets: str) -> None:
    p.add_argument("--model", default=None, help="model folder or hub id (default: offline SmolLM2-135M-Instruct)")
    p.add_argument("--methods", default="all",
                   help=f"comma list of methods (default: all {len(METHODS)}: {', '.join(METHODS)})")
    p.add_argument("--budgets", default=budgets, help=f"comma list of KV budgets, tokens per layer and KV head "
                                                      f"(default {budgets}); 'full' ignores them")
    p.add_argument("--block-size", type=int, default=128, help="prompt tokens per prefill block (default 128)")
    p.add_argument("--lengths", default=lengths, help=f"comma list of context lengths in tokens (default {lengths})")
    p.add_argument("--out", type=Path, default=Path("results"), help="results folder (default ./results)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample generators (default 0)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_parsers(sub) -> None:
    """Add ``eval`` (with ``ppl``, ``niah``, ``tasks``) and ``report`` to the main parser's subparsers."""
    ev = sub.add_parser("eval", help="evaluate eviction methods over budgets and lengths (resumable)",
                        description="Results are appended to <out>/<eval>.jsonl as each cell finishes; "
                                    "rerunning skips finished cells.")
    evsub = ev.add_subparsers(dest="eval_name", required=True)

    p = evsub.add_parser("ppl", help="perplexity under eviction on Jane Austen's novels")
    _common(p, lengths="1024,2048", budgets="64,128,256,512")
    p.add_argument("--samples", "--limit", dest="samples", type=int, default=2,
                   help="text windows per length: the opening of each novel in turn (default 2)")
    p.add_argument("--books", default=None, help="comma list of novels (default: all six, in publication order)")

    p = evsub.add_parser("niah", help="needle in a haystack over lengths x depths")
    _common(p, lengths="1024,2048,4096", budgets="64,128,256,512")
    p.add_argument("--depths", default="5", help="number of evenly spaced depths, or a comma list of fractions "
                                                  "(default 5)")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--no-chat", action="store_true", help="plain prompt without the chat template")

    p = evsub.add_parser("tasks", help="RULER tasks and (with --longbench-dir) LongBench")
    _common(p, lengths="2048,4096", budgets="128,256,512")
    p.add_argument("--tasks", default=None, help="comma list of RULER tasks (default: niah_single, niah_multikey, "
                                                 "niah_multivalue, vt, cwe); 'none' for LongBench only")
    p.add_argument("--samples", "--limit", dest="samples", type=int, default=2,
                   help="samples per task and length (LongBench: first N records per dataset) (default 2)")
    p.add_argument("--longbench-dir", type=Path, default=None,
                   help="folder of LongBench <dataset>.jsonl files (offline); all found are run")
    p.add_argument("--longbench-tasks", default=None, help="comma list of LongBench datasets within --longbench-dir")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="cap on each task's generation length (default: the task's own)")
    p.add_argument("--window", type=int, default=None,
                   help="LongBench truncation window incl. generation (default: the model's, e.g. 8192)")
    p.add_argument("--no-chat", action="store_true", help="RULER prompts without the chat template")

    rp = sub.add_parser("report", help="markdown tables and PNG plots from an eval results folder")
    rp.add_argument("--out", type=Path, default=Path("results"), help="results folder (default ./results)")
    rp.add_argument("--heatmap-budget", type=int, default=None,
                    help="budget of the needle heatmaps (default: the smallest evaluated)")


def _depths(text: str):
    text = text.strip()
    if "," not in text and "." not in text:
        return int(text)
    return [float(x) for x in text.split(",") if x.strip()]


def run_eval_command(args) -> int:
    import torch

    from caote.eval import runner
    from caote.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    methods = runner.parse_methods(args.methods)
    budgets = runner.parse_list(args.budgets, int)
    lengths = runner.parse_list(args.lengths, int)
    runner.method_budgets(methods, budgets)  # fail before loading the model
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    common = {"methods": methods, "budgets": budgets, "lengths": lengths, "block_size": args.block_size,
                  "progress": not args.no_progress, "seed": args.seed}
    if args.eval_name == "ppl":
        kwargs = {"samples": args.samples, "books": runner.parse_list(args.books) or None}
    elif args.eval_name == "niah":
        kwargs = {"depths": _depths(args.depths), "max_new_tokens": args.max_new_tokens,
                      "chat": False if args.no_chat else None}
    else:
        tasks = None if args.tasks is None else ([] if args.tasks.strip().lower() == "none"
                                                 else runner.parse_list(args.tasks))
        kwargs = {"tasks": tasks, "samples": args.samples, "longbench_dir": args.longbench_dir,
                      "longbench_tasks": runner.parse_list(args.longbench_tasks) or None,
                      "max_new_tokens": args.max_new_tokens, "window": args.window,
                      "chat": False if args.no_chat else None}
    settings = {k: v for k, v in vars(args).items() if k not in ("eval_handler",)}
    settings["model_label"] = runner.model_name(model)
    summary = runner.run_eval(args.eval_name, model, tokenizer, out=args.out, settings=settings,
                              **common, **kwargs)
    print(f"{args.eval_name}: {summary['computed']} cell(s) computed, {summary['skipped']} already done "
          f"-> {summary['path']}")
    return 0


def run_report_command(args) -> int:
    from caote.eval.report import write_report

    result = write_report(args.out, heatmap_budget=args.heatmap_budget)
    print(f"wrote {result['markdown']}")
    for path in result["plots"]:
        print(f"wrote {path}")
    return 0


def handle(args) -> int:
    """Run a parsed ``eval`` or ``report`` command; errors in the arguments print and return 2."""
    try:
        if args.command == "eval":
            return run_eval_command(args)
        if args.command == "report":
            return run_report_command(args)
    except (ValueError, KeyError, FileNotFoundError) as error:
        print(f"caote: error: {error}", file=sys.stderr)
        return 2
    raise ValueError(f"not an eval command: {args.command!r}")


def main(argv=None) -> int:
    """Stand-alone entry (``python -m caote.eval.cli eval ppl ...``) until the main CLI wires these in."""
    parser = argparse.ArgumentParser(prog="caote")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parsers(sub)
    return handle(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
