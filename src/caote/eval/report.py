"""Tables and plots from the results of :mod:`caote.eval.runner`.

:func:`write_report` reads ``<out>/{ppl,niah,tasks,squad}.jsonl`` and writes ``<out>/results.md`` (markdown
tables laid out like the paper's: one row per method, grouped by base policy, one column per budget)
and PNG plots (matplotlib, Agg backend):

* ``ppl_gap.png`` -- perplexity gap to ``full`` vs budget, one line per method, one panel per length;
* ``niah_heatmap_b<budget>.png`` -- needle recall over depth x length, one panel per method, at one budget
  (``heatmap_budget``, default: the smallest);
* ``niah_recall.png`` -- needle recall and its partial credit (mean over depths and lengths) vs budget, one
  line per method;
* ``tasks_score.png`` -- task score (mean over samples and lengths) vs budget, one line per method, one panel
  per task (and the average).

The plots' means over lengths use only the lengths that have every method x budget (x task) cell
(:func:`_common_lengths`), so a partial grid does not compare a budget averaged over 2k-8k with one measured
at 2k only.

Each table ends with a line naming the cells that are missing (or have fewer samples than the most
complete cell of that table), so a partial grid is never mistaken for a complete one.

Records are never pooled across settings: each file's records are split by every setting that changes a
result (:data:`caote.eval.runner.SETTING_FIELDS`; legacy records get theirs from ``runs.jsonl``,
:func:`caote.eval.runner.load_records`). Where a file holds several combinations, each gets its own
sections, tables and plots, labelled with the settings that differ (e.g. ``block_size=64``), in the table
titles and row labels.

SQuAD (``squad.jsonl``) gets one table of F1 and exact match per method x budget, the ``bounded`` and
``question-aware`` protocols as separate rows of it (no plot).

Methods the report does not know (the registry grows) follow the paper's methods, grouped by their base
(the name before the first ``+``).
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

from caote.eval.runner import SETTING_FIELDS, load_records, read_jsonl
from caote.policy import parse_method
from caote.validation import data_label

# Paper-like row order: full, streaming, caote, then each score base followed by its corrections.
METHOD_ORDER: tuple[str, ...] = (
    "full", "streaming", "caote",
    "h2o", "h2o+caote", "h2o+fastcaote",
    "tova", "tova+caote", "tova+fastcaote",
    "snapkv", "snapkv+caote", "snapkv+fastcaote",
)
# the base+correction methods, in METHOD_ORDER's order, as (method, base, correction)
CORRECTED: tuple[tuple[str, str, str], ...] = tuple(
    (m, *parse_method(m)) for m in METHOD_ORDER if parse_method(m)[1] is not None)
# bases in the order METHOD_ORDER first names them: unknown methods are grouped under these first
_BASE_ORDER: tuple[str, ...] = tuple(dict.fromkeys(m.split("+")[0] for m in METHOD_ORDER))


def method_base(method: str) -> str:
    """The part of a method name before the first ``+`` (``snapkv+caote+out`` -> ``snapkv``)."""
    return method.split("+")[0]


def method_sort_key(method: str) -> tuple:
    """Paper order for :data:`METHOD_ORDER`; any other method after them, grouped by base (known bases in
    paper order, then the others by name), the base itself first, then by name."""
    if method in METHOD_ORDER:
        return (0, METHOD_ORDER.index(method), "", 0, "")
    base = method_base(method)
    rank = _BASE_ORDER.index(base) if base in _BASE_ORDER else len(_BASE_ORDER)
    return (1, rank, base, method != base, method)


def _group(method: str) -> str:
    if method not in METHOD_ORDER:
        return method_base(method)
    return method.split("+")[0] if "+" in method or method in ("h2o", "tova", "snapkv") else "baseline"


def _dedupe(records: Iterable[dict]) -> list[dict]:
    """Latest record per cell (a cell recomputed after deleting lines keeps one value)."""
    from caote.eval.runner import cell_key

    latest = {}
    for r in records:
        latest[cell_key(r)] = r
    return list(latest.values())


# ----------------------------------------------------------------------------------------------
# settings: never pool records that differ in one


def _settings_of(record: dict) -> str:
    return json.dumps({name: record.get(name) for name in SETTING_FIELDS}, sort_keys=True)


def _setting_text(name: str, value) -> str:
    if name == "options":
        items = ", ".join(f"{k}={v}" for k, v in sorted((value or {}).items())) if isinstance(value, dict) else value
        return f"options({items or 'default'})"
    if name == "data" and value is None:
        return BUILT_IN_DATA
    return f"{name}={value}"


def settings_groups(records: Sequence[dict]) -> list[tuple[str, list[dict]]]:
    """Records split by their settings (:data:`~caote.eval.runner.SETTING_FIELDS`), in order of first
    appearance, each with a label naming the settings in which the groups differ (``"block_size=64"``);
    ``[("", records)]`` when all records share their settings."""
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(_settings_of(r), []).append(r)
    if len(groups) <= 1:
        return [("", list(records))] if records else []
    settings = [json.loads(k) for k in groups]
    differing = [name for name in SETTING_FIELDS
                 if len({json.dumps(s.get(name), sort_keys=True) for s in settings}) > 1]
    return [(", ".join(_setting_text(name, s.get(name)) for name in differing), rows)
            for s, rows in zip(settings, groups.values())]


def settings_line(records: Sequence[dict]) -> str:
    """One line naming the settings shared by ``records`` (those recorded)."""
    shared = {}
    for name in SETTING_FIELDS:
        values = {json.dumps(r.get(name), sort_keys=True) for r in records}
        if len(values) == 1:
            shared[name] = records[0].get(name) if records else None
    parts = [_setting_text(name, value) for name, value in shared.items()
             if value is not None and name != "model"]
    return "Settings: " + ", ".join(parts) + "." if parts else ""


def _suffix(label: str) -> str:
    """`` [label]`` for titles, or nothing."""
    return f" [{label}]" if label else ""


BUILT_IN_DATA = "data=built-in"
"""The label of records computed on the built-in texts and tasks (``data`` null: no file of the user's)."""


def _slug(label: str) -> str:
    """File-name suffix of a settings label (``"block_size=64"`` -> ``"_block_size-64"``). Default eviction options
    and the built-in data are left out of file names, so that a run with an option or a data file leaves the other
    groups' plot names as they were."""
    label = ", ".join(part for part in label.split(", ") if part not in ("options(default)", BUILT_IN_DATA))
    return "_" + re.sub(r"[^A-Za-z0-9._]+", "-", label).strip("-") if label else ""


def _fmt(value: float | None, digits: int = 2) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


class _Grid:
    """Values per (method, budget) of one table, with the full-cache row spread over the budget columns."""

    def __init__(self, records: list[dict], value_fn):
        self.samples: dict[tuple[str, int | None], list] = defaultdict(list)
        for r in records:
            self.samples[(r["method"], r["budget"])].append(r)
        self.value_fn = value_fn
        self.budgets = sorted({b for _, b in self.samples if b is not None})
        self.methods = sorted({m for m, _ in self.samples}, key=method_sort_key)

    def value(self, method: str, budget: int | None):
        rows = self.samples.get((method, None if method == "full" else budget))
        return self.value_fn(rows) if rows else None

    def missing(self, methods: Sequence[str], budgets: Sequence[int]) -> list[str]:
        most = max((len(v) for v in self.samples.values()), default=0)
        out = []
        for m in methods:
            for b in ([None] if m == "full" else budgets):
                n = len(self.samples.get((m, b), []))
                if n < most:
                    out.append(f"{m}@{b if b is not None else 'full'}" + (f" ({n}/{most} samples)" if n else ""))
        return out


def _table(grid: _Grid, methods: Sequence[str], budgets: Sequence[int], digits: int, title: str,
           label: str = "") -> list[str]:
    lines = [f"#### {title}{_suffix(label)}", "", "| method | " + " | ".join(f"b={b}" for b in budgets) + " |",
             "|---|" + "---:|" * len(budgets)]
    previous_group = None
    for m in methods:
        group = _group(m)
        if previous_group is not None and group != previous_group and group != "baseline":
            lines.append("| " + " | ".join([""] * (len(budgets) + 1)) + " |")  # blank separator row
        previous_group = group
        cells = [_fmt(grid.value(m, b), digits) for b in budgets]
        lines.append(f"| {m}{_suffix(label)} | " + " | ".join(cells) + " |")
    missing = grid.missing(methods, budgets)
    lines += ["", "Missing cells: " + (", ".join(missing) if missing else "none") + ".", ""]
    return lines


def _common_lengths(records: list[dict]) -> tuple[list[dict], str]:
    """The records at the lengths that have every (method, budget, task) cell, so that a mean over lengths
    compares like with like across budgets, and a label naming them. Falls back to all records (saying so)
    when no length is complete."""
    def cell(r: dict) -> tuple:
        return r["method"], r["budget"], r.get("task")

    cells = {cell(r) for r in records}
    by_length: dict[int, set] = defaultdict(set)
    for r in records:
        by_length[r["length"]].add(cell(r))
    complete = sorted(n for n, seen in by_length.items() if seen == cells)
    if not complete:
        return records, "mean over the lengths each cell has"
    return [r for r in records if r["length"] in complete], "mean over " + "/".join(map(str, complete)) + " tokens"


def _axes(records: list[dict], all_methods: Sequence[str] | None = None):
    methods = sorted({r["method"] for r in records} | set(all_methods or ()), key=method_sort_key)
    budgets = sorted({r["budget"] for r in records if r["budget"] is not None})
    return methods, budgets


# ----------------------------------------------------------------------------------------------
# perplexity


def ppl_summary(records: list[dict]) -> dict[tuple[int, str, int | None], float]:
    """``(length, method, budget) -> perplexity`` pooled over samples (``exp(Σ nll / Σ tokens)``)."""
    nll: dict = defaultdict(float)
    tokens: dict = defaultdict(int)
    for r in records:
        k = (r["length"], r["method"], r["budget"])
        nll[k] += r["nll"]
        tokens[k] += r["tokens"]
    return {k: math.exp(nll[k] / tokens[k]) for k in nll if tokens[k]}


def _pooled_ppl(rows):
    n = sum(r["tokens"] for r in rows)
    return math.exp(sum(r["nll"] for r in rows) / n) if n else None


def _ppl_tables(records: list[dict], label: str = "", gaps: bool = True) -> list[str]:
    """Per length: the perplexity table and (``gaps``) the gap-to-full table."""
    lines: list[str] = []
    methods, budgets = _axes(records)
    for length in sorted({r["length"] for r in records}):
        rows = [r for r in records if r["length"] == length]
        grid = _Grid(rows, _pooled_ppl)
        samples = sorted({r["sample"] for r in rows})
        lines += _table(grid, methods, budgets, 3,
                        f"length {length} tokens — perplexity ({_count(len(samples), 'sample')})", label)
        if not gaps:
            continue
        full = grid.value("full", None)

        def gap(rows, full=full):
            value = _pooled_ppl(rows)
            return None if value is None or full is None else value - full

        lines += _table(_Grid(rows, gap), methods, budgets, 3, f"length {length} tokens — perplexity gap to full",
                        label)
    return lines


def _ppl_section(records: list[dict], label: str = "") -> list[str]:
    sources = {str(r.get("sample", "")).split("@")[0] for r in records}
    files = sorted({data_label(r["data"]) for r in records if r.get("data")})
    text = f"your text: {', '.join(files)}" if files else "Paul Graham essays" if sources == {"essays"} else (
        "Austen novels" if "essays" not in sources else "Austen novels and Paul Graham essays")
    lines = [f"## Perplexity under eviction ({text})" + _suffix(label), "",
             "Perplexity pooled over samples; below it, the gap to the full cache (same samples). Lower is better.", ""]
    setting = settings_line(records)
    if setting:
        lines += [setting, ""]
    return lines + _ppl_tables(records, label) + _caote_effect_section(records, label)


def _caote_effect_section(records: list[dict], label: str = "") -> list[str]:
    """Does adding CAOTE help? Relative change of each base policy's perplexity gap, cell by cell."""
    ppl = ppl_summary(records)
    cells = sorted({(length, budget) for length, _, budget in ppl if budget is not None})
    columns = [method for method, _, _ in CORRECTED]
    rows, helped, compared, fast_wins, pairs = [], defaultdict(int), defaultdict(int), 0, 0
    for length, budget in cells:
        full = ppl.get((length, "full", None))
        if full is None:
            continue
        row = []
        for column, base, fix in CORRECTED:
            with_fix, without = ppl.get((length, column, budget)), ppl.get((length, base, budget))
            if with_fix is None or without is None or without - full <= 0:
                row.append("—")
                continue
            change = 1.0 - (with_fix - full) / (without - full)
            compared[fix] += 1
            helped[fix] += change > 0
            row.append(f"{change:+.1%}")
        for base in dict.fromkeys(base for _, base, _ in CORRECTED):
            caote, fast = ppl.get((length, f"{base}+caote", budget)), ppl.get((length, f"{base}+fastcaote", budget))
            if caote is not None and fast is not None:
                pairs += 1
                fast_wins += fast < caote
        rows.append(f"| {length} | {budget} | " + " | ".join(row) + " |")
    if not rows:
        return []
    lines = ["### Does CAOTE help? Change of the perplexity gap to full" + _suffix(label), "",
             "Positive = the correction shrinks the base policy's gap (by that fraction of it); negative = it widens it.",
             "", "| length | budget | " + " | ".join(columns) + " |", "|---:|---:|" + "---:|" * len(columns), *rows, ""]
    for fix in dict.fromkeys(fix for _, _, fix in CORRECTED):
        if compared[fix]:
            lines.append(f"- `+{fix}` shrinks the gap in {helped[fix]} of {compared[fix]} cells.")
    if pairs:
        lines.append(f"- `+fastcaote` has the smaller gap than `+caote` in {fast_wins} of {pairs} cells.")
    return lines + _per_window_effect(records) + [""]


def _per_window_effect(records: list[dict]) -> list[str]:
    """The same question asked of each text window separately (not pooled): in how many (window, length, base)
    comparisons per budget does the correction give the lower perplexity? Shows whether a pooled effect holds
    window by window."""
    loss = {(r["length"], r["sample"], r["method"], r["budget"]): r["nll"] / r["tokens"] for r in records if r["tokens"]}
    base_and_fix = {method: (base, fix) for method, base, fix in CORRECTED}
    better: dict[tuple[str, int], list[int]] = defaultdict(lambda: [0, 0])
    for (length, sample, method, budget), value in loss.items():
        base, fix = base_and_fix.get(method, (None, None))
        base_value = loss.get((length, sample, base, budget))
        if base_value is not None:
            better[(fix, budget)][0] += value < base_value
            better[(fix, budget)][1] += 1
    lines = []
    for fix in dict.fromkeys(fix for _, _, fix in CORRECTED):
        counts = [f"b={b} {better[(fix, b)][0]} of {better[(fix, b)][1]}"
                  for b in sorted(b for f, b in better if f == fix)]
        if counts:
            lines.append(f"- Window by window, `+{fix}` has the lower perplexity than its base in: "
                         + ", ".join(counts) + ".")
    return lines


def _ppl_plot(records: list[dict], out: Path, label: str = "") -> Path | None:
    lengths = sorted({r["length"] for r in records})
    if not lengths:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(lengths), figsize=(5 * len(lengths), 4), squeeze=False)
    for ax, length in zip(axes[0], lengths):
        grid = _Grid([r for r in records if r["length"] == length], _pooled_ppl)
        full = grid.value("full", None)
        for m in grid.methods:
            if m == "full":
                continue
            points = [(b, grid.value(m, b)) for b in grid.budgets if grid.value(m, b) is not None]
            if points and full is not None:
                ax.plot([b for b, _ in points], [v - full for _, v in points], marker="o", label=m,
                        **_style(m))
        _budget_axis(ax, grid.budgets)
        ax.set_xlabel("budget (tokens per layer and KV head)")
        ax.set_ylabel("perplexity − full-cache perplexity")
        ax.set_title(f"length {length}" + (f" (full: {full:.2f})" if full is not None else " (no full run)"))
        ax.grid(alpha=0.3)
    _legend(fig, axes)
    _figure_label(fig, label)
    return _save(fig, out / f"ppl_gap{_slug(label)}.png")


