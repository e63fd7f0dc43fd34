"""Ingest task logic through ``.fn()`` on a file:// store: upload, checksums, manifest."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd
import pytest

from flows.training.detector import split_cohort
from flows.training.ingest import ingest_slide, read_cohort, store_manifest
from services.cohort.manifest import MANIFEST_COLUMNS, Manifest
from services.common.objectstore import open_store


@pytest.fixture
def cohort(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HISTOMARKER_STORE_URL", (tmp_path / "store").as_uri())
    rows = []
    for i, kind in enumerate(["normal", "cancer", "cancer", "cancer"]):
        slide = tmp_path / "cohort" / "slides" / f"S{i}.tiff"
        slide.parent.mkdir(parents=True, exist_ok=True)
        slide.write_bytes(f"slide {i}".encode())
        row = dict.fromkeys(MANIFEST_COLUMNS, "")
        row.update(slide_id=f"S{i}", patient_id=f"P{i}", kind=kind, slide_path=f"slides/S{i}.tiff")
        if kind == "cancer":
            row.update(tp53=str(i % 2), immune_score="0.5")
        rows.append(row)
    return Manifest.from_frame(pd.DataFrame(rows)).write(tmp_path / "cohort" / "manifest.csv")


def test_slides_are_stored_once_with_their_checksum(cohort: Path, tmp_path: Path) -> None:
    path = cohort.parent / "slides" / "S0.tiff"
    first = ingest_slide.fn("S0", str(path), 7, 1)
    assert first.key == "slides/S0.tiff"
    assert first.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    store = open_store((tmp_path / "store").as_uri())
    modified = store.stat(first.key).modified
    assert ingest_slide.fn("S0", str(path), 7, 1) == first
    assert store.stat(first.key).modified == modified  # not uploaded again


def test_the_stored_manifest_names_each_slide_and_splits(cohort: Path) -> None:
    slides = [
        ingest_slide.fn(f"S{i}", str(cohort.parent / "slides" / f"S{i}.tiff"), 7, 1)
        for i in range(4)
    ]
    stored = store_manifest.fn("tiny", str(cohort), "unused", slides)
    assert stored.manifest_key == "cohorts/tiny/manifest.csv"
    table = read_cohort(stored)
    assert list(table["slide_key"]) == [s.key for s in slides]
    assert list(table["slide_sha256"]) == [s.sha256 for s in slides]
    assert table["tp53"].isna().sum() == 1 and table["immune_score"].notna().sum() == 3
    split = split_cohort.fn(stored, 0)
    assert "S0" in split.detector and len(split.detector) == 2
    assert len(split.biomarker) == 2
