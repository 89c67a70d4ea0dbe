"""Hand-computed checks of caote.eval.metrics against LongBench's and RULER's definitions.

Every expected value below is worked out by hand in the comment next to it, from the
reference definitions (THUDM/LongBench ``LongBench/metrics.py`` and ``LongBench/eval.py``;
NVIDIA/RULER ``scripts/eval/synthetic/constants.py`` and ``scripts/eval/evaluate.py``).
"""

from __future__ import annotations

import math
import sys

import pytest

from caote.eval import metrics as M

# ----------------------------------------------------------------------------- normalisation


def test_normalize_answer_lower_punct_articles_whitespace():
    # lower -> "the cat, sat!  on a mat." ; no punctuation -> "the cat sat  on a mat"
    # articles -> " cat sat  on   mat" ; whitespace -> "cat sat on mat"
    assert M.normalize_answer("The Cat, sat!  on a mat.") == "cat sat on mat"
    # "an" / "the" only as whole words: "theory" and "banana" survive.
    assert M.normalize_answer("An theory of the banana") == "theory of banana"


def test_normalize_zh_answer_removes_punct_and_all_whitespace():
    assert M.normalize_zh_answer("北京， 是 首都。") == "北京是首都"
    # No article removal in the Chinese normaliser; whitespace is deleted, not collapsed.
    assert M.normalize_zh_answer("The A b!") == "theab"


# ----------------------------------------------------------------------------- F1


def test_qa_f1_score_hand_computed():
    # normalised: "cat sat" vs "cat sat down"; common tokens = 2
    # precision = 2/2 = 1, recall = 2/3, F1 = 2*1*(2/3) / (1 + 2/3) = (4/3)/(5/3) = 0.8
    assert M.qa_f1_score("the cat sat", "a cat sat down") == pytest.approx(0.8)


def test_qa_f1_score_counts_multiset_overlap():
    # "paris paris" vs "paris": common = min(2, 1) = 1; P = 1/2, R = 1/1; F1 = 2*(1/2)/(3/2) = 2/3
    assert M.qa_f1_score("Paris paris", "Paris") == pytest.approx(2 / 3)


def test_qa_f1_score_no_overlap_and_only_articles():
    assert M.qa_f1_score("dog", "cat") == 0.0
    # Both normalise to "" -> no common token -> 0 (LongBench does not special-case empties).
    assert M.qa_f1_score("the", "a") == 0.0


def test_f1_score_on_token_lists():
    # common = {a:1, b:1} -> 2; P = 2/3, R = 2/2; F1 = 2*(2/3)*1/(2/3+1) = (4/3)/(5/3) = 0.8
    assert M.f1_score(["a", "b", "c"], ["a", "b"]) == pytest.approx(0.8)


def test_qa_f1_zh_score_hand_computed():
    # jieba cuts "Hello world" into ["Hello", " ", "world"]; the zh normaliser lower-cases and
    # empties " " (dropped): ["hello", "world"] vs ["hello", "there"] -> common 1, P = R = 1/2,
    # F1 = 0.5
    assert M.qa_f1_zh_score("Hello world", "hello there") == pytest.approx(0.5)
    # Punctuation-only differences vanish.
    assert M.qa_f1_zh_score("北京。", "北京") == pytest.approx(1.0)
    assert M.qa_f1_zh_score("北京", "上海") == 0.0


# ----------------------------------------------------------------------------- ROUGE-L


def test_rouge_score_lcs_by_hand():
    # hyp "police killed the gunman", ref "police kill the gunman"
    # LCS = police, the, gunman = 3 words; m = n = 4 -> R = P = 3/4
    # rouge's F = 2PR / (P + R + 1e-8) = 2*(9/16)/(3/2 + 1e-8) = 0.75 (to 1e-8)
    assert M.rouge_score("police killed the gunman", "police kill the gunman") == pytest.approx(
        0.75, abs=1e-7
    )


def test_rouge_score_counts_distinct_words():
    # The rouge package counts distinct words: hyp "the cat the dog" has n = 3 (the, cat, dog),
    # ref "the cat" has m = 2, LCS = 2 -> R = 1, P = 2/3, F = 2*(2/3)/(5/3) = 0.8
    assert M.rouge_score("the cat the dog", "the cat") == pytest.approx(0.8, abs=1e-7)


def test_rouge_score_matches_rouge_package_and_zero_on_exception():
    import rouge
    pred, ref = "a quick brown fox jumps", "the quick brown dog jumps high"
    direct = rouge.Rouge().get_scores(pred, ref)[0]["rouge-l"]["f"]
    assert M.rouge_score(pred, ref) == pytest.approx(direct, abs=1e-12)
    # rouge raises ValueError on an empty hypothesis / reference; LongBench returns 0.0.
    assert M.rouge_score("", "something") == 0.0
    assert M.rouge_score("something", "") == 0.0
    assert M.rouge_score("...", "a b") == 0.0  # only sentence separators -> no sentence


