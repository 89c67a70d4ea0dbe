"""Evaluation runs: perplexity, needle-in-a-haystack and long-context tasks under KV-cache eviction.

Every evaluation is a grid of *cells* -- one (method, budget, length, sample) each -- and every finished
cell is appended at once as one JSON line to ``<out>/<eval>.jsonl`` (``ppl``, ``niah``, ``tasks``). A run
first reads that file and skips every cell already there, so an interrupted run resumes where it
stopped. Each invocation also appends one line to ``<out>/runs.jsonl``: its id, the exact command line
(``sys.argv``), the arguments, the seed and the versions of python, torch, transformers and caote;
every record carries the ``run_id`` of the run that produced it.

Method ``full`` never evicts: it runs once per length and sample, with ``budget = None``.

* :func:`run_ppl` -- next-token perplexity of a window of ``length`` tokens of a novel (Austen,
  :mod:`caote.eval.books`), fed block by block through the evicting cache: each token's loss comes
  from the logits computed with the cache as evicted so far. The first token has no loss.
* :func:`run_niah` -- greedy answer to a needle question (:mod:`caote.eval.needle`); score 1 when
  the needle's value is in the answer.
* :func:`run_tasks` -- RULER tasks (:mod:`caote.eval.ruler`, ``string_match_all``) and, with a
  folder of LongBench JSONL files, LongBench (:mod:`caote.eval.longbench`, middle-truncated to the
  model window minus the generation length; chat template where LongBench uses one).
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from caote import hf
from caote.cache import EvictingCache
from caote.generation import generate
from caote.policy import METHODS, parse_method

EVALS = ("ppl", "niah", "tasks")
KEY_FIELDS = ("eval", "model", "block_size", "method", "budget", "length", "task", "sample")
"""Fields that identify a cell; a record whose key is already in the file is not recomputed."""

DEFAULT_SEED = 0
DEFAULT_MODEL_WINDOW = 8192


# ----------------------------------------------------------------------------------------------
# grid helpers


def parse_list(text: str | Sequence | None, kind: Callable = str) -> list:
    """``"a,b, c"`` -> ``[kind("a"), kind("b"), kind("c")]``; lists pass through (converted)."""
    if text is None:
        return []
    items = text.split(",") if isinstance(text, str) else list(text)
    return [kind(item.strip()) if isinstance(item, str) else kind(item) for item in items if str(item).strip()]


def parse_methods(text: str | Sequence[str] | None) -> list[str]:
    """Comma list of methods (validated, lower-cased, duplicates dropped); ``None``/``"all"`` = :data:`METHODS`."""
    if text is None or (isinstance(text, str) and text.strip().lower() in ("", "all")):
        return list(METHODS)
    out: list[str] = []
    for name in parse_list(text):
        parse_method(name)  # clear error for an unknown name
        name = name.strip().lower()
        if name not in out:
            out.append(name)
    return out


def method_budgets(methods: Sequence[str], budgets: Sequence[int]) -> list[tuple[str, int | None]]:
    """``(method, budget)`` pairs: ``full`` once with ``None``, every other method at every budget."""
    pairs: list[tuple[str, int | None]] = []
    for method in methods:
        if method == "full":
            pairs.append((method, None))
        else:
            if not budgets:
                raise ValueError(f"method {method!r} needs at least one budget (--budgets)")
            pairs.extend((method, int(b)) for b in budgets)
    return pairs


def model_name(model) -> str:
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    return os.path.basename(str(name).rstrip("/")) or str(name)


def model_window(model, default: int = DEFAULT_MODEL_WINDOW) -> int:
    """Context window of ``model`` (``max_position_embeddings``), or ``default``."""
    return int(getattr(getattr(model, "config", None), "max_position_embeddings", None) or default)


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# results file and run record


def versions() -> dict[str, str]:
    import transformers

    import caote

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "caote": caote.__version__,
    }


def cell_key(record: dict) -> tuple:
    return tuple(json.dumps(record.get(name), sort_keys=True) for name in KEY_FIELDS)


class ResultStore:
    """Append-only JSON-lines results of one evaluation, with the set of finished cell keys.

    A truncated last line (a run killed while writing) is ignored and rewritten by the resumed run.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.records: list[dict] = read_jsonl(self.path)
        self.keys = {cell_key(r) for r in self.records}

    def done(self, key: dict) -> bool:
        return cell_key(key) in self.keys

    def append(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(record, sort_keys=False, default=_json_default)
        # a previous run may have died mid-line: start on a fresh line
        needs_newline = self.path.exists() and self.path.stat().st_size > 0 and not _ends_with_newline(self.path)
        with self.path.open("a", encoding="utf-8") as fh:
            if needs_newline:
                fh.write("\n")
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.records.append(record)
        self.keys.add(cell_key(record))


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as fh:
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) == b"\n"


