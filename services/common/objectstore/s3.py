"""The ``s3://`` backend, through the ``minio`` SDK (imported here only).

Each object carries the hex sha256 of its bytes as user metadata
(``x-amz-meta-sha256``). The checksum has to travel with the first request of an
upload, so a stream of unknown content is first spooled to a local temporary file
(in memory up to :data:`SPOOL_MEMORY_BYTES`, on disk beyond) while it is hashed, then
uploaded with its length known. Nothing reaches the server until the stream has been
read whole, so a stream that fails part-way leaves nothing behind; large objects go up
as multipart uploads, which S3 makes visible only when complete.

Errors: a missing object or bucket is :class:`NotFound`; refused credentials are
:class:`Unauthenticated`; an unreachable endpoint, a connection cut mid-way or a
server error that outlived the retries is :class:`Unavailable`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import BinaryIO, NoReturn, cast

import urllib3
from minio import Minio
from minio.deleteobjects import DeleteObject
from minio.error import InvalidResponseError, S3Error, ServerError
from minio.helpers import ObjectWriteResult
from urllib3.response import BaseHTTPResponse

from services.common.errors import (
    HistomarkerError,
    InvalidInput,
    NotFound,
    Unauthenticated,
    Unavailable,
)
from services.common.objectstore.base import ObjectInfo, ObjectStore
from services.common.objectstore.integrity import IntegrityError, VerifyingReader, is_sha256_hex
from services.common.objectstore.streams import CHUNK_BYTES

#: HTTP header of the user metadata holding an object's hex sha256.
SHA256_HEADER = "x-amz-meta-sha256"
#: Part size of multipart uploads, in bytes (S3 allows 5 MiB to 5 GiB).
PART_SIZE_BYTES = 8 * 1024 * 1024
#: Most parts in one multipart upload (an S3 limit).
_MAX_PARTS = 10_000
#: Bytes of a stream kept in memory while spooling before it moves to a disk file.
SPOOL_MEMORY_BYTES = 8 * 1024 * 1024
#: Seconds allowed to open a connection to the endpoint.
CONNECT_TIMEOUT_S = 10.0
#: Seconds allowed between two reads from the endpoint.
READ_TIMEOUT_S = 120.0

_UNAUTHENTICATED_CODES = frozenset(
    {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken"}
)
_UNAVAILABLE_CODES = frozenset(
    {
        "SlowDown",
        "ServiceUnavailable",
        "InternalError",
        "RequestTimeout",
        "XMinioServerNotInitialized",
    }
)
_ALREADY_MINE_CODES = frozenset({"BucketAlreadyOwnedByYou", "BucketAlreadyExists"})
#: Exceptions raised by the HTTP layer when the endpoint cannot be talked to.
_CONNECTION_ERRORS = (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError)


class S3ObjectStore(ObjectStore):
    """Objects in one bucket of an S3-protocol server (MinIO, AWS S3, moto, ...)."""

    def __init__(
        self,
        endpoint: str,
        bucket: str,
        *,
        access_key: str | None = None,
        secret_key: str | None = None,
        secure: bool = False,
        create_bucket: bool = True,
        connect_retries: int = 2,
    ) -> None:
        """Connect to ``bucket`` at ``endpoint``, creating the bucket if missing.

        Args:
            endpoint: ``host:port`` of the server, without scheme.
            bucket: Bucket name.
            access_key: Access key; None for anonymous access.
            secret_key: Secret key, required with ``access_key``.
            secure: Talk HTTPS instead of HTTP.
            create_bucket: Check for the bucket now and create it if missing; False
                defers every request to the first operation.
            connect_retries: Extra attempts when a connection cannot be opened (with a
                short backoff) before :class:`Unavailable` is raised.

        Raises:
            InvalidInput: Malformed endpoint, or a secret key missing.
            Unavailable: ``create_bucket`` and the endpoint cannot be reached.
            Unauthenticated: ``create_bucket`` and the credentials are refused.
        """
        self._endpoint = endpoint
        self._bucket = bucket
        self._secure = secure
        retries = urllib3.Retry(
            total=connect_retries + 3,
            connect=connect_retries,
            read=2,
            backoff_factor=0.2,
            status_forcelist=[500, 502, 503, 504],
        )
        self._http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=CONNECT_TIMEOUT_S, read=READ_TIMEOUT_S),
            retries=retries,
            maxsize=10,
        )
        try:
            self._client = Minio(
                endpoint,
                access_key=access_key,
                secret_key=secret_key,
                secure=secure,
                http_client=self._http,
            )
        except ValueError as exc:
            raise InvalidInput(f"cannot use S3 endpoint {endpoint!r}: {exc}") from exc
        if create_bucket:
            self._ensure_bucket()

    @property
    def url(self) -> str:
        """``s3://host:port/bucket`` (no credentials)."""
        return f"s3://{self._endpoint}/{self._bucket}"

    def close(self) -> None:
        """Close the pooled HTTP connections."""
        self._http.clear()

    def _ensure_bucket(self) -> None:
        """Create the bucket unless it exists (tolerating a concurrent creator)."""
        with self._errors():
            if self._client.bucket_exists(self._bucket):
                return
            try:
                self._client.make_bucket(self._bucket)
            except S3Error as exc:
                if exc.code not in _ALREADY_MINE_CODES:
                    raise

    # ------------------------------------------------------------------------ puts

    def _put_bytes(self, key: str, data: bytes, content_type: str) -> ObjectInfo:
        sha256 = hashlib.sha256(data).hexdigest()
        return self._upload(key, io.BytesIO(data), len(data), sha256, content_type)

    def _put_file(self, key: str, path: Path, content_type: str) -> ObjectInfo:
        with open(path, "rb") as source:
            digest = hashlib.sha256()
            size_bytes = 0
            for chunk in iter(lambda: source.read(CHUNK_BYTES), b""):
                digest.update(chunk)
                size_bytes += len(chunk)
            source.seek(0)
            return self._upload(key, source, size_bytes, digest.hexdigest(), content_type)

    def _put_chunks(self, key: str, chunks: Iterator[bytes], content_type: str) -> ObjectInfo:
        with tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY_BYTES) as spool:
            digest = hashlib.sha256()
            size_bytes = 0
            for chunk in chunks:
                spool.write(chunk)
                digest.update(chunk)
                size_bytes += len(chunk)
            spool.seek(0)
            return self._upload(
                key, cast(BinaryIO, spool), size_bytes, digest.hexdigest(), content_type
            )

    def _upload(
        self, key: str, source: BinaryIO, size_bytes: int, sha256: str, content_type: str
    ) -> ObjectInfo:
        """Send ``size_bytes`` bytes of ``source`` with their checksum as metadata.

        Args:
            key: Object key.
            source: Readable positioned at the start of the content.
            size_bytes: Exact content size, in bytes.
            sha256: Hex sha256 of the content.
            content_type: MIME type.

        Returns:
            Information about the stored object.
        """
        # Whole MiB, large enough to stay within the part-count limit.
        needed = -(-size_bytes // _MAX_PARTS)
        part_size = max(PART_SIZE_BYTES, -(-needed // (1 << 20)) * (1 << 20))
        with self._errors(key):
            result = self._client.put_object(
                self._bucket,
                key,
                source,
                size_bytes,
                content_type=content_type,
                metadata={SHA256_HEADER: sha256},
                part_size=part_size,
            )
        return ObjectInfo(
            key=key,
            size_bytes=size_bytes,
            sha256=sha256,
            etag=result.etag or "",
            modified=_write_time(result),
            content_type=content_type,
        )

    # ----------------------------------------------------------------------- reads

    def _open_stream(self, key: str, verify: bool) -> BinaryIO:
        with self._errors(key):
            response = self._client.get_object(self._bucket, key)
        source = _ResponseSource(response, self)
        sha256 = response.headers.get(SHA256_HEADER)
        if verify and not is_sha256_hex(sha256):
            source.close()
            raise IntegrityError(
                f"object {key!r} in {self.url} carries no valid sha256 checksum "
                f"({SHA256_HEADER}): it was not written through the store (read it with "
                "verify=False, or put it again)"
            )
        length = response.headers.get("Content-Length")
        reader = VerifyingReader(
            source,
            label=f"{key!r} in {self.url}",
            expected_sha256=sha256 if verify else None,
            expected_size_bytes=int(length) if verify and length is not None else None,
            on_close=source.close,
        )
        return io.BufferedReader(reader, CHUNK_BYTES)

    def _stat(self, key: str) -> ObjectInfo:
        with self._errors(key):
            found = self._client.stat_object(self._bucket, key)
        sha256 = (found.metadata or {}).get(SHA256_HEADER)
        return ObjectInfo(
            key=key,
            size_bytes=found.size or 0,
            sha256=sha256 if is_sha256_hex(sha256) else None,
            etag=found.etag or "",
            modified=found.last_modified or datetime.now(UTC),
            content_type=found.content_type,
        )

    def _exists(self, key: str) -> bool:
        try:
            self._stat(key)
        except NotFound:
            return False
        return True

    # ----------------------------------------------------------------------- lists

    def _list(self, prefix: str, recursive: bool) -> Iterator[ObjectInfo]:
        with self._errors():
            listing = self._client.list_objects(
                self._bucket, prefix=prefix or None, recursive=recursive
            )
            for found in listing:
                name = found.object_name
                # Common prefixes (non-recursive) and console "folder" markers.
                if name is None or found.is_dir or name.endswith("/"):
                    continue
                yield ObjectInfo(
                    key=name,
                    size_bytes=found.size or 0,
                    sha256=None,
                    etag=found.etag or "",
                    modified=found.last_modified or datetime.now(UTC),
                )

    # --------------------------------------------------------------------- deletes

    def _delete(self, key: str) -> None:
        with self._errors(key):
            self._client.remove_object(self._bucket, key)

    def _delete_prefix(self, prefix: str) -> int:
        count = 0

        def targets() -> Iterator[DeleteObject]:
            nonlocal count
            for found in self._client.list_objects(self._bucket, prefix=prefix, recursive=True):
                if found.object_name is not None:
                    count += 1
                    yield DeleteObject(found.object_name)

        with self._errors():
            failures = list(self._client.remove_objects(self._bucket, targets()))
        if failures:
            first = failures[0]
            raise HistomarkerError(
                f"could not delete {len(failures)} of {count} objects under {prefix!r} in "
                f"{self.url}; first: {first.name!r}: {first.code} {first.message}"
            )
        return count

    # --------------------------------------------------------------------- sharing

    def _presigned_get_url(self, key: str, expires_s: int) -> str:
        with self._errors(key):
            return self._client.presigned_get_object(
                self._bucket, key, expires=timedelta(seconds=expires_s)
            )

    # ---------------------------------------------------------------------- errors

    @contextlib.contextmanager
    def _errors(self, key: str | None = None) -> Iterator[None]:
        """Translate SDK and HTTP exceptions into the typed errors of histomarker.

        Args:
            key: Object concerned, for messages; None for bucket-level calls.
        """
        try:
            yield
        except S3Error as exc:
            self._raise_s3_error(exc, key)
        except (ServerError, InvalidResponseError) as exc:
            raise Unavailable(
                f"S3 endpoint {self._endpoint} answered with an error: {_first_line(exc)}"
            ) from exc
        except _CONNECTION_ERRORS as exc:
            raise Unavailable(
                f"S3 endpoint {self._endpoint} cannot be reached: {_first_line(exc)}"
            ) from exc

    def _raise_s3_error(self, exc: S3Error, key: str | None) -> NoReturn:
        """Raise the typed error matching an S3 error response."""
        where = f"{key!r} in {self.url}" if key is not None else self.url
        if exc.code == "NoSuchKey":
            raise NotFound(f"object {where} not found") from exc
        if exc.code == "NoSuchBucket":
            raise NotFound(f"bucket {self._bucket!r} not found at {self._endpoint}") from exc
        if exc.code in _UNAUTHENTICATED_CODES:
            raise Unauthenticated(
                f"S3 endpoint {self._endpoint} refused the credentials for {where}: {exc.code}"
            ) from exc
        if exc.code in _UNAVAILABLE_CODES:
            raise Unavailable(f"S3 endpoint {self._endpoint} is not ready: {exc.code}") from exc
        raise HistomarkerError(f"S3 error on {where}: {exc.code}: {exc.message}") from exc


class _ResponseSource:
    """The body of a GET, read in pieces; errors typed; closing frees the connection."""

    def __init__(self, response: BaseHTTPResponse, store: S3ObjectStore) -> None:
        """Wrap ``response``.

        Args:
            response: Streaming (not preloaded) HTTP response from ``get_object``.
            store: The store, whose error translation applies to reads.
        """
        self._response = response
        self._store = store
        self._closed = False

    def read(self, size: int = -1, /) -> bytes:
        """Return up to ``size`` bytes of the body; ``b""`` at its end."""
        with self._store._errors():
            return self._response.read(None if size < 0 else size)

    def close(self) -> None:
        """Close the response and hand its connection back to the pool."""
        if not self._closed:
            self._closed = True
            self._response.close()
            self._response.release_conn()


def _write_time(result: ObjectWriteResult) -> datetime:
    """When the server stored an object, from the PUT response (else now, in UTC)."""
    if result.last_modified is not None:
        return result.last_modified
    for header in ("Last-Modified", "Date"):
        value = result.http_headers.get(header)
        if value:
            with contextlib.suppress(TypeError, ValueError):
                return parsedate_to_datetime(value).astimezone(UTC)
    return datetime.now(UTC)


def _first_line(exc: BaseException) -> str:
    """A short, single-line description of ``exc``."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
