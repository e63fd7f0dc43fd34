"""QuPath GeoJSON export: a real prediction (``predict_slide`` on a tiny synthetic
slide) and real nuclei (``histomarker nuclei``) exported, validated, and mapped back
to level-0 pixels and to the numbers they came from; the validator's refusals; the
command's bad inputs."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import math
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import pytest

from services.cli import main
from services.common.errors import InvalidInput
from services.common.objectstore import open_store
from services.common.vocabulary import BIOMARKERS, CANCER_DETECTOR, biomarker_of_model
from services.export.geojson import (
    feature_collection,
    patch_tiles,
    signed_area,
    validate_geojson,
    write_geojson,
)
from services.export.nuclei import measurements_by_label, nucleus_detections
from services.export.predictions import bd_mask, biomarker_label, load_prediction
from services.prediction.results import SlidePredictionResult

SLIDE_ID = "EXPORT-1"


# --- a real prediction -------------------------------------------------------------------


class _HashScorer:
    """Deterministic probabilities spread over 0-1: a hash of each patch's pixels and
    the model's name (real scoring is not the point; the result's plumbing is)."""

    def score(self, model: Any, patches: np.ndarray) -> list[dict[str, Any]]:
        outputs = []
        for patch in patches:
            digest = hashlib.sha256(model.name.encode() + patch.tobytes()).digest()
            p = int.from_bytes(digest[:4], "big") / 2**32
            outputs.append({"probabilities": [1.0 - p, p]})
        return outputs


def _deployment() -> Any:
    from services.inference.bundle import ModelConfig
    from services.prediction.models import DeployedModel, Deployment

    def model(name: str) -> DeployedModel:
        classes = ("normal", "cancer") if name == CANCER_DETECTOR else ("negative", "positive")
        config = ModelConfig(name=name, version="1", backbone="tiny", class_names=classes)
        return DeployedModel(name, "1", biomarker_of_model(name), config)

    return Deployment(
        cancer=model(CANCER_DETECTOR),
        biomarkers={b: model(f"biomarker_{b}") for b in BIOMARKERS},
    )


@pytest.fixture(scope="module")
def predicted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SlidePredictionResult]:
    """A prediction folder as the service's file store holds it, and its result."""
    from services.prediction.pipeline import PredictionParams, predict_slide
    from services.slide.qc import QcThresholds
    from services.slide.reader import open_slide
    from services.synth.cohort import generate_cohort
    from services.synth.slide import QC_MIN_USABLE_MM2

    root = tmp_path_factory.mktemp("export")
    generate_cohort(root / "cohort", 1, seed=3, preset="tiny", truth_crops=0)
    manifest = pd.read_csv(root / "cohort" / "manifest.csv")
    slide = root / "cohort" / manifest[manifest["kind"] == "cancer"]["slide_path"].iloc[0]
    store = open_store((root / "store").as_uri())
    params = PredictionParams(
        batch_size=8,
        max_in_flight=2,
        qc=QcThresholds(min_usable_mm2=QC_MIN_USABLE_MM2),
        cancer_confidence=0.0,  # every tissue patch is a CD patch: more 40x patches
        heatmaps=False,
    )
    with open_slide(slide) as reader:
        result = predict_slide(reader, SLIDE_ID, store, _deployment(), _HashScorer(), params)
    assert result.status == "ok"
    return Path(store.root) / result.prefix, result


