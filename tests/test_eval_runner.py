"""Evaluation runner, report and CLI: resume, end-to-end on tiny grids, perplexity correctness."""

import json
from pathlib import Path

import pytest
import torch

from caote.eval import cli, report, runner
from caote.policy import METHODS

FIXTURES = Path(__file__).parent / "fixtures" / "longbench"


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def windows():
    g = torch.Generator().manual_seed(0)
    return [(f"rand{i}", torch.randint(0, 128, (96,), generator=g).tolist()) for i in range(2)]


def test_grid_helpers():
    assert runner.parse_methods(None) == list(METHODS)
    assert runner.parse_methods("H2O, full,h2o") == ["h2o", "full"]
    with pytest.raises(ValueError, match="valid methods"):
        runner.parse_methods("h2o,bogus")
    assert runner.method_budgets(["full", "tova"], [8, 16]) == [("full", None), ("tova", 8), ("tova", 16)]
    assert runner.parse_list("1, 2,", int) == [1, 2]


def test_ppl_equals_full_when_budget_covers_length(tiny_model, windows, tmp_path):
    summary = runner.run_ppl(tiny_model, None, methods=list(METHODS), budgets=[128], lengths=[96], out=tmp_path,
                             block_size=32, samples=2, windows=windows, progress=False)
    assert summary["computed"] == 2 * len(METHODS)
    records = _lines(tmp_path / "ppl.jsonl")
    full = {r["sample"]: r["ppl"] for r in records if r["method"] == "full"}
    for r in records:
        assert r["tokens"] == 95
        assert r["ppl"] == pytest.approx(full[r["sample"]], rel=1e-4), r["method"]
    # and the full cache matches one plain forward pass over the window
    ids = torch.tensor([windows[0][1]])
    with torch.no_grad():
        logits = tiny_model(ids).logits[0]
    nll = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:], reduction="sum").item()
    assert full["rand0"] == pytest.approx(torch.tensor(nll / 95).exp().item(), rel=1e-4)


def test_ppl_eviction_changes_perplexity(tiny_model, windows):
    ids = torch.tensor([windows[0][1]])
    full, _ = runner.evicted_nll(tiny_model, ids, "full", None, block_size=16)
    evicted, _ = runner.evicted_nll(tiny_model, ids, "tova", 16, block_size=16)
    assert evicted != pytest.approx(full, rel=1e-6)


