"""predict_batch's pure logic: which inbox slides, which records, which rows."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from flows.batch.predict import (
    BatchOptions,
    BiomarkerOutcome,
    InboxSlide,
    SlideOutcome,
    inbox_slides,
    models_digest,
    new_batch_id,
    outcome_of,
    record_key,
    skipped,
    summary_table,
)
from services.common.objectstore import ObjectInfo
from services.common.stubs.histomarker.v1 import common_pb2, prediction_pb2

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def _info(key: str, etag: str = "e1") -> ObjectInfo:
    return ObjectInfo(key=key, size_bytes=1, sha256=None, etag=etag, modified=NOW)


def test_inbox_slides_keeps_slide_files_sorted_and_reports_bad_names() -> None:
    objects = [
        _info("inbox/b.svs"),
        _info("inbox/a.TIFF"),
        _info("inbox/notes.txt"),
        _info("inbox/a.ndpi"),
        _info("inbox/-bad.svs"),
    ]
    slides, rejected = inbox_slides(objects)
    assert [(s.slide_id, s.key) for s in slides] == [("a", "inbox/a.TIFF"), ("b", "inbox/b.svs")]
    assert len(rejected) == 2
    assert rejected[0].startswith("inbox/-bad.svs") and "inbox/a.ndpi" in rejected[1]


def test_a_record_changes_with_the_slide_version_and_the_models() -> None:
    options = BatchOptions()
    models = models_digest([("cancer_detector", "1"), ("biomarker_er", "1")], options)
    assert models == models_digest([("biomarker_er", "1"), ("cancer_detector", "1")], options)
    assert models != models_digest([("cancer_detector", "2"), ("biomarker_er", "1")], options)
    assert models != models_digest(
        [("cancer_detector", "1"), ("biomarker_er", "1")], BatchOptions(top_k=3)
    )
    slide = InboxSlide(slide_id="a", key="inbox/a.svs", etag="e1")
    key = record_key(slide, models)
    assert key.startswith("runs/predictions/done/a/") and key.endswith(".json")
    assert key == record_key(slide, models)
    assert key != record_key(slide.model_copy(update={"etag": "e2"}), models)


def test_outcome_of_a_prediction_message() -> None:
    prediction = prediction_pb2.SlidePrediction(
        slide_id="a",
        status=prediction_pb2.PREDICTION_STATUS_OK,
        status_message="2 biomarkers",
        params_hash="h1",
        biomarkers=[
            prediction_pb2.BiomarkerPrediction(
                biomarker=common_pb2.BIOMARKER_ER,
                probability=0.8,
                call=prediction_pb2.BIOMARKER_CALL_POSITIVE,
                heatmap=common_pb2.ObjectRef(key="runs/predictions/a/h1/heatmap_er.png"),
                model_version="3",
            ),
            prediction_pb2.BiomarkerPrediction(
                biomarker=common_pb2.BIOMARKER_TP53,
                probability=0.1,
                call=prediction_pb2.BIOMARKER_CALL_NEGATIVE,
                model_version="3",
            ),
        ],
    )
    slide = InboxSlide(slide_id="a", key="inbox/a.svs", etag="e1")
    outcome = outcome_of(slide, prediction)
    assert outcome.status == "predicted" and outcome.prediction_status == "ok"
    assert outcome.prediction_key == "runs/predictions/a/h1/prediction.json"
    er, tp53 = outcome.biomarkers
    assert (er.biomarker, er.call, er.heatmap_key) == (
        "er",
        "positive",
        "runs/predictions/a/h1/heatmap_er.png",
    )
    assert (tp53.biomarker, tp53.call, tp53.heatmap_key) == ("tp53", "negative", "")
    assert skipped(outcome).status == "skipped" and skipped(outcome).biomarkers == (er, tp53)
    assert outcome.qc_verdict == "" and outcome.usable_area_mm2 == 0.0  # no QC sent


def test_a_qc_failed_slide_is_recorded_with_its_verdict_and_reasons() -> None:
    prediction = prediction_pb2.SlidePrediction(
        slide_id="b",
        status=prediction_pb2.PREDICTION_STATUS_QC_FAILED,
        status_message="the slide failed QC, no biomarker calls: ...",
        params_hash="h2",
        qc=common_pb2.SlideQc(
            verdict=common_pb2.QC_VERDICT_FAIL,
            reasons=["usable tissue 0.2 mm² is under 0.5 mm²", "pen green covers 40%"],
            tissue_area_mm2=0.3,
            usable_area_mm2=0.2,
            usable_fraction=0.66,
        ),
    )
    outcome = outcome_of(InboxSlide(slide_id="b", key="inbox/b.svs", etag="e"), prediction)
    assert outcome.prediction_status == "qc_failed" and outcome.biomarkers == ()
    assert outcome.qc_verdict == "fail" and outcome.usable_area_mm2 == pytest.approx(0.2)
    assert outcome.qc_reasons == "usable tissue 0.2 mm² is under 0.5 mm²; pen green covers 40%"
    row = summary_table([outcome], ("er",)).iloc[0]
    assert row["qc_verdict"] == "fail" and "pen green" in row["qc_reasons"]


def test_summary_table_has_a_row_per_slide_and_columns_per_biomarker() -> None:
    call = BiomarkerOutcome(
        biomarker="er", probability=0.7, call="positive", heatmap_key="k.png", model_version="1"
    )
    outcomes = [
        SlideOutcome(slide_id="a", slide_key="inbox/a.svs", status="predicted", biomarkers=(call,)),
        SlideOutcome(slide_id="b", slide_key="inbox/b.svs", status="failed", message="bad"),
    ]
    table = summary_table(outcomes, ("er", "pr"))
    assert list(table["slide_id"]) == ["a", "b"]
    assert list(table.columns[:6]) == [
        "slide_id",
        "slide_key",
        "status",
        "prediction_status",
        "message",
        "prediction_key",
    ]
    assert table.loc[0, "er_probability"] == pytest.approx(0.7)
    assert table.loc[0, "er_call"] == "positive" and table.loc[0, "er_heatmap_key"] == "k.png"
    assert table["pr_probability"].isna().all() and table.loc[1, "er_call"] == ""
    assert list(summary_table([], ("er",)).columns)[-3:] == [
        "er_probability",
        "er_call",
        "er_heatmap_key",
    ]


def test_batch_ids_sort_by_time_and_name_the_run() -> None:
    batch = new_batch_id(NOW, "01a20f49-250d-7540-8252-fe000b82f642")
    assert batch == "20260102T030405Z-01a20f49"
    assert new_batch_id(NOW, "") == "20260102T030405Z-local"


def test_the_prefixes_are_the_prediction_services() -> None:
    from flows.batch import predict
    from services.prediction import pipeline

    assert predict.PREDICTIONS_PREFIX == pipeline.RUNS_PREFIX
    assert predict.PREDICTION_JSON == pipeline.PREDICTION_JSON
