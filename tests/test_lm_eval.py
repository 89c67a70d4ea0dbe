"""The lm-evaluation-harness model type ``caote`` (caote.integrations.lm_eval).

A tiny random Llama (its vocabulary the real SmolLM2 tokenizer's) is saved with that tokenizer to a folder and run
through lm-eval's own Python API and command line over the local tasks in tests/fixtures/lm_eval: three records, as
multiple choice (loglikelihood), generation (generate_until) and rolling perplexity (loglikelihood_rolling). Checked:
it runs and reports its metrics; with a budget that holds everything its scores and generations are those of
lm-eval's own ``hf`` model on the same folder; under a small budget the cache evicts and its peak stays bounded.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_llama

pytest.importorskip("lm_eval", reason="lm-eval is not installed: pip install 'caote[lm-eval]' (CI installs it)")

import lm_eval  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from caote.integrations.lm_eval import CaoteLM  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASK_DIR = ROOT / "tests" / "fixtures" / "lm_eval"
TASKS = ["caote_mc", "caote_gen", "caote_rolling"]
SMALL = "budget=8,method=snapkv+caote,block_size=4,snapkv_window=4"
"""A budget far below the prompts (about 30-40 tokens each); snapkv's observation window shrunk below it (by default
it would protect the whole budget)."""


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tokenizer) -> Path:
    """A tiny random Llama and the SmolLM2 tokenizer, saved as a transformers folder."""
    folder = tmp_path_factory.mktemp("tiny-lm-eval")
    tiny_llama(vocab_size=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def evaluate(tiny_folder):
    """``evaluate(model, model_args)``: lm-eval's ``simple_evaluate`` over the local tasks (samples logged). The
    tasks' data paths are relative to the repository root, so it runs from there."""
    task_manager = TaskManager(include_path=str(TASK_DIR), include_defaults=False)

    def run(model: str, model_args: str) -> dict:
        with pytest.MonkeyPatch.context() as patch:
            patch.chdir(ROOT)
            return lm_eval.simple_evaluate(model=model, model_args=f"pretrained={tiny_folder},{model_args}",
                                           tasks=TASKS, task_manager=task_manager, device="cpu", log_samples=True)

    return run


@pytest.fixture(scope="module")
def hf_results(evaluate) -> dict:
    """lm-eval's own ``hf`` model on the same folder, hub kernels off (transformers 5.25 turns them on by default and
    then needs the ``kernels`` package and the network; caote's own loads pass ``hf.MODEL_LOAD_KWARGS``)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("USE_HUB_KERNELS", "0")
        return evaluate("hf", "dtype=float32")


def responses(results: dict, task: str) -> list:
    """Each document's responses (one per request: ``(logprob, greedy)``, a log-probability or a text)."""
    return [[response[0] for response in sample["resps"]] for sample in results["samples"][task]]


def test_registered_through_lm_eval_registry():
    assert get_model("caote") is CaoteLM
    assert get_model("hf").__name__ == "HFLM"  # lm-eval's own names still resolve once caote's is registered


@pytest.mark.parametrize("model_args", ["budget=4096,block_size=4", "method=full,block_size=8"])
def test_budget_holding_everything_matches_lm_eval_hf(evaluate, hf_results, model_args):
    results = evaluate("caote", model_args)
    stats = results["config"]["caote_stats"]
    assert stats["evicted_tokens"] == 0
    assert stats["longest_input_tokens"] > 8  # more than one block was read
    for ours, theirs in zip(responses(results, "caote_mc"), responses(hf_results, "caote_mc"), strict=True):
        assert [greedy for _, greedy in ours] == [greedy for _, greedy in theirs]
        assert [logprob for logprob, _ in ours] == pytest.approx([logprob for logprob, _ in theirs], abs=1e-3)
    rolling = [logprob for document in responses(results, "caote_rolling") for logprob in document]
    expected = [logprob for document in responses(hf_results, "caote_rolling") for logprob in document]
    assert rolling == pytest.approx(expected, abs=1e-3)
    assert responses(results, "caote_gen") == responses(hf_results, "caote_gen")
    for task in TASKS:
        assert results["results"][task].keys() == hf_results["results"][task].keys()


