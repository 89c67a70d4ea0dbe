#!/usr/bin/env python
"""Extract Jane Austen's six novels from the Debian package ``r-cran-janeaustenr`` into text files.

One-off build step; its outputs are committed, so nothing here is needed at run time.

    apt-get install -y r-cran-janeaustenr   # the R data package (public-domain texts)
    pip install rdata                       # reads R serialization in pure Python
    python scripts/extract_austen.py        # writes src/caote/data/austen/<slug>.txt.xz

The package keeps its data as an R lazy-load database (``data/Rdata.rdx`` + ``data/Rdata.rdb``):
the ``.rdx`` file is an RDS index mapping each object name to (offset, length) in the ``.rdb``
file, where every object is a 4-byte big-endian uncompressed size followed by a zlib stream of R
serialization. Each novel is a character vector with one element per printed line; lines are
joined with newlines (runs of blank lines squeezed to one, so paragraphs stay separated) and the
result is xz-compressed. Older package versions that ship ``data/*.rda`` files are read too.
"""

from __future__ import annotations

import argparse
import lzma
import re
import subprocess
import sys
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "src" / "caote" / "data" / "austen"
DEFAULT_PKG_DIRS = (
    Path("/usr/lib/R/site-library/janeaustenr"),
    Path("/usr/local/lib/R/site-library/janeaustenr"),
    Path("/usr/lib/R/library/janeaustenr"),
)

# R object name -> output slug (titles live in caote.eval.books)
SLUGS = {
    "sensesensibility": "sense_and_sensibility",
    "prideprejudice": "pride_and_prejudice",
    "mansfieldpark": "mansfield_park",
    "emma": "emma",
    "northangerabbey": "northanger_abbey",
    "persuasion": "persuasion",
}


def find_package_dir() -> Path:
    """janeaustenr's install folder, from ``dpkg -L`` or the usual R library paths."""
    try:
        listing = subprocess.run(
            ["dpkg", "-L", "r-cran-janeaustenr"], capture_output=True, text=True, check=True
        ).stdout.splitlines()
        for line in listing:
            if line.rstrip("/").endswith("/janeaustenr"):
                return Path(line)
    except (OSError, subprocess.CalledProcessError):
        pass
    for d in DEFAULT_PKG_DIRS:
        if d.is_dir():
            return d
    sys.exit("r-cran-janeaustenr is not installed (apt-get install -y r-cran-janeaustenr)")


def _lines(obj) -> list[str]:
    return ["" if x is None else str(x) for x in list(obj)]


def read_novels(pkg_dir: Path) -> dict[str, list[str]]:
    """Object name -> list of lines, for the six novels."""
    import rdata  # extraction-only dependency

    data = pkg_dir / "data"
    rdx, rdb = data / "Rdata.rdx", data / "Rdata.rdb"
    novels: dict[str, list[str]] = {}
    if rdx.exists() and rdb.exists():
        index = rdata.read_rds(rdx)
        blob = rdb.read_bytes()
        for name, (offset, length) in index["variables"].items():
            name = str(name)
            if name not in SLUGS:
                continue
            chunk = blob[int(offset) : int(offset) + int(length)]
            size = int.from_bytes(chunk[:4], "big")
            raw = zlib.decompress(chunk[4:])
            if len(raw) != size:
                raise ValueError(f"{name}: expected {size} bytes, got {len(raw)}")
            parsed = rdata.parser.parse_data(raw, extension=".rds")
            novels[name] = _lines(rdata.conversion.convert(parsed))
    else:
        for rda in sorted(data.glob("*.rda")) + sorted(data.glob("*.RData")):
            for name, obj in rdata.read_rda(rda).items():
                if str(name) in SLUGS:
                    novels[str(name)] = _lines(obj)
    missing = set(SLUGS) - set(novels)
    if missing:
        raise SystemExit(f"novels not found in {data}: {sorted(missing)}")
    return novels


def to_text(lines: list[str]) -> str:
    text = "\n".join(line.rstrip() for line in lines)
    text = re.sub(r"\n{3,}", "\n\n", text)  # squeeze runs of blank lines, keep paragraph breaks
    return text.strip() + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--package-dir", type=Path, default=None, help="janeaustenr install folder")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)

    pkg_dir = args.package_dir or find_package_dir()
    novels = read_novels(pkg_dir)
    args.out.mkdir(parents=True, exist_ok=True)
    total = 0
    for name, slug in SLUGS.items():
        text = to_text(novels[name])
        packed = lzma.compress(text.encode("utf-8"), preset=9 | lzma.PRESET_EXTREME)
        path = args.out / f"{slug}.txt.xz"
        path.write_bytes(packed)
        total += len(packed)
        print(f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path}: "
              f"{len(text):,} chars -> {len(packed):,} bytes")
    print(f"total {total:,} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
