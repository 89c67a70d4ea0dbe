#!/usr/bin/env python
"""Download the SQuAD v1.1 dev set for ``caote eval squad``.

    python scripts/fetch_squad.py            # -> $CAOTE_CACHE_DIR/squad/dev-v1.1.json (~/.cache/caote/squad)
    python scripts/fetch_squad.py --dest DIR # -> DIR/dev-v1.1.json

The file comes from the source archive of the PyPI package ``bigbench==1.0.0`` (~358 MB, downloaded with pip
into a temporary folder, never installed: it would pull TensorFlow); only the SQuAD dev JSON is kept (~8 MB),
the archive and its unpacked copy are deleted. SQuAD is CC BY-SA 4.0: the file is not part of this repository.
What is restored and checked: :func:`caote.eval.squad.fetch_squad`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    from caote.eval.squad import default_squad_file, fetch_squad
except ImportError:  # run from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from caote.eval.squad import default_squad_file, fetch_squad


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=None,
                        help=f"folder for dev-v1.1.json (default {default_squad_file().parent})")
    parser.add_argument("--force", action="store_true", help="download again even if the file exists")
    args = parser.parse_args(argv)
    target = (args.dest or default_squad_file().parent) / "dev-v1.1.json"
    if target.is_file() and not args.force:
        print(f"{target} already exists (--force to download again)")
        return 0
    try:
        fetch_squad(args.dest)
    except (RuntimeError, OSError) as problem:
        print(f"fetch_squad: error: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