def _json_default(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def read_jsonl(path: str | Path) -> list[dict]:
    """Records of a JSON-lines file (missing file: none; unreadable lines are skipped)."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    with path.open("r", encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


def start_run(out: str | Path, eval_name: str, settings: dict | None = None, argv: Sequence[str] | None = None) -> str:
    """Append this invocation to ``<out>/runs.jsonl``; return its ``run_id``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{random.Random().getrandbits(24):06x}"
    entry = {
        "run_id": run_id,
        "eval": eval_name,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": list(sys.argv if argv is None else argv),
        "settings": settings or {},
        "versions": versions(),
        "host": {"platform": platform.platform(), "torch_threads": torch.get_num_threads()},
    }
    with (out / "runs.jsonl").open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry, default=_json_default) + "\n")
    return run_id


@dataclass
class RunContext:
    """What every evaluation needs: where results go and how the run is labelled."""

    out: Path
    model_label: str
    block_size: int
    run_id: str
    progress: bool = True

    def store(self, eval_name: str) -> ResultStore:
        return ResultStore(self.out / f"{eval_name}.jsonl")

    def key(self, eval_name: str, method: str, budget: int | None, length: int | None, sample, task=None) -> dict:
        return {
            "eval": eval_name,
            "model": self.model_label,
            "block_size": self.block_size,
            "method": method,
            "budget": budget,
            "length": length,
            "task": task,
            "sample": sample,
        }


def _context(out, model, block_size, run_id, progress, model_label=None) -> RunContext:
    return RunContext(Path(out), model_label or model_name(model), int(block_size), run_id or "", progress)


def _run_cells(ctx: RunContext, eval_name: str, cells: list[tuple[dict, Callable[[], dict]]], desc: str) -> dict:
    """Compute the cells not yet in the store, appending each record as it finishes."""
    store = ctx.store(eval_name)
    todo = [(key, fn) for key, fn in cells if not store.done(key)]
    computed = 0
    bar = tqdm(todo, desc=desc, unit="cell", disable=not ctx.progress, dynamic_ncols=True)
    for key, fn in bar:
        bar.set_postfix_str(f"{key['method']} b={key['budget']} L={key['length']} {key['task'] or ''}{key['sample']}")
        start = time.perf_counter()
        result = fn()
        record = {**key, **result, "seconds": round(time.perf_counter() - start, 3), "run_id": ctx.run_id}
        store.append(record)
        computed += 1
    return {"cells": len(cells), "skipped": len(cells) - len(todo), "computed": computed, "path": str(store.path)}


# ----------------------------------------------------------------------------------------------
# perplexity


def evicted_nll(
    model,
    input_ids: torch.Tensor,
    method: str,
    budget: int | None,
    block_size: int = 128,
    **options,
) -> tuple[float, int]:
    """Summed next-token NLL of ``input_ids`` ``(1, L)`` read block by block through an evicting cache.

    Each block's logits are computed with the cache as it stands after the previous evictions; the
    logits at position ``t`` score token ``t + 1``. Returns ``(nll_sum, tokens_scored)`` with
    ``tokens_scored = L - 1``.
    """
    if input_ids.ndim != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must be (1, L>=2), got {tuple(input_ids.shape)}")
    input_ids = input_ids.to(model.device)
    cache = EvictingCache(model, budget=budget, method=method, block_size=block_size, **options)
    length = input_ids.shape[1]
    total = torch.zeros((), dtype=torch.float64)
    with torch.inference_mode():
        for start in range(0, length, block_size):
            block = input_ids[:, start : start + block_size]
            logits = hf.forward(model, block, cache, logits_to_keep=0).logits[0].float()  # (n, V)
            targets = input_ids[0, start + 1 : start + 1 + block.shape[1]]  # next tokens (last block: n-1)
            logits = logits[: targets.shape[0]]
            if targets.numel():
                total += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").double().cpu()
    return float(total), length - 1


