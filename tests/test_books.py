"""Jane Austen's novels shipped as package data."""

from __future__ import annotations


import pytest

from caote.eval.books import BOOKS, austen_books, book_slug, book_text





def test_six_novels_long():
    books = austen_books()
    assert list(books) == list(BOOKS.values())
    assert len(books) == 6
    for title, text in books.items():
        assert len(text) > 100_000, title
        assert "\n\n" in text and "\n\n\n" not in text  # paragraphs kept, blank runs squeezed
        assert "gutenberg" not in text.lower()


def test_book_text_lookup():
    pp = book_text("Pride & Prejudice")
    assert pp is book_text("pride_and_prejudice") is book_text("pride and prejudice")
    assert "It is a truth universally acknowledged" in pp
    assert "Emma Woodhouse, handsome, clever, and rich" in book_text("Emma")
    assert book_slug("Sense and Sensibility") == "sense_and_sensibility"
    with pytest.raises(KeyError):
        book_text("Ulysses")


def test_long_enough_in_tokens(tokenizer):
    # every novel is far longer than 8k tokens; a 60k-character prefix already is
    longest = max(austen_books().values(), key=len)
    n = len(tokenizer.encode(longest[:60_000], add_special_tokens=False))
    assert n > 8_000
