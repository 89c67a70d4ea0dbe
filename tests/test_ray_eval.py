"""``caote eval ... --ray``: the grid's cells on a local Ray cluster write the local run's records in the local run's
order, a worker killed during a cell has its cell rerun (the file ends with every cell once), and a second run
computes nothing. Without Ray, caote imports and ``--ray`` is a one-line error naming the install command."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from caote.eval import runner

HAVE_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(not HAVE_RAY, reason="Ray is not installed (pip install 'caote[ray]'; CI installs it)")

TIMING = ("seconds", "run_id")
"""Record fields that differ between two runs of the same cells."""


def _text(tmp_path: Path, words: int, name: str = "tiny.txt") -> Path:
    """A text of ``words`` random words of the tiny tokenizer (one token each)."""
    import random

    rng = random.Random(0)
    path = tmp_path / name
    path.write_text(" ".join(f"w{rng.randrange(1, 128)}" for _ in range(words)) + "\n", encoding="utf-8")
    return path


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _eval(*args: str) -> int:
    from caote.cli import main

    return main(["eval", *args])


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray cluster (2 CPUs, started as ``--ray`` starts one) for the tests that do not test starting one."""
    import ray

    from caote.eval.distributed import init_local

    started = not ray.is_initialized()
    if started:
        init_local(num_cpus=2)
    yield ray
    if started:
        ray.shutdown()


# ----------------------------------------------------------------------------------------------


def test_without_ray_caote_imports_and_ray_is_a_one_line_error(tmp_path):
    """In a process where ``import ray`` fails: every eval module imports, and ``--ray`` names the extra."""
    script = (
        "import sys; sys.modules['ray'] = None\n"
        "import caote, caote.eval.cli, caote.eval.runner, caote.eval.squad, caote.eval.distributed\n"
        "from caote.cli import main\n"
        f"code = main(['eval', 'ppl', '--ray', '--out', {str(tmp_path)!r}])\n"
        "assert 'ray' not in [m for m, v in sys.modules.items() if v is not None]\n"
        "sys.exit(code)\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "caote: error: --ray needs Ray, which is not installed; install it with: pip install 'caote[ray]'"]
    assert not any(tmp_path.iterdir())  # nothing loaded, nothing written


def test_ray_workers_needs_ray(capsys, tmp_path):
    assert _eval("ppl", "--ray-workers", "2", "--out", str(tmp_path)) == 2
    assert capsys.readouterr().err.strip() == "caote: error: --ray-workers needs --ray"


@needs_ray
def test_ray_run_writes_the_local_records_in_the_local_order(tiny_folder, tmp_path):
    """Two methods x two budgets on a tiny text, locally and on a local cluster started by ``--ray`` (2 workers):
    the same keys and values (up to float tolerance), in the same order."""
    text = _text(tmp_path, 200)
    grid = ["ppl", "--model", str(tiny_folder), "--methods", "tova,snapkv+caote", "--budgets", "16,32", "--lengths",
            "64", "--samples", "2", "--block-size", "16", "--text-file", str(text), "--threads", "1", "--no-progress"]
    assert _eval(*grid, "--out", str(tmp_path / "local")) == 0
    assert _eval(*grid, "--out", str(tmp_path / "ray"), "--ray", "--ray-workers", "2") == 0
    local, distributed = _lines(tmp_path / "local" / "ppl.jsonl"), _lines(tmp_path / "ray" / "ppl.jsonl")
    assert len(local) == 2 * 2 * 2
    assert [runner.cell_key(r) for r in distributed] == [runner.cell_key(r) for r in local]
    for ours, theirs in zip(distributed, local):
        assert set(ours) == set(theirs)
        for name in set(theirs) - set(TIMING):
            if isinstance(theirs[name], float):
                assert ours[name] == pytest.approx(theirs[name], rel=1e-5), name
            else:
                assert ours[name] == theirs[name], name
    (run,) = _lines(tmp_path / "ray" / "runs.jsonl")
    assert run["settings"]["ray"]["workers"] == 2 and run["settings"]["ray"]["threads"] == 1


@needs_ray
def test_a_killed_worker_has_its_cell_rerun_and_a_second_run_computes_nothing(ray_cluster, tiny_folder, tmp_path,
                                                                              capsys):
    """A worker SIGKILLed (its PID from the actor) while it computes a slow cell: that cell is rerun on another
    worker, the file holds every cell exactly once, in the grid's order; a second ``--ray`` run computes nothing."""
    from caote.eval import distributed
    from caote.models import load_tokenizer

    text = _text(tmp_path, 1100)
    out = tmp_path / "out"
    slow_length = 1024
    killed: list[tuple[dict, int]] = []
    started: list[tuple[dict, int]] = []

    def on_cell_start(cell, worker):
        started.append((cell.key, worker.pid))
        if cell.key["length"] == slow_length and not killed:  # the first slow cell (seconds), half a second in
            killed.append((cell.key, worker.pid))
            threading.Timer(0.5, os.kill, (worker.pid, signal.SIGKILL)).start()

    grid = {"methods": ["full", "tova"], "budgets": [16], "lengths": [32, slow_length], "block_size": 1,
            "samples": 1, "text_file": text, "progress": False}
    config = distributed.worker_config(str(tiny_folder), dtype="float32", device="cpu", threads=1)
    with distributed.RayExecutor(config, workers=2, on_cell_start=on_cell_start) as executor:
        summary = runner.run_eval("ppl", executor.model_info, load_tokenizer(str(tiny_folder)), out=out,
                                  executor=executor, **grid)
    assert summary["computed"] == summary["cells"] == 4
    (key, pid), = killed
    (rerun,) = executor.reruns
    assert rerun.key == key and f"pid {pid} " in rerun.worker
    runs_of_killed = [p for k, p in started if k == key]
    assert len(runs_of_killed) == 2 and runs_of_killed[1] != pid  # rerun by another process
    records = _lines(out / "ppl.jsonl")
    keys = [runner.cell_key(r) for r in records]
    assert len(keys) == len(set(keys)) == 4  # every cell once
    assert [(r["length"], r["method"]) for r in records] == [(32, "full"), (32, "tova"), (slow_length, "full"),
                                                             (slow_length, "tova")]  # the grid's order
    assert all(r["tokens"] == r["length"] - 1 for r in records)

    # resume: the same grid from the command line on the running cluster computes nothing, the file is unchanged
    before = (out / "ppl.jsonl").read_bytes()
    assert _eval("ppl", "--model", str(tiny_folder), "--methods", "full,tova", "--budgets", "16", "--lengths",
                 f"32,{slow_length}", "--samples", "1", "--block-size", "1", "--text-file", str(text), "--threads",
                 "1", "--no-progress", "--out", str(out), "--ray", "--ray-workers", "2") == 0
    assert (out / "ppl.jsonl").read_bytes() == before
    assert "ppl: 0 cell(s) computed, 4 already done" in capsys.readouterr().out
    assert len(_lines(out / "runs.jsonl")) == 2
