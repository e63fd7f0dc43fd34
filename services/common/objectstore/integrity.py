"""Checksums: the sha256 stored with every object, and reading with verification.

Every put computes the sha256 of the object's bytes and stores it with the object;
reads compare what they received against it. A mismatch, or an object that carries
no checksum at all, raises :class:`IntegrityError` instead of handing out bytes that
may be wrong.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from collections.abc import Callable
from typing import Protocol

from services.common.errors import HistomarkerError

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class IntegrityError(HistomarkerError):
    """Stored bytes do not match their recorded checksum, or no checksum was recorded.

    Maps to gRPC DATA_LOSS: the object was corrupted or changed outside the store.
    """

    status_name = "DATA_LOSS"


class ReadableSource(Protocol):
    """Anything with ``read(size) -> bytes`` that returns ``b""`` at its end."""

    def read(self, size: int = -1, /) -> bytes:
        """Return up to ``size`` bytes; ``b""`` at the end."""
        ...


def file_sha256(path: str | os.PathLike[str], chunk_bytes: int = 1 << 20) -> str:
    """The sha256 of a local file's bytes, hex, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()


def is_sha256_hex(value: object) -> bool:
    """Tell whether ``value`` looks like a sha256 digest (64 lowercase hex digits).

    Args:
        value: Anything, typically a metadata value read back from a backend.

    Returns:
        True for a well-formed lowercase hex digest.
    """
    return isinstance(value, str) and _SHA256_HEX.fullmatch(value) is not None


class VerifyingReader(io.RawIOBase):
    """A raw binary stream that hashes what it passes on and checks it at the end.

    When the source is exhausted, the size and sha256 of everything read are compared
    with the expected ones; on a mismatch the read that reached the end raises
    :class:`IntegrityError` (and so does every later read). A caller that stops before
    the end gets no verification. Wrap it in :class:`io.BufferedReader` for efficient
    small reads.
    """

    def __init__(
        self,
        source: ReadableSource,
        *,
        label: str,
        expected_sha256: str | None,
        expected_size_bytes: int | None,
        on_close: Callable[[], None],
    ) -> None:
        """Create the reader.

        Args:
            source: Where the bytes come from.
            label: How to name the object in error messages, e.g. ``"bucket/key"``.
            expected_sha256: Digest to check at the end; None skips the digest check.
            expected_size_bytes: Size to check at the end, in bytes; None skips it.
            on_close: Called once when this reader is closed, to release the source
                (close a file, return an HTTP connection to its pool).
        """
        super().__init__()
        self._source = source
        self._label = label
        self._expected_sha256 = expected_sha256
        self._expected_size_bytes = expected_size_bytes
        self._on_close = on_close
        self._digest = hashlib.sha256()
        self._size_bytes = 0
        self._failure: IntegrityError | None = None
        self._at_end = False

    def readable(self) -> bool:
        """Return True: this stream can be read."""
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        """Read up to ``len(buffer)`` bytes into ``buffer``.

        Args:
            buffer: Writable buffer to fill.

        Returns:
            Number of bytes written into ``buffer``; 0 at the end.

        Raises:
            IntegrityError: When the end is reached and size or digest differ.
        """
        if self._failure is not None:
            raise self._failure
        if self._at_end:
            return 0
        data = self._source.read(len(buffer))
        if not data:
            self._at_end = True
            self._check_end()
            return 0
        count = len(data)
        memoryview(buffer)[:count] = data
        self._digest.update(data)
        self._size_bytes += count
        return count

    def close(self) -> None:
        """Release the source; safe to call more than once."""
        if not self.closed:
            try:
                self._on_close()
            finally:
                super().close()

    def _check_end(self) -> None:
        """Compare size and digest once the source is exhausted.

        Raises:
            IntegrityError: On a mismatch.
        """
        expected_size = self._expected_size_bytes
        if expected_size is not None and self._size_bytes != expected_size:
            self._failure = IntegrityError(
                f"object {self._label} is {self._size_bytes} bytes but was stored with "
                f"{expected_size} bytes"
            )
        elif self._expected_sha256 is not None:
            actual = self._digest.hexdigest()
            if actual != self._expected_sha256:
                self._failure = IntegrityError(
                    f"object {self._label} is corrupt: its sha256 is {actual}, "
                    f"but {self._expected_sha256} was recorded when it was stored"
                )
        if self._failure is not None:
            raise self._failure
