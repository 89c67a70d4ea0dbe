#!/usr/bin/env python
"""caote side of the caote <-> kvpress comparison.

Runs in caote's own environment (the counterpart ``run_kvpress.py`` runs in
``.venv-kvpress``). Same protocol, same text, same needle prompt layout and
the same JSON fields, but the cache is a ``caote.EvictingCache``:

* ``prefill_s``      -- wall time of ``caote.prefill`` over the N-token prompt,
                        ``--block-size`` tokens per forward, every layer evicting
                        back to the budget after each block (LM head on the last
                        position only);
* ``peak_kv_bytes``  -- ``cache.peak_kv_bytes()`` after that prefill (largest
                        stored K/V per layer, new block included, summed);
* ``kv_bytes_after`` -- ``cache.kv_bytes()`` once the prefill returned;
* ``peak_rss_bytes`` -- kernel high-water mark of the worker's RSS during the
                        prefill (reset just before it; model weights included);
* ``ppl``            -- perplexity of the next ``--ppl-tokens`` essay tokens,
                        teacher-forced one token at a time through the evicting
                        cache (every step evicts back to the budget, as caote
                        does while decoding);
* ``needle_recall``  -- fraction of needle depths whose 16 greedy tokens contain
                        the passphrase; same prompt as ``run_kvpress.py``: the
                        context is prefilled block by block (evicting), then the
                        question is fed through the same evicting cache.

Every (method, prompt_len, budget) runs in a fresh subprocess with one torch
thread. One JSON line per configuration is appended to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

# Helpers shared with the kvpress side; run_kvpress.py imports kvpress only inside its
# worker functions, so importing it here pulls in the standard library only.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_kvpress import (
    ANSWER,
    ANSWER_PREFIX,
    RssSampler,
    _ints,
    _reset_hwm,
    _vm_hwm_bytes,
    add_protocol_args,
    essays_text,
    finish_record,
    needle_context,
    question_ids,
    run_configuration,
)

DEFAULT_METHODS = (
    "snapkv",
    "snapkv+caote",
    "snapkv+fastcaote",
    "tova",
    "tova+caote",
    "tova+fastcaote",
)


# --------------------------------------------------------------------------- #
# Worker: one configuration in a fresh process
# --------------------------------------------------------------------------- #
def worker(cfg: dict) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import psutil
    import torch

    torch.set_num_threads(cfg["threads"])
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    torch.manual_seed(0)

    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import caote
    from caote import hf

    method, n, budget = cfg["method"], cfg["prompt_tokens"], cfg["budget"]
    block = cfg["block_size"]
    if not 0 < budget <= n:
        raise SystemExit(f"budget {budget} must be in (0, {n}]")
    options = {}
    if cfg.get("snapkv_window") is not None:
        options["snapkv_window"] = cfg["snapkv_window"]
    if cfg.get("snapkv_kernel") is not None:
        options["snapkv_kernel"] = cfg["snapkv_kernel"]

    def new_cache():
        return caote.EvictingCache(
            model, budget=budget, method=method, block_size=block, **options
        )

    tok = AutoTokenizer.from_pretrained(cfg["model"], local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        cfg["model"], dtype=torch.float32, local_files_only=True
    )
    model.eval()
    max_pos = getattr(model.config, "max_position_embeddings", None)

    text, files = essays_text()
    ids_all = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
    need = n + cfg["ppl_tokens"]
    if ids_all.shape[1] < need:
        raise SystemExit(f"essays have {ids_all.shape[1]} tokens, need {need}")

    proc = psutil.Process()
    cache = new_cache()  # attaches caote's attention function to the model
    cfg_used = cache.config
    result: dict = {
        "library": "caote",
        "method": cfg_used.method,
        "prompt_tokens": n,
        "budget": budget,
        "block_size": block,
        "compression_ratio": 1.0 - budget / n,
        "eviction_config": {
            "sink_tokens": cfg_used.sink_tokens,
            "recent_window": cfg_used.recent_window,
            "snapkv_window": cfg_used.snapkv_window,
            "snapkv_kernel": cfg_used.snapkv_kernel,
        },
        "model": cfg["model"],
        "attn_implementation": model.config._attn_implementation,
        "threads": cfg["threads"],
    }

    # ---------------- prefill: time, KV bytes, RSS ---------------- #
    prompt = ids_all[:, :n]
    cont = ids_all[:, n:need]
    gc.collect()
    rss_before = proc.memory_info().rss
    hwm_ok = _reset_hwm()
    with RssSampler() as sampler:
        t0 = time.perf_counter()
        logits = caote.prefill(model, prompt, cache, block)  # (1, 1, V), inference mode
        prefill_s = time.perf_counter() - t0
    hwm = _vm_hwm_bytes() if hwm_ok else None
    result.update(
        prefill_s=prefill_s,
        peak_kv_bytes=cache.peak_kv_bytes(),
        kv_bytes_after=cache.kv_bytes(),
        kv_tokens_after_per_layer=sorted({layer.stored for layer in cache.layers}),
        peak_stored_tokens=cache.peak_stored_tokens,
        full_kv_bytes=cache.full_kv_bytes(),
        allocated_kv_bytes=cache.allocated_kv_bytes(),
        peak_rss_bytes=hwm if hwm is not None else sampler.peak,
        peak_rss_source="VmHWM" if hwm is not None else "psutil-sampled",
        peak_rss_sampled_bytes=sampler.peak,
        rss_before_prefill_bytes=rss_before,
    )

    # ---------------- perplexity of the continuation ---------------- #
    # Positions come from the cache (tokens seen = n + i), the same absolute
    # positions run_kvpress.py passes explicitly.
    t0 = time.perf_counter()
    with torch.inference_mode():
        nll = 0.0
        m = cont.shape[1]
        for i in range(m):
            lp = torch.log_softmax(logits[0, -1].double(), dim=-1)
            nll -= float(lp[cont[0, i]])
            if i == m - 1:
                break
            logits = hf.forward(
                model, cont[:, i : i + 1], cache, logits_to_keep=1
            ).logits
    result["ppl"] = math.exp(nll / m)
    result["ppl_tokens"] = m
    result["ppl_decode_s"] = time.perf_counter() - t0
    result["kv_bytes_after_ppl"] = cache.kv_bytes()
    del cache, logits
    gc.collect()

    # ---------------- needle recall (same prompt as run_kvpress.py) ---------------- #
    depths = cfg["needle_depths"]
    answers, q_ids, answer_prefix = [], [], ""
    if depths:
        t0 = time.perf_counter()
        answer_prefix = ANSWER_PREFIX if cfg.get("answer_prefix", True) else ""
        q_ids = question_ids(tok, answer_prefix)
        eos = model.generation_config.eos_token_id
        stop_ids = set(eos if isinstance(eos, list) else [eos])
        for d in depths:
            _, ctx, insert_token = needle_context(tok, ids_all, n, d)
            cache = new_cache()
            with torch.inference_mode():
                caote.prefill(
                    model, torch.tensor([ctx]), cache, block
                )  # evicts block by block
                out = caote.prefill(
                    model, torch.tensor([q_ids]), cache, block
                )  # question
                generated = [int(out[0, -1].argmax())]
                # greedy, max_new_tokens tokens, stop on EOS (as kvpress's generate_answer)
                for _ in range(cfg["needle_new_tokens"] - 1):
                    step = torch.tensor([[generated[-1]]])
                    nxt = hf.forward(model, step, cache, logits_to_keep=1).logits
                    generated.append(int(nxt[0, -1].argmax()))
                    if generated[-1] in stop_ids:
                        break
            ans = tok.decode(generated, skip_special_tokens=True)
            answers.append(
                {
                    "depth": d,
                    "insert_token": insert_token,
                    "answer": ans,
                    "found": ANSWER in ans.lower(),
                }
            )
            del cache
        result["needle_s"] = time.perf_counter() - t0
    finish_record(
        result, answers, q_ids, answer_prefix, depths, n, cfg, max_pos, files,
        needle_mode=(
        "caote: same prompt as the kvpress side (chat-templated context of N tokens incl. template head, "
        "then '\\n' + question + end-of-user/assistant header + answer prefix); the context is prefilled "
        "block by block through the evicting cache (evicting to the budget after every block), the question "
        "is then fed through the same cache (attends to the evicted context, then evicts too); greedy, every "
        "generated token evicts back to the budget"
        ),
        library=("caote", importlib.metadata.version("caote")),
        transformers_version=transformers.__version__,
        torch_version=torch.__version__,
    )
    return result


# --------------------------------------------------------------------------- #
# Driver
# --------------------------------------------------------------------------- #
def _default_model() -> str:
    from caote.models import default_model_path

    return str(default_model_path())


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 2 and argv[0] == "--worker":  # internal: one configuration
        print("RESULT " + json.dumps(worker(json.loads(argv[1]))), flush=True)
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--model",
        default=None,
        help="local HF folder (default: caote's offline SmolLM2-135M-Instruct, "
        "caote.models.default_model_path())",
    )
    ap.add_argument("--prompt-lens", type=_ints, default=[2048], help="comma list")
    ap.add_argument(
        "--budgets",
        type=_ints,
        default=[512],
        help="comma list of tokens kept per layer/head",
    )
    ap.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help="comma list of caote methods (caote.METHODS)",
    )
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument(
        "--snapkv-window",
        type=int,
        default=None,
        help="caote's SnapKV observation window (default: caote's, 32; kvpress's default is 64)",
    )
    ap.add_argument(
        "--snapkv-kernel", type=int, default=None, help="default: caote's (5)"
    )
    add_protocol_args(ap)
    args = ap.parse_args(argv)

    from caote.policy import METHODS

    methods = [m.strip().lower() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            ap.error(f"unknown method {m!r}; valid: {', '.join(METHODS)}")
    if args.block_size <= 0:
        ap.error("--block-size must be positive")
    model = str(Path(args.model).expanduser()) if args.model else _default_model()
    depths = [float(x) for x in args.needle_depths.split(",") if x]
    command = shlex.join([sys.executable, *sys.argv])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(args.threads),
        MKL_NUM_THREADS=str(args.threads),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    failures = 0
    for n in args.prompt_lens:
        for b in args.budgets:
            for meth in methods:
                cfg = {
                    "model": model,
                    "method": meth,
                    "prompt_tokens": n,
                    "budget": b,
                    "block_size": args.block_size,
                    "snapkv_window": args.snapkv_window,
                    "snapkv_kernel": args.snapkv_kernel,
                    "ppl_tokens": args.ppl_tokens,
                    "needle_depths": depths
                    if args.needle_lens is None or n in args.needle_lens
                    else [],
                    "needle_new_tokens": args.needle_new_tokens,
                    "threads": args.threads,
                    "answer_prefix": not args.no_answer_prefix,
                }
                failures += not run_configuration(__file__, cfg, f"[caote] {meth:16s} N={n:5d} B={b:4d}", env,
                                                  args.timeout, args.out, command)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
