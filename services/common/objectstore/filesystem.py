"""The ``file://`` backend: objects as plain files under one folder.

Layout under the root folder (``<h>`` is the hex sha256 of the key, ``<hh>`` its first
two digits, ``<version>`` is ``<inode>-<mtime_ns>-<size>`` of a data file, in hex)::

    <key>                                        the object's bytes, a plain file
    <folder of key>/.objectstore-tmp-<uuid>      a put in flight
    .objectstore/checksums/<hh>/<h>/<version>.json   checksum record of one version
    .objectstore/locks/<hh>.lock                 commit lock of the keys hashing to <hh>

Names starting with ``.objectstore`` are reserved (see :mod:`.keys`), so temporary
files and bookkeeping never collide with an object and ``list``/``exists`` never
show them.

How a put stays atomic: the bytes go to a temporary file in the target's folder,
are fsynced, and ``os.replace`` swaps it in. How the checksum stays consistent with
the bytes although they live in two files: the record is named after the version
(inode, mtime, size) of the data file it describes and is written *before* the swap.
A reader opens the data file, takes its version from ``fstat`` and reads that
version's record, so it never pairs old bytes with a newer checksum. Records of
replaced versions are removed under the per-key commit lock; a reader that loses its
record that way sees the file has changed and starts again on the new version.
Editing a file behind the store's back gives it a version with no record, which
verified reads refuse.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import os
import stat as stat_flags
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from services.common.errors import (
    FailedPrecondition,
    InvalidInput,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from services.common.objectstore.base import ObjectInfo, ObjectStore
from services.common.objectstore.integrity import IntegrityError, VerifyingReader, is_sha256_hex
from services.common.objectstore.keys import RESERVED_SEGMENT_PREFIX, validate_key
from services.common.objectstore.streams import CHUNK_BYTES

#: Folder under the root holding checksum records and locks.
INTERNAL_DIR = RESERVED_SEGMENT_PREFIX
#: Name prefix of in-flight put files, next to their target.
TEMP_PREFIX = f"{RESERVED_SEGMENT_PREFIX}-tmp-"
#: How often a read starts over when the object keeps being replaced under it.
_MAX_OPEN_ATTEMPTS = 50
#: How often a put re-creates its folder when a concurrent delete pruned it.
_MAX_FOLDER_ATTEMPTS = 5


@dataclass(frozen=True)
class _Record:
    """Checksum record of one version of one object."""

    sha256: str
    size_bytes: int
    content_type: str


class FileObjectStore(ObjectStore):
    """Objects stored as plain files under a root folder (the embedded default)."""

    def __init__(self, root: Path) -> None:
        """Open (and create if needed) the store rooted at ``root``.

        Args:
            root: Absolute path of the store's folder.

        Raises:
            InvalidInput: ``root`` is relative or is an existing non-folder.
            Unavailable: The folder cannot be created.
        """
        if not root.is_absolute():
            raise InvalidInput(f"file store root must be an absolute path, got {str(root)!r}")
        if root.exists() and not root.is_dir():
            raise InvalidInput(f"file store root {str(root)!r} exists and is not a folder")
        self._root = root
        self._records_root = root / INTERNAL_DIR / "checksums"
        self._locks_root = root / INTERNAL_DIR / "locks"
        try:
            self._records_root.mkdir(parents=True, exist_ok=True)
            self._locks_root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise Unavailable(f"cannot create the file store folder {str(root)!r}: {exc}") from exc

    @property
    def url(self) -> str:
        """The ``file://`` URL of the root folder."""
        return self._root.as_uri()

    @property
    def root(self) -> Path:
        """The root folder; an object's bytes are at ``root / key``."""
        return self._root

    # ------------------------------------------------------------------------ puts

    def _put_chunks(self, key: str, chunks: Iterator[bytes], content_type: str) -> ObjectInfo:
        target = self._data_path(key)
        with _disk_errors(key):
            fd, temp = self._create_temp(key, target)
            committed = False
            try:
                digest = hashlib.sha256()
                size_bytes = 0
                with os.fdopen(fd, "wb") as out:
                    for chunk in chunks:
                        out.write(chunk)
                        digest.update(chunk)
                        size_bytes += len(chunk)
                    out.flush()
                    os.fsync(out.fileno())
                    written = os.fstat(out.fileno())
                version = _version_of(written)
                record = _Record(digest.hexdigest(), size_bytes, content_type)
                with self._commit_lock(key):
                    record_path = self._write_record(key, version, record)
                    try:
                        os.replace(temp, target)
                    except BaseException as exc:
                        record_path.unlink(missing_ok=True)
                        if isinstance(exc, IsADirectoryError):
                            raise FailedPrecondition(
                                f"cannot store {key!r} in {self.url}: other objects have keys "
                                f"starting with {key + '/'!r}, and the file backend cannot hold "
                                "an object and a prefix of the same name"
                            ) from exc
                        raise
                    committed = True
                    self._drop_records(key, keep=version)
            finally:
                if not committed:
                    temp.unlink(missing_ok=True)
            _fsync_folder(target.parent)
        return ObjectInfo(
            key=key,
            size_bytes=size_bytes,
            sha256=record.sha256,
            etag=version,
            modified=_modified_of(written),
            content_type=content_type,
        )

    def _create_temp(self, key: str, target: Path) -> tuple[int, Path]:
        """Create the in-flight file of a put, in the target's folder.

        Args:
            key: Object key, for messages.
            target: Final path of the object.

        Returns:
            An open write-only descriptor and the temporary file's path.

        Raises:
            FailedPrecondition: A folder on the way is an object (``a`` when putting
                ``a/b``).
        """
        for _ in range(_MAX_FOLDER_ATTEMPTS):
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
            except (FileExistsError, NotADirectoryError) as exc:
                raise FailedPrecondition(
                    f"cannot store {key!r} in {self.url}: a prefix of it is itself an object, "
                    "and the file backend cannot hold an object and a prefix of the same name"
                ) from exc
            temp = target.parent / f"{TEMP_PREFIX}{uuid.uuid4().hex}"
            try:
                # 0o666 minus the umask, like any new file; mkstemp's 0o600 would make
                # objects unreadable to other users of a shared store.
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
                return os.open(temp, flags, 0o666), temp
            except FileNotFoundError:
                continue  # a concurrent delete pruned the empty folder; make it again
        raise Unavailable(f"cannot create a folder for {key!r} in {self.url}: it keeps vanishing")

    # ----------------------------------------------------------------------- reads

    def _open_stream(self, key: str, verify: bool) -> BinaryIO:
        handle, record = self._open_current(key)
        if verify and record is None:
            handle.close()
            raise IntegrityError(
                f"object {key!r} in {self.url} has no checksum record for its current "
                "content: it was written or changed outside the store (read it with "
                "verify=False, or put it again)"
            )
        reader = VerifyingReader(
            handle,
            label=f"{key!r} in {self.url}",
            expected_sha256=record.sha256 if verify and record else None,
            expected_size_bytes=record.size_bytes if verify and record else None,
            on_close=handle.close,
        )
        return io.BufferedReader(reader, CHUNK_BYTES)

    def _stat(self, key: str) -> ObjectInfo:
        handle, record = self._open_current(key)
        with handle:
            status = os.fstat(handle.fileno())
        return ObjectInfo(
            key=key,
            size_bytes=status.st_size,
            sha256=record.sha256 if record else None,
            etag=_version_of(status),
            modified=_modified_of(status),
            content_type=record.content_type if record else None,
        )

    def _exists(self, key: str) -> bool:
        return self._data_path(key).is_file()

    def _open_current(self, key: str) -> tuple[io.FileIO, _Record | None]:
        """Open the object's data file together with the record of that very version.

        Returns:
            The open data file (caller closes it) and its checksum record, or None if
            that version has none (it was written outside the store).

        Raises:
            NotFound: No such object.
            Unavailable: The object was replaced too many times while being opened.
        """
        path = self._data_path(key)
        for _ in range(_MAX_OPEN_ATTEMPTS):
            handle = self._open_data(key, path)
            try:
                version = _version_of(os.fstat(handle.fileno()))
                record = self._read_record(key, version)
                if record is not None or _current_version(path) == version:
                    return handle, record
            except BaseException:
                handle.close()
                raise
            # Replaced (or deleted) since we opened it, and its record went with the
            # old version: start again on what is there now.
            handle.close()
        raise Unavailable(f"object {key!r} in {self.url} kept changing while being opened")

    def _open_data(self, key: str, path: Path) -> io.FileIO:
        """Open the data file of ``key`` for reading, unbuffered.

        Raises:
            NotFound: No object (nothing there, or a folder, i.e. only a prefix).
        """
        try:
            handle = io.FileIO(path, "r")
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise self._not_found(key) from None
        if not stat_flags.S_ISREG(os.fstat(handle.fileno()).st_mode):
            handle.close()
            raise self._not_found(key)
        return handle

    # ----------------------------------------------------------------------- lists

    def _list(self, prefix: str, recursive: bool) -> Iterator[ObjectInfo]:
        folder_part, _, name_start = prefix.rpartition("/")
        folder = self._root.joinpath(*folder_part.split("/")) if folder_part else self._root
        key_base = f"{folder_part}/" if folder_part else ""
        return self._walk(folder, key_base, name_start, recursive)

    def _walk(
        self, folder: Path, key_base: str, name_start: str, recursive: bool
    ) -> Iterator[ObjectInfo]:
        """Yield the objects under ``folder`` in key order.

        Entries are visited sorted by name, with ``/`` appended to folder names: every
        key inside folder ``d`` starts with ``d/``, so this order is exactly the order
        of the full keys.

        Args:
            folder: Folder to scan.
            key_base: Key prefix corresponding to ``folder`` (``""`` or ending in ``/``).
            name_start: Only entries whose name starts with this are considered.
            recursive: Descend into sub-folders.
        """
        try:
            with os.scandir(folder) as scan:
                entries = [entry for entry in scan if entry.name.startswith(name_start)]
        except (FileNotFoundError, NotADirectoryError):
            return
        ordered: list[tuple[str, os.DirEntry[str], bool]] = []
        for entry in entries:
            # Skips temp files, bookkeeping, foreign names, and (since keys are at
            # most 1024 bytes) ends any symlink loop.
            if not _is_valid_key(key_base + entry.name):
                continue
            try:
                if entry.is_dir():
                    if recursive:
                        ordered.append((entry.name + "/", entry, True))
                elif entry.is_file():
                    ordered.append((entry.name, entry, False))
            except OSError:
                continue
        ordered.sort(key=lambda item: item[0])
        for _, entry, is_folder in ordered:
            key = key_base + entry.name
            if is_folder:
                yield from self._walk(Path(entry.path), key + "/", "", recursive)
                continue
            try:
                status = entry.stat()
            except FileNotFoundError:
                continue  # deleted while we were listing
            yield ObjectInfo(
                key=key,
                size_bytes=status.st_size,
                sha256=None,
                etag=_version_of(status),
                modified=_modified_of(status),
            )

    # --------------------------------------------------------------------- deletes

    def _delete(self, key: str) -> None:
        self._delete_one(key)

    def _delete_prefix(self, prefix: str) -> int:
        # Collect first: deleting prunes folders the walk would still visit.
        keys = [info.key for info in self._list(prefix, True)]
        return sum(1 for key in keys if self._delete_one(key))

    def _delete_one(self, key: str) -> bool:
        """Delete the data file and records of ``key``; prune emptied folders.

        Returns:
            True if an object was deleted, False if there was none.
        """
        path = self._data_path(key)
        with self._commit_lock(key):
            try:
                path.unlink()
                deleted = True
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                deleted = False
            self._drop_records(key, keep=None)
        self._prune_folders(path.parent, stop=self._root)
        return deleted

    def _prune_folders(self, folder: Path, *, stop: Path) -> None:
        """Remove ``folder`` and its parents while they are empty, up to ``stop``."""
        while folder != stop and stop in folder.parents:
            try:
                folder.rmdir()
            except OSError:
                return
            folder = folder.parent

    # --------------------------------------------------------------------- sharing

    def _presigned_get_url(self, key: str, expires_s: int) -> str:
        # There is no server to sign for: hand out the file's own URL. It does not
        # expire and is only useful on this machine, like the store itself.
        return self._data_path(key).as_uri()

    # ------------------------------------------------------------- checksum records

    def _data_path(self, key: str) -> Path:
        """Path of the data file of a validated key."""
        return self._root.joinpath(*key.split("/"))

    def _record_folder(self, key: str) -> Path:
        """Folder holding the checksum records of ``key``'s versions."""
        digest = _key_digest(key)
        return self._records_root / digest[:2] / digest

    def _write_record(self, key: str, version: str, record: _Record) -> Path:
        """Atomically write the record of ``version``; return its path.

        Must hold the key's commit lock.
        """
        folder = self._record_folder(key)
        folder.mkdir(parents=True, exist_ok=True)
        final = folder / f"{version}.json"
        temp = folder / f".tmp-{uuid.uuid4().hex}"
        body = {
            "key": key,
            "version": version,
            "sha256": record.sha256,
            "size_bytes": record.size_bytes,
            "content_type": record.content_type,
        }
        try:
            with open(temp, "w", encoding="utf-8") as out:
                json.dump(body, out)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temp, final)
        finally:
            temp.unlink(missing_ok=True)
        _fsync_folder(folder)
        return final

    def _read_record(self, key: str, version: str) -> _Record | None:
        """Read the record of one version of ``key``; None if absent or unusable."""
        path = self._record_folder(key) / f"{version}.json"
        try:
            with open(path, encoding="utf-8") as source:
                body = json.load(source)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return None  # unreadable counts as absent: verified reads will refuse
        if not isinstance(body, dict) or not is_sha256_hex(body.get("sha256")):
            return None
        size_bytes = body.get("size_bytes")
        content_type = body.get("content_type")
        if not isinstance(size_bytes, int) or not isinstance(content_type, str):
            return None
        return _Record(body["sha256"], size_bytes, content_type)

    def _drop_records(self, key: str, *, keep: str | None) -> None:
        """Remove the records of ``key`` except that of version ``keep``.

        Must hold the key's commit lock, so no record of this key is being written.
        """
        folder = self._record_folder(key)
        kept = None if keep is None else f"{keep}.json"
        try:
            with os.scandir(folder) as scan:
                names = [entry.name for entry in scan]
        except FileNotFoundError:
            return
        for name in names:
            if name != kept:
                (folder / name).unlink(missing_ok=True)
        if kept is None:
            self._prune_folders(folder, stop=self._records_root)

    @contextlib.contextmanager
    def _commit_lock(self, key: str) -> Iterator[None]:
        """Hold the lock serializing commits and deletes of ``key`` (and its stripe).

        An ``flock`` on one of 256 lock files, chosen by the key's hash; works across
        threads (one open file each) and processes on the same machine.
        """
        path = self._locks_root / f"{_key_digest(key)[:2]}.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _not_found(self, key: str) -> NotFound:
        """The NotFound error for ``key``."""
        return NotFound(f"object {key!r} not found in {self.url}")