def _export(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(["export", "geojson", *argv])
    return status, out.getvalue(), err.getvalue()


def _bounds(feature: dict[str, Any]) -> tuple[float, float, float, float]:
    (ring,) = feature["geometry"]["coordinates"]
    xs, ys = zip(*ring, strict=True)
    return min(xs), min(ys), max(xs), max(ys)


def _by_class(collection: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for feature in collection["features"]:
        out.setdefault(feature["properties"]["classification"]["name"], []).append(feature)
    return out


def test_a_prediction_exports_tiles_cd_and_bd_patches_on_their_level0_pixels(
    predicted: tuple[Path, SlidePredictionResult], tmp_path: Path
) -> None:
    folder, result = predicted
    out = tmp_path / "slide.geojson"

    status, stdout, _ = _export(str(folder), str(out), "--json")

    assert status == 0
    collection = json.loads(out.read_text())
    validate_geojson(collection)
    table = pd.read_parquet(folder / "patches.parquet")
    classes = _by_class(collection)
    # Heatmap: one tile per scored 40x patch, on its footprint, with its probabilities.
    tiles = {_bounds(f): f for f in classes["Cancer"]}
    assert len(tiles) == len(table) == len(classes["Cancer"])
    for row in table.itertuples():
        tile = tiles[(row.x, row.y, row.x + row.width, row.y + row.height)]
        assert tile["properties"]["objectType"] == "tile"
        measured = tile["properties"]["measurements"]
        assert measured["cancer probability"] == row.cancer_probability
        for biomarker in BIOMARKERS:
            assert measured[f"{biomarker_label(biomarker)} probability"] == getattr(row, biomarker)
    # CD patches: the 20x parents (the 40x patches are their quadrants).
    parents = table.groupby(["parent_x", "parent_y"])
    cd = {_bounds(f)[:2]: f for f in classes["CD patch"]}
    assert len(cd) == parents.ngroups == result.cancer_patch_count
    for (px, py), quads in parents:
        feature = cd[(px, py)]
        side = 2 * quads["width"].iat[0]
        assert _bounds(feature) == (px, py, px + side, py + side)
        assert feature["properties"]["objectType"] == "annotation"
        assert feature["properties"]["isLocked"] is True
        measured = feature["properties"]["measurements"]
        assert measured["cancer probability"] == quads["cancer_probability"].iat[0]
        assert measured["40x patches"] == len(quads)
        assert measured["TP53 mean probability"] == pytest.approx(quads["tp53"].mean())
    # BD patches: called as the slide was, with confidence above 0.9.
    summary = json.loads(stdout)
    found = 0
    for call in result.biomarkers:
        p = table[call.biomarker].to_numpy()
        agree = p >= call.threshold if call.positive else p < call.threshold
        confident = np.maximum(p, 1 - p) > 0.9
        expected = table[agree & confident]
        name = f"{biomarker_label(call.biomarker)} BD patch"
        got = {_bounds(f): f for f in classes.get(name, [])}
        assert set(got) == {
            (r.x, r.y, r.x + r.width, r.y + r.height) for r in expected.itertuples()
        }
        for r in expected.itertuples():
            bd = got[(r.x, r.y, r.x + r.width, r.y + r.height)]["properties"]["measurements"]
            assert bd[f"{biomarker_label(call.biomarker)} probability"] == getattr(
                r, call.biomarker
            )
        assert summary["objects"][f"{biomarker_label(call.biomarker)} BD patches"] == len(got)
        found += len(got)
    assert found > 0  # the hash scorer makes some patches confident
    assert summary["features"] == len(collection["features"])
    assert not list(tmp_path.glob(".*.tmp"))


def test_ids_are_uuids_stable_across_exports_and_unique(
    predicted: tuple[Path, SlidePredictionResult], tmp_path: Path
) -> None:
    folder, _ = predicted
    first, second = tmp_path / "a.geojson", tmp_path / "b.geojson"
    assert _export(str(folder / "prediction.json"), str(first), "--json")[0] == 0
    assert _export(str(folder), str(second), "--json")[0] == 0
    assert first.read_bytes() == second.read_bytes()
    ids = [f["id"] for f in json.loads(first.read_text())["features"]]
    assert len(set(ids)) == len(ids) and all(len(i) == 36 for i in ids)


def test_one_biomarker_classifies_the_tiles_and_keeps_its_bd_patches_only(
    predicted: tuple[Path, SlidePredictionResult], tmp_path: Path
) -> None:
    folder, _ = predicted
    out = tmp_path / "er.geojson"

    status, _, _ = _export(str(folder), str(out), "--biomarker", "er", "--json")

    assert status == 0
    names = set(_by_class(json.loads(out.read_text())))
    assert "ER" in names and "Cancer" not in names
    assert names - {"ER", "CD patch"} <= {"ER BD patch"}


def _answer(result: SlidePredictionResult) -> dict[str, Any]:
    """What ``histomarker predict --json`` prints for a result (proto field names)."""
    from services.common.stubs.histomarker.v1 import common_pb2, prediction_pb2
    from services.common.vocabulary import BIOMARKER_ENUMS
    from services.prediction.client import to_dict

    message = prediction_pb2.SlidePrediction(
        slide_id=result.slide_id,
        status=prediction_pb2.PREDICTION_STATUS_OK,
        status_message=result.message,
        tissue_patch_count=result.tissue_patch_count,
        cancer_patch_count=result.cancer_patch_count,
        params_hash=result.params_hash,
        tissue_mask=common_pb2.ObjectRef(key=result.tissue_mask_key),
        patch_table=common_pb2.ObjectRef(key=result.patch_table_key),
    )
    for item in result.biomarkers:
        call = message.biomarkers.add(
            biomarker=BIOMARKER_ENUMS[item.biomarker],
            probability=item.probability,
            threshold=item.threshold,
            call=prediction_pb2.BIOMARKER_CALL_POSITIVE
            if item.positive
            else prediction_pb2.BIOMARKER_CALL_NEGATIVE,
        )
        for top in item.top_patches:
            call.top_patches.add(
                patch=common_pb2.PatchRef(x=top.x, y=top.y, width=top.width, height=top.height),
                probability=top.probability,
            )
    return {"prediction": to_dict(message)}


def test_a_predict_json_answer_gives_the_top_patches_and_says_what_it_lacks(
    predicted: tuple[Path, SlidePredictionResult], tmp_path: Path
) -> None:
    _, result = predicted
    answer = tmp_path / "answer.json"
    answer.write_text(json.dumps(_answer(result)))
    out = tmp_path / "top.geojson"

    status, stdout, _ = _export(str(answer), str(out), "--json")  # by default: what it has

    assert status == 0
    classes = _by_class(json.loads(out.read_text()))
    for item in result.biomarkers:
        label = biomarker_label(item.biomarker)
        got = classes[f"{label} top patch"]
        assert [_bounds(f) for f in got] == [
            (t.x, t.y, t.x + t.width, t.y + t.height) for t in item.top_patches
        ]
        assert [f["properties"]["measurements"]["rank"] for f in got] == list(
            range(1, len(got) + 1)
        )
        assert got[0]["properties"]["measurements"][f"{label} probability"] == (
            item.top_patches[0].probability
        )
    assert set(classes) == {f"{biomarker_label(b.biomarker)} top patch" for b in result.biomarkers}
    (note,) = json.loads(stdout)["notes"]
    assert note.startswith("only the top patches") and "patches.parquet" in note
    # A heatmap needs every patch's probabilities: refused, saying where they are.
    status, _, err = _export(str(answer), str(tmp_path / "h.geojson"), "--what", "heatmap")
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert "patches.parquet" in err and not (tmp_path / "h.geojson").exists()


def test_bd_rule_follows_the_call_and_the_threshold() -> None:
    from services.prediction.results import BiomarkerResult

    def call(positive: bool, threshold: float = 0.5) -> BiomarkerResult:
        return BiomarkerResult("tp53", "biomarker_tp53", "1", 0.5, threshold, positive, 4, [])

    p = np.array([0.05, 0.3, 0.91, 0.99])
    assert bd_mask(call(True), p, 0.9).tolist() == [False, False, True, True]
    assert bd_mask(call(False), p, 0.9).tolist() == [True, False, False, False]
    assert bd_mask(call(False, threshold=0.04), p, 0.9).tolist() == [False] * 4


# --- tiles of any per-patch values (MIL attention) -----------------------------------------


def test_patch_tiles_carry_any_per_patch_values_and_drop_nan() -> None:
    coords = np.array([[0, 0], [512, 0], [1024, 2048]])
    attention = {"TP53 attention": [0.1, float("nan"), 0.7], "ER attention": [0.2, 0.3, 0.5]}

    tiles = patch_tiles(
        coords,
        512,
        attention,
        slide_id="S",
        layer="attention",
        classification="Attention",
        colour=(160, 32, 240),
    )

    validate_geojson(feature_collection(tiles))
    assert [_bounds(t) for t in tiles] == [
        (0, 0, 512, 512),
        (512, 0, 1024, 512),
        (1024, 2048, 1536, 2560),
    ]
    assert tiles[0]["properties"]["measurements"] == {"TP53 attention": 0.1, "ER attention": 0.2}
    assert tiles[1]["properties"]["measurements"] == {"ER attention": 0.3}
    with pytest.raises(InvalidInput, match="2 values for 3 patches"):
        patch_tiles(
            coords,
            512,
            {"a": [1, 2]},
            slide_id="S",
            layer="x",
            classification="A",
            colour=(0, 0, 0),
        )


def test_the_command_exports_an_attention_table(tmp_path: Path) -> None:
    table = tmp_path / "attention.csv"
    pd.DataFrame({"x": [0, 256], "y": [512, 512], "tp53": [0.25, 0.75]}).to_csv(table, index=False)
    out = tmp_path / "attention.geojson"

    status, _, err = _export(str(out), "--attention", str(table), "--json")
    assert status == 2 and "--patch-size" in err

    status, _, _ = _export(str(out), "--attention", str(table), "--patch-size", "256", "--json")
    assert status == 0
    tiles = json.loads(out.read_text())["features"]
    assert [_bounds(t) for t in tiles] == [(0, 512, 256, 768), (256, 512, 512, 768)]
    assert [t["properties"]["measurements"]["tp53"] for t in tiles] == [0.25, 0.75]


# --- nuclei -------------------------------------------------------------------------------

#: Discs (centre x, centre y, radius) in label px.
DISCS = [(30.3, 40.1, 6.0), (90.0, 35.5, 9.5), (60.7, 100.2, 14.0), (150.2, 90.0, 20.0)]


def _disc_labels() -> np.ndarray:
    yy, xx = np.mgrid[:140, :200]
    labels = np.zeros((140, 200), np.uint16)
    for label, (cx, cy, r) in enumerate(DISCS, start=1):
        labels[(xx - cx) ** 2 + (yy - cy) ** 2 <= r * r] = label
    return labels


def test_each_nucleus_is_one_polygon_of_its_area_at_level0_with_its_features() -> None:
    from services.nuclei.features import nucleus_table

    labels = _disc_labels()
    rgb = np.full((*labels.shape, 3), 220, np.uint8)
    rgb[labels > 0] = (90, 40, 130)
    table = nucleus_table(labels, rgb, 0.25)
    table.loc[table["label"] == 2, "solidity"] = np.nan  # not finite: left out
    origin, downsample = (10_000.0, 20_000.0), 2.0

    found = nucleus_detections(
        labels,
        slide_id="S",
        origin_px=origin,
        downsample=downsample,
        features=measurements_by_label(table),
    )

    validate_geojson(feature_collection(found))
    assert len(found) == len(DISCS)
    for label, feature in enumerate(found, start=1):
        assert feature["geometry"]["type"] == "Polygon"
        props = feature["properties"]
        assert props["objectType"] == "detection"
        assert props["classification"]["name"] == "Nucleus"
        ring = feature["geometry"]["coordinates"][0]
        pixels = int((labels == label).sum())
        assert signed_area(ring) == pytest.approx(pixels * downsample**2, rel=0.03)
        ys, xs = np.nonzero(labels == label)
        x0, y0, x1, y1 = _bounds(feature)
        assert x0 == pytest.approx(origin[0] + xs.min() * downsample, abs=0.5 * downsample)
        assert x1 == pytest.approx(origin[0] + (xs.max() + 1) * downsample, abs=0.5 * downsample)
        assert y0 == pytest.approx(origin[1] + ys.min() * downsample, abs=0.5 * downsample)
        assert y1 == pytest.approx(origin[1] + (ys.max() + 1) * downsample, abs=0.5 * downsample)
        row = table[table["label"] == label].iloc[0]
        measured = props["measurements"]
        assert measured["area_um2"] == row["area_um2"]
        assert measured["mean_red"] == row["mean_red"]
        assert ("solidity" in measured) == (label != 2)


def test_nuclei_of_the_nuclei_command_export_with_its_features(tmp_path: Path) -> None:
    image = np.full((200, 220, 3), (235, 190, 210), np.uint8)
    for x, y, r in [(50, 60, 11), (140, 70, 13), (170, 160, 10)]:
        cv2.circle(image, (x, y), r, (80, 40, 130), -1)
    patch = tmp_path / "patch.png"
    cv2.imwrite(str(patch), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    labels, answer = tmp_path / "labels.tif", tmp_path / "nuclei.json"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        argv = ["nuclei", str(patch), "--labels", str(labels), "--method", "otsu", "--json"]
        assert main(argv) == 0
    answer.write_text(stdout.getvalue())
    out = tmp_path / "nuclei.geojson"

    status, summary, _ = _export(
        str(out),
        "--nuclei",
        str(labels),
        "--features",
        str(answer),
        "--nuclei-origin",
        "4096,8192",
        "--nuclei-downsample",
        "0.5",
        "--json",
    )

    assert status == 0
    classes = _by_class(json.loads(out.read_text()))
    nuclei = json.loads(stdout.getvalue())
    assert len(classes["Nucleus"]) == nuclei["nuclei"] == 3
    (patch_box,) = classes["Nuclei patch"]
    assert _bounds(patch_box) == (4096, 8192, 4096 + 110, 8192 + 100)
    measured = patch_box["properties"]["measurements"]
    assert measured["morph.area.mean"] == nuclei["features"]["morph.area.mean"]
    assert len(measured) == 75 + 1  # the 75 features and the count
    assert json.loads(summary)["objects"] == {"nuclei": 3, "nuclei patches": 1}


# --- the validator ----------------------------------------------------------------------


def _valid() -> dict[str, Any]:
    return feature_collection(
        patch_tiles(
            [[0, 0]],
            10,
            {"p": [0.5]},
            slide_id="S",
            layer="t",
            classification="A",
            colour=(1, 2, 3),
        )
    )


def _unclosed(doc: dict[str, Any]) -> None:
    doc["features"][0]["geometry"]["coordinates"][0][-1] = [3.0, 3.0]


def _nan_measurement(doc: dict[str, Any]) -> None:
    doc["features"][0]["properties"]["measurements"]["p"] = math.nan


def _no_colour(doc: dict[str, Any]) -> None:
    del doc["features"][0]["properties"]["classification"]["color"]


def _wrong_type(doc: dict[str, Any]) -> None:
    doc["features"][0]["geometry"]["type"] = "Polygn"


def _short_ring(doc: dict[str, Any]) -> None:
    doc["features"][0]["geometry"]["coordinates"][0] = [[0, 0], [1, 0], [0, 0]]


def _clockwise(doc: dict[str, Any]) -> None:
    doc["features"][0]["geometry"]["coordinates"][0].reverse()


def _text_position(doc: dict[str, Any]) -> None:
    doc["features"][0]["geometry"]["coordinates"][0][1] = ["10", 0]


def _infinite_property(doc: dict[str, Any]) -> None:
    doc["features"][0]["properties"]["extra"] = math.inf


def _colour_out_of_range(doc: dict[str, Any]) -> None:
    doc["features"][0]["properties"]["classification"]["color"] = [0, 0, 256]


def _classification_as_text(doc: dict[str, Any]) -> None:
    doc["features"][0]["properties"]["classification"] = "Tumor"


@pytest.mark.parametrize(
    ("spoil", "says"),
    [
        (_unclosed, "not closed"),
        (_nan_measurement, "measurements['p']"),
        (_no_colour, "no 'color'"),
        (_wrong_type, "unknown GeoJSON type 'Polygn'"),
        (_short_ring, "at least 4 positions"),
        (_clockwise, "counter-clockwise"),
        (_text_position, "numbers only"),
        (_infinite_property, "not valid JSON"),
        (_colour_out_of_range, "three integers 0-255"),
        (_classification_as_text, "an object with 'name' and 'color'"),
    ],
)
def test_the_validator_names_the_first_problem(spoil: Any, says: str) -> None:
    document = _valid()
    validate_geojson(document)
    spoiled = copy.deepcopy(document)
    spoil(spoiled)
    with pytest.raises(InvalidInput, match=r"features\[0\]|not valid JSON") as info:
        validate_geojson(spoiled)
    assert says in str(info.value)


def test_a_feature_collection_needs_a_list_of_features() -> None:
    with pytest.raises(InvalidInput, match="'features' must be a list"):
        validate_geojson({"type": "FeatureCollection", "features": {}})


def test_nothing_is_written_for_an_invalid_document(tmp_path: Path) -> None:
    document = _valid()
    _nan_measurement(document)
    with pytest.raises(InvalidInput):
        write_geojson(tmp_path / "bad.geojson", document)
    assert list(tmp_path.iterdir()) == []


def test_qc_masks_with_holes_validate() -> None:
    from services.slide.qc import geojson

    mask = np.zeros((60, 60), bool)
    mask[10:50, 10:50] = True
    mask[25:35, 25:35] = False  # a hole

    collection = geojson({"tissue": mask}, 16.0)

    validate_geojson(collection)
    (feature,) = collection["features"]
    (polygon,) = feature["geometry"]["coordinates"]
    assert len(polygon) == 2  # exterior and hole
    assert signed_area(polygon[0]) > 0 > signed_area(polygon[1])


# --- the command's bad inputs -----------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["missing-result", "out.geojson"], "no prediction result 'missing-result'"),
        (["out.geojson"], "nothing to export"),
        (["RESULT_TXT", "out.geojson"], "not JSON"),
        (["RESULT_TXT", "out.png"], ".geojson or .json"),
        (["out.geojson", "--nuclei", "labels.tif"], "no label image"),
        (["out.geojson", "--attention", "a.csv", "--what", "heatmap"], "needs RESULT"),
        (["out.geojson", "--attention", "a.csv", "--what", "dance"], "--what takes"),
    ],
)
def test_bad_input_exits_2_with_one_line(
    argv: list[str], says: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "RESULT_TXT").write_text("not json")

    status, stdout, err = _export(*argv, "--json")

    assert status == 2 and stdout == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("histomarker export:"), err
    assert says in lines[0]
    assert not (tmp_path / "out.geojson").exists()


def test_a_predicted_biomarker_must_be_named_right(
    predicted: tuple[Path, SlidePredictionResult], tmp_path: Path
) -> None:
    folder, _ = predicted
    status, _, err = _export(str(folder), str(tmp_path / "x.geojson"), "--biomarker", "brca1")
    assert status == 2 and "unknown biomarker 'brca1'" in err


def test_load_prediction_reads_the_folder_the_service_wrote(
    predicted: tuple[Path, SlidePredictionResult],
) -> None:
    folder, result = predicted
    loaded = load_prediction(folder)
    assert loaded.result == result
    assert loaded.patches is not None and len(loaded.patches) == result.biomarkers[0].patch_count