def test_rouge_zh_score():
    # identical text -> identical segmentation -> F = 2/(2 + 1e-8)
    assert M.rouge_zh_score("我们今天去公园散步", "我们今天去公园散步") == pytest.approx(1.0, abs=1e-7)
    assert M.rouge_zh_score("", "我们") == 0.0


def test_missing_rouge_package_is_an_import_error_not_a_zero(monkeypatch):
    # The bare except of LongBench must not turn "rouge is not installed" into a score of 0.
    monkeypatch.setitem(sys.modules, "rouge", None)
    with pytest.raises(ImportError, match="rouge"):
        M.rouge_score("a b", "a b")


# ----------------------------------------------------------------------------- code


def test_code_sim_score_edit_similarity():
    # "return x + 1" vs "return x + 2": 12 chars each, 11 matching ("return x + ")
    # ratio = 2*11/24 = 0.91666 -> fuzz.ratio rounds to 92 -> 0.92
    assert M.code_sim_score("return x + 1", "return x + 2") == pytest.approx(0.92)
    # "abcd" vs "abxd": matches "ab" + "d" = 3 -> 2*3/8 = 0.75
    assert M.code_sim_score("abcd", "abxd") == pytest.approx(0.75)


def test_code_sim_score_first_non_comment_line():
    gt = "    return total / count"
    # Leading newlines stripped; lines with '#', '//' or '`' skipped; first remaining line used.
    assert M.code_sim_score("\n\n# the mean\n" + gt + "\nprint(1)", gt) == 1.0
    assert M.code_sim_score("```python\n" + gt + "\n```", gt) == 1.0
    assert M.code_sim_score("// c comment\n" + gt, gt) == 1.0
    # Only the first kept line counts: a later exact line does not help.
    assert M.code_sim_score("abcd\n" + gt, "abxd") == pytest.approx(0.75)
    # Every line is a comment -> "" is compared -> fuzz.ratio gives 0 on an empty string.
    assert M.code_sim_score("# a\n# b", gt) == 0.0


# ----------------------------------------------------------------------------- classification

CLASSES = ["Date", "City", "Country", "Other", "Other location"]


def test_classification_score_basic():
    assert M.classification_score("City", "City", all_classes=CLASSES) == 1.0
    # two classes found, truth among them -> 1/2
    assert M.classification_score("City or Country", "City", all_classes=CLASSES) == 0.5
    assert M.classification_score("Date", "City", all_classes=CLASSES) == 0.0
    assert M.classification_score("nothing", "City", all_classes=CLASSES) == 0.0


def test_classification_score_drops_substrings_of_truth():
    # matches = ["Other", "Other location"]; "Other" is a proper substring of the truth -> dropped
    # -> ["Other location"] -> 1/1
    assert M.classification_score("Other location", "Other location", all_classes=CLASSES) == 1.0


def test_classification_score_keeps_reference_list_mutation_quirk():
    # matches = ["a", "ab", "abc"]; the reference removes "a" while iterating, so the loop's
    # next index lands on "abc" and "ab" is never examined -> ["ab", "abc"] -> 1/2 (not 1).
    assert M.classification_score("abc", "abc", all_classes=["a", "ab", "abc"]) == 0.5


# ----------------------------------------------------------------------------- retrieval / count


def test_retrieval_score():
    assert M.retrieval_score("Paragraph 3", "Paragraph 3") == 1.0
    # numbers found: 3, 12 -> one right of two
    assert M.retrieval_score("Paragraph 3 or Paragraph 12", "Paragraph 3") == 0.5
    assert M.retrieval_score("The answer is 30", "Paragraph 3") == 0.0  # "30" != "3"
    assert M.retrieval_score("I do not know", "Paragraph 3") == 0.0


def test_retrieval_zh_score():
    assert M.retrieval_zh_score("段落7", "段落7") == 1.0
    assert M.retrieval_zh_score("段落7和段落8", "段落7") == 0.5
    assert M.retrieval_zh_score("不知道", "段落7") == 0.0


def test_count_score():
    assert M.count_score("3", "3") == 1.0
    # numbers found: 3, 5 -> one right of two
    assert M.count_score("There are 3 unique paragraphs among 5", "3") == 0.5
    assert M.count_score("three", "3") == 0.0
    assert M.count_score("33", "3") == 0.0


# ----------------------------------------------------------------------------- scorer


