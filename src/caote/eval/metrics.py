"""LongBench and RULER scoring, re-implemented to behave exactly like the reference code.

References (THUDM/LongBench, LongBench v1, folder ``LongBench/``):

* ``LongBench/metrics.py`` -- the per-sample metric functions.
* ``LongBench/eval.py`` -- ``dataset2metric``, ``scorer`` and ``scorer_e``.

References (NVIDIA/RULER):

* ``scripts/eval/synthetic/constants.py`` -- ``string_match_all`` and ``string_match_part``.
* ``scripts/eval/evaluate.py`` -- ``postprocess_pred``.

Every per-sample metric takes ``(prediction, ground_truth, **kwargs)`` and returns a score in
``[0, 1]``, as in LongBench; :func:`scorer` turns them into a dataset score in ``[0, 100]``.

Third-party packages (the ones LongBench itself uses), imported lazily so that importing this
module never needs them: ``rouge`` (ROUGE-L), ``fuzzywuzzy`` (edit similarity) and ``jieba``
(Chinese word segmentation). Install them with ``pip install rouge fuzzywuzzy jieba`` (the
``eval`` extra of this package).

Note on ``code_sim_score``: ``fuzzywuzzy.fuzz.ratio`` uses :class:`difflib.SequenceMatcher`
unless ``python-Levenshtein`` is installed, in which case it uses ``Levenshtein.ratio``; the
two can disagree on a few strings. LongBench's requirements do not list
``python-Levenshtein``, so the pure-Python backend is the reference one.
"""

from __future__ import annotations

import math
import re
import string
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = [
    "FIRST_LINE_DATASETS",
    "classification_score",
    "code_sim_score",
    "count_score",
    "dataset2metric",
    "f1_score",
    "normalize_answer",
    "normalize_zh_answer",
    "qa_f1_score",
    "qa_f1_zh_score",
    "retrieval_score",
    "retrieval_zh_score",
    "rouge_score",
    "rouge_zh_score",
    "ruler_postprocess_pred",
    "scorer",
    "scorer_e",
    "string_match_all",
    "string_match_part",
]

Metric = Callable[..., float]

# Chinese punctuation removed by LongBench's ``normalize_zh_answer`` (same characters, same order).
_CN_PUNCTUATION = (
    "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
)
_EN_PUNCTUATION = frozenset(string.punctuation)
_ALL_PUNCTUATION = frozenset(string.punctuation + _CN_PUNCTUATION)


# --------------------------------------------------------------------------- lazy third-party


def _missing(package: str) -> ImportError:
    return ImportError(
        f"caote.eval.metrics needs the {package!r} package for this metric "
        f"(LongBench uses it); install it with: pip install rouge fuzzywuzzy jieba"
    )


def _jieba_cut(text: str) -> list[str]:
    """``list(jieba.cut(text, cut_all=False))``, importing jieba on first use."""
    try:
        import jieba
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise _missing("jieba") from exc
    return list(jieba.cut(text, cut_all=False))


def _fuzz_ratio(a: str, b: str) -> int:
    """``fuzzywuzzy.fuzz.ratio(a, b)`` (an int in 0..100), importing fuzzywuzzy on first use."""
    try:
        with warnings.catch_warnings():
            # fuzzywuzzy warns at import when python-Levenshtein is absent; that is the backend
            # LongBench's requirements give, so the warning is only noise here.
            warnings.filterwarnings("ignore", message=".*SequenceMatcher.*")
            from fuzzywuzzy import fuzz
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise _missing("fuzzywuzzy") from exc
    return fuzz.ratio(a, b)


def _rouge() -> Any:
    try:
        from rouge import Rouge
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise _missing("rouge") from exc
    return Rouge()


# --------------------------------------------------------------------------- normalisation


