"""Jane Austen's six novels: long public-domain texts for perplexity under KV-cache eviction.

They stand in for the paper's BookSum experiment. The texts come from the Debian package
``r-cran-janeaustenr`` (R data, lines of the Project Gutenberg editions without licence headers),
converted once by ``scripts/extract_austen.py`` into ``caote/data/austen/<slug>.txt.xz``. Reading
them needs only the standard library.
"""

from __future__ import annotations

import functools
import lzma
from importlib import resources

# slug (file name stem) -> title, in publication order
BOOKS: dict[str, str] = {
    "sense_and_sensibility": "Sense & Sensibility",
    "pride_and_prejudice": "Pride & Prejudice",
    "mansfield_park": "Mansfield Park",
    "emma": "Emma",
    "northanger_abbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}


def _data_dir():
    return resources.files("caote").joinpath("data", "austen")


def _normalise(name: str) -> str:
    return "".join(ch for ch in name.lower().replace("&", "and") if ch.isalnum())


def book_slug(name: str) -> str:
    """Slug for a title or slug, forgiving about case, spaces, '&' vs 'and' and punctuation."""
    key = _normalise(name)
    for slug, title in BOOKS.items():
        if key in (_normalise(slug), _normalise(title)):
            return slug
    raise KeyError(f"unknown book {name!r}; known: {', '.join(BOOKS.values())}")


@functools.lru_cache(maxsize=None)
def _read(slug: str) -> str:
    data = _data_dir().joinpath(f"{slug}.txt.xz").read_bytes()
    return lzma.decompress(data).decode("utf-8")


def book_text(name: str) -> str:
    """Full text of one novel, by title (``"Pride & Prejudice"``) or slug (``"pride_and_prejudice"``)."""
    return _read(book_slug(name))


def austen_books() -> dict[str, str]:
    """Title -> full text for the six novels, in publication order."""
    return {title: _read(slug) for slug, title in BOOKS.items()}


__all__ = ["BOOKS", "austen_books", "book_slug", "book_text"]
