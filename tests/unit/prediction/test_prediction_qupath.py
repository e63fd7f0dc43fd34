"""A prediction's QuPath GeoJSON put in the store (``services.prediction.qupath``):
built from a result and its patch table in hand, for either pipeline, stored whole,
and nothing stored when it cannot be built."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from services.common.errors import InvalidInput
from services.common.objectstore import ObjectStore, open_store
from services.export.geojson import validate_geojson
from services.prediction.qupath import (
    GEOJSON_CONTENT_TYPE,
    GeoJsonBuildError,
    geojson_key,
    store_prediction_geojson,
)
from services.prediction.results import (
    PIPELINE_MIL,
    STATUS_NO_CANCER,
    BiomarkerResult,
    SlidePredictionResult,
    TopPatch,
)

PREFIX = "runs/predictions/S-1/abc123"


def _result(pipeline: str = "paper", top: list[TopPatch] | None = None) -> SlidePredictionResult:
    call = BiomarkerResult("tp53", "biomarker_tp53", "1", 0.6, 0.5, True, 2, top or [])
    return SlidePredictionResult(
        slide_id="S-1",
        status="ok",
        message="",
        biomarkers=[call],
        tissue_patch_count=1,
        cancer_patch_count=1,
        cancer_patch_fraction=1.0,
        cancer_confidence=0.9,
        high_res_source="upsampled",
        cancer_model_name="cancer_detector",
        cancer_model_version="1",
        params_hash="abc123",
        prefix=PREFIX,
        tissue_mask_key=f"{PREFIX}/tissue.png",
        pipeline=pipeline,
    )


def _paper_table(width: int = 512) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "slide_id": "S-1",
            "x": [0, 512],
            "y": [0, 0],
            "width": [width, width],
            "height": [512, 512],
            "parent_x": [0, 0],
            "parent_y": [0, 0],
            "cancer_probability": [0.95, 0.95],
            "tp53": [0.97, 0.23],
        }
    )


@pytest.fixture
def store(tmp_path: Path) -> ObjectStore:
    return open_store((tmp_path / "store").as_uri())


def test_a_paper_result_is_stored_as_tiles_cd_and_bd_patches(store: ObjectStore) -> None:
    key = store_prediction_geojson(store, _result(), _paper_table())

    assert key == geojson_key(_result()) == f"{PREFIX}/S-1.geojson"
    assert store.stat(key).content_type == GEOJSON_CONTENT_TYPE
    document = json.loads(store.get_bytes(key))
    validate_geojson(document)
    names = [f["properties"]["classification"]["name"] for f in document["features"]]
    assert names == ["Cancer", "Cancer", "CD patch", "TP53 BD patch"]
    tiles = document["features"][:2]
    assert [f["properties"]["measurements"]["TP53 probability"] for f in tiles] == [0.97, 0.23]


def test_a_mil_result_is_stored_as_attention_tiles_and_top_patches(store: ObjectStore) -> None:
    table = pd.DataFrame(
        {"x": [0, 64], "y": [0, 0], "width": 64, "height": 64, "attention_tp53": [0.25, 0.75]}
    )
    top = [TopPatch(64, 0, 64, 64, 0.0, 0.75)]

    key = store_prediction_geojson(store, _result(PIPELINE_MIL, top), table)

    features = json.loads(store.get_bytes(key))["features"]
    assert [f["properties"]["classification"]["name"] for f in features] == [
        "Attention",
        "Attention",
        "TP53 top patch",
    ]
    assert [f["properties"]["measurements"] for f in features] == [
        {"TP53 attention": 0.25},
        {"TP53 attention": 0.75},
        {"TP53 attention": 0.75, "rank": 1.0},
    ]


def test_nothing_is_stored_when_the_document_cannot_be_built(store: ObjectStore) -> None:
    # A patch without area has no polygon: the build fails before any put.
    with pytest.raises(GeoJsonBuildError, match="S-1 could not be built: patch sizes must be"):
        store_prediction_geojson(store, _result(), _paper_table(width=0))
    assert list(store.list(PREFIX)) == []

    # A complete earlier document is left as it was, not half replaced.
    key = store_prediction_geojson(store, _result(), _paper_table())
    before = store.get_bytes(key)
    with pytest.raises(GeoJsonBuildError):
        store_prediction_geojson(store, _result(), _paper_table(width=0))
    assert store.get_bytes(key) == before


def test_a_result_without_calls_has_nothing_to_export(store: ObjectStore) -> None:
    result = _result()
    result.status, result.biomarkers = STATUS_NO_CANCER, []
    with pytest.raises(InvalidInput, match="no biomarker calls"):
        store_prediction_geojson(store, result, _paper_table())
    assert list(store.list(PREFIX)) == []