# ----------------------------------------------------------------------------------------------
# needle


def _mean_score(rows):
    return _mean([float(r["score"]) for r in rows])


def _mean_prefix(rows):
    """Mean partial credit (:func:`caote.eval.needle.needle_prefix_recovered`), from the stored answers."""
    from caote.eval.needle import needle_prefix_recovered

    return _mean([needle_prefix_recovered(r["prediction"], r["expected"]) for r in rows])


def _niah_section(records: list[dict], label: str = "") -> list[str]:
    lines = ["## Needle in a haystack" + _suffix(label), ""]
    setting = settings_line(records)
    if setting:
        lines += [setting, ""]
    return lines + _niah_tables(records, label)


def _niah_tables(records: list[dict], label: str = "", partial: bool = True) -> list[str]:
    """Recall per length (and over all lengths); with ``partial`` the same for the partial credit."""
    lines: list[str] = []
    methods, budgets = _axes(records)
    lengths = sorted({r["length"] for r in records})
    kinds = (
        (_mean_score, "Needle recall (fraction of samples whose answer holds the needle's value)."),
        (_mean_prefix, ("Partial credit (not a RULER metric): share of the value's leading digits that the "
                        "answer's first number reproduces, mean over samples; 1 where the needle is recovered. "
                        "A guess has the right first digit about one time in ten (1/7 for a 7-digit value).")))
    for value_fn, heading in kinds if partial else kinds[:1]:
        lines += [heading, ""]
        for length in lengths:
            rows = [r for r in records if r["length"] == length]
            depths = sorted({r["sample"] for r in rows})
            lines += _table(_Grid(rows, value_fn), methods, budgets, 3,
                            f"length {length} tokens ({_count(len(depths), 'depth')})", label)
        if len(lengths) > 1:
            lines += _table(_Grid(records, value_fn), methods, budgets, 3, "all lengths", label)
    return lines


