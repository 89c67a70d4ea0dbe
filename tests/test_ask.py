"""``caote ask`` and :func:`caote.ask`: your question about your own file under a KV budget, the answer streamed,
the KV memory held against the full cache; bad files get one line before any model loads."""

import pytest

import caote
import caote.models
from caote.cli import main

SHORT = "The lighthouse keeper wrote that the passphrase is violet harbour 7312. Then he went to sleep."
LONG = " ".join(f"Line {i} of the keeper's log says the tide was calm and the lamp was lit." for i in range(40))


@pytest.fixture
def loaded(monkeypatch, tiny_with_tokenizer):
    """``load_model`` returns the tiny model and records its arguments."""
    calls = []

    def load(*args, **kwargs):
        calls.append((args, kwargs))
        return tiny_with_tokenizer

    monkeypatch.setattr(caote.models, "load_model", load)
    return calls


@pytest.fixture
def no_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(caote.models, "load_model", refuse)


def _write(tmp_path, text, name="notes.txt"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _ask(capsys, *argv):
    code = main(["ask", *argv, "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def test_ask_short_file_says_nothing_evicted(capsys, tmp_path, loaded, tiny_with_tokenizer):
    path = _write(tmp_path, SHORT)
    out = _ask(capsys, "--text-file", str(path), "--question", "What is the passphrase?", "--max-new-tokens", "6")
    lines = out.splitlines()
    assert lines[0].startswith("answer      ")
    assert any(line.startswith("nothing evicted: the prompt (") and "fit in the budget (256 entries" in line
               for line in lines), out
    kv = next(line for line in lines if line.startswith("KV held"))
    assert "MiB = 100.0% of the full cache" in kv and "peak" in kv
    assert any(line.startswith("time        prefill") and "decode" in line for line in lines)
    assert any(line.startswith("method      snapkv+caote, budget 256") for line in lines)
    assert loaded[0][1]["device"] == "cpu"
    # the streamed answer is the answer the API gives for the same call
    model, tokenizer = tiny_with_tokenizer
    result = caote.ask(model, tokenizer, SHORT, "What is the passphrase?", max_new_tokens=6)
    assert lines[0] == "answer      " + result.text
    assert result.evicted_tokens == 0 and result.kv_bytes == result.full_kv_bytes


def test_ask_long_file_evicts_and_labels_question_aware(capsys, tmp_path, loaded):
    path = _write(tmp_path, LONG)
    out = _ask(capsys, "--text-file", str(path), "--question", "Was the lamp lit?", "--budget", "64",
               "--block-size", "32", "--max-new-tokens", "4", "--method", "SnapKV", "--question-aware")
    assert "method      snapkv, question-aware, budget 64 entries per layer and KV head" in out
    assert "nothing evicted" not in out
    evicted = next(line for line in out.splitlines() if line.startswith("evicted"))
    assert "tokens) is longer than the budget (64)" in evicted
    kv = next(line for line in out.splitlines() if line.startswith("KV held"))
    share = float(kv.split("MiB = ")[1].split("%")[0])
    assert 0 < share < 20


def test_ask_options_reach_the_cache(capsys, tmp_path, loaded, monkeypatch):
    """``--option`` on ``caote ask`` is an eviction option of its cache (the instruction kept with sink_tokens, the
    question protected in the question-aware mode)."""
    import caote.generation

    configs = []
    real = caote.generation.EvictingCache

    def spy(*args, **kwargs):
        cache = real(*args, **kwargs)
        configs.append(cache.config)
        return cache

    monkeypatch.setattr(caote.generation, "EvictingCache", spy)
    out = _ask(capsys, "--text-file", str(_write(tmp_path, LONG)), "--question", "Was the lamp lit?", "--budget",
               "64", "--block-size", "32", "--max-new-tokens", "2", "--question-aware", "--option", "sink_tokens=8",
               "--option", "protect_question=true")
    assert "question-aware" in out
    assert configs[-1].sink_tokens == 8 and configs[-1].protect_question


def test_ask_budget_as_share_of_the_prompt(capsys, tmp_path, loaded):
    out = _ask(capsys, "--text-file", str(_write(tmp_path, LONG)), "--question", "Was the lamp lit?",
               "--budget", "12.5%", "--max-new-tokens", "2")
    assert "(12.5% of the prompt)" in out


def test_stream_receives_the_answer_as_generated(tiny_with_tokenizer):
    model, tokenizer = tiny_with_tokenizer
    pieces = []
    result = caote.ask(model, tokenizer, LONG, "Was the lamp lit?", budget=48, method="tova+caote",
                       max_new_tokens=12, block_size=32, stream=pieces.append)
    assert "".join(pieces) == result.text and len(pieces) >= 2
    assert result.evicted_tokens > 0 and result.budget == 48 and not result.question_aware
    aware = caote.ask(model, tokenizer, LONG, "Was the lamp lit?", budget=48, max_new_tokens=2, block_size=32,
                      question_aware=True)
    assert aware.question_aware and aware.method == "snapkv+caote"


def test_ask_full_and_api_errors(tiny_with_tokenizer):
    model, tokenizer = tiny_with_tokenizer
    full = caote.ask(model, tokenizer, SHORT, "Who?", method="FULL", max_new_tokens=2)
    assert full.budget is None and full.evicted_tokens == 0
    from caote.ask import eviction_line

    assert eviction_line(full).startswith("nothing evicted: method full keeps all")
    with pytest.raises(ValueError, match="text is empty"):
        caote.ask(model, tokenizer, "  \n", "Who?")
    with pytest.raises(ValueError, match="question is empty"):
        caote.ask(model, tokenizer, SHORT, " ")
    with pytest.raises(ValueError, match=r"unknown method 'snapkv\+caot'"):
        caote.ask(model, tokenizer, SHORT, "Who?", method="snapkv+caot")
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer"):
        caote.ask(model, tokenizer, SHORT, "Who?", max_new_tokens=0)


def _one_line_error(capsys, argv, *expected):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("caote: error: ") and err.count("\n") == 1, err
    for text in expected:
        assert text in err, (text, err)


def test_bad_files_and_arguments_are_one_line_before_loading(capsys, tmp_path, no_loading):
    q = ["--question", "Who?"]
    _one_line_error(capsys, ["ask", "--text-file", str(tmp_path / "none.txt"), *q], "--text-file: file",
                    "does not exist")
    _one_line_error(capsys, ["ask", "--text-file", str(_write(tmp_path, " \n\n", "empty.txt")), *q],
                    "--text-file:", "empty.txt is empty")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\u00e9 au lait".encode("latin-1"))
    _one_line_error(capsys, ["ask", "--text-file", str(latin), *q], "latin.txt is not UTF-8 text", "iconv")
    _one_line_error(capsys, ["ask", "--text-file", str(tmp_path), *q], "is not a file")
    path = str(_write(tmp_path, SHORT))
    _one_line_error(capsys, ["ask", "--text-file", path], "--question")
    _one_line_error(capsys, ["ask", "--text-file", path, "--question", "  "], "--question is empty")
    _one_line_error(capsys, ["ask", "--text-file", path, *q, "--budget", "0"], "--budget must be a positive integer")
    _one_line_error(capsys, ["ask", "--text-file", path, *q, "--max-new-tokens", "-5"], "--max-new-tokens")
    _one_line_error(capsys, ["ask", "--text-file", path, *q, "--method", "snapkv+cate"], "did you mean")
    _one_line_error(capsys, ["ask", "--text-file", path, *q, "--option", "sinks=4"], "did you mean 'sink_tokens'?")
    _one_line_error(capsys, ["ask", "--text-file", path, *q, "--option", "protect_question=true"],
                    "protect_question protects the prompt's question", "--question-aware")


@pytest.mark.slow
def test_ask_real_model_reads_a_short_file(capsys, tmp_path):
    """SmolLM2 answers from a short file read whole (nothing evicted), streaming the answer."""
    path = _write(tmp_path, SHORT)
    out = _ask(capsys, "--text-file", str(path), "--question", "What is the passphrase?", "--max-new-tokens", "16",
               "--threads", "1")
    assert "nothing evicted" in out and "100.0% of the full cache" in out
    assert "7312" in out.splitlines()[0]
