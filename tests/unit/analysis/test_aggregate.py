"""Patch -> slide aggregation and the patch/slide metrics side by side."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from services.analysis.aggregate import (
    SLIDE_COLUMNS,
    aggregate_slides,
    patch_and_slide_metrics,
)
from services.common.errors import InvalidInput


def _patches() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "patient_id": ["P1", "P1", "P1", "P1", "P2", "P2", "P3"],
            "slide_id": ["S1", "S1", "S1", "S2", "S3", "S3", "S4"],
            "label": [1, 1, 1, 1, 0, 0, 0],
            "probability": [0.9, 0.2, 0.4, 0.7, 0.1, 0.5, 0.3],
        }
    )


def test_mean_median_and_top_k() -> None:
    mean = aggregate_slides(_patches())
    assert list(mean.columns) == list(SLIDE_COLUMNS)
    assert mean["slide_id"].tolist() == ["S1", "S2", "S3", "S4"]
    assert mean["patient_id"].tolist() == ["P1", "P1", "P2", "P3"]
    assert mean["label"].tolist() == [1, 1, 0, 0]
    assert mean["patch_count"].tolist() == [3, 1, 2, 1]
    np.testing.assert_allclose(mean["probability"], [0.5, 0.7, 0.3, 0.3])
    median = aggregate_slides(_patches(), "median")
    np.testing.assert_allclose(median["probability"], [0.4, 0.7, 0.3, 0.3])
    top2 = aggregate_slides(_patches(), "topk", top_k=2)
    # S1: mean of 0.9 and 0.4; slides with fewer than k patches average all of them.
    np.testing.assert_allclose(top2["probability"], [0.65, 0.7, 0.3, 0.3])


def test_without_patient_id_each_slide_is_its_own_patient() -> None:
    slides = aggregate_slides(_patches().drop(columns="patient_id"))
    assert slides["patient_id"].tolist() == slides["slide_id"].tolist()


@pytest.mark.parametrize(
    ("method", "top_k", "message"),
    [
        ("max", 10, "unknown aggregation 'max'; choose one of mean, median, topk"),
        ("topk", 0, "top-k must be a whole number >= 1, got 0"),
        ("topk", 2.5, "top-k must be a whole number >= 1, got 2.5"),
    ],
)
def test_bad_aggregation_is_named(method: str, top_k: int, message: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        aggregate_slides(_patches(), method, top_k)
    assert message in str(caught.value)


def test_bad_tables_are_named() -> None:
    with pytest.raises(InvalidInput, match="lacks column\\(s\\) probability"):
        aggregate_slides(_patches().drop(columns="probability"))
    mixed = _patches()
    mixed.loc[0, "label"] = 0
    with pytest.raises(InvalidInput, match="slide\\(s\\) S1 have patches of both labels"):
        aggregate_slides(mixed)
    shared = _patches()
    shared.loc[0, "patient_id"] = "P9"
    with pytest.raises(InvalidInput, match="S1 belong to more than one patient"):
        aggregate_slides(shared)
    nan = _patches()
    nan.loc[[3, 5], "probability"] = np.nan
    with pytest.raises(InvalidInput, match="probabilities contain NaN at rows 3, 5"):
        aggregate_slides(nan)
    with pytest.raises(InvalidInput, match="only one class present"):
        aggregate_slides(_patches().assign(label=1))
    missing_slide = _patches()
    missing_slide.loc[2, "slide_id"] = None
    with pytest.raises(InvalidInput, match="slide_id is missing at rows 2"):
        aggregate_slides(missing_slide)


def _cohort(seed: int = 0, patients: int = 16) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for patient in range(patients):
        label = patient % 2
        for slide in range(2):
            for _ in range(int(rng.integers(5, 15))):
                p = float(np.clip(rng.normal(0.4 + 0.2 * label, 0.2), 0, 1))
                rows.append((f"P{patient}", f"P{patient}-S{slide}", label, p))
    return pd.DataFrame(rows, columns=["patient_id", "slide_id", "label", "probability"])


def test_patch_and_slide_metrics_side_by_side() -> None:
    table = _cohort()
    result = patch_and_slide_metrics(table, resamples=100, seed=2)
    assert result.patch.count == len(table) and result.slide.count == 32
    assert result.patient_count == 16 and result.aggregation == "mean" and result.top_k is None
    assert result.patch.auroc.value == pytest.approx(
        roc_auc_score(table["label"], table["probability"]), abs=1e-12
    )
    slides = table.groupby("slide_id").agg(label=("label", "first"), p=("probability", "mean"))
    assert result.slide.auroc.value == pytest.approx(
        roc_auc_score(slides["label"], slides["p"]), abs=1e-12
    )
    assert result.slide.auprc.value == pytest.approx(
        average_precision_score(slides["label"], slides["p"]), abs=1e-12
    )
    # Both levels resample the 16 patients, not patches or slides.
    assert result.patch.bootstrap.unit == result.slide.bootstrap.unit == "patient_id"
    assert result.patch.bootstrap.unit_count == result.slide.bootstrap.unit_count == 16
    d = result.as_dict()
    assert set(d) == {"aggregation", "top_k", "patients", "patch_level", "slide_level"}


def test_slide_level_resamples_slides_without_patient_ids() -> None:
    table = _cohort().drop(columns="patient_id")
    result = patch_and_slide_metrics(table, "topk", 3, resamples=20)
    assert result.top_k == 3
    assert result.patch.bootstrap.unit == "slide_id"
    assert result.patch.bootstrap.unit_count == result.slide.bootstrap.unit_count == 32
