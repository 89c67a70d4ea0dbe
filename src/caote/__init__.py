"""caote: bounded-budget KV cache with CAOTE (attention-output-error) token eviction for transformers.

Implements CAOTE (Goel et al., arXiv 2504.14051) and the policies it improves (H2O, TOVA, SnapKV),
StreamingLLM and FastCAOTE. See ``docs`` in the repository and ``shared/docs/method.md``.
"""

from caote.ask import ask
from caote.cache import EvictingCache
from caote.layers import EvictingLayer
from caote.hf import attached
from caote.generation import GenerationResult, generate, prefill
from caote.models import load_model, load_tokenizer
from caote.policy import METHODS, EvictionConfig, parse_method

__version__ = "0.1.0"

__all__ = [
    "ask",
    "attached",
    "EvictingCache",
    "EvictingLayer",
    "EvictionConfig",
    "GenerationResult",
    "METHODS",
    "generate",
    "load_model",
    "load_tokenizer",
    "parse_method",
    "prefill",
]
