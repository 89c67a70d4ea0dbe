"""Eviction configuration and the composition of a method name into a score.

A method name is ``base`` or ``base+correction``:

* bases: ``full`` (never evict), ``streaming`` (sinks + recent), ``caote`` (exact error of the step's real
  attention), ``tova``, ``h2o``, ``snapkv`` (attention-score policies);
* corrections, on ``tova``/``h2o``/``snapkv`` only: ``+caote`` and ``+fastcaote`` (method.md §3).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from caote import scores

SCORE_BASES = ("tova", "h2o", "snapkv")
CORRECTIONS = ("caote", "fastcaote")
METHODS: tuple[str, ...] = (
    "full",
    "streaming",
    "caote",
    *SCORE_BASES,
    *(f"{base}+{fix}" for base in SCORE_BASES for fix in CORRECTIONS),
)
STREAMING_SINKS = 4
"""StreamingLLM reference default: four attention-sink tokens."""


def parse_method(method: str) -> tuple[str, str | None]:
    """Split ``"snapkv+caote"`` into ``("snapkv", "caote")``; a clear error names the valid methods."""
    name = method.strip().lower() if isinstance(method, str) else method
    if name not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}")
    base, _, correction = name.partition("+")
    return base, correction or None


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
    """

    budget: int | None
    method: str = "caote"
    block_size: int = 128
    sink_tokens: int | None = None
    recent_window: int | None = None
    snapkv_window: int = 32
    snapkv_kernel: int = 5
    base: str = field(init=False)
    correction: str | None = field(init=False)

    def __post_init__(self) -> None:
        base, correction = parse_method(self.method)
        object.__setattr__(self, "method", self.method.strip().lower())
        object.__setattr__(self, "base", base)
        object.__setattr__(self, "correction", correction)
        if not _is_positive_int(self.block_size):
            raise ValueError(f"block_size must be a positive integer, got {self.block_size!r}")
        if base == "full":
            return
        if not _is_positive_int(self.budget):
            raise ValueError(f"budget must be a positive integer (tokens per layer and KV head), got {self.budget!r}")
        if not _is_positive_int(self.snapkv_window):
            raise ValueError(f"snapkv_window must be a positive integer, got {self.snapkv_window!r}")
        if not _is_positive_int(self.snapkv_kernel) or self.snapkv_kernel % 2 == 0:
            raise ValueError(f"snapkv_kernel must be a positive odd integer, got {self.snapkv_kernel!r}")
        sinks = self.sink_tokens if self.sink_tokens is not None else (STREAMING_SINKS if base == "streaming" else 0)
        if sinks < 0:
            raise ValueError(f"sink_tokens must be >= 0, got {sinks}")
        recent = self.recent_window if self.recent_window is not None else self._default_recent(base, sinks)
        if recent < 0:
            raise ValueError(f"recent_window must be >= 0, got {recent}")
        if sinks + recent > self.budget:
            raise ValueError(
                f"budget={self.budget} is smaller than the protected tokens: sink_tokens={sinks} + "
                f"recent_window={recent} = {sinks + recent}; raise the budget or protect fewer tokens"
            )
        object.__setattr__(self, "sink_tokens", sinks)
        object.__setattr__(self, "recent_window", recent)

    def _default_recent(self, base: str, sinks: int) -> int:
        assert self.budget is not None
        return {
            "streaming": max(self.budget - sinks, 0),
            "h2o": self.budget // 2,
            "snapkv": min(self.snapkv_window, self.budget - sinks),
        }.get(base, 0)

    @property
    def evicts(self) -> bool:
        return self.base != "full"

    @property
    def needs_attention(self) -> bool:
        """Whether scoring needs the attention weights (all but ``full`` and ``streaming``)."""
        return self.base not in ("full", "streaming")

    @property
    def query_rows(self) -> int | None:
        """How many of a step's last queries the scores read (``None`` = all): TOVA reads the last query,
        SnapKV its observation window; CAOTE (every query's error) and H2O (every query's mass) read all."""
        return {"tova": 1, "snapkv": self.snapkv_window}.get(self.base)

    @property
    def accumulates_attention(self) -> bool:
        """H2O's score is attention accumulated over every query: it needs the weights at every step."""
        return self.base == "h2o"


def _is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def score_entries(
    config: EvictionConfig,
    attn: torch.Tensor | None,
    values: torch.Tensor,
    outputs: torch.Tensor | None,
    positions: torch.Tensor,
    attention_sum: torch.Tensor | None,
) -> torch.Tensor:
    """Score every stored entry ``(B, H_kv, N)`` for ``config.method`` (higher = keep).

    ``attention_sum`` is H2O's accumulator over the same entries (see :func:`scores.attention_mass`).
    Protection of sinks and recent tokens is applied by the cache, not here.
    """
    base = config.base
    if base == "streaming":
        return scores.streaming_scores(positions)
    if base == "caote":
        return scores.caote_scores(attn, values, outputs)
    if base == "tova":
        importance = scores.tova_scores(attn)
    elif base == "h2o":
        importance = attention_sum
    elif base == "snapkv":
        importance = scores.snapkv_scores(attn, config.snapkv_window, config.snapkv_kernel)
    else:  # "full" never scores
        raise ValueError(f"method {config.method!r} does not score entries")
    if config.correction == "caote":
        return scores.caote_meta_scores(importance, values)
    if config.correction == "fastcaote":
        return scores.fastcaote_meta_scores(importance, values)
    return importance
