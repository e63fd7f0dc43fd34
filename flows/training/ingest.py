"""``ingest_cohort``: a cohort's slides and manifest into the object store.

Each slide goes to ``slides/{slide_id}{suffix}``; the upload is skipped when the
store holds it with the same sha256 already, and the stored object's sha256 is
checked against the local file's either way. The manifest goes last to
``cohorts/{name}/manifest.csv``, with two more columns: ``slide_key`` and
``slide_sha256``.
"""

from __future__ import annotations

import hashlib
import io
import re
import tempfile
from pathlib import Path

import pandas as pd
from prefect import flow, get_run_logger

from flows.runtime.policy import pipeline_task
from flows.runtime.records import CohortRef, SlideRef
from flows.runtime.settings import FlowSettings
from services.cohort.manifest import Manifest
from services.common.errors import InvalidInput, Unavailable

_COHORT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_CHUNK_BYTES = 4 * 1024 * 1024


def file_sha256(path: Path) -> str:
    """Hex sha256 of a local file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def slide_key(slide_id: str, path: Path) -> str:
    """``slides/{slide_id}{suffix}``: the suffix of the file (``.svs``, ``.tiff``...)."""
    suffix = "".join(path.suffixes[-1:]).lower() or ".svs"
    return f"slides/{slide_id}{suffix}"


@pipeline_task(task_run_name="ingest-slide-{slide_id}")
def ingest_slide(slide_id: str, path: str, size_bytes: int, modified_ns: int) -> SlideRef:
    """Upload one slide unless stored with the same content; verify its checksum.

    ``size_bytes`` and ``modified_ns`` are not used but make the cache key follow
    the file: a replaced file is ingested again.

    Raises:
        Unavailable: The stored object's sha256 differs from the file's (the
            upload was damaged; retried).
    """
    settings = FlowSettings()
    local = Path(path)
    expected = file_sha256(local)
    key = slide_key(slide_id, local)
    with settings.open_store() as store:
        if not store.exists(key) or store.stat(key).sha256 != expected:
            store.put_file(key, local)
        stored = store.stat(key).sha256
    if stored != expected:
        raise Unavailable(f"slide {slide_id}: stored sha256 {stored} differs from {expected}")
    return SlideRef(slide_id=slide_id, key=key, sha256=expected)


@pipeline_task()
def store_manifest(
    name: str, manifest_path: str, manifest_sha256: str, slides: list[SlideRef]
) -> CohortRef:
    """Write ``cohorts/{name}/manifest.csv`` with each slide's key and sha256."""
    manifest = Manifest.read(manifest_path)
    by_id = {slide.slide_id: slide for slide in slides}
    table = manifest.table.copy()
    table["slide_key"] = [by_id[s].key for s in table["slide_id"]]
    table["slide_sha256"] = [by_id[s].sha256 for s in table["slide_id"]]
    key = f"cohorts/{name}/manifest.csv"
    with tempfile.TemporaryDirectory(prefix="histomarker-manifest-") as scratch:
        local = Manifest.from_frame(table).write(Path(scratch) / "manifest.csv")
        with FlowSettings().open_store() as store:
            info = store.put_file(key, local, content_type="text/csv")
    return CohortRef(name=name, manifest_key=key, manifest_sha256=info.sha256 or "")


def read_cohort(cohort: CohortRef) -> pd.DataFrame:
    """The stored manifest's table (labels typed as the Manifest types them)."""
    with FlowSettings().open_store() as store:
        data = store.get_bytes(cohort.manifest_key)
    frame = pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False)
    return Manifest.from_frame(frame).table


@flow(name="ingest_cohort", log_prints=True)
def ingest_cohort(manifest_path: str, name: str) -> CohortRef:
    """Put a cohort's slides and manifest into the store (checksums verified).

    Args:
        manifest_path: The local manifest CSV (``histomarker synth`` or
            ``histomarker cohort import``).
        name: Cohort name: letters, digits, ``.``, ``_``, ``-``.

    Returns:
        Where the stored manifest is.
    """
    if not _COHORT_NAME.match(name):
        raise InvalidInput(f"cohort name {name!r}: use letters, digits, '.', '_' and '-'")
    manifest = Manifest.read(manifest_path)
    futures = []
    for row in manifest.table.itertuples(index=False):
        path = manifest.slide_file(str(row.slide_path)).resolve()
        if not path.is_file():
            raise InvalidInput(f"slide {row.slide_id}: no file at {path}")
        stat = path.stat()
        futures.append(
            ingest_slide.submit(str(row.slide_id), str(path), stat.st_size, stat.st_mtime_ns)
        )
    slides = [future.result() for future in futures]
    source = Path(manifest_path).resolve()
    cohort = store_manifest(name, str(source), file_sha256(source), slides)
    get_run_logger().info("cohort %s: %d slides in %s", name, len(slides), cohort.manifest_key)
    return cohort