def book_windows(tokenizer, length: int, samples: int, books: Sequence[str] | None = None) -> list[tuple[str, list[int]]]:
    """``samples`` windows of ``length`` tokens: the opening of each novel in turn, then further windows
    (second, third, ... ``length`` tokens) when more samples than novels are asked for.

    Sample ids are ``"<slug>@<token offset>"``.
    """
    from caote.eval.books import BOOKS, book_slug, book_text

    slugs = [book_slug(b) for b in books] if books else list(BOOKS)
    windows: list[tuple[str, list[int]]] = []
    round_ = 0
    while len(windows) < samples:
        added = False
        for slug in slugs:
            if len(windows) >= samples:
                break
            offset = round_ * length
            text = book_text(slug)
            n_chars = max(4096, 8 * (offset + length))
            ids: list[int] = []
            while True:
                ids = tokenizer.encode(text[:n_chars], add_special_tokens=False)
                if len(ids) >= offset + length + 1 or n_chars >= len(text):
                    break
                n_chars *= 2
            if len(ids) >= offset + length + 1:  # +1: the last token may be cut by the character prefix
                windows.append((f"{slug}@{offset}", ids[offset : offset + length]))
                added = True
        if not added:
            break
        round_ += 1
    if len(windows) < samples:
        raise ValueError(f"only {len(windows)} windows of {length} tokens available in the books")
    return windows


def run_ppl(
    model,
    tokenizer,
    *,
    methods: Sequence[str],
    budgets: Sequence[int],
    lengths: Sequence[int],
    out: str | Path,
    block_size: int = 128,
    samples: int = 1,
    books: Sequence[str] | None = None,
    windows: Sequence[tuple[str, Sequence[int]]] | None = None,
    run_id: str | None = None,
    progress: bool = True,
    model_label: str | None = None,
    seed: int = DEFAULT_SEED,
) -> dict:
    """Perplexity of every method x budget x length x book window; records go to ``<out>/ppl.jsonl``.

    ``windows`` (``(sample_id, token_ids)`` pairs, each at least the largest length) replaces the books,
    e.g. for a model with its own vocabulary in tests; each length uses its first ``length`` tokens.
    """
    set_seed(seed)
    ctx = _context(out, model, block_size, run_id, progress, model_label)
    cells = []
    for length in lengths:
        length = int(length)
        if windows is not None:
            wins = [(sid, list(ids)[:length]) for sid, ids in list(windows)[:samples]]
            if any(len(ids) < length for _, ids in wins):
                raise ValueError(f"a window is shorter than length {length}")
        else:
            wins = book_windows(tokenizer, length, samples, books)
        for method, budget in method_budgets(methods, budgets):
            for sample_id, ids in wins:
                key = ctx.key("ppl", method, budget, length, sample_id)

                def compute(ids=ids, method=method, budget=budget):
                    nll, n = evicted_nll(model, torch.tensor([ids]), method, budget, ctx.block_size)
                    return {"nll": nll, "tokens": n, "ppl": math.exp(nll / n)}

                cells.append((key, compute))
    return _run_cells(ctx, "ppl", cells, "ppl")


# ----------------------------------------------------------------------------------------------
# generation helpers


def _encode(tokenizer, prompt: str) -> torch.Tensor:
    """Token ids of an already formatted prompt (templates carry their own special tokens)."""
    return torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)])


def _generate(model, tokenizer, ids: torch.Tensor, method, budget, block_size, max_new_tokens) -> dict:
    result = generate(model, tokenizer, ids, budget=budget, method=method, block_size=block_size,
                      max_new_tokens=max_new_tokens, chat=False)
    return {
        "prediction": result.text,
        "prompt_tokens": result.prompt_tokens,
        "new_tokens": len(result.new_token_ids),
        "peak_kv_fraction": round(result.peak_kv_fraction, 5),
        "prefill_seconds": round(result.prefill_seconds, 3),
        "decode_seconds": round(result.decode_seconds, 3),
    }


# ----------------------------------------------------------------------------------------------
# needle in a haystack