def _niah_plots(records: list[dict], out: Path, heatmap_budget: int | None, label: str = "") -> list[Path]:
    if not records:
        return []
    plt = _pyplot()
    import numpy as np

    paths = []
    methods, budgets = _axes(records)
    lengths = sorted({r["length"] for r in records})
    depths = sorted({float(r["sample"]) for r in records})
    budget = heatmap_budget if heatmap_budget is not None else (budgets[0] if budgets else None)
    cols = min(4, len(methods))
    rows_n = math.ceil(len(methods) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(3.2 * cols, 2.8 * rows_n), squeeze=False)
    image = None
    for ax, m in zip(axes.flat, methods):
        b = None if m == "full" else budget
        grid = np.full((len(depths), len(lengths)), np.nan)
        for r in records:
            if r["method"] == m and r["budget"] == b:
                grid[depths.index(float(r["sample"])), lengths.index(r["length"])] = float(r["score"])
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
        ax.set_xticks(range(len(lengths)), [str(x) for x in lengths], fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths], fontsize=7)
        ax.set_title(m if m == "full" else f"{m} (b={b})", fontsize=9)
        ax.set_xlabel("length", fontsize=8)
        if ax in axes[:, 0]:
            ax.set_ylabel("depth", fontsize=8)
    for ax in list(axes.flat)[len(methods):]:
        ax.axis("off")
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="needle recovered")
    _figure_label(fig, label)
    paths.append(_save(fig, out / f"niah_heatmap_b{budget}{_slug(label)}.png", tight=False))  # colorbar: no tight_layout

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    kept, over = _common_lengths(records)
    for ax, value_fn, ylabel in ((axes[0], _mean_score, "needle recall"),
                                (axes[1], _mean_prefix, "leading digits recovered (partial credit)")):
        grid = _Grid(kept, value_fn)
        _score_lines(ax, grid)
        _budget_axis(ax, grid.budgets)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("budget (tokens per layer and KV head)")
        ax.set_ylabel(f"{ylabel}\n({over}, all depths)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="best")
    _figure_label(fig, label)
    paths.append(_save(fig, out / f"niah_recall{_slug(label)}.png"))
    return paths


# ----------------------------------------------------------------------------------------------
# tasks


def _task_order(records: list[dict]) -> list[str]:
    return sorted({r["task"] for r in records}, key=lambda t: (t.startswith("longbench/"), t))


def _task_average(rows):
    per_task = defaultdict(list)
    for r in rows:
        per_task[r["task"]].append(float(r["score"]))
    return _mean([_mean(v) for v in per_task.values()])


def _tasks_section(records: list[dict], label: str = "") -> list[str]:
    own = ", your JSON-lines tasks (`jsonl/<file>`): SQuAD's F1" if any(r.get("suite") == "jsonl" for r in records) \
        else ""
    lines = ["## Long-context tasks" + _suffix(label), "",
             ("RULER tasks: `string_match_all` (fraction of references found), LongBench: its per-dataset metric"
              f"{own}; scores in [0, 1], averaged over samples."), ""]
    setting = settings_line(records)
    if setting:
        lines += [setting, ""]
    tasks = _task_order(records)
    return (lines + _tasks_tables(records, label) + _survival_section(records, tasks, label)
            + _score_effect_section(records, label))


def _tasks_tables(records: list[dict], label: str = "", per_task: bool = True) -> list[str]:
    """Per length: each task's table (``per_task``, or where only one task ran) and the average over tasks."""
    lines: list[str] = []
    methods, budgets = _axes(records)
    tasks = _task_order(records)
    for length in sorted({r["length"] for r in records}):
        at_length = [r for r in records if r["length"] == length]
        present = [t for t in tasks if any(r["task"] == t for r in at_length)]
        for task in present if per_task or len(present) == 1 else []:
            rows = [r for r in at_length if r["task"] == task]
            lines += _table(_Grid(rows, _mean_score), methods, budgets, 3,
                            f"{task}, length {length} ({_count(len({r['sample'] for r in rows}), 'sample')})", label)
        if len(present) > 1:
            lines += _table(_Grid(at_length, _task_average), methods, budgets, 3,
                            f"average over {len(present)} tasks, length {length}", label)
    return lines


def _survival_section(records: list[dict], tasks: Sequence[str], label: str = "") -> list[str]:
    """Which tasks survive eviction: per task and length, the evicting (method, budget) cells scoring above 0."""
    lengths = sorted({r["length"] for r in records})
    cells: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        if r["budget"] is not None:
            cells[(r["task"], r["length"], r["method"], r["budget"])].append(r)
    lines = []
    for task in tasks:
        counts = []
        for length in lengths:
            scores = [_mean_score(rows) for (t, n, _, _), rows in cells.items() if t == task and n == length]
            if scores:
                counts.append(f"{sum(v > 0 for v in scores)} of {len(scores)} at {length}")
        if counts:
            lines.append(f"| {task} | " + ", ".join(counts) + " |")
    if not lines:
        return []
    return ["### Which tasks survive eviction" + _suffix(label), "",
            "Evicting (method x budget) cells whose score is above 0, per length (mean over samples).", "",
            "| task | cells above 0 |", "|---|---|", *lines, ""]


def _score_effect_section(records: list[dict], label: str = "") -> list[str]:
    """Does adding CAOTE change task scores? Per (task, length, budget) cell: better / same / worse than the base."""
    cells: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        cells[(r["task"], r["length"], r["method"], r["budget"])].append(r)
    score = {cell: _mean_score(rows) for cell, rows in cells.items()}
    lines = []
    for method, base, _ in CORRECTED:
        diffs = [value - score[(task, length, base, budget)] for (task, length, m, budget), value in score.items()
                 if m == method and (task, length, base, budget) in score]
        if diffs:
            lines.append(f"| {method} | {sum(d > 0 for d in diffs)} | {sum(d == 0 for d in diffs)} | "
                         f"{sum(d < 0 for d in diffs)} |")
    if not lines:
        return []
    return ["### Does CAOTE help? Task scores against the base policy" + _suffix(label), "",
            "Cells = task x length x budget with both scores (mean over samples).", "",
            "| method | better | same | worse |", "|---|---:|---:|---:|", *lines, ""]


def _score_lines(ax, grid) -> None:
    """One line per method over the budgets; ``full`` (budget-free) as a dashed horizontal line."""
    for m in grid.methods:
        if m == "full":
            value = grid.value("full", None)
            if value is not None:
                ax.axhline(value, color="black", linestyle="--", label="full")
            continue
        points = [(b, grid.value(m, b)) for b in grid.budgets if grid.value(m, b) is not None]
        if points:
            ax.plot([b for b, _ in points], [v for _, v in points], marker="o", label=m, **_style(m))


def _tasks_plot(records: list[dict], out: Path, label: str = "") -> Path | None:
    if not records:
        return None
    plt = _pyplot()
    tasks = _task_order(records)
    panels = tasks + (["average"] if len(tasks) > 1 else [])
    cols = min(3, len(panels))
    rows_n = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.5 * cols, 3.5 * rows_n), squeeze=False)
    for ax, task in zip(axes.flat, panels):
        rows, over = _common_lengths(records if task == "average" else [r for r in records if r["task"] == task])
        grid = _Grid(rows, _mean_score)
        _score_lines(ax, grid)
        _budget_axis(ax, grid.budgets)
        ax.set_title(f"{task} ({over})" if task != "average" else f"average (all tasks, {over})", fontsize=9)
        ax.set_xlabel("budget")
        ax.set_ylabel("score")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    _legend(fig, axes)
    _figure_label(fig, label)
    return _save(fig, out / f"tasks_score{_slug(label)}.png")


