"""Memory over a long decode (issue 13): KV entries, KV bytes and process RSS every ``--every`` steps.

Reads a ``--length``-token prompt (the bench's text) block by block under ``--method`` at ``--budget``, then decodes
``--steps`` greedy tokens (no end-of-sequence stop) and records, every ``--every`` steps: the tokens seen, the
entries held per layer and KV head, the stored and allocated KV bytes, the bytes transformers' own cache would hold
for the same tokens (``EvictingCache.full_kv_bytes``: computed, not run), and the process's resident memory
(``VmRSS``). Writes ``OUT.json`` and ``OUT.png``.

    python scripts/decode_memory.py --steps 10000 --budget 512 --method caote --option slack=15 \
        --out results/bench/decode_memory_10k
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from caote import hf
from caote.bench import _status_kib, prompt_ids
from caote.cache import EvictingCache
from caote.generation import prefill
from caote.models import load_model
from caote.validation import check_option


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--budget", type=int, default=512)
    p.add_argument("--method", default="caote")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=10_000)
    p.add_argument("--every", type=int, default=100)
    p.add_argument("--option", action="append", default=[], type=check_option, metavar="NAME=VALUE")
    p.add_argument("--out", type=Path, default=Path("results/bench/decode_memory"))
    args = p.parse_args()
    torch.set_num_threads(1)
    options = dict(args.option)
    model, tokenizer = load_model()
    ids = prompt_ids(tokenizer, model.config.vocab_size, args.length)
    cache = EvictingCache(model, budget=args.budget, method=args.method, block_size=args.block_size, **options)
    start = time.perf_counter()
    logits = prefill(model, ids, cache, args.block_size)
    next_ids = logits[:, -1].argmax(-1)
    samples = []

    def sample(step: int) -> None:
        samples.append(dict(step=step, seen=cache.seen_tokens, stored=cache.stored_tokens,
                            kv_bytes=cache.kv_bytes(), allocated_kv_bytes=cache.allocated_kv_bytes(),
                            full_kv_bytes=cache.full_kv_bytes(), rss_bytes=(_status_kib("VmRSS") or 0) * 1024,
                            seconds=time.perf_counter() - start))

    sample(0)
    with torch.inference_mode():
        for step in tqdm(range(1, args.steps + 1), desc=f"decode ({args.method}, budget {args.budget})"):
            logits = hf.forward(model, next_ids[:, None], cache, logits_to_keep=1).logits[:, -1]
            next_ids = logits.argmax(-1)
            if step % args.every == 0 or step == args.steps:
                sample(step)
    command = ("python scripts/decode_memory.py " + f"--length {args.length} --budget {args.budget} --method "
               f"{args.method} --steps {args.steps} --every {args.every}"
               + "".join(f" --option {k}={v}" for k, v in options.items()) + f" --out {args.out}")
    result = dict(command=command, method=args.method, budget=args.budget, prompt_tokens=args.length,
                  options=options, peak_stored=cache.peak_stored_tokens, samples=samples)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    plot(result, args.out.with_suffix(".png"))
    first, last = samples[0], samples[-1]
    mib = 2 ** 20
    print(f"{command}\nsteps {last['step']}: KV {first['kv_bytes'] / mib:.1f} -> {last['kv_bytes'] / mib:.1f} MiB "
          f"(allocated {last['allocated_kv_bytes'] / mib:.1f} MiB; a full cache would hold "
          f"{last['full_kv_bytes'] / mib:.1f} MiB), RSS {first['rss_bytes'] / mib:.0f} -> {last['rss_bytes'] / mib:.0f} MiB "
          f"(max {max(s['rss_bytes'] for s in samples) / mib:.0f}), peak entries {cache.peak_stored_tokens}")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = result["samples"]
    steps = [s["step"] for s in samples]
    mib = 2 ** 20
    fig, (kv, rss) = plt.subplots(1, 2, figsize=(11, 4))
    kv.plot(steps, [s["kv_bytes"] / mib for s in samples], label=f"{result['method']} stored KV")
    kv.plot(steps, [s["allocated_kv_bytes"] / mib for s in samples], "--", label=f"{result['method']} allocated KV")
    kv.plot(steps, [s["full_kv_bytes"] / mib for s in samples], ":", label="full cache (same tokens, computed)")
    kv.set_xlabel("decode steps")
    kv.set_ylabel("KV MiB")
    kv.set_title(f"KV memory, budget {result['budget']}")
    kv.legend()
    rss.plot(steps, [s["rss_bytes"] / mib for s in samples])
    rss.set_xlabel("decode steps")
    rss.set_ylabel("process RSS MiB")
    rss.set_ylim(0, max(s["rss_bytes"] for s in samples) / mib * 1.1)
    rss.set_title("process resident memory")
    fig.suptitle(f"SmolLM2-135M, {result['prompt_tokens']}-token prompt then {steps[-1]} greedy tokens "
                 f"({', '.join(f'{k}={v}' for k, v in result['options'].items()) or 'no options'})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
