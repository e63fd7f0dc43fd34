"""Object key and prefix validation: the rules shared by every backend."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.common.errors import InvalidInput
from services.common.objectstore import validate_key, validate_prefix
from services.common.objectstore.keys import MAX_KEY_BYTES


@pytest.mark.parametrize(
    "key",
    [
        "a",
        "slides/TCGA-A1-A0SB-01Z-00-DX1.svs",
        "cohorts/tcga/manifest.csv",
        "tiles/s1/0123abcd/shards/20x-00000.tar",
        "slides/Ünïcode-1.svs",
        "runs/流程/报告.json",
        "runs/x/.done",
        "a..b/c...d",
        "with space/and-dash_and.dot",
        "/".join(["x" * 255] * 3 + ["x" * 254, "y"]),  # exactly MAX_KEY_BYTES
    ],
)
def test_accepts_valid_keys(key: str) -> None:
    assert validate_key(key) == key


def test_longest_key_is_exactly_the_limit() -> None:
    key = "/".join(["x" * 255] * 3 + ["x" * 254, "y"])
    assert len(key.encode("utf-8")) == MAX_KEY_BYTES
    assert validate_key(key) == key


@pytest.mark.parametrize(
    ("key", "rule"),
    [
        ("", "empty"),
        ("/slides/a.svs", "relative"),
        ("slides/", "end with '/'"),
        ("a//b", "empty segment"),
        ("a/../b", "'..' segment"),
        ("..", "'..' segment"),
        ("./a", "'.' segment"),
        ("a/.", "'.' segment"),
        ("a\\b", "backslash"),
        ("a\x00b", "U+0000"),
        ("a\nb", "U+000A"),
        ("a\x7fb", "U+007F"),
        ("a\x85b", "U+0085"),
        ("x" * (MAX_KEY_BYTES + 1), "1025 bytes"),
        ("é" * 513, "1026 bytes"),
        ("a/" + "z" * 256, "longer than 255 bytes"),
        ("bad\ud800surrogate", "lone surrogate"),
        (".objectstore/checksums/x", "reserved"),
        ("a/.objectstore-tmp-123", "reserved"),
    ],
)
def test_rejects_invalid_keys_naming_key_and_rule(key: str, rule: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        validate_key(key)
    message = str(caught.value)
    assert rule in message
    if key and len(key) < 100:
        assert repr(key) in message


@pytest.mark.parametrize("key", [None, b"slides/a.svs", 3])
def test_rejects_non_str(key: object) -> None:
    with pytest.raises(InvalidInput, match="must be a str"):
        validate_key(key)  # type: ignore[arg-type]


@pytest.mark.parametrize("prefix", ["", "slides/", "slides/TCGA-", "tiles/s1/", "a", "Ü/"])
def test_accepts_valid_prefixes(prefix: str) -> None:
    assert validate_prefix(prefix) == prefix


@pytest.mark.parametrize("prefix", ["/", "/slides/", "a//", "../", "a/./", "a\\", "a\x00/"])
def test_rejects_invalid_prefixes(prefix: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        validate_prefix(prefix)
    assert repr(prefix) in str(caught.value)


# Text biased towards the characters the rules are about, plus anything at all.
_KEYISH_TEXT = st.text(
    alphabet=st.one_of(
        st.sampled_from(["a", "/", ".", "\\", "\x00", "\x7f", "\n", "Ü", "\ud800", " "]),
        st.characters(),
    ),
    max_size=40,
) | st.text(max_size=1100)


@given(_KEYISH_TEXT)
def test_any_text_is_accepted_or_refused_cleanly(text: str) -> None:
    try:
        accepted = validate_key(text)
    except InvalidInput:
        return
    assert accepted == text
    segments = text.split("/")
    assert ".." not in segments
    assert "." not in segments
    assert "" not in segments
    assert not any(unicodedata.category(char) == "Cc" for char in text)
    assert "\\" not in text
    assert len(text.encode("utf-8")) <= MAX_KEY_BYTES


@given(_KEYISH_TEXT)
def test_any_text_as_prefix_is_accepted_or_refused_cleanly(text: str) -> None:
    try:
        accepted = validate_prefix(text)
    except InvalidInput:
        return
    assert accepted == text
    assert ".." not in text.split("/")
    assert not text.startswith("/")
    assert not any(unicodedata.category(char) == "Cc" for char in text)