# ----------------------------------------------------------------------------------------------
# SQuAD


def _squad_groups(records: Sequence[dict]) -> list[tuple[str, list[dict]]]:
    """Records split by every setting but the protocol (protocols become rows of one table)."""
    marked = [{**r, "protocol": None, "_protocol": r.get("protocol")} for r in records]
    return settings_groups(marked)


def _squad_tables(records: Sequence[dict]) -> list[str]:
    """SQuAD F1 and exact match (x 100, mean over questions) per method x budget, one row per method and
    protocol, one table per combination of the other settings; ``full`` is repeated in every budget column."""
    lines: list[str] = []
    for label, rows in _squad_groups(records):
        cells: dict[tuple[str, str, int | None], list[dict]] = defaultdict(list)
        for r in rows:
            cells[(r["method"], r["_protocol"], r["budget"])].append(r)
        budgets = sorted({b for _, _, b in cells if b is not None})
        row_keys = sorted({(m, p) for m, p, _ in cells}, key=lambda mp: (mp[1] != "bounded", mp[1] or "",
                                                                          method_sort_key(mp[0])))
        head = "| method | protocol | questions | " + " | ".join(f"F1 b={b} | EM b={b}" for b in budgets) + " |"
        if not budgets:
            head = "| method | protocol | questions | F1 | EM |"
        width = max(1, len(budgets))
        table = [f"#### SQuAD v1.1 dev (whole articles){_suffix(label)}", "", head,
                 "|---|---|---:|" + "---:|---:|" * width]
        most = max((len(v) for v in cells.values()), default=0)
        missing = []
        for method, protocol in row_keys:
            columns = [None] if method == "full" or not budgets else budgets
            values = []
            counts = []
            for b in (budgets or [None]):
                got = cells.get((method, protocol, None if method == "full" else b), [])
                counts.append(len(got))
                values += [_fmt(100 * v if v is not None else None, 1)
                           for v in (_mean([float(r["score"]) for r in got]), _mean([float(r["em"]) for r in got]))]
            for b in columns:
                n = len(cells.get((method, protocol, b), []))
                if n < most:
                    missing.append(f"{method}@{b if b is not None else 'full'} [{protocol}] ({n}/{most} questions)")
            table.append(f"| {method} | {protocol} | {max(counts)} | " + " | ".join(values) + " |")
        articles = sorted({r["task"] for r in rows})
        truncated = {r["sample"] for r in rows if r.get("truncated")}
        tokens = [r["prompt_tokens"] for r in rows if "prompt_tokens" in r]
        table += ["", f"{_count(len(articles), 'article')}: {', '.join(a.replace('_', ' ') for a in articles)}; "
                      f"prompts {min(tokens, default=0)}-{max(tokens, default=0)} tokens (max context "
                      f"{'/'.join(str(n) for n in sorted({r['length'] for r in rows}))}); "
                      f"{_count(len(truncated), 'question')} with a truncated document.",
                  "", "Missing cells: " + (", ".join(missing) if missing else "none") + ".", ""]
        lines += table
    return lines


