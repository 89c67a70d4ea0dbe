"""Your own data in ``caote eval``: perplexity on your text (``ppl --text-file``), the needle hidden in your text
(``niah --haystack-file``) and a question-answering task from your JSON lines (``tasks --jsonl``).

Files are read and checked by :mod:`caote.validation` (:func:`~caote.validation.read_data_file`,
:func:`~caote.validation.read_qa_jsonl`): a missing file, a folder, an empty file, a file that is not UTF-8, a line
that is not JSON or a record that misses a field or has one of the wrong type is one line naming the file (and the
line). Whether a text is long enough for the lengths asked needs the tokenizer (:func:`check_ppl_text`,
:func:`check_haystack`); the command line checks it with the tokenizer alone, before the model loads.

Every cell computed on a file has the file in its key: the ``data`` setting (:attr:`caote.validation.DataFile.key`,
the file's name and the sha256 of its bytes), so an edited file computes new cells and ``caote report`` never pools
records of two files (nor of a file and the built-in data). Records also carry the path given (``data_file``).

* ``ppl``: the windows of the books path (:func:`caote.eval.runner.text_windows`): the text's first ``length``
  tokens, then its next ``length`` tokens, and so on, one per sample (sample ids ``"<file name>@<token offset>"``),
  with ``length + 512`` tokens for the ``continuation`` and ``compress-once`` protocols. A text with fewer tokens
  than ``samples`` such windows of the longest length is refused, with its token count.
* ``niah``: the needle grid of the built-in haystack (:func:`caote.eval.needle.make_needle_samples`) with the
  file's text as haystack. The haystack is never repeated: a text with fewer tokens than the longest length is
  refused.
* ``tasks``: one task, ``jsonl/<file name>``, one cell per (method, budget, length, record): the first
  ``samples`` records, sample id = the record's line in the file. Records with ``answers`` are laid out as SQuAD's
  (:func:`caote.eval.squad.build_prompt`: instruction, context, ``"Question: ..."``, answer prefix ``"Answer:"``
  unless the record gives ``answer_prefix``); kvpress records (``answer``) as kvpress lays them out: context then
  question in the user turn, ``answer_prefix`` (default empty) opening the reply. ``length`` caps the prompt: a
  longer prompt keeps its context's beginning, cut from its end (SQuAD's truncation; the record says so:
  ``truncated``, ``document_tokens``, ``kept_document_tokens``); a shorter one is used whole. The generation length
  is the record's ``max_new_tokens`` or :data:`DEFAULT_QA_NEW_TOKENS`, capped by ``max_new_tokens``. Scored with
  SQuAD's official token F1 (``score``) and exact match (``em``) of the answer's first non-empty line against the
  best of the answers (:func:`caote.eval.squad.squad_scores`); ``match`` is RULER's ``string_match_part`` on the
  whole generation (any answer contained in it), recorded beside them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from caote.validation import (
    DataFile,
    QAFile,
    QARecord,
    check_data_tokens,
    read_data_file,
    read_qa_jsonl,
    spelled_like,
)

DataArg = str | os.PathLike | DataFile
QAArg = str | os.PathLike | QAFile

DEFAULT_QA_NEW_TOKENS = 32
"""Generation length of a JSON-lines record without its own ``max_new_tokens``."""
QA_METRIC = "squad_f1"
"""The ``metric`` of JSON-lines records: SQuAD's token F1 (``score``), exact match in ``em``."""
QA_TASK_PREFIX = "jsonl/"
TEXT_WANTED = "the text to evaluate on"


# ----------------------------------------------------------------------------------------------
# files


def text_data(value: DataArg, name: str) -> DataFile:
    """``value`` (a path, or a :class:`~caote.validation.DataFile` already read) read and checked."""
    return value if isinstance(value, DataFile) else read_data_file(value, name, wanted=TEXT_WANTED)


def qa_data(value: QAArg, name: str) -> QAFile:
    """``value`` (a path, or a :class:`~caote.validation.QAFile` already read) read and checked."""
    return value if isinstance(value, QAFile) else read_qa_jsonl(value, name)


def token_count(tokenizer, text: str, enough: int | None = None) -> int:
    """Tokens of ``text`` as the evaluations feed it (no special tokens added). With ``enough``, counted on growing
    character prefixes as :func:`caote.eval.runner.text_windows` reads a text, and returned once a prefix holds more
    than ``enough`` (a long file is not tokenised whole); a text with fewer gets its whole count."""
    if enough is None:
        return len(tokenizer.encode(text, add_special_tokens=False))
    n_chars = max(4096, 8 * enough)
    while True:
        count = len(tokenizer.encode(text[:n_chars], add_special_tokens=False))
        if count > enough or n_chars >= len(text):
            return count
        n_chars *= 2


def check_ppl_text(tokenizer, data: DataFile, lengths: Sequence[int], samples: int, extra: int, name: str) -> None:
    """Refuse a text too short for ``samples`` windows of the longest length (plus ``extra`` continuation tokens):
    one line with its token count and what asked for more (``name``: the flag or parameter of the file; the others
    are spelt alike)."""
    if not lengths:
        return
    longest = max(int(n) for n in lengths)
    window = longest + extra
    plus = f" + {extra}" if extra else ""
    lengths_name, samples_name = spelled_like(name, "lengths"), spelled_like(name, "samples")
    asked = (f"{samples} window{'s' if samples > 1 else ''} of {longest:,}{plus} tokens need "
             f"({samples_name} {samples}, {lengths_name} {longest})")
    fix = f"give a longer text, or lower {lengths_name} or {samples_name}"
    need = samples * window
    check_data_tokens(data, token_count(tokenizer, data.text, need), need, name, asked, fix)


