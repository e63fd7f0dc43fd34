"""Checks on the object references carried inside request messages.

Every request may carry ``histomarker.v1.ObjectRef`` values at any depth; a server
calls :func:`validate_refs` first so that a bad key or bucket is refused with a
readable INVALID_ARGUMENT before any work or I/O starts.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from services.common.errors import InvalidInput
from services.common.objectstore import validate_key

OBJECT_REF = "histomarker.v1.ObjectRef"
# S3 bucket naming rules: 3-63 lowercase letters, digits, dots and hyphens.
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def validate_bucket(bucket: str) -> str:
    """Return ``bucket`` if it is a valid S3 bucket name, else raise InvalidInput."""
    if not _BUCKET.match(bucket) or ".." in bucket:
        raise InvalidInput(
            f"invalid bucket name {bucket!r}: use 3-63 lowercase letters, digits, '.' or '-'"
        )
    return bucket


def _refs(message: Message, path: str) -> Iterator[tuple[str, Message]]:
    if message.DESCRIPTOR.full_name == OBJECT_REF:
        yield path, message
        return
    for field, value in message.ListFields():
        if field.type != FieldDescriptor.TYPE_MESSAGE:
            continue
        if field.message_type.GetOptions().map_entry:
            items: Any = value.values()
        elif field.is_repeated:
            items = value
        else:
            items = [value]
        for index, item in enumerate(items):
            name = f"{field.name}[{index}]" if field.is_repeated else field.name
            if isinstance(item, Message):
                yield from _refs(item, f"{path}.{name}" if path else name)


def validate_refs(message: Message) -> None:
    """Check every ObjectRef inside ``message`` (at any depth).

    An empty bucket means the service's default bucket; a key must pass
    :func:`services.common.objectstore.validate_key`.

    Raises:
        InvalidInput: naming the field path and what is wrong.
    """
    for path, ref in _refs(message, ""):
        bucket = getattr(ref, "bucket", "")
        key = getattr(ref, "key", "")
        try:
            if bucket:
                validate_bucket(bucket)
            validate_key(key)
        except InvalidInput as exc:
            raise InvalidInput(f"{path or 'request'}: {exc}") from None


def served_key(ref: Any, bucket: str, what: str) -> str:
    """The object key of ``ref`` when it names this service's ``bucket`` (or none).

    Args:
        ref: An ``ObjectRef`` message.
        bucket: The bucket the service serves.
        what: The field's name, for the error message.

    Raises:
        InvalidInput: Another bucket, or no key.
    """
    if ref.bucket and ref.bucket != bucket:
        raise InvalidInput(
            f"{what}: bucket {ref.bucket!r} is not served here (this service serves {bucket!r})"
        )
    if not ref.key:
        raise InvalidInput(f"{what}: an object key is required")
    return str(ref.key)
