"""PredictSlide's ``geojson`` option over real gRPC: the slide's objects stored as
QuPath GeoJSON beside its other outputs, for the paper's pipeline and the MIL one.

A real PredictionService on 127.0.0.1 with a file:// store; TorchServe is left out
(its serving is tested in ``test_prediction_service.py``): the paper's seven models
are tiny untrained networks scored in process (``LocalScorer``, also the registry),
sharpened by a low temperature so that some patches are confident enough to be BD
patches; the MIL pipeline has the tiny ``uni`` encoder and a head trained two epochs
(``LocalMilModels``). The slide is a synthetic ``tiny`` WSI.

Each stored document is checked three ways: by ``validate_geojson``, by this file's
own reading of RFC 7946 and QuPath's object shape, and against the numbers the
answer and the stored patch table hold. The service's document must also equal what
``histomarker export geojson`` makes of the same prediction folder: one builder.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import math
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pandas as pd
import pytest
from tiny_mil import tiny_embedder, tiny_head
from tiny_models import untrained_scorer

from services import cli
from services.common.grpc_client import open_channel
from services.common.grpc_server import ServiceBinding, create_server
from services.common.objectstore import ObjectStore, open_store
from services.common.stubs.histomarker.v1 import common_pb2, prediction_pb2, prediction_pb2_grpc
from services.common.vocabulary import BIOMARKER_NAMES
from services.export.geojson import validate_geojson
from services.export.predictions import BD_CONFIDENCE, biomarker_label
from services.prediction.mil_models import LocalMilModels
from services.prediction.server import SERVICE_NAME, PredictionServicer, PredictionSettings
from services.synth.cohort import generate_cohort
from services.synth.slide import QC_MIN_USABLE_MM2

pytestmark = pytest.mark.slow

SLIDE_ID = "GEO-1"
SLIDE_KEY = f"slides/{SLIDE_ID}.tiff"
PAPER = prediction_pb2.PREDICTION_PIPELINE_PAPER
MIL = prediction_pb2.PREDICTION_PIPELINE_MIL
#: Keeps every 20x tissue patch as cancer: the untrained detector's scores do not matter.
KEEP_ALL = 0.0
#: Spreads the untrained models' probabilities towards 0 and 1 (calibrated p =
#: softmax(logits / T)), so that some 40x patches pass the BD confidence.
SHARP = 0.02


@dataclass
class Stack:
    store: ObjectStore
    stub: prediction_pb2_grpc.PredictionServiceStub
    target: str


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("prediction-geojson")
    store = open_store((root / "store").as_uri())
    generate_cohort(root / "cohort", 2, seed=5, preset="tiny", truth_crops=0)
    manifest = pd.read_csv(root / "cohort" / "manifest.csv")
    cancer = manifest[manifest["kind"] == "cancer"].iloc[0]["slide_path"]
    store.put_file(SLIDE_KEY, root / "cohort" / cancer)
    scorer = untrained_scorer(root / "bundles", 32, temperature=SHARP)
    embedder = tiny_embedder(root)
    mil = LocalMilModels({"mil_unit": tiny_head(embedder, "unit", seed=1)}, {"uni": embedder})
    settings = PredictionSettings(
        port=0,
        store_url=store.url,
        slide_cache_dir=root / "slide-cache",
        qc_min_usable_mm2=QC_MIN_USABLE_MM2,
        batch_size=8,
        max_in_flight=2,
        model_cache_s=0.0,
    )
    servicer = PredictionServicer(settings, scorer=scorer, registry=scorer, mil_models=mil)  # type: ignore[arg-type]
    binding = ServiceBinding(
        SERVICE_NAME, servicer, prediction_pb2_grpc.add_PredictionServiceServicer_to_server
    )
    server, port = create_server(settings, [binding])
    server.start()
    channel = open_channel(f"127.0.0.1:{port}")
    try:
        yield Stack(store, prediction_pb2_grpc.PredictionServiceStub(channel), f"127.0.0.1:{port}")
    finally:
        channel.close()
        server.stop(0).wait()


def _predict(stack: Stack, slide_id: str = "", **options: Any) -> prediction_pb2.SlidePrediction:
    request = prediction_pb2.PredictSlideRequest(
        slide=common_pb2.SlideRef(slide_id=slide_id, object=common_pb2.ObjectRef(key=SLIDE_KEY)),
        options=prediction_pb2.PredictionOptions(skip_heatmaps=True, **options),
    )
    return stack.stub.PredictSlide(request, timeout=300).prediction


def _document(stack: Stack, key: str) -> dict[str, Any]:
    """The stored document, refusing NaN and Infinity as RFC 8259 JSON does."""

    def refuse(constant: str) -> Any:
        raise AssertionError(f"{key} holds {constant}, which JSON does not allow")

    return json.loads(stack.store.get_bytes(key), parse_constant=refuse)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_spec(document: dict[str, Any]) -> None:
    """RFC 7946 and QuPath's object shape, read here independently of the exporter:
    a FeatureCollection of Features with UUID ids, Polygon geometries whose rings
    are closed, have 4+ finite positions and turn counter-clockwise (exterior,
    positive shoelace area on the coordinates as written); properties with a known
    objectType, a classification of exactly a name and an [r, g, b] colour of
    integers 0-255, and measurements that are finite numbers."""
    assert document["type"] == "FeatureCollection" and isinstance(document["features"], list)
    for feature in document["features"]:
        assert feature["type"] == "Feature" and set(feature) == {
            "type",
            "id",
            "geometry",
            "properties",
        }
        uuid.UUID(feature["id"])
        geometry = feature["geometry"]
        assert geometry["type"] == "Polygon" and len(geometry["coordinates"]) == 1
        (ring,) = geometry["coordinates"]
        assert len(ring) >= 4 and ring[0] == ring[-1]
        assert all(len(p) == 2 and all(_number(c) for c in p) for p in ring)
        area = 0.5 * sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in itertools.pairwise(ring))
        assert area > 0
        properties = feature["properties"]
        assert properties["objectType"] in {"tile", "annotation"}
        classification = properties["classification"]
        assert set(classification) == {"name", "color"}
        assert isinstance(classification["name"], str) and classification["name"]
        colour = classification["color"]
        assert isinstance(colour, list) and len(colour) == 3
        assert all(type(c) is int and 0 <= c <= 255 for c in colour)
        measurements = properties["measurements"]
        assert isinstance(measurements, dict) and measurements
        assert all(isinstance(k, str) and _number(v) for k, v in measurements.items())


def _box(feature: dict[str, Any]) -> tuple[float, float, float, float]:
    (ring,) = feature["geometry"]["coordinates"]
    xs, ys = zip(*ring, strict=True)
    return min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)


def _by_class(document: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for feature in document["features"]:
        out.setdefault(feature["properties"]["classification"]["name"], []).append(feature)
    return out


def _export_folder(stack: Stack, prefix: str, out: Path) -> dict[str, Any]:
    """What ``histomarker export geojson`` makes of the prediction's folder."""
    folder = Path(stack.store.root) / prefix  # type: ignore[attr-defined]
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli.main(["export", "geojson", str(folder), str(out), "--json"]) == 0
    return json.loads(out.read_text())


