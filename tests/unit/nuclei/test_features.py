"""Per-nucleus features against scikit-image, and the 75 patch features."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from skimage.measure import regionprops

from services.common.errors import InvalidInput
from services.nuclei.features import (
    FEATURE_NAMES,
    FEATURES,
    histogram_statistics,
    nucleus_table,
    patch_features,
)

MPP = 0.25


def _ellipses(seed: int = 0, count: int = 25) -> np.ndarray:
    """A label image of random, partly overlapping ellipses (later ones on top)."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((256, 256), np.int32)
    for label in range(1, count + 1):
        centre = (int(rng.integers(10, 246)), int(rng.integers(10, 246)))
        axes = (int(rng.integers(4, 20)), int(rng.integers(3, 12)))
        cv2.ellipse(labels, centre, axes, float(rng.uniform(0, 180)), 0, 360, label, -1)
    return labels


def _image(labels: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(1)
    rgb = rng.integers(150, 255, (*labels.shape, 3), dtype=np.uint8)
    rgb[labels > 0] //= 2
    return rgb


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_morphology_equals_regionprops(seed: int) -> None:
    labels = _ellipses(seed)
    rgb = _image(labels)
    table = nucleus_table(labels, rgb, MPP).set_index("label")
    props = regionprops(labels, intensity_image=rgb)
    assert list(table.index) == [p.label for p in props]
    for p in props:
        row = table.loc[p.label]
        assert row.area_um2 == pytest.approx(p.area * MPP**2)
        assert row.major_axis_um == pytest.approx(p.axis_major_length * MPP, abs=1e-9)
        assert row.minor_axis_um == pytest.approx(p.axis_minor_length * MPP, abs=1e-9)
        assert row.eccentricity == pytest.approx(p.eccentricity, abs=1e-9)
        assert row.perimeter_um == pytest.approx(p.perimeter * MPP, abs=1e-9)
        assert row.solidity == pytest.approx(p.solidity, abs=1e-9)
        assert row.circularity == pytest.approx(
            min(1.0, 4 * np.pi * p.area / p.perimeter**2), abs=1e-9
        )
        np.testing.assert_allclose(
            [row.mean_red, row.mean_green, row.mean_blue], p.intensity_mean, atol=1e-9
        )
        assert (row.centroid_y_px, row.centroid_x_px) == pytest.approx(p.centroid)


def test_orientation_is_counter_clockwise_from_x() -> None:
    for angle in (0, 30, 60, 90, 135):
        labels = np.zeros((101, 101), np.int32)
        # cv2.ellipse turns clockwise on screen (y down): negate for counter-clockwise.
        cv2.ellipse(labels, (50, 50), (30, 10), -angle, 0, 360, 1, -1)
        (orientation,) = nucleus_table(labels, _image(labels), MPP)["orientation_deg"]
        difference = (orientation - angle + 90) % 180 - 90
        assert abs(difference) < 2, (angle, orientation)


def test_spatial_features_from_the_delaunay_triangulation() -> None:
    # Five nuclei: the corners of a square and its centre (side 40 px = 10 µm).
    labels = np.zeros((80, 80), np.int32)
    for label, (x, y) in enumerate([(20, 20), (60, 20), (20, 60), (60, 60), (40, 40)], 1):
        cv2.circle(labels, (x, y), 4, label, -1)
    table = nucleus_table(labels, _image(labels), MPP).set_index("label")
    centre = table.loc[5]
    assert centre.degree == 4
    assert centre.min_neighbor_distance_um == pytest.approx(np.hypot(20, 20) * MPP)
    corner = table.loc[1]
    assert corner.min_neighbor_distance_um == pytest.approx(np.hypot(20, 20) * MPP)
    assert corner.max_neighbor_distance_um == pytest.approx(40 * MPP)


def test_names_and_groups() -> None:
    assert len(FEATURES) == 15 and len(FEATURE_NAMES) == 75
    groups = [name.split(".")[0] for name in FEATURE_NAMES]
    assert (groups.count("morph"), groups.count("intensity"), groups.count("spatial")) == (
        40,
        15,
        20,
    )
    assert "morph.area.mean" in FEATURE_NAMES


def test_histogram_statistics_by_hand() -> None:
    # Two values in bin 0 (centre 0.5) and two in bin 2 (centre 2.5) of [0, 10].
    mean, std, entropy, skewness, kurtosis = histogram_statistics(
        np.array([0.1, 0.9, 2.2, 2.8]), 0.0, 10.0
    )
    assert (mean, std, entropy, skewness) == pytest.approx((1.5, 1.0, 1.0, 0.0))
    assert kurtosis == pytest.approx(1.0 - 3.0)
    # Outside values fall in the end bins; nothing is NaN.
    assert np.isfinite(histogram_statistics(np.array([-5.0, 50.0]), 0.0, 10.0)).all()
    assert not histogram_statistics(np.array([]), 0.0, 1.0).any()


@pytest.mark.parametrize("count", [0, 1, 2])
def test_few_nuclei_give_defined_values_and_a_flag(count: int) -> None:
    labels = np.zeros((64, 64), np.int32)
    for label in range(1, count + 1):
        cv2.circle(labels, (16 * label, 32), 5, label, -1)
    features = patch_features(nucleus_table(labels, _image(labels), MPP))
    assert features.few_nuclei and features.nucleus_count == count
    assert np.isfinite(features.values).all()
    spatial = [i for i, n in enumerate(FEATURE_NAMES) if n.startswith("spatial.")]
    assert not features.values[spatial].any()


def test_nuclei_on_a_line_have_no_triangulation() -> None:
    labels = np.zeros((40, 120), np.int32)
    for label in range(1, 5):
        cv2.circle(labels, (25 * label, 20), 5, label, -1)
    features = patch_features(nucleus_table(labels, _image(labels), MPP))
    assert not features.few_nuclei and np.isfinite(features.values).all()


def test_bad_input() -> None:
    labels = np.zeros((8, 8), np.int32)
    with pytest.raises(InvalidInput):
        nucleus_table(labels, np.zeros((8, 9, 3), np.uint8), MPP)
    with pytest.raises(InvalidInput):
        nucleus_table(labels - 1, np.zeros((8, 8, 3), np.uint8), MPP)
    with pytest.raises(InvalidInput):
        nucleus_table(labels, np.zeros((8, 8, 3), np.uint8), 0.0)
