"""Every setting that changes a result is part of a cell's key: changing any one of them computes new cells,
the same settings skip finished ones, and legacy records (written before the settings were keyed) are keyed
as their run recorded them."""

import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import caote
from caote import hf
from caote.eval import cli, report, runner
from caote.eval.needle import needle_for_cell, needle_id
from caote.policy import PAPER_METHODS
from conftest import tiny_llama

RESULTS = Path(__file__).resolve().parents[1] / "results" / "smollm2"


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def windows():
    g = torch.Generator().manual_seed(0)
    return [(f"rand{i}", torch.randint(0, 128, (64,), generator=g).tolist()) for i in range(2)]


def _save(model, folder: Path) -> Path:
    if folder.exists():
        shutil.rmtree(folder)
    model.save_pretrained(folder)
    return folder


def _load(folder: Path, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **hf.MODEL_LOAD_KWARGS).eval()


# ----------------------------------------------------------------------------------------------
# the key


def test_key_holds_every_setting():
    assert set(runner.SETTING_FIELDS) == {"model", "model_fingerprint", "dtype", "device", "protocol", "block_size",
                                          "options", "max_new_tokens", "seed", "chat", "data", "caote_version"}
    assert set(runner.KEY_FIELDS) == set(runner.SETTING_FIELDS) | set(runner.GRID_FIELDS)
    base = {name: 0 for name in runner.KEY_FIELDS}
    for name in runner.SETTING_FIELDS:
        assert runner.cell_key({**base, name: 1}) != runner.cell_key(base), name


def test_options_are_checked_and_normalised():
    assert runner.normalize_options({"snapkv_window": 32, "sink_tokens": None}) == {}  # the defaults
    assert runner.normalize_options({"recent_window": 4, "sink_tokens": 2}) == {"recent_window": 4, "sink_tokens": 2}
    assert list(runner.normalize_options({"sink_tokens": 2, "recent_window": 4})) == ["recent_window", "sink_tokens"]
    with pytest.raises(ValueError, match="unknown eviction option.*sinks.*valid: sink_tokens"):
        runner.normalize_options({"sinks": 2})
    # a yes/no option is keyed as a boolean however it was spelled
    assert runner.normalize_options({"protect_question": 1}) == runner.normalize_options({"protect_question": True})
    assert runner.normalize_options({"protect_question": True}) == {"protect_question": True}
    assert runner.normalize_options({"protect_question": 0}) == {}


def test_fingerprint_follows_the_weights_not_the_folder(tmp_path):
    a, b = tiny_llama(0), tiny_llama(1)
    assert runner.model_fingerprint(a) == runner.model_fingerprint(tiny_llama(0))  # in memory: deterministic
    assert runner.model_fingerprint(a).startswith("params:")
    assert runner.model_fingerprint(a) != runner.model_fingerprint(b)
    one, two = _save(a, tmp_path / "one"), _save(a, tmp_path / "two")
    loaded = _load(one)
    assert runner.model_folder(loaded) == one
    assert runner.model_fingerprint(loaded).startswith("files:")
    assert runner.files_fingerprint(one) == runner.files_fingerprint(two)  # path and file times do not matter
    assert runner.model_fingerprint(_load(one, torch.bfloat16)) == runner.model_fingerprint(loaded)  # same file
    _save(b, two)
    assert runner.files_fingerprint(two) != runner.files_fingerprint(one)
    assert runner.files_fingerprint(tmp_path) is None  # no weights file


# ----------------------------------------------------------------------------------------------
# changing each setting in turn


