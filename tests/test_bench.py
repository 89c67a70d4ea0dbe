"""Smoke tests of ``caote bench`` on the tiny random model (seconds, no model download)."""

import argparse
import json
import math
from pathlib import Path

import pytest

from caote import bench


def _args(tmp_path, *extra):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    bench.add_parser(sub)
    return parser.parse_args(["bench", "--quick", "--out", str(tmp_path / "bench.json"), *extra])


def test_quick_bench_runs_and_writes_results(tmp_path, capsys):
    args = _args(tmp_path, "--lengths", "160", "--decode-tokens", "3",
                 "--methods", "full,streaming,caote,tova,tova+caote,tova+fastcaote,h2o,h2o+caote,snapkv")
    assert bench.run(args) == 0  # targets are stored in the JSON, not printed nor enforced, without --strict
    out = capsys.readouterr().out
    assert "| L | budget | method |" in out and "PASS" not in out and "FAIL" not in out
    results = json.loads((tmp_path / "bench.json").read_text())
    strict = bench.report(results, strict=True)  # --strict prints every target
    assert all(("PASS  " if t["passed"] else "FAIL  ") + t["target"] in strict for t in results["targets"])
    assert (tmp_path / "bench.md").exists()
    rows = {(r["length"], r["budget"], r["method"]): r for r in results["rows"]}
    full = rows[(160, None, "full")]
    assert full["vs_full"]["prefill_s"] == pytest.approx(1.0)
    for method in ("streaming", "caote", "tova", "tova+caote", "tova+fastcaote", "h2o", "h2o+caote", "snapkv"):
        row = rows[(160, 64, method)]
        assert row["prefill_s"] > 0 and row["decode_tok_s"] > 0
        # bounded cache: budget + block entries per layer and KV head, against 160 for the full cache
        assert row["vs_full"]["prefill_kv_bytes"] == pytest.approx((64 + 32) / 160)
        assert row["evict_prefill_s"] > 0  # after_attention was timed
        assert row["evict_decode_ms_per_token"] > 0
    assert rows[(160, 64, "tova+caote")]["base"] == "tova"
    assert rows[(160, 64, "tova+caote")]["vs_base"]["prefill_s"] is not None
    assert rows[(160, 64, "tova")]["vs_base"]["prefill_s"] is None
    memory_targets = [t for t in results["targets"] if t["target"].startswith("prefill peak KV")]
    assert memory_targets and all(t["passed"] for t in memory_targets)
    assert any(t["target"].startswith("tova+caote prefill") for t in results["targets"])
    caote_prefill = {t["method"] for t in results["targets"] if t["target"].startswith("CAOTE prefill <= 0.55x")}
    assert caote_prefill == {"caote", "tova+caote", "h2o+caote"}
    # the timer is uninstalled afterwards
    from caote.layers import EvictingLayer

    assert EvictingLayer.after_attention.__name__ == "after_attention"


def test_compositions_are_compared_with_their_parent_even_when_it_is_one_itself(tmp_path, capsys):
    """snapkv+caote+out against snapkv+caote, which is compared with snapkv: every row keeps its runs until every
    ratio is taken."""
    args = _args(tmp_path, "--lengths", "160", "--decode-tokens", "2", "--methods", "snapkv,snapkv+caote,snapkv+caote+out")
    assert bench.run(args) == 0
    rows = {r["method"]: r for r in json.loads((tmp_path / "bench.json").read_text())["rows"]}
    assert rows["snapkv+caote+out"]["base"] == "snapkv+caote" and rows["snapkv+caote"]["base"] == "snapkv"
    assert rows["snapkv+caote+out"]["vs_base"]["prefill_s_from_evict"] is not None
    assert all("_runs" not in row for row in rows.values())


def test_memory_worker_measures_one_configuration():
    result = bench.memory_child(dict(model=bench.TINY_MODEL, length=128, method="tova+fastcaote", budget=32,
                                     block_size=32, decode_tokens=2))
    assert result["peak_rss_bytes"] > 0
    if result["rss_exact"]:
        assert result["rss_delta_bytes"] >= 0


def test_bad_method_is_refused():
    with pytest.raises(ValueError, match="unknown method"):
        bench._method_list("full,tova+bogus")


