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
