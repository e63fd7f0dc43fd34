"""The patch grid: where a slide's patches are, at level 0, and how much tissue each has.

Patches are ``patch_px`` square at a requested magnification (20x by default, i.e.
0.5 µm/px). On a slide scanned at ``mpp0`` µm/px a patch covers
``patch_px * target_mpp / mpp0`` level-0 pixels a side (its *footprint*). Patches
step by the footprint less the overlap, start at the slide's top-left corner, lie
wholly inside the slide, and are kept when the tissue mask covers at least
``min_tissue`` of them. Coordinates are (x, y) of the top-left corner at level 0.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from functools import cached_property
from typing import Any

import cv2
import numpy as np
import pandas as pd

from services.common.errors import InvalidInput

#: Relative slack when comparing resolutions (scanners report 0.2497 for 0.25).
MPP_TOLERANCE = 0.02


@dataclass(frozen=True)
class GridParams:
    """How to lay the grid.

    Attributes:
        magnification: Objective magnification of the patches (20 = 0.5 µm/px).
        patch_px: Patch side in pixels at that magnification.
        min_tissue: Least share (0-1) of a patch the tissue mask must cover.
        overlap_px: Overlap of neighbouring patches, pixels at that magnification.
        allow_upsample: Allow a magnification finer than the slide's own (the
            patches would then be upsampled).
    """

    magnification: float = 20.0
    patch_px: int = 512
    min_tissue: float = 0.5
    overlap_px: int = 0
    allow_upsample: bool = False

    def __post_init__(self) -> None:
        if not 0.5 <= self.magnification <= 100:
            raise InvalidInput(f"magnification must be within 0.5-100, got {self.magnification}")
        if not 16 <= self.patch_px <= 8192:
            raise InvalidInput(f"patch size must be within 16-8192 px, got {self.patch_px}")
        if not 0.0 <= self.min_tissue <= 1.0:
            raise InvalidInput(f"min tissue must be within 0-1, got {self.min_tissue}")
        if not 0 <= self.overlap_px < self.patch_px:
            raise InvalidInput(
                f"overlap must be >= 0 and below the patch size, got {self.overlap_px} px"
            )

    @property
    def target_mpp(self) -> float:
        """Resolution of the patches, µm/px."""
        return 10.0 / self.magnification


def params_hash(*parts: Any) -> str:
    """A short stable hash of parameters (dataclasses, dicts, numbers, strings).

    Names the folder ``tiles/{slide_id}/{params_hash}/`` so that a run with the same
    parameters finds and reuses an earlier result.
    """

    def plain(value: Any) -> Any:
        if hasattr(value, "__dataclass_fields__"):
            return {"__type__": type(value).__name__, **asdict(value)}
        return value

    text = json.dumps([plain(part) for part in parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def footprint_px(params: GridParams, mpp0: float) -> float:
    """Level-0 pixels covered by one patch side."""
    if mpp0 <= 0:
        raise InvalidInput(f"slide resolution must be positive, got {mpp0} µm/px")
    if params.target_mpp < mpp0 * (1 - MPP_TOLERANCE) and not params.allow_upsample:
        raise InvalidInput(
            f"the slide is scanned at {mpp0:.4g} µm/px ({10 / mpp0:.3g}x); "
            f"{params.magnification:g}x ({params.target_mpp:.4g} µm/px) would need "
            "upsampling: ask for a lower magnification or allow upsampling"
        )
    return params.patch_px * params.target_mpp / mpp0


def grid_shape(slide_size_px: tuple[int, int], mpp0: float, params: GridParams) -> tuple[int, int]:
    """(rows, columns) of whole patches the slide holds, tissue or not."""
    width, height = slide_size_px
    size = footprint_px(params, mpp0)
    stride = size - params.overlap_px * params.target_mpp / mpp0
    cols = int(np.floor((width - size) / stride)) + 1 if width >= size else 0
    rows = int(np.floor((height - size) / stride)) + 1 if height >= size else 0
    return rows, cols


def patch_grid(
    slide_size_px: tuple[int, int],
    mpp0: float,
    tissue: np.ndarray,
    mask_downsample: float,
    params: GridParams = GridParams(),
) -> pd.DataFrame:
    """The grid's patches with enough tissue.

    Args:
        slide_size_px: Level-0 (width, height).
        mpp0: Level-0 resolution, µm/px.
        tissue: Boolean tissue mask (True = usable tissue).
        mask_downsample: Level-0 pixels per mask pixel.
        params: Grid parameters.

    Returns:
        One row per kept patch, in row-major order, with columns ``x``, ``y``,
        ``width``, ``height`` (level-0 px, int), ``row``, ``col`` (grid indices),
        ``tissue_fraction`` (0-1). Empty (with those columns) when no patch has
        enough tissue: that is not an error.
    """
    width, height = slide_size_px
    if width <= 0 or height <= 0:
        raise InvalidInput(f"slide size must be positive, got {width}x{height} px")
    if tissue.ndim != 2:
        raise InvalidInput(f"the tissue mask must be 2-D, got shape {tissue.shape}")
    if mask_downsample <= 0:
        raise InvalidInput(f"mask downsample must be positive, got {mask_downsample}")
    size = footprint_px(params, mpp0)
    stride = size - params.overlap_px * params.target_mpp / mpp0
    rows, cols = grid_shape(slide_size_px, mpp0, params)
    columns = ["x", "y", "width", "height", "row", "col", "tissue_fraction"]
    if rows == 0 or cols == 0:
        return pd.DataFrame({name: pd.Series(dtype="int64") for name in columns[:-1]}).assign(
            tissue_fraction=pd.Series(dtype="float64")
        )
    xs = np.round(np.arange(cols) * stride).astype(np.int64)
    ys = np.round(np.arange(rows) * stride).astype(np.int64)
    side = round(size)
    fractions = _coverage(tissue.astype(np.uint8), mask_downsample, xs, ys, side)
    keep_rows, keep_cols = np.nonzero(fractions >= params.min_tissue - 1e-9)
    table = pd.DataFrame(
        {
            "x": xs[keep_cols],
            "y": ys[keep_rows],
            "width": np.full(len(keep_cols), side, np.int64),
            "height": np.full(len(keep_cols), side, np.int64),
            "row": keep_rows.astype(np.int64),
            "col": keep_cols.astype(np.int64),
            "tissue_fraction": fractions[keep_rows, keep_cols].astype(np.float64),
        }
    )
    return table


def _coverage(
    mask: np.ndarray, downsample: float, xs: np.ndarray, ys: np.ndarray, side: int
) -> np.ndarray:
    """Share of each footprint of the grid ``ys`` x ``xs`` the mask covers, (rows, cols)."""
    x_grid, y_grid = np.meshgrid(xs, ys)
    return window_coverage(mask, downsample, x_grid.ravel(), y_grid.ravel(), side).reshape(
        len(ys), len(xs)
    )


def window_coverage(
    mask: np.ndarray, downsample: float, xs: np.ndarray, ys: np.ndarray, side: float
) -> np.ndarray:
    """Share (0-1) of each square window the mask covers, from its integral image.

    Args:
        mask: Boolean or 0/1 mask (True = tissue).
        downsample: Level-0 px per mask px.
        xs: Level-0 x of each window's top-left corner.
        ys: Level-0 y of each window's top-left corner (paired with ``xs``).
        side: Window side, level-0 px.

    Returns:
        One fraction per window. Window edges are rounded to whole mask pixels: with
        the usual downsamples (8-32 level-0 px per mask pixel against 512-1024 px
        windows) that moves a fraction by a few percent at most, and memory stays at
        the mask's own size. Parts of a window beyond the mask count as no tissue.
    """
    return _integral_coverage(cv2.integral(mask.astype(np.uint8)), downsample, xs, ys, side)


def _integral_coverage(
    integral: np.ndarray, downsample: float, xs: np.ndarray, ys: np.ndarray, side: float
) -> np.ndarray:
    """:func:`window_coverage` from the mask's integral image ((h + 1, w + 1) int32)."""
    h, w = integral.shape[0] - 1, integral.shape[1] - 1

    def to_index(values: np.ndarray, limit: int) -> np.ndarray:
        return np.clip(np.round(values / downsample).astype(np.int64), 0, limit)

    xs, ys = np.asarray(xs, np.float64), np.asarray(ys, np.float64)
    x0, x1 = to_index(xs, w), to_index(xs + side, w)
    y0, y1 = to_index(ys, h), to_index(ys + side, h)
    total = (
        integral[y1, x1].astype(np.float64) - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    )
    return np.clip(total / (side / downsample) ** 2, 0.0, 1.0)