def test_quick_sweep_fits_slopes_and_writes_plots(tmp_path, capsys):
    args = _args(tmp_path, "--sweep", "--lengths", "64,128,256", "--budgets", "16", "--block-size", "16",
                 "--decode-tokens", "2", "--methods", "full,streaming,tova")
    assert bench.run(args) == 0
    out = capsys.readouterr().out
    assert "sweep: log-log slope" in out
    results = json.loads((tmp_path / "bench.json").read_text())
    series = {entry["method"]: entry for entry in results["sweep"]["series"]}
    assert series["full"]["lengths"] == [64, 128, 256]
    for entry in series.values():
        assert all(t > 0 for t in entry["prefill_s_per_token"]) and all(r > 0 for r in entry["decode_tok_s"])
        assert math.isfinite(entry["slopes"]["prefill_s"]) and math.isfinite(entry["slopes"]["peak_kv_bytes"])
    # stored KV: the full cache grows with the prompt, a budgeted one stays at budget + block
    assert series["full"]["slopes"]["peak_kv_bytes"] == pytest.approx(1.0, abs=0.1)
    for method in ("streaming", "tova"):
        assert series[method]["slopes"]["peak_kv_bytes"] == pytest.approx(0.0, abs=0.1)
    plots = results["sweep"]["plots"]
    assert len(plots) == 3 and all(Path(p).exists() and Path(p).stat().st_size > 0 for p in plots)  # no RSS: --quick
    assert (tmp_path / "bench.md").read_text().count("| streaming | 16 |") == 1


def test_sweep_lengths_are_capped_by_the_model_positions():
    model = bench.tiny_model()
    assert bench.cap_lengths([1024, 16384, 32768], model, log=lambda line: None) == [1024, 16384]
    limit = model.config.max_position_embeddings
    assert bench.cap_lengths([limit - 8, limit - 7], model, decode_tokens=8, log=lambda line: None) == [limit - 8]
    with pytest.raises(ValueError, match="decode tokens"):
        bench.cap_lengths([limit], model, decode_tokens=1, log=lambda line: None)
    assert bench.loglog_slope([1, 2, 4], [3, 6, 12]) == pytest.approx(1.0)
    assert bench.loglog_slope([1], [3]) is None


def _row(length, method, budget, total, tok_s=10.0, evict_share=0.01):
    return dict(length=length, method=method, budget=budget, total_s=total, decode_tok_s=tok_s,
                evict_decode_fraction=evict_share, prefill_s=total, prefill_kv_bytes=None, peak_kv_bytes=None,
                rss_delta_bytes=None, peak_rss_bytes=None, evict_prefill_s=0.0, base=None)


def test_break_even_and_decode_targets_from_rows():
    rows = [_row(1024, "full", None, 1.0), _row(2048, "full", None, 3.0), _row(4096, "full", None, 9.0),
            _row(1024, "caote", 256, 1.2, evict_share=0.2), _row(2048, "caote", 256, 2.9), _row(4096, "caote", 256, 5.0),
            _row(1024, "tova", 256, 0.9), _row(2048, "tova", 256, 3.1), _row(4096, "tova", 256, 6.0),
            _row(1024, "streaming", 256, 0.8, tok_s=10.0), _row(1024, "h2o", 256, 1.1, tok_s=9.0)]
    bench._add_ratios(rows)
    # tova is faster at 1024 but slower at 2048: it breaks even from 4096 on, not from 1024
    even = bench.break_even(rows)
    assert even[("caote", 256)] == 2048 and even[("tova", 256)] == 4096 and even[("h2o", 256)] is None
    targets = {(t["target"].split(" <=")[0].split(" >=")[0], t["length"], t["method"]): t["passed"]
               for t in bench.check_targets(rows, block_size=128)}
    assert targets[("total time (prefill + decode)", 2048, "caote")] is True
    assert targets[("total time (prefill + decode)", 2048, "tova")] is False
    assert targets[("decode eviction", 1024, "caote")] is False and targets[("decode eviction", 2048, "caote")]
    assert targets[("decode tok/s", 1024, "h2o")] is False  # 0.90x streaming's tokens/s


def test_accelerator_peak_memory_is_read_from_every_cuda_device(monkeypatch):
    """CUDA's counters (stubbed: no GPU here) are reset before a run and their peaks summed over the devices a
    ``device_map`` model spans; the CPU has none."""
    import torch

    resets = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", resets.append)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda index: (index + 1) * 2**20)
    bench._reset_accelerator_peak(torch.device("cuda"))
    assert resets == [0, 1]
    assert bench.accelerator_peak_bytes(torch.device("cuda:0")) == 3 * 2**20
    bench._reset_accelerator_peak(torch.device("cpu"))
    assert resets == [0, 1] and bench.accelerator_peak_bytes(torch.device("cpu")) is None


def test_accelerator_peak_memory_gets_a_column_and_a_ratio_to_full(tmp_path, capsys, monkeypatch):
    args = _args(tmp_path, "--lengths", "160", "--decode-tokens", "2", "--methods", "full,streaming")
    assert bench.run(args) == 0
    assert "peak GPU" not in capsys.readouterr().out  # CPU: no column
    peaks = iter([7, 7, 100, 50])  # the two warm-ups first, then one round: full, streaming
    monkeypatch.setattr(bench, "accelerator_peak_bytes", lambda device: next(peaks) * 2**20)
    assert bench.run(args) == 0
    assert "peak GPU MiB | ×full |" in capsys.readouterr().out
    rows = {r["method"]: r for r in json.loads((tmp_path / "bench.json").read_text())["rows"]}
    assert rows["full"]["accelerator_peak_bytes"] == rows["streaming"]["accelerator_peak_bytes"] * 2
    assert rows["streaming"]["vs_full"]["accelerator_peak_bytes"] == pytest.approx(0.5)