def test_resume_skips_finished_cells(tiny_model, windows, tmp_path, monkeypatch):
    calls = []
    real = runner.evicted_nll

    def counting(*args, **kwargs):
        calls.append(args[2:4])
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "evicted_nll", counting)
    grid = {"methods": ["full", "h2o", "caote"], "budgets": [16, 32], "lengths": [64], "out": tmp_path,
            "block_size": 16, "samples": 2, "windows": windows, "progress": False}
    first = runner.run_ppl(tiny_model, None, **grid)
    assert first["computed"] == len(calls) == 2 * (1 + 2 + 2)  # full once, not per budget
    path = tmp_path / "ppl.jsonl"
    text = path.read_text()

    calls.clear()
    second = runner.run_ppl(tiny_model, None, **grid)
    assert calls == [] and second["computed"] == 0 and second["skipped"] == 10
    assert path.read_text() == text

    # an interrupted run: three cells lost, the last one half written
    lines = text.splitlines()
    kept, lost = lines[:7], lines[7:]
    path.write_text("\n".join(kept) + "\n" + lost[0][: len(lost[0]) // 2])
    third = runner.run_ppl(tiny_model, None, **grid)
    assert third["computed"] == 3 and len(calls) == 3
    records = runner.read_jsonl(path)
    assert len(records) == 10
    assert {runner.cell_key(r) for r in records} == {runner.cell_key(json.loads(line)) for line in lines}


def test_run_record(tmp_path, tiny_model, windows):
    summary = runner.run_eval("ppl", tiny_model, None, out=tmp_path, argv=["caote", "eval", "ppl", "--x"],
                              settings={"x": 1}, methods=["full"], budgets=[], lengths=[32], block_size=16,
                              samples=1, windows=windows, progress=False)
    assert summary["computed"] == 1
    (run,) = _lines(tmp_path / "runs.jsonl")
    assert run["argv"] == ["caote", "eval", "ppl", "--x"]
    assert {"torch", "transformers", "caote", "python"} <= set(run["versions"])
    (record,) = _lines(tmp_path / "ppl.jsonl")
    assert record["run_id"] == run["run_id"]


# ----------------------------------------------------------------------------------------------
# end to end on SmolLM2 (tiny grids)


GRID = {"methods": ["full", "snapkv+caote"], "budgets": [64], "block_size": 64, "progress": False}


@pytest.fixture(scope="module")
def e2e_out(smollm2, tmp_path_factory):
    """One tiny grid of each evaluation into one folder (shared by the tests below)."""
    torch.set_num_threads(1)
    model, tok = smollm2
    out = tmp_path_factory.mktemp("eval")
    runner.run_eval("ppl", model, tok, out=out, lengths=[128], samples=1, **GRID)
    runner.run_eval("niah", model, tok, out=out, lengths=[256], depths=[0.5], max_new_tokens=12, **GRID)
    runner.run_eval("tasks", model, tok, out=out, lengths=[256], tasks=["niah_single"], samples=1,
                    longbench_dir=FIXTURES, longbench_tasks=["trec"], max_new_tokens=4, **GRID)
    return out


def test_e2e_records(e2e_out):
    common = {"eval", "model", "block_size", "method", "budget", "length", "task", "sample", "seconds", "run_id"}
    ppl = _lines(e2e_out / "ppl.jsonl")
    assert len(ppl) == 2 and all(common | {"nll", "tokens", "ppl"} <= set(r) for r in ppl)
    assert {(r["method"], r["budget"]) for r in ppl} == {("full", None), ("snapkv+caote", 64)}
    assert all(r["tokens"] == 127 and 1 < r["ppl"] < 1e4 for r in ppl)
    assert ppl[0]["sample"] == "sense_and_sensibility@0"

    niah = _lines(e2e_out / "niah.jsonl")
    assert len(niah) == 2
    for r in niah:
        assert common | {"prediction", "expected", "score", "depth", "prompt_tokens"} <= set(r)
        assert r["score"] in (0.0, 1.0) and r["sample"] == 0.5 and abs(r["prompt_tokens"] - 256) <= 4
    assert next(r for r in niah if r["method"] == "full")["score"] == 1.0  # SmolLM2 finds it in 256 tokens

    tasks = _lines(e2e_out / "tasks.jsonl")
    names = {r["task"] for r in tasks}
    assert names == {"niah_single_2", "longbench/trec"}
    ruler_rows = [r for r in tasks if r["task"] == "niah_single_2"]
    assert len(ruler_rows) == 2 and all(r["suite"] == "ruler" and r["prompt_tokens"] <= 256 for r in ruler_rows)
    lb = [r for r in tasks if r["suite"] == "longbench"]
    assert len(lb) == 2  # 1 dataset x 1 record (samples=1) x 2 methods
    assert all(0.0 <= r["score"] <= 1.0 and r["length"] == 8192 - 4 and r["metric"] == "trec" for r in lb)
    assert next(r for r in lb if r["method"] == "full")["score"] == 1.0  # first line "Country" = the class

    # every record carries every setting of its key, as the run used it
    for r in ppl + niah + tasks:
        assert set(runner.KEY_FIELDS) <= set(r)
        assert (r["dtype"], r["device"], r["protocol"], r["options"]) == ("float32", "cpu", "bounded", {})
        assert r["model_fingerprint"] == runner.LEGACY_MODEL_FINGERPRINTS["SmolLM2-135M-Instruct"]
    assert {(r["max_new_tokens"], r["chat"]) for r in ppl} == {(None, None)}
    assert {(r["max_new_tokens"], r["chat"]) for r in niah} == {(12, True)}
    assert {(r["max_new_tokens"], r["chat"]) for r in tasks} == {(4, True)}


def test_e2e_report(e2e_out):
    result = report.write_report(e2e_out)
    md = (e2e_out / "results.md").read_text()
    assert "## Perplexity" in md and "## Needle" in md and "## Long-context tasks" in md
    assert "| snapkv+caote |" in md and "b=64" in md
    assert "Missing cells: none." in md
    names = {p.name for p in result["plots"]}
    assert names == {"ppl_gap.png", "niah_heatmap_b64.png", "niah_recall.png", "tasks_score.png"}
    for name in names:
        assert (e2e_out / name).read_bytes()[:4] == b"\x89PNG"


def test_report_names_missing_cells(tmp_path):
    rows = [
        {"eval": "niah", "model": "m", "block_size": 8, "method": "full", "budget": None, "length": 100,
         "task": None, "sample": 0.5, "score": 1.0},
        {"eval": "niah", "model": "m", "block_size": 8, "method": "tova", "budget": 16, "length": 100,
         "task": None, "sample": 0.5, "score": 0.0},
        {"eval": "niah", "model": "m", "block_size": 8, "method": "tova", "budget": 32, "length": 100,
         "task": None, "sample": 0.5, "score": 1.0},
        {"eval": "niah", "model": "m", "block_size": 8, "method": "h2o", "budget": 32, "length": 100,
         "task": None, "sample": 0.5, "score": 1.0},
    ]
    for r in rows:  # as run_niah writes them
        r.update(expected="1234567", prediction=" 1234567." if r["score"] else " 7.")
    (tmp_path / "niah.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report.write_report(tmp_path)
    md = (tmp_path / "results.md").read_text()
    assert "Missing cells: h2o@16." in md
    # rows in the paper's order: full, then h2o group before tova
    assert md.index("| full |") < md.index("| h2o |") < md.index("| tova |")


def test_cli_parses_and_reports(tmp_path, windows, tiny_model):
    import argparse

    parser = argparse.ArgumentParser(prog="caote")
    sub = parser.add_subparsers(dest="command")
    cli.add_parsers(sub)
    args = parser.parse_args(["eval", "ppl", "--methods", "full,h2o", "--budgets", "8,16", "--lengths", "64",
                              "--samples", "1", "--out", str(tmp_path)])
    assert args.command == "eval" and args.eval_name == "ppl" and args.block_size == 128
    assert args.samples == 1 and args.methods == "full,h2o"
    args = parser.parse_args(["eval", "niah", "--depths", "0.25,0.75"])
    assert cli._depths(args.depths) == [0.25, 0.75] and cli._depths("3") == 3
    args = parser.parse_args(["eval", "tasks", "--limit", "3", "--tasks", "none"])
    assert args.samples == 3
    runner.run_ppl(tiny_model, None, methods=["full", "h2o"], budgets=[16], lengths=[32], out=tmp_path,
                   block_size=16, windows=windows, progress=False)
    assert cli.main(["report", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "results.md").exists() and (tmp_path / "ppl_gap.png").exists()
    assert cli.main(["report", "--out", str(tmp_path / "nowhere")]) == 2
