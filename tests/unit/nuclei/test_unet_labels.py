"""From the U-Net's maps to nuclei, and loading its weights (no trained weights
needed: the maps are drawn by hand, the weights are random)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from services.common.errors import FailedPrecondition
from services.nuclei.train_unet import (
    contact_zone,
    normalized_distance,
    separated_foreground,
    training_loss,
)
from services.nuclei.unet import (
    WORK_MPP,
    NucleiNet,
    build_unet,
    labels_from_maps,
    segment_unet_batch,
    to_work_resolution,
)


def _discs(centres: list[tuple[int, int]], radius: int, side: int = 64) -> np.ndarray:
    yy, xx = np.mgrid[:side, :side]
    labels = np.zeros((side, side), np.int32)
    for index, (cy, cx) in enumerate(centres, start=1):
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
        labels[inside & (labels == 0)] = index
    return labels


def _maps(labels: np.ndarray) -> np.ndarray:
    return np.stack([(labels > 0).astype(np.float32), normalized_distance(labels)], axis=-1)


def test_two_touching_nuclei_are_cut_apart_where_their_distance_falls_to_zero() -> None:
    truth = _discs([(32, 22), (32, 40)], radius=10)  # overlapping discs: one blob
    assert len(np.unique(truth)) == 3

    labels = labels_from_maps(_maps(truth), truth.shape, mpp=WORK_MPP)

    assert labels.max() == 2
    for index in (1, 2):
        overlap = np.bincount(labels[truth == index], minlength=3)
        assert overlap.argmax() != 0 and overlap.max() / (truth == index).sum() > 0.9


def test_touching_nuclei_are_taught_with_a_background_line_between_them() -> None:
    truth = np.zeros((8, 12), np.int32)
    truth[2:6, 1:6] = 1
    truth[2:6, 6:11] = 2  # shares a vertical border with nucleus 1
    truth[6, 6:11] = 3  # touches nucleus 2 from below

    foreground = separated_foreground(truth)

    # One column of nucleus 2 and nucleus 3's whole row (the higher labels) give way;
    # everything else of every nucleus stays foreground.
    assert not foreground[2:6, 6].any() and not foreground[6, 6:11].any()
    assert foreground[2:6, 1:6].all() and foreground[2:6, 7:11].all()
    assert not foreground[truth == 0].any()


def test_the_contact_zone_lies_between_nuclei_that_touch_or_nearly_do() -> None:
    truth = np.zeros((20, 40), np.int32)
    truth[5:15, 2:10] = 1
    truth[5:15, 10:18] = 2  # touches nucleus 1
    truth[5:15, 22:30] = 3  # 4 px from nucleus 2
    truth[5:15, 37:40] = 4  # 7 px from nucleus 3: too far at radius 3

    zone = contact_zone(truth, radius=3).astype(bool)

    assert zone[9, 9] and zone[9, 10]  # the shared border
    assert zone[9, 19:21].all()  # the middle of the narrow gap, 3 px from both
    assert not zone[9, 30:37].any()  # the wide gap
    assert not zone[9, 2:6].any() and not zone[0, :].any()  # far from any neighbour
    # Without neighbours there is no zone at all.
    assert not contact_zone(_discs([(32, 32)], radius=8)).any()


def test_the_contact_zone_weighs_more_in_the_loss() -> None:
    fg = torch.zeros(1, 8, 8)
    dist = torch.zeros(1, 8, 8)
    output = torch.zeros(1, 2, 8, 8)
    output[0, 1, 0, 0] = 1.0  # one pixel's distance wrong
    contact = torch.zeros(1, 8, 8)
    known = torch.ones(1)
    plain = training_loss(output, fg, dist, contact, known, contact_weight=5.0)
    contact[0, 0, 0] = 1.0
    weighted = training_loss(output, fg, dist, contact, known, contact_weight=5.0)
    # Cross-entropy gains 5/64 of log(2) from the one pixel's sigmoid(0) = 0.5; the
    # squared error 2 * 5 * 1 / 64.
    expected = 5 / 64 * float(np.log(2)) + 2 * 5 / 64
    assert float(weighted - plain) == pytest.approx(expected, rel=1e-5)
    # No extra weight: the zone changes nothing.
    unweighted = training_loss(output, fg, dist, contact, known, 0.0)
    assert float(unweighted) == pytest.approx(float(plain))


def test_maps_at_the_working_resolution_come_back_at_the_patch_size() -> None:
    truth = _discs([(20, 20), (44, 44)], radius=8)

    labels = labels_from_maps(_maps(truth), (128, 128), mpp=WORK_MPP / 2)

    assert labels.shape == (128, 128) and labels.max() == 2
    assert labels.dtype == np.int32
    # Numbered in raster order of first pixel.
    assert labels[40, 40] == 1 and labels[88, 88] == 2


def test_specks_under_the_smallest_nucleus_are_dropped() -> None:
    truth = _discs([(32, 32)], radius=1)  # 5 px at 0.25 µm/px: 0.31 µm²
    assert labels_from_maps(_maps(truth), truth.shape, mpp=WORK_MPP).max() == 0


def test_the_patch_is_brought_to_the_working_resolution() -> None:
    rgb = np.zeros((512, 256, 3), np.uint8)
    assert to_work_resolution(rgb, 2 * WORK_MPP).shape == (1024, 512, 3)
    assert to_work_resolution(rgb, WORK_MPP / 2).shape == (256, 128, 3)
    assert to_work_resolution(rgb, WORK_MPP) is rgb


def test_missing_or_unfitting_weights_are_a_readable_failed_precondition(
    tmp_path: Path,
) -> None:
    with pytest.raises(FailedPrecondition, match="no nuclei model weights"):
        NucleiNet(tmp_path / "absent.pt")
    wrong = tmp_path / "wrong.pt"
    torch.save({"conv.weight": torch.zeros(1)}, wrong)
    with pytest.raises(FailedPrecondition, match="does not fit the nuclei U-Net"):
        NucleiNet(wrong)


def test_a_batch_gives_what_each_patch_gives_alone(tmp_path: Path) -> None:
    torch.manual_seed(0)
    weights = tmp_path / "random.pt"
    torch.save(build_unet().state_dict(), weights)
    net = NucleiNet(weights, device="cpu")
    rng = np.random.default_rng(0)
    patches = [rng.integers(0, 256, (96, 96, 3), dtype=np.uint8) for _ in range(3)]
    patches.append(rng.integers(0, 256, (70, 50, 3), dtype=np.uint8))  # another size

    together = net.maps(patches)
    alone = [net.maps([p])[0] for p in patches]

    for a, b, p in zip(together, alone, patches, strict=True):
        assert a.shape == (*p.shape[:2], 2)
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert len(segment_unet_batch(patches, [0.5] * 4, net=net)) == 4