def _label(item: prediction_pb2.BiomarkerPrediction) -> str:
    return biomarker_label(BIOMARKER_NAMES[item.biomarker])


def test_the_paper_pipeline_stores_tiles_and_cd_bd_patches_matching_the_answer(
    stack: Stack, tmp_path: Path
) -> None:
    prediction = _predict(stack, cancer_confidence=KEEP_ALL, top_k=4, geojson=True)

    assert prediction.status == prediction_pb2.PREDICTION_STATUS_OK, prediction.status_message
    prefix = f"runs/predictions/{SLIDE_ID}/{prediction.params_hash}"
    assert prediction.geojson.key == f"{prefix}/{SLIDE_ID}.geojson"
    assert prediction.geojson.bucket == "histomarker"
    document = _document(stack, prediction.geojson.key)
    validate_geojson(document)
    _check_spec(document)
    stored = json.loads(stack.store.get_bytes(f"{prefix}/prediction.json"))
    assert stored["geojson_key"] == prediction.geojson.key

    table = pd.read_parquet(io.BytesIO(stack.store.get_bytes(prediction.patch_table.key)))
    classes = _by_class(document)
    tiles = classes["Cancer"]
    assert len(tiles) == len(table) == prediction.biomarkers[0].patch_count
    by_origin = {_box(t)[:2]: t["properties"]["measurements"] for t in tiles}
    for row in table.itertuples():
        tile = by_origin[(row.x, row.y)]
        assert tile["cancer probability"] == row.cancer_probability
        for item in prediction.biomarkers:
            name = BIOMARKER_NAMES[item.biomarker]
            assert tile[f"{_label(item)} probability"] == getattr(row, name)
    for item in prediction.biomarkers:
        probabilities = [m[f"{_label(item)} probability"] for m in by_origin.values()]
        assert np.mean(probabilities) == pytest.approx(item.probability, abs=1e-9)
        for top in item.top_patches:
            measured = by_origin[(top.patch.x, top.patch.y)][f"{_label(item)} probability"]
            assert measured == pytest.approx(top.probability, abs=1e-12)

    cd = classes["CD patch"]
    parents = table[["parent_x", "parent_y"]].drop_duplicates()
    assert len(cd) == len(parents) == prediction.cancer_patch_count
    assert all(f["properties"]["objectType"] == "annotation" for f in cd)
    assert sum(f["properties"]["measurements"]["40x patches"] for f in cd) == len(table)
    bd_total = 0
    for item in prediction.biomarkers:
        p = table[BIOMARKER_NAMES[item.biomarker]].to_numpy()
        positive = item.call == prediction_pb2.BIOMARKER_CALL_POSITIVE
        agree = p >= item.threshold if positive else p < item.threshold
        confident = (p if positive else 1 - p) > BD_CONFIDENCE
        bd = classes.get(f"{_label(item)} BD patch", [])
        assert len(bd) == int((agree & confident).sum())
        bd_total += len(bd)
    assert bd_total > 0, "no BD patch at all: the test would not check them"
    assert len(document["features"]) == len(tiles) + len(cd) + bd_total

    # One builder: the CLI's export of the same folder is the same document.
    assert _export_folder(stack, prefix, tmp_path / "cli.geojson") == document


