"""``caote demo``: the comparison table (full cache, base policy, base+CAOTE, question-aware mode), its one-sentence
summary, the single runs, and the partial credit of the needle's answer."""

from types import SimpleNamespace

import pytest

import caote.models
from caote.ask import answer_credit
from caote.cli import demo_runs, demo_summary, demo_table, excerpt, main

EXPECTED = "violet harbour 7312"
HAYSTACK = " ".join(f"Essay sentence {i} talks about startups, painting and the way cities grow." for i in range(120))


@pytest.fixture
def loaded(monkeypatch, tiny_with_tokenizer):
    monkeypatch.setattr(caote.models, "load_model", lambda *args, **kwargs: tiny_with_tokenizer)


@pytest.fixture
def haystack(tmp_path):
    path = tmp_path / "haystack.txt"
    path.write_text(HAYSTACK, encoding="utf-8")
    return path


def _demo(capsys, haystack, *argv):
    code = main(["demo", "--text-file", str(haystack), "--context-tokens", "600", "--budget", "64", "--block-size",
                 "64", "--max-new-tokens", "4", "--device", "cpu", *argv])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out, captured.err


# ---------------------------------------------------------------------------------------------- partial credit
@pytest.mark.parametrize("answer,found,summary,score", [
    ("The passphrase is 'violet harbour 7312'.", True, "yes", 1.0),
    ("VIOLET HARBOUR 7312", True, "yes", 1.0),
    ("violet harbour, 7312!", True, "yes", 1.0),
    ("violet harbour 73121212", False, "partial: violet harbour 7312+", 2.5 / 3),  # digits run on: not found
    ("violet harbour 73", False, "partial: violet harbour 73..", 2.5 / 3),
    ("violet harbour", False, "partial: violet harbour _", 2 / 3),
    ("the harbour 7312", False, "partial: _ harbour 7312", 2 / 3),
    ("violet 7312 harbour", False, "partial: violet harbour 7312", 1.0),  # every word, wrong order
    ("x7312 violet harbour 7312", True, "yes", 1.0),
    ("ultraviolet harbour 7312", False, "partial: _ harbour 7312", 2 / 3),
    ("I don't know.", False, "no", 0.0),
    ("", False, "no", 0.0),
])
def test_answer_credit(answer, found, summary, score):
    credit = answer_credit(answer, EXPECTED)
    assert credit.found is found and credit.summary() == summary
    assert credit.score == pytest.approx(score)


