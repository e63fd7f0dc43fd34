"""Slides from the object store as local files (OpenSlide needs a path).

A slide object is downloaded once into a cache folder, named by its key's hash and
kept with its original file name (vendors' readers look at the extension); the
download goes to a temporary name first, so a half-downloaded slide is never opened.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
import threading
import weakref
from pathlib import Path, PurePosixPath

from services.common.errors import InvalidInput
from services.common.objectstore import ObjectStore, validate_key

_SLIDE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def slide_id_for(slide_id: str, key: str) -> str:
    """The slide id to use: the given one, else the key's file name without extension.

    Raises:
        InvalidInput: The id is not letters, digits, '.', '_' or '-' (it names keys).
    """
    chosen = slide_id or PurePosixPath(key).name.split(".")[0]
    if not _SLIDE_ID.match(chosen) or chosen in {".", ".."}:
        raise InvalidInput(
            f"slide id {chosen!r} must be 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return chosen


class SlideCache:
    """Local copies of slide objects.

    Args:
        store: Where slides are.
        folder: Cache folder (created).
    """

    def __init__(self, store: ObjectStore, folder: Path) -> None:
        self.store = store
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    @classmethod
    def temporary(cls, store: ObjectStore) -> SlideCache:
        """A cache in a fresh temporary folder that is removed with the cache, or when
        the process exits (a service stopped by SIGTERM leaves no slide copies)."""
        cache = cls(store, Path(tempfile.mkdtemp(prefix="histomarker-slides-")))
        weakref.finalize(cache, shutil.rmtree, str(cache.folder), ignore_errors=True)
        return cache

    @classmethod
    def of(cls, store: ObjectStore, folder: Path | None) -> SlideCache:
        """The cache in ``folder`` (kept), or a temporary one when None."""
        return cls(store, folder) if folder is not None else cls.temporary(store)

    def local_path(self, key: str) -> Path:
        """The slide at ``key`` as a local file, downloading it on first use.

        Raises:
            InvalidInput: A bad key.
            NotFound: No such object.
        """
        validate_key(key)
        info = self.store.stat(key)
        digest = hashlib.sha256(f"{key}\0{info.etag}\0{info.size_bytes}".encode()).hexdigest()
        target = self.folder / digest[:24] / PurePosixPath(key).name
        with self._lock:
            if target.is_file() and target.stat().st_size == info.size_bytes:
                return target
            target.parent.mkdir(parents=True, exist_ok=True)
            # Slides uploaded by other tools carry no checksum: verify when one exists.
            self.store.get_file(key, target, verify=info.sha256 is not None)
        return target
