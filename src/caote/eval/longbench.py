"""LongBench (v1) data loading, prompt building and scoring.

Follows THUDM/LongBench, folder ``LongBench/``:

* ``config/dataset2prompt.json`` and ``config/dataset2maxlen.json`` -- :data:`dataset2prompt`,
  :data:`dataset2maxlen` (all 21 datasets, English and Chinese; templates reproduced character
  for character, typos included).
* ``pred.py::get_pred`` -- :func:`build_prompt` (template, middle truncation, chat formatting)
  and :func:`generation_kwargs`.
* ``eval.py`` -- :func:`score_predictions` (via :func:`caote.eval.metrics.scorer`).

A LongBench record is one JSON object per line with the fields ``input``, ``context``,
``answers`` (list of reference strings), ``length``, ``dataset``, ``language``, ``all_classes``
(list or ``null``) and ``_id``.

Tokenizer interface used here (a Hugging Face tokenizer has it; so can a small test stub):
``encode(text, add_special_tokens=...) -> list[int]``, ``decode(ids, skip_special_tokens=...)
-> str`` and, for chat models, a truthy ``chat_template`` attribute plus ``apply_chat_template``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from caote.eval.metrics import dataset2metric, scorer

__all__ = [
    "LONGBENCH_DATASETS",
    "LONGBENCH_EN_DATASETS",
    "LONGBENCH_E_DATASETS",
    "NO_CHAT_TEMPLATE_DATASETS",
    "RECORD_FIELDS",
    "base_dataset",
    "build_prompt",
    "dataset2maxlen",
    "dataset2prompt",
    "format_prompt",
    "generation_kwargs",
    "load_longbench",
    "score_predictions",
    "truncate_middle",
    "uses_chat_template",
]

#: Hub id of the LongBench data set, used only by :func:`load_longbench` without ``data_dir``.
HUB_DATASET_ID = "THUDM/LongBench"

#: Fields of every LongBench record.
RECORD_FIELDS: tuple[str, ...] = (
    "input",
    "context",
    "answers",
    "length",
    "dataset",
    "language",
    "all_classes",
    "_id",
)

#: The 21 LongBench datasets, in ``pred.py`` order.
LONGBENCH_DATASETS: tuple[str, ...] = (
    "narrativeqa",
    "qasper",
    "multifieldqa_en",
    "multifieldqa_zh",
    "hotpotqa",
    "2wikimqa",
    "musique",
    "dureader",
    "gov_report",
    "qmsum",
    "multi_news",
    "vcsum",
    "trec",
    "triviaqa",
    "samsum",
    "lsht",
    "passage_count",
    "passage_retrieval_en",
    "passage_retrieval_zh",
    "lcc",
    "repobench-p",
)

#: The 16 English datasets (code completion included).
LONGBENCH_EN_DATASETS: tuple[str, ...] = (
    "narrativeqa",
    "qasper",
    "multifieldqa_en",
    "hotpotqa",
    "2wikimqa",
    "musique",
    "gov_report",
    "qmsum",
    "multi_news",
    "trec",
    "triviaqa",
    "samsum",
    "passage_count",
    "passage_retrieval_en",
    "lcc",
    "repobench-p",
)

#: Datasets of LongBench-E (load them as ``f"{name}_e"``), in ``pred.py`` order.
LONGBENCH_E_DATASETS: tuple[str, ...] = (
    "qasper",
    "multifieldqa_en",
    "hotpotqa",
    "2wikimqa",
    "gov_report",
    "multi_news",
    "trec",
    "triviaqa",
    "samsum",
    "passage_count",
    "passage_retrieval_en",
    "lcc",
    "repobench-p",
)

#: Datasets on which LongBench does not wrap the prompt in the chat format
#: (``pred.py``: "chat models are better off without build prompts on these tasks").
NO_CHAT_TEMPLATE_DATASETS: frozenset[str] = frozenset(
    {"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"}
)

#: Prompt template of each dataset (``LongBench/config/dataset2prompt.json``), filled with
#: ``template.format(**record)``.
dataset2prompt: dict[str, str] = {
    "narrativeqa": (
        "You are given a story, which can be either a novel or a movie script, and a question. "
        "Answer the question asconcisely as you can, using a single phrase if possible. Do not "
        "provide any explanation.\n\n"
        "Story: {context}\n\n"
        "Now, answer the question based on the story asconcisely as you can, using a single "
        "phrase if possible. Do not provide any explanation.\n\n"
        "Question: {input}\n\n"
        "Answer:"
    ),
    "qasper": (
        "You are given a scientific article and a question. Answer the question as concisely as "
        "you can, using a single phrase or sentence if possible. If the question cannot be "
        'answered based on the information in the article, write "unanswerable". If the question '
        'is a yes/no question, answer "yes", "no", or "unanswerable". Do not provide any '
        "explanation.\n\n"
        "Article: {context}\n\n"
        " Answer the question based on the above article as concisely as you can, using a single "
        "phrase or sentence if possible. If the question cannot be answered based on the "
        'information in the article, write "unanswerable". If the question is a yes/no question, '
        'answer "yes", "no", or "unanswerable". Do not provide any explanation.\n\n'
        "Question: {input}\n\n"
        "Answer:"
    ),
    "multifieldqa_en": (
        "Read the following text and answer briefly.\n\n"
        "{context}\n\n"
        "Now, answer the following question based on the above text, only give me the answer and "
        "do not output any other words.\n\n"
        "Question: {input}\n"
        "Answer:"
    ),
    "multifieldqa_zh": (
        "阅读以下文字并用中文简短回答：\n\n"
        "{context}\n\n"
        "现在请基于上面的文章回答下面的问题，只告诉我答案，不要输出任何其他字词。\n\n"
        "问题：{input}\n"
        "回答："
    ),
    "hotpotqa": (
        "Answer the question based on the given passages. Only give me the answer and do not "
        "output any other words.\n\n"
        "The following are given passages.\n"
        "{context}\n\n"
        "Answer the question based on the given passages. Only give me the answer and do not "
        "output any other words.\n\n"
        "Question: {input}\n"
        "Answer:"
    ),
    "2wikimqa": (
        "Answer the question based on the given passages. Only give me the answer and do not "
        "output any other words.\n\n"
        "The following are given passages.\n"
        "{context}\n\n"
        "Answer the question based on the given passages. Only give me the answer and do not "
        "output any other words.\n\n"
        "Question: {input}\n"
        "Answer:"
    ),
    "musique": (
        "Answer the question based on the given passages. Only give me the answer and do not "
        "output any other words.\n\n"
        "The following are given passages.\n"
        "{context}\n\n"
        "Answer the question based on the given passages. Only give me the answer and do not "
        "output any other words.\n\n"
        "Question: {input}\n"
        "Answer:"
    ),
    "dureader": (
        "请基于给定的文章回答下述问题。\n\n"
        "文章：{context}\n\n"
        "请基于上述文章回答下面的问题。\n\n"
        "问题：{input}\n"
        "回答："
    ),
    "gov_report": (
        "You are given a report by a government agency. Write a one-page summary of the report.\n\n"
        "Report:\n"
        "{context}\n\n"
        "Now, write a one-page summary of the report.\n\n"
        "Summary:"
    ),
    "qmsum": (
        "You are given a meeting transcript and a query containing a question or instruction. "
        "Answer the query in one or more sentences.\n\n"
        "Transcript:\n"
        "{context}\n\n"
        "Now, answer the query based on the above meeting transcript in one or more sentences.\n\n"
        "Query: {input}\n"
        "Answer:"
    ),
    "multi_news": (
        "You are given several news passages. Write a one-page summary of all news. \n\n"
        "News:\n"
        "{context}\n\n"
        "Now, write a one-page summary of all the news.\n\n"
        "Summary:"
    ),
    "vcsum": (
        "下面有一段会议记录，请你阅读后，写一段总结，总结会议的内容。\n"
        "会议记录：\n"
        "{context}\n\n"
        "会议总结："
    ),
    "trec": (
        "Please determine the type of the question below. Here are some examples of questions.\n\n"
        "{context}\n"
        "{input}"
    ),
    "triviaqa": (
        "Answer the question based on the given passage. Only give me the answer and do not "
        "output any other words. The following are some examples.\n\n"
        "{context}\n\n"
        "{input}"
    ),
    "samsum": (
        "Summarize the dialogue into a few short sentences. The following are some examples.\n\n"
        "{context}\n\n"
        "{input}"
    ),
    "lsht": (
        "请判断给定新闻的类别，下面是一些例子。\n\n"
        "{context}\n"
        "{input}"
    ),
    "passage_count": (
        "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. "
        "Please carefully read these paragraphs and determine how many unique paragraphs there "
        "are after removing duplicates. In other words, how many non-repeating paragraphs are "
        "there in total?\n\n"
        "{context}\n\n"
        "Please enter the final count of unique paragraphs after removing duplicates. The output "
        "format should only contain the number, such as 1, 2, 3, and so on.\n\n"
        "The final answer is: "
    ),
    "passage_retrieval_en": (
        "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which "
        "paragraph the abstract is from.\n\n"
        "{context}\n\n"
        "The following is an abstract.\n\n"
        "{input}\n\n"
        "Please enter the number of the paragraph that the abstract is from. The answer format "
        'must be like "Paragraph 1", "Paragraph 2", etc.\n\n'
        "The answer is: "
    ),
    "passage_retrieval_zh": (
        "以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n"
        "{context}\n\n"
        "下面是一个摘要\n\n"
        "{input}\n\n"
        '请输入摘要所属段落的编号。答案格式必须是"段落1"，"段落2"等格式\n\n'
        "答案是："
    ),
    "lcc": (
        "Please complete the code given below. \n"
        "{context}Next line of code:\n"
    ),
    "repobench-p": (
        "Please complete the code given below. \n"
        "{context}{input}Next line of code:\n"
    ),
}

#: Maximum number of generated tokens per dataset (``LongBench/config/dataset2maxlen.json``).
dataset2maxlen: dict[str, int] = {
    "narrativeqa": 128,
    "qasper": 128,
    "multifieldqa_en": 64,
    "multifieldqa_zh": 64,
    "hotpotqa": 32,
    "2wikimqa": 32,
    "musique": 32,
    "dureader": 128,
    "gov_report": 512,
    "qmsum": 512,
    "multi_news": 512,
    "vcsum": 512,
    "trec": 64,
    "triviaqa": 32,
    "samsum": 128,
    "lsht": 64,
    "passage_count": 32,
    "passage_retrieval_en": 32,
    "passage_retrieval_zh": 32,
    "lcc": 64,
    "repobench-p": 64,
}


def base_dataset(dataset: str) -> str:
    """LongBench name of ``dataset``, with a LongBench-E ``_e`` suffix removed.

    >>> base_dataset("hotpotqa_e"), base_dataset("hotpotqa")
    ('hotpotqa', 'hotpotqa')
    """
    if dataset in dataset2prompt:
        return dataset
    if dataset.endswith("_e") and dataset[:-2] in dataset2prompt:
        return dataset[:-2]
    raise KeyError(f"unknown LongBench dataset {dataset!r}; known: {', '.join(LONGBENCH_DATASETS)}")


# --------------------------------------------------------------------------- loading


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    with path.open("r", encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            record = json.loads(line)
            missing = [f for f in RECORD_FIELDS if f not in record]
            if missing:
                raise ValueError(f"{path}:{line_no}: LongBench record lacks field(s) {missing}")
            records.append(record)
    return records


def load_longbench(dataset: str, data_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """Records of one LongBench (or LongBench-E, ``"<name>_e"``) dataset, in file order.

    With ``data_dir``: read ``<data_dir>/<dataset>.jsonl`` (or ``<data_dir>/data/<dataset>.jsonl``,
    the layout of LongBench's unpacked ``data.zip``); nothing is downloaded. Without it:
    ``datasets.load_dataset("THUDM/LongBench", dataset, split="test")``, as LongBench's
    ``pred.py`` does; ``datasets`` is imported only then. Note that LongBench on the hub is a
    loading-script data set, which recent ``datasets`` releases (4.x) refuse to run; with those,
    unpack ``data.zip`` and pass ``data_dir``.

    Returns a list of plain dicts with the fields of :data:`RECORD_FIELDS`.
    """
    base_dataset(dataset)  # validates the name
    if data_dir is not None:
        root = Path(data_dir)
        candidates = [root / f"{dataset}.jsonl", root / "data" / f"{dataset}.jsonl"]
        for path in candidates:
            if path.is_file():
                return _read_jsonl(path)
        raise FileNotFoundError(
            f"no LongBench file for {dataset!r}; looked for: " + ", ".join(map(str, candidates))
        )
    try:
        from datasets import load_dataset
    except ImportError as exc:
        raise ImportError(
            "load_longbench without data_dir needs the 'datasets' package (pip install datasets); "
            "alternatively pass data_dir=<folder with <dataset>.jsonl files>"
        ) from exc
    try:
        data = load_dataset(HUB_DATASET_ID, dataset, split="test")
    except Exception as exc:
        raise RuntimeError(
            f"datasets.load_dataset({HUB_DATASET_ID!r}, {dataset!r}, split='test') failed "
            f"({type(exc).__name__}: {exc}). LongBench is published with a loading script, which "
            "datasets>=4 no longer runs; unpack LongBench's data.zip and pass data_dir instead."
        ) from exc
    return [dict(record) for record in data]


# --------------------------------------------------------------------------- prompts


def format_prompt(record: dict[str, Any], dataset: str | None = None) -> str:
    """The untruncated prompt: ``dataset2prompt[dataset].format(**record)``.

    ``dataset`` defaults to ``record["dataset"]``; a LongBench-E ``_e`` suffix is ignored.
    """
    name = base_dataset(dataset if dataset is not None else record["dataset"])
    return dataset2prompt[name].format(**record)


def truncate_middle(
    token_ids: Sequence[int], max_tokens: int, *, exact_length: bool = False
) -> list[int]:
    """Drop the middle of ``token_ids`` when it is longer than ``max_tokens``.

    Follows ``LongBench/pred.py::get_pred``: with ``half = int(max_tokens / 2)`` the result is
    ``token_ids[:half] + token_ids[-half:]``, i.e. the first ⌊n/2⌋ and the last ⌊n/2⌋ tokens for
    ``n = max_tokens`` -- one token short of ``n`` when ``n`` is odd. ``exact_length=True`` keeps
    the last ⌈n/2⌉ instead, so exactly ``n`` tokens remain (not LongBench's behaviour). Sequences
    of at most ``max_tokens`` tokens come back unchanged (as a new list).
    """
    ids = list(token_ids)
    if max_tokens < 2:
        # LongBench would compute half = 0 and, via ids[-0:], keep the whole sequence.
        raise ValueError(f"max_tokens must be at least 2, got {max_tokens}")
    if len(ids) <= max_tokens:
        return ids
    head = max_tokens // 2
    tail = max_tokens - head if exact_length else head
    return ids[:head] + ids[len(ids) - tail :]


def uses_chat_template(dataset: str, tokenizer: Any) -> bool:
    """Whether :func:`build_prompt` wraps ``dataset`` prompts in ``tokenizer``'s chat template.

    True when the tokenizer has a (truthy) ``chat_template`` and the dataset is not one of
    :data:`NO_CHAT_TEMPLATE_DATASETS` (trec, triviaqa, samsum, lsht, lcc, repobench-p).
    """
    if base_dataset(dataset) in NO_CHAT_TEMPLATE_DATASETS:
        return False
    return bool(getattr(tokenizer, "chat_template", None))


def build_prompt(
    record: dict[str, Any],
    tokenizer: Any,
    max_prompt_tokens: int,
    *,
    dataset: str | None = None,
    chat_template: bool | None = None,
    return_ids: bool = False,
    exact_length: bool = False,
) -> str | list[int]:
    """Model input for one record, built the way ``LongBench/pred.py::get_pred`` builds it.

    1. ``prompt = dataset2prompt[dataset].format(**record)``.
    2. Middle truncation: ``ids = tokenizer.encode(prompt)`` (special tokens added, as LongBench's
       ``tokenizer(prompt)``); if ``len(ids) > max_prompt_tokens``, ``prompt`` becomes
       ``decode(head, skip_special_tokens=True) + decode(tail, skip_special_tokens=True)`` with
       ``head``/``tail`` from :func:`truncate_middle` (⌊n/2⌋ tokens each).
    3. Unless the dataset is in :data:`NO_CHAT_TEMPLATE_DATASETS`, and if the tokenizer has a
       chat template, ``prompt = tokenizer.apply_chat_template([{"role": "user", "content":
       prompt}], tokenize=False, add_generation_prompt=True)`` (LongBench's per-model
       ``build_chat``, generalised to Hugging Face chat templates). ``chat_template=True/False``
       forces this step on or off regardless of dataset and tokenizer.

    Returns the prompt **string** by default. With ``return_ids=True`` returns its token ids
    instead: ``tokenizer.encode(prompt, add_special_tokens=False)`` when the chat template was
    applied (the template already writes BOS and the like), ``tokenizer.encode(prompt)``
    otherwise (as LongBench tokenizes the final prompt). Tokenize a returned string the same
    way; :func:`uses_chat_template` tells which case applies. The truncation budget covers the
    raw prompt only, not the chat-template wrapper -- as in LongBench.
    """
    name = base_dataset(dataset if dataset is not None else record["dataset"])
    prompt = format_prompt(record, name)
    ids = tokenizer.encode(prompt)
    if len(ids) > max_prompt_tokens:
        kept = truncate_middle(ids, max_prompt_tokens, exact_length=exact_length)
        head_len = max_prompt_tokens // 2
        prompt = tokenizer.decode(kept[:head_len], skip_special_tokens=True) + tokenizer.decode(
            kept[head_len:], skip_special_tokens=True
        )
    apply = uses_chat_template(name, tokenizer) if chat_template is None else chat_template
    if apply:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    if not return_ids:
        return prompt
    if apply:
        return list(tokenizer.encode(prompt, add_special_tokens=False))
    return list(tokenizer.encode(prompt))


def generation_kwargs(dataset: str, tokenizer: Any | None = None) -> dict[str, Any]:
    """Greedy-decoding keyword arguments for ``model.generate``, as in ``LongBench/pred.py``.

    ``max_new_tokens = dataset2maxlen[dataset]``, ``do_sample=False``, ``num_beams=1``. For samsum
    LongBench also stops at a newline and forbids an empty answer: ``eos_token_id = [eos, id of
    "\\n"]`` and ``min_new_tokens=1`` (its ``min_length=context_length+1``); that needs
    ``tokenizer``.
    """
    name = base_dataset(dataset)
    kwargs: dict[str, Any] = {
        "max_new_tokens": dataset2maxlen[name],
        "do_sample": False,
        "num_beams": 1,
    }
    if name == "samsum":
        if tokenizer is None:
            raise ValueError("generation_kwargs('samsum') needs the tokenizer (newline stop id)")
        newline_id = tokenizer.encode("\n", add_special_tokens=False)[-1]
        kwargs["min_new_tokens"] = 1
        kwargs["eos_token_id"] = [tokenizer.eos_token_id, newline_id]
    return kwargs


# --------------------------------------------------------------------------- scoring


def score_predictions(
    dataset: str, predictions: Sequence[str], records: Sequence[dict[str, Any]]
) -> float:
    """LongBench score in [0, 100] (2 decimals) of ``predictions[i]`` against ``records[i]``.

    Uses :func:`caote.eval.metrics.scorer` with each record's ``answers``. Like
    ``LongBench/eval.py``, one ``all_classes`` serves the whole dataset: that of the last record.
    """
    name = base_dataset(dataset)
    if len(predictions) != len(records):
        raise ValueError(f"{len(predictions)} predictions for {len(records)} records")
    if not records:
        raise ValueError("no records to score")
    if name not in dataset2metric:  # pragma: no cover - both tables list the same 21 names
        raise KeyError(f"no metric for {name!r}")
    answers = [record["answers"] for record in records]
    return scorer(name, list(predictions), answers, records[-1]["all_classes"])