def test_found_rule_is_in_the_help(capsys):
    assert main(["demo", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "the number must be followed by a non-digit" in out and "'violet harbour 73121212' is not found" in out


# ---------------------------------------------------------------------------------------------- runs and summary
def test_demo_runs():
    assert demo_runs("snapkv+caote", True, False) == [("full", False), ("snapkv", False), ("snapkv+caote", False),
                                                      ("snapkv+caote", True)]
    assert demo_runs("snapkv+caote", True, True) == demo_runs("snapkv+caote", True, False)
    assert demo_runs("tova", True, False) == [("full", False), ("tova", False), ("tova", True)]
    assert demo_runs("full", True, True) == [("full", False)]
    assert demo_runs("snapkv+caote", False, False) == [("snapkv+caote", False)]
    assert demo_runs("snapkv+caote", False, True) == [("snapkv+caote", True)]


def _row(method, label, answer, kv=1.0, full=16.0):
    mib = 1024**2
    result = SimpleNamespace(text=answer, kv_bytes=int(kv * mib), full_kv_bytes=int(full * mib),
                             peak_kv_fraction=kv * 1.5 / full, prefill_seconds=2.0, decode_seconds=0.5)
    return {"method": method, "label": label, "result": result, "credit": answer_credit(answer, EXPECTED)}


def test_demo_summary_is_computed_from_the_results():
    full = _row("full", "full cache", "It is violet harbour 7312.", kv=16.0)
    base = _row("snapkv", "snapkv", "I do not know")
    caote_row = _row("snapkv+caote", "snapkv+caote", "violet harbour 73")
    aware = _row("snapkv+caote", "snapkv+caote, question-aware", "violet harbour 7312")
    assert demo_summary([full, base, caote_row, aware], 256) == (
        "only snapkv+caote (question-aware) keeps the needle under a 256-token budget (6.2% of the full cache); the "
        "full cache finds it; snapkv and snapkv+caote lose it (the most that survived: snapkv+caote gave "
        "'violet harbour 73..').")
    assert demo_summary([full, base], 256) == ("no method keeps the needle under a 256-token budget (6.2% of the full "
                                               "cache); the full cache finds it.")
    assert demo_summary([full, aware], 64).startswith("every method keeps the needle under a 64-token budget")
    runs_on = _row("snapkv", "snapkv", "violet harbour 731212")
    assert demo_summary([full, runs_on], 256).endswith(
        "(the most that survived: snapkv gave 'violet harbour 7312' with more digits after it).")
    missed = _row("full", "full cache", "no idea", kv=16.0)
    assert demo_summary([missed, base], 64).startswith("the full cache misses the needle too")
    assert demo_summary([full], 64) == "the full cache finds the needle."


def test_excerpt_shows_the_part_that_matters():
    answer = "The secret passphrase for the lighthouse is 'violet harbour 73121212121212'."
    assert excerpt(answer, 40, tuple(EXPECTED.split())) == "…the lighthouse is 'violet harbour 7312…"
    assert excerpt(answer, 200, ("violet",)) == answer
    assert excerpt("no | idea " * 10, 12) == "no ¦ idea n…"
    assert excerpt("violet " + "x" * 50, 20, ("violet",)) == "violet " + "x" * 12 + "…"
    echo = "The secret passphrase for the lighthouse is 'sunset 4512', as the keeper wrote."
    question = "What is the secret passphrase for the lighthouse?"
    assert excerpt(echo, 40, tuple(EXPECTED.split()), (question,)) == "…the lighthouse is 'sunset 4512', as th…"
    assert excerpt(echo, 40, tuple(EXPECTED.split())).startswith("The secret passphrase")


def test_demo_table_columns():
    lines = demo_table([_row("full", "full cache", "It is violet harbour 7312. " * 5, kv=16.0),
                        _row("snapkv", "snapkv", "violet harbour 73")])
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header == ["method", "answer", "found", "KV MiB", "% of full", "peak %", "prefill s", "decode s"]
    assert len(lines) == 4 and len({len(line) for line in lines}) == 1  # aligned
    assert "…" in lines[2] and "| yes " in lines[2] and "100.0%" in lines[2]
    assert "partial: violet harbour 73.." in lines[3] and "6.2%" in lines[3]


# ---------------------------------------------------------------------------------------------- end to end, tiny model
def test_demo_compare_is_the_default(capsys, loaded, haystack):
    out, err = _demo(capsys, haystack)
    lines = out.splitlines()
    table = [line for line in lines if line.startswith("|")]
    assert len(table) == 2 + 4, out
    labels = [line.strip("|").split("|")[0].strip() for line in table[2:]]
    assert labels == ["full cache", "snapkv", "snapkv+caote", "snapkv+caote, question-aware"]
    assert table[2].split("|")[-5].strip() == "100.0%"  # % of full, counted from the right
    for row in table[3:]:
        assert float(row.split("|")[-5].strip().rstrip("%")) < 20  # 64 of ~640 entries
    summary = lines[-1]
    assert summary.endswith(".") and "64-token budget" in summary
    assert "'7312+' = the digits run on" in out  # the legend under the table
    assert "budget          64 entries per layer and KV head" in out
    assert "[4/4] snapkv+caote, question-aware" in err


def test_demo_single_runs(capsys, loaded, haystack):
    out, _ = _demo(capsys, haystack, "--no-compare", "--question-aware")
    assert "method          snapkv+caote, question-aware, budget 64" in out and "|" not in out
    for label in ("answer", "needle found", "KV peak", "tokens evicted", "prefill"):
        assert label in out
    out, _ = _demo(capsys, haystack, "--no-compare", "--method", "tova")
    assert "method          tova, budget 64" in out and "question-aware" not in out


def test_demo_bad_text_file_before_loading(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(caote.models, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["demo", "--text-file", str(empty)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("caote: error: --text-file:") and "is empty" in err and err.count("\n") == 1