@dataclass(frozen=True)
class TissueRule:
    """Which windows hold enough tissue: the rule of the 20x grid, for any window.

    A 20x patch with enough tissue can still have a quadrant of glass or pen ink; its
    40x patches follow this rule too.

    Attributes:
        mask: Boolean tissue mask (True = usable tissue).
        downsample: Level-0 px per mask px.
        min_tissue: Least share (0-1) of a window the mask must cover.
    """

    mask: np.ndarray
    downsample: float
    min_tissue: float

    @cached_property
    def _integral(self) -> np.ndarray:
        # Once per rule: keeps() is called for every cancer patch of a slide.
        return cv2.integral(self.mask.astype(np.uint8))

    def keeps(self, origins: list[tuple[int, int]], side: float) -> list[bool]:
        """Whether each of a patch's windows (level-0 top-left origins, ``side`` px)
        has enough tissue; when none has, the one with the most is kept, so that a
        patch that passed the rule always yields a window (its quadrants' mean
        coverage is its own, so one reaches the share unless mask rounding differs)."""
        if not origins:
            return []
        xs, ys = zip(*origins, strict=True)
        fractions = _integral_coverage(
            self._integral, self.downsample, np.array(xs), np.array(ys), side
        )
        kept = [bool(f >= self.min_tissue - 1e-9) for f in fractions]
        if not any(kept):
            kept[int(np.argmax(fractions))] = True
        return kept
