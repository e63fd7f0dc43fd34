"""F1@0.5, AJI, pixel Dice and PQ on label images whose scores are known by hand."""

from __future__ import annotations

import numpy as np
import pytest

from services.common.errors import InvalidInput
from services.nuclei.accuracy import foreground_dice, instance_scores


def _two_squares() -> np.ndarray:
    truth = np.zeros((10, 10), np.int32)
    truth[1:4, 1:4] = 1  # 9 px
    truth[6:9, 6:9] = 2  # 9 px
    return truth


def test_a_perfect_prediction_scores_one_whatever_its_label_numbers() -> None:
    truth = _two_squares()
    renumbered = np.where(truth == 1, 70, np.where(truth == 2, 3, 0))

    scores = instance_scores(truth, renumbered)

    assert (scores.f1, scores.aji, scores.dice, scores.pq) == (1.0, 1.0, 1.0, 1.0)
    assert (scores.true_count, scores.predicted_count, scores.matched) == (2, 2, 2)


def test_scores_of_a_shrunk_nucleus_and_a_false_one_by_hand() -> None:
    truth = _two_squares()
    predicted = np.zeros_like(truth)
    predicted[1:4, 1:4] = 5
    predicted[6:9, 6:8] = 7  # 6 of nucleus 2's 9 px: IoU 2/3
    predicted[0, 9] = 9  # a one-pixel false nucleus

    scores = instance_scores(truth, predicted)

    assert scores.matched == 2 and scores.predicted_count == 3
    assert scores.f1 == pytest.approx(2 * 2 / 5)
    # AJI: (9 + 6) / (9 + 9 + the unmatched pixel)
    assert scores.aji == pytest.approx(15 / 19)
    assert scores.dice == pytest.approx(2 * 15 / (18 + 16))
    assert scores.pq == pytest.approx(0.8 * (1 + 2 / 3) / 2)


def test_a_merged_pair_loses_a_detection_and_aji_counts_the_union_once() -> None:
    truth = _two_squares()
    truth[1:4, 4:7] = 3  # a third square touching the first
    merged = np.where(np.isin(truth, (1, 3)), 1, np.where(truth == 2, 2, 0))

    scores = instance_scores(truth, merged)

    # The merged region is 18 px: IoU 0.5 with each square, not > 0.5, so no match.
    assert scores.matched == 1
    assert scores.f1 == pytest.approx(2 * 1 / (3 + 2))
    # Both squares pick the merged region: 9 + 9 + 9 over 18 + 18 + 9.
    assert scores.aji == pytest.approx(27 / 45)
    assert scores.dice == 1.0


def test_nothing_found_scores_zero_and_nothing_to_find_scores_one() -> None:
    truth = _two_squares()
    empty = np.zeros_like(truth)

    missed = instance_scores(truth, empty)
    assert (missed.f1, missed.aji, missed.dice, missed.pq) == (0.0, 0.0, 0.0, 0.0)
    assert instance_scores(empty, empty).f1 == 1.0


def test_foreground_dice_and_bad_shapes() -> None:
    truth = _two_squares()
    assert foreground_dice(truth > 0, truth) == 1.0
    assert foreground_dice(truth, np.zeros_like(truth)) == 0.0
    with pytest.raises(InvalidInput, match="shape"):
        instance_scores(truth, truth[:5])
    with pytest.raises(InvalidInput, match=">= 0"):
        instance_scores(truth, -truth)
