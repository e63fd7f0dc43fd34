"""Scored patches to slide scores, metrics and the report's curve sets."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from services.analysis.aggregate import aggregate_slides
from services.analysis.curves import (
    ALL_SCORES,
    biomarker_curves,
    inline_patches,
    prediction_curves,
    select_biomarker,
    slide_scores,
)
from services.analysis.metrics import auprc, auroc, mcc_f1, roc_curve
from services.common.errors import InvalidInput


def _scores(seed: int = 0, slides: int = 10, per_slide: int = 5) -> pd.DataFrame:
    """Patch scores of one biomarker, half the slides positive, in two splits."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(slides):
        label = s % 2
        for _ in range(per_slide):
            rows.append(
                {
                    "slide_id": f"S{s:02d}",
                    "patient_id": f"P{s:02d}",
                    "label": label,
                    "probability": float(np.clip(rng.normal(0.4 + 0.2 * label, 0.2), 0, 1)),
                    "split": "validation" if s < 6 else "train",
                }
            )
    return pd.DataFrame(rows)


def test_biomarker_curves_are_the_metrics_of_the_split_at_both_levels() -> None:
    scores = _scores()
    curves, reliability = biomarker_curves(
        "tp53", scores, split="validation", probabilities_name="calibrated, TTA"
    )
    validation = scores[scores["split"] == "validation"]
    slides = aggregate_slides(validation)
    assert [(c.name, c.level) for c in curves] == [("TP53", "patch"), ("TP53", "slide")]
    for curve, frame in zip(curves, (validation, slides), strict=True):
        labels, probabilities = frame["label"].to_numpy(), frame["probability"].to_numpy()
        assert curve.auroc == auroc(labels, probabilities)
        assert curve.auprc == auprc(labels, probabilities)
        assert curve.mcc_f1 == mcc_f1(labels, probabilities).metric
        assert curve.prevalence == float(labels.mean())
        np.testing.assert_array_equal(curve.fpr, roc_curve(labels, probabilities).fpr)
        assert curve.auroc_ci is None and curve.auprc_ci is None  # no bootstrap asked
    assert reliability.name == "TP53"
    assert list(reliability.probabilities_by_name) == ["calibrated, TTA"]
    np.testing.assert_array_equal(
        reliability.probabilities_by_name["calibrated, TTA"], validation["probability"]
    )
    np.testing.assert_array_equal(reliability.labels, validation["label"])


def test_biomarker_curves_with_a_bootstrap_carry_intervals() -> None:
    curves, reliability = biomarker_curves("er", _scores(1), resamples=50, seed=3)
    assert all(c.auroc_ci is not None and c.auroc_ci[0] <= c.auroc <= c.auroc_ci[1] for c in curves)
    assert list(reliability.probabilities_by_name) == ["calibrated"]


def test_biomarker_curves_refuse_a_missing_split_or_one_class() -> None:
    with pytest.raises(InvalidInput, match="scores of tp53 has no rows of split 'test'"):
        biomarker_curves("tp53", _scores(), split="test")
    with pytest.raises(InvalidInput, match="no split column"):
        biomarker_curves("tp53", _scores().drop(columns="split"), split="validation")
    negatives = _scores().assign(label=0)
    with pytest.raises(InvalidInput, match=r"scores of tp53, TP53, patch level"):
        biomarker_curves("tp53", negatives)


def test_prediction_curves_per_biomarker_with_slide_rows_made_when_missing() -> None:
    table = pd.concat(
        [_scores(0).assign(biomarker="tp53"), _scores(1).assign(biomarker="er")],
        ignore_index=True,
    )
    curves, reliability = prediction_curves(table, resamples=0, seed=0)
    assert [(c.name, c.level) for c in curves] == [
        ("tp53", "patch"),
        ("tp53", "slide"),
        ("er", "patch"),
        ("er", "slide"),
    ]
    assert [r.name for r in reliability] == ["tp53 (patch level)", "er (patch level)"]
    anonymous, _ = prediction_curves(_scores(), resamples=0, seed=0)
    assert {c.name for c in anonymous} == {ALL_SCORES}
    with pytest.raises(InvalidInput, match="level must be patch or slide"):
        prediction_curves(_scores().assign(level="tile"), resamples=0, seed=0)


def test_inline_patches_and_the_biomarker_rows() -> None:
    table = inline_patches(["a", "a", "b"], [0.1, 0.2, 0.9], [False, False, True], [])
    assert table["label"].tolist() == [0, 0, 1] and "patient_id" not in table
    with pytest.raises(
        InvalidInput, match=r"slide_ids and probabilities differ in length \(3 vs 2\)"
    ):
        inline_patches(["a", "a", "b"], [0.1, 0.2], [], [])
    mixed = pd.DataFrame({"biomarker": ["TP53", "er"], "probability": [0.1, 0.2]})
    assert select_biomarker(mixed, "tp53", "table")["probability"].tolist() == [0.1]
    with pytest.raises(InvalidInput, match="holds several biomarkers"):
        select_biomarker(mixed, None, "table")


def test_slide_scores_without_labels_aggregate_as_the_labelled_ones() -> None:
    scores = _scores()
    labelled = slide_scores(scores, "mean")
    unlabelled = slide_scores(scores.drop(columns="label"), "mean")
    pd.testing.assert_series_equal(labelled["probability"], unlabelled["probability"])
    top = slide_scores(scores.drop(columns="label"), "topk", top_k=2)
    best_two = scores.groupby("slide_id")["probability"].apply(lambda p: p.nlargest(2).mean())
    np.testing.assert_allclose(top["probability"], best_two.to_numpy())
    with pytest.raises(InvalidInput, match="outside"):
        slide_scores(scores.drop(columns="label").assign(probability=1.5), "mean")
