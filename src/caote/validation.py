"""One validation layer for the command line and the Python API, run before any model loads.

Every check raises a one-line ``ValueError`` that names the problem and the fix; the CLI prints it as
``caote: error: <message>`` (exit status 2) and the API raises it unchanged. ``name`` arguments are what the
message calls the value: a flag (``"--max-new-tokens"``) on the command line, a parameter (``"max_new_tokens"``) in
Python; the suggested fix is spelled accordingly (``--threads 4`` or ``threads=4``).

* :func:`check_positive_int`, :func:`check_nonnegative_int`, :func:`check_int_list`, :func:`check_fraction`,
  :func:`check_depths`: numbers and comma lists;
* :func:`check_method`, :func:`check_methods`, :func:`suggest`: method names, case-insensitive, "did you mean";
* :func:`check_dtype`, :func:`dtype_name`: ``fp16``/``float16``/``half``, ``bf16``/``bfloat16``,
  ``fp32``/``float32``/``float`` or a ``torch.dtype``;
* :func:`check_device`: ``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps`` (``auto`` = CUDA, else MPS, else CPU);
* :func:`check_model`, :func:`model_unavailable_message`: a local model folder that must exist, or a hub id that
  must be in the local Hugging Face cache when offline;
* :func:`check_file`, :func:`check_folder`, :func:`check_results_folder`: paths that must exist;
* :func:`read_data_file`, :func:`read_text_file`, :func:`read_qa_jsonl`, :func:`check_data_tokens`: your own data
  (``caote ask``, ``caote eval ppl --text-file``, ``niah --haystack-file``, ``tasks --jsonl``): a UTF-8 file that
  exists and is not empty, JSON lines of question-answering records (the line named in every error), and text long
  enough for what was asked; :class:`DataFile` keys a result by the file's content (sha256 of its bytes),
  :func:`data_label` reads the file's name back from that key; :func:`spelled_like` spells a parameter as a flag
  or a Python name, like the one it is named beside;
* :func:`arg_type` (any check as an ``argparse`` ``type=``), :class:`ArgumentParser` (one-line errors raised as
  :class:`UsageError`), :func:`add_device_argument`.

This module imports nothing from caote at import time (:mod:`caote.policy` may import :func:`suggest`).
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
"""Accepted dtype spellings (case-insensitive, an optional ``torch.`` prefix is ignored)."""
DTYPE_NAMES: dict[torch.dtype, str] = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
"""Canonical name of each supported dtype."""
DTYPE_HELP = "float32 (fp32, float), bfloat16 (bf16) or float16 (fp16, half)"
DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
_TRUE = ("1", "on", "yes", "true")
_INT = re.compile(r"^[+-]?\d+$")
_KILO = re.compile(r"^(\d+(?:\.\d+)?)\s*[kK]$")


# ------------------------------------------------------------------------------------------------ helpers
def _is_flag(name: str) -> bool:
    return name.startswith("-")


def _example(name: str, value: Any) -> str:
    """How to pass ``value`` to ``name``: ``--threads 4`` on the command line, ``threads=4`` in Python."""
    return f"{name} {value}" if _is_flag(name) else f"{name}={value!r}"


def one_line(message: object) -> str:
    """``message`` as one line (lines joined with a space, surrounding blanks dropped)."""
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def suggest(name: str, choices: Iterable[str]) -> str:
    """``" did you mean 'x'?"`` for the choice closest to ``name`` (case-insensitive, difflib), or ``""``."""
    choices = list(choices)
    lowered = {c.lower(): c for c in choices}
    close = difflib.get_close_matches(str(name).strip().lower(), list(lowered), n=1, cutoff=0.6)
    return f" did you mean {lowered[close[0]]!r}?" if close else ""


# ------------------------------------------------------------------------------------------------ numbers
def _parse_int(value: Any) -> int | None:
    """``value`` as an int if it is one (an int, or a string of digits), else ``None``."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and _INT.match(value.strip()):
        return int(value.strip())
    return None


def _kilo_hint(value: Any) -> str:
    match = _KILO.match(str(value).strip())
    return f" (write {round(float(match.group(1)) * 1024)} for {str(value).strip()})" if match else ""