def run_niah(
    model,
    tokenizer,
    *,
    methods: Sequence[str],
    budgets: Sequence[int],
    lengths: Sequence[int],
    out: str | Path,
    block_size: int = 128,
    depths: Sequence[float] | int = 5,
    max_new_tokens: int = 24,
    seed: int = DEFAULT_SEED,
    chat: bool | None = None,
    run_id: str | None = None,
    progress: bool = True,
    model_label: str | None = None,
) -> dict:
    """Needle recall of every method x budget over lengths x depths; records go to ``<out>/niah.jsonl``.

    ``depths`` is a list of fractions or a count (:func:`caote.eval.needle.depth_grid`). The sample id is
    the depth; each (length, depth) cell has its own needle, the same for every method and budget.
    """
    from caote.eval.needle import depth_grid, make_needle_samples, needle_recovered

    set_seed(seed)
    ctx = _context(out, model, block_size, run_id, progress, model_label)
    depth_list = depth_grid(depths) if isinstance(depths, int) else [float(d) for d in depths]
    pairs = method_budgets(methods, budgets)
    store = ctx.store("niah")
    cells = []
    for length in lengths:
        length = int(length)
        keys = [(ctx.key("niah", m, b, length, d), m, b, d) for m, b in pairs for d in depth_list]
        if all(store.done(k) for k, *_ in keys):
            cells.extend((k, None) for k, *_ in keys)  # all done: do not even build the samples
            continue
        # a per-length seed: a cell's needle does not depend on which other lengths are asked for
        samples = {
            (s.context_length, s.depth): s
            for s in make_needle_samples(tokenizer, [length], depth_list, seed=_length_seed(seed, length), chat=chat)
        }
        for key, method, budget, depth in keys:
            sample = samples[(length, depth)]

            def compute(sample=sample, method=method, budget=budget):
                gen = _generate(model, tokenizer, _encode(tokenizer, sample.prompt), method, budget,
                                ctx.block_size, max_new_tokens)
                return {
                    "depth": sample.depth,
                    "actual_depth": round(sample.actual_depth, 4),
                    "expected": sample.answer,
                    "score": float(needle_recovered(gen["prediction"], sample.answer)),
                    **gen,
                }

            cells.append((key, compute))
    return _run_cells(ctx, "niah", cells, "niah")


def _length_seed(seed: int, length: int) -> int:
    return seed * 1_000_003 + length


# ----------------------------------------------------------------------------------------------
# RULER tasks and LongBench


def longbench_datasets(data_dir: str | Path, names: Sequence[str] | None = None) -> list[str]:
    """LongBench datasets to run: ``names``, or every ``<name>.jsonl`` in ``data_dir`` (or ``data_dir/data``)."""
    from caote.eval.longbench import LONGBENCH_DATASETS, LONGBENCH_E_DATASETS

    if names:
        return list(names)
    root = Path(data_dir)
    known = set(LONGBENCH_DATASETS) | set(LONGBENCH_E_DATASETS)
    found = sorted({p.stem for d in (root, root / "data") if d.is_dir() for p in d.glob("*.jsonl")})
    return [name for name in found if name in known]