def test_a_memory_worker_that_runs_too_long_keeps_the_timings(tmp_path, capsys, monkeypatch):
    """A configuration whose RSS worker times out gets no RSS; the run still ends with every timing written."""
    import subprocess

    def too_slow(cmd, **kwargs):
        assert kwargs["timeout"] >= bench.MEMORY_CHILD_TIMEOUT_S
        raise subprocess.TimeoutExpired(cmd, kwargs["timeout"])

    monkeypatch.setattr(bench.subprocess, "run", too_slow)
    args = _args(tmp_path, "--lengths", "160", "--decode-tokens", "2", "--methods", "full,streaming",
                 "--memory", "subprocess")
    assert bench.run(args) == 0
    assert "not measured: memory worker for" in capsys.readouterr().err
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert len(rows) == 2 and all(r["peak_rss_bytes"] is None and r["prefill_s"] > 0 for r in rows)


def test_a_stopped_bench_resumes_from_its_journal(tmp_path, capsys, monkeypatch):
    """Every measurement is journalled as it is made: a run stopped after three measurements, run again, makes only
    the others, reports how many it reused, and removes the journal once its results are written."""
    extra = ("--lengths", "160", "--decode-tokens", "2", "--methods", "full,streaming,tova", "--repeats", "2")
    made = []
    real_run_once = bench.run_once

    def stopping_run_once(*args, **kwargs):
        if len(made) == 3 + 3:  # a warm-up per method, then three measurements
            raise KeyboardInterrupt  # the session ends
        made.append(args[2].key)
        return real_run_once(*args, **kwargs)

    monkeypatch.setattr(bench, "run_once", stopping_run_once)
    journal = tmp_path / "bench.partial.jsonl"
    with pytest.raises(KeyboardInterrupt):
        bench.run(_args(tmp_path, *extra))
    assert not (tmp_path / "bench.json").exists()
    lines = [json.loads(line) for line in journal.read_text().splitlines()]
    assert "settings" in lines[0] and len(lines) == 1 + 3  # the header, then the 3 runs (the warm-up is not kept)
    kept = {(tuple(e["run"]), e["round"]): e["prefill_s"] for e in lines[1:]}
    # a line cut by the kill is dropped, the rest kept
    journal.write_text(journal.read_text() + '{"run": [160, null, "fu')

    made.clear()
    monkeypatch.setattr(bench, "run_once", lambda *a, **k: (made.append(a[2].key), real_run_once(*a, **k))[1])
    assert bench.run(_args(tmp_path, *extra)) == 0
    captured = capsys.readouterr()
    assert "[journal] resuming" in captured.err and "3 timed run(s)" in captured.err
    assert "NOTE: resumed from a journal: 3 timed run(s)" in captured.out
    results = json.loads((tmp_path / "bench.json").read_text())
    assert results["resumed"] == {"runs": 3, "memory": 0}
    assert len(made) == 3 + 3  # the warm-up of each method, then the 6 - 3 runs not yet made
    for row in results["rows"]:
        key = (row["length"], row["budget"], row["method"])
        assert len(row["prefill_s_all"]) == 2
        for round_index in (0, 1):
            if (key, round_index) in kept:  # the journalled measurement itself, not a new one
                assert kept[(key, round_index)] in row["prefill_s_all"]
    assert not journal.exists()


def test_a_journal_of_other_settings_is_refused_and_kept(tmp_path):
    journal = tmp_path / "bench.partial.jsonl"
    journal.write_text(json.dumps({"settings": {"lengths": [999]}}) + "\n")
    before = journal.read_bytes()
    with pytest.raises(ValueError, match=r"bench\.partial\.jsonl: a bench journal written with other settings "
                                         r"\(.*lengths.*\); rerun with the same settings"):
        bench.run(_args(tmp_path, "--lengths", "160", "--methods", "full"))
    assert journal.read_bytes() == before


def _profile_script():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "profile_eviction.py"
    spec = importlib.util.spec_from_file_location("profile_eviction", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_profile_kinds_split_the_profiled_region_exactly():
    """scripts/profile_eviction.py's summary: the kinds of op and the time outside ops add up to the region's time."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    script = _profile_script()
    x, w = torch.randn(64, 96), torch.randn(96, 128)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function("prefill"):
            for _ in range(5):
                logits = torch.mm(x, w)
                torch.softmax(logits, dim=-1).add_(1.0)
    kinds = script.op_kinds(prof, "prefill")
    region = next(e for e in prof.key_averages() if e.key == "prefill").cpu_time_total / 1e6
    assert set(kinds) == {"linear layers", "attention kernels", "other ops", "outside ops"}
    assert kinds["linear layers"] > 0 and kinds["attention kernels"] > 0 and kinds["other ops"] > 0  # mm, softmax, add_
    assert sum(kinds.values()) == pytest.approx(region, rel=1e-6)