def check_haystack(tokenizer, data: DataFile, lengths: Sequence[int], name: str) -> None:
    """Refuse a haystack with fewer tokens than the longest prompt length (it is never repeated)."""
    if not lengths:
        return
    longest = max(int(n) for n in lengths)
    lengths_name = spelled_like(name, "lengths")
    check_data_tokens(data, token_count(tokenizer, data.text, longest), longest, name,
                      f"a prompt of {lengths_name} {longest} needs (the haystack is never repeated)",
                      f"give a longer text or lower {lengths_name}")


# ----------------------------------------------------------------------------------------------
# question answering from JSON lines


def qa_task(data: DataFile) -> str:
    """The task name of a JSON-lines file's cells: ``jsonl/<file name>``."""
    return QA_TASK_PREFIX + data.name


def qa_prompt(tokenizer, record: QARecord, max_context: int, chat: bool | None, where: str = ""):
    """The prompt of ``record`` (SQuAD's layout for ``answers`` records, kvpress's for ``answer`` records), at most
    ``max_context`` tokens: a longer one keeps the context's beginning (:func:`caote.eval.squad.fit_prompt`). A
    ``max_context`` too small for the prompt without its context is a ``ValueError`` starting with ``where``."""
    from caote.eval import squad
    from caote.eval.needle import wrap_chat

    try:
        if record.schema == "kvpress":
            prefix = record.answer_prefix or ""
            return squad.fit_prompt(tokenizer, record.context,
                                    lambda context: wrap_chat(tokenizer, context + record.question, prefix, chat=chat),
                                    record.question.strip(), max_context)
        prefix = squad.ANSWER_PREFIX if record.answer_prefix is None else record.answer_prefix
        return squad.build_prompt(tokenizer, record.context, record.question.strip(), max_context, chat,
                                  answer_prefix=prefix)
    except ValueError as problem:
        raise ValueError(f"{where}line {record.line}: {problem}") from None


def qa_generation_length(record: QARecord, cap: int | None) -> int:
    """Tokens generated for ``record``: its own ``max_new_tokens`` or :data:`DEFAULT_QA_NEW_TOKENS`, at most
    ``cap``."""
    own = record.max_new_tokens or DEFAULT_QA_NEW_TOKENS
    return own if cap is None else min(own, cap)


def score_qa(generation: str, answers: Sequence[str]) -> dict:
    """``prediction`` (the generation's first non-empty line), ``score`` (SQuAD F1) and ``em`` (exact match)
    against the best of ``answers``, and ``match`` (RULER's ``string_match_part`` on the whole generation)."""
    from caote.eval.metrics import ruler_postprocess_pred, string_match_part
    from caote.eval.squad import extract_answer, squad_scores

    prediction = extract_answer(generation)
    f1, em = squad_scores(prediction, list(answers))
    match = string_match_part([ruler_postprocess_pred(generation)], [list(answers)]) / 100
    return {"prediction": prediction, "score": f1, "em": em, "match": match}


@dataclass(frozen=True)
class QACell:
    """A cell of your JSON-lines task (a :class:`caote.eval.runner.CellSpec`): the greedy answer to ``record`` (its
    ``prompt`` already built), scored with :func:`score_qa`; ``data_file`` is the path given."""

    record: QARecord
    prompt: Any  # caote.eval.squad.SquadPrompt
    data_file: str
    generation: Any  # caote.eval.runner.Generation

    def compute(self, model, tokenizer) -> dict:
        prompt, record = self.prompt, self.record
        gen = self.generation.answer_prompt(model, tokenizer, prompt)
        generation = gen.pop("prediction")
        return {"suite": "jsonl", "metric": QA_METRIC, "data_file": self.data_file,
                "line": record.line, "schema": record.schema, "question": record.question,
                "references": list(record.answers), **score_qa(generation, record.answers),
                "generation": generation, "truncated": prompt.truncated,
                "document_tokens": prompt.document_tokens,
                "kept_document_tokens": prompt.kept_document_tokens, **gen}


def qa_cells(ctx, tokenizer, pairs, qa: QAFile, lengths: Sequence[int], samples: int,
             max_new_cap: int | None, store) -> list:
    """The cells of a JSON-lines task (see the module docstring) for :func:`caote.eval.runner.run_tasks`, keyed
    with the file (``ctx`` with its ``data``)."""
    from caote.eval import runner

    ctx = ctx.with_data(qa.data.key)
    task = qa_task(qa.data)
    cells = []
    for length in lengths:
        length = int(length)
        for record in qa.records[:samples]:
            keys = [(ctx.key("tasks", m, b, length, record.line, task=task), m, b) for m, b in pairs]
            if all(store.done(k) for k, *_ in keys):
                cells.extend(runner.Cell(k) for k, *_ in keys)  # all done: do not even build the prompt
                continue
            prompt = qa_prompt(tokenizer, record, length, ctx.settings.chat, f"{qa.data.path} ")
            gen_len = qa_generation_length(record, max_new_cap)
            for key, method, budget in keys:
                cells.append(runner.Cell(key, QACell(record, prompt, str(qa.data.path),
                                                     runner._generation(ctx, method, budget, gen_len))))
    return cells


__all__ = [
    "DEFAULT_QA_NEW_TOKENS",
    "QA_METRIC",
    "QACell",
    "check_haystack",
    "check_ppl_text",
    "qa_cells",
    "qa_data",
    "qa_generation_length",
    "qa_prompt",
    "qa_task",
    "score_qa",
    "text_data",
    "token_count",
]
