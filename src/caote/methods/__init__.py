"""Eviction methods: one registry of bases, corrections and modifiers (see :mod:`caote.methods.registry`)."""

from caote.methods.base import Base, Correction, ModelFacts, Reads, StepView
from caote.methods.registry import (
    BASES,
    CORRECTIONS,
    METHODS,
    NEW_METHODS,
    PAPER_METHODS,
    MethodSpec,
    canonical_method,
    parent_method,
    parse_method,
    resolve,
)

__all__ = [
    "BASES", "CORRECTIONS", "METHODS", "NEW_METHODS", "PAPER_METHODS", "Base", "Correction", "MethodSpec",
    "ModelFacts", "Reads", "StepView", "canonical_method", "parent_method", "parse_method", "resolve",
]