def check_positive_int(value: Any, name: str, example: int | None = None) -> int:
    """``value`` (an int or a string of digits) as an int >= 1, else a ``ValueError`` naming ``name``."""
    number = _parse_int(value)
    if number is None or number < 1:
        fix = f"; e.g. {_example(name, example)}" if example is not None else ""
        raise ValueError(f"{name} must be a positive integer, got {value!r}{_kilo_hint(value)}{fix}")
    return number


def check_nonnegative_int(value: Any, name: str) -> int:
    """``value`` as an int >= 0 (e.g. a seed)."""
    number = _parse_int(value)
    if number is None or number < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}; e.g. {_example(name, 0)}")
    return number


def check_int_list(value: str | Sequence[Any], name: str, example: str = "1024,2048") -> list[int]:
    """A comma list (or a sequence) of positive integers; a malformed item is named in the error."""
    items = value.split(",") if isinstance(value, str) else list(value)
    items = [item.strip() if isinstance(item, str) else item for item in items]
    items = [item for item in items if item != ""]
    fix = f"give a comma list of positive integers such as {_example(name, example)}"
    if not items:
        raise ValueError(f"{name} is empty; {fix}")
    numbers = []
    for item in items:
        number = _parse_int(item)
        if number is None or number < 1:
            raise ValueError(f"{name}: {item!r} is not a positive integer{_kilo_hint(item)}; {fix}")
        numbers.append(number)
    return numbers


def check_fraction(value: Any, name: str) -> float:
    """``value`` as a float in ``[0, 1]`` (e.g. a needle depth)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not 0.0 <= number <= 1.0:
        raise ValueError(f"{name} must be a number from 0 to 1, got {value!r}; e.g. {_example(name, 0.5)}")
    return number


def check_budget(value: Any, name: str = "budget") -> int | float:
    """A KV budget: a positive integer (entries per layer and KV head), or a fraction of the prompt as kvpress users
    think in compression ratios: ``"12.5%"`` or a float in ``(0, 1)``. Returns the int, or the fraction."""
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            fraction = float(value.strip()[:-1]) / 100
        except ValueError:
            fraction = -1.0
        if not 0 < fraction <= 1:
            raise ValueError(f"{name} {value!r} is not a percentage in (0, 100]; e.g. {_example(name, '12.5%')}")
        return fraction
    if isinstance(value, float) and not isinstance(value, bool):
        if not 0 < value < 1:
            raise ValueError(f"{name} {value!r}: a float budget is a fraction of the prompt in (0, 1); "
                             f"e.g. {_example(name, 0.125)}, or an integer number of tokens")
        return value
    return check_positive_int(value, name, 256)


def resolve_budget(budget: Any, prompt_tokens: int, name: str = "budget") -> int | None:
    """Entries per layer and KV head for a prompt of ``prompt_tokens``: an integer budget as given, a fraction of the
    prompt rounded up (at least 1); ``None`` stays ``None`` (method ``full``)."""
    if budget is None:
        return None
    checked = check_budget(budget, name)
    return checked if isinstance(checked, int) else max(1, math.ceil(checked * prompt_tokens))


def check_depths(value: str, name: str = "depths") -> int | list[float]:
    """Needle depths: a positive count of evenly spaced depths (``"5"``) or a comma list of fractions in
    ``[0, 1]`` (``"0.25,0.75"``)."""
    text = str(value).strip()
    if "," not in text and "." not in text:
        return check_positive_int(text, name, 5)
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise ValueError(f"{name} is empty; e.g. {_example(name, '0.25,0.75')} or {_example(name, 5)}")
    depths = []
    for item in items:
        try:
            depths.append(check_fraction(item, name))
        except ValueError:
            raise ValueError(f"{name}: {item!r} is not a depth from 0 to 1; give a count such as {_example(name, 5)}"
                             f" or fractions such as {_example(name, '0.25,0.75')}") from None
    return depths


# ------------------------------------------------------------------------------------------------ methods
def _methods() -> tuple[str, ...]:
    from caote.policy import METHODS

    return tuple(METHODS)


def check_method(name: Any) -> str:
    """The lower-cased canonical name of method ``name`` (case and blanks ignored); an unknown name gets the
    valid names and the closest one ("did you mean")."""
    from caote.policy import parse_method

    methods = _methods()
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"method must be a non-empty string, got {name!r}; valid methods: {', '.join(methods)}")
    key = "".join(name.split()).lower()
    if key in methods:
        return key
    try:
        parse_method(key)  # valid compositions beyond the named methods
    except ValueError as error:
        message = one_line(error)
        if message.startswith("unknown method"):
            message = f"unknown method {name!r};{suggest(key, methods)} valid methods: {', '.join(methods)}"
        raise ValueError(message) from None
    from caote.methods import canonical_method

    return canonical_method(key)


def check_methods(value: str | Sequence[str], name: str = "methods") -> list[str]:
    """A comma list (or a sequence) of methods, checked and lower-cased, duplicates dropped; ``"all"`` = every
    named method (:data:`caote.policy.METHODS`)."""
    if isinstance(value, str) and value.strip().lower() == "all":
        return list(_methods())
    items = value.split(",") if isinstance(value, str) else list(value)
    items = [item for item in items if not isinstance(item, str) or item.strip()]
    if not items:
        raise ValueError(f"{name} is empty; give a comma list such as {_example(name, 'snapkv,snapkv+caote')} "
                         f"(or all)")
    out: list[str] = []
    for item in items:
        method = check_method(item)
        if method not in out:
            out.append(method)
    return out


def check_option(text: str, name: str = "--option") -> tuple[str, int | float | bool]:
    """``NAME=VALUE``: an :class:`~caote.policy.EvictionConfig` option (``head_floor=0.5``, ``sink_tokens=4``) with a
    number as its value, or for a yes/no option (``protect_question``) ``true``/``false``/``1``/``0``; the option's
    own checks run when the configuration is built."""
    import dataclasses

    from caote.policy import EvictionConfig

    fields = {f.name: f for f in dataclasses.fields(EvictionConfig) if f.init and f.name not in ("budget", "method",
                                                                                                  "block_size")}
    key, sep, value = str(text).partition("=")
    key = key.strip().replace("-", "_")
    if not sep or key not in fields:
        hint = suggest(key, list(fields)) if sep else ""
        raise ValueError(f"{name} {text!r}: expected NAME=VALUE with NAME one of {', '.join(fields)}"
                         f"{';' + hint if hint else ''} (e.g. {name} head_floor=0.5)")
    if isinstance(fields[key].default, bool):
        flag = BOOLEAN_WORDS.get(value.strip().lower())
        if flag is None:
            raise ValueError(f"{name} {text!r}: {key} is true or false (1 or 0)")
        return key, flag
    number = _parse_int(value)
    if number is None:
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"{name} {text!r}: the value must be a number") from None
    return key, number


BOOLEAN_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
"""Spellings of a yes/no option's value on the command line."""


