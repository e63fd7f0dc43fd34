"""Metrics: scikit-learn agreement, hand-computed MCC-F1 cases, the bootstrap, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn import metrics as skm

from services.analysis.metrics import (
    auprc,
    auroc,
    bootstrap,
    compute_metrics,
    ece,
    mcc_f1,
    pr_curve,
    roc_curve,
    threshold_metrics,
    validate_binary,
)
from services.common.errors import InvalidInput
from services.inference.calibration import expected_calibration_error

SQRT2 = math.sqrt(2.0)


def _random(seed: int, n: int = 300, decimals: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p = np.clip(rng.normal(0.4 + 0.25 * y, 0.2), 0, 1)
    if decimals is not None:  # rounding makes ties
        p = np.round(p, decimals)
    return y, p


def _distance(f1: float, mcc: float) -> float:
    return math.hypot(1 - f1, 1 - (mcc + 1) / 2)


# --- scikit-learn agreement ----------------------------------------------------------


@pytest.mark.parametrize(("seed", "decimals"), [(0, None), (1, None), (2, 1), (3, 2), (4, 0)])
def test_auroc_and_auprc_equal_sklearn(seed: int, decimals: int | None) -> None:
    y, p = _random(seed, decimals=decimals)
    assert auroc(y, p) == pytest.approx(skm.roc_auc_score(y, p), abs=1e-12)
    assert auprc(y, p) == pytest.approx(skm.average_precision_score(y, p), abs=1e-12)


@pytest.mark.parametrize("decimals", [None, 1])
def test_curves_equal_sklearn(decimals: int | None) -> None:
    y, p = _random(5, n=120, decimals=decimals)
    roc = roc_curve(y, p)
    fpr, tpr, thresholds = skm.roc_curve(y, p, drop_intermediate=False)
    np.testing.assert_allclose(roc.fpr, fpr, atol=1e-12)
    np.testing.assert_allclose(roc.tpr, tpr, atol=1e-12)
    np.testing.assert_array_equal(roc.thresholds, thresholds)
    pr = pr_curve(y, p)
    precision, recall, thresholds = skm.precision_recall_curve(y, p)
    np.testing.assert_allclose(pr.precision, precision, atol=1e-12)
    np.testing.assert_allclose(pr.recall, recall, atol=1e-12)
    np.testing.assert_array_equal(pr.thresholds, thresholds)


@pytest.mark.parametrize("threshold", [0.2, 0.5, 0.63, 0.99])
def test_threshold_metrics_equal_sklearn(threshold: float) -> None:
    y, p = _random(6)
    called = (p >= threshold).astype(int)
    m = threshold_metrics(y, p, threshold)
    assert m.sensitivity == pytest.approx(skm.recall_score(y, called), abs=1e-12)
    assert m.specificity == pytest.approx(skm.recall_score(1 - y, 1 - called), abs=1e-12)
    assert m.accuracy == pytest.approx(skm.accuracy_score(y, called), abs=1e-12)
    assert m.f1 == pytest.approx(skm.f1_score(y, called, zero_division=0), abs=1e-12)
    assert m.mcc == pytest.approx(skm.matthews_corrcoef(y, called), abs=1e-12)
    assert m.tp + m.fp + m.tn + m.fn == len(y)


def test_threshold_metrics_undefined_mcc_is_zero() -> None:
    m = threshold_metrics([0, 1, 1], [0.1, 0.2, 0.3], threshold=0.9)  # nothing called positive
    assert (m.tp, m.fp, m.mcc, m.precision, m.specificity) == (0, 0, 0.0, 0.0, 1.0)


def test_ece_is_the_calibration_modules() -> None:
    y, p = _random(7)
    assert ece(y, p) == expected_calibration_error(p, y)
    assert ece(y, p, bins=5) == expected_calibration_error(p, y, 5)


# --- MCC-F1: hand-computed cases -------------------------------------------------------


def test_mcc_f1_perfect_classifier_scores_one() -> None:
    result = mcc_f1([0, 0, 1, 1, 1], [0.0, 0.0, 1.0, 1.0, 1.0])
    assert result.metric == 1.0
    assert (result.best_threshold, result.best_mcc, result.best_f1) == (1.0, 1.0, 1.0)
    # The all-positive threshold (0.0) has undefined MCC and is not on the curve.
    np.testing.assert_array_equal(result.curve.thresholds, [1.0])


def test_mcc_f1_perfect_ranking_with_four_scores() -> None:
    # Thresholds 0.9, 0.8, 0.2 (0.1 calls everything positive: undefined MCC, dropped).
    # 0.9: TP1 FP0 TN2 FN1 -> MCC 2/sqrt(12), F1 2/3
    # 0.8: perfect           -> MCC 1,          F1 1   (the maximum; left part ends here)
    # 0.2: TP2 FP1 TN1 FN0 -> MCC 2/sqrt(12), F1 4/5 (right part)
    # Left points fall in sub-ranges 1 and 100, the right one in sub-range 1.
    result = mcc_f1([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9])
    mcc = 2 / math.sqrt(12)
    np.testing.assert_allclose(result.curve.mcc, [mcc, 1.0, mcc])
    np.testing.assert_allclose(result.curve.f1, [2 / 3, 1.0, 4 / 5])
    mean = (_distance(2 / 3, mcc) + 0.0 + _distance(4 / 5, mcc)) / 3
    assert result.metric == pytest.approx(1 - mean / SQRT2, abs=1e-12)
    assert result.best_threshold == 0.8


# Six samples, three of each class. Threshold -> TP FP TN FN -> MCC, F1:
#   0.9 -> 1 0 3 2 -> 3/sqrt(45) = 1/sqrt(5), 2/4
#   0.8 -> 2 0 3 1 -> 6/sqrt(72) = 1/sqrt(2), 4/5   (first maximum: left part ends)
#   0.7 -> 2 1 2 1 -> 3/9 = 1/3,              4/6
#   0.6 -> 3 1 2 0 -> 6/sqrt(72) = 1/sqrt(2), 6/7   (nearest (1, 1): best threshold)
#   0.4 -> 3 2 1 0 -> 3/sqrt(45) = 1/sqrt(5), 6/8
#   0.2 -> everything positive, MCC undefined: not on the curve.
SIX_LABELS = [1, 1, 0, 1, 0, 0]
SIX_SCORES = [0.9, 0.8, 0.7, 0.6, 0.4, 0.2]
SIX_MCC = [1 / math.sqrt(5), 1 / math.sqrt(2), 1 / 3, 1 / math.sqrt(2), 1 / math.sqrt(5)]
SIX_F1 = [2 / 4, 4 / 5, 4 / 6, 6 / 7, 6 / 8]


def test_mcc_f1_six_samples_curve_and_best_threshold() -> None:
    result = mcc_f1(SIX_LABELS, SIX_SCORES)
    np.testing.assert_allclose(result.curve.thresholds, [0.9, 0.8, 0.7, 0.6, 0.4])
    np.testing.assert_allclose(result.curve.mcc, SIX_MCC, atol=1e-15)
    np.testing.assert_allclose(result.curve.f1, SIX_F1, atol=1e-15)
    np.testing.assert_allclose(result.curve.normalized_mcc, (np.array(SIX_MCC) + 1) / 2)
    # Distances to (1, 1): 0.8 -> hypot(0.2, 0.1464) = 0.2479; 0.6 -> hypot(0.1429, 0.1464).
    assert result.best_threshold == 0.6
    assert result.best_mcc == pytest.approx(1 / math.sqrt(2))
    assert result.best_f1 == pytest.approx(6 / 7)


def test_mcc_f1_six_samples_metric_with_100_subranges() -> None:
    # Normalized MCC spans [2/3, 0.8536]. With 100 sub-ranges every point sits alone
    # in its sub-range (the 1/sqrt(5) points near 30.4% of the span), so the metric is
    # 1 - (mean of the five distances) / sqrt(2).
    d = [_distance(f, m) for f, m in zip(SIX_F1, SIX_MCC, strict=True)]
    expected = 1 - (sum(d) / 5) / SQRT2
    assert mcc_f1(SIX_LABELS, SIX_SCORES).metric == pytest.approx(expected, abs=1e-12)


def test_mcc_f1_six_samples_metric_with_two_subranges() -> None:
    # Two sub-ranges, edges 2/3, 0.7601, 0.8536. Left part (0.9, 0.8): 0.9 in the
    # lower, 0.8 in the upper. Right part (0.7, 0.6, 0.4): 0.7 and 0.4 share the lower
    # sub-range (their distances are averaged), 0.6 in the upper. Four sub-range means.
    d9, d8, d7, d6, d4 = (_distance(f, m) for f, m in zip(SIX_F1, SIX_MCC, strict=True))
    expected = 1 - ((d9 + d8 + (d7 + d4) / 2 + d6) / 4) / SQRT2
    assert mcc_f1(SIX_LABELS, SIX_SCORES, bins=2).metric == pytest.approx(expected, abs=1e-12)


def test_mcc_f1_all_scores_tied_uses_no_skill_point() -> None:
    result = mcc_f1([0, 1, 0, 1], [0.5] * 4)
    # The only threshold calls everything positive: F1 = 2·2/(2·2+2) = 2/3, MCC := 0.
    assert result.best_threshold == 0.5 and result.best_mcc == 0.0
    assert result.metric == pytest.approx(1 - _distance(2 / 3, 0.0) / SQRT2)


def _mcc_f1_by_loops(y: np.ndarray, p: np.ndarray, bins: int) -> float:
    """The definition written out point by point and sub-range by sub-range."""
    f1s, ms = [], []
    for t in sorted(set(p.tolist()), reverse=True):
        tp = int(((p >= t) & (y == 1)).sum())
        fp = int(((p >= t) & (y == 0)).sum())
        fn, tn = int(y.sum()) - tp, int((y == 0).sum()) - fp
        den = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        if den == 0:
            continue
        f1s.append(2 * tp / (2 * tp + fp + fn))
        ms.append(((tp * tn - fp * fn) / den + 1) / 2)
    top = ms.index(max(ms))
    low, high = min(ms), max(ms)
    edges = [low + (high - low) * i / bins for i in range(bins + 1)]
    edges[-1] = high
    means = []
    for part in (range(top + 1), range(top + 1, len(ms))):
        for i in range(bins):
            inside = [k for k in part if edges[i] <= ms[k] <= edges[i + 1]]
            if inside:
                means.append(sum(math.hypot(1 - f1s[k], 1 - ms[k]) for k in inside) / len(inside))
    return 1 - (sum(means) / len(means)) / SQRT2


@pytest.mark.parametrize(("seed", "bins", "decimals"), [(10, 100, None), (11, 7, 2), (12, 3, 1)])
def test_mcc_f1_matches_the_definition_written_as_loops(
    seed: int, bins: int, decimals: int | None
) -> None:
    y, p = _random(seed, n=80, decimals=decimals)
    assert mcc_f1(y, p, bins).metric == pytest.approx(_mcc_f1_by_loops(y, p, bins), abs=1e-12)


# --- bootstrap -------------------------------------------------------------------------


def test_bootstrap_interval_contains_the_estimate_and_is_seeded() -> None:
    y, p = _random(20, n=200)
    groups = np.arange(200) // 4
    report = compute_metrics(y, p, groups, resamples=200, seed=3)
    for estimate in (report.auroc, report.auprc, report.mcc_f1):
        assert estimate.ci_low <= estimate.value <= estimate.ci_high
        assert estimate.confidence == 0.95
    again = compute_metrics(y, p, groups, resamples=200, seed=3)
    other = compute_metrics(y, p, groups, resamples=200, seed=4)
    assert again.as_dict() == report.as_dict()
    assert other.auroc.ci_low != report.auroc.ci_low
    assert report.bootstrap.used == 200 and report.bootstrap.unit_count == 50
    assert report.auroc.value == pytest.approx(skm.roc_auc_score(y, p), abs=1e-12)


def test_resampling_patients_differs_from_resampling_slides() -> None:
    # Ten patients with six slides each; a patient's slides score almost alike, so
    # slides are not independent and resampling them understates the uncertainty.
    rng = np.random.default_rng(0)
    patient = np.repeat(np.arange(10), 6)
    labels = (patient % 2).astype(int)
    patient_effect = rng.normal(0, 0.2, 10)[patient]
    probs = np.clip(0.45 + 0.1 * labels + patient_effect + rng.normal(0, 0.01, 60), 0, 1)
    slides = np.arange(60)
    by_patient = compute_metrics(labels, probs, patient, resamples=300, seed=1)
    by_slide = compute_metrics(labels, probs, slides, resamples=300, seed=1)
    assert by_patient.auroc.value == by_slide.auroc.value
    width_patient = by_patient.auroc.ci_high - by_patient.auroc.ci_low
    width_slide = by_slide.auroc.ci_high - by_slide.auroc.ci_low
    assert width_patient > 1.5 * width_slide
    assert (by_patient.bootstrap.unit_count, by_slide.bootstrap.unit_count) == (10, 60)


def test_bootstrap_skips_single_class_resamples_and_counts_them() -> None:
    # Three groups, only one with positives: about (2/3)^3 of resamples lack it.
    y = np.array([1, 1, 0, 0, 0, 0])
    p = np.array([0.9, 0.6, 0.7, 0.2, 0.3, 0.1])
    groups = ["a", "a", "b", "b", "c", "c"]
    estimates, info = bootstrap(
        lambda yy, pp: {"auroc": float(skm.roc_auc_score(yy, pp))}, y, p, groups, resamples=100
    )
    assert info.skipped_single_class > 0
    assert info.used + info.skipped_single_class == 100
    assert estimates["auroc"].ci_low <= estimates["auroc"].value <= estimates["auroc"].ci_high


def test_zero_resamples_means_no_interval() -> None:
    y, p = _random(21, n=50)
    report = compute_metrics(y, p, resamples=0)
    assert report.auroc.confidence == 0.0
    assert report.auroc.ci_low == report.auroc.value == report.auroc.ci_high
    assert report.bootstrap.unit == "row"


def test_report_as_dict_has_the_metric_set_shape() -> None:
    y, p = _random(22, n=60)
    d = compute_metrics(y, p, resamples=20).as_dict()
    assert {"count", "positive_count", "auroc", "auprc", "mcc_f1", "ece"} <= set(d)
    assert set(d["mcc_f1"]) == {"metric", "best_threshold", "best_mcc", "best_f1"}
    assert set(d["auroc"]) == {"value", "ci_low", "ci_high", "confidence"}


# --- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("labels", "probs", "message"),
    [
        ([0, 1] * 5, [0.5] * 9, "labels and probabilities differ in length (10 vs 9)"),
        ([1, 1, 1], [0.2, 0.5, 0.9], "only one class present (all 3 labels are 1)"),
        (
            [0, 1, 0, 1, 0, 1, 0, 1],
            [0.1, 0.2, 0.3, math.nan, 0.5, 0.6, 0.7, math.nan],
            "probabilities contain NaN at rows 3, 7",
        ),
        ([0, 1, 0], [0.1, 1.2, -0.1], "probabilities outside [0, 1] at rows 1, 2"),
        ([0, 1, 0], [0.1, math.inf, 0.2], "probabilities outside [0, 1] at rows 1"),
        ([0, 2, 1], [0.1, 0.2, 0.3], "labels must be 0 or 1; other values at rows 1"),
        ([0, math.nan, 1], [0.1, 0.2, 0.3], "labels contain NaN at rows 1"),
        ([], [], "no items to score"),
        (["a", "b"], [0.1, 0.2], "labels must be numbers"),
    ],
)
def test_bad_input_names_the_problem(labels: list, probs: list, message: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        auroc(labels, probs)
    assert message in str(caught.value)


def test_bad_groups_and_arguments_are_named() -> None:
    y, p = [0, 1, 0, 1], [0.1, 0.8, 0.3, 0.6]
    with pytest.raises(InvalidInput, match=r"groups and labels differ in length \(3 vs 4\)"):
        validate_binary(y, p, ["a", "b", "c"])
    with pytest.raises(InvalidInput, match="groups are missing at rows 2"):
        validate_binary(y, p, ["a", "b", None, "c"])
    with pytest.raises(InvalidInput, match="bins must be >= 1"):
        mcc_f1(y, p, bins=0)
    with pytest.raises(InvalidInput, match="confidence must be strictly between 0 and 1"):
        compute_metrics(y, p, confidence=1.0)
    with pytest.raises(InvalidInput, match="resamples must be >= 0"):
        compute_metrics(y, p, resamples=-1)
    with pytest.raises(InvalidInput, match="threshold must be a finite number"):
        threshold_metrics(y, p, math.nan)
    many = [math.nan] * 12 + [0.5, 0.5]
    with pytest.raises(InvalidInput, match="rows 0, 1, 2, 3, 4, 5, 6, 7, 8, 9 and 2 more"):
        auroc([0, 1] * 7, many)
