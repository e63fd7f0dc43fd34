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