def test_small_budget_evicts_and_stays_bounded(evaluate, hf_results):
    results = evaluate("caote", SMALL)
    assert results["results"]["caote_mc"]["acc,none"] in (0.0, 1 / 3, 2 / 3, 1.0)
    assert "exact_match,none" in results["results"]["caote_gen"]
    assert math.isfinite(results["results"]["caote_rolling"]["word_perplexity,none"])
    config = results["config"]
    assert (config["caote_method"], config["caote_budget"], config["caote_block_size"]) == ("snapkv+caote", 8, 4)
    assert config["caote_options"] == {"snapkv_window": 4} and config["caote_protocol"] == "bounded"
    stats = config["caote_stats"]
    assert stats["requests"] == 3 + 3 + 3  # one read per multiple-choice context, per generation, per rolling window
    assert stats["longest_input_tokens"] > 3 * (8 + 4)
    assert stats["evicted_tokens"] > 0
    assert stats["prefill_peak_tokens"] <= 8 + 4
    # the continuations (at most 3 tokens) and generated tokens add fewer entries than a block
    assert stats["peak_tokens"] <= 8 + 4
    ours = [logprob for document in responses(results, "caote_mc") for logprob, _ in document]
    theirs = [logprob for document in responses(hf_results, "caote_mc") for logprob, _ in document]
    assert max(abs(a - b) for a, b in zip(ours, theirs)) > 1e-3  # eviction changed the scores


def test_python_api_fraction_budget_and_question_aware(tiny_folder):
    context = ("Question: The lighthouse keeper wrote the passphrase on the wall of the stairwell before the storm "
               "reached the harbour. Which colour was the door?\nAnswer:")
    lm = CaoteLM(pretrained=str(tiny_folder), method="tova", budget="25%", block_size=4, device="cpu")
    (logprob, greedy), = lm.loglikelihood([Instance("loglikelihood", {}, (context, " violet"), 0)])
    assert math.isfinite(logprob) and logprob < 0 and isinstance(greedy, bool)
    length = len(lm.tok_encode(context))
    assert lm.stats.evicted_tokens > 0
    assert lm.stats.prefill_peak_tokens <= math.ceil(0.25 * length) + 4
    assert lm.get_model_info()["caote_budget"] == 0.25

    aware = CaoteLM(pretrained=str(tiny_folder), method="snapkv+caote", budget=8, block_size=4, snapkv_window=4,
                    question_tokens=6, device="cpu")
    text, = aware.generate_until([Instance("generate_until", {}, (context, {"until": ["\n"], "max_gen_toks": 3}), 0)])
    assert isinstance(text, str) and "\n" not in text
    info = aware.get_model_info()
    assert info["caote_protocol"] == "question-aware" and info["caote_question_tokens"] == 6
    assert info["caote_stats"]["evicted_tokens"] > 0


def test_model_args_are_checked(tiny_folder):
    with pytest.raises(ValueError, match="unknown budgte"):
        CaoteLM(pretrained=str(tiny_folder), budgte=8)
    with pytest.raises(ValueError, match="snapkv"):
        CaoteLM(pretrained=str(tiny_folder), method="snapkv+caot")
    with pytest.raises(ValueError, match="protected"):  # checked before the model loads
        CaoteLM(pretrained=str(tiny_folder), method="tova", budget=8, sink_tokens=10)
    lm = CaoteLM(pretrained=str(tiny_folder), budget=8, method="tova", device="cpu")
    with pytest.raises(ValueError, match="greedily"):
        lm.generate_until([Instance("generate_until", {}, ("Hello", {"do_sample": True, "temperature": 1.0}), 0)])


def test_command_line(tiny_folder):
    """``caote-lm-eval`` (lm-eval's command line with the model type registered), as the README runs it."""
    command = [sys.executable, "-c", "from caote.integrations import lm_eval_main; lm_eval_main()",
               "--model", "caote", "--model_args", f"pretrained={tiny_folder},{SMALL}", "--device", "cpu",
               "--include_path", str(TASK_DIR), "--tasks", "caote_mc", "--limit", "1"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "caote_mc" in done.stdout and "acc" in done.stdout
