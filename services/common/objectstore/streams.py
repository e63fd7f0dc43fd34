"""Reading a caller's stream in bounded chunks for a put."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Protocol, runtime_checkable

from services.common.errors import InvalidInput

#: Size of one chunk read from a caller's stream or a stored object, in bytes.
CHUNK_BYTES = 1 << 20


@runtime_checkable
class BinaryReadable(Protocol):
    """A binary file-like: ``read(size)`` returns bytes, ``b""`` at the end."""

    def read(self, size: int = -1, /) -> bytes:
        """Return up to ``size`` bytes; ``b""`` at the end."""
        ...


#: What a put accepts as a stream: a binary file-like, or an iterable of bytes chunks
#: (for example the chunks of a gRPC upload).
ByteStream = BinaryReadable | Iterable[bytes]


def iter_chunks(
    stream: ByteStream, *, length_bytes: int | None, chunk_bytes: int = CHUNK_BYTES
) -> Iterator[bytes]:
    """Yield the bytes of ``stream`` chunk by chunk, checking its total length.

    The whole stream is never held in memory: a file-like is read ``chunk_bytes`` at a
    time and an iterable is passed on as it comes. The length check happens when the
    stream is exhausted, so a consumer that commits only after the last chunk never
    commits a stream of the wrong size.

    Args:
        stream: A binary file-like or an iterable of ``bytes``-like chunks.
        length_bytes: Exact total size the stream must have, or None if unknown.
        chunk_bytes: Size of each read from a file-like, in bytes.

    Yields:
        Non-empty ``bytes`` chunks.

    Raises:
        InvalidInput: If the stream is of the wrong type, yields something that is not
            bytes, or its total differs from ``length_bytes``.
    """
    if isinstance(stream, (bytes, bytearray, memoryview, str)):
        raise InvalidInput(
            f"put_stream needs a binary file-like or an iterable of bytes, got "
            f"{type(stream).__name__}; use put_bytes for data already in memory"
        )
    total_bytes = 0
    for chunk in _raw_chunks(stream, chunk_bytes):
        if not isinstance(chunk, (bytes, bytearray, memoryview)):
            raise InvalidInput(f"stream gave a {type(chunk).__name__} chunk; expected bytes")
        data = bytes(chunk)
        if not data:
            continue
        total_bytes += len(data)
        if length_bytes is not None and total_bytes > length_bytes:
            raise InvalidInput(f"stream is longer than the {length_bytes} bytes announced")
        yield data
    if length_bytes is not None and total_bytes != length_bytes:
        raise InvalidInput(
            f"stream ended after {total_bytes} bytes; {length_bytes} bytes were announced"
        )


def _raw_chunks(stream: ByteStream, chunk_bytes: int) -> Iterator[object]:
    """Yield whatever the stream produces, unchecked.

    Args:
        stream: A binary file-like or an iterable of chunks.
        chunk_bytes: Size of each read from a file-like, in bytes.

    Yields:
        The chunks as produced by the stream.
    """
    if isinstance(stream, BinaryReadable):
        while True:
            chunk = stream.read(chunk_bytes)
            if not chunk:
                return
            yield chunk
    elif isinstance(stream, Iterable):
        yield from stream
    else:
        raise InvalidInput(
            f"put_stream needs a binary file-like or an iterable of bytes, got "
            f"{type(stream).__name__}"
        )
