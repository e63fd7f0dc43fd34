from __future__ import annotations

import numpy as np
import pytest

from services.common.errors import InvalidInput
from services.slide.grid import (
    GridParams,
    TissueRule,
    footprint_px,
    params_hash,
    patch_grid,
    window_coverage,
)
from services.slide.highres import quadrant_origins, upsample_quadrants


def test_footprint_follows_magnification_and_slide_resolution() -> None:
    assert footprint_px(GridParams(), 0.25) == 1024  # 20x patch on a 40x slide
    assert footprint_px(GridParams(), 0.5) == 512
    assert footprint_px(GridParams(magnification=10), 0.25) == 2048
    assert footprint_px(GridParams(), 0.2497) == pytest.approx(1025.2, abs=0.1)


def test_upsampling_needs_consent() -> None:
    with pytest.raises(InvalidInput, match="upsampling"):
        footprint_px(GridParams(magnification=40), 0.5)
    assert footprint_px(GridParams(magnification=40, allow_upsample=True), 0.5) == 256


@pytest.mark.parametrize(
    "kwargs",
    [{"magnification": 0}, {"patch_px": 8}, {"min_tissue": 1.5}, {"overlap_px": 512}],
)
def test_bad_parameters(kwargs: dict) -> None:
    with pytest.raises(InvalidInput):
        GridParams(**kwargs)


def test_grid_keeps_patches_with_enough_tissue() -> None:
    mask = np.zeros((96, 128), bool)  # 4096 x 3072 slide at downsample 32
    mask[:48, :] = True  # the top half is tissue
    mask[:, 96:] = False  # ... except the right quarter
    grid = patch_grid((4096, 3072), 0.25, mask, 32.0, GridParams(min_tissue=0.5))
    assert list(grid.columns) == ["x", "y", "width", "height", "row", "col", "tissue_fraction"]
    assert set(zip(grid["x"], grid["y"], strict=True)) == {
        (0, 0),
        (1024, 0),
        (2048, 0),
        (0, 1024),
        (1024, 1024),
        (2048, 1024),
    }
    assert (grid["width"] == 1024).all() and (grid["height"] == 1024).all()
    by_xy = grid.set_index(["x", "y"])["tissue_fraction"]
    assert by_xy[(0, 0)] == pytest.approx(1.0)
    assert by_xy[(0, 1024)] == pytest.approx(0.5)
    strict = patch_grid((4096, 3072), 0.25, mask, 32.0, GridParams(min_tissue=0.9))
    assert len(strict) == 3


def test_overlap_and_partial_patches() -> None:
    mask = np.ones((96, 128), bool)
    grid = patch_grid((4096, 3072), 0.25, mask, 32.0, GridParams(overlap_px=256))
    # Footprint 1024, stride 512: x in 0..3072, y in 0..2048, only whole patches.
    assert sorted(set(grid["x"])) == [0, 512, 1024, 1536, 2048, 2560, 3072]
    assert sorted(set(grid["y"])) == [0, 512, 1024, 1536, 2048]
    assert (grid["x"] + grid["width"] <= 4096).all() and (grid["y"] + grid["height"] <= 3072).all()


def test_no_tissue_is_an_empty_grid_not_an_error() -> None:
    grid = patch_grid((4096, 3072), 0.25, np.zeros((96, 128), bool), 32.0)
    assert grid.empty and "tissue_fraction" in grid.columns
    tiny = patch_grid((500, 500), 0.25, np.ones((16, 16), bool), 32.0)
    assert tiny.empty


def test_params_hash_is_stable_and_sensitive() -> None:
    a = params_hash(GridParams(), {"stain": "vahadane"})
    assert a == params_hash(GridParams(), {"stain": "vahadane"})
    assert a != params_hash(GridParams(min_tissue=0.6), {"stain": "vahadane"})
    assert len(a) == 16


def test_quadrants_of_a_20x_patch() -> None:
    assert quadrant_origins(1000, 2000, 1024) == [
        (1000, 2000),
        (1512, 2000),
        (1000, 2512),
        (1512, 2512),
    ]
    patch = np.zeros((64, 64, 3), np.uint8)
    patch[:32, :32] = (255, 0, 0)
    patch[:32, 32:] = (0, 255, 0)
    patch[32:, :32] = (0, 0, 255)
    patch[32:, 32:] = (255, 255, 255)
    quads = upsample_quadrants(patch)
    assert [q.shape for q in quads] == [(64, 64, 3)] * 4
    # Each quadrant is one colour block zoomed x2 (Lanczos rings only at the edges).
    for quad, colour in zip(
        quads, [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)], strict=True
    ):
        assert np.abs(quad[8:56, 8:56].astype(int) - colour).max() <= 2
    with pytest.raises(InvalidInput):
        upsample_quadrants(np.zeros((64, 32, 3), np.uint8))


def test_window_coverage_matches_counting_mask_pixels() -> None:
    rng = np.random.default_rng(4)
    mask = rng.random((60, 80)) < 0.4
    xs, ys = np.array([0, 64, 320, 600]), np.array([0, 128, 96, 400])
    fractions = window_coverage(mask, 8.0, xs, ys, 128)
    for x, y, fraction in zip(xs, ys, fractions, strict=True):
        box = mask[y // 8 : (y + 128) // 8, x // 8 : (x + 128) // 8]
        assert fraction == pytest.approx(box.sum() / 256)  # beyond the mask: no tissue


def test_a_tissue_rule_keeps_windows_with_enough_tissue_or_the_fullest() -> None:
    mask = np.zeros((16, 16), bool)
    mask[:, :6] = True  # the left 6 of 16 mask columns
    rule = TissueRule(mask, 8.0, 0.5)
    quadrants = [(0, 0), (64, 0), (0, 64), (64, 64)]
    assert rule.keeps(quadrants, 64) == [True, False, True, False]
    # No window reaches half: the fullest is kept, so a patch always yields one.
    assert rule.keeps([(32, 0), (64, 0), (96, 0)], 64) == [True, False, False]
    assert rule.keeps([], 64) == []
