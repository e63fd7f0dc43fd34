"""Object store: one interface, two backends (``file://`` and ``s3://``).

Typical use::

    from services.common.objectstore import open_store

    with open_store(settings.store_url) as store:
        store.put_file("slides/TCGA-A1-A0SB.svs", local_path)
        data = store.get_bytes("cohorts/tcga/manifest.csv")

Writes are atomic, every object carries its sha256, and keys are validated by
:func:`validate_key` before any I/O. See :class:`ObjectStore` for the operations and
the decisions common to both backends.
"""

from __future__ import annotations

from services.common.objectstore.base import DEFAULT_CONTENT_TYPE, ObjectInfo, ObjectStore
from services.common.objectstore.factory import open_store
from services.common.objectstore.integrity import IntegrityError
from services.common.objectstore.keys import validate_key, validate_prefix

__all__ = [
    "DEFAULT_CONTENT_TYPE",
    "IntegrityError",
    "ObjectInfo",
    "ObjectStore",
    "open_store",
    "validate_key",
    "validate_prefix",
]
