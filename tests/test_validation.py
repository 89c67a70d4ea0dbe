"""One validation layer for the CLI and the API (:mod:`caote.validation`): every mistake gets one line naming the
problem and the fix (``caote: error: ...``, exit status 2, or a ``ValueError`` in Python), before any model loads;
Ctrl-C prints one line and exits 130."""

import json

import pytest
import torch

import caote.models
from caote import validation
from caote.cli import main
from caote.policy import METHODS
from conftest import tiny_llama


class Loaded(Exception):
    """Raised by the patched ``load_model``: the arguments were accepted and loading began."""


@pytest.fixture
def no_loading(monkeypatch):
    """``load_model`` fails the test if called (argument errors must come first)."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"a model was loaded: {args} {kwargs}")

    monkeypatch.setattr(caote.models, "load_model", refuse)


@pytest.fixture
def record_loading(monkeypatch):
    """``load_model`` records its arguments and raises :class:`Loaded` (caught below: exit status 99)."""
    calls = []

    def record(*args, **kwargs):
        calls.append((args, kwargs))
        raise Loaded

    monkeypatch.setattr(caote.models, "load_model", record)
    return calls


def _run(capsys, argv) -> tuple[int, str]:
    try:
        code = main(argv)
    except Loaded:
        code = 99
    return code, capsys.readouterr().err


def _one_line_error(capsys, argv, *expected) -> str:
    code, err = _run(capsys, argv)
    assert code == 2, err
    assert err.endswith("\n") and err.count("\n") == 1, err  # exactly one line
    assert err.startswith("caote: error: "), err
    for text in expected:
        assert text in err, (text, err)
    return err


# ---------------------------------------------------------------------------------------------- positive integers
@pytest.mark.parametrize("argv,flag", [
    (["demo", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["demo", "--max-new-tokens", "-5"], "--max-new-tokens"),
    (["demo", "--threads", "0"], "--threads"),
    (["demo", "--block-size", "0"], "--block-size"),
    (["demo", "--budget", "-1"], "--budget"),
    (["demo", "--context-tokens", "x"], "--context-tokens"),
    (["bench", "--repeats", "0"], "--repeats"),
    (["bench", "--block-size", "0"], "--block-size"),
    (["bench", "--decode-tokens", "0"], "--decode-tokens"),
    (["bench", "--threads", "0"], "--threads"),
    (["eval", "ppl", "--threads", "0"], "--threads"),
    (["eval", "ppl", "--samples", "0"], "--samples"),
    (["eval", "niah", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["eval", "tasks", "--max-new-tokens", "-5"], "--max-new-tokens"),
    (["eval", "tasks", "--window", "0"], "--window"),
    (["report", "--heatmap-budget", "0"], "--heatmap-budget"),
])
def test_non_positive_integer_names_the_flag_and_the_fix(capsys, no_loading, argv, flag):
    _one_line_error(capsys, argv, f"{flag} must be a positive integer", f"e.g. {flag} ")


def test_positive_int_api_names_the_parameter():
    assert validation.check_positive_int("12", "budget") == 12 and validation.check_positive_int(3, "budget") == 3
    for bad in (0, -1, "0", "1.5", "abc", True, None, 2.0):
        with pytest.raises(ValueError, match="max_new_tokens must be a positive integer"):
            validation.check_positive_int(bad, "max_new_tokens", 64)
    with pytest.raises(ValueError, match=r"e\.g\. max_new_tokens=64"):
        validation.check_positive_int(0, "max_new_tokens", 64)


# ---------------------------------------------------------------------------------------------- integer lists
@pytest.mark.parametrize("argv,item", [
    (["eval", "ppl", "--lengths", "1k"], "'1k' is not a positive integer (write 1024 for 1k)"),
    (["eval", "niah", "--lengths", "1024,abc"], "'abc' is not a positive integer"),
    (["eval", "tasks", "--budgets", "128,0"], "'0' is not a positive integer"),
    (["bench", "--lengths", "2048,4k"], "'4k' is not a positive integer (write 4096 for 4k)"),
    (["bench", "--budgets", ","], "--budgets is empty"),
])
def test_malformed_list_names_the_bad_item(capsys, no_loading, argv, item):
    _one_line_error(capsys, argv, item, "comma list of positive integers such as")


def test_int_list_accepts_plain_integers():
    assert validation.check_int_list(" 1024, 2048 ,", "--lengths") == [1024, 2048]
    assert validation.check_int_list([64, "128"], "budgets") == [64, 128]


def test_eval_lists_stay_text_after_checking():
    from caote.validation import ArgumentParser
    from caote.eval import cli as eval_cli

    parser = ArgumentParser(prog="caote")
    eval_cli.add_parsers(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", "ppl", "--lengths", " 64, 128", "--methods", "FULL, SnapKV", "--device", "cpu",
                              "--dtype", "bf16"])
    assert (args.lengths, args.methods, args.budgets) == ("64,128", "full,snapkv", "64,128,256,512")
    assert (args.device, args.dtype) == ("cpu", "bfloat16")
    assert parser.parse_args(["eval", "ppl"]).methods == "all"


# ---------------------------------------------------------------------------------------------- methods
def test_method_names_are_case_insensitive_and_canonical():
    assert validation.check_method(" SnapKV+CAOTE ") == "snapkv+caote"
    assert validation.check_method("H2O + FastCAOTE") == "h2o+fastcaote"
    assert all(validation.check_method(m.upper()) == m for m in METHODS)
    assert validation.check_methods("all") == list(METHODS)
    assert validation.check_methods("TOVA,tova,full") == ["tova", "full"]


def test_suggest_fragment():
    assert validation.suggest("snapvk", METHODS) == " did you mean 'snapkv'?"
    assert validation.suggest("SNAPKV+CAOT", METHODS) == " did you mean 'snapkv+caote'?"
    assert validation.suggest("zzzzzz", METHODS) == ""


@pytest.mark.parametrize("argv", [
    ["demo", "--method", "snapkv+caot"],
    ["bench", "--methods", "full,snapkv+caot"],
    ["eval", "ppl", "--methods", "full,snapkv+caot"],
    ["eval", "niah", "--methods", "snapkv+caot"],
    ["eval", "tasks", "--methods", "snapkv+caot"],
])
def test_unknown_method_gets_did_you_mean_in_every_command(capsys, no_loading, argv):
    err = _one_line_error(capsys, argv, "unknown method 'snapkv+caot'; did you mean 'snapkv+caote'?",
                          "valid methods: full, streaming")
    assert "_method_list" not in err and "invalid" not in err  # no internal function names


def test_unknown_method_api_error():
    with pytest.raises(ValueError, match="unknown method 'foo'; valid methods: full"):
        validation.check_method("foo")
    with pytest.raises(ValueError, match="non-empty string"):
        validation.check_method("")


def test_generate_accepts_any_case_method():
    from caote import generate

    class Tokenizer:
        eos_token_id = None

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(0))
    out = generate(tiny_llama(), Tokenizer(), ids, budget=16, method="SnapKV+CAOTE", block_size=8, max_new_tokens=2)
    assert out.method == "snapkv+caote" and len(out.new_token_ids) == 2


def test_demo_accepts_any_case_method(capsys, record_loading):
    code, _ = _run(capsys, ["demo", "--method", "SnapKV", "--device", "cpu", "--dtype", "fp16"])
    assert code == 99 and record_loading[0][1] == {"dtype": "float16", "device": "cpu"}


# ---------------------------------------------------------------------------------------------- dtypes
def test_dtype_aliases():
    for alias in ("fp16", "float16", "half", "FP16", "torch.float16", torch.float16):
        assert validation.check_dtype(alias) is torch.float16
    for alias in ("bf16", "bfloat16", torch.bfloat16):
        assert validation.check_dtype(alias) is torch.bfloat16
    for alias in ("fp32", "float32", "float", torch.float32):
        assert validation.check_dtype(alias) is torch.float32
    assert validation.dtype_name("bf16") == "bfloat16"
    for bad in ("fp8", torch.int8, 16):
        with pytest.raises(ValueError, match=r"unknown dtype .*valid dtypes: float32 \(fp32, float\), bfloat16"):
            validation.check_dtype(bad)


def test_bad_dtype_on_the_command_line(capsys, no_loading):
    _one_line_error(capsys, ["eval", "ppl", "--dtype", "fp8"], "--dtype: unknown dtype 'fp8'", "bfloat16 (bf16)")
    _one_line_error(capsys, ["demo", "--dtype", "float64"], "unknown dtype 'float64'", "float16 (fp16, half)")


def test_load_model_accepts_dtype_alias_and_device(tiny_folder):
    from caote.models import load_model

    model, tokenizer = load_model(str(tiny_folder), dtype="fp16", device="auto" if not torch.cuda.is_available()
                                  else "cpu")
    assert next(model.parameters()).dtype is torch.float16 and model.device.type == "cpu" and not model.training
    assert tokenizer("w1 w2").input_ids == [1, 2]
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        load_model(str(tiny_folder), dtype="fp8")


# ---------------------------------------------------------------------------------------------- devices
def test_device_resolution(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(validation, "_mps_available", lambda: False)
    assert validation.check_device("auto") == torch.device("cpu") == validation.check_device(None)
    assert validation.check_device(" CPU ") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"device 'cuda' is not available.*use device='cpu'"):
        validation.check_device("cuda")
    with pytest.raises(ValueError, match="device 'mps' is not available"):
        validation.check_device("mps")
    with pytest.raises(ValueError, match="unknown device 'gpu';.*valid devices: auto, cpu, cuda, cuda:N, mps"):
        validation.check_device("gpu")
    monkeypatch.setattr(validation, "_mps_available", lambda: True)
    assert validation.check_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert validation.check_device("auto") == torch.device("cuda")
    assert validation.check_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="has 2 CUDA device"):
        validation.check_device("cuda:2")


@pytest.mark.parametrize("command", [["demo"], ["bench"], ["eval", "ppl"], ["eval", "niah"], ["eval", "tasks"]])
def test_every_command_takes_device(capsys, record_loading, monkeypatch, tmp_path, command):
    out = [] if command == ["demo"] else ["--out", str(tmp_path / "out")]
    code, err = _run(capsys, [*command, "--device", "cpu", *out])
    assert code == 99, err
    assert record_loading[0][1]["device"] == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _one_line_error(capsys, [*command, "--device", "cuda"], "device 'cuda' is not available",
                    "use --device cpu or --device auto")
    _one_line_error(capsys, [*command, "--device", "tpu"], "unknown device 'tpu'")


# ---------------------------------------------------------------------------------------------- models
@pytest.mark.parametrize("command", [["demo"], ["bench"], ["eval", "ppl"], ["eval", "tasks"]])
def test_missing_model_folder(capsys, no_loading, tmp_path, command):
    missing = tmp_path / "no-such-model"
    _one_line_error(capsys, [*command, "--model", str(missing)], f"model folder {missing} does not exist",
                    "omit --model for the offline default")
    _one_line_error(capsys, [*command, "--model", "./no-such-model"], "model folder ./no-such-model does not exist")
    _one_line_error(capsys, [*command, "--model", str(tmp_path)], "is not a model folder (no config.json")


@pytest.mark.parametrize("command", [["demo"], ["bench"], ["eval", "niah"]])
def test_hub_id_offline(capsys, no_loading, monkeypatch, command):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _one_line_error(capsys, [*command, "--model", "nobody-caote/not-a-model"],
                    "model 'nobody-caote/not-a-model' is not available offline", "HF_HUB_OFFLINE is set",
                    "--model ./path/to/model", "omit --model for the offline default")


def test_hub_id_offline_api(monkeypatch):
    from caote.models import load_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="'nobody-caote/not-a-model' is not available offline"):
        load_model("nobody-caote/not-a-model")
    with pytest.raises(ValueError, match="does not exist"):
        load_model("./no-such-model")


def test_failed_download_becomes_offline_error(monkeypatch):
    """Online but unreachable (no HF_HUB_OFFLINE): transformers' connection OSError becomes the one line."""
    from transformers import AutoModelForCausalLM

    from caote.models import load_model

    for var in validation.OFFLINE_VARIABLES:
        monkeypatch.delenv(var, raising=False)

    def unreachable(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them "
                      "in the cached files.\nCheck your internet connection")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", unreachable)
    with pytest.raises(ValueError, match="not available offline.*the download failed") as info:
        load_model("nobody-caote/not-a-model")
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------- other arguments
def test_other_bad_arguments(capsys, no_loading, tmp_path):
    _one_line_error(capsys, ["demo", "--depth", "1.5"], "--depth must be a number from 0 to 1")
    _one_line_error(capsys, ["demo", "--text-file", str(tmp_path / "none.txt")], "--text-file: file", "does not exist")
    _one_line_error(capsys, ["eval", "niah", "--depths", "0.5,2"], "--depths: '2' is not a depth from 0 to 1")
    _one_line_error(capsys, ["eval", "tasks", "--longbench-dir", str(tmp_path / "lb")], "--longbench-dir: folder")
    _one_line_error(capsys, ["eval", "ppl", "--seed", "-1"], "--seed must be an integer >= 0")
    _one_line_error(capsys, ["demoo"], "unknown command 'demoo'; did you mean 'demo'?")
    _one_line_error(capsys, ["eval"], "caote eval needs a command: one of ppl, niah, tasks")