def test_without_the_option_or_without_calls_nothing_is_stored(stack: Stack) -> None:
    plain = _predict(stack, "GEO-PLAIN", cancer_confidence=KEEP_ALL, top_k=2)
    assert plain.status == prediction_pb2.PREDICTION_STATUS_OK
    assert not plain.HasField("geojson") and plain.geojson.key == ""
    prefix = f"runs/predictions/GEO-PLAIN/{plain.params_hash}/"
    keys = [info.key for info in stack.store.list(prefix)]
    assert f"{prefix}prediction.json" in keys
    assert not [k for k in keys if k.endswith(".geojson")]
    assert json.loads(stack.store.get_bytes(f"{prefix}prediction.json"))["geojson_key"] == ""

    # No patch can beat a calibrated cancer confidence of 1: no calls, no document.
    none = _predict(stack, "GEO-NONE", cancer_confidence=1.0, geojson=True)
    assert none.status == prediction_pb2.PREDICTION_STATUS_NO_CANCER_PATCHES
    assert not none.HasField("geojson")
    assert not [i for i in stack.store.list("runs/predictions/GEO-NONE/") if ".geojson" in i.key]


def test_the_mil_pipeline_stores_attention_tiles_and_top_patches(
    stack: Stack, tmp_path: Path
) -> None:
    prediction = _predict(stack, "GEO-MIL", pipeline=MIL, top_k=3, geojson=True)

    assert prediction.status == prediction_pb2.PREDICTION_STATUS_OK, prediction.status_message
    prefix = f"runs/predictions/GEO-MIL/{prediction.params_hash}"
    assert prediction.geojson.key == f"{prefix}/GEO-MIL.geojson"
    document = _document(stack, prediction.geojson.key)
    validate_geojson(document)
    _check_spec(document)

    classes = _by_class(document)
    tiles = classes["Attention"]
    assert len(tiles) == prediction.tissue_patch_count == prediction.biomarkers[0].patch_count
    assert all(t["properties"]["objectType"] == "tile" for t in tiles)
    by_origin = {_box(t)[:2]: t for t in tiles}
    table = pd.read_parquet(io.BytesIO(stack.store.get_bytes(prediction.patch_table.key)))
    for item in prediction.biomarkers:
        name = f"{_label(item)} attention"
        column = f"attention_{BIOMARKER_NAMES[item.biomarker]}"
        attention = {(r.x, r.y): getattr(r, column) for r in table.itertuples()}
        assert {o: t["properties"]["measurements"][name] for o, t in by_origin.items()} == (
            attention
        )
        assert sum(attention.values()) == pytest.approx(1.0, abs=1e-5)
        top = classes[f"{_label(item)} top patch"]
        assert len(top) == len(item.top_patches) == 3
        for rank, (feature, patch) in enumerate(zip(top, item.top_patches, strict=True), 1):
            x, y, width, height = _box(feature)
            assert (x, y, width, height) == (
                patch.patch.x,
                patch.patch.y,
                patch.patch.width,
                patch.patch.height,
            )
            measurements = feature["properties"]["measurements"]
            assert measurements == {name: patch.attention, "rank": rank}
            tile = by_origin[(x, y)]["properties"]["measurements"]
            assert tile[name] == patch.attention
            assert _box(by_origin[(x, y)])[2:] == (width, height)

    # The CLI exports the MIL folder to the same document.
    assert _export_folder(stack, prefix, tmp_path / "cli.geojson") == document

    # PredictFromBag takes the same option on the bag the slide's prediction stored.
    again = stack.stub.PredictFromBag(
        prediction_pb2.PredictFromBagRequest(
            bag=prediction.bag,
            options=prediction_pb2.PredictionOptions(
                biomarkers=[common_pb2.BIOMARKER_ER], geojson=True
            ),
        ),
        timeout=60,
    ).prediction
    assert again.status == prediction_pb2.PREDICTION_STATUS_OK
    from_bag = _document(stack, again.geojson.key)
    validate_geojson(from_bag)
    _check_spec(from_bag)
    assert len(_by_class(from_bag)["Attention"]) == len(tiles)
    assert set(from_bag["features"][0]["properties"]["measurements"]) == {"ER attention"}