def normalize_answer(s: str) -> str:
    """Lower-case, drop ASCII punctuation, the articles a/an/the, and extra whitespace.

    Follows ``LongBench/metrics.py::normalize_answer`` (the SQuAD normalisation), applied in the
    order lower -> remove punctuation -> remove articles -> fix whitespace.
    """
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _EN_PUNCTUATION)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def normalize_zh_answer(s: str) -> str:
    """Lower-case, drop ASCII and Chinese punctuation, and remove *all* whitespace.

    Follows ``LongBench/metrics.py::normalize_zh_answer`` (no article removal; whitespace is
    deleted, not collapsed).
    """
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _ALL_PUNCTUATION)
    return "".join(s.split())


# --------------------------------------------------------------------------- per-sample metrics


def count_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """Fraction of the integers in ``prediction`` that equal ``ground_truth`` (0 if none).

    Follows ``LongBench/metrics.py::count_score`` (used for passage_count).
    """
    numbers = re.findall(r"\d+", prediction)
    if not numbers:
        return 0.0
    right = sum(1 for number in numbers if str(number) == str(ground_truth))
    return float(right / len(numbers))


def _id_match_score(prediction: str, ground_truth: str, pattern: str) -> float:
    # The reference indexes matches[0] unguarded: a ground truth without the pattern raises
    # IndexError there, and it does here too.
    ground_truth_id = re.findall(pattern, ground_truth)[0]
    numbers = re.findall(r"\d+", prediction)
    if not numbers:
        return 0.0
    right = sum(1 for number in numbers if str(number) == str(ground_truth_id))
    return float(right / len(numbers))


def retrieval_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """Fraction of integers in ``prediction`` equal to N of ``"Paragraph N"`` in ``ground_truth``.

    Follows ``LongBench/metrics.py::retrieval_score`` (passage_retrieval_en).
    """
    return _id_match_score(prediction, ground_truth, r"Paragraph (\d+)")


def retrieval_zh_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """As :func:`retrieval_score`, with the ground truth pattern ``"段落N"``.

    Follows ``LongBench/metrics.py::retrieval_zh_score`` (passage_retrieval_zh).
    """
    return _id_match_score(prediction, ground_truth, r"段落(\d+)")


def code_sim_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """Edit similarity ``fuzz.ratio / 100`` of the first code line of ``prediction``.

    Follows ``LongBench/metrics.py::code_sim_score`` (lcc, repobench-p): leading newlines are
    stripped, then the first line that contains none of ``` ` ```, ``#`` and ``//`` is kept (the
    empty string if every line contains one), and compared with ``ground_truth``.
    """
    kept = ""
    for line in prediction.lstrip("\n").split("\n"):
        if "`" not in line and "#" not in line and "//" not in line:
            kept = line
            break
    return _fuzz_ratio(kept, ground_truth) / 100


def classification_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """``1 / #matched classes`` if the true class is among the class names found in the prediction.

    Follows ``LongBench/metrics.py::classification_score`` (trec, lsht); ``all_classes`` must be
    passed as a keyword. Every class name that occurs as a substring of ``prediction`` is a match;
    matches that are a proper substring of ``ground_truth`` are then dropped. The reference drops
    them with ``list.remove`` *while iterating over the same list*, which skips the element after
    each removal; that quirk is kept on purpose so scores are identical (e.g. classes
    ``["a", "ab", "abc"]``, truth ``"abc"``, prediction ``"abc"`` scores 0.5, not 1.0).
    """
    all_classes: Sequence[str] = kwargs["all_classes"]
    em_match_list = [name for name in all_classes if name in prediction]
    for match_term in em_match_list:  # mutated inside the loop, exactly as the reference does
        if match_term in ground_truth and match_term != ground_truth:
            em_match_list.remove(match_term)
    if ground_truth in em_match_list:
        return 1.0 / len(em_match_list)
    return 0.0