def _squad_section(records: list[dict]) -> list[str]:
    if not records:
        return []
    lines = ["## SQuAD v1.1 dev over whole Wikipedia articles", "",
             ("Each article is one document; per question, SQuAD's official F1 and exact match (x 100, mean over "
              "questions) of the first line of the greedy answer. Rows: method and protocol (bounded = "
              "query-agnostic eviction; question-aware = the question steers eviction during prefill)."), ""]
    setting = settings_line([{**r, "protocol": None} for r in records])
    if setting:
        lines += [setting, ""]
    return lines + _squad_tables(records)


# ----------------------------------------------------------------------------------------------
# plotting helpers


_COLORS = {"baseline": None, "h2o": "tab:blue", "tova": "tab:orange", "snapkv": "tab:green"}
_LINESTYLE = {None: "-", "caote": "--", "fastcaote": ":"}


def _style(method: str) -> dict:
    base, _, fix = method.partition("+")
    if base == "streaming":
        return {"color": "tab:gray", "linestyle": "-"}
    if base == "caote":
        return {"color": "tab:red", "linestyle": "-"}
    return {"color": _COLORS.get(base), "linestyle": _LINESTYLE.get(fix or None, "-")}


def _figure_label(fig, label: str) -> None:
    """Name the settings of a figure when its file holds several combinations."""
    if label:
        fig.suptitle(label, fontsize=9)


