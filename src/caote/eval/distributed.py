"""Evaluation cells on a Ray cluster: ``caote eval ppl|niah|tasks|squad ... --ray [ADDRESS]`` (the optional extra
``pip install 'caote[ray]'``; caote imports Ray only here, and only when asked to).

The driver (the ``caote eval`` process) builds the grid as the local run does -- the same
:class:`~caote.eval.runner.Cell` list, keys and picklable cell specs -- and hands the cells that are not yet in the
results file to a :class:`RayExecutor`. Each worker is one Ray actor (:class:`CellWorker`, ``--threads`` torch threads
and as many CPUs reserved; one GPU each with ``--device cuda``) that loads the model and tokenizer once and then
computes one cell at a time with them (``spec.compute(model, tokenizer)``). The driver holds no weights: it keys the
cells with the :class:`~caote.eval.runner.ModelInfo` the first worker reports (every other worker must report the
same: same model files, dtype and device type, or the run stops).

**Order.** The driver writes every record itself, to the same resumable JSON-lines file
(:class:`~caote.eval.runner.ResultStore`), in the grid's order whatever order the workers finish in: a finished
record waits until every cell before it in the grid is written. The file stays append-only, and a Ray run writes the
same records in the same order as the local run (up to timings and the run id). Records that finished out of order
are written when the run stops for any reason (an error, Ctrl-C), still in grid order, so no finished cell is lost;
only a driver killed outright loses the records it held, which the next run recomputes.

**Fault tolerance.** A cell whose worker dies while computing it (the process killed, its node lost) is put back at
the front of the queue and computed by the next free worker; the dead worker is replaced by a fresh actor (placed
wherever the cluster has room, loading the model again). A cell is tried at most :data:`MAX_CELL_ATTEMPTS` times (a
cell that kills every worker it runs on stops the run instead of looping). Ray's own retries are off
(``max_restarts=0``, ``max_task_retries=0``): the driver alone decides what reruns, so each cell is written exactly
once. An exception raised by a cell's own code is not retried: it stops the run, as it does locally.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from caote.eval.runner import Cell, ModelInfo, RecordSink, cell_label

RAY_INSTALL = "pip install 'caote[ray]'"
MAX_CELL_ATTEMPTS = 3
"""Tries of one cell whose worker died under it before the run stops."""
WAIT_NOTE_SECONDS = 60.0
"""How long the driver waits without news before it says what it is waiting for."""


class RayRunError(RuntimeError):
    """A Ray run that cannot go on: a worker that cannot start, or a cell that kept losing its worker."""


def import_ray():
    """The ``ray`` module, or a one-line ``ValueError`` naming the install command."""
    try:
        import ray
    except ImportError:
        raise ValueError(f"--ray needs Ray, which is not installed; install it with: {RAY_INSTALL}") from None
    return ray


def init_local(**options) -> None:
    """``ray.init()`` for a run on this machine (``options``: e.g. ``num_cpus``): without the dashboard, and with its
    workers at the priority of a local ``caote eval`` -- Ray starts workers with niceness 15, which on a machine busy
    with other jobs starved them (minutes to load a tiny model); on a cluster of its own that changes nothing."""
    import_ray().init(include_dashboard=False, _system_config={"worker_niceness": 0}, **options)


@dataclass(frozen=True)
class WorkerConfig:
    """What every worker loads (:func:`caote.models.load_model`'s arguments) and its torch thread count."""

    model: str | None = None
    """A model folder (absolute, as the workers see it), a hub id, ``gemma-3-270m``, or ``None`` (the default)."""
    dtype: str = "float32"
    device: str = "cpu"
    """``cpu``, ``cuda`` (one GPU reserved per worker; the worker uses the one Ray gives it) or ``mps``."""
    threads: int = 1

    @property
    def gpus(self) -> int:
        """GPUs reserved per worker: 1 on CUDA, else 0."""
        return 1 if self.device.startswith("cuda") else 0

    @property
    def worker_device(self) -> str:
        """The device a worker loads onto: ``cuda`` (its own GPU, as Ray makes it visible) for any ``cuda:N``."""
        return "cuda" if self.gpus else self.device


@dataclass(frozen=True)
class WorkerInfo:
    """A worker as it reports itself: its process id, its node's address and the model it holds (``None`` when it
    could not load it: ``error`` says why, in one line)."""

    pid: int
    node: str
    model: ModelInfo | None
    error: str | None = None


class CellWorker:
    """One worker process (a Ray actor): the model and tokenizer, loaded once, and the cells computed with them."""

    def __init__(self, config: WorkerConfig):
        import torch
        from transformers.utils import logging as transformers_logging

        from caote.models import load_model
        from caote.validation import one_line

        torch.set_num_threads(config.threads)
        transformers_logging.disable_progress_bar()  # one "Loading weights" bar per worker in the driver's output
        self.model = self.tokenizer = self.model_info = self.error = None
        try:
            self.model, self.tokenizer = load_model(config.model, dtype=config.dtype, device=config.worker_device)
            self.model_info = ModelInfo.of(self.model)
        except Exception as error:  # reported by describe(), as the local run reports it: one line
            self.error = one_line(error)

    def describe(self) -> WorkerInfo:
        """This worker's process id, node and model (or why it has none)."""
        import ray

        return WorkerInfo(pid=os.getpid(), node=ray.util.get_node_ip_address(), model=self.model_info,
                          error=self.error)

    def compute(self, spec) -> tuple[dict, float]:
        """``spec.compute(model, tokenizer)`` and the seconds it took."""
        if self.model is None:
            raise ValueError(f"this worker has no model: {self.error}")
        start = time.perf_counter()
        result = spec.compute(self.model, self.tokenizer)
        return result, time.perf_counter() - start


@dataclass(eq=False)
class _Slot:
    """A worker's place in the pool: its actor, what it reported (``None`` while it starts) and its current cell."""

    index: int
    actor: Any
    info: WorkerInfo | None = None
    cell: int | None = None

    @property
    def label(self) -> str:
        return f"w{self.index}"

    def describe(self) -> str:
        """``w0 (pid 123 on 10.0.0.2)``."""
        return f"{self.label} (pid {self.info.pid} on {self.info.node})" if self.info else self.label


@dataclass(frozen=True)
class Rerun:
    """A cell computed again because its worker died under it."""

    key: dict
    worker: str
    error: str


def _cause(error: BaseException) -> str:
    """A one-line reason for a Ray error: the last line of its text (the exception inside, where there is one),
    without colour codes, at most 300 characters."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    last = lines[-1] if lines else type(error).__name__
    return last.split(" Some common causes")[0][:300]  # Ray's advice on a dead worker: not the reason


class RayExecutor:
    """Computes cells on a pool of :class:`CellWorker` actors (a :class:`caote.eval.runner.CellExecutor`).

    ``address``: ``None`` or ``""`` = ``ray.init()`` (a new local cluster, unless ``$RAY_ADDRESS`` names one or one
    was started on this machine with ``ray start``); otherwise the cluster to connect to (``auto``, ``HOST:PORT``,
    ``ray://HOST:PORT``). When this process is already connected (``ray.is_initialized()``), that connection is used
    and left open. ``workers``: how many actors (default: the
    cluster's CPUs // ``config.threads``; with CUDA at most its GPUs). ``on_cell_start(cell, worker)`` is called on
    the driver as each cell is handed to a worker (for monitoring and tests).

    Use as a context manager, or call :meth:`close`: it kills the actors and shuts down a cluster it started.
    Starting waits for the first worker to load the model (its :attr:`model_info` keys the cells); the others join
    the pool as they come up.
    """

    def __init__(self, config: WorkerConfig, *, address: str | None = None, workers: int | None = None,
                 on_cell_start: Callable[[Cell, WorkerInfo], None] | None = None,
                 max_cell_attempts: int = MAX_CELL_ATTEMPTS):
        ray = import_ray()
        self._ray = ray
        self.config = config
        self.on_cell_start = on_cell_start
        self.max_cell_attempts = max_cell_attempts
        self.reruns: list[Rerun] = []
        self.model_info: ModelInfo | None = None
        self._slots: list[_Slot] = []
        self._starting: dict[Any, _Slot] = {}
        self._idle: deque[_Slot] = deque()
        self._started_cluster = not ray.is_initialized()
        if self._started_cluster:
            if address:
                ray.init(address=address)
            else:
                init_local()
        try:
            self._actor_class = ray.remote(CellWorker).options(num_cpus=config.threads, num_gpus=config.gpus,
                                                               max_restarts=0, max_task_retries=0)
            self.workers = workers or self.default_workers()
            self._slots = [self._new_slot(index) for index in range(self.workers)]
            self._starting = {slot.actor.describe.remote(): slot for slot in self._slots}
            while self.model_info is None:
                self._receive(self._wait(list(self._starting)))
        except BaseException:
            self.close()
            raise

    def default_workers(self) -> int:
        """The cluster's CPUs // threads per worker (at least 1); with CUDA, at most the cluster's GPUs."""
        resources = self._ray.cluster_resources()
        count = max(1, int(resources.get("CPU", 1)) // self.config.threads)
        if self.config.gpus:
            gpus = int(resources.get("GPU", 0))
            if gpus < 1:
                raise ValueError("--device cuda with --ray: the Ray cluster has no GPU")
            count = min(count, gpus)
        return count

    def _new_slot(self, index: int) -> _Slot:
        return _Slot(index, self._actor_class.remote(self.config))

    def _wait(self, refs: list) -> Any:
        """The next ready reference among ``refs`` (saying, every :data:`WAIT_NOTE_SECONDS`, what is awaited)."""
        while True:
            ready, _ = self._ray.wait(refs, num_returns=1, timeout=WAIT_NOTE_SECONDS)
            if ready:
                return ready[0]
            starting = len(self._starting)
            tqdm.write(f"caote: waiting for the Ray cluster ({starting} worker(s) starting, "
                       f"{len(refs) - starting} cell(s) running)")

    def _receive(self, ref) -> None:
        """Handle a worker's start-up report: add it to the pool, or stop when it cannot start or differs."""
        slot = self._starting.pop(ref)
        try:
            info = self._ray.get(ref)
        except self._ray.exceptions.RayError as error:
            raise RayRunError(f"Ray worker {slot.label} could not start: {_cause(error)}") from None
        if info.error is not None:  # as a local run says it (e.g. a missing model folder): a ValueError
            raise ValueError(f"Ray worker {slot.label} on {info.node}: {info.error}")
        if self.model_info is None:
            self.model_info = info.model
        elif info.model != self.model_info:
            raise ValueError(f"Ray worker {slot.label} on {info.node} holds another model than the others "
                             f"({info.model} vs {self.model_info}): every node needs the same model files, caote "
                             f"and device type")
        slot.info = info
        self._idle.append(slot)

    def _replace(self, slot: _Slot) -> None:
        """Put a fresh actor in a dead worker's place (it joins the pool once it has loaded the model)."""
        self._ray.kill(slot.actor, no_restart=True)
        fresh = self._new_slot(slot.index)
        self._slots[slot.index] = fresh
        self._starting[fresh.actor.describe.remote()] = fresh

    def run(self, cells: Sequence[Cell], write: RecordSink, *, desc: str, progress: bool) -> None:
        """Compute ``cells`` on the workers; hand each result to ``write`` in the cells' order."""
        ray = self._ray
        queue: deque[int] = deque(range(len(cells)))
        attempts: Counter[int] = Counter()
        finished: dict[int, tuple[dict, float]] = {}
        running: dict[Any, _Slot] = {}
        next_to_write = 0
        bar = tqdm(total=len(cells), desc=f"{desc} (ray, {self.workers} workers)", unit="cell",
                   disable=not progress, dynamic_ncols=True)

        def show() -> None:
            busy = sorted(running.values(), key=lambda s: s.index)
            parts = [f"{s.label}: {cell_label(cells[s.cell].key)}" for s in busy[:4]]
            if len(busy) > 4:
                parts.append(f"+{len(busy) - 4} more")
            bar.set_postfix_str(" | ".join(parts) or "waiting for workers")

        try:
            while queue or running:
                while queue and self._idle:
                    slot, index = self._idle.popleft(), queue.popleft()
                    slot.cell = index
                    running[slot.actor.compute.remote(cells[index].spec)] = slot
                    if self.on_cell_start is not None:
                        self.on_cell_start(cells[index], slot.info)
                show()
                ref = self._wait(list(running) + list(self._starting))
                if ref in self._starting:
                    self._receive(ref)
                    continue
                slot = running.pop(ref)
                index, slot.cell = slot.cell, None
                try:
                    finished[index] = ray.get(ref)
                except ray.exceptions.RayTaskError as error:  # the cell's own code raised: stop, as locally
                    self._idle.append(slot)
                    cause = getattr(error, "cause", None)
                    raise (cause if isinstance(cause, Exception) else error) from None
                except ray.exceptions.RayActorError as error:  # the worker died under the cell
                    attempts[index] += 1
                    reason = _cause(error)
                    self._replace(slot)
                    if attempts[index] >= self.max_cell_attempts:
                        raise RayRunError(f"cell {cell_label(cells[index].key)} lost its worker "
                                           f"{attempts[index]} times (last: {slot.describe()}: {reason}); "
                                           f"stopping") from None
                    self.reruns.append(Rerun(cells[index].key, slot.describe(), reason))
                    tqdm.write(f"caote: worker {slot.describe()} died during cell {cell_label(cells[index].key)}; "
                               f"rerunning it on the next free worker and starting a new worker")
                    queue.appendleft(index)
                    continue
                self._idle.append(slot)
                bar.update(1)
                while next_to_write in finished:
                    write(cells[next_to_write], *finished.pop(next_to_write))
                    next_to_write += 1
        finally:
            # stopped early (an error, Ctrl-C): keep what finished, still in grid order; the workers still busy
            # with an abandoned cell take the next call after it
            for index in sorted(finished):
                write(cells[index], *finished.pop(index))
            self._idle.extend(slot for slot in running.values() if slot not in self._idle)
            bar.close()

    def close(self) -> None:
        """Kill the workers; shut down the cluster if this executor started it."""
        ray = self._ray
        for slot in self._slots:
            try:
                ray.kill(slot.actor, no_restart=True)
            except Exception:  # already gone
                pass
        self._slots = []
        if self._started_cluster and ray.is_initialized():
            ray.shutdown()

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def worker_config(model: str | None, *, dtype: str, device: str, threads: int | None) -> WorkerConfig:
    """The :class:`WorkerConfig` of a command line: a local model folder made absolute (workers may run elsewhere
    or in another working folder), ``threads`` 1 unless given."""
    if model and Path(model).exists():
        model = str(Path(model).resolve())
    return WorkerConfig(model=model, dtype=dtype, device=device, threads=threads or 1)


def ray_settings(executor: RayExecutor, address: str | None) -> dict:
    """What ``runs.jsonl`` records of a Ray run: the address asked for, the workers and their configuration."""
    return {"address": address or None, "workers": executor.workers,
            **{k: v for k, v in dataclasses.asdict(executor.config).items() if k != "model"}}


__all__ = [
    "MAX_CELL_ATTEMPTS",
    "RAY_INSTALL",
    "CellWorker",
    "RayExecutor",
    "RayRunError",
    "Rerun",
    "WorkerConfig",
    "WorkerInfo",
    "import_ray",
    "init_local",
    "ray_settings",
    "worker_config",
]