def rouge_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """ROUGE-L F from the ``rouge`` package, or 0.0 when it raises.

    Follows ``LongBench/metrics.py::rouge_score``: ``Rouge().get_scores([prediction],
    [ground_truth], avg=True)["rouge-l"]["f"]`` (for one pair the same value as
    ``get_scores(prediction, ground_truth)[0]["rouge-l"]["f"]``). The package splits sentences on
    ``"."`` and words on whitespace, is case-sensitive, counts *distinct* words, and raises on an
    empty hypothesis/reference (or recursion depth on very long texts); the reference catches
    every exception with a bare ``except`` and returns 0.0 -- here ``except Exception``.
    """
    try:
        scores = _rouge().get_scores([prediction], [ground_truth], avg=True)
    except ImportError:
        raise
    except Exception:
        return 0.0
    return scores["rouge-l"]["f"]


def rouge_zh_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """:func:`rouge_score` after jieba word segmentation (words joined by spaces).

    Follows ``LongBench/metrics.py::rouge_zh_score`` (dureader, vcsum).
    """
    prediction = " ".join(_jieba_cut(prediction))
    ground_truth = " ".join(_jieba_cut(ground_truth))
    return rouge_score(prediction, ground_truth)


def f1_score(prediction: Sequence[str], ground_truth: Sequence[str], **kwargs: Any) -> float:
    """Bag-of-tokens F1 of two token lists (0 when they share no token).

    Follows ``LongBench/metrics.py::f1_score``.
    """
    common = Counter(prediction) & Counter(ground_truth)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = 1.0 * num_same / len(prediction)
    recall = 1.0 * num_same / len(ground_truth)
    return (2 * precision * recall) / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """Token F1 after :func:`normalize_answer`, tokens split on whitespace.

    Follows ``LongBench/metrics.py::qa_f1_score`` (the English QA datasets and triviaqa).
    """
    prediction_tokens = normalize_answer(prediction).split()
    ground_truth_tokens = normalize_answer(ground_truth).split()
    return f1_score(prediction_tokens, ground_truth_tokens)


def qa_f1_zh_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """Token F1 over jieba words, each passed through :func:`normalize_zh_answer`, empties dropped.

    Follows ``LongBench/metrics.py::qa_f1_zh_score`` (multifieldqa_zh).
    """
    prediction_tokens = [normalize_zh_answer(t) for t in _jieba_cut(prediction)]
    ground_truth_tokens = [normalize_zh_answer(t) for t in _jieba_cut(ground_truth)]
    prediction_tokens = [t for t in prediction_tokens if len(t) > 0]
    ground_truth_tokens = [t for t in ground_truth_tokens if len(t) > 0]
    return f1_score(prediction_tokens, ground_truth_tokens)


# --------------------------------------------------------------------------- dataset scoring

#: Metric of each LongBench dataset (``LongBench/eval.py::dataset2metric``).
dataset2metric: dict[str, Metric] = {
    "narrativeqa": qa_f1_score,
    "qasper": qa_f1_score,
    "multifieldqa_en": qa_f1_score,
    "multifieldqa_zh": qa_f1_zh_score,
    "hotpotqa": qa_f1_score,
    "2wikimqa": qa_f1_score,
    "musique": qa_f1_score,
    "dureader": rouge_zh_score,
    "gov_report": rouge_score,
    "qmsum": rouge_score,
    "multi_news": rouge_score,
    "vcsum": rouge_zh_score,
    "trec": classification_score,
    "triviaqa": qa_f1_score,
    "samsum": rouge_score,
    "lsht": classification_score,
    "passage_retrieval_en": retrieval_score,
    "passage_count": count_score,
    "passage_retrieval_zh": retrieval_zh_score,
    "lcc": code_sim_score,
    "repobench-p": code_sim_score,
}

#: Few-shot datasets whose prediction is cut to its first line before scoring
#: (``LongBench/eval.py::scorer``).
FIRST_LINE_DATASETS: frozenset[str] = frozenset({"trec", "triviaqa", "samsum", "lsht"})


def _sample_score(
    dataset: str, prediction: str, ground_truths: Sequence[str], all_classes: Sequence[str] | None
) -> float:
    """Best score of one prediction over its references, as in the loop body of ``scorer``."""
    if dataset in FIRST_LINE_DATASETS:
        prediction = prediction.lstrip("\n").split("\n")[0]
    metric = dataset2metric[dataset]
    score = 0.0
    for ground_truth in ground_truths:
        score = max(score, metric(prediction, ground_truth, all_classes=all_classes))
    return score


