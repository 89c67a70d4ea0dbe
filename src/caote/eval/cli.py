"""``caote eval {ppl,niah,tasks,squad}`` and ``caote report``: subcommands added to the main ``caote`` parser
(:func:`add_parsers`) and run by :func:`handle` (see :mod:`caote.cli`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from caote.policy import METHODS, EvictionConfig
from caote.validation import (
    DTYPE_HELP,
    add_device_argument,
    arg_type,
    check_depths,
    check_file,
    check_folder,
    check_model,
    check_nonnegative_int,
    check_option,
    dtype_arg,
    int_list_text_arg,
    methods_text_arg,
    one_line,
    positive_int_arg,
)

COMMANDS = ("eval", "report")


def _common(p: argparse.ArgumentParser, lengths: str | None, budgets: str) -> None:
    p.add_argument("--model", default=None, type=arg_type(check_model),
                   help="model folder or hub id (default: offline SmolLM2-135M-Instruct)")
    p.add_argument("--methods", default="all", type=methods_text_arg("--methods"),
                   help=f"comma list of methods, any case (default: all {len(METHODS)}: {', '.join(METHODS)})")
    p.add_argument("--budgets", default=budgets, type=int_list_text_arg("--budgets", budgets),
                   help=f"comma list of KV budgets, tokens per layer and KV head (default {budgets}); 'full' "
                        f"ignores them")
    p.add_argument("--block-size", type=positive_int_arg("--block-size", 128), default=128,
                   help="prompt tokens per prefill block (default 128)")
    if lengths is not None:  # squad: the articles set the lengths
        p.add_argument("--lengths", default=lengths, type=int_list_text_arg("--lengths", lengths),
                       help=f"comma list of context lengths in tokens, plain integers (default {lengths})")
    p.add_argument("--out", type=Path, default=Path("results"), help="results folder (default ./results)")
    p.add_argument("--seed", type=arg_type(check_nonnegative_int, "--seed"), default=0,
                   help="seed of the sample generators (default 0)")
    p.add_argument("--dtype", default="float32", type=dtype_arg, help=f"{DTYPE_HELP} (default float32)")
    add_device_argument(p)
    p.add_argument("--threads", type=positive_int_arg("--threads", 4), default=None,
                   help="torch threads (default: torch's choice; with --ray: per worker, default 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="compute the cells on a Ray cluster, one model per worker (needs pip install 'caote[ray]'): "
                        "without ADDRESS ray.init() (a new local cluster, or $RAY_ADDRESS), else the cluster at "
                        "ADDRESS (auto, HOST:PORT, ray://HOST:PORT); records are written here, in the grid's order, "
                        "as by a local run")
    p.add_argument("--ray-workers", type=positive_int_arg("--ray-workers", 4), default=None, metavar="N",
                   help="Ray workers (actors), each holding the model (default: the cluster's CPUs // --threads; "
                        "with --device cuda at most its GPUs, one each)")
    p.add_argument("--option", action="append", default=[], type=arg_type(check_option), metavar="NAME=VALUE",
                   help="an eviction option for every cache, repeatable (e.g. --option head_floor=0.5, --option "
                        "sink_tokens=4); part of every cell's key")


def add_parsers(sub) -> None:
    """Add ``eval`` (with ``ppl``, ``niah``, ``tasks``) and ``report`` to the main parser's subparsers."""
    ev = sub.add_parser("eval", help="evaluate eviction methods over budgets and lengths (resumable)",
                        description="Results are appended to <out>/<eval>.jsonl as each cell finishes; "
                                    "rerunning skips finished cells.")
    evsub = ev.add_subparsers(dest="eval_name", required=True)

    p = evsub.add_parser("ppl", help="perplexity under eviction on Jane Austen's novels (or your own text)")
    _common(p, lengths="1024,2048", budgets="64,128,256,512")
    p.add_argument("--samples", "--limit", dest="samples", type=positive_int_arg("--samples", 2), default=2,
                   help="text windows per length: the opening of each novel in turn (with --text-file: the "
                        "file's first LENGTH tokens, then its next LENGTH tokens, ...) (default 2)")
    p.add_argument("--books", default=None, help="comma list of novels (default: all six, in publication order); "
                                                 "'essays' = the Paul Graham essays (kvpress's comparison text)")
    p.add_argument("--text-file", type=arg_type(check_file, "--text-file"), default=None, metavar="FILE",
                   help="your own UTF-8 text instead of the books, cut into windows as they are; it must hold "
                        "--samples windows of the longest --lengths (+512 for continuation/compress-once); "
                        "keyed by the sha256 of its bytes, so an edited file computes new cells")
    p.add_argument("--protocol", default="bounded", choices=["bounded", "continuation", "compress-once"],
                   help="bounded (default): every token of the window scored through the evicting cache; "
                        "continuation: bounded prefill of LENGTH tokens, then the next 512 scored with their "
                        "entries kept (kvpress's protocol); compress-once: kvpress's way, full prefill then one "
                        "compression (prefill memory NOT bounded)")

    p = evsub.add_parser("niah", help="needle in a haystack over lengths x depths")
    _common(p, lengths="1024,2048,4096", budgets="64,128,256,512")
    p.add_argument("--depths", default="5", type=_depths_arg,
                   help="number of evenly spaced depths, or a comma list of fractions (default 5)")
    p.add_argument("--max-new-tokens", type=positive_int_arg("--max-new-tokens", 24), default=24,
                   help="tokens generated at most (default 24)")
    p.add_argument("--no-chat", action="store_true", help="plain prompt without the chat template")
    p.add_argument("--question-aware", action="store_true",
                   help="question-aware protocol: the question steers eviction during prefill (labelled in results)")
    p.add_argument("--haystack-file", type=arg_type(check_file, "--haystack-file"), default=None, metavar="FILE",
                   help="your own UTF-8 text to hide the needle in instead of the essays; at least the longest "
                        "--lengths tokens (never repeated); keyed by the sha256 of its bytes")

    p = evsub.add_parser("tasks", help="RULER tasks, (with --longbench-dir) LongBench, (with --jsonl) your own QA")
    _common(p, lengths="2048,4096", budgets="128,256,512")
    p.add_argument("--tasks", default=None, help="comma list of RULER tasks (default: niah_single, niah_multikey, "
                                                 "niah_multivalue, vt, cwe; with --jsonl: none); 'none' for "
                                                 "LongBench or --jsonl only")
    p.add_argument("--samples", "--limit", dest="samples", type=positive_int_arg("--samples", 2), default=2,
                   help="samples per task and length (LongBench, --jsonl: the first N records) (default 2)")
    p.add_argument("--longbench-dir", type=arg_type(check_folder, "--longbench-dir"), default=None,
                   help="folder of LongBench <dataset>.jsonl files (offline); all found are run")
    p.add_argument("--longbench-tasks", default=None, help="comma list of LongBench datasets within --longbench-dir")
    p.add_argument("--max-new-tokens", type=positive_int_arg("--max-new-tokens", 32), default=None,
                   help="cap on each task's generation length (default: the task's own)")
    p.add_argument("--window", type=positive_int_arg("--window", 8192), default=None,
                   help="LongBench truncation window incl. generation (default: the model's, e.g. 8192)")
    p.add_argument("--jsonl", type=arg_type(check_file, "--jsonl"), default=None, metavar="FILE",
                   help="your own QA task (task jsonl/<file name>): one JSON object per line with context, question, "
                        "answers (a list of strings, or a string), or kvpress's context, question, answer_prefix "
                        "(optional), answer; optional max_new_tokens (default 32, capped by --max-new-tokens). Each "
                        "of --lengths caps the prompt: a longer context is cut from its end (recorded as "
                        "truncated). Scored by SQuAD's token F1 of the answer's first line against the best answer "
                        "(score; exact match in em; any answer contained in the generation in match). Keyed by the "
                        "file's sha256")
    p.add_argument("--no-chat", action="store_true", help="RULER and --jsonl prompts without the chat template")
    p.add_argument("--question-aware", action="store_true",
                   help="question-aware protocol: the question steers eviction during prefill (labelled in results)")

    p = evsub.add_parser("squad", help="SQuAD v1.1 dev: questions over whole Wikipedia articles (F1, exact match)",
                         description="Each article is one long document; SQuAD's own F1 and exact match. Articles: "
                                     "those whose prompts fit --max-context untruncated, in file order, then the "
                                     "others (truncated from the end); data: python scripts/fetch_squad.py.")
    _common(p, lengths=None, budgets="256")
    p.add_argument("--squad-file", type=Path, default=None,
                   help="SQuAD v1.1 dev JSON (default: $CAOTE_CACHE_DIR/squad/dev-v1.1.json, "
                        "~/.cache/caote/squad; written by python scripts/fetch_squad.py)")
    p.add_argument("--articles", type=positive_int_arg("--articles", 6), default=6,
                   help="the first N articles: those that fit --max-context untruncated in file order, then the "
                        "rest (default 6)")
    p.add_argument("--titles", default=None, help="comma list of article titles instead of --articles")
    p.add_argument("--questions", type=positive_int_arg("--questions", 5), default=5,
                   help="questions per article, evenly spaced over its questions in file order (default 5)")
    p.add_argument("--max-new-tokens", type=positive_int_arg("--max-new-tokens", 24), default=24,
                   help="tokens generated at most (default 24)")
    p.add_argument("--max-context", type=positive_int_arg("--max-context", 8168), default=None,
                   help="prompt tokens at most; longer documents are cut from the end (default: the model's "
                        "window minus --max-new-tokens)")
    p.add_argument("--no-chat", action="store_true", help="plain prompt without the chat template")
    p.add_argument("--question-aware", action="store_true",
                   help="question-aware protocol: the question steers eviction during prefill (labelled in results)")

    rp = sub.add_parser("report", help="markdown tables and PNG plots from an eval results folder")
    rp.add_argument("--out", type=Path, default=Path("results"), help="results folder (default ./results)")
    rp.add_argument("--heatmap-budget", type=positive_int_arg("--heatmap-budget", 128), default=None,
                    help="budget of the needle heatmaps (default: the smallest evaluated)")