def run_tasks(
    model,
    tokenizer,
    *,
    methods: Sequence[str],
    budgets: Sequence[int],
    lengths: Sequence[int],
    out: str | Path,
    block_size: int = 128,
    tasks: Sequence[str] | None = None,
    samples: int = 1,
    longbench_dir: str | Path | None = None,
    longbench_tasks: Sequence[str] | None = None,
    max_new_tokens: int | None = None,
    seed: int = DEFAULT_SEED,
    chat: bool | None = None,
    window: int | None = None,
    run_id: str | None = None,
    progress: bool = True,
    model_label: str | None = None,
) -> dict:
    """RULER tasks at every length, plus LongBench from ``longbench_dir``; records go to ``<out>/tasks.jsonl``.

    RULER prompts are ``length`` tokens (the cache's content after prefill; RULER's generation tokens are
    extra). LongBench prompts are middle-truncated to ``window - max_new_tokens`` tokens (``window``
    defaults to the model's context window); their ``length`` field is that truncation limit.
    ``max_new_tokens`` caps each task's own generation length (RULER: 128 for niah, 30 for vt, 120 for
    cwe; LongBench: ``dataset2maxlen``). ``tasks=[]`` runs LongBench only.
    """
    from caote.eval import ruler

    set_seed(seed)
    ctx = _context(out, model, block_size, run_id, progress, model_label)
    pairs = method_budgets(methods, budgets)
    store = ctx.store("tasks")
    task_names = [ruler.canonical_task(t) for t in (ruler.DEFAULT_TASKS if tasks is None else tasks)]
    cells = []
    for task in task_names:
        for length in lengths:
            length = int(length)
            keys = [(ctx.key("tasks", m, b, length, i, task=task), m, b, i) for m, b in pairs for i in range(samples)]
            if all(store.done(k) for k, *_ in keys):
                cells.extend((k, None) for k, *_ in keys)
                continue
            built = ruler.make_ruler_samples(task, tokenizer, length, n=samples, seed=seed, chat=chat)
            for key, method, budget, index in keys:
                sample = built[index]
                gen_len = sample.tokens_to_generate if max_new_tokens is None else min(max_new_tokens,
                                                                                       sample.tokens_to_generate)

                def compute(sample=sample, method=method, budget=budget, gen_len=gen_len):
                    gen = _generate(model, tokenizer, _encode(tokenizer, sample.prompt), method, budget,
                                    ctx.block_size, gen_len)
                    return {"suite": "ruler", "metric": sample.metric, "references": sample.outputs,
                            "score": ruler.score_sample(sample, gen["prediction"]), **gen}

                cells.append((key, compute))
    if longbench_dir is not None:
        cells.extend(_longbench_cells(ctx, model, tokenizer, pairs, longbench_dir, longbench_tasks, samples,
                                      max_new_tokens, window or model_window(model), store))
    return _run_cells(ctx, "tasks", cells, "tasks")


def _longbench_cells(ctx, model, tokenizer, pairs, data_dir, names, samples, max_new_cap, window, store):
    from caote.eval import longbench
    from caote.eval.metrics import scorer

    cells = []
    for dataset in longbench_datasets(data_dir, names):
        base = longbench.base_dataset(dataset)
        records = longbench.load_longbench(dataset, data_dir)[:samples]
        gen_len = longbench.dataset2maxlen[base]
        if max_new_cap is not None:
            gen_len = min(gen_len, max_new_cap)
        limit = window - gen_len
        for index, record in enumerate(records):
            sample_id = str(record.get("_id") or index)
            keys = [(ctx.key("tasks", m, b, limit, sample_id, task=f"longbench/{dataset}"), m, b) for m, b in pairs]
            if all(store.done(k) for k, *_ in keys):
                cells.extend((k, None) for k, *_ in keys)
                continue
            ids = torch.tensor([longbench.build_prompt(record, tokenizer, limit, dataset=base, return_ids=True)])
            for key, method, budget in keys:

                def compute(ids=ids, record=record, method=method, budget=budget, base=base, gen_len=gen_len):
                    gen = _generate(model, tokenizer, ids, method, budget, ctx.block_size, gen_len)
                    if base == "samsum":  # LongBench stops samsum at the first newline
                        gen["prediction"] = gen["prediction"].lstrip("\n").split("\n")[0]
                    score = scorer(base, [gen["prediction"]], [record["answers"]], record.get("all_classes")) / 100
                    return {"suite": "longbench", "metric": base, "references": record["answers"],
                            "score": score, **gen}

                cells.append((key, compute))
    return cells


# ----------------------------------------------------------------------------------------------
# entry point shared by the command line


def run_eval(eval_name: str, model, tokenizer, *, out, argv: Sequence[str] | None = None, settings: dict | None = None,
             **kwargs) -> dict:
    """Record the run in ``<out>/runs.jsonl`` then run ``eval_name`` (``ppl``/``niah``/``tasks``)."""
    fn = {"ppl": run_ppl, "niah": run_niah, "tasks": run_tasks}[eval_name]
    run_id = start_run(out, eval_name, settings=settings, argv=argv)
    return fn(model, tokenizer, out=out, run_id=run_id, **kwargs)


__all__ = [
    "EVALS",
    "KEY_FIELDS",
    "ResultStore",
    "book_windows",
    "cell_key",
    "evicted_nll",
    "method_budgets",
    "parse_list",
    "parse_methods",
    "read_jsonl",
    "run_eval",
    "run_niah",
    "run_ppl",
    "run_tasks",
    "start_run",
]
