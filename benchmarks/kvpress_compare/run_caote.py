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
import gc
import importlib.metadata
import json
import shlex
import sys
import time
from pathlib import Path

# Helpers shared with the kvpress side; run_kvpress.py imports kvpress only inside its
# worker functions, so importing it here pulls in the standard library only.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_kvpress import (
    ANSWER_PREFIX,
    _ints,
    add_protocol_args,
    continuation_ppl,
    finish_record,
    load_model_and_essays,
    needle_answer,
    needle_context,
    prefill_memory,
    protocol_cfg,
    question_ids,
    run_configuration,
    start_worker,
    worker_env,
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
    start_worker(cfg)
    import torch
    import transformers

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

    tok, model, ids_all, files = load_model_and_essays(cfg)
    max_pos = getattr(model.config, "max_position_embeddings", None)
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
    cont = ids_all[:, n : n + cfg["ppl_tokens"]]
    with prefill_memory(result):
        t0 = time.perf_counter()
        logits = caote.prefill(model, prompt, cache, block)  # (1, 1, V), inference mode
        prefill_s = time.perf_counter() - t0
    result.update(
        prefill_s=prefill_s,
        peak_kv_bytes=cache.peak_kv_bytes(),
        kv_bytes_after=cache.kv_bytes(),
        kv_tokens_after_per_layer=sorted({layer.stored for layer in cache.layers}),
        peak_stored_tokens=cache.peak_stored_tokens,
        full_kv_bytes=cache.full_kv_bytes(),
        allocated_kv_bytes=cache.allocated_kv_bytes(),
    )

    # ---------------- perplexity of the continuation ---------------- #
    # Positions come from the cache (tokens seen = n + i), the same absolute
    # positions run_kvpress.py passes explicitly.
    continuation_ppl(
        result, logits, cont,
        lambda i: hf.forward(model, cont[:, i : i + 1], cache, logits_to_keep=1).logits,
    )
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
            answers.append(needle_answer(d, insert_token, ans))
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
    command = shlex.join([sys.executable, *sys.argv])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    env = worker_env(args.threads)
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
                    **protocol_cfg(args, n),
                }
                failures += not run_configuration(__file__, cfg, f"[caote] {meth:16s} N={n:5d} B={b:4d}", env,
                                                  args.timeout, args.out, command)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