def test_a_mil_head_with_the_paper_pipeline_is_invalid_and_runs_nothing(stack: Stack) -> None:
    before = {info.key for info in stack.store.list("runs/")}
    with pytest.raises(grpc.RpcError) as info:
        _predict(stack, "GEO-BAD", pipeline=PAPER, mil_model="mil_unit", geojson=True)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = info.value.details() or ""
    assert "options.mil_model" in details and "PREDICTION_PIPELINE_MIL" in details
    assert {i.key for i in stack.store.list("runs/")} == before


def test_the_cli_asks_for_geojson_and_prints_its_key(
    stack: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["predict", SLIDE_KEY, "--stored", "--slide-id", "GEO-CLI", "--target", stack.target]
    argv += ["--pipeline", "mil", "--no-heatmaps", "--biomarker", "er", "--geojson"]

    assert cli.main([*argv, "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)["prediction"]
    key = answer["geojson"]["key"]
    assert key.startswith("runs/predictions/GEO-CLI/") and key.endswith("/GEO-CLI.geojson")
    validate_geojson(_document(stack, key))

    assert cli.main(argv) == 0
    assert f"QuPath GeoJSON: {key}\n" in capsys.readouterr().out
    assert cli.main([a for a in argv if a != "--geojson"]) == 0
    assert "QuPath GeoJSON" not in capsys.readouterr().out