# ------------------------------------------------------------------------------------------------ dtypes
def check_dtype(dtype: Any) -> torch.dtype:
    """The ``torch.dtype`` for ``dtype`` (an alias such as ``"fp16"``, or a ``torch.dtype``)."""
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPE_NAMES:
            return dtype
    elif isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key in DTYPES:
            return DTYPES[key]
    hint = suggest(str(dtype).removeprefix("torch."), DTYPES) if isinstance(dtype, str) else ""
    raise ValueError(f"unknown dtype {dtype!r};{hint} valid dtypes: {DTYPE_HELP}")


def dtype_name(dtype: Any) -> str:
    """Canonical name (``"float32"``, ``"bfloat16"``, ``"float16"``) of any accepted ``dtype``."""
    return DTYPE_NAMES[check_dtype(dtype)]


# ------------------------------------------------------------------------------------------------ devices
def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def check_device(device: Any = "auto", name: str = "device") -> torch.device:
    """The ``torch.device`` for ``device``: ``auto`` (or ``None``) = CUDA if available, else MPS if available, else
    CPU; ``cpu``, ``cuda``, ``cuda:N``, ``mps`` or a ``torch.device``. A device this machine lacks is refused
    (``name`` spells the fix: ``--device cpu`` or ``device='cpu'``)."""
    if device is None or (isinstance(device, str) and device.strip().lower() == "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    text = device.strip().lower() if isinstance(device, str) else device
    choices = ", ".join(DEVICE_CHOICES)
    fix = f"use {_example(name, 'cpu')} or {_example(name, 'auto')}"
    try:
        resolved = torch.device(text)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"unknown device {device!r};{suggest(str(device), ('auto', 'cpu', 'cuda', 'mps'))} "
                         f"valid devices: {choices}") from None
    if resolved.type == "cpu":
        return resolved
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} is not available: this torch ({torch.__version__}) sees no CUDA "
                             f"GPU; {fix}")
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise ValueError(f"device {str(device)!r} is not available: this machine has {count} CUDA device(s), "
                             f"cuda:0 to cuda:{count - 1}; {fix}")
        return resolved
    if resolved.type == "mps":
        if not _mps_available():
            raise ValueError(f"device {str(device)!r} is not available: this torch sees no Apple MPS device; {fix}")
        return resolved
    raise ValueError(f"unsupported device {str(device)!r}; valid devices: {choices}")


