"""The object store interface every backend implements, and what it returns.

Public methods validate their arguments here, before any I/O, and then call the
backend's ``_``-prefixed hooks; a backend never sees an invalid key.

Decisions that hold for every backend:

* ``delete`` of a missing key is not an error (deletes are idempotent, as in S3).
* ``delete_prefix`` refuses the empty prefix, so one call cannot wipe the store.
* ``list`` does not fetch checksums (that would cost one request per object on S3):
  its :class:`ObjectInfo` have ``sha256`` and ``content_type`` set to None; ``stat``
  has them.
* Reads verify the stored sha256 by default; an object without one (written by some
  other tool) is refused with ``verify=True`` and readable with ``verify=False``.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from services.common.errors import InvalidInput
from services.common.objectstore.keys import validate_key, validate_prefix
from services.common.objectstore.streams import CHUNK_BYTES, ByteStream, iter_chunks

#: Content type of objects whose caller did not say.
DEFAULT_CONTENT_TYPE = "application/octet-stream"

#: Longest lifetime of a presigned URL, in seconds (7 days, the S3 limit).
MAX_PRESIGNED_EXPIRES_S = 7 * 24 * 3600


@dataclass(frozen=True)
class ObjectInfo:
    """What the store knows about one object.

    Attributes:
        key: The object's key.
        size_bytes: Size of the object, in bytes.
        sha256: Hex sha256 of the content recorded when it was stored; None in
            :meth:`ObjectStore.list` results, or for an object written outside the store.
        etag: Opaque version tag; changes whenever the object is replaced.
        modified: When the object was last written (timezone-aware, UTC).
        content_type: MIME type given at put; None in ``list`` results.
    """

    key: str
    size_bytes: int
    sha256: str | None
    etag: str
    modified: datetime
    content_type: str | None = None


class ObjectStore(ABC):
    """A flat namespace of immutable-once-written objects, addressed by key.

    Writes are atomic: a reader sees an object whole, in its old or its new version,
    or not at all; a put that fails part-way leaves nothing behind. Use as a context
    manager, or call :meth:`close`, to release connections.
    """

    # ----------------------------------------------------------------- description

    @property
    @abstractmethod
    def url(self) -> str:
        """The store's URL, without credentials (for logs and messages)."""

    # ----------------------------------------------------------------------- writes

    def put_bytes(
        self, key: str, data: bytes, *, content_type: str = DEFAULT_CONTENT_TYPE
    ) -> ObjectInfo:
        """Store ``data`` under ``key``, replacing any previous object.

        Args:
            key: Object key (see :func:`validate_key`).
            data: The whole content.
            content_type: MIME type recorded with the object.

        Returns:
            Information about the stored object, checksum included.

        Raises:
            InvalidInput: Bad key or data that is not bytes.
            Unavailable: The backend cannot be reached.
        """
        validate_key(key)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise InvalidInput(f"put_bytes needs bytes for {key!r}, got {type(data).__name__}")
        return self._put_bytes(key, bytes(data), content_type)

    def put_stream(
        self,
        key: str,
        stream: ByteStream,
        length: int | None = None,
        *,
        content_type: str = DEFAULT_CONTENT_TYPE,
    ) -> ObjectInfo:
        """Store the bytes read from ``stream`` under ``key``, chunk by chunk.

        The stream is read to its end. If reading raises, the exception propagates
        unchanged and nothing becomes visible.

        Args:
            key: Object key.
            stream: Binary file-like (read until ``b""``) or iterable of bytes chunks.
            length: Exact size of the stream in bytes, if known; checked at the end.
            content_type: MIME type recorded with the object.

        Returns:
            Information about the stored object.

        Raises:
            InvalidInput: Bad key, negative length, or a stream whose size differs
                from ``length``.
            Unavailable: The backend cannot be reached.
        """
        validate_key(key)
        if length is not None and (not isinstance(length, int) or length < 0):
            raise InvalidInput(f"length of {key!r} must be a non-negative int, got {length!r}")
        return self._put_chunks(key, iter_chunks(stream, length_bytes=length), content_type)

    def put_file(
        self, key: str, path: str | os.PathLike[str], *, content_type: str = DEFAULT_CONTENT_TYPE
    ) -> ObjectInfo:
        """Store the content of the local file ``path`` under ``key``.

        Args:
            key: Object key.
            path: A readable regular file.
            content_type: MIME type recorded with the object.

        Returns:
            Information about the stored object.

        Raises:
            InvalidInput: Bad key, or ``path`` is not a regular file.
            Unavailable: The backend cannot be reached.
        """
        validate_key(key)
        source = Path(path)
        if not source.is_file():
            raise InvalidInput(f"cannot put {key!r}: {str(source)!r} is not a regular file")
        return self._put_file(key, source, content_type)

    # ------------------------------------------------------------------------ reads

    def get_bytes(self, key: str, *, verify: bool = True) -> bytes:
        """Return the whole content of ``key``.

        Args:
            key: Object key.
            verify: Check the content against its stored sha256.

        Returns:
            The object's bytes.

        Raises:
            InvalidInput: Bad key.
            NotFound: No such object.
            IntegrityError: ``verify`` and the content does not match its checksum or
                has none.
            Unavailable: The backend cannot be reached.
        """
        with self.open_stream(key, verify=verify) as stream:
            return b"".join(iter(lambda: stream.read(CHUNK_BYTES), b""))

    def open_stream(self, key: str, *, verify: bool = True) -> BinaryIO:
        """Open ``key`` for reading as a binary file-like.

        Close it (or use ``with``) to release the file or connection. With ``verify``
        the checksum is compared when the stream is read to its end; the read that
        reaches the end raises on a mismatch.

        Args:
            key: Object key.
            verify: Check the content against its stored sha256; an object without a
                stored checksum is refused at once.

        Returns:
            A readable, non-seekable binary stream.

        Raises:
            InvalidInput: Bad key.
            NotFound: No such object.
            IntegrityError: ``verify`` and the object has no stored checksum.
            Unavailable: The backend cannot be reached.
        """
        validate_key(key)
        return self._open_stream(key, verify)

    def get_file(self, key: str, path: str | os.PathLike[str], *, verify: bool = True) -> None:
        """Download ``key`` to the local file ``path``, atomically.

        The bytes go to a hidden temporary file beside ``path`` that replaces ``path``
        only once complete, synced and verified; on any failure ``path`` is left as it
        was and the temporary file is removed. Missing parent folders are created.

        Args:
            key: Object key.
            path: Destination file; replaced if it exists.
            verify: Check the content against its stored sha256.

        Raises:
            InvalidInput: Bad key.
            NotFound: No such object.
            IntegrityError: ``verify`` and the content does not match its checksum.
            Unavailable: The backend cannot be reached.
        """
        validate_key(key)
        destination = Path(path)
        # A short, hidden, unique name so that it stays within the file-name limit.
        partial = destination.with_name(f".{destination.name[:64]}.{uuid.uuid4().hex}.part")
        # Open first: a missing object must not leave new folders behind.
        with self._open_stream(key, verify) as stream:
            destination.parent.mkdir(parents=True, exist_ok=True)
            try:
                with open(partial, "wb") as out:
                    for chunk in iter(lambda: stream.read(CHUNK_BYTES), b""):
                        out.write(chunk)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(partial, destination)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    partial.unlink()

    def exists(self, key: str) -> bool:
        """Tell whether an object is stored under ``key``.

        Args:
            key: Object key.

        Returns:
            True if ``key`` names an object (a mere prefix of other keys is not one).

        Raises:
            InvalidInput: Bad key.
            Unavailable: The backend cannot be reached.
        """
        validate_key(key)
        return self._exists(key)

    def stat(self, key: str) -> ObjectInfo:
        """Describe the object under ``key``, stored checksum included.

        Args:
            key: Object key.

        Returns:
            The object's information; ``sha256`` is None if it was written by another
            tool and carries no checksum.

        Raises:
            InvalidInput: Bad key.
            NotFound: No such object.
            Unavailable: The backend cannot be reached.
        """
        validate_key(key)
        return self._stat(key)

    def list(self, prefix: str = "", *, recursive: bool = True) -> Iterator[ObjectInfo]:
        """Yield the objects whose key starts with ``prefix``, sorted by key.

        Keys are compared as plain strings: ``"slides/TCGA-"`` matches
        ``"slides/TCGA-A1.svs"``. Order is by Unicode code point, which is also the
        byte order of UTF-8 used by S3.

        Args:
            prefix: Key prefix; empty lists everything.
            recursive: If False, only objects with no further ``/`` after the prefix
                are yielded (the sub-"folders" themselves are not).

        Yields:
            :class:`ObjectInfo` without ``sha256`` and ``content_type`` (None).

        Raises:
            InvalidInput: Bad prefix.
            Unavailable: The backend cannot be reached.
        """
        validate_prefix(prefix)
        return self._list(prefix, recursive)

    # ---------------------------------------------------------------------- deletes

    def delete(self, key: str) -> None:
        """Delete the object under ``key``; deleting a missing object is not an error.

        Args:
            key: Object key.

        Raises:
            InvalidInput: Bad key.
            Unavailable: The backend cannot be reached.
        """
        validate_key(key)
        self._delete(key)

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object whose key starts with ``prefix``.

        Args:
            prefix: Non-empty key prefix, typically ending with ``/``
                (``"tiles/slide-1/"``).

        Returns:
            Number of objects deleted.

        Raises:
            InvalidInput: Bad or empty prefix.
            Unavailable: The backend cannot be reached.
        """
        validate_prefix(prefix)
        if prefix == "":
            raise InvalidInput(
                "delete_prefix needs a non-empty prefix; refusing to empty the store"
            )
        return self._delete_prefix(prefix)

    # ---------------------------------------------------------------------- sharing

    def presigned_get_url(self, key: str, expires_s: int = 3600) -> str:
        """Return a URL from which ``key`` can be downloaded without credentials.

        Existence is not checked: a URL for a missing key fails when fetched.

        Args:
            key: Object key.
            expires_s: Lifetime of the URL, in seconds (1 to 7 days).

        Returns:
            The URL (``http(s)://`` on S3; ``file://`` on the file backend, where it
            does not expire and works only on the same machine).

        Raises:
            InvalidInput: Bad key or lifetime.
            Unavailable: The backend cannot be reached.
        """
        validate_key(key)
        if not isinstance(expires_s, int) or not 1 <= expires_s <= MAX_PRESIGNED_EXPIRES_S:
            raise InvalidInput(
                f"expires_s must be an int from 1 to {MAX_PRESIGNED_EXPIRES_S} seconds, "
                f"got {expires_s!r}"
            )
        return self._presigned_get_url(key, expires_s)

    # -------------------------------------------------------------------- lifecycle

    def close(self) -> None:  # noqa: B027 (optional hook, most backends hold nothing)
        """Release connections held by the store; the store is unusable afterwards."""

    def __enter__(self) -> ObjectStore:
        """Return the store itself."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Close the store."""
        self.close()

    def __repr__(self) -> str:
        """Name the backend and its URL."""
        return f"{type(self).__name__}({self.url!r})"

    # ---------------------------------------------------------------- backend hooks

    def _put_bytes(self, key: str, data: bytes, content_type: str) -> ObjectInfo:
        """Store ``data``; by default as a one-chunk stream."""
        return self._put_chunks(key, iter((data,)), content_type)

    def _put_file(self, key: str, path: Path, content_type: str) -> ObjectInfo:
        """Store a local file; by default by streaming it."""
        with open(path, "rb") as source:
            size_bytes = os.fstat(source.fileno()).st_size
            return self._put_chunks(key, iter_chunks(source, length_bytes=size_bytes), content_type)

    @abstractmethod
    def _put_chunks(self, key: str, chunks: Iterator[bytes], content_type: str) -> ObjectInfo:
        """Store the concatenated ``chunks``; nothing visible unless all succeed."""

    @abstractmethod
    def _open_stream(self, key: str, verify: bool) -> BinaryIO:
        """Open a validated key for reading."""

    @abstractmethod
    def _exists(self, key: str) -> bool:
        """Tell whether a validated key names an object."""

    @abstractmethod
    def _stat(self, key: str) -> ObjectInfo:
        """Describe a validated key."""

    @abstractmethod
    def _list(self, prefix: str, recursive: bool) -> Iterator[ObjectInfo]:
        """List under a validated prefix, sorted by key."""

    @abstractmethod
    def _delete(self, key: str) -> None:
        """Delete a validated key; missing is fine."""

    @abstractmethod
    def _delete_prefix(self, prefix: str) -> int:
        """Delete under a validated, non-empty prefix; return the count."""

    @abstractmethod
    def _presigned_get_url(self, key: str, expires_s: int) -> str:
        """Return a download URL for a validated key and lifetime."""
