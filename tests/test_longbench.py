"""caote.eval.longbench: loading, LongBench prompt building (middle truncation, chat rule), scoring.

The fixture in tests/fixtures/longbench/ is self-written text (fictional places and people, toy
code) in LongBench's JSONL record format; it contains no LongBench data. No model or download is
needed: tokenizers are a character-level stub, or a character-level Hugging Face tokenizer built
in memory from the ``tokenizers`` package.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from caote.eval import longbench as LB

FIXTURES = Path(__file__).parent / "fixtures" / "longbench"
FIXTURE_DATASETS = ("hotpotqa", "gov_report", "trec", "passage_count", "lcc")

BOS, EOS = 1, 2


class CharTokenizer:
    """One token per character (id = code point + 10), optional BOS, optional chat template."""

    def __init__(self, add_bos: bool = False, chat: bool = False) -> None:
        self.add_bos = add_bos
        self.eos_token_id = EOS
        self.chat_template = "<|user|>{content}<|assistant|>" if chat else None
        self.encode_calls: list[bool] = []

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.encode_calls.append(add_special_tokens)
        ids = [ord(c) + 10 for c in text]
        return [BOS, *ids] if (add_special_tokens and self.add_bos) else ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        out = []
        for i in ids:
            if i in (BOS, EOS):
                if not skip_special_tokens:
                    out.append("<s>" if i == BOS else "</s>")
            else:
                out.append(chr(i - 10))
        return "".join(out)

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        assert tokenize is False and add_generation_prompt is True
        assert [m["role"] for m in messages] == ["user"]
        return f"<|user|>\n{messages[0]['content']}\n<|assistant|>\n"


def _record(dataset: str, context: str, inp: str = "Q?") -> dict:
    return {
        "input": inp,
        "context": context,
        "answers": ["x"],
        "length": len(context.split()),
        "dataset": dataset,
        "language": "en",
        "all_classes": None,
        "_id": "0" * 48,
    }


# ----------------------------------------------------------------------------- tables


def test_prompt_and_maxlen_tables_cover_longbench():
    assert set(LB.dataset2prompt) == set(LB.LONGBENCH_DATASETS)
    assert set(LB.dataset2maxlen) == set(LB.LONGBENCH_DATASETS)
    assert set(LB.LONGBENCH_EN_DATASETS) <= set(LB.LONGBENCH_DATASETS)
    assert len(LB.LONGBENCH_EN_DATASETS) == 16
    assert set(LB.LONGBENCH_E_DATASETS) <= set(LB.LONGBENCH_EN_DATASETS)
    for name, template in LB.dataset2prompt.items():
        assert "{context}" in template, name
        assert LB.format_prompt(_record(name, "CTX", "INP")).count("CTX") == 1
    # spot checks of values from LongBench/config/dataset2maxlen.json
    assert LB.dataset2maxlen["hotpotqa"] == 32
    assert LB.dataset2maxlen["gov_report"] == 512
    assert LB.dataset2maxlen["narrativeqa"] == 128
    assert LB.dataset2maxlen["lcc"] == 64
    no_chat = {"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"}
    assert no_chat == LB.NO_CHAT_TEMPLATE_DATASETS


def test_format_prompt_exact_templates():
    rec = _record("hotpotqa", "Passage 1:\nT\nBody", "Who?")
    assert LB.format_prompt(rec) == (
        "Answer the question based on the given passages. Only give me the answer and do not "
        "output any other words.\n\nThe following are given passages.\nPassage 1:\nT\nBody\n\n"
        "Answer the question based on the given passages. Only give me the answer and do not "
        "output any other words.\n\nQuestion: Who?\nAnswer:"
    )
    assert LB.format_prompt(_record("lcc", "def f():\n")) == (
        "Please complete the code given below. \ndef f():\nNext line of code:\n"
    )
    assert LB.format_prompt(_record("repobench-p", "A\n", "B\n")) == (
        "Please complete the code given below. \nA\nB\nNext line of code:\n"
    )
    # braces inside the record text are not format fields
    assert "{x}" in LB.format_prompt(_record("lcc", "d = {x}\n"))
    # LongBench-E names map to the same template
    rec_e = dict(rec, dataset="hotpotqa_e")
    assert LB.format_prompt(rec_e) == LB.format_prompt(rec)
    assert LB.base_dataset("repobench-p_e") == "repobench-p"
    with pytest.raises(KeyError):
        LB.base_dataset("not_a_dataset")


# ----------------------------------------------------------------------------- truncation


def test_truncate_middle_is_longbench_formula():
    ids = list(range(10))
    assert LB.truncate_middle(ids, 4) == [0, 1, 8, 9]
    # odd budget: LongBench's half = int(5 / 2) = 2 at each end -> 4 tokens
    assert LB.truncate_middle(ids, 5) == [0, 1, 8, 9]
    # exact_length keeps the last ceil(5/2) = 3 -> exactly 5 tokens
    assert LB.truncate_middle(ids, 5, exact_length=True) == [0, 1, 7, 8, 9]
    # not longer than the budget -> unchanged
    assert LB.truncate_middle(ids, 10) == ids
    assert LB.truncate_middle(ids, 50) == ids
    for length in range(0, 40):
        seq = list(range(100, 100 + length))
        for n in range(2, 45):
            half = int(n / 2)
            expected = seq[:half] + seq[-half:] if length > n else seq  # pred.py::get_pred
            assert LB.truncate_middle(seq, n) == expected
            exact = LB.truncate_middle(seq, n, exact_length=True)
            if length > n:
                assert exact == seq[: n // 2] + seq[length - (n - n // 2) :]
                assert len(exact) == n
            else:
                assert exact == seq


def test_truncate_middle_rejects_tiny_budget():
    with pytest.raises(ValueError):
        LB.truncate_middle([1, 2, 3], 1)


# ----------------------------------------------------------------------------- build_prompt


def test_build_prompt_short_prompt_unchanged():
    tok = CharTokenizer()
    rec = _record("gov_report", "A short report.")
    assert LB.build_prompt(rec, tok, 10_000) == LB.format_prompt(rec)


def test_build_prompt_middle_truncation_keeps_head_and_tail():
    tok = CharTokenizer()
    rec = _record("gov_report", "".join(chr(ord("a") + i % 26) for i in range(3000)))
    full = LB.format_prompt(rec)
    for n in (100, 101, 256):
        out = LB.build_prompt(rec, tok, n)
        half = n // 2
        assert out == full[:half] + full[-half:]
        assert len(tok.encode(out)) == 2 * half
        exact = LB.build_prompt(rec, tok, n, exact_length=True)
        assert exact == full[: n // 2] + full[len(full) - (n - n // 2) :]
        assert len(tok.encode(exact)) == n


def test_build_prompt_truncation_counts_bos_and_skips_it_when_decoding():
    tok = CharTokenizer(add_bos=True)
    rec = _record("gov_report", "x" * 500 + "MIDDLE" + "y" * 500)
    full = LB.format_prompt(rec)
    n = 64
    out = LB.build_prompt(rec, tok, n)
    # ids = [BOS] + chars: the head is BOS + the first n/2 - 1 characters, BOS is dropped by
    # decode(skip_special_tokens=True); the tail is the last n/2 characters.
    assert out == full[: n // 2 - 1] + full[-(n // 2) :]
    assert "MIDDLE" not in out and "<s>" not in out
    ids = LB.build_prompt(rec, tok, n, return_ids=True)
    assert ids[0] == BOS and BOS not in ids[1:]
    assert len(ids) == n  # BOS + (n/2 - 1) + n/2


def test_build_prompt_chat_template_rule():
    chat = CharTokenizer(chat=True)
    plain = CharTokenizer()
    qa = _record("hotpotqa", "ctx")
    assert LB.build_prompt(qa, chat, 10_000) == f"<|user|>\n{LB.format_prompt(qa)}\n<|assistant|>\n"
    assert LB.uses_chat_template("hotpotqa", chat)
    assert LB.build_prompt(qa, plain, 10_000) == LB.format_prompt(qa)  # no template -> raw
    assert not LB.uses_chat_template("hotpotqa", plain)
    for name in ("trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"):
        rec = _record(name, "ctx")
        assert LB.build_prompt(rec, chat, 10_000) == LB.format_prompt(rec), name
        assert not LB.uses_chat_template(name, chat)
        if name in LB.LONGBENCH_E_DATASETS:
            assert not LB.uses_chat_template(name + "_e", chat)
    # explicit override both ways
    assert LB.build_prompt(qa, chat, 10_000, chat_template=False) == LB.format_prompt(qa)
    trec = _record("trec", "ctx")
    assert LB.build_prompt(trec, chat, 10_000, chat_template=True).startswith("<|user|>\n")


def test_build_prompt_chat_applied_after_truncation_and_ids():
    chat = CharTokenizer(add_bos=True, chat=True)
    rec = _record("hotpotqa", "z" * 2000)
    n = 40
    raw = LB.build_prompt(rec, chat, n, chat_template=False)
    wrapped = LB.build_prompt(rec, chat, n)
    assert wrapped == f"<|user|>\n{raw}\n<|assistant|>\n"
    chat.encode_calls.clear()
    ids = LB.build_prompt(rec, chat, n, return_ids=True)
    # final encode of a chat-formatted prompt adds no special tokens (the template owns them)
    assert chat.encode_calls[-1] is False
    assert ids == chat.encode(wrapped, add_special_tokens=False)
    chat.encode_calls.clear()
    ids_plain = LB.build_prompt(_record("lcc", "z" * 2000), chat, n, return_ids=True)
    assert chat.encode_calls[-1] is True and ids_plain[0] == BOS


def _hf_char_tokenizer(texts):
    """A character-level Hugging Face fast tokenizer built in memory (no files, no download)."""
    import tokenizers  # noqa: F401
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(set("".join(texts))):
        vocab.setdefault(ch, len(vocab))
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 1)]
    )
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n"
        "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    return tok


def test_build_prompt_with_a_real_hf_tokenizer():
    records = {name: LB.load_longbench(name, FIXTURES) for name in FIXTURE_DATASETS}
    texts = [LB.format_prompt(r) for recs in records.values() for r in recs]
    tok = _hf_char_tokenizer(texts + ["<|user|>\n<|assistant|>\n"])
    rec = records["hotpotqa"][0]
    full = LB.format_prompt(rec)
    full_ids = tok.encode(full)
    assert full_ids[0] == 1 and tok.decode(full_ids, skip_special_tokens=True) == full
    n = 120
    raw = LB.build_prompt(rec, tok, n, chat_template=False)
    # tokens: [<s>] + chars -> head = <s> + first 59 chars, tail = last 60 chars
    assert raw == full[: n // 2 - 1] + full[-(n // 2) :]
    out = LB.build_prompt(rec, tok, n)
    assert out == "<s><|user|>\n" + raw + "\n<|assistant|>\n"
    ids = LB.build_prompt(rec, tok, n, return_ids=True)
    assert ids.count(1) == 1 and ids[0] == 1  # a single BOS, from the template
    # few-shot / code datasets: no chat template, BOS from encode
    lcc = records["lcc"][0]
    assert LB.build_prompt(lcc, tok, 10_000) == LB.format_prompt(lcc)
    lcc_ids = LB.build_prompt(lcc, tok, 10_000, return_ids=True)
    assert lcc_ids == tok.encode(LB.format_prompt(lcc))


def test_generation_kwargs():
    expected = {"max_new_tokens": 32, "do_sample": False, "num_beams": 1}
    assert LB.generation_kwargs("hotpotqa") == expected
    assert LB.generation_kwargs("gov_report_e")["max_new_tokens"] == 512
    tok = CharTokenizer()
    kw = LB.generation_kwargs("samsum", tok)
    assert kw["max_new_tokens"] == 128 and kw["min_new_tokens"] == 1
    assert kw["eos_token_id"] == [EOS, ord("\n") + 10]
    with pytest.raises(ValueError):
        LB.generation_kwargs("samsum")


# ----------------------------------------------------------------------------- loading


def test_fixture_records_are_longbench_format():
    total = sum(p.stat().st_size for p in FIXTURES.glob("*.jsonl"))
    assert total < 50_000
    for name in FIXTURE_DATASETS:
        records = LB.load_longbench(name, data_dir=FIXTURES)
        assert 2 <= len(records) <= 3
        for r in records:
            assert set(r) == set(LB.RECORD_FIELDS)
            assert r["dataset"] == name and r["language"] == "en"
            assert isinstance(r["answers"], list) and all(isinstance(a, str) for a in r["answers"])
            assert isinstance(r["length"], int) and isinstance(r["_id"], str)
            assert (r["all_classes"] is None) == (name != "trec")


def test_load_longbench_data_subfolder_and_errors(tmp_path):
    (tmp_path / "data").mkdir()
    src = (FIXTURES / "lcc.jsonl").read_text(encoding="utf-8")
    (tmp_path / "data" / "lcc.jsonl").write_text(src + "\n\n", encoding="utf-8")  # blank lines ok
    assert LB.load_longbench("lcc", tmp_path) == LB.load_longbench("lcc", FIXTURES)
    with pytest.raises(FileNotFoundError):
        LB.load_longbench("qasper", tmp_path)
    with pytest.raises(KeyError):
        LB.load_longbench("nope", tmp_path)
    bad = json.loads(src.splitlines()[0])
    del bad["answers"]
    (tmp_path / "hotpotqa.jsonl").write_text(json.dumps(bad) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="answers"):
        LB.load_longbench("hotpotqa", tmp_path)


def test_load_longbench_online_uses_datasets_lazily(monkeypatch):
    calls = []
    fake = types.ModuleType("datasets")

    def load_dataset(path, name, split):
        calls.append((path, name, split))
        return [{"input": "q", "context": "c", "answers": ["a"]}]

    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    assert LB.load_longbench("hotpotqa") == [{"input": "q", "context": "c", "answers": ["a"]}]
    assert calls == [("THUDM/LongBench", "hotpotqa", "test")]

    def broken(path, name, split):
        raise ValueError("loading scripts are no longer supported")

    fake.load_dataset = broken
    with pytest.raises(RuntimeError, match="data_dir"):
        LB.load_longbench("hotpotqa")


def test_load_longbench_without_datasets_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ImportError, match="datasets"):
        LB.load_longbench("hotpotqa")


# ----------------------------------------------------------------------------- scoring


def test_score_fixture_end_to_end():
    recs = {name: LB.load_longbench(name, FIXTURES) for name in FIXTURE_DATASETS}

    # hotpotqa: exact -> 1; "it was ilse brandt" vs "ilse brandt": P = 2/4, R = 1 -> 2/3;
    # "yes" vs "no" -> 0. Mean (1 + 2/3 + 0)/3 = 0.5556 -> 55.56
    hotpot_preds = ["Ostrel", "It was Ilse Brandt.", "yes"]
    assert LB.score_predictions("hotpotqa", hotpot_preds, recs["hotpotqa"]) == 55.56

    # gov_report: identical summary -> F = 2/(2 + 1e-8) ~ 1; empty prediction -> rouge raises -> 0
    # mean 0.4999999975 -> 50.0
    summary = recs["gov_report"][0]["answers"][0]
    assert LB.score_predictions("gov_report", [summary, ""], recs["gov_report"]) == 50.0

    # trec: first line "Country" -> the only class matched -> 1; "Number of something" vs "Date"
    # -> 0; "Individual" -> 1. Mean 2/3 -> 66.67
    trec_preds = [
        "Country\nQuestion: Where is Drossby ?\nType: City",
        "Number of something",
        "Individual",
    ]
    assert LB.score_predictions("trec", trec_preds, recs["trec"]) == 66.67

    # passage_count: "3" vs "3" -> 1; numbers 4 and 6 vs "4" -> 1/2. Mean 3/4 -> 75.0
    count_preds = ["3", "I count 4 of the 6 paragraphs"]
    assert LB.score_predictions("passage_count", count_preds, recs["passage_count"]) == 75.0

    # lcc: comment line skipped, then exact -> 1; exact second line -> 1. -> 100.0
    lcc_preds = ["# divide\n    return total / count", recs["lcc"][1]["answers"][0] + "\n\nextra"]
    assert LB.score_predictions("lcc", lcc_preds, recs["lcc"]) == 100.0


def test_score_predictions_checks_lengths():
    recs = LB.load_longbench("passage_count", FIXTURES)
    with pytest.raises(ValueError):
        LB.score_predictions("passage_count", ["3"], recs)
    with pytest.raises(ValueError):
        LB.score_predictions("passage_count", [], [])