# ------------------------------------------------------------------------------------------------ models
def is_offline() -> bool:
    """Whether Hugging Face downloads are switched off (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` set)."""
    return any(os.environ.get(var, "").strip().lower() in _TRUE for var in OFFLINE_VARIABLES)


def looks_like_path(name: str) -> bool:
    """Whether ``name`` can only be a local path, not a hub id (``org/name``): it starts with ``.``, ``~`` or
    ``/``, ends with a separator, contains the platform's separator (when that is not ``/``) or more than one
    ``/``."""
    text = str(name)
    separators = {os.sep, os.altsep or os.sep}
    return (text.startswith((".", "~", *separators)) or text.endswith(tuple(separators)) or text.count("/") > 1
            or (os.sep != "/" and os.sep in text))


def _use_instead(name: str) -> str:
    return (f"pass a local model folder holding config.json ({_example(name, './path/to/model')}) or omit {name} "
            f"for the offline default SmolLM2-135M-Instruct")


def model_unavailable_message(model: str, reason: str | None = None, name: str = "--model") -> str:
    """One line: hub model ``model`` cannot be loaded offline, and what to use instead (``name``: the flag or
    parameter that took it)."""
    reason = reason or ("HF_HUB_OFFLINE is set" if is_offline() else "the download failed (no connection)")
    return (f"model {model!r} is not available offline: it is neither a folder here nor in the local Hugging Face "
            f"cache, and {reason}; {_use_instead(name)}")


