"""The 40x windows of 20x patches: each made once, on usable tissue, the same pixels
whoever asks (tiling for training, or prediction)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from services.slide.grid import TissueRule
from services.slide.highres import (
    HighResSource,
    WindowClaims,
    make_windows,
    quadrant_origins,
    upsample_quadrants,
)
from services.slide.reader import open_slide
from services.synth.cohort import generate_cohort


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("cohort")
    generate_cohort(folder, 1, seed=5, preset="tiny", truth_crops=0)
    manifest = pd.read_csv(folder / "manifest.csv")
    return folder / manifest.iloc[0]["slide_path"]


def test_a_window_shared_by_overlapping_patches_goes_to_the_first() -> None:
    claims = WindowClaims()
    first = claims.claim(0, 0, 1024)
    assert first == quadrant_origins(0, 0, 1024)
    # Half a footprint to the right: its left quadrants are the first patch's right.
    second = claims.claim(512, 0, 1024)
    assert second == [(1024, 0), (1024, 512)]
    assert claims.claim(0, 0, 1024) == []  # asked again: nothing left


def test_windows_with_too_little_usable_tissue_are_left_out() -> None:
    usable = np.zeros((8, 8), dtype=bool)
    usable[:, :4] = True  # the left half of a 1024 px square (128 px per mask px)
    claims = WindowClaims(TissueRule(usable, 128.0, 0.5))
    assert claims.claim(0, 0, 1024) == [(0, 0), (0, 512)]
    # The right windows were not taken: a rule without tissue would still get them.
    assert claims.taken == {(0, 0), (0, 512)}


def test_native_and_upsampled_windows_are_the_slides_pixels(slide_path: Path) -> None:
    with open_slide(slide_path) as reader:
        footprint = 512 * 0.5 / float(reader.mpp[0])  # a 20x patch on a 40x slide
        windows = quadrant_origins(1024, 1024, footprint)[1:3]
        native = make_windows(
            reader,
            1024,
            1024,
            footprint,
            windows,
            source=HighResSource.NATIVE,
            patch_px=512,
            low_mpp=0.5,
        )
        for (qx, qy), window in zip(windows, native, strict=True):
            assert np.array_equal(window, reader.read_patch(qx, qy, 512, 0.25))
        low = reader.read_patch(1024, 1024, 512, 0.5)
        upsampled = make_windows(
            reader,
            1024,
            1024,
            footprint,
            windows,
            source=HighResSource.UPSAMPLED,
            patch_px=512,
            low_mpp=0.5,
            normalize=lambda rgb: 255 - rgb,  # any transform: applied to the 20x patch
        )
    expected = upsample_quadrants(255 - low)[1:3]
    for got, want in zip(upsampled, expected, strict=True):
        assert np.array_equal(got, want)