def _depths_arg(text: str) -> str:
    """argparse ``type=`` of ``--depths``: checked (:func:`caote.validation.check_depths`), kept as text."""
    arg_type(check_depths, "--depths")(text)
    return text.strip()


def _depths(text: str):
    text = text.strip()
    if "," not in text and "." not in text:
        return int(text)
    return [float(x) for x in text.split(",") if x.strip()]


OWN_DATA_FLAGS = {"ppl": ("text_file", "--text-file"), "niah": ("haystack_file", "--haystack-file"),
                  "tasks": ("jsonl", "--jsonl")}
"""The own-data argument of each evaluation: its ``run_*`` parameter and its flag."""


def _own_data(args, lengths: list[int]) -> dict:
    """The evaluation's own data file (``--text-file``, ``--haystack-file``, ``--jsonl``) read and checked before the
    model loads, as the ``run_*`` keyword argument: file errors first, then (with the model's tokenizer alone) a
    text too short for the ``--lengths`` asked. ``{}`` when none is given."""
    parameter, flag = OWN_DATA_FLAGS.get(args.eval_name, (None, None))
    value = getattr(args, parameter, None) if parameter else None
    if value is None:
        return {}
    from caote.eval import owndata
    from caote.eval.runner import CONTINUATION_TOKENS
    from caote.models import load_tokenizer

    if args.eval_name == "tasks":
        return {parameter: owndata.qa_data(value, flag)}
    if args.eval_name == "ppl" and args.books:
        raise ValueError("give --text-file or --books, not both")
    data = owndata.text_data(value, flag)
    tokenizer = load_tokenizer(args.model)
    if args.eval_name == "ppl":
        extra = 0 if args.protocol == "bounded" else CONTINUATION_TOKENS
        owndata.check_ppl_text(tokenizer, data, lengths, args.samples, extra, flag)
    else:
        owndata.check_haystack(tokenizer, data, lengths, flag)
    return {parameter: data}


