"""One contract for every object store backend: ``file://`` and ``s3://`` (moto).

Each test runs against both backends through the ``backend`` fixture. The S3 backend
talks to a real S3-protocol server on 127.0.0.1 (``s3_endpoint``), one fresh bucket per
test. A few tests at the end cover what only one backend has (URL parsing,
unreachable endpoints).
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import socket
import threading
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from minio import Minio

from services.common.errors import InvalidInput, NotFound, Unavailable
from services.common.objectstore import IntegrityError, ObjectStore, open_store
from services.common.objectstore.filesystem import INTERNAL_DIR, TEMP_PREFIX, FileObjectStore
from services.common.objectstore.s3 import SHA256_HEADER, S3ObjectStore

MIB = 1024 * 1024


@dataclass
class Backend:
    """A store under test plus a way around it, to play the part of outside damage."""

    name: str
    store: ObjectStore
    #: Replace the stored bytes of a key with same-size garbage, keeping its checksum.
    corrupt: Callable[[str], None]
    #: Store bytes under a key without any checksum, like a foreign tool would.
    write_foreign: Callable[[str, bytes], None]
    #: Everything the backend holds, raw: file paths or S3 keys, bookkeeping included.
    raw_contents: Callable[[], set[str]]


def _flip(data: bytes) -> bytes:
    """Same size, different content."""
    return bytes(byte ^ 0xFF for byte in data)


def _file_backend(root: Path) -> Backend:
    store = open_store(root.as_uri())
    assert isinstance(store, FileObjectStore)

    def corrupt(key: str) -> None:
        # Bit rot: rewrite in place, keeping inode, size and mtime.
        path = root / key
        before = path.stat()
        with open(path, "r+b") as data_file:
            damaged = _flip(data_file.read())
            data_file.seek(0)
            data_file.write(damaged)
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))

    def write_foreign(key: str, data: bytes) -> None:
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def raw_contents() -> set[str]:
        locks = root / INTERNAL_DIR / "locks"
        return {
            str(path.relative_to(root))
            for path in root.rglob("*")
            if path.is_file() and locks not in path.parents
        }

    return Backend("file", store, corrupt, write_foreign, raw_contents)


def _s3_backend(endpoint: str, credentials: dict[str, str]) -> Backend:
    bucket = f"contract-{uuid.uuid4().hex[:16]}"
    store = open_store(f"s3://{endpoint}/{bucket}", **credentials)
    raw = Minio(endpoint, secure=False, **credentials)

    def corrupt(key: str) -> None:
        found = raw.stat_object(bucket, key)
        recorded = (found.metadata or {})[SHA256_HEADER]
        with raw.get_object(bucket, key) as response:
            damaged = _flip(response.read())
        # The wrong metadata: the old checksum on new bytes.
        raw.put_object(
            bucket, key, io.BytesIO(damaged), len(damaged), metadata={SHA256_HEADER: recorded}
        )

    def write_foreign(key: str, data: bytes) -> None:
        raw.put_object(bucket, key, io.BytesIO(data), len(data))

    def raw_contents() -> set[str]:
        return {
            found.object_name or ""
            for found in raw.list_objects(bucket, recursive=True, include_version=False)
        }

    return Backend("s3", store, corrupt, write_foreign, raw_contents)


@pytest.fixture(params=["file", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """Each backend in turn, empty."""
    if request.param == "file":
        made = _file_backend(tmp_path / "store")
    else:
        made = _s3_backend(
            request.getfixturevalue("s3_endpoint"), request.getfixturevalue("s3_credentials")
        )
    with made.store:
        yield made


@pytest.fixture
def store(backend: Backend) -> ObjectStore:
    """The store of the current backend."""
    return backend.store


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _chunks(data: bytes, size: int) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


# --------------------------------------------------------------------- round trips


def test_bytes_round_trip_with_stat_and_checksum(store: ObjectStore) -> None:
    data = b"slide_id,patient_id\nS1,P1\n"
    written = store.put_bytes("cohorts/tcga/manifest.csv", data, content_type="text/csv")
    assert written.key == "cohorts/tcga/manifest.csv"
    assert written.size_bytes == len(data)
    assert written.sha256 == _sha256(data)

    assert store.get_bytes("cohorts/tcga/manifest.csv") == data
    info = store.stat("cohorts/tcga/manifest.csv")
    assert info.size_bytes == len(data)
    assert info.sha256 == _sha256(data)
    assert info.content_type == "text/csv"
    assert info.etag
    assert info.modified.tzinfo is not None


def test_empty_object(store: ObjectStore) -> None:
    store.put_bytes("runs/r1/_SUCCESS", b"")
    assert store.get_bytes("runs/r1/_SUCCESS") == b""
    assert store.stat("runs/r1/_SUCCESS").sha256 == _sha256(b"")


def test_multi_megabyte_stream_of_unknown_length(store: ObjectStore, tmp_path: Path) -> None:
    data = random.Random(7).randbytes(11 * MIB + 12_345)
    written = store.put_stream("slides/big.svs", _chunks(data, 700_001))
    assert written.size_bytes == len(data)
    assert written.sha256 == _sha256(data)

    digest = hashlib.sha256()
    with store.open_stream("slides/big.svs") as stream:
        while chunk := stream.read(MIB):
            digest.update(chunk)
    assert digest.hexdigest() == _sha256(data)

    copy = tmp_path / "download" / "big.svs"
    store.get_file("slides/big.svs", copy)
    assert copy.read_bytes() == data
    assert store.stat("slides/big.svs").size_bytes == len(data)


def test_stream_from_file_like_with_known_length(store: ObjectStore) -> None:
    data = b"x" * 300_000
    store.put_stream("tiles/s1/grid.parquet", io.BytesIO(data), length=len(data))
    assert store.get_bytes("tiles/s1/grid.parquet") == data


def test_stream_of_wrong_length_is_refused_and_leaves_nothing(backend: Backend) -> None:
    with pytest.raises(InvalidInput, match="announced"):
        backend.store.put_stream("tiles/s1/grid.parquet", io.BytesIO(b"abc"), length=4)
    assert not backend.store.exists("tiles/s1/grid.parquet")
    assert backend.raw_contents() == set()


def test_put_file_and_get_file(store: ObjectStore, tmp_path: Path) -> None:
    source = tmp_path / "stain.json"
    source.write_bytes(b'{"matrix": [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]]}')
    written = store.put_file("tiles/s1/abc/stain.json", source, content_type="application/json")
    assert written.sha256 == _sha256(source.read_bytes())

    target = tmp_path / "out" / "stain.json"
    store.get_file("tiles/s1/abc/stain.json", target)
    assert target.read_bytes() == source.read_bytes()
    assert [path.name for path in target.parent.iterdir()] == ["stain.json"]


def test_put_file_of_missing_local_file_is_invalid(store: ObjectStore, tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="not a regular file"):
        store.put_file("slides/a.svs", tmp_path / "nope.svs")


def test_overwrite_replaces_content_and_version(store: ObjectStore) -> None:
    first = store.put_bytes("models/tp53/1/metrics.json", b"first version")
    second = store.put_bytes("models/tp53/1/metrics.json", b"the second, longer version")
    assert store.get_bytes("models/tp53/1/metrics.json") == b"the second, longer version"
    info = store.stat("models/tp53/1/metrics.json")
    assert info.sha256 == _sha256(b"the second, longer version")
    assert info.size_bytes == len(b"the second, longer version")
    assert second.etag != first.etag
    assert [found.key for found in store.list()] == ["models/tp53/1/metrics.json"]


def test_non_ascii_keys(store: ObjectStore) -> None:
    keys = ["slides/Ünïcode-1.svs", "runs/流程/报告.json", "slides/with space & plus+.svs"]
    for index, key in enumerate(keys):
        store.put_bytes(key, f"content {index}".encode())
    for index, key in enumerate(keys):
        assert store.get_bytes(key) == f"content {index}".encode()
        assert store.exists(key)
        assert store.stat(key).key == key
    assert [found.key for found in store.list()] == sorted(keys)
    store.delete("slides/Ünïcode-1.svs")
    assert not store.exists("slides/Ünïcode-1.svs")


# ------------------------------------------------------------------ exists and list


_TREE = {
    "a/1": b"1",
    "a/2": b"22",
    "a/b/3": b"333",
    "a/b/c/4": b"4444",
    "a.txt": b"dot",
    "a0": b"zero",
    "b/5": b"55555",
    "slides/Ünïcode-1.svs": b"u",
    "é": b"e",
}


@pytest.fixture
def tree(store: ObjectStore) -> ObjectStore:
    """The store filled with :data:`_TREE`, put in a shuffled order."""
    keys = list(_TREE)
    random.Random(3).shuffle(keys)
    for key in keys:
        store.put_bytes(key, _TREE[key])
    return store


def test_exists(tree: ObjectStore) -> None:
    assert tree.exists("a/b/3")
    assert not tree.exists("a/b")  # a prefix of other keys, not an object
    assert not tree.exists("a/9")


def test_list_everything_sorted_with_sizes(tree: ObjectStore) -> None:
    found = list(tree.list())
    assert [info.key for info in found] == sorted(_TREE)
    assert {info.key: info.size_bytes for info in found} == {k: len(v) for k, v in _TREE.items()}
    assert all(info.sha256 is None for info in found)


@pytest.mark.parametrize(
    ("prefix", "recursive", "expected"),
    [
        ("a/", True, ["a/1", "a/2", "a/b/3", "a/b/c/4"]),
        ("a/", False, ["a/1", "a/2"]),
        ("a", True, ["a.txt", "a/1", "a/2", "a/b/3", "a/b/c/4", "a0"]),
        ("a", False, ["a.txt", "a0"]),
        ("a/b", True, ["a/b/3", "a/b/c/4"]),
        ("a/b/", False, ["a/b/3"]),
        ("", False, ["a.txt", "a0", "é"]),
        ("slides/Ü", True, ["slides/Ünïcode-1.svs"]),
        ("zzz/", True, []),
        ("a/1/", True, []),
    ],
)
def test_list_by_prefix(
    tree: ObjectStore, prefix: str, recursive: bool, expected: list[str]
) -> None:
    assert [info.key for info in tree.list(prefix, recursive=recursive)] == expected


# ------------------------------------------------------------------------- deletes


def test_delete(tree: ObjectStore) -> None:
    tree.delete("a/b/3")
    assert not tree.exists("a/b/3")
    with pytest.raises(NotFound):
        tree.get_bytes("a/b/3")
    assert tree.exists("a/b/c/4")
    tree.delete("a/b/3")  # missing: not an error
    tree.delete("never/was")


def test_delete_prefix(tree: ObjectStore) -> None:
    assert tree.delete_prefix("a/") == 4
    assert [info.key for info in tree.list()] == ["a.txt", "a0", "b/5", "slides/Ünïcode-1.svs", "é"]
    assert tree.delete_prefix("a/") == 0
    assert tree.delete_prefix("a") == 2
    assert [info.key for info in tree.list()] == ["b/5", "slides/Ünïcode-1.svs", "é"]


def test_delete_prefix_refuses_the_empty_prefix(tree: ObjectStore) -> None:
    with pytest.raises(InvalidInput, match="non-empty prefix"):
        tree.delete_prefix("")
    assert len(list(tree.list())) == len(_TREE)


def test_key_can_be_reused_as_prefix_after_delete(store: ObjectStore) -> None:
    store.put_bytes("runs/r1/x/y", b"deep")
    store.delete_prefix("runs/r1/")
    store.put_bytes("runs/r1/x", b"now an object")
    assert store.get_bytes("runs/r1/x") == b"now an object"


# ------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "read",
    [
        lambda s, d: s.get_bytes("missing/key.bin"),
        lambda s, d: s.open_stream("missing/key.bin"),
        lambda s, d: s.stat("missing/key.bin"),
        lambda s, d: s.get_file("missing/key.bin", d / "out.bin"),
    ],
    ids=["get_bytes", "open_stream", "stat", "get_file"],
)
def test_missing_object_is_not_found(
    store: ObjectStore, tmp_path: Path, read: Callable[[ObjectStore, Path], object]
) -> None:
    with pytest.raises(NotFound, match=r"missing/key\.bin"):
        read(store, tmp_path / "never-created")
    assert not (tmp_path / "never-created").exists()


def test_not_found_names_the_bucket(backend: Backend) -> None:
    with pytest.raises(NotFound) as caught:
        backend.store.get_bytes("missing.bin")
    assert backend.store.url in str(caught.value)


def test_get_file_leaves_destination_untouched_on_failure(
    store: ObjectStore, tmp_path: Path
) -> None:
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    target = downloads / "keep.bin"
    target.write_bytes(b"precious")
    with pytest.raises(NotFound):
        store.get_file("missing.bin", target)
    assert target.read_bytes() == b"precious"
    assert [path.name for path in downloads.iterdir()] == ["keep.bin"]


_BAD_KEYS = ["", "/abs", "a//b", "a/../b", "a\\b", "nul\x00", "trailing/", "x" * 1025]

_OPERATIONS: dict[str, Callable[[ObjectStore, str, Path], object]] = {
    "put_bytes": lambda s, k, d: s.put_bytes(k, b"data"),
    "put_stream": lambda s, k, d: s.put_stream(k, iter([b"data"])),
    "get_bytes": lambda s, k, d: s.get_bytes(k),
    "open_stream": lambda s, k, d: s.open_stream(k),
    "get_file": lambda s, k, d: s.get_file(k, d / "out.bin"),
    "exists": lambda s, k, d: s.exists(k),
    "stat": lambda s, k, d: s.stat(k),
    "delete": lambda s, k, d: s.delete(k),
    "presigned_get_url": lambda s, k, d: s.presigned_get_url(k),
}


@pytest.mark.parametrize("operation", list(_OPERATIONS))
@pytest.mark.parametrize("key", _BAD_KEYS)
def test_bad_key_is_invalid_input(
    backend: Backend, tmp_path: Path, operation: str, key: str
) -> None:
    with pytest.raises(InvalidInput):
        _OPERATIONS[operation](backend.store, key, tmp_path / "never-created")
    assert backend.raw_contents() == set()
    assert not (tmp_path / "never-created").exists()


@pytest.mark.parametrize("prefix", ["/", "a//", "../x", "a\\"])
def test_bad_prefix_is_invalid_input(store: ObjectStore, prefix: str) -> None:
    with pytest.raises(InvalidInput):
        store.list(prefix)
    with pytest.raises(InvalidInput):
        store.delete_prefix(prefix)


# ---------------------------------------------------------------------- integrity


def test_corruption_is_detected(backend: Backend, tmp_path: Path) -> None:
    data = b"tile pixels " * 1000
    backend.store.put_bytes("tiles/s1/p/shards/20x-00000.tar", data)
    backend.corrupt("tiles/s1/p/shards/20x-00000.tar")

    with pytest.raises(IntegrityError, match="corrupt") as caught:
        backend.store.get_bytes("tiles/s1/p/shards/20x-00000.tar")
    assert caught.value.status_name == "DATA_LOSS"
    with (
        pytest.raises(IntegrityError),
        backend.store.open_stream("tiles/s1/p/shards/20x-00000.tar") as stream,
    ):
        stream.read()
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    with pytest.raises(IntegrityError):
        backend.store.get_file("tiles/s1/p/shards/20x-00000.tar", downloads / "shard.tar")
    assert list(downloads.iterdir()) == []  # neither the file nor a partial one
    # Without verification the damaged bytes come through, for forensics.
    damaged = backend.store.get_bytes("tiles/s1/p/shards/20x-00000.tar", verify=False)
    assert damaged == _flip(data)


def test_object_without_checksum_is_refused_when_verifying(backend: Backend) -> None:
    backend.write_foreign("slides/from-elsewhere.svs", b"foreign bytes")
    assert backend.store.exists("slides/from-elsewhere.svs")
    assert backend.store.stat("slides/from-elsewhere.svs").sha256 is None
    with pytest.raises(IntegrityError, match="checksum"):
        backend.store.get_bytes("slides/from-elsewhere.svs")
    with pytest.raises(IntegrityError):
        backend.store.open_stream("slides/from-elsewhere.svs")
    assert backend.store.get_bytes("slides/from-elsewhere.svs", verify=False) == b"foreign bytes"
    # Putting it again through the store gives it a checksum.
    backend.store.put_bytes("slides/from-elsewhere.svs", b"foreign bytes")
    assert backend.store.get_bytes("slides/from-elsewhere.svs") == b"foreign bytes"


# ----------------------------------------------------------------------- atomicity


class _Boom(RuntimeError):
    pass


def _failing_stream(good_bytes: int) -> Iterator[bytes]:
    yield from _chunks(b"p" * good_bytes, 256 * 1024)
    raise _Boom("the upload connection dropped")


def test_failed_stream_leaves_nothing_visible(backend: Backend) -> None:
    with pytest.raises(_Boom):
        backend.store.put_stream("slides/partial.svs", _failing_stream(3 * MIB))
    assert not backend.store.exists("slides/partial.svs")
    assert list(backend.store.list()) == []
    assert backend.raw_contents() == set()  # no temp litter either


def test_failed_overwrite_keeps_the_old_version(backend: Backend) -> None:
    backend.store.put_bytes("slides/s.svs", b"old and whole")
    before = backend.raw_contents()
    with pytest.raises(_Boom):
        backend.store.put_stream("slides/s.svs", _failing_stream(MIB))
    assert backend.store.get_bytes("slides/s.svs") == b"old and whole"
    assert backend.raw_contents() == before


def test_concurrent_readers_never_see_a_partial_object(store: ObjectStore) -> None:
    size = 512 * 1024
    versions = [bytes([letter]) * size for letter in b"abcd"]
    store.put_bytes("runs/r1/predictions.parquet", versions[0])
    stop = threading.Event()
    problems: list[str] = []
    reads = [0]

    def write() -> None:
        try:
            for round_index in range(40):
                data = versions[round_index % len(versions)]
                store.put_stream("runs/r1/predictions.parquet", _chunks(data, 64 * 1024))
        except Exception as exc:
            problems.append(f"writer: {exc!r}")
        finally:
            stop.set()

    def read() -> None:
        while not stop.is_set():
            try:
                data = store.get_bytes("runs/r1/predictions.parquet")
            except Exception as exc:
                problems.append(f"reader: {exc!r}")
                return
            if data not in versions:
                problems.append(f"reader saw {len(data)} bytes starting {data[:8]!r}")
                return
            reads[0] += 1

    threads = [threading.Thread(target=write)] + [threading.Thread(target=read) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert problems == []
    assert reads[0] > 0


# ------------------------------------------------------------------------ sharing


def test_presigned_url_downloads_the_object(store: ObjectStore) -> None:
    store.put_bytes("runs/r1/report.html", b"<html>report</html>")
    url = store.presigned_get_url("runs/r1/report.html", expires_s=300)
    assert url.startswith(("http://127.0.0.1:", "file://"))
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.read() == b"<html>report</html>"


@pytest.mark.parametrize("expires_s", [0, -5, 7 * 24 * 3600 + 1])
def test_presigned_url_lifetime_is_checked(store: ObjectStore, expires_s: int) -> None:
    with pytest.raises(InvalidInput, match="expires_s"):
        store.presigned_get_url("runs/r1/report.html", expires_s=expires_s)


# ------------------------------------------------------------ backend-specific parts


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_s3_endpoint_down_is_unavailable() -> None:
    endpoint = f"127.0.0.1:{_closed_port()}"
    with pytest.raises(Unavailable, match=endpoint):
        open_store(f"s3://{endpoint}/histomarker", access_key="k", secret_key="s")

    store = S3ObjectStore(
        endpoint, "histomarker", access_key="k", secret_key="s", create_bucket=False
    )
    with store:
        for operation in (
            lambda: store.get_bytes("slides/a.svs"),
            lambda: store.put_bytes("slides/a.svs", b"data"),
            lambda: list(store.list("slides/")),
            lambda: store.exists("slides/a.svs"),
        ):
            with pytest.raises(Unavailable, match="cannot be reached"):
                operation()
        # Keys are checked before any I/O: a bad key is still bad input.
        with pytest.raises(InvalidInput):
            store.get_bytes("../escape")


def test_s3_bucket_is_created_and_reopened(
    s3_endpoint: str, s3_credentials: dict[str, str]
) -> None:
    url = f"s3://{s3_endpoint}/reopen-{uuid.uuid4().hex[:12]}"
    with open_store(url, **s3_credentials) as first:
        first.put_bytes("k", b"v")
    with open_store(url, **s3_credentials) as again:
        assert again.get_bytes("k") == b"v"
        assert again.url == url


def test_file_store_creates_its_folder(tmp_path: Path) -> None:
    root = tmp_path / "deep" / "store dir"
    with open_store(root.as_uri()) as store:
        store.put_bytes("slides/a.svs", b"slide")
        assert (root / "slides" / "a.svs").read_bytes() == b"slide"
        assert store.url == root.as_uri()


def test_file_store_detects_in_place_edit_with_new_mtime(tmp_path: Path) -> None:
    with open_store(tmp_path.as_uri()) as store:
        store.put_bytes("a/b.bin", b"original")
        (tmp_path / "a" / "b.bin").write_bytes(b"edited!!")
        with pytest.raises(IntegrityError, match="outside the store"):
            store.get_bytes("a/b.bin")


def test_file_store_object_and_prefix_of_same_name_conflict(tmp_path: Path) -> None:
    from services.common.errors import FailedPrecondition

    with open_store(tmp_path.as_uri()) as store:
        store.put_bytes("a/b", b"deep")
        with pytest.raises(FailedPrecondition):
            store.put_bytes("a", b"flat")
        with pytest.raises(FailedPrecondition):
            store.put_bytes("a/b/c", b"deeper")
        assert [info.key for info in store.list()] == ["a/b"]
        assert not any(TEMP_PREFIX in str(path) for path in tmp_path.rglob("*"))


@pytest.mark.parametrize(
    "url",
    [
        "ftp://host/bucket",
        "slides/relative",
        "",
        "file://relative/path",
        "file:///tmp/x?query=1",
        "s3://",
        "s3://127.0.0.1:9000",
        "s3://127.0.0.1:9000/",
        "s3://127.0.0.1:9000/a/b",
        "s3://127.0.0.1:notaport/bucket",
        "s3://127.0.0.1:9000/Bad_Bucket",
    ],
)
def test_bad_store_url_is_invalid_input(url: str) -> None:
    with pytest.raises(InvalidInput, match=r"file:///|s3://host|bucket name"):
        open_store(url)


def test_store_url_with_credentials_is_refused_without_echoing_them() -> None:
    with pytest.raises(InvalidInput) as caught:
        open_store("s3://user:topsecret@127.0.0.1:9000/bucket")
    assert "topsecret" not in str(caught.value)
