"""SQuAD v1.1 dev as long-document QA: whole Wikipedia articles, their own questions, SQuAD's own scoring.

Data: the SQuAD v1.1 development set (Rajpurkar et al., 2016; CC BY-SA 4.0) as BIG-bench ships it in the source
archive of its PyPI package ``bigbench==1.0.0`` (``bigbench/benchmark_tasks/squad_shifts/squaddev_v1.1.json``).
:func:`fetch_squad` (``python scripts/fetch_squad.py``) downloads that archive with pip into a temporary folder,
keeps only this file as ``$CAOTE_CACHE_DIR/squad/dev-v1.1.json`` (default ``~/.cache/caote/squad``) and deletes
the rest. BIG-bench's copy holds the official 48 articles and 10,565 of the official 10,570 questions: BIG-bench
removed gold answers containing a period (and three empty ones) and lists them in ``squaddev_v1.1_removed.json``;
:func:`fetch_squad` puts the 24 non-empty removed answers of the 23 questions still present back, so those
questions are scored against their official gold answers. The 5 questions whose every answer was removed are
absent from the archive (their question text is not in it). The extracted file's SHA-256 is checked
(:data:`BIGBENCH_SQUAD_SHA256`).

Task (:func:`build_prompt`): each article is one document, its paragraphs joined with blank lines (the 48 dev
articles are ~3k to ~20k SmolLM2 tokens). Each question gets its own prompt, in the chat template when the
tokenizer has one: the user turn holds :data:`INSTRUCTION`, the document and ``"Question: <question>"``; the
assistant turn opens with the answer prefix ``"Answer:"``. A prompt longer than ``max_context`` tokens keeps the
document's beginning (truncated from its end); the record says so (``truncated``, ``document_tokens``,
``kept_document_tokens``). The question window of the ``question-aware`` protocol is the prompt from
``"Question:"`` to its end (:func:`caote.eval.runner.question_tokens`).

Which articles and questions (:func:`select_articles`, :func:`pick_questions`), both deterministic:

* articles: those whose chosen questions' prompts all fit in ``max_context`` untruncated, in file order, then
  the others (truncated), in file order; ``articles=N`` takes the first N of that order, ``titles`` names them
  instead. With SmolLM2 (8192-token window, 24 generated tokens) the first six are Normans, Computational
  complexity theory, Teacher, Southern California, Sky (United Kingdom) and Victoria (Australia): 3.5k-6.6k
  prompt tokens;
* questions: ``questions=K`` per article, evenly spaced over the article's questions in file order (index
  ``floor((i + 0.5) * n / K)``), so their evidence lies all along the document rather than in its first
  paragraph.

Scoring (:func:`squad_scores`): the official SQuAD v1.1 evaluation script (``evaluate-v1.1.py``), written from
its definition: answers normalised (:func:`normalize_answer`), exact match and token F1 against every gold
answer, the maximum over them. The prediction scored is the first non-empty line of the generated text
(:func:`extract_answer`; the raw text is kept as ``generation``). Records: ``score`` = F1 and ``em`` in [0, 1].
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import string
import subprocess
import sys
import tarfile
import tempfile
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "ANSWER_PREFIX",
    "INSTRUCTION",
    "SquadArticle",
    "SquadCell",
    "SquadPrompt",
    "SquadQuestion",
    "build_prompt",
    "check_squad_file",
    "default_squad_file",
    "exact_match_score",
    "extract_answer",
    "f1_score",
    "fetch_squad",
    "fit_prompt",
    "load_squad",
    "metric_max_over_ground_truths",
    "normalize_answer",
    "pick_questions",
    "run_squad",
    "select_articles",
    "squad_scores",
]

INSTRUCTION = "Answer the question with a short span from the document."
ANSWER_PREFIX = "Answer:"
QUESTION_MARKER = "Question: "
SQUAD_FILE_NAME = "dev-v1.1.json"
BIGBENCH_VERSION = "1.0.0"
BIGBENCH_SQUAD_MEMBER = "bigbench/benchmark_tasks/squad_shifts/squaddev_v1.1.json"
BIGBENCH_REMOVED_MEMBER = "bigbench/benchmark_tasks/squad_shifts/squaddev_v1.1_removed.json"
BIGBENCH_SQUAD_SHA256 = "45089eff3cf52004b1dca6814cde5c57082fdb09872f18c79a5d944d45be523a"
"""SHA-256 of ``squaddev_v1.1.json`` in ``bigbench-1.0.0.tar.gz`` (as published on PyPI)."""
FETCH_COMMAND = "python scripts/fetch_squad.py"


# ----------------------------------------------------------------------------------------------
# official SQuAD v1.1 metric


def normalize_answer(s: str) -> str:
    """Lower text and remove punctuation, articles and extra whitespace.

    The official SQuAD v1.1 evaluation script (``evaluate-v1.1.py``, rajpurkar.github.io/SQuAD-explorer):
    ``white_space_fix(remove_articles(remove_punc(lower(s))))``, where punctuation is ``string.punctuation``
    (ASCII only), articles are the words ``a``, ``an``, ``the`` (``\\b(a|an|the)\\b`` replaced by a space) and
    whitespace is collapsed with ``" ".join(text.split())``.
    """
    text = s.lower()
    exclude = set(string.punctuation)
    text = "".join(ch for ch in text if ch not in exclude)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def f1_score(prediction: str, ground_truth: str) -> float:
    """Token F1 of two answers after :func:`normalize_answer`, tokens split on whitespace (0 when they share
    none). The official SQuAD v1.1 script's ``f1_score``: precision and recall over the multiset of common
    tokens."""
    prediction_tokens = normalize_answer(prediction).split()
    ground_truth_tokens = normalize_answer(ground_truth).split()
    common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(prediction_tokens)
    recall = num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)


def exact_match_score(prediction: str, ground_truth: str) -> float:
    """1.0 when the answers are equal after :func:`normalize_answer`, else 0.0 (official ``exact_match_score``)."""
    return float(normalize_answer(prediction) == normalize_answer(ground_truth))


def metric_max_over_ground_truths(metric_fn, prediction: str, ground_truths: Sequence[str]) -> float:
    """The best score of ``prediction`` against any gold answer (official ``metric_max_over_ground_truths``)."""
    if not ground_truths:
        raise ValueError("a SQuAD question needs at least one gold answer")
    return max(metric_fn(prediction, ground_truth) for ground_truth in ground_truths)


def squad_scores(prediction: str, ground_truths: Sequence[str]) -> tuple[float, float]:
    """``(f1, exact_match)`` of one prediction, each in [0, 1] (the official script reports 100 x the mean)."""
    return (metric_max_over_ground_truths(f1_score, prediction, ground_truths),
            metric_max_over_ground_truths(exact_match_score, prediction, ground_truths))


def extract_answer(generation: str) -> str:
    """The answer scored: the first non-empty line of the generated text, stripped (the model may go on after
    the span; the official metric scores the prediction as given)."""
    for line in generation.splitlines():
        if line.strip():
            return line.strip()
    return ""


# ----------------------------------------------------------------------------------------------
# data


@dataclass(frozen=True)
class SquadQuestion:
    id: str
    question: str
    answers: tuple[str, ...]
    depth: float
    """Where the first gold answer starts, as a fraction of the document's characters (its paragraph's offset
    plus ``answer_start``)."""


@dataclass(frozen=True)
class SquadArticle:
    title: str
    document: str
    paragraphs: int
    questions: tuple[SquadQuestion, ...]


def default_squad_file() -> Path:
    """``$CAOTE_CACHE_DIR/squad/dev-v1.1.json`` (default ``~/.cache/caote/squad/dev-v1.1.json``)."""
    root = Path(os.environ.get("CAOTE_CACHE_DIR", Path.home() / ".cache" / "caote"))
    return root / "squad" / SQUAD_FILE_NAME


def check_squad_file(path: str | Path | None = None) -> Path:
    """``path`` (default :func:`default_squad_file`) if it is a file, else ``FileNotFoundError`` (one line)."""
    path = Path(path) if path is not None else default_squad_file()
    if not path.is_file():
        raise FileNotFoundError(f"SQuAD dev file {path} not found; run `{FETCH_COMMAND}` to download it "
                                f"(or pass --squad-file)")
    return path


def load_squad(path: str | Path | None = None) -> list[SquadArticle]:
    """The articles of a SQuAD v1.1 JSON file (``{"data": [{"title", "paragraphs": [{"context", "qas"}]}]}``),
    in file order; each article's paragraphs (stripped) joined with blank lines."""
    path = check_squad_file(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    articles = []
    for article in data["data"]:
        parts, questions, offset = [], [], 0
        for paragraph in article["paragraphs"]:
            raw = paragraph["context"]
            context = raw.strip()
            lead = len(raw) - len(raw.lstrip())
            for qa in paragraph["qas"]:
                answers = tuple(a["text"] for a in qa["answers"])
                start = qa["answers"][0].get("answer_start", 0) if qa["answers"] else 0
                start = offset + max(0, min(len(context), int(start) - lead))
                questions.append((qa["id"], qa["question"].strip(), answers, start))
            parts.append(context)
            offset += len(context) + 2
        document = "\n\n".join(parts)
        size = max(len(document), 1)
        articles.append(SquadArticle(
            title=article.get("title", "").strip(), document=document, paragraphs=len(parts),
            questions=tuple(SquadQuestion(i, q, a, round(s / size, 4)) for i, q, a, s in questions)))
    return articles


def pick_questions(article: SquadArticle, k: int | None) -> list[SquadQuestion]:
    """``k`` questions evenly spaced over the article's questions in file order (all of them for ``None``)."""
    qs = list(article.questions)
    if k is None or k >= len(qs):
        return qs
    if k < 1:
        raise ValueError(f"questions per article must be at least 1, got {k}")
    return [qs[math.floor((i + 0.5) * len(qs) / k)] for i in range(k)]


# ----------------------------------------------------------------------------------------------
# prompts


@dataclass(frozen=True)
class SquadPrompt:
    text: str
    ids: list[int]
    question_start: int
    """Character index of ``"Question:"`` in ``text``: the question window runs from there to the end."""
    document_tokens: int
    kept_document_tokens: int
    truncated: bool

    @property
    def prompt_tokens(self) -> int:
        return len(self.ids)


def _prompt_text(tokenizer, document: str, question: str, chat: bool | None, answer_prefix: str = ANSWER_PREFIX) -> str:
    from caote.eval.needle import wrap_chat

    user = f"{INSTRUCTION}\n\n{document}\n\n{QUESTION_MARKER}{question}"
    return wrap_chat(tokenizer, user, answer_prefix, chat=chat)


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def fit_prompt(tokenizer, document: str, render: Callable[[str], str], anchor: str, max_context: int | None = None,
               what: str = "the question") -> SquadPrompt:
    """The prompt ``render(document)``, at most ``max_context`` tokens; ``anchor`` (the question as the prompt holds
    it) starts the question window (its last occurrence).

    When the whole prompt is longer, the document is cut at a token boundary, keeping its beginning, to the
    largest length whose prompt fits; ``ValueError`` naming ``what`` when even an empty document does not fit.
    """
    text = render(document)
    ids = _encode(tokenizer, text)
    doc_ids = _encode(tokenizer, document)
    if max_context is None or len(ids) <= max_context:
        return SquadPrompt(text, ids, text.rindex(anchor), len(doc_ids), len(doc_ids), False)
    overhead = len(_encode(tokenizer, render("")))
    keep = min(len(doc_ids) - 1, max_context - overhead)
    while keep > 0:
        kept = tokenizer.decode(doc_ids[:keep], skip_special_tokens=False).rstrip("\ufffd")
        text = render(kept)
        ids = _encode(tokenizer, text)
        if len(ids) <= max_context:
            return SquadPrompt(text, ids, text.rindex(anchor), len(doc_ids), keep, True)
        keep -= max(1, len(ids) - max_context)
    raise ValueError(f"max context {max_context} tokens cannot hold the prompt of {what} "
                     f"({overhead} tokens without the document)")


def build_prompt(tokenizer, document: str, question: str, max_context: int | None = None,
                 chat: bool | None = None, answer_prefix: str = ANSWER_PREFIX) -> SquadPrompt:
    """The prompt of one question (see the module docstring), at most ``max_context`` tokens: the document is cut
    from its end when the prompt is longer (:func:`fit_prompt`)."""
    return fit_prompt(tokenizer, document, lambda doc: _prompt_text(tokenizer, doc, question, chat, answer_prefix),
                      QUESTION_MARKER + question, max_context, f"question {question!r}")


def select_articles(articles: Sequence[SquadArticle], tokenizer, *, count: int | None = None,
                    titles: Sequence[str] | None = None, questions: int | None = None,
                    max_context: int | None = None, chat: bool | None = None) -> list[SquadArticle]:
    """The articles to run (see the module docstring): ``titles`` in the order given (spaces or underscores;
    unknown ones are an error), or the first ``count`` of: articles whose chosen questions fit in ``max_context``
    untruncated, in file order, then the others, in file order (``count=None``: all of them, in that order)."""
    if titles:
        by_title = {a.title: a for a in articles}
        wanted = [t.strip().replace(" ", "_") for t in titles]
        unknown = [t for t in wanted if t not in by_title]
        if unknown:
            raise ValueError(f"unknown SQuAD article(s) {', '.join(unknown)}; titles: {', '.join(by_title)}")
        return [by_title[t] for t in wanted]
    if count is not None and count < 1:
        raise ValueError(f"articles must be at least 1, got {count}")
    fitting, longer = [], []
    for article in articles:
        if count is not None and len(fitting) >= count:
            break
        if max_context is None:
            fits = True
        else:
            fits = all(not build_prompt(tokenizer, article.document, q.question, max_context, chat).truncated
                       for q in pick_questions(article, questions))
        (fitting if fits else longer).append(article)
    ordered = fitting + longer  # a loop stopped early has ``count`` fitting articles already
    return ordered if count is None else ordered[:count]


# ----------------------------------------------------------------------------------------------
# evaluation


def run_squad(
    model,
    tokenizer,
    *,
    methods: Sequence[str],
    budgets: Sequence[int],
    out: str | Path,
    squad_file: str | Path | None = None,
    articles: int | None = None,
    titles: Sequence[str] | None = None,
    questions_per_article: int | None = 5,
    max_new_tokens: int = 24,
    max_context: int | None = None,
    block_size: int = 128,
    seed: int = 0,
    chat: bool | None = None,
    run_id: str | None = None,
    progress: bool = True,
    model_label: str | None = None,
    options: Mapping | None = None,
    protocol: str = "bounded",
    model_fingerprint: str | None = None,
    data: Sequence[SquadArticle] | None = None,
    executor: Any = None,
) -> dict:
    """SQuAD F1 and exact match of every method x budget over the chosen questions; records go to
    ``<out>/squad.jsonl``, keyed and resumable like every :mod:`caote.eval.runner` evaluation.

    A cell is one (method, budget, question): ``length`` = ``max_context`` (default: the model's window minus
    ``max_new_tokens``), ``task`` = the article's title, ``sample`` = the SQuAD question id. ``protocol`` is
    ``bounded`` or ``question-aware`` (the question window: from ``"Question:"`` to the end of the prompt).
    ``data`` (articles already loaded) replaces ``squad_file``. ``executor`` computes the cells (see
    :func:`caote.eval.runner.run_ppl`).
    """
    from caote.eval import runner

    runner._check_protocol(protocol, runner.GENERATION_PROTOCOLS, "squad")
    runner.set_seed(seed)
    ctx = runner._context(out, model, run_id, progress, block_size=block_size, seed=seed, options=options,
                          max_new_tokens=max_new_tokens, chat=chat, protocol=protocol, model_label=model_label,
                          model_fingerprint=model_fingerprint, tokenizer=tokenizer)
    pairs = runner.method_budgets(methods, budgets)
    runner._check_options(ctx, pairs)
    limit = int(max_context) if max_context is not None else runner.model_window(model) - max_new_tokens
    all_articles = list(data) if data is not None else load_squad(squad_file)
    chosen = select_articles(all_articles, tokenizer, count=articles, titles=titles, questions=questions_per_article,
                             max_context=limit, chat=ctx.settings.chat)
    store = ctx.store("squad")
    cells = []
    for article in chosen:
        qs = pick_questions(article, questions_per_article)
        keys = [(ctx.key("squad", m, b, limit, q.id, task=article.title), m, b, q) for q in qs for m, b in pairs]
        if all(store.done(k) for k, *_ in keys):
            cells.extend(runner.Cell(k) for k, *_ in keys)  # all done: do not even build the prompts
            continue
        prompts = {q.id: build_prompt(tokenizer, article.document, q.question, limit, ctx.settings.chat) for q in qs}
        for key, method, budget, q in keys:
            cells.append(runner.Cell(key, SquadCell(article.title, q, prompts[q.id],
                                                    runner._generation(ctx, method, budget, max_new_tokens))))
    return runner._run_cells(ctx, "squad", cells, "squad", runner._executor(model, tokenizer, executor))


@dataclass(frozen=True)
class SquadCell:
    """A SQuAD cell (a :class:`caote.eval.runner.CellSpec`): the greedy answer to ``question`` about the article
    ``title`` (its ``prompt`` already built), scored with SQuAD's F1 and exact match."""

    title: str
    question: SquadQuestion
    prompt: SquadPrompt
    generation: Any  # caote.eval.runner.Generation

    def compute(self, model, tokenizer) -> dict:
        prompt, q = self.prompt, self.question
        gen = self.generation.answer_prompt(model, tokenizer, prompt)
        raw = gen.pop("prediction")
        answer = extract_answer(raw)
        f1, em = squad_scores(answer, q.answers)
        return {"title": self.title, "question": q.question, "references": list(q.answers),
                "prediction": answer, "generation": raw, "score": f1, "em": em, "depth": q.depth,
                "truncated": prompt.truncated, "document_tokens": prompt.document_tokens,
                "kept_document_tokens": prompt.kept_document_tokens, **gen}


# ----------------------------------------------------------------------------------------------
# download


def _restore_removed(data: dict, removed: Mapping[str, Sequence[str]]) -> int:
    """Put BIG-bench's removed gold answers back into the questions still present (non-empty ones); returns how
    many were restored. ``answer_start`` is the answer's first occurrence in its paragraph (-1 if absent)."""
    restored = 0
    for article in data["data"]:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                for text in removed.get(qa["id"], ()):
                    if text.strip():
                        qa["answers"].append({"answer_start": paragraph["context"].find(text), "text": text})
                        restored += 1
    return restored


def _find_member(root: Path, member: str) -> Path | None:
    hits = sorted(root.glob(f"**/{member}"))
    return hits[0] if hits else None


def fetch_squad(dest: str | Path | None = None, *, python: str | None = None, quiet: bool = False) -> Path:
    """Download ``bigbench==1.0.0``'s source archive from PyPI with pip (no install, no dependencies) into a
    temporary folder, write its SQuAD v1.1 dev file (removed answers restored, see the module docstring) to
    ``dest`` (a folder; default that of :func:`default_squad_file`) as ``dev-v1.1.json``, and delete the rest.
    Returns the file's path.

    pip prepares an sdist's metadata even with ``--no-deps``, and then refuses bigbench's direct-URL dependency
    (``bleurt @ file://...``) and deletes the archive; ``--no-clean`` with pip's temporary folder inside ours
    keeps the unpacked source, from which the two files are read. Should pip keep the archive itself (a pip
    that does not check), the files are read from the archive instead.
    """
    folder = Path(dest) if dest is not None else default_squad_file().parent
    target = folder / SQUAD_FILE_NAME
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    with tempfile.TemporaryDirectory(prefix="caote-squad-") as tmp:
        tmp_path = Path(tmp)
        download, pip_tmp = tmp_path / "download", tmp_path / "pip-tmp"
        download.mkdir()
        pip_tmp.mkdir()
        cmd = [python or sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--no-cache-dir", "--no-clean", f"bigbench=={BIGBENCH_VERSION}", "-d", str(download)]
        env = {**os.environ, "TMPDIR": str(pip_tmp), "TEMP": str(pip_tmp), "TMP": str(pip_tmp)}
        say(f"downloading bigbench=={BIGBENCH_VERSION} (source archive, ~358 MB) with pip into {tmp} ...")
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        texts: dict[str, bytes] = {}
        archives = sorted(download.glob("bigbench-*.tar.gz"))
        if archives:
            with tarfile.open(archives[0], "r:gz") as tar:
                for info in tar:
                    for member in (BIGBENCH_SQUAD_MEMBER, BIGBENCH_REMOVED_MEMBER):
                        if info.isfile() and info.name.endswith("/" + member):
                            texts[member] = tar.extractfile(info).read()
        else:
            for member in (BIGBENCH_SQUAD_MEMBER, BIGBENCH_REMOVED_MEMBER):
                found = _find_member(pip_tmp, member)
                if found is not None:
                    texts[member] = found.read_bytes()
        if BIGBENCH_SQUAD_MEMBER not in texts:
            tail = " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-3:])
            raise RuntimeError(f"could not get {BIGBENCH_SQUAD_MEMBER} from bigbench=={BIGBENCH_VERSION} "
                               f"(pip exit status {proc.returncode}): {tail}")
        raw = texts[BIGBENCH_SQUAD_MEMBER]
        digest = hashlib.sha256(raw).hexdigest()
        if digest != BIGBENCH_SQUAD_SHA256:
            raise RuntimeError(f"{BIGBENCH_SQUAD_MEMBER} has SHA-256 {digest}, expected {BIGBENCH_SQUAD_SHA256}")
        data = json.loads(raw)
        removed = json.loads(texts[BIGBENCH_REMOVED_MEMBER]).get("removed", {}) \
            if BIGBENCH_REMOVED_MEMBER in texts else {}
        restored = _restore_removed(data, removed)
        data["caote_source"] = {
            "package": f"bigbench=={BIGBENCH_VERSION} (PyPI source archive)", "member": BIGBENCH_SQUAD_MEMBER,
            "sha256": digest, "restored_answers": restored,
            "license": "SQuAD v1.1: CC BY-SA 4.0 (Rajpurkar et al., 2016)"}
        folder.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".json.partial")
        partial.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
        partial.replace(target)
        shutil.rmtree(pip_tmp, ignore_errors=True)
    questions = sum(len(p["qas"]) for a in data["data"] for p in a["paragraphs"])
    say(f"wrote {target}: {len(data['data'])} articles, {questions} questions ({restored} removed answers restored)")
    return target
