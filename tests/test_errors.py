"""Message helpers: quoted errors are never cut mid-word; key lists say how many more there are."""

from __future__ import annotations

from fxfuse.errors import listing, quote_error


def test_quote_error_cuts_at_a_word_boundary() -> None:
    words = [f"word{i}" for i in range(200)]
    text = quote_error(RuntimeError(" ".join(words)), limit=100)
    assert text.startswith("RuntimeError: ") and text.endswith(" ...") and len(text) < 130
    kept = text.removeprefix("RuntimeError: ").removesuffix(" ...").split(" ")
    assert kept == words[:len(kept)]  # whole words only, in order


def test_quote_error_keeps_one_long_token_whole_and_joins_lines() -> None:
    path = "/a/very/long/path/" + "x" * 300 + ".pt"
    text = quote_error(FileNotFoundError(f"{path} is missing\nsecond line"), limit=100)
    assert path in text and text.endswith(" ...")
    assert quote_error(ValueError("one\ntwo")) == "ValueError: one two"
    assert quote_error(KeyError()) == "KeyError"


def test_listing_says_how_many_more() -> None:
    keys = [f"k{i}" for i in range(25)]
    assert listing(keys) == ", ".join(repr(k) for k in keys[:10]) + " and 15 more"
    assert listing(keys[:3]) == "'k0', 'k1', 'k2'"
    assert listing([]) == "none"
