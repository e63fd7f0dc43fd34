"""Binary-classification metrics with bootstrap confidence intervals.

AUROC, AUPRC (average precision, as ``sklearn.metrics.average_precision_score``), the
ROC and precision-recall curves, sensitivity / specificity / accuracy / F1 / MCC at a
threshold, the expected calibration error, and the MCC-F1 curve with its metric and
best threshold. Every score is a probability of the positive class in [0, 1]; an item
is called positive when its score is >= the threshold.

The MCC-F1 curve and metric (Cao, Chicco, Hoffman 2020, arXiv:2006.11278; the authors'
R package ``mccf1``, ``summary.mccf1``):

1. Sweep the threshold over the distinct scores from the highest down. At each, count
   TP, FP, TN, FN and compute F1 = 2TP / (2TP + FP + FN) and
   MCC = (TP·TN − FP·FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)), normalized to [0, 1]
   as (MCC + 1) / 2. The curve is the sequence of points (F1, normalized MCC).
2. Undefined MCC: the denominator is zero only when every item is called positive
   (the lowest score as threshold) or none is (a threshold above every score); those
   points are left out of the curve, as the R package does. If nothing remains (all
   scores are equal), the curve is the single all-positive point with MCC = 0, the
   no-skill value scikit-learn also uses.
3. The curve is split at its point of maximum MCC (the first one, in threshold order,
   when tied): the left part runs from the highest threshold to that point
   inclusive, the right part holds the lower thresholds after it.
4. The curve's range of normalized MCC, [min, max], is cut into W = 100 sub-ranges of
   equal width, each closed at both ends (a point on an edge counts in both).
5. For each part and each sub-range holding at least one of the part's points, take
   the mean Euclidean distance of those points to the point of perfect performance
   (F1 = 1, normalized MCC = 1).
6. MCC-F1 metric = 1 − (mean of those per-sub-range mean distances) / sqrt(2), in
   [0, 1], 1 being best. It summarizes the whole curve, so a classifier that ranks
   perfectly still scores below 1 unless every threshold separates the classes
   (e.g. only two distinct scores); a perfect classifier whose scores are its labels
   scores exactly 1.
7. Best threshold: the threshold of the curve point nearest (1, 1) (the first when
   tied), reported with its MCC and F1.

Bootstrap confidence intervals resample whole groups (patients or slides) with
replacement, so correlated items of one patient move together; resamples that hold a
single class are skipped and counted. Intervals are percentile intervals.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

from services.common.errors import InvalidInput

#: Sub-ranges of normalized MCC used by the MCC-F1 metric (the paper's W).
MCC_F1_BINS = 100
#: Bootstrap resamples by default.
BOOTSTRAP_RESAMPLES = 1000
#: Confidence level of the intervals by default.
CONFIDENCE = 0.95
#: Rows named in a validation message before "and N more".
_ROWS_SHOWN = 10


# --- validation ---------------------------------------------------------------------


@dataclass(frozen=True)
class BinaryScores:
    """Validated scored items: 0/1 labels, probabilities and optional group ids."""

    labels: np.ndarray  # int64, 0 or 1
    probabilities: np.ndarray  # float64 in [0, 1]
    groups: np.ndarray | None  # one id per item, or None


def _rows(mask: np.ndarray) -> str:
    rows = np.flatnonzero(mask)
    shown = ", ".join(str(int(r)) for r in rows[:_ROWS_SHOWN])
    more = len(rows) - _ROWS_SHOWN
    return f"{shown} and {more} more" if more > 0 else shown


def _as_float(values: Any, name: str) -> np.ndarray:
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise InvalidInput(f"{name} must be numbers") from None
    if array.ndim != 1:
        raise InvalidInput(f"{name} must be one-dimensional, got shape {array.shape}")
    return array


def validate_binary(
    labels: Any, probabilities: Any, groups: Any | None = None, *, group_name: str = "groups"
) -> BinaryScores:
    """Check labels, probabilities and (optional) group ids of scored items.

    Rows in messages are 0-based positions in the given arrays.

    Raises:
        InvalidInput: Lengths differ, no items, a NaN, a label other than 0/1, a
            probability outside [0, 1], a missing group id, or a single class.
    """
    y = _as_float(labels, "labels")
    p = _as_float(probabilities, "probabilities")
    if len(y) != len(p):
        raise InvalidInput(f"labels and probabilities differ in length ({len(y)} vs {len(p)})")
    if len(y) == 0:
        raise InvalidInput("no items to score (labels and probabilities are empty)")
    g: np.ndarray | None = None
    if groups is not None:
        g = np.asarray(groups, dtype=object)
        if g.ndim != 1:
            raise InvalidInput(f"{group_name} must be one-dimensional, got shape {g.shape}")
        if len(g) != len(y):
            raise InvalidInput(f"{group_name} and labels differ in length ({len(g)} vs {len(y)})")
        missing = np.asarray(pd.isna(g), dtype=bool)
        if missing.any():
            raise InvalidInput(f"{group_name} are missing at rows {_rows(missing)}")
    if np.isnan(y).any():
        raise InvalidInput(f"labels contain NaN at rows {_rows(np.isnan(y))}")
    not_binary = (y != 0) & (y != 1)
    if not_binary.any():
        raise InvalidInput(f"labels must be 0 or 1; other values at rows {_rows(not_binary)}")
    if np.isnan(p).any():
        raise InvalidInput(f"probabilities contain NaN at rows {_rows(np.isnan(p))}")
    outside = (p < 0) | (p > 1)
    if outside.any():
        raise InvalidInput(f"probabilities outside [0, 1] at rows {_rows(outside)}")
    if y.min() == y.max():
        raise InvalidInput(f"only one class present (all {len(y)} labels are {int(y[0])})")
    return BinaryScores(y.astype(np.int64), p, g)


# --- curves and point metrics ------------------------------------------------------


@dataclass(frozen=True)
class _Counts:
    """Confusion counts at each distinct score, taken as threshold, highest first."""

    thresholds: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    positives: int
    negatives: int


def _counts(labels: np.ndarray, probabilities: np.ndarray) -> _Counts:
    # The same construction as scikit-learn's _binary_clf_curve, in integers.
    order = np.argsort(probabilities, kind="mergesort")[::-1]
    scores = probabilities[order]
    hits = labels[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    tp = np.cumsum(hits)[last_of_tie]
    fp = 1 + last_of_tie - tp
    positives = int(tp[-1])
    return _Counts(scores[last_of_tie], tp, fp, positives, len(labels) - positives)


def _auroc(c: _Counts) -> float:
    fpr = np.r_[0.0, c.fp / c.negatives]
    tpr = np.r_[0.0, c.tp / c.positives]
    return float(np.trapezoid(tpr, fpr))


def _auprc(c: _Counts) -> float:
    precision = c.tp / (c.tp + c.fp)
    recall = c.tp / c.positives
    return float(max(0.0, np.sum(np.diff(np.r_[0.0, recall]) * precision)))


def auroc(labels: Any, probabilities: Any) -> float:
    """Area under the ROC curve (trapezoidal, ties counted half), a 0-1 ratio."""
    s = validate_binary(labels, probabilities)
    return _auroc(_counts(s.labels, s.probabilities))


def auprc(labels: Any, probabilities: Any) -> float:
    """Area under the precision-recall curve as average precision,
    sum over thresholds of (R_n − R_{n−1})·P_n, as scikit-learn computes it."""
    s = validate_binary(labels, probabilities)
    return _auprc(_counts(s.labels, s.probabilities))


@dataclass(frozen=True)
class RocCurve:
    """ROC curve; thresholds descending, the first +inf (nothing called positive)."""

    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray


@dataclass(frozen=True)
class PrCurve:
    """Precision-recall curve in scikit-learn's layout: thresholds ascending, with a
    final (precision 1, recall 0) point that has no threshold."""

    precision: np.ndarray
    recall: np.ndarray
    thresholds: np.ndarray


def roc_curve(labels: Any, probabilities: Any) -> RocCurve:
    """Every point of the ROC curve (as ``sklearn.metrics.roc_curve`` with
    ``drop_intermediate=False``)."""
    s = validate_binary(labels, probabilities)
    c = _counts(s.labels, s.probabilities)
    return RocCurve(
        np.r_[0.0, c.fp / c.negatives], np.r_[0.0, c.tp / c.positives], np.r_[np.inf, c.thresholds]
    )


def pr_curve(labels: Any, probabilities: Any) -> PrCurve:
    """The precision-recall curve (as ``sklearn.metrics.precision_recall_curve``)."""
    s = validate_binary(labels, probabilities)
    c = _counts(s.labels, s.probabilities)
    precision = c.tp / (c.tp + c.fp)
    recall = c.tp / c.positives
    return PrCurve(np.r_[precision[::-1], 1.0], np.r_[recall[::-1], 0.0], c.thresholds[::-1])


def _mcc(tp: Any, fp: Any, tn: Any, fn: Any) -> np.ndarray:
    """MCC per element; a zero denominator gives NaN (callers apply the convention)."""
    tp, fp, tn, fn = (np.asarray(v, dtype=np.float64) for v in (tp, fp, tn, fn))
    denominator = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (tp * tn - fp * fn) / denominator, np.nan)


@dataclass(frozen=True)
class ThresholdMetrics:
    """Calls at one threshold (positive when probability >= threshold).

    MCC is 0 when its denominator is zero (everything called one class).
    """

    threshold: float
    tp: int
    fp: int
    tn: int
    fn: int
    sensitivity: float
    specificity: float
    accuracy: float
    precision: float
    f1: float
    mcc: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def threshold_metrics(labels: Any, probabilities: Any, threshold: float = 0.5) -> ThresholdMetrics:
    """Sensitivity, specificity, accuracy, precision, F1 and MCC at ``threshold``.

    Raises:
        InvalidInput: Bad scores, or a threshold that is not a finite number.
    """
    if not math.isfinite(threshold):
        raise InvalidInput(f"threshold must be a finite number, got {threshold}")
    s = validate_binary(labels, probabilities)
    called = s.probabilities >= threshold
    positive = s.labels == 1
    tp = int((called & positive).sum())
    fp = int((called & ~positive).sum())
    tn = int((~called & ~positive).sum())
    fn = int((~called & positive).sum())
    mcc = float(_mcc(tp, fp, tn, fn))
    return ThresholdMetrics(
        threshold=float(threshold),
        tp=tp,
        fp=fp,
        tn=tn,
        fn=fn,
        sensitivity=tp / (tp + fn),
        specificity=tn / (tn + fp),
        accuracy=(tp + tn) / len(s.labels),
        precision=tp / (tp + fp) if tp + fp else 0.0,
        f1=2 * tp / (2 * tp + fp + fn),
        mcc=0.0 if math.isnan(mcc) else mcc,
    )


def ece(labels: Any, probabilities: Any, bins: int = 15) -> float:
    """Expected calibration error of the binary calls (top-class confidence, equal-width
    bins), by ``services.inference.calibration.expected_calibration_error``."""
    if bins < 1:
        raise InvalidInput(f"ECE bins must be >= 1, got {bins}")
    s = validate_binary(labels, probabilities)
    # Imported here: the calibration module pulls in torch, which the rest of this
    # module does not need.
    from services.inference.calibration import expected_calibration_error

    return expected_calibration_error(s.probabilities, s.labels, bins)


# --- MCC-F1 ------------------------------------------------------------------------


@dataclass(frozen=True)
class MccF1Curve:
    """Points of the MCC-F1 curve, thresholds descending (see the module docstring)."""

    thresholds: np.ndarray
    f1: np.ndarray
    mcc: np.ndarray  # raw MCC in [-1, 1]

    @property
    def normalized_mcc(self) -> np.ndarray:
        return (self.mcc + 1.0) / 2.0


@dataclass(frozen=True)
class MccF1:
    """The MCC-F1 metric, its best point and the curve it came from."""

    metric: float
    best_threshold: float
    best_mcc: float
    best_f1: float
    curve: MccF1Curve


def _mcc_f1_curve(c: _Counts) -> MccF1Curve:
    fn = c.positives - c.tp
    tn = c.negatives - c.fp
    f1 = 2 * c.tp / (2 * c.tp + c.fp + fn)
    mcc = _mcc(c.tp, c.fp, tn, fn)
    defined = ~np.isnan(mcc)  # false only at the all-positive (lowest) threshold
    if not defined.any():
        return MccF1Curve(c.thresholds[-1:], f1[-1:].astype(np.float64), np.zeros(1))
    return MccF1Curve(c.thresholds[defined], f1[defined].astype(np.float64), mcc[defined])


def _side_bin_means(
    mcc_nor: np.ndarray, distance: np.ndarray, edges: np.ndarray
) -> tuple[float, int]:
    """Sum of per-sub-range mean distances and the count of non-empty sub-ranges for
    one part of the curve. Sub-range i (1-based) is [edges[i-1], edges[i]], closed."""
    bins = len(edges) - 1
    if len(mcc_nor) == 0:
        return 0.0, 0
    # Sub-ranges holding a point: those with edges[i] >= m and edges[i-1] <= m.
    first = np.maximum(np.searchsorted(edges, mcc_nor, side="left"), 1)
    last = np.minimum(np.searchsorted(edges, mcc_nor, side="right"), bins)
    inside = first <= last
    first, last, dist = first[inside], last[inside], distance[inside]
    # Each point adds to a run of sub-ranges: difference arrays, then running sums.
    sums = np.zeros(bins + 2)
    counts = np.zeros(bins + 2)
    np.add.at(sums, first, dist)
    np.add.at(sums, last + 1, -dist)
    np.add.at(counts, first, 1)
    np.add.at(counts, last + 1, -1)
    sums = np.cumsum(sums)[1 : bins + 1]
    counts = np.rint(np.cumsum(counts)[1 : bins + 1])
    filled = counts > 0
    return float(np.sum(sums[filled] / counts[filled])), int(filled.sum())


def _mcc_f1(c: _Counts, bins: int = MCC_F1_BINS) -> MccF1:
    curve = _mcc_f1_curve(c)
    m = curve.normalized_mcc
    distance = np.hypot(1.0 - m, 1.0 - curve.f1)
    top = int(np.argmax(m))  # the first maximum, in descending-threshold order
    low, high = float(m.min()), float(m.max())
    edges = low + (high - low) * np.arange(bins + 1) / bins
    edges[-1] = high  # the top edge holds the maximum exactly, whatever the rounding
    left_sum, left_n = _side_bin_means(m[: top + 1], distance[: top + 1], edges)
    right_sum, right_n = _side_bin_means(m[top + 1 :], distance[top + 1 :], edges)
    metric = 1.0 - ((left_sum + right_sum) / (left_n + right_n)) / math.sqrt(2.0)
    best = int(np.argmin(distance))
    return MccF1(
        metric=float(metric),
        best_threshold=float(curve.thresholds[best]),
        best_mcc=float(curve.mcc[best]),
        best_f1=float(curve.f1[best]),
        curve=curve,
    )


def mcc_f1(labels: Any, probabilities: Any, bins: int = MCC_F1_BINS) -> MccF1:
    """The MCC-F1 curve, metric and best threshold (definition in the module docstring).

    Args:
        labels: 0/1 per item.
        probabilities: Score of the positive class per item, in [0, 1].
        bins: Sub-ranges of normalized MCC (the paper's W, default 100).
    """
    if bins < 1:
        raise InvalidInput(f"MCC-F1 bins must be >= 1, got {bins}")
    s = validate_binary(labels, probabilities)
    return _mcc_f1(_counts(s.labels, s.probabilities), bins)


# --- bootstrap ---------------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its confidence interval (confidence 0: no interval)."""

    value: float
    ci_low: float
    ci_high: float
    confidence: float

    def as_dict(self) -> dict[str, float | None]:
        """Plain numbers; an interval that could not be computed is None."""
        return {
            k: (None if isinstance(v, float) and math.isnan(v) else v)
            for k, v in asdict(self).items()
        }


@dataclass(frozen=True)
class BootstrapInfo:
    """How a bootstrap went: resamples asked for and used, and what was resampled."""

    requested: int
    used: int
    skipped_single_class: int
    unit: str
    unit_count: int
    seed: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


Statistic = Callable[[np.ndarray, np.ndarray], Mapping[str, float]]


def _check_bootstrap_args(resamples: int, confidence: float) -> None:
    if resamples < 0:
        raise InvalidInput(f"bootstrap resamples must be >= 0, got {resamples}")
    if not 0 < confidence < 1:
        raise InvalidInput(f"confidence must be strictly between 0 and 1, got {confidence}")


def bootstrap(
    statistic: Statistic,
    labels: Any,
    probabilities: Any,
    groups: Any | None = None,
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = 0,
    unit: str | None = None,
) -> tuple[dict[str, Estimate], BootstrapInfo]:
    """Percentile bootstrap intervals of named statistics, resampling whole groups.

    Each resample draws as many groups as there are, with replacement, and keeps all
    items of each drawn group (a group drawn twice counts twice). Resamples holding a
    single class are skipped. With ``resamples=0`` no interval is computed (bounds
    equal the value, confidence 0); when every resample is skipped the bounds are NaN.

    Args:
        statistic: (labels, probabilities) -> {name: value}; called on the full data
            for the point estimates and on every resample.
        groups: Group id per item (patient or slide); None resamples items.
        seed: Seed of the ``numpy.random.Generator``; equal seeds, equal intervals.
        unit: Name of what a group is, for the report (default "row" or "group").
    """
    _check_bootstrap_args(resamples, confidence)
    s = validate_binary(labels, probabilities, groups)
    point = dict(statistic(s.labels, s.probabilities))
    if s.groups is None:
        codes = np.arange(len(s.labels))
    else:
        codes = np.unique(s.groups.astype(str), return_inverse=True)[1]
    order = np.argsort(codes, kind="stable")
    sizes = np.bincount(codes)
    starts = np.cumsum(sizes) - sizes
    n_groups = len(sizes)
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {name: [] for name in point}
    skipped = 0
    for _ in range(resamples):
        drawn = rng.integers(0, n_groups, n_groups)
        lengths = sizes[drawn]
        offsets = np.cumsum(lengths) - lengths
        within = np.arange(lengths.sum()) - np.repeat(offsets, lengths)
        rows = order[np.repeat(starts[drawn], lengths) + within]
        y = s.labels[rows]
        if y.min() == y.max():
            skipped += 1
            continue
        for name, value in statistic(y, s.probabilities[rows]).items():
            samples[name].append(value)
    used = resamples - skipped
    estimates: dict[str, Estimate] = {}
    alpha = (1.0 - confidence) / 2.0
    for name, value in point.items():
        if resamples == 0:
            estimates[name] = Estimate(float(value), float(value), float(value), 0.0)
        elif used == 0:
            estimates[name] = Estimate(float(value), math.nan, math.nan, confidence)
        else:
            lo, hi = np.quantile(np.asarray(samples[name]), [alpha, 1.0 - alpha])
            estimates[name] = Estimate(float(value), float(lo), float(hi), confidence)
    info = BootstrapInfo(
        requested=resamples,
        used=used,
        skipped_single_class=skipped,
        unit=unit or ("row" if s.groups is None else "group"),
        unit_count=n_groups,
        seed=seed,
    )
    return estimates, info


# --- the report --------------------------------------------------------------------


@dataclass(frozen=True)
class MetricReport:
    """The metrics of one set of scored items (patches or slides).

    ``auroc``, ``auprc`` and ``mcc_f1`` carry bootstrap intervals; the best threshold
    (with its MCC and F1), the calls at ``at_threshold.threshold`` and the ECE are
    point values on the full data.
    """

    count: int
    positive_count: int
    auroc: Estimate
    auprc: Estimate
    mcc_f1: Estimate
    best_threshold: float
    best_mcc: float
    best_f1: float
    at_threshold: ThresholdMetrics
    ece: float
    bootstrap: BootstrapInfo

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, shaped like ``histomarker.v1.MetricSet`` plus the extras."""
        return {
            "count": self.count,
            "positive_count": self.positive_count,
            "auroc": self.auroc.as_dict(),
            "auprc": self.auprc.as_dict(),
            "mcc_f1": {
                "metric": self.mcc_f1.as_dict(),
                "best_threshold": self.best_threshold,
                "best_mcc": self.best_mcc,
                "best_f1": self.best_f1,
            },
            "at_threshold": self.at_threshold.as_dict(),
            "ece": self.ece,
            "bootstrap": self.bootstrap.as_dict(),
        }


def _summary_statistic(bins: int) -> Statistic:
    def statistic(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
        c = _counts(labels, probabilities)  # sorted once for all three
        return {"auroc": _auroc(c), "auprc": _auprc(c), "mcc_f1": _mcc_f1(c, bins).metric}

    return statistic


def compute_metrics(
    labels: Any,
    probabilities: Any,
    groups: Any | None = None,
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = 0,
    bins: int = MCC_F1_BINS,
    threshold: float = 0.5,
    unit: str | None = None,
) -> MetricReport:
    """AUROC, AUPRC and the MCC-F1 metric with bootstrap intervals (resampling
    ``groups``), the best MCC-F1 threshold, the calls at ``threshold`` and the ECE.

    Raises:
        InvalidInput: Bad scores or arguments (the message says which).
    """
    if bins < 1:
        raise InvalidInput(f"MCC-F1 bins must be >= 1, got {bins}")
    _check_bootstrap_args(resamples, confidence)
    s = validate_binary(labels, probabilities, groups)
    estimates, info = bootstrap(
        _summary_statistic(bins),
        s.labels,
        s.probabilities,
        s.groups,
        resamples=resamples,
        confidence=confidence,
        seed=seed,
        unit=unit,
    )
    best = _mcc_f1(_counts(s.labels, s.probabilities), bins)
    return MetricReport(
        count=len(s.labels),
        positive_count=int(s.labels.sum()),
        auroc=estimates["auroc"],
        auprc=estimates["auprc"],
        mcc_f1=estimates["mcc_f1"],
        best_threshold=best.best_threshold,
        best_mcc=best.best_mcc,
        best_f1=best.best_f1,
        at_threshold=threshold_metrics(s.labels, s.probabilities, threshold),
        ece=ece(s.labels, s.probabilities),
        bootstrap=info,
    )