def _in_hub_cache(repo_id: str, name: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # HFValidationError: not a valid repo id
        raise ValueError(f"model {repo_id!r} is neither an existing folder nor a valid hub id (org/name); "
                         f"{_use_instead(name)}") from None


def check_model(name_or_path: str | os.PathLike | None, default_names: Sequence[str] = (),
                name: str = "--model") -> str | None:
    """``None``/``""``, a name in ``default_names`` or an offline model's name (``caote.models.OFFLINE_MODELS``:
    the default ``smollm2-135m``, ``gemma-3-270m``; returned unchanged); an existing model folder (returned with
    ``~`` expanded; a path-like name that does not exist is refused); or a hub id, which must be in the local
    Hugging Face cache when downloads are off (:func:`is_offline`). ``name`` is the flag or parameter named in the
    fix."""
    from caote.models import OFFLINE_MODELS

    if name_or_path is None or str(name_or_path) in ("", *OFFLINE_MODELS, *default_names):
        return None if name_or_path is None else str(name_or_path)
    text = str(name_or_path)
    path = Path(os.path.expanduser(text))
    if isinstance(name_or_path, os.PathLike) or looks_like_path(text) or path.exists():
        if not path.exists():
            raise ValueError(f"model folder {text} does not exist; {_use_instead(name)}, or a hub id such as "
                             f"Qwen/Qwen2.5-0.5B-Instruct")
        if not (path / "config.json").is_file():
            raise ValueError(f"{text} is not a model folder (no config.json in it); {_use_instead(name)}")
        return str(path)
    if is_offline() and not _in_hub_cache(text, name):
        raise ValueError(model_unavailable_message(text, name=name))
    return text


# ------------------------------------------------------------------------------------------------ files
def _check_path(value: str | os.PathLike, name: str, kind: str) -> Path:
    """An existing path of ``kind`` (``file`` or ``folder``), ``~`` expanded."""
    path = Path(os.path.expanduser(str(value)))
    if not (path.is_file() if kind == "file" else path.is_dir()):
        raise ValueError(f"{name}: {kind} {value} does not exist" if not path.exists()
                         else f"{name}: {value} is not a {kind}")
    return path


def check_file(value: str | os.PathLike, name: str) -> Path:
    """An existing file."""
    return _check_path(value, name, "file")


def check_folder(value: str | os.PathLike, name: str) -> Path:
    """An existing folder."""
    return _check_path(value, name, "folder")


RESULT_FILES = ("ppl.jsonl", "niah.jsonl", "tasks.jsonl", "squad.jsonl")


def check_results_folder(value: str | os.PathLike) -> Path:
    """A folder holding at least one non-empty evaluation results file (``ppl/niah/tasks/squad.jsonl``)."""
    path = Path(value)
    run = f"run e.g. `caote eval ppl --out {value}` first, or pass --out with the folder your evaluation wrote"
    if not path.is_dir():
        raise ValueError(f"results folder {value} does not exist; {run}")
    if not any((path / name).is_file() and (path / name).stat().st_size > 0 for name in RESULT_FILES):
        raise ValueError(f"results folder {value} holds no evaluation results ({', '.join(RESULT_FILES)}); {run}")
    return path


# ------------------------------------------------------------------------------------------------ your own data
DATA_HASH_DIGITS = 16
"""Hex digits of a data file's sha256 kept in a cell's key (64 bits, as the model fingerprint)."""


@dataclass(frozen=True)
class DataFile:
    """A data file as read and checked by :func:`read_data_file`: its path, its text (UTF-8, newlines as
    ``\\n``) and the sha256 of its bytes. :attr:`key` identifies it in an evaluation cell's key: by content, with
    the file's name as the label the report shows."""

    path: Path
    text: str
    sha256: str

    @property
    def name(self) -> str:
        """The file's name (without its folder)."""
        return self.path.name

    @property
    def key(self) -> str:
        """``"<file name> sha256:<first 16 hex digits>"``: the ``data`` setting of a cell's key."""
        return f"{self.name} sha256:{self.sha256[:DATA_HASH_DIGITS]}"


def data_label(key: str | None) -> str | None:
    """The file name in a ``data`` key (:attr:`DataFile.key`), or ``None`` for the built-in data."""
    return None if key is None else str(key).rsplit(" sha256:", 1)[0]


def read_data_file(value: str | os.PathLike, name: str, wanted: str = "text") -> DataFile:
    """File ``value`` read and checked: it must exist, be a file, be UTF-8 (a leading byte-order mark is dropped)
    and hold more than blanks (``wanted`` says what it should hold). Every error is one line naming ``name`` (the
    flag or parameter) and the file."""
    path = check_file(value, name)
    try:
        raw = path.read_bytes()
    except OSError as problem:
        raise ValueError(f"{name}: cannot read {value}: {problem.strerror or problem}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as problem:
        line = raw[: problem.start].count(b"\n") + 1
        raise ValueError(f"{name}: {value} is not UTF-8 text (line {line}, byte {problem.start}: {problem.reason}); "
                         f"convert it, e.g. iconv -f latin1 -t utf-8 {value} > {Path(value).stem}.utf8"
                         f"{Path(value).suffix or '.txt'}") from None
    if not text.strip():
        raise ValueError(f"{name}: {value} is empty; give a file with {wanted}")
    text = text.replace("\r\n", "\n").replace("\r", "\n")  # as Python's text mode reads it
    return DataFile(path=path, text=text, sha256=hashlib.sha256(raw).hexdigest())


def read_text_file(value: str | os.PathLike, name: str, wanted: str = "text") -> str:
    """The text of file ``value`` (:func:`read_data_file`)."""
    return read_data_file(value, name, wanted).text


def spelled_like(like: str, parameter: str) -> str:
    """``parameter`` spelt as ``like`` is: ``--lengths`` beside a flag, ``lengths`` beside a Python parameter."""
    return f"--{parameter.replace('_', '-')}" if _is_flag(like) else parameter


def check_data_tokens(data: DataFile, tokens: int, need: int, name: str, asked: str, fix: str) -> None:
    """Refuse ``data`` when its text has fewer than ``need`` tokens: one line naming the file (``name`` is its flag
    or parameter), how many tokens it has, what ``asked`` for ``need`` of them and the ``fix``."""
    if tokens < need:
        raise ValueError(f"{name}: {data.path} has {tokens:,} tokens, fewer than the {need:,} that {asked}; {fix}")


QA_FIELDS = ("context", "question", "answers")
"""Fields of a question-answering record of ``caote eval tasks --jsonl`` (``answers``: a list of strings, or a
string)."""
KVPRESS_QA_FIELDS = ("context", "question", "answer_prefix", "answer")
"""kvpress's dataset schema, also accepted (``answer_prefix`` optional; ``answer``: a string or a list)."""
QA_OPTIONAL_FIELDS = ("answer_prefix", "max_new_tokens")
"""Optional in both schemas: the text that opens the answer, the record's own generation length."""
_QA_SCHEMAS = ("each line is one JSON object with context, question and answers (a list of strings), or kvpress's "
               "context, question, answer_prefix (optional) and answer")


@dataclass(frozen=True)
class QARecord:
    """One checked record of a question-answering JSON-lines file."""

    line: int
    """Its line in the file (1-based): the sample id of its cells."""
    context: str
    question: str
    answers: tuple[str, ...]
    schema: str
    """``"answers"`` (this project's schema) or ``"kvpress"`` (the record had ``answer``)."""
    answer_prefix: str | None = None
    """As given (``None``: the schema's default)."""
    max_new_tokens: int | None = None
    """The record's own generation length, as given (kvpress's column)."""


@dataclass(frozen=True)
class QAFile:
    """A question-answering JSON-lines file read and checked by :func:`read_qa_jsonl`."""

    data: DataFile
    records: tuple[QARecord, ...]


def _qa_record(obj: Any, line: int, where: str) -> QARecord:
    """``obj`` (one parsed line) checked as a :class:`QARecord`; errors start with ``where`` (file and line)."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}; {_QA_SCHEMAS}")

    def text(field: str, required: bool = True) -> str | None:
        if field not in obj:
            if not required:
                return None
            raise ValueError(f"{where}: missing field {field!r}; {_QA_SCHEMAS}")
        value = obj[field]
        if not isinstance(value, str):
            raise ValueError(f"{where}: field {field!r} must be a string, got {type(value).__name__} {value!r:.40}")
        if required and not value.strip():
            raise ValueError(f"{where}: field {field!r} is empty")
        return value

    context, question = text("context"), text("question")
    if "answers" in obj and "answer" in obj:
        raise ValueError(f"{where}: has both 'answers' and 'answer'; give one of them")
    field = "answers" if "answers" in obj else "answer"
    if field not in obj:
        raise ValueError(f"{where}: missing field 'answers' (or kvpress's 'answer'); {_QA_SCHEMAS}")
    value = obj[field]
    answers = [value] if isinstance(value, str) else value
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise ValueError(f"{where}: field {field!r} must be a string or a list of strings, got "
                         f"{type(value).__name__} {value!r:.40}")
    if not any(a.strip() for a in answers):
        raise ValueError(f"{where}: field {field!r} holds no non-empty answer")
    budget = obj.get("max_new_tokens")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
        raise ValueError(f"{where}: field 'max_new_tokens' must be a positive integer, got {budget!r}")
    return QARecord(line=line, context=context, question=question, answers=tuple(answers),
                    schema="answers" if field == "answers" else "kvpress",
                    answer_prefix=text("answer_prefix", required=False), max_new_tokens=budget)


def read_qa_jsonl(value: str | os.PathLike, name: str) -> QAFile:
    """A JSON-lines file of question-answering records (:data:`QA_FIELDS`, or kvpress's :data:`KVPRESS_QA_FIELDS`;
    optional :data:`QA_OPTIONAL_FIELDS`; other fields are ignored; blank lines are skipped), read and checked: a
    file error (:func:`read_data_file`), a line that is not JSON, not an object, or misses a field or has one of the
    wrong type is one line naming the file and the line number."""
    data = read_data_file(value, name, wanted="one JSON record per line (context, question, answers)")
    records = []
    for number, line in enumerate(data.text.split("\n"), 1):  # not splitlines(): JSON strings may hold U+2028
        if not line.strip():
            continue
        where = f"{name}: {value} line {number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as problem:
            raise ValueError(f"{where}: not valid JSON ({problem.msg}, column {problem.colno}); {_QA_SCHEMAS}") \
                from None
        records.append(_qa_record(obj, number, where))
    return QAFile(data=data, records=tuple(records))


# ------------------------------------------------------------------------------------------------ argparse
def arg_type(check: Callable[..., Any], *args: Any, **kwargs: Any) -> Callable[[str], Any]:
    """``check`` as an argparse ``type=``: its ``ValueError`` becomes the parser's one-line error."""

    def convert(text: str) -> Any:
        try:
            return check(text, *args, **kwargs)
        except ValueError as error:
            raise argparse.ArgumentTypeError(one_line(error)) from None

    convert.__name__ = getattr(check, "__name__", "value").removeprefix("check_")
    return convert


def positive_int_arg(flag: str, example: int) -> Callable[[str], int]:
    """argparse ``type=`` for a positive integer flag."""
    return arg_type(check_positive_int, flag, example)


def int_list_arg(flag: str, example: str = "1024,2048") -> Callable[[str], list[int]]:
    """argparse ``type=`` for a comma list of positive integers."""
    return arg_type(check_int_list, flag, example)


def int_list_text_arg(flag: str, example: str = "1024,2048") -> Callable[[str], str]:
    """argparse ``type=`` that checks a comma list of positive integers and keeps it as text (``"1024,2048"``)."""
    check = arg_type(check_int_list, flag, example)

    def convert(text: str) -> str:
        return ",".join(str(number) for number in check(text))

    convert.__name__ = "int_list"
    return convert


def methods_text_arg(flag: str) -> Callable[[str], str]:
    """argparse ``type=`` that checks a comma list of methods and keeps it as text: ``"all"`` unchanged, else the
    canonical names joined by commas."""
    check = arg_type(check_methods, flag)

    def convert(text: str) -> str:
        return "all" if text.strip().lower() == "all" else ",".join(check(text))

    convert.__name__ = "methods"
    return convert


def device_arg(text: str) -> str:
    """argparse ``type=`` for ``--device``: the resolved device as a string (``auto`` -> ``cuda``/``mps``/``cpu``)."""
    return str(arg_type(check_device, name="--device")(text))


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--device auto|cpu|cuda|cuda:N|mps`` (default ``auto``), resolved and checked while parsing."""
    parser.add_argument("--device", default="auto", type=device_arg,
                        help="auto (default: cuda if available, else mps, else cpu), cpu, cuda, cuda:N or mps")


def dtype_arg(text: str) -> str:
    """argparse ``type=`` for ``--dtype``: the canonical name."""
    return arg_type(dtype_name)(text)


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line, raised as :class:`UsageError` (never ``sys.exit``).

    ``argument --threads: --threads must be ...`` is shortened to ``--threads must be ...``; an invalid choice
    (e.g. a misspelt subcommand) gets a "did you mean"."""

    def error(self, message: str) -> None:  # type: ignore[override]
        message = one_line(message)
        match = re.match(r"^argument ([^:]+): (.*)$", message)
        if match:
            flags = match.group(1).split("/")
            named = any(flag and flag in match.group(2) for flag in flags)
            message = match.group(2) if named else f"{flags[0]}: {match.group(2)}" if flags[0].startswith("-") \
                else message
        choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if choice:
            choices = [c.strip().strip("'") for c in choice.group(2).split(",")]
            hint = suggest(choice.group(1), choices)
            if message.startswith("argument "):  # a subcommand
                message = f"unknown command {choice.group(1)!r};{hint} commands: {', '.join(choices)}"
            else:
                message += f";{hint}" if hint else ""
        missing = re.match(r"^the following arguments are required: (.*)$", message)
        if missing:
            for action in self._actions:
                if isinstance(action, argparse._SubParsersAction) and action.dest in missing.group(1).split(", "):
                    message = f"{self.prog} needs a command: one of {', '.join(action.choices)}"
        raise UsageError(message)


class UsageError(ValueError):
    """A command-line argument error (the message is one line)."""