def test_each_ppl_setting_computes_new_cells(tmp_path, windows, monkeypatch):
    folder = _save(tiny_llama(0), tmp_path / "tiny")
    model = _load(folder)
    out = tmp_path / "out"
    grid = {"methods": ["full", "h2o"], "budgets": [16], "lengths": [48], "out": out, "samples": 1,
            "windows": windows, "progress": False, "block_size": 16}

    def run(m=model, **changes):
        return runner.run_ppl(m, None, **{**grid, **changes})

    first = run()
    assert first["computed"] == 2
    (record,) = [r for r in _lines(out / "ppl.jsonl") if r["method"] == "h2o"]
    assert {k: record[k] for k in runner.SETTING_FIELDS} == {
        "model": "tiny", "model_fingerprint": runner.files_fingerprint(folder), "dtype": "float32", "device": "cpu",
        "protocol": "bounded", "block_size": 16, "options": {}, "max_new_tokens": None, "seed": 0, "chat": None,
        "data": None, "caote_version": caote.__version__}
    # the same settings (options given at their defaults, protocol named) reuse every cell
    same = run(options={"snapkv_window": 32}, protocol="bounded")
    assert same["computed"] == 0 and same["skipped"] == 2
    assert [r["ppl"] for r in same["records"]] == [r["ppl"] for r in first["records"]]

    n = 2
    changes = {
        "block_size": lambda: run(block_size=8),
        "seed": lambda: run(seed=1),
        "options": lambda: run(options={"sink_tokens": 2}),
        "dtype": lambda: run(m=_load(folder, torch.bfloat16)),
        "model_fingerprint": lambda: run(m=_load(_save(tiny_llama(1), folder))),  # same folder, other weights
    }
    for name, rerun in changes.items():
        summary = rerun()
        n += 2
        assert summary["computed"] == 2, name  # nothing stale reused
        assert len(_lines(out / "ppl.jsonl")) == n, name
        assert len({json.dumps(r[name], sort_keys=True) for r in runner.read_jsonl(out / "ppl.jsonl")}) == 2, name
        assert rerun()["computed"] == 0, name  # and these settings resume in turn

    # protocol: the continuation protocols read 512 more tokens and score only those
    long_windows = [(sid, list(ids) * (1 + (48 + 512) // len(ids))) for sid, ids in windows]
    for protocol in ("continuation", "compress-once"):
        summary = run(m=_load(folder), protocol=protocol, windows=long_windows)
        assert summary["computed"] == 2 and all(r["tokens"] == 512 for r in summary["records"]), protocol
    with pytest.raises(ValueError, match="unknown protocol 'nope'"):
        run(protocol="nope")
    with pytest.raises(ValueError, match="does not apply to ppl"):
        run(protocol="question-aware")
    # caote version and device: only one value of each exists on this machine
    monkeypatch.setattr(caote, "__version__", "99.0")
    assert run(m=_load(folder))["computed"] == 2
    monkeypatch.setattr(runner, "model_device", lambda model: "cuda")
    summary = run(m=_load(folder))
    assert summary["computed"] == 2 and {r["device"] for r in summary["records"]} == {"cuda"}


def test_options_reach_the_cache(tmp_path, windows):
    model = tiny_llama(0)
    grid = {"methods": ["streaming"], "budgets": [16], "lengths": [64], "out": tmp_path, "samples": 1,
            "windows": windows, "progress": False, "block_size": 16}
    plain = runner.run_ppl(model, None, **grid)["records"][0]
    sinks = runner.run_ppl(model, None, **grid, options={"sink_tokens": 0})["records"][0]
    assert sinks["options"] == {"sink_tokens": 0} and plain["options"] == {}
    assert sinks["nll"] != pytest.approx(plain["nll"], rel=1e-6)  # a different cache, a different result
    with pytest.raises(ValueError):  # refused before any cell runs
        runner.run_ppl(model, None, **grid, options={"sink_tokens": 64})
    with pytest.raises(ValueError, match="turn it on"):  # an option of the question-aware mode
        runner.run_ppl(model, None, **grid, options={"protect_question": True})
    assert len(_lines(tmp_path / "ppl.jsonl")) == 2


@pytest.fixture(scope="module")
def big_vocab_model():
    """A tiny random model that accepts the SmolLM2 tokenizer's ids."""
    return tiny_llama(0, vocab_size=49152)


def test_generation_settings_compute_new_cells(big_vocab_model, tokenizer, tmp_path):
    grid = {"methods": ["full"], "budgets": [], "lengths": [256], "depths": [0.5], "out": tmp_path,
            "progress": False, "block_size": 64, "max_new_tokens": 2}

    def niah(**changes):
        return runner.run_niah(big_vocab_model, tokenizer, **{**grid, **changes})

    assert niah()["computed"] == 1
    assert niah()["computed"] == 0
    assert niah(chat=True)["computed"] == 0  # the default is the tokenizer's template: keyed as chat=True
    assert niah(max_new_tokens=3)["computed"] == 1
    assert niah(chat=False)["computed"] == 1
    assert niah(seed=5)["computed"] == 1
    records = _lines(tmp_path / "niah.jsonl")
    assert [(r["max_new_tokens"], r["chat"], r["seed"]) for r in records] == [(2, True, 0), (3, True, 0),
                                                                              (2, False, 0), (2, True, 5)]

    tasks = {"methods": ["full"], "budgets": [], "lengths": [256], "tasks": ["niah_single"], "samples": 1,
             "out": tmp_path, "progress": False, "block_size": 64}
    assert runner.run_tasks(big_vocab_model, tokenizer, **tasks, max_new_tokens=2)["computed"] == 1
    assert runner.run_tasks(big_vocab_model, tokenizer, **tasks, max_new_tokens=2)["computed"] == 0
    assert runner.run_tasks(big_vocab_model, tokenizer, **tasks, max_new_tokens=3)["computed"] == 1
    assert runner.run_tasks(big_vocab_model, tokenizer, **tasks, max_new_tokens=2, chat=False)["computed"] == 1


def test_a_needle_cell_is_keyed_by_its_needle_not_by_its_grid(big_vocab_model, tokenizer, tmp_path):
    """A needle cell is found done whatever grid it was computed in, and never from a record of another needle
    (needles drawn in grid order made one (length, depth) cell test different needles in different grids)."""
    grid = {"methods": ["full"], "budgets": [], "lengths": [256], "out": tmp_path, "progress": False,
            "block_size": 64, "max_new_tokens": 2}
    assert runner.run_niah(big_vocab_model, tokenizer, depths=[0.25, 0.75], **grid)["computed"] == 2
    assert runner.run_niah(big_vocab_model, tokenizer, depths=[0.75], **grid)["computed"] == 0
    assert runner.run_niah(big_vocab_model, tokenizer, depths=[0.75, 0.5, 0.25], **grid)["computed"] == 1
    path = tmp_path / "niah.jsonl"
    records = _lines(path)
    assert [r["needle"] for r in records] == [needle_id(*needle_for_cell(0, 256, d)) for d in (0.25, 0.75, 0.5)]
    assert [r["expected"] for r in records] == [r["needle"].split(": ")[1] for r in records]
    # a record of the same cell with another needle (as a grid-order draw gave) is not this cell's result
    other = {**records[0], "needle": "Oslo: 1234567", "expected": "1234567"}
    path.write_text("".join(json.dumps(r) + "\n" for r in (other, *records[1:])))
    assert runner.run_niah(big_vocab_model, tokenizer, depths=[0.25], **grid)["computed"] == 1
    assert _lines(path)[:3] == [other, *records[1:]]  # nothing already written is lost


# ----------------------------------------------------------------------------------------------
# legacy records


LEGACY = {"eval": "niah", "model": "SmolLM2-135M-Instruct", "block_size": 128, "method": "h2o", "budget": 64,
          "length": 1024, "task": None, "sample": 0.5, "score": 1.0, "expected": "1", "prediction": "1"}


def _run(run_id, eval_name="niah", **settings):
    return {"run_id": run_id, "eval": eval_name, "argv": ["caote", "eval", eval_name],
            "settings": {"model": None, "block_size": 128, "seed": 0, "dtype": "float32", "max_new_tokens": 24,
                         "no_chat": False, **settings},
            "versions": {"caote": "0.1.0"}}


def test_legacy_records_are_keyed_as_their_run_recorded(tmp_path):
    runs = [_run("a"), _run("b", dtype="bfloat16", seed=3, max_new_tokens=10, no_chat=True),
            _run("c", model="/elsewhere/SmolLM2-135M-Instruct")]
    (tmp_path / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in runs))
    rows = [dict(LEGACY, run_id="a"), dict(LEGACY, run_id="b"), dict(LEGACY, run_id="c"), dict(LEGACY, run_id="gone")]
    path = tmp_path / "niah.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = path.read_bytes()
    a, b, c, gone = runner.load_records(path)
    fingerprint = runner.LEGACY_MODEL_FINGERPRINTS["SmolLM2-135M-Instruct"]
    assert {k: a[k] for k in runner.SETTING_FIELDS} == {
        "model": "SmolLM2-135M-Instruct", "model_fingerprint": fingerprint, "dtype": "float32", "device": "cpu",
        "protocol": "bounded", "block_size": 128, "options": {}, "max_new_tokens": 24, "seed": 0, "chat": True,
        "data": None, "caote_version": "0.1.0"}
    assert (b["dtype"], b["seed"], b["max_new_tokens"], b["chat"]) == ("bfloat16", 3, 10, False)
    assert c["model_fingerprint"] == "unrecorded:/elsewhere/SmolLM2-135M-Instruct"  # its weights are unknown
    assert c["chat"] == runner.UNRECORDED  # as is its tokenizer's template
    assert gone["model_fingerprint"] == runner.UNRECORDED and gone["dtype"] == "float32"  # run not recorded
    assert len({runner.cell_key(r) for r in (a, b, c, gone)}) == 4
    assert path.read_bytes() == before  # read, never rewritten
    assert runner.ResultStore(path).done(a) and runner.ResultStore(path).done({**a, "seed": 1}) is False


def test_committed_records_have_one_settings_combination_per_file():
    expected = {"model": "SmolLM2-135M-Instruct", "model_fingerprint": runner.LEGACY_MODEL_FINGERPRINTS[
        "SmolLM2-135M-Instruct"], "dtype": "float32", "device": "cpu", "protocol": "bounded", "block_size": 128,
        "options": {}, "seed": 0, "data": None, "caote_version": "0.1.0"}
    # (the needle records were all written again when needles became a function of their cell: none is legacy)
    assert all("model_fingerprint" in r for r in _lines(RESULTS / "niah.jsonl"))
    for name, extra in (("ppl", {"max_new_tokens": None, "chat": None}), ("tasks", {"max_new_tokens": 48, "chat": True})):
        # the records written before cells were keyed by their settings (later ones carry them and may differ)
        legacy_ids = {r["run_id"] for r in _lines(RESULTS / f"{name}.jsonl") if "model_fingerprint" not in r}
        records = [r for r in runner.load_records(RESULTS / f"{name}.jsonl") if r["run_id"] in legacy_ids]
        assert records and all({k: r[k] for k in runner.SETTING_FIELDS} == {**expected, **extra} for r in records)


def test_rerunning_the_committed_commands_skips_every_cell(smollm2, tmp_path, monkeypatch, capsys):
    """Each command of results/smollm2/runs.jsonl, run again against a copy of the committed records, finds
    all its cells done (the offline default model has the fingerprint the legacy records are given)."""
    model, tok = smollm2
    assert runner.model_fingerprint(model) == runner.LEGACY_MODEL_FINGERPRINTS["SmolLM2-135M-Instruct"]
    for name in ("ppl", "niah", "tasks", "runs"):
        shutil.copy(RESULTS / f"{name}.jsonl", tmp_path / f"{name}.jsonl")

    def refuse(*args, **kwargs):
        raise AssertionError("a committed cell was recomputed")

    monkeypatch.setattr("caote.models.load_model", lambda *args, **kwargs: (model, tok))
    monkeypatch.setattr(runner, "evicted_nll", refuse)
    monkeypatch.setattr(runner, "_generate", refuse)
    parser = argparse.ArgumentParser(prog="caote")
    cli.add_parsers(parser.add_subparsers(dest="command"))
    # the commands committed before cells were keyed by their settings (their records are backfilled); later runs
    # record --device and may be partial grids still being filled. The legacy needle runs drew their needles in
    # grid order; their records were replaced (docs/decisions.md 12), so running them again computes new cells.
    runs = [run for run in _lines(RESULTS / "runs.jsonl")
            if "device" not in run.get("settings", {}) and run["eval"] != "niah"]
    assert runs
    for run in runs:
        argv = list(run["argv"][1:])
        argv[argv.index("--out") + 1] = str(tmp_path)
        if "--methods" not in argv:  # "all" meant the paper's methods then; the registry has grown since
            argv += ["--methods", ",".join(PAPER_METHODS)]
        assert cli.run_eval_command(parser.parse_args(argv)) == 0
        out = capsys.readouterr().out
        assert " 0 cell(s) computed" in out, argv
        assert "#### " in out and "| method |" in out  # the summary table of the run's grid
    for name in ("ppl", "niah", "tasks"):
        assert (tmp_path / f"{name}.jsonl").read_bytes() == (RESULTS / f"{name}.jsonl").read_bytes()


def test_eval_command_prints_its_summary_table(big_vocab_model, tokenizer, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("caote.models.load_model", lambda *args, **kwargs: (big_vocab_model, tokenizer))
    argv = ["eval", "ppl", "--methods", "full,h2o", "--budgets", "16,32", "--lengths", "64", "--samples", "1",
            "--block-size", "32", "--no-progress", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    records = _lines(tmp_path / "ppl.jsonl")
    assert len(records) == 3
    lines = out.splitlines()
    assert "#### length 64 tokens — perplexity (1 sample)" in lines
    assert "| method | b=16 | b=32 |" in lines
    ppl = {(r["method"], r["budget"]): r["ppl"] for r in records}
    full = f"{ppl[('full', None)]:.3f}"
    assert f"| full | {full} | {full} |" in lines
    assert f"| h2o | {ppl[('h2o', 16)]:.3f} | {ppl[('h2o', 32)]:.3f} |" in lines
    assert lines[-1].startswith("ppl: 3 cell(s) computed, 0 already done")
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert f"| full | {full} | {full} |" in out.splitlines() and "ppl: 0 cell(s) computed, 3 already done" in out
    summary = report.summary_lines("ppl", records)
    assert summary[0] == "#### length 64 tokens — perplexity (1 sample)"