def _budget_axis(ax, budgets) -> None:
    """Log-2 budget axis labelled with the budgets themselves."""
    ax.set_xscale("log", base=2)
    if budgets:
        ax.set_xticks(list(budgets), [str(b) for b in budgets])
        ax.minorticks_off()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _legend(fig, axes) -> None:
    handles, labels = {}, []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in handles:
                handles[lab] = h
                labels.append(lab)
    if labels:
        fig.legend([handles[lab] for lab in labels], labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)


def _save(fig, path: Path, tight: bool = True) -> Path:
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------
# entry point


def write_report(out: str | Path, heatmap_budget: int | None = None) -> dict:
    """Write ``<out>/results.md`` and the PNG plots; return ``{"markdown": path, "plots": [paths]}``."""
    out = Path(out)
    if not out.is_dir():
        raise FileNotFoundError(f"results folder {out} does not exist")
    runs = read_jsonl(out / "runs.jsonl")
    by_id = {r["run_id"]: r for r in runs if "run_id" in r}
    ppl = _dedupe(load_records(out / "ppl.jsonl", by_id))
    niah = _dedupe(load_records(out / "niah.jsonl", by_id))
    tasks = _dedupe(load_records(out / "tasks.jsonl", by_id))
    squad = _dedupe(load_records(out / "squad.jsonl", by_id))
    lines = ["# caote evaluation results", ""]
    if runs:
        last = runs[-1]
        models = sorted({r["model"] for r in ppl + niah + tasks + squad})
        lines += [f"Model(s): {', '.join(models) or '—'}. {len(runs)} run(s) recorded in `runs.jsonl`; last: "
                  f"`{' '.join(last.get('argv', []))}` with "
                  + ", ".join(f"{k} {v}" for k, v in last.get("versions", {}).items()) + ".", ""]
    lines += [("Rows: methods grouped by base policy (full, streaming, caote; then each base with its +caote and "
              "+fastcaote corrections). Columns: KV budget in tokens per layer and KV head. The `full` row does "
              "not depend on the budget and is repeated in every column."), ""]
    plots: list[Path] = []
    for name, records in (("ppl", ppl), ("niah", niah), ("tasks", tasks)):
        groups = settings_groups(records)
        if len(groups) > 1:
            lines += [f"`{name}.jsonl` holds {len(groups)} combinations of settings, reported separately (never "
                      "pooled): " + "; ".join(f"[{label}] {_count(len(rows), 'record')}" for label, rows in groups)
                      + ".", ""]
        for label, rows in groups:
            if name == "ppl":
                lines += _ppl_section(rows, label)
                plots.append(_ppl_plot(rows, out, label))
            elif name == "niah":
                lines += _niah_section(rows, label)
                plots += _niah_plots(rows, out, heatmap_budget, label)
            else:
                lines += _tasks_section(rows, label)
                plots.append(_tasks_plot(rows, out, label))
    lines += _squad_section(squad)
    if not (ppl or niah or tasks or squad):
        lines += ["No results found (expected ppl.jsonl, niah.jsonl, tasks.jsonl or squad.jsonl).", ""]
    plots = [p for p in plots if p is not None]
    if plots:
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    md = out / "results.md"
    md.write_text("\n".join(lines), encoding="utf-8")
    return {"markdown": md, "plots": plots}


def summary_lines(eval_name: str, records: Sequence[dict]) -> list[str]:
    """The result table(s) of one evaluation's records (e.g. the cells of one ``caote eval`` run), as the
    report lays them out: perplexity per length (``ppl``), needle recall per length (``niah``), per length
    the task score, averaged over tasks where several ran (``tasks``). Records that differ in a setting
    get separate tables, labelled."""
    records = _dedupe(records)
    if eval_name == "squad":  # protocols are rows of one table
        return _squad_tables(records)
    lines: list[str] = []
    for label, rows in settings_groups(records):
        if eval_name == "ppl":
            lines += _ppl_tables(rows, label, gaps=False)
        elif eval_name == "niah":
            lines += _niah_tables(rows, label, partial=False)
        elif eval_name == "tasks":
            lines += _tasks_tables(rows, label, per_task=False)
        else:
            raise ValueError(f"unknown evaluation {eval_name!r}")
    return lines


__all__ = ["METHOD_ORDER", "method_sort_key", "ppl_summary", "settings_groups", "summary_lines", "write_report"]
