"""The method registry: every base, correction and modifier by name, and the composition of a method name.

A method name is ``base[+correction][+out][+joint][+adaptive][+chunks]`` (case-insensitive):

* ``base`` — one of :data:`~caote.methods.bases.BASES` (``full``, ``streaming``, ``caote``, ``tova``, ``h2o``,
  ``snapkv``, ``dropkv``, ``expected``);
* ``+caote`` / ``+fastcaote`` — CAOTE's meta-heuristic on the base's rows (method.md §3), for bases marked
  correctable;
* ``+out`` — errors measured in the residual stream through ``o_proj`` (method.md §6), for every method whose score
  is a CAOTE error (``caote``, ``dropkv``, any ``+caote``/``+fastcaote``);
* ``+joint`` — the evicted set chosen greedily on its exact joint error (method.md §6) instead of by ranking single
  errors, for ``caote`` and ``+caote``;
* ``+adaptive`` — head-adaptive budgets (:mod:`caote.head_adaptive`): the layer's ``budget × H_kv`` entries shared
  by its KV heads, each keeping what its scores justify, stored per head (the bytes saved are real), for every
  method that scores entries from the attention step;
* ``+chunks`` — eviction of whole chunks of ``chunk_size`` consecutive positions (ChunkKV; the block granularity
  of a paged serving cache, docs/serving.md), chunk score = summed entry scores, for every evicting method but
  ``+joint`` and ``+adaptive``.

Adding a method: define its :class:`~caote.methods.base.Base` (or :class:`~caote.methods.base.Correction`) in its own
small module and list it here.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from caote import scores
from caote.methods.base import Base, Correction, Reads, StepView
from caote.methods.bases import BASES
from caote.validation import suggest

CORRECTIONS: tuple[Correction, ...] = (
    Correction("caote", "CAOTE on the base's normalised scores: `ĥ_j/(1−ĥ_j)·‖X̂−v_j‖`, `X̂ = Σ ĥ_i v_i`",
               lambda rows, values: rows @ values.unsqueeze(2)),
    Correction("fastcaote", "as `+caote` with `X̂` = mean of the values",
               lambda rows, values: values.mean(dim=-2)[:, :, None, None, :].expand(*rows.shape[:-1], -1),
               joint=False),
)
MODIFIERS = ("out", "joint", "adaptive", "chunks")

BASE_BY_NAME = {base.name: base for base in BASES}
CORRECTION_BY_NAME = {c.name: c for c in CORRECTIONS}

PAPER_METHODS: tuple[str, ...] = (
    "full", "streaming", "caote",
    *(f"{base}{fix}" for base in ("tova", "h2o", "snapkv") for fix in ("", "+caote", "+fastcaote")),
)
"""The paper's grid (method.md §3): the default of ``caote eval``."""
NEW_METHODS: tuple[str, ...] = (
    "caote+out", "caote+joint", "dropkv", "expected", "expected+caote", "expected+caote+out",
    "snapkv+caote+out", "snapkv+caote+joint", "h2o+caote+out",
    "snapkv+adaptive", "snapkv+caote+adaptive", "expected+caote+adaptive", "caote+chunks", "snapkv+caote+chunks",
)
"""Query-agnostic methods beyond the paper (method.md §6), each a composition of the registry's parts."""
METHODS: tuple[str, ...] = PAPER_METHODS + NEW_METHODS
"""Named methods (any other valid composition works too, see :func:`parse_method`)."""


@dataclass(frozen=True)
class MethodSpec:
    """A method name resolved into its parts."""

    name: str
    base: Base
    correction: Correction | None = None
    output_space: bool = False
    joint: bool = False
    adaptive: bool = False
    chunked: bool = False

    @property
    def reads(self) -> Reads:
        return self.base.reads

    def score(self, view: StepView) -> torch.Tensor:
        """Every stored entry's score ``(B, H_kv, N)``, higher = keep."""
        view.output_space = self.output_space
        if self.correction is None:
            return self.base.importance(view)
        rows = self._rows(view)
        return view.error(rows, self.correction.estimate(rows, view.values))

    def _rows(self, view: StepView) -> torch.Tensor:
        if self.base.rows is not None:
            return self.base.rows(view)
        return scores.normalise(self.base.importance(view))[:, :, None, None, :]

    def choose_evicted(self, view: StepView, entry_scores: torch.Tensor, protected: torch.Tensor | None,
                       n_evict: int) -> torch.Tensor:
        """Indices ``(B, H_kv, n)`` of the entries to evict: the ``n = n_evict`` lowest scores, with ``+joint`` the
        greedy set of smallest joint error, with ``+chunks`` the whole chunks of lowest score (``n`` rounded up to
        whole chunks); never a protected entry."""
        if self.joint:
            rows = self.base.joint_rows(view) if self.correction is None else self._rows(view)
            candidates = torch.ones_like(entry_scores, dtype=torch.bool) if protected is None else ~protected
            flat = rows.flatten(2, 3)
            return scores.greedy_joint_eviction(flat, view.values, n_evict, candidates, view.config.joint_round)
        if self.chunked:
            return scores.chunk_eviction(entry_scores, view.positions, protected, n_evict, view.config.chunk_size,
                                         view.seen)
        if protected is not None:
            entry_scores = entry_scores.masked_fill(protected, float("inf"))
        return entry_scores.topk(n_evict, dim=-1, largest=False).indices