def run_eval_command(args) -> int:
    import torch

    from caote.eval import runner

    if args.ray_workers is not None and args.ray is None:
        raise ValueError("--ray-workers needs --ray")
    if args.ray is not None:
        from caote.eval.distributed import import_ray

        import_ray()  # the install command, before anything loads
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = runner.parse_methods(args.methods)
    budgets = runner.parse_list(args.budgets, int)
    lengths = runner.parse_list(getattr(args, "lengths", None), int)
    options = dict(args.option)
    for method, budget in runner.method_budgets(methods, budgets):  # fail before loading the model
        EvictionConfig(budget=budget, method=method, block_size=args.block_size, **options)
    if args.eval_name == "squad":
        from caote.eval.squad import check_squad_file

        check_squad_file(args.squad_file)  # one-line error naming the fetch script
    own_data = _own_data(args, lengths)  # your own file, read and checked before the model loads
    protocol = getattr(args, "protocol", None) or ("question-aware" if getattr(args, "question_aware", False)
                                                   else "bounded")
    common = {"methods": methods, "budgets": budgets, "lengths": lengths, "block_size": args.block_size,
              "progress": not args.no_progress, "seed": args.seed, "protocol": protocol, "options": options}
    if args.eval_name == "ppl":
        kwargs = {"samples": args.samples, "books": runner.parse_list(args.books) or None}
    elif args.eval_name == "niah":
        kwargs = {"depths": _depths(args.depths), "max_new_tokens": args.max_new_tokens,
                      "chat": False if args.no_chat else None}
    elif args.eval_name == "squad":
        del common["lengths"]
        kwargs = {"squad_file": args.squad_file, "articles": None if args.titles else args.articles,
                  "titles": runner.parse_list(args.titles) or None, "questions_per_article": args.questions,
                  "max_new_tokens": args.max_new_tokens, "max_context": args.max_context,
                  "chat": False if args.no_chat else None}
    else:
        tasks = None if args.tasks is None else ([] if args.tasks.strip().lower() == "none"
                                                 else runner.parse_list(args.tasks))
        kwargs = {"tasks": tasks, "samples": args.samples, "longbench_dir": args.longbench_dir,
                      "longbench_tasks": runner.parse_list(args.longbench_tasks) or None,
                      "max_new_tokens": args.max_new_tokens, "window": args.window,
                      "chat": False if args.no_chat else None}
    settings = {k: v for k, v in vars(args).items() if k not in ("eval_handler",)}
    if args.ray is None:
        from caote.models import load_model

        model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
        settings["model_label"] = runner.model_name(model)
        summary = runner.run_eval(args.eval_name, model, tokenizer, out=args.out, settings=settings,
                                  **common, **kwargs, **own_data)
    else:
        summary = _run_on_ray(args, settings, {**common, **kwargs, **own_data})
    from caote.eval.report import summary_lines

    table = summary_lines(args.eval_name, summary["records"])
    if table:
        print("\n".join(table).rstrip())
    print(f"{args.eval_name}: {summary['computed']} cell(s) computed, {summary['skipped']} already done "
          f"-> {summary['path']}")
    return 0


