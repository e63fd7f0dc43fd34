"""Object keys: the one set of rules every backend accepts.

A key is a relative, ``/``-separated name such as ``slides/TCGA-A1-A0SB.svs``. The
rules are checked before any I/O so that a bad key never reaches a filesystem path or
an HTTP request, and so that a key valid on one backend is valid on every other one
(a store can be copied from ``file://`` to ``s3://`` and back).
"""

from __future__ import annotations

import unicodedata

from services.common.errors import InvalidInput

#: Longest key accepted, in bytes of its UTF-8 encoding (the S3 limit).
MAX_KEY_BYTES = 1024

#: Longest segment (text between two ``/``), in bytes of UTF-8; the usual filesystem
#: limit for one file name, so that every key can be stored by the ``file://`` backend.
MAX_SEGMENT_BYTES = 255

#: Segments starting with this are reserved for the ``file://`` backend's bookkeeping
#: (its checksum records and in-flight temporary files).
RESERVED_SEGMENT_PREFIX = ".objectstore"


def validate_key(key: str) -> str:
    """Check that ``key`` names an object; return it unchanged.

    Rules: a non-empty ``str``; at most :data:`MAX_KEY_BYTES` bytes of UTF-8 (so no
    lone surrogates); relative (no leading ``/``); no trailing ``/``; no empty
    segment (``a//b``); no ``.`` or ``..`` segment; no backslash; no control
    character (C0, DEL, C1); each segment at most :data:`MAX_SEGMENT_BYTES` bytes; no
    segment starting with :data:`RESERVED_SEGMENT_PREFIX`. Letters outside ASCII
    are fine (``slides/Ünïcode-1.svs``).

    Args:
        key: The candidate object key.

    Returns:
        The same key, so that the call can be used inline.

    Raises:
        InvalidInput: If a rule is broken; the message names the key (``repr``) and
            the rule.
    """
    if not isinstance(key, str):
        raise InvalidInput(f"object key must be a str, got {type(key).__name__}")
    if key == "":
        raise InvalidInput("object key must not be empty")
    if key.endswith("/"):
        raise InvalidInput(f"object key {key!r} must not end with '/' (that names a prefix)")
    _check_path_text(key, what="object key")
    return key


def validate_prefix(prefix: str) -> str:
    """Check that ``prefix`` is usable to list or delete keys; return it unchanged.

    A prefix is compared with keys as a plain string (``slides/TCGA-`` matches
    ``slides/TCGA-A1.svs``). It may be empty (everything) and may end with ``/``;
    otherwise the rules of :func:`validate_key` apply.

    Args:
        prefix: The candidate prefix.

    Returns:
        The same prefix.

    Raises:
        InvalidInput: If a rule is broken; the message names the prefix and the rule.
    """
    if not isinstance(prefix, str):
        raise InvalidInput(f"key prefix must be a str, got {type(prefix).__name__}")
    if prefix == "":
        return prefix
    body = prefix[:-1] if prefix.endswith("/") else prefix
    if body == "":
        raise InvalidInput(f"key prefix {prefix!r} must be relative (no leading '/')")
    _check_path_text(body, what="key prefix", shown=prefix)
    return prefix


def _check_path_text(text: str, *, what: str, shown: str | None = None) -> None:
    """Apply the rules shared by keys and prefixes to ``text``.

    Args:
        text: Key, or prefix without its trailing ``/``.
        what: ``"object key"`` or ``"key prefix"``, for the message.
        shown: The value to name in messages, if different from ``text``.

    Raises:
        InvalidInput: On the first rule broken.
    """
    name = repr(text if shown is None else shown)
    try:
        size_bytes = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidInput(
            f"{what} {name} is not valid Unicode text (it holds a lone surrogate)"
        ) from None
    if size_bytes > MAX_KEY_BYTES:
        raise InvalidInput(
            f"{what} {name} is {size_bytes} bytes of UTF-8; the limit is {MAX_KEY_BYTES}"
        )
    for char in text:
        if unicodedata.category(char) == "Cc":
            raise InvalidInput(f"{what} {name} contains the control character U+{ord(char):04X}")
    if "\\" in text:
        raise InvalidInput(f"{what} {name} contains a backslash; use '/' between segments")
    if text.startswith("/"):
        raise InvalidInput(f"{what} {name} must be relative (no leading '/')")
    for segment in text.split("/"):
        _check_segment(segment, what=what, name=name)


def _check_segment(segment: str, *, what: str, name: str) -> None:
    """Apply the per-segment rules.

    Args:
        segment: Text between two ``/`` of a key or prefix.
        what: ``"object key"`` or ``"key prefix"``, for the message.
        name: ``repr`` of the whole key or prefix, for the message.

    Raises:
        InvalidInput: On the first rule broken.
    """
    if segment == "":
        raise InvalidInput(f"{what} {name} has an empty segment ('//')")
    if segment in (".", ".."):
        raise InvalidInput(f"{what} {name} has a {segment!r} segment; keys are not paths")
    if len(segment.encode("utf-8")) > MAX_SEGMENT_BYTES:
        raise InvalidInput(
            f"{what} {name} has a segment longer than {MAX_SEGMENT_BYTES} bytes of UTF-8"
        )
    if segment.startswith(RESERVED_SEGMENT_PREFIX):
        raise InvalidInput(
            f"{what} {name} has a segment starting with {RESERVED_SEGMENT_PREFIX!r}, "
            "which is reserved for the store's own bookkeeping"
        )