@lru_cache(maxsize=None)
def resolve(method: str) -> MethodSpec:
    """Resolve ``method`` (case-insensitive) or raise a ``ValueError`` that names the problem and the choices."""
    if not isinstance(method, str) or not method.strip():
        raise ValueError(f"method must be a non-empty string, got {method!r}; valid methods: {', '.join(METHODS)}")
    name = method.strip().lower()
    base_name, *parts = name.split("+")
    base = BASE_BY_NAME.get(base_name)
    if base is None:
        raise ValueError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}{_suggest(name)}")
    correction = None
    if parts and parts[0] in CORRECTION_BY_NAME:
        if not base.correctable:
            raise ValueError(f"unknown method {method!r}: '+{parts[0]}' corrects a base's scores and does not apply "
                             f"to {base_name!r}; valid methods: {', '.join(METHODS)}")
        correction = CORRECTION_BY_NAME[parts.pop(0)]
    unknown = [p for p in parts if p not in MODIFIERS]
    if unknown or len(set(parts)) != len(parts):
        raise ValueError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}{_suggest(name)}")
    spec = MethodSpec(_canonical(base, correction, parts), base, correction, "out" in parts, "joint" in parts,
                      "adaptive" in parts, "chunks" in parts)
    is_error = correction is not None or base.name in ("caote", "dropkv")
    if spec.output_space and not is_error:
        raise ValueError(f"method {method!r}: '+out' measures a CAOTE error through o_proj; {base_name!r} alone scores "
                         f"no error (use e.g. {base_name}+caote+out)")
    if spec.joint and not (base.joint_rows is not None if correction is None else correction.joint):
        raise ValueError(f"method {method!r}: '+joint' needs an error of real or normalised attention rows "
                         "(caote, or a base with +caote)")
    if spec.adaptive and not (base.reads.attention or base.reads.queries):
        raise ValueError(f"method {method!r}: '+adaptive' shares the budget by the heads' scores; {base_name!r} scores "
                         "no entry from the attention step (every head would keep the same)")
    if spec.chunked and (spec.joint or spec.adaptive or not base.evicts):
        raise ValueError(f"method {method!r}: '+chunks' evicts whole chunks per head; it does not combine with "
                         "'+joint' or '+adaptive' (nor apply to 'full')")
    if spec.adaptive and spec.joint:
        raise ValueError(f"method {method!r}: '+adaptive' and '+joint' together are not implemented")
    if spec.joint and spec.output_space:
        raise ValueError(f"method {method!r}: '+joint' and '+out' together are not implemented")
    return spec


def _canonical(base: Base, correction: Correction | None, modifiers: list[str]) -> str:
    parts = [base.name] + ([correction.name] if correction else []) + [m for m in MODIFIERS if m in modifiers]
    return "+".join(parts)


def _suggest(name: str) -> str:
    hint = suggest(name, METHODS)
    return f";{hint}" if hint else ""


def parse_method(method: str) -> tuple[str, str | None]:
    """``"snapkv+caote"`` -> ``("snapkv", "caote")``: base and correction names (modifiers dropped)."""
    spec = resolve(method)
    return spec.base.name, spec.correction.name if spec.correction else None


def parent_method(method: str) -> str | None:
    """The method one part shorter (``snapkv+caote+joint`` -> ``snapkv+caote`` -> ``snapkv``; a base -> ``None``):
    what a composition is compared with, so that a comparison changes one thing."""
    parts = resolve(method).name.split("+")
    return "+".join(parts[:-1]) if len(parts) > 1 else None


def canonical_method(method: str) -> str:
    """The canonical spelling of a method name (lower case, parts in registry order)."""
    return resolve(method).name
