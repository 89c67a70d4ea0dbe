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


# ----------------------------------------------------------------------------------------------
# settings: never pool records that differ in one


def _keyed(method, budget, ppl, sample="s", **settings):
    """A ppl record as the runner writes it: every setting of the key."""
    from caote.eval.runner import SETTING_FIELDS

    base = {"model": "m", "model_fingerprint": "files:0", "dtype": "float32", "device": "cpu", "protocol": "bounded",
            "block_size": 128, "options": {}, "max_new_tokens": None, "seed": 0, "chat": None, "data": None,
            "caote_version": "0.1.0"}
    assert set(base) == set(SETTING_FIELDS)
    return {"eval": "ppl", **base, **settings, "method": method, "budget": budget, "length": 100, "task": None,
            "sample": sample, "nll": math.log(ppl), "tokens": 1}


def _write(path, records):
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_report_never_pools_records_that_differ_in_a_setting(tmp_path):
    from caote.eval.report import write_report

    records = [_keyed("full", None, 10.0), _keyed("h2o", 64, 12.0),
               _keyed("full", None, 20.0, block_size=64), _keyed("h2o", 64, 30.0, block_size=64)]
    _write(tmp_path / "ppl.jsonl", records)
    result = write_report(tmp_path)
    md = (tmp_path / "results.md").read_text()
    assert "`ppl.jsonl` holds 2 combinations of settings, reported separately (never pooled): " \
           "[block_size=128] 2 records; [block_size=64] 2 records." in md
    assert "## Perplexity under eviction (Austen novels) [block_size=128]" in md
    assert "## Perplexity under eviction (Austen novels) [block_size=64]" in md
    assert "#### length 100 tokens — perplexity (1 sample) [block_size=64]" in md
    assert "| full [block_size=128] | 10.000 |" in md and "| h2o [block_size=128] | 12.000 |" in md
    assert "| full [block_size=64] | 20.000 |" in md and "| h2o [block_size=64] | 30.000 |" in md
    assert f"{math.sqrt(10.0 * 20.0):.3f}" not in md and f"{math.sqrt(12.0 * 30.0):.3f}" not in md  # pooled values
    assert "| h2o [block_size=64] | 10.000 |" in md  # the gap to its own full cache (30 - 20)
    assert {p.name for p in result["plots"]} == {"ppl_gap_block_size-128.png", "ppl_gap_block_size-64.png"}


def test_report_names_every_setting_that_differs():
    from caote.eval.report import settings_groups

    records = [_keyed("h2o", 64, 12.0), _keyed("h2o", 64, 12.0, seed=1, options={"sink_tokens": 4}),
               _keyed("h2o", 64, 12.0, dtype="bfloat16")]
    labels = [label for label, _ in settings_groups(records)]
    assert labels == ["dtype=float32, options(default), seed=0", "dtype=float32, options(sink_tokens=4), seed=1",
                      "dtype=bfloat16, options(default), seed=0"]
    for name, value in (("model_fingerprint", "files:1"), ("device", "cuda"), ("protocol", "compress-once"),
                        ("max_new_tokens", 8), ("chat", False), ("caote_version", "0.2.0"), ("model", "other"),
                        ("data", "notes.txt sha256:0123456789abcdef")):
        (_, a), (label, b) = settings_groups([_keyed("h2o", 64, 12.0), _keyed("h2o", 64, 12.0, **{name: value})])
        assert label == f"{name}={value}" and len(a) == len(b) == 1
    assert settings_groups([_keyed("h2o", 64, 12.0), _keyed("tova", 64, 12.0)])[0][0] == ""  # one combination


def test_built_in_data_is_labelled_and_left_out_of_plot_names():
    """Records on the built-in texts beside records on a user's file: the built-in group is labelled as such and
    keeps the plot names it had before the file's records came (as default options do)."""
    from caote.eval.report import _slug, settings_groups

    groups = settings_groups([_keyed("h2o", 64, 12.0), _keyed("h2o", 64, 12.0, data="emma.txt sha256:0123")])
    assert [label for label, _ in groups] == ["data=built-in", "data=emma.txt sha256:0123"]
    assert [_slug(label) for label, _ in groups] == ["", "_data-emma.txt-sha256-0123"]
    assert _slug("block_size=128, options(default), data=built-in") == "_block_size-128"


def test_report_separates_legacy_records_by_their_runs_settings(tmp_path):
    """Records without settings get them from runs.jsonl: two runs with different seeds stay apart."""
    import json

    from caote.eval.report import write_report

    def legacy(method, budget, ppl, run_id):
        return {"eval": "ppl", "model": "SmolLM2-135M-Instruct", "block_size": 128, "method": method,
                "budget": budget, "length": 100, "task": None, "sample": "s", "nll": math.log(ppl), "tokens": 1,
                "run_id": run_id}

    runs = [{"run_id": rid, "settings": {"model": None, "seed": seed, "dtype": "float32", "block_size": 128},
             "versions": {"caote": "0.1.0"}, "argv": ["caote", "eval", "ppl"]} for rid, seed in (("a", 0), ("b", 7))]
    (tmp_path / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in runs))
    _write(tmp_path / "ppl.jsonl", [legacy("full", None, 10.0, "a"), legacy("h2o", 64, 12.0, "a"),
                                    legacy("full", None, 20.0, "b"), legacy("h2o", 64, 30.0, "b")])
    write_report(tmp_path)
    md = (tmp_path / "results.md").read_text()
    assert "| full [seed=0] | 10.000 |" in md and "| h2o [seed=0] | 12.000 |" in md
    assert "| full [seed=7] | 20.000 |" in md and "| h2o [seed=7] | 30.000 |" in md


def test_unknown_methods_follow_the_paper_methods_grouped_by_base(tmp_path):
    from caote.eval.report import METHOD_ORDER, method_sort_key, write_report

    unknown = ["zeta", "dropkv", "snapkv+caote+out", "expected+caote", "caote+out", "expected", "h2o+caote+out"]
    ordered = sorted(list(METHOD_ORDER) + unknown, key=method_sort_key)
    assert ordered == list(METHOD_ORDER) + ["caote+out", "h2o+caote+out", "snapkv+caote+out", "dropkv", "expected",
                                            "expected+caote", "zeta"]
    records = [_keyed("full", None, 10.0)] + [_keyed(m, 64, 11.0 + i) for i, m in enumerate(["h2o"] + unknown)]
    _write(tmp_path / "ppl.jsonl", records)
    write_report(tmp_path)
    md = (tmp_path / "results.md").read_text()
    table = md[md.index("perplexity (1 sample)"):md.index("Missing cells")]
    rows = [line.split(" | ")[0].lstrip("| ") for line in table.splitlines() if line.startswith("| ")][1:]
    assert [r for r in rows if r] == ["full", "h2o", "caote+out", "h2o+caote+out", "snapkv+caote+out", "dropkv",
                                      "expected", "expected+caote", "zeta"]
    assert "| zeta | 12.000 |" in md and "| h2o | 11.000 |" in md  # each its own value
