import math

from caote.eval.report import _caote_effect_section


def _rec(method, budget, ppl):
    return {"length": 100, "method": method, "budget": budget, "nll": math.log(ppl), "tokens": 1, "sample": "s"}


def test_caote_effect_is_the_relative_change_of_the_gap():
    records = [_rec("full", None, 10.0), _rec("h2o", 64, 12.0), _rec("h2o+caote", 64, 11.0),
               _rec("h2o+fastcaote", 64, 13.0)]
    text = "\n".join(_caote_effect_section(records))
    assert "| 100 | 64 | +50.0% | -50.0% |" in text  # gap 2 -> 1 and 2 -> 3
    assert "`+caote` shrinks the gap in 1 of 1 cells." in text
    assert "`+fastcaote` shrinks the gap in 0 of 1 cells." in text
    assert "smaller gap than `+caote` in 0 of 1 cells" in text


def test_per_window_effect_counts_each_window_separately():
    from caote.eval.report import _per_window_effect

    def rec(sample, method, budget, ppl):
        return dict(_rec(method, budget, ppl), sample=sample)

    records = [rec("a", "h2o", 64, 12.0), rec("a", "h2o+caote", 64, 11.0),   # better in window a
               rec("b", "h2o", 64, 12.0), rec("b", "h2o+caote", 64, 13.0),   # worse in window b
               rec("a", "tova", 64, 12.0), rec("a", "tova+caote", 64, 11.0),  # better
               rec("a", "h2o", 128, 12.0), rec("a", "h2o+fastcaote", 128, 11.5)]
    text = "\n".join(_per_window_effect(records))
    assert "`+caote` has the lower perplexity than its base in: b=64 2 of 3." in text
    assert "`+fastcaote` has the lower perplexity than its base in: b=128 1 of 1." in text


def _needle(method, budget, depth, prediction, expected="6112099", length=100):
    return {"length": length, "method": method, "budget": budget, "sample": depth, "expected": expected,
            "prediction": prediction, "score": float(expected in prediction)}


def test_needle_section_reports_recall_and_partial_credit():
    from caote.eval.report import _niah_section

    records = [_needle("full", None, 0.25, " 6112099."), _needle("full", None, 0.75, " 6112099."),
               _needle("h2o", 64, 0.25, " 61."), _needle("h2o", 64, 0.75, " 1.")]
    text = "\n".join(_niah_section(records))
    recall, partial = text.split("Partial credit")
    assert "| full | 1.000 |" in recall and "| h2o | 0.000 |" in recall
    assert "| full | 1.000 |" in partial
    assert f"| h2o | {(2 / 7 + 0) / 2:.3f} |" in partial  # "61" of 6112099 at one depth, nothing at the other


def test_task_effect_counts_better_same_worse_per_cell():
    from caote.eval.report import _score_effect_section

    def rec(method, budget, task, score):
        return {"length": 100, "method": method, "budget": budget, "task": task, "sample": 0, "score": score}

    records = [rec("h2o", 64, "a", 0.5), rec("h2o+caote", 64, "a", 1.0),   # better
               rec("h2o", 64, "b", 0.5), rec("h2o+caote", 64, "b", 0.5),   # same
               rec("h2o", 128, "a", 1.0), rec("h2o+caote", 128, "a", 0.0),  # worse
               rec("h2o+fastcaote", 64, "a", 0.0)]                          # worse; no base for others
    text = "\n".join(_score_effect_section(records))
    assert "| h2o+caote | 1 | 1 | 1 |" in text
    assert "| h2o+fastcaote | 0 | 0 | 1 |" in text
    assert "tova+caote" not in text


def test_means_over_lengths_use_only_lengths_with_every_cell():
    from caote.eval.report import _common_lengths

    def rec(length, method, budget):
        return {"length": length, "method": method, "budget": budget, "task": "t", "sample": 0, "score": 1.0}

    complete = [rec(100, "full", None), rec(100, "h2o", 64), rec(100, "h2o", 128)]
    partial = [rec(200, "full", None), rec(200, "h2o", 128)]  # budget 64 not run at 200
    kept, label = _common_lengths(complete + partial)
    assert kept == complete and label == "mean over 100 tokens"
    kept, label = _common_lengths(partial + [rec(300, "h2o", 64)])  # no length has both budgets and full
    assert len(kept) == 3 and "each cell has" in label
    other_task = dict(rec(100, "h2o", 64), task="u")  # a task run at length 100 only
    kept, label = _common_lengths(complete + [rec(200, "full", None), rec(200, "h2o", 64), rec(200, "h2o", 128),
                                              other_task])
    assert kept == complete + [other_task] and label == "mean over 100 tokens"


def test_survival_counts_evicting_cells_above_zero():
    from caote.eval.report import _survival_section

    def rec(length, method, budget, score, sample=0):
        return {"length": length, "method": method, "budget": budget, "task": "t", "sample": sample, "score": score}

    records = [rec(100, "full", None, 1.0),                                  # full is not an evicting cell
               rec(100, "h2o", 64, 0.0), rec(100, "h2o", 64, 0.5, sample=1),  # mean 0.25 > 0
               rec(100, "tova", 64, 0.0), rec(200, "h2o", 64, 0.0)]
    text = "\n".join(_survival_section(records, ["t"]))
    assert "| t | 1 of 2 at 100, 0 of 1 at 200 |" in text