def scorer(
    dataset: str,
    predictions: Sequence[str],
    answers: Sequence[Sequence[str]],
    all_classes: Sequence[str] | None,
) -> float:
    """LongBench dataset score in [0, 100], rounded to 2 decimals.

    Follows ``LongBench/eval.py::scorer``: for trec/triviaqa/samsum/lsht the prediction is first
    cut to its first line (after stripping leading newlines); each sample scores the maximum of
    ``dataset2metric[dataset]`` over its reference answers (0 if it has none); the dataset score is
    ``round(100 * mean, 2)``. ``dataset`` is the plain LongBench name (``"hotpotqa"``, not
    ``"hotpotqa_e"``). ``all_classes`` is one list for the whole dataset (``None`` outside trec and
    lsht). Like the reference, an empty ``predictions`` raises :class:`ZeroDivisionError`.
    """
    total = 0.0
    for prediction, ground_truths in zip(predictions, answers):
        total += _sample_score(dataset, prediction, ground_truths, all_classes)
    return round(100 * total / len(predictions), 2)


def scorer_e(
    dataset: str,
    predictions: Sequence[str],
    answers: Sequence[Sequence[str]],
    lengths: Sequence[int],
    all_classes: Sequence[str] | None,
) -> dict[str, float]:
    """LongBench-E score per length bucket ``0-4k`` / ``4-8k`` / ``8k+`` (by ``length`` field).

    Follows ``LongBench/eval.py::scorer_e`` (``length < 4000``, ``< 8000``, else); a bucket with
    no sample is ``nan`` (the reference's ``np.mean([])``, here without its RuntimeWarning).
    """
    buckets: dict[str, list[float]] = {"0-4k": [], "4-8k": [], "8k+": []}
    for prediction, ground_truths, length in zip(predictions, answers, lengths):
        score = _sample_score(dataset, prediction, ground_truths, all_classes)
        if length < 4000:
            buckets["0-4k"].append(score)
        elif length < 8000:
            buckets["4-8k"].append(score)
        else:
            buckets["8k+"].append(score)
    # np.mean (pairwise summation) as in the reference, so rounding matches to the last bit.
    return {
        key: (float(round(100 * np.mean(vals), 2)) if vals else math.nan)
        for key, vals in buckets.items()
    }


# --------------------------------------------------------------------------- RULER


def string_match_all(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """RULER score: per sample, the fraction of references contained in the prediction.

    Follows RULER ``scripts/eval/synthetic/constants.py::string_match_all`` (NIAH, variable
    tracking, common/frequent words extraction): case-insensitive substring test, mean over the
    references of a sample, mean over samples, ``round(100 * ., 2)``.
    """
    total = sum(
        sum(1.0 if r.lower() in pred.lower() else 0.0 for r in ref) / len(ref)
        for pred, ref in zip(preds, refs)
    )
    return round(total / len(preds) * 100, 2)


def string_match_part(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """RULER score: per sample, 1 if *any* reference is contained in the prediction.

    Follows RULER ``scripts/eval/synthetic/constants.py::string_match_part`` (the QA tasks):
    case-insensitive substring test, max over references, mean over samples, ``round(100*., 2)``.
    """
    total = sum(
        max(1.0 if r.lower() in pred.lower() else 0.0 for r in ref)
        for pred, ref in zip(preds, refs)
    )
    return round(total / len(preds) * 100, 2)


_CONTROL_CHARS = re.compile(r"[\x00-\x1f]")


def ruler_postprocess_pred(predict_str: str) -> str:
    """Strip, replace control characters (``\\x00``-``\\x1f``, newlines included) by newlines, strip.

    Follows RULER ``scripts/eval/evaluate.py::postprocess_pred``, applied to every prediction
    before :func:`string_match_all` / :func:`string_match_part`.
    """
    return _CONTROL_CHARS.sub("\n", predict_str.strip()).strip()
