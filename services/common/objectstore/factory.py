"""Opening a store from its URL."""

from __future__ import annotations

from services.common.objectstore.base import ObjectStore
from services.common.objectstore.filesystem import FileObjectStore
from services.common.objectstore.urls import FileLocation, parse_store_url


def open_store(
    url: str,
    *,
    access_key: str | None = None,
    secret_key: str | None = None,
    secure: bool = False,
) -> ObjectStore:
    """Open the object store named by ``url``.

    ``file:///path`` creates the folder if needed; ``s3://host:port/bucket`` connects
    and creates the bucket if missing. The credentials and ``secure`` only matter for
    ``s3://`` and are ignored for ``file://``.

    Args:
        url: ``file:///absolute/path`` or ``s3://host:port/bucket``.
        access_key: S3 access key.
        secret_key: S3 secret key.
        secure: Use HTTPS towards the S3 endpoint.

    Returns:
        The store; close it (or use ``with``) when done.

    Raises:
        InvalidInput: Unknown scheme or malformed URL.
        Unavailable: The S3 endpoint cannot be reached, or the folder cannot be made.
        Unauthenticated: The S3 endpoint refuses the credentials.
    """
    location = parse_store_url(url)
    if isinstance(location, FileLocation):
        return FileObjectStore(location.root)
    # Imported here so that the embedded default never loads the S3 SDK.
    from services.common.objectstore.s3 import S3ObjectStore

    return S3ObjectStore(
        location.endpoint,
        location.bucket,
        access_key=access_key,
        secret_key=secret_key,
        secure=secure,
    )
