"""Eviction configuration: a method name (resolved by the registry, :mod:`caote.methods`), a budget and the options
of the method's parts, validated up front."""

from __future__ import annotations

from dataclasses import dataclass, field

from caote.methods import METHODS, NEW_METHODS, PAPER_METHODS, MethodSpec, StepView, parse_method, resolve


@dataclass(frozen=True)
class EvictionConfig:
    """How a cache keeps at most ``budget`` entries per layer and KV head.

    Attributes:
        budget: entries kept per layer and KV head after each step (``None`` only for ``method="full"``).
        method: one of :data:`METHODS`.
        block_size: prompt tokens per prefill step; the cache holds at most ``budget + block_size`` entries.
        sink_tokens: first positions never evicted. ``None`` = the method's default (4 for ``streaming``,
            0 otherwise: method.md §4, "default off for CAOTE/TOVA").
        recent_window: most recent positions never evicted. ``None`` = the method's default: ``budget - sinks``
            for ``streaming``; ``budget // 2`` for ``h2o`` (the reference splits its budget equally between heavy
            hitters and recent tokens); ``snapkv_window`` for ``snapkv`` (the reference keeps its observation
            window); 0 for ``caote`` and ``tova``. The ``+caote``/``+fastcaote`` variants use their base's default.
        snapkv_window: SnapKV observation window (reference default 32).
        snapkv_kernel: SnapKV pooling kernel (reference default 5, average pooling).
        expected_future: future positions the ``expected`` score averages the rotary phase over (kvpress default 512).
        joint_round: entries added per greedy round of ``+joint`` (1 = plain greedy; larger = fewer passes).
        head_floor: with ``+adaptive``, the fraction of ``budget`` every KV head keeps whatever its scores (AdaKV's
            safeguard ``alpha``, default 0.2); the rest of the layer's ``budget × H_kv`` goes to the best scores.
        chunk_size: with ``+chunks``, positions per chunk (evicted whole; 16 = vLLM's default block size).
        slack: entries a layer may hold above ``budget`` before it evicts, back to ``budget`` (issue 13): a decoding
            step then scores and compacts once every ``slack + 1`` tokens instead of every token, and the steps in
            between run plain SDPA (unless the method accumulates attention, H2O). The memory bound becomes
            ``budget + slack + block_size`` entries (:meth:`steady_entries`). 0 (default) = evict after every step
            (the paper's schedule, method.md §1); prefill blocks longer than ``slack`` evict after every block as
            before.
        protect_question: question-aware mode only (:mod:`caote.question`): while the prompt is read, protect the
            prompt's question (its tail, which the probe repeats) instead of the most recent ``recent_window``
            positions. Blocks before the question then protect no recent entries and the shared spans get them
            (quota ``budget - sink_tokens`` instead of ``budget - sink_tokens - recent_window``); the block that
            holds the question keeps it whole. Decoding protects ``recent_window`` as usual. docs/decisions.md 14 (l).
    """

    budget: int | None
    method: str = "caote"
    block_size: int = 128
    sink_tokens: int | None = None
    recent_window: int | None = None
    snapkv_window: int = 32
    snapkv_kernel: int = 5
    expected_future: int = 512
    joint_round: int = 8
    head_floor: float = 0.2
    chunk_size: int = 16
    slack: int = 0
    protect_question: bool = False
    spec: MethodSpec = field(init=False, repr=False, compare=False)
    base: str = field(init=False)
    correction: str | None = field(init=False)

    def __post_init__(self) -> None:
        spec = resolve(self.method)
        object.__setattr__(self, "spec", spec)
        object.__setattr__(self, "method", spec.name)
        object.__setattr__(self, "base", spec.base.name)
        object.__setattr__(self, "correction", spec.correction.name if spec.correction else None)
        if not _is_positive_int(self.block_size):
            raise ValueError(f"block_size must be a positive integer, got {self.block_size!r}")
        if self.protect_question not in (True, False):  # 0 and 1 too (a command line's numbers)
            raise ValueError(f"protect_question must be true or false (1 or 0), got {self.protect_question!r}")
        object.__setattr__(self, "protect_question", bool(self.protect_question))
        if not spec.base.evicts:
            return
        if not _is_positive_int(self.budget):
            raise ValueError(f"budget must be a positive integer (tokens per layer and KV head), got {self.budget!r}")
        if not _is_positive_int(self.snapkv_window):
            raise ValueError(f"snapkv_window must be a positive integer, got {self.snapkv_window!r}")
        if not _is_positive_int(self.snapkv_kernel) or self.snapkv_kernel % 2 == 0:
            raise ValueError(f"snapkv_kernel must be a positive odd integer, got {self.snapkv_kernel!r}")
        if isinstance(self.slack, bool) or not isinstance(self.slack, int) or self.slack < 0:
            raise ValueError(f"slack must be an integer >= 0 (entries held above the budget before evicting), got "
                             f"{self.slack!r}")
        for name in ("expected_future", "joint_round", "chunk_size"):
            if not _is_positive_int(getattr(self, name)):
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if isinstance(self.head_floor, bool) or not isinstance(self.head_floor, (int, float)) or not (
                0.0 <= self.head_floor <= 1.0):
            raise ValueError(f"head_floor must be a number in [0, 1] (a fraction of the budget), got {self.head_floor!r}")
        sinks = self.sink_tokens if self.sink_tokens is not None else spec.base.default_sinks(self)
        if sinks < 0:
            raise ValueError(f"sink_tokens must be >= 0, got {sinks}")
        recent = self.recent_window if self.recent_window is not None else spec.base.default_recent(self, sinks)
        if recent < 0:
            raise ValueError(f"recent_window must be >= 0, got {recent}")
        if sinks + recent > self.budget:
            raise ValueError(
                f"budget={self.budget} is smaller than the protected tokens: sink_tokens={sinks} + "
                f"recent_window={recent} = {sinks + recent}; raise the budget or protect fewer tokens"
            )
        if spec.chunked:
            chunk = self.chunk_size
            need = chunk * (-(-sinks // chunk) + -(-recent // chunk) + 2)
            if self.budget < need:
                raise ValueError(
                    f"budget={self.budget} is too small for '+chunks' of {chunk}: the protected tokens (sink_tokens="
                    f"{sinks}, recent_window={recent}) cover whole chunks, plus the incomplete newest chunk and one to "
                    f"evict need {need}; raise the budget or lower chunk_size")
        if spec.reads.accumulates and recent == 0:
            raise ValueError(
                f"method {spec.name!r} with recent_window=0 evicts each new token in the step that writes it (its "
                "accumulated attention is still tiny), which destroys the output (perplexity 36 -> ~3,600 measured); "
                "give new entries a grace period: recent_window >= 1 (default budget // 2)")
        object.__setattr__(self, "sink_tokens", sinks)
        object.__setattr__(self, "recent_window", recent)

    @property
    def evicts(self) -> bool:
        return self.spec.base.evicts

    def must_evict(self, stored: int) -> bool:
        """Whether a layer holding ``stored`` entries per KV head after a step evicts now (back to ``budget``)."""
        return self.evicts and stored > self.budget + self.slack

    def steady_entries(self, step: int = 0) -> int:
        """The most entries per KV head a layer holds while a step of ``step`` tokens attends (a step shorter than
        ``block_size`` counts as one block): ``budget + slack + max(block_size, step)``; ``max(block_size, step)``
        for ``full``."""
        room = max(self.block_size, step)
        return self.budget + self.slack + room if self.evicts else room

    @property
    def needs_attention(self) -> bool:
        """Whether scoring needs float32 attention weights."""
        return self.spec.reads.attention

    @property
    def needs_step_inputs(self) -> bool:
        """Whether scoring reads anything of the attention step (weights, or queries and keys)."""
        return self.spec.reads.attention or self.spec.reads.queries

    @property
    def query_rows(self) -> int | None:
        """How many of a step's last queries the scores read (``None`` = all): TOVA reads the last query,
        SnapKV/DropKV their observation window; CAOTE (every query's error) and H2O (every query's mass) read all."""
        return self.spec.reads.query_rows(self)

    @property
    def accumulates_attention(self) -> bool:
        """H2O's score is attention accumulated over every query: it needs the weights at every step."""
        return self.spec.reads.accumulates


def _is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


__all__ = ["METHODS", "NEW_METHODS", "PAPER_METHODS", "EvictionConfig", "StepView", "parse_method"]
