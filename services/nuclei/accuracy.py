"""Instance-segmentation accuracy against annotated nuclei: detection F1 at an IoU
threshold and the Dice coefficient of matched nuclei."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from services.common.errors import InvalidInput


@dataclass(frozen=True)
class MatchResult:
    """How predicted nuclei match annotated ones (one-to-one, IoU above threshold).

    Attributes:
        true_positives: Annotated nuclei matched by a prediction (a count).
        false_positives: Predictions matching no annotated nucleus (a count).
        false_negatives: Annotated nuclei no prediction matches (a count).
        dice: Dice coefficient of each matched pair (0-1).
    """

    true_positives: int
    false_positives: int
    false_negatives: int
    dice: tuple[float, ...]

    @property
    def f1(self) -> float:
        denominator = 2 * self.true_positives + self.false_positives + self.false_negatives
        return 2 * self.true_positives / denominator if denominator else 1.0

    @property
    def precision(self) -> float:
        called = self.true_positives + self.false_positives
        return self.true_positives / called if called else 1.0

    @property
    def recall(self) -> float:
        present = self.true_positives + self.false_negatives
        return self.true_positives / present if present else 1.0

    @property
    def mean_dice(self) -> float:
        return float(np.mean(self.dice)) if self.dice else 0.0

    def __add__(self, other: MatchResult) -> MatchResult:
        return MatchResult(
            self.true_positives + other.true_positives,
            self.false_positives + other.false_positives,
            self.false_negatives + other.false_negatives,
            self.dice + other.dice,
        )


def match_instances(
    truth: np.ndarray,
    predicted: np.ndarray,
    min_iou: float = 0.5,
    ignore: np.ndarray | None = None,
) -> MatchResult:
    """Match predicted to annotated instances.

    With IoU > 0.5 a match is necessarily one-to-one; lower thresholds take pairs
    greedily by IoU.

    Args:
        truth: int label image, 0 background.
        predicted: int label image of the same shape.
        min_iou: Least intersection over union of a match (exclusive).
        ignore: Optional bool mask of pixels not judged (e.g. under pen ink):
            instances with most of their area there are left out on both sides.

    Raises:
        InvalidInput: Shapes differ or labels are negative.
    """
    if truth.shape != predicted.shape:
        raise InvalidInput(f"label images differ in shape: {truth.shape} vs {predicted.shape}")
    t = np.asarray(truth).astype(np.int64).ravel()
    p = np.asarray(predicted).astype(np.int64).ravel()
    if (t < 0).any() or (p < 0).any():
        raise InvalidInput("labels must be >= 0")
    n_t, n_p = int(t.max()) + 1, int(p.max()) + 1
    inter = np.bincount(t * n_p + p, minlength=n_t * n_p).reshape(n_t, n_p)
    area_t, area_p = inter.sum(axis=1), inter.sum(axis=0)
    keep_t = area_t > 0
    keep_p = area_p > 0
    if ignore is not None:
        ignored = np.asarray(ignore, bool).ravel()
        keep_t &= np.bincount(t, weights=ignored, minlength=n_t) <= 0.5 * area_t
        keep_p &= np.bincount(p, weights=ignored, minlength=n_p) <= 0.5 * area_p
    keep_t[0] = keep_p[0] = False
    iou = inter / np.maximum(area_t[:, None] + area_p[None, :] - inter, 1)
    iou[~keep_t] = 0
    iou[:, ~keep_p] = 0
    pairs = np.argwhere(iou > min_iou)
    order = np.argsort(-iou[pairs[:, 0], pairs[:, 1]])
    used_t: set[int] = set()
    used_p: set[int] = set()
    dice = []
    for i, j in pairs[order]:
        if i in used_t or j in used_p:
            continue
        used_t.add(int(i))
        used_p.add(int(j))
        dice.append(float(2 * inter[i, j] / (area_t[i] + area_p[j])))
    tp = len(dice)
    return MatchResult(tp, int(keep_p.sum()) - tp, int(keep_t.sum()) - tp, tuple(dice))


@dataclass(frozen=True)
class InstanceScores:
    """How well predicted nuclei agree with annotated ones, as the field scores it.

    Attributes:
        f1: Detection F1, a match being IoU > 0.5 (one-to-one).
        aji: Aggregated Jaccard Index (Kumar et al. 2017).
        dice: Pixel Dice of nucleus foreground (0-1).
        pq: Panoptic quality: F1 x mean IoU of the matches.
        true_count: Annotated nuclei.
        predicted_count: Predicted nuclei.
        matched: Matched pairs.
    """

    f1: float
    aji: float
    dice: float
    pq: float
    true_count: int
    predicted_count: int
    matched: int


def _intersections(truth: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """(n_true + 1, n_predicted + 1) pixel counts of every label pair, label 0 included,
    over labels renumbered densely (any integer labels, any gaps)."""
    if truth.shape != predicted.shape:
        raise InvalidInput(f"label images differ in shape: {truth.shape} vs {predicted.shape}")
    if (np.asarray(truth) < 0).any() or (np.asarray(predicted) < 0).any():
        raise InvalidInput("labels must be >= 0")
    _, t = np.unique(np.asarray(truth).ravel(), return_inverse=True)
    _, p = np.unique(np.asarray(predicted).ravel(), return_inverse=True)
    # Label 0 is present unless the image is all nuclei; keep row/column 0 as background.
    t = t + (0 if (truth == 0).any() else 1)
    p = p + (0 if (predicted == 0).any() else 1)
    n_t, n_p = int(t.max()) + 1, int(p.max()) + 1
    return np.bincount(t * n_p + p, minlength=n_t * n_p).reshape(n_t, n_p).astype(np.int64)


def instance_scores(truth: np.ndarray, predicted: np.ndarray) -> InstanceScores:
    """F1@0.5, AJI, pixel Dice and PQ of predicted against annotated instances.

    AJI: each annotated nucleus is paired with the prediction of highest IoU among
    those overlapping it; the intersections of the pairs over their unions, where the
    union also holds every prediction no nucleus chose (Kumar et al. 2017).

    Raises:
        InvalidInput: Shapes differ or labels are negative.
    """
    inter = _intersections(truth, predicted)
    area_t, area_p = inter.sum(axis=1), inter.sum(axis=0)
    pair = inter[1:, 1:]
    a_t, a_p = area_t[1:], area_p[1:]
    n_true, n_pred = int((a_t > 0).sum()), int((a_p > 0).sum())
    union = a_t[:, None] + a_p[None, :] - pair
    iou = np.where(pair > 0, pair / np.maximum(union, 1), 0.0)
    # With IoU > 0.5 a pair is unique on both sides.
    rows, cols = np.nonzero(iou > 0.5)
    matched = len(rows)
    f1 = 2 * matched / (n_true + n_pred) if n_true + n_pred else 1.0
    pq = f1 * float(iou[rows, cols].mean()) if matched else 0.0
    # AJI
    used = np.zeros(len(a_p), bool)
    joint = 0
    total = 0
    if len(a_p):
        best = iou.argmax(axis=1)
        has = iou[np.arange(len(a_t)), best] > 0
    else:
        best = np.zeros(len(a_t), np.int64)
        has = np.zeros(len(a_t), bool)
    for i in np.flatnonzero(a_t > 0):
        if has[i]:
            j = best[i]
            joint += int(pair[i, j])
            total += int(union[i, j])
            used[j] = True
        else:
            total += int(a_t[i])
    total += int(a_p[~used].sum())
    aji = joint / total if total else 1.0
    fg_t, fg_p = int(a_t.sum()), int(a_p.sum())
    both = int(pair.sum())
    dice = 2 * both / (fg_t + fg_p) if fg_t + fg_p else 1.0
    return InstanceScores(f1, aji, dice, pq, n_true, n_pred, matched)


def foreground_dice(truth: np.ndarray, predicted: np.ndarray) -> float:
    """Pixel Dice of two nucleus masks (non-zero = nucleus)."""
    if truth.shape != predicted.shape:
        raise InvalidInput(f"masks differ in shape: {truth.shape} vs {predicted.shape}")
    t, p = np.asarray(truth) > 0, np.asarray(predicted) > 0
    denominator = int(t.sum()) + int(p.sum())
    return 2 * int((t & p).sum()) / denominator if denominator else 1.0