def test_dataset2metric_covers_longbench():
    assert len(M.dataset2metric) == 21
    assert M.dataset2metric["hotpotqa"] is M.qa_f1_score
    assert M.dataset2metric["triviaqa"] is M.qa_f1_score
    assert M.dataset2metric["gov_report"] is M.rouge_score
    assert M.dataset2metric["samsum"] is M.rouge_score
    assert M.dataset2metric["dureader"] is M.rouge_zh_score
    assert M.dataset2metric["multifieldqa_zh"] is M.qa_f1_zh_score
    assert M.dataset2metric["trec"] is M.classification_score
    assert M.dataset2metric["lsht"] is M.classification_score
    assert M.dataset2metric["passage_count"] is M.count_score
    assert M.dataset2metric["passage_retrieval_en"] is M.retrieval_score
    assert M.dataset2metric["passage_retrieval_zh"] is M.retrieval_zh_score
    assert M.dataset2metric["lcc"] is M.code_sim_score
    assert M.dataset2metric["repobench-p"] is M.code_sim_score
    assert M.FIRST_LINE_DATASETS == {"trec", "triviaqa", "samsum", "lsht"}


def test_scorer_max_over_references():
    # refs "dog" -> 0, "the cat sat" -> F1("cat sat", "cat sat") = 1 -> max 1 -> 100.0
    assert M.scorer("hotpotqa", ["cat sat"], [["dog", "the cat sat"]], None) == 100.0
    # refs "cat sat down" -> 0.8 (see test_qa_f1_score_hand_computed), "cat" -> P=1/2,R=1 -> 2/3
    assert M.scorer("hotpotqa", ["the cat sat"], [["cat", "a cat sat down"]], None) == 80.0
    # no reference -> 0
    assert M.scorer("hotpotqa", ["anything"], [[]], None) == 0.0


def test_scorer_mean_and_rounding():
    # per-sample 1, 0, 0 -> 100 * 1/3 = 33.333.. -> 33.33
    preds, answers = ["x y", "z", "w"], [["x y"], ["u"], ["v"]]
    assert M.scorer("hotpotqa", preds, answers, None) == 33.33
    # 1, 2/3 -> 100 * (5/3)/2 = 83.333.. -> 83.33
    assert M.scorer("hotpotqa", ["paris", "paris paris"], [["paris"], ["paris"]], None) == 83.33


def test_scorer_first_line_rule():
    classes = ["City", "Country"]
    pred = "\n\nCity\nCountry"
    # trec: leading newlines stripped, first line "City" -> only one class matched -> 1.0
    assert M.scorer("trec", [pred], [["City"]], classes) == 100.0
    # triviaqa (first-line dataset): "City" vs "city" -> 1.0
    assert M.scorer("triviaqa", [pred], [["city"]], None) == 100.0
    # hotpotqa keeps the whole prediction: "city country" vs "city": P = 1/2, R = 1 -> 2/3
    assert M.scorer("hotpotqa", [pred], [["city"]], None) == 66.67


def test_scorer_e_length_buckets():
    preds = ["x", "x", "y", "x"]
    answers = [["x"], ["x"], ["x"], ["x"]]
    lengths = [100, 3999, 4000, 9000]
    out = M.scorer_e("hotpotqa", preds, answers, lengths, None)
    # 0-4k: [1, 1] -> 100; 4-8k: [0] -> 0; 8k+: [1] -> 100
    assert out == {"0-4k": 100.0, "4-8k": 0.0, "8k+": 100.0}
    empty = M.scorer_e("hotpotqa", ["x"], [["x"]], [10], None)
    assert empty["0-4k"] == 100.0 and math.isnan(empty["4-8k"]) and math.isnan(empty["8k+"])


# ----------------------------------------------------------------------------- RULER


def test_string_match_all():
    preds = ["The keys are 123 and 456.", "nothing here"]
    refs = [["123", "456", "789"], ["x9"]]
    # sample 1: 2 of 3 refs found -> 2/3; sample 2: 0 -> mean 1/3 -> 33.33
    assert M.string_match_all(preds, refs) == 33.33
    # case-insensitive both ways
    assert M.string_match_all(["ALPHA beta"], [["alpha", "Beta"]]) == 100.0


def test_string_match_part():
    preds = ["It is Paris.", "Rome"]
    refs = [["paris", "london"], ["madrid"]]
    # sample 1: max(1, 0) = 1; sample 2: 0 -> mean 1/2 -> 50.0
    assert M.string_match_part(preds, refs) == 50.0
    # part vs all on the same sample: all = 1/2 -> 50.0, part = 1 -> 100.0
    assert M.string_match_all(["paris"], [["paris", "london"]]) == 50.0
    assert M.string_match_part(["paris"], [["paris", "london"]]) == 100.0


def test_ruler_postprocess_pred():
    assert M.ruler_postprocess_pred("  42\x00\x01 ") == "42"
    assert M.ruler_postprocess_pred("a\tb") == "a\nb"
    assert M.ruler_postprocess_pred("\n answer \n") == "answer"
