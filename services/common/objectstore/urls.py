"""Store URLs: ``file:///absolute/path`` and ``s3://host:port/bucket``."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import SplitResult, unquote, urlsplit

from services.common.errors import InvalidInput

# S3 bucket naming rules: 3-63 of lowercase letters, digits, '.', '-'; alphanumeric ends.
_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_IPV4 = re.compile(r"\d+\.\d+\.\d+\.\d+")
_EXPECTED = "expected file:///absolute/path or s3://host:port/bucket"


@dataclass(frozen=True)
class FileLocation:
    """Where a ``file://`` store lives.

    Attributes:
        root: Absolute path of the store's folder.
    """

    root: Path


@dataclass(frozen=True)
class S3Location:
    """Where an ``s3://`` store lives.

    Attributes:
        endpoint: ``host:port`` (or ``host``) of the server.
        bucket: Bucket name.
    """

    endpoint: str
    bucket: str


def parse_store_url(url: str) -> FileLocation | S3Location:
    """Parse a store URL.

    Args:
        url: ``file:///absolute/path`` (percent-escapes allowed) or
            ``s3://host[:port]/bucket``. Credentials never go in the URL.

    Returns:
        The location the URL names.

    Raises:
        InvalidInput: Unknown scheme or malformed URL; the message says what is
            expected.
    """
    if not isinstance(url, str) or not url.strip():
        raise InvalidInput(f"object store URL must be a non-empty string; {_EXPECTED}")
    try:
        parts = urlsplit(url.strip())
    except ValueError as exc:
        raise InvalidInput(f"malformed object store URL {url!r}: {exc}; {_EXPECTED}") from exc
    scheme = parts.scheme.lower()
    if scheme == "file":
        return _file_location(url, parts)
    if scheme == "s3":
        return _s3_location(url, parts)
    shown = f"{scheme}://..." if scheme else repr(url)
    raise InvalidInput(f"unsupported object store URL {shown}; {_EXPECTED}")


def _file_location(url: str, parts: SplitResult) -> FileLocation:
    """Check a ``file:`` URL and return its folder."""
    if parts.netloc not in ("", "localhost"):
        raise InvalidInput(
            f"file store URL {url!r} names host {parts.netloc!r}; use three slashes and an "
            "absolute path, e.g. file:///var/lib/histomarker/store"
        )
    if parts.query or parts.fragment:
        raise InvalidInput(f"file store URL {url!r} must not have a query or fragment; {_EXPECTED}")
    path = unquote(parts.path)
    if not path.startswith("/"):
        raise InvalidInput(f"file store URL {url!r} must hold an absolute path; {_EXPECTED}")
    if "\x00" in path:
        raise InvalidInput(f"file store URL {url!r} holds a NUL character")
    return FileLocation(root=Path(path))


def _s3_location(url: str, parts: SplitResult) -> S3Location:
    """Check an ``s3:`` URL and return its endpoint and bucket."""
    if "@" in parts.netloc:
        # Do not echo the URL: it holds a secret.
        raise InvalidInput(
            "s3 store URL must not hold credentials; pass access_key and secret_key "
            "(HISTOMARKER_S3_ACCESS_KEY / HISTOMARKER_S3_SECRET_KEY) instead"
        )
    if parts.query or parts.fragment:
        raise InvalidInput(f"s3 store URL {url!r} must not have a query or fragment; {_EXPECTED}")
    host = parts.hostname
    if not host:
        raise InvalidInput(f"s3 store URL {url!r} has no host; {_EXPECTED}")
    try:
        port = parts.port
    except ValueError:
        raise InvalidInput(f"s3 store URL {url!r} has an invalid port; {_EXPECTED}") from None
    bucket = parts.path.strip("/")
    if not bucket or "/" in bucket:
        raise InvalidInput(
            f"s3 store URL {url!r} must name exactly one bucket after the host "
            "(s3://host:port/bucket)"
        )
    if not _BUCKET_NAME.fullmatch(bucket) or ".." in bucket or _IPV4.fullmatch(bucket):
        raise InvalidInput(
            f"s3 store URL {url!r}: {bucket!r} is not a valid bucket name (3-63 lowercase "
            "letters, digits, '.' or '-', starting and ending with a letter or digit)"
        )
    shown_host = f"[{host}]" if ":" in host else host
    endpoint = shown_host if port is None else f"{shown_host}:{port}"
    return S3Location(endpoint=endpoint, bucket=bucket)
