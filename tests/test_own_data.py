"""Your own data in ``caote eval``: ``ppl --text-file``, ``niah --haystack-file``, ``tasks --jsonl``.

Bad files are one line naming the file (and the line) before any model loads and without touching the results
folder; the file is keyed by content (an edited file computes new cells, the report never pools two files); QA
records of both schemas are scored with SQuAD's F1 as the metric computes it on the prediction."""

import hashlib
import json
from pathlib import Path

import pytest
import torch

import caote.models
from caote.cli import main
from caote.eval import owndata, report, runner
from caote.eval.books import book_text
from caote.eval.squad import extract_answer, squad_scores
from caote.validation import QAFile, read_data_file, read_qa_jsonl
from conftest import tiny_llama

TEXT = book_text("persuasion")[:6000]  # ~1.3k SmolLM2 tokens of an offline text
GRID = {"methods": ["full", "h2o"], "budgets": [32], "block_size": 32, "progress": False}


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def _key(path: Path) -> str:
    return f"{path.name} sha256:{hashlib.sha256(path.read_bytes()).hexdigest()[:16]}"


@pytest.fixture(scope="module")
def model():
    """A tiny random model that accepts the SmolLM2 tokenizer's ids."""
    return tiny_llama(0, vocab_size=49152)


@pytest.fixture
def no_model(monkeypatch, tokenizer):
    """``load_model`` fails the test if called; ``load_tokenizer`` (the length checks) gives the offline one."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(caote.models, "load_model", refuse)
    monkeypatch.setattr(caote.models, "load_tokenizer", lambda *args, **kwargs: tokenizer)


@pytest.fixture
def cli_model(monkeypatch, model, tokenizer):
    monkeypatch.setattr(caote.models, "load_model", lambda *args, **kwargs: (model, tokenizer))


def _error(capsys, argv, *expected) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("caote: error: ") and err.count("\n") == 1, err  # exactly one line
    for text in expected:
        assert text in err, (text, err)
    return err


# ----------------------------------------------------------------------------------------------
# bad files: one line, before the model loads, results kept


@pytest.fixture
def files(tmp_path):
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\u00e9\n".encode("latin-1"))
    (tmp_path / "empty.txt").write_text(" \n\n")
    (tmp_path / "short.txt").write_text("A short note. " * 20)
    return tmp_path


@pytest.mark.parametrize("command,flag", [(["eval", "ppl"], "--text-file"), (["eval", "niah"], "--haystack-file"),
                                          (["eval", "tasks"], "--jsonl")])
def test_file_errors_name_the_file(capsys, no_model, files, command, flag):
    out = ["--out", str(files / "out")]
    _error(capsys, [*command, flag, str(files / "none.txt"), *out], f"{flag}: file", "none.txt does not exist")
    _error(capsys, [*command, flag, str(files), *out], f"{flag}: {files} is not a file")
    _error(capsys, [*command, flag, str(files / "empty.txt"), *out], f"{flag}: ", "empty.txt is empty")
    _error(capsys, [*command, flag, str(files / "latin.txt"), *out], "latin.txt is not UTF-8 text (line 1, byte 3",
           "iconv")
    assert not (files / "out").exists()


def test_text_shorter_than_the_lengths(capsys, no_model, files, tokenizer):
    short = files / "short.txt"
    n = owndata.token_count(tokenizer, short.read_text())
    _error(capsys, ["eval", "ppl", "--text-file", str(short), "--lengths", "128,512", "--samples", "2"],
           f"--text-file: {short} has {n:,} tokens, fewer than the 1,024 that 2 windows of 512 tokens need "
           "(--samples 2, --lengths 512); give a longer text, or lower --lengths or --samples")
    _error(capsys, ["eval", "ppl", "--text-file", str(short), "--lengths", "128", "--samples", "1", "--protocol",
                    "continuation"], f"has {n:,} tokens, fewer than the 640 that 1 window of 128 + 512 tokens need")
    _error(capsys, ["eval", "niah", "--haystack-file", str(short), "--lengths", "1024"],
           f"--haystack-file: {short} has {n:,} tokens, fewer than the 1,024 that a prompt of --lengths 1024 needs")
    _error(capsys, ["eval", "ppl", "--text-file", str(short), "--books", "emma"], "--text-file or --books, not both")
    # the API says the same with its parameter names
    with pytest.raises(ValueError, match=r"text_file: .* fewer than the 512 that 1 window of 512 tokens need "
                                         r"\(samples 1, lengths 512\)"):
        runner.run_ppl(None, tokenizer, methods=["full"], budgets=[], lengths=[512], samples=1, text_file=short,
                       out=files / "api")
    assert not (files / "api").exists()


def test_bad_jsonl_lines_name_the_line(capsys, no_model, tmp_path):
    good = {"context": "Paris is in France.", "question": "Where is Paris?", "answers": ["France"]}
    cases = [
        (['{"context": "x", "question": "y", "answers": ["z"]', ], "line 1: not valid JSON"),
        ([good, "", "[1, 2]"], "line 3: expected a JSON object, got list"),
        ([good, {"context": "c", "answers": ["a"]}], "line 2: missing field 'question'"),
        ([{"context": "c", "question": "q"}], "line 1: missing field 'answers' (or kvpress's 'answer')"),
        ([{"context": 3, "question": "q", "answers": "a"}], "line 1: field 'context' must be a string, got int"),
        ([{"context": "c", "question": "q", "answers": [1]}], "line 1: field 'answers' must be a string or a list"),
        ([{"context": "c", "question": "q", "answer": {"a": 1}}], "line 1: field 'answer' must be a string or a list"),
        ([{"context": "c", "question": "q", "answers": [" "]}], "line 1: field 'answers' holds no non-empty answer"),
        ([{"context": "c", "question": "q", "answer": "a", "answer_prefix": 1}],
         "line 1: field 'answer_prefix' must be a string"),
        ([{"context": "c", "question": "q", "answer": "a", "max_new_tokens": 0}],
         "line 1: field 'max_new_tokens' must be a positive integer"),
        ([{"context": "c", "question": "q", "answer": "a", "answers": ["a"]}],
         "line 1: has both 'answers' and 'answer'"),
    ]
    out = tmp_path / "out"
    out.mkdir()
    (out / "tasks.jsonl").write_text('{"kept": 1}\n')  # results already written stay as they are
    for rows, expected in cases:
        path = _jsonl(tmp_path / "qa.jsonl", rows)
        _error(capsys, ["eval", "tasks", "--jsonl", str(path), "--out", str(out)], f"--jsonl: {path} {expected}")
        with pytest.raises(ValueError, match=r"^jsonl: "):  # the API: the same check, its parameter's name
            read_qa_jsonl(path, "jsonl")
    assert (out / "tasks.jsonl").read_text() == '{"kept": 1}\n' and not (out / "runs.jsonl").exists()


def test_qa_schemas_are_read_alike(tmp_path):
    path = _jsonl(tmp_path / "qa.jsonl", [
        {"context": "c1", "question": "q1", "answers": ["a", "b"], "extra": 1},
        "",
        {"context": "c2", "question": "q2", "answer_prefix": "Answer:", "answer": "x", "max_new_tokens": 5},
        {"context": "c3", "question": "q3", "answer": ["y", "z"], "answers_ignored": None},
    ])
    qa = read_qa_jsonl(path, "jsonl")
    assert [r.line for r in qa.records] == [1, 3, 4]
    assert [(r.schema, r.answers, r.answer_prefix, r.max_new_tokens) for r in qa.records] == [
        ("answers", ("a", "b"), None, None), ("kvpress", ("x",), "Answer:", 5), ("kvpress", ("y", "z"), None, None)]
    assert qa.data.key == _key(path)
    assert read_data_file(path, "x").sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------------------------
# ppl on your text: keyed by the file's content


def test_ppl_text_file_is_keyed_by_content(model, tokenizer, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text(TEXT)
    out = tmp_path / "out"
    grid = {**GRID, "lengths": [64], "samples": 2, "out": out}
    first = runner.run_ppl(model, tokenizer, text_file=text, **grid)
    assert first["computed"] == 4  # (full, h2o@32) x 2 windows
    records = _lines(out / "ppl.jsonl")
    old_key = _key(text)
    assert {(r["data"], r["data_file"]) for r in records} == {(old_key, str(text))}
    assert {r["sample"] for r in records} == {"notes.txt@0", "notes.txt@64"}  # the books' windows of this text
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    nll, n = runner.evicted_nll(model, torch.tensor([ids[64:128]]), "full", None, block_size=32)
    full = next(r for r in records if r["method"] == "full" and r["sample"] == "notes.txt@64")
    assert (full["nll"], full["tokens"]) == (pytest.approx(nll), n)
    assert runner.run_ppl(model, tokenizer, text_file=text, **grid)["computed"] == 0  # same file: resumed

    text.write_text(TEXT.replace("Elliot", "Elliott"))  # edited: new cells, none reused, the old ones kept
    second = runner.run_ppl(model, tokenizer, text_file=text, **grid)
    assert second["computed"] == 4 and second["skipped"] == 0
    records = _lines(out / "ppl.jsonl")
    assert len(records) == 8 and {r["data"] for r in records} == {old_key, _key(text)} and old_key != _key(text)
    assert runner.run_ppl(model, tokenizer, **{**grid, "samples": 1})["computed"] == 2  # the books: not the file's
    # the report never pools two files (nor a file and the books)
    groups = report.settings_groups(runner.load_records(out / "ppl.jsonl"))
    assert sorted(label for label, _ in groups) == sorted([f"data={old_key}", f"data={_key(text)}", "data=built-in"])
    md = report.summary_lines("ppl", runner.load_records(out / "ppl.jsonl"))
    assert f"#### length 64 tokens — perplexity (2 samples) [data={old_key}]" in md


def test_ppl_text_file_from_the_command_line(capsys, cli_model, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text(TEXT)
    argv = ["eval", "ppl", "--text-file", str(text), "--methods", "full", "--lengths", "64", "--samples", "1",
            "--block-size", "32", "--threads", "1", "--no-progress", "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    assert "ppl: 1 cell(s) computed" in capsys.readouterr().out
    (record,) = _lines(tmp_path / "out" / "ppl.jsonl")
    assert record["data"] == _key(text) and record["sample"] == "notes.txt@0"
    (run,) = _lines(tmp_path / "out" / "runs.jsonl")
    assert run["settings"]["text_file"] == str(text)
    report.write_report(tmp_path / "out")
    md = (tmp_path / "out" / "results.md").read_text()
    assert "## Perplexity under eviction (your text: notes.txt)" in md and f"data={_key(text)}" in md


# ----------------------------------------------------------------------------------------------
# the needle in your text


def test_niah_haystack_file(model, tokenizer, tmp_path, monkeypatch):
    haystack = tmp_path / "hay.txt"
    haystack.write_text(TEXT)
    prompts = []
    real = runner._generate

    def spy(model_, tok, ids, *args, **kwargs):
        prompts.append(tok.decode(ids[0]))
        return real(model_, tok, ids, *args, **kwargs)

    monkeypatch.setattr(runner, "_generate", spy)
    grid = {"methods": ["full"], "budgets": [], "lengths": [256], "depths": [0.5], "max_new_tokens": 2,
            "block_size": 64, "progress": False, "out": tmp_path / "out"}
    assert runner.run_niah(model, tokenizer, haystack_file=haystack, **grid)["computed"] == 1
    (record,) = _lines(tmp_path / "out" / "niah.jsonl")
    assert (record["data"], record["data_file"]) == (_key(haystack), str(haystack))
    (prompt,) = prompts
    assert TEXT[:40] in prompt and f"is: {record['expected']}." in prompt  # the needle, in your text
    assert abs(record["prompt_tokens"] - 256) <= 4
    assert runner.run_niah(model, tokenizer, haystack_file=haystack, **grid)["computed"] == 0
    assert runner.run_niah(model, tokenizer, **grid)["computed"] == 1  # the essays: another cell
    assert "Sir Walter" not in prompts[-1]


# ----------------------------------------------------------------------------------------------
# a QA task from your JSON lines


CONTEXT = TEXT[:1500]  # ~330 tokens


def test_jsonl_task_in_both_schemas(model, tokenizer, tmp_path):
    qa = _jsonl(tmp_path / "qa.jsonl", [
        {"context": CONTEXT, "question": "Who is the baronet?", "answers": ["Sir Walter Elliot", "Walter Elliot"]},
        {"context": CONTEXT, "question": "\nWhat is the name of the hall?", "answer_prefix": " Answer:",
         "answer": "Kellynch Hall", "max_new_tokens": 3},
        {"context": CONTEXT, "question": "Not read: --samples 2", "answers": "x"},
    ])
    out = tmp_path / "out"
    grid = {**GRID, "lengths": [512, 128], "samples": 2, "max_new_tokens": 4, "out": out}
    summary = runner.run_tasks(model, tokenizer, jsonl=qa, **grid)
    assert summary["computed"] == 8  # 2 lengths x 2 records x (full, h2o@32); no RULER task
    records = _lines(out / "tasks.jsonl")
    assert {(r["task"], r["data"], r["data_file"], r["suite"], r["metric"]) for r in records} == {
        ("jsonl/qa.jsonl", _key(qa), str(qa), "jsonl", "squad_f1")}
    assert {(r["sample"], r["line"], r["schema"]) for r in records} == {(1, 1, "answers"), (2, 2, "kvpress")}
    for r in records:  # the metric as SQuAD's computes it on the prediction
        assert r["prediction"] == extract_answer(r["generation"])
        assert (r["score"], r["em"]) == squad_scores(r["prediction"], r["references"])
        assert r["prompt_tokens"] <= r["length"] and r["truncated"] == (r["length"] == 128)
        assert r["new_tokens"] <= (3 if r["line"] == 2 else 4)  # the record's own length, capped
    assert {tuple(r["references"]) for r in records} == {("Sir Walter Elliot", "Walter Elliot"), ("Kellynch Hall",)}
    assert runner.run_tasks(model, tokenizer, jsonl=qa, **grid)["computed"] == 0


def test_jsonl_prompts_and_scores(model, tokenizer, tmp_path, monkeypatch):
    seen = []

    def answer(model_, tok, ids, method, budget, block_size, max_new_tokens, options=None, question_len=None):
        seen.append((tok.decode(ids[0]), question_len))
        return {"prediction": " Kellynch Hall.\nAnd more", "prompt_tokens": ids.shape[1], "new_tokens": 5}

    monkeypatch.setattr(runner, "_generate", answer)
    qa = read_qa_jsonl(_jsonl(tmp_path / "qa.jsonl", [
        {"context": CONTEXT, "question": "Which hall?", "answers": ["Kellynch Hall"]},
        {"context": CONTEXT, "question": " Which hall?", "answer_prefix": " Answer:", "answer": ["Kellynch"]},
        {"context": CONTEXT, "question": "Who?", "answers": ["Sir Walter"]},
    ]), "jsonl")
    assert isinstance(qa, QAFile)
    runner.run_tasks(model, tokenizer, jsonl=qa, methods=["full"], budgets=[], lengths=[1024], samples=3,
                     out=tmp_path / "out", progress=False, protocol="question-aware")
    scores = {r["line"]: (r["score"], r["em"], r["match"]) for r in _lines(tmp_path / "out" / "tasks.jsonl")}
    assert scores == {1: (1.0, 1.0, 1.0), 2: (pytest.approx(2 / 3), 0.0, 1.0), 3: (0.0, 0.0, 0.0)}
    (own, own_q), (kvpress, kv_q), _ = seen
    assert "Answer the question with a short span from the document." in own and own.endswith("Answer:")
    assert "Question: Which hall?" in own and CONTEXT[:200] in own
    assert CONTEXT[-50:] + " Which hall?" in kvpress and kvpress.endswith(" Answer:")  # kvpress's layout
    assert "short span" not in kvpress
    assert 0 < own_q < 20 and 0 < kv_q < 20  # the question window: from the question to the end


def test_jsonl_task_from_the_command_line(capsys, cli_model, tmp_path):
    qa = _jsonl(tmp_path / "qa.jsonl", [{"context": CONTEXT, "question": "Who?", "answers": ["Sir Walter"]}])
    argv = ["eval", "tasks", "--jsonl", str(qa), "--methods", "full", "--lengths", "256", "--samples", "1",
            "--max-new-tokens", "2", "--block-size", "64", "--no-progress", "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "#### jsonl/qa.jsonl, length 256 (1 sample)" in out and "tasks: 1 cell(s) computed" in out
    (record,) = _lines(tmp_path / "out" / "tasks.jsonl")
    assert record["truncated"] and record["kept_document_tokens"] < record["document_tokens"]