# ---------------------------------------------------------------------------------------------- report
def test_report_on_missing_or_empty_folder(capsys, tmp_path):
    _one_line_error(capsys, ["report", "--out", str(tmp_path / "nowhere")], "results folder", "does not exist",
                    "caote eval ppl --out")
    (tmp_path / "ppl.jsonl").write_text("")
    _one_line_error(capsys, ["report", "--out", str(tmp_path)], "holds no evaluation results")


# ---------------------------------------------------------------------------------------------- Ctrl-C
def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def test_ctrl_c_in_demo(capsys, monkeypatch):
    monkeypatch.setattr(caote.models, "load_model", _interrupt)
    code = main(["demo"])
    captured = capsys.readouterr()
    assert code == 130 and captured.err == "caote: interrupted; nothing saved\n"
    assert "Traceback" not in captured.out + captured.err


def test_ctrl_c_in_eval_says_what_was_saved_and_how_to_resume(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(caote.models, "load_model", _interrupt)
    assert main(["eval", "ppl", "--out", str(tmp_path)]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nothing in" in err and "rerun the same command" in err

    def interrupt_after_two_cells(*args, **kwargs):
        (tmp_path / "ppl.jsonl").write_text(json.dumps({"cell": 1}) + "\n" + json.dumps({"cell": 2}) + "\n")
        raise KeyboardInterrupt

    monkeypatch.setattr(caote.models, "load_model", interrupt_after_two_cells)
    assert main(["eval", "ppl", "--out", str(tmp_path)]) == 130
    err = capsys.readouterr().err
    assert err == (f"caote: interrupted; {tmp_path / 'ppl.jsonl'} holds 2 finished cell(s); rerun the same command "
                   "to resume (finished cells are skipped)\n")


def test_ctrl_c_in_bench(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(caote.models, "load_model", _interrupt)
    assert main(["bench", "--repeats", "3", "--out", str(tmp_path / "b.json")]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("caote: interrupted; nothing saved")


# ---------------------------------------------------------------------------------------------- bench
def test_bench_targets_only_with_strict_and_repeats_warning(capsys, tmp_path):
    argv = ["bench", "--quick", "--lengths", "96", "--methods", "full,tova", "--decode-tokens", "2", "--device", "cpu",
            "--out", str(tmp_path / "bench.json")]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "PASS" not in captured.out and "FAIL" not in captured.out
    assert "caote: warning: --repeats 1: ratios between configurations are noisy" in captured.err
    assert "ratios are noisy below 3 repeats" in captured.out
    results = json.loads((tmp_path / "bench.json").read_text())
    assert results["targets"] and results["device"] == "cpu"  # still stored
    code = main([*argv, "--strict"])
    out = capsys.readouterr().out
    results = json.loads((tmp_path / "bench.json").read_text())
    failed = any(not t["passed"] for t in results["targets"])
    assert code == (1 if failed else 0)
    assert ("PASS" in out) or ("FAIL" in out)
    for target in results["targets"]:
        assert ("PASS  " if target["passed"] else "FAIL  ") + target["target"] in out


# ---------------------------------------------------------------------------------------------- eviction options
@pytest.mark.parametrize("argv,message", [
    (["eval", "ppl", "--option", "head_floor=x"], "--option 'head_floor=x': the value must be a number"),
    (["eval", "niah", "--option", "hed_floor=0.3"], "did you mean 'head_floor'?"),
    (["eval", "tasks", "--option", "sinks"], "expected NAME=VALUE"),
    (["eval", "ppl", "--methods", "snapkv+adaptive", "--option", "head_floor=3"], "head_floor must be a number in [0, 1]"),
    (["eval", "ppl", "--methods", "h2o", "--option", "recent_window=0"], "recent_window=0 evicts each new token"),
    (["eval", "niah", "--option", "protect_question=maybe"], "protect_question is true or false (1 or 0)"),
])
def test_eval_options_are_checked_before_loading(capsys, no_loading, argv, message):
    _one_line_error(capsys, argv, message)


def test_option_parses_numbers():
    assert validation.check_option("head_floor=0.5") == ("head_floor", 0.5)
    assert validation.check_option("sink-tokens=4") == ("sink_tokens", 4)
    assert validation.check_option("protect_question=1") == ("protect_question", True)
    assert validation.check_option("protect-question=False") == ("protect_question", False)