def _key_digest(key: str) -> str:
    """Hex sha256 of a key's UTF-8 bytes: its name among checksum records."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _version_of(status: os.stat_result) -> str:
    """Version tag of a data file: ``<inode>-<mtime_ns>-<size>`` in hex.

    Replacing a file always changes its inode while a reader holds the old one open,
    and editing it in place changes its mtime, so the tag tells versions apart.
    """
    return f"{status.st_ino:x}-{status.st_mtime_ns:x}-{status.st_size:x}"


def _current_version(path: Path) -> str | None:
    """Version tag of what is at ``path`` now, or None if nothing is."""
    try:
        return _version_of(os.stat(path))
    except (FileNotFoundError, NotADirectoryError):
        return None


def _modified_of(status: os.stat_result) -> datetime:
    """Modification time of a file as an aware UTC datetime."""
    return datetime.fromtimestamp(status.st_mtime_ns / 1e9, tz=UTC)


def _is_valid_key(candidate: str) -> bool:
    """Tell whether a name found on disk is a key the store could have written."""
    try:
        validate_key(candidate)
    except InvalidInput:
        return False
    return True


def _fsync_folder(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (no-op where folders cannot be synced)."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def _disk_errors(key: str) -> Iterator[None]:
    """Turn a full disk or an over-long name into typed errors.

    Args:
        key: Object key, for messages.
    """
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ResourceExhausted(f"no space left to store {key!r}: {exc.strerror}") from exc
        if exc.errno == errno.ENAMETOOLONG:
            raise InvalidInput(f"object key {key!r} is too long for this filesystem") from exc
        raise