def _run_on_ray(args, settings: dict, run_kwargs: dict) -> dict:
    """``run_eval`` with the cells computed by Ray workers (:mod:`caote.eval.distributed`): the driver loads the
    tokenizer alone and keys the cells with the model the workers report."""
    from caote.eval import distributed, runner
    from caote.models import load_tokenizer

    tokenizer = load_tokenizer(args.model)
    config = distributed.worker_config(args.model, dtype=args.dtype, device=args.device, threads=args.threads)
    with distributed.RayExecutor(config, address=args.ray or None, workers=args.ray_workers) as executor:
        settings["model_label"] = executor.model_info.name
        settings["ray"] = distributed.ray_settings(executor, args.ray)
        summary = runner.run_eval(args.eval_name, executor.model_info, tokenizer, out=args.out, settings=settings,
                                  executor=executor, **run_kwargs)
    if executor.reruns:
        print(f"{args.eval_name}: {len(executor.reruns)} cell(s) rerun after their worker died")
    return summary


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
        print(f"caote: error: {one_line(error)}", file=sys.stderr)
        return 2
    except RuntimeError as error:
        from caote.eval.distributed import RayRunError  # imports no Ray

        if not isinstance(error, RayRunError):
            raise
        print(f"caote: error: {one_line(error)}", file=sys.stderr)
        return 1
    raise ValueError(f"not an eval command: {args.command!r}")


def main(argv=None) -> int:
    """Stand-alone entry (``python -m caote.eval.cli eval ppl ...``) until the main CLI wires these in."""
    parser = argparse.ArgumentParser(prog="caote")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parsers(sub)
    return handle(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
