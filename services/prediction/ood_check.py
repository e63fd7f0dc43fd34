"""Is this slide like the slides the models learned from? The out-of-distribution check
of a prediction, shared by the paper's pipeline and the MIL pipeline.

A slide is measured on up to ``max_patches`` patches of its usable grid (the grid
:func:`~services.slide.prepare.prepare_slide` lays: tissue less pen, blur and folds),
taken evenly spread in grid order, so the same slide always gives the same patches.
They are read *raw* (not stain-normalised: stain and scanner differences are part of
what the check must see) at :data:`~services.inference.ood.DESCRIPTOR_MPP` (0.5
µm/px; at the slide's own resolution when it is coarser), described by
:func:`~services.inference.ood.patch_descriptors` and compared with the training
slides by a fitted :class:`~services.inference.ood.OodDetector`. Training fits that
reference with the same sampling (:func:`grid_descriptors`), so a training slide and
a new slide are described alike.

Cost: reading and describing 32 patches of 512 px takes a fraction of a second on one
core, small next to scoring the slide.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from services.common.errors import InvalidInput
from services.inference.ood import DESCRIPTOR_MPP, OodDetector, patch_descriptors
from services.slide.grid import GridParams
from services.slide.prepare import PreparedSlide
from services.slide.reader import SlideReader

#: Patches described per slide when neither the caller nor the reference says
#: (the training flow's default, ``flows.training.config.OodConfig``).
DEFAULT_MAX_PATCHES = 32
#: Key of a fitted reference's ``training`` record holding the patches per slide it
#: was fitted with (a new slide is sampled alike).
PATCHES_PER_SLIDE_KEY = "max_patches_per_slide"
#: What the distance is measured on (the proto's ``OutOfDistribution.basis``).
BASIS = (
    "stain (optical density), texture and nucleus-like blob statistics of raw tissue "
    "patches at 0.5 µm/px"
)


def spread_rows(count: int, max_patches: int) -> np.ndarray:
    """Row positions of at most ``max_patches`` of ``count`` rows, evenly spread in
    order, first and last included (all of them when ``count <= max_patches``).

    Raises:
        InvalidInput: ``max_patches`` below 1 or ``count`` below 0.
    """
    if isinstance(max_patches, bool) or not isinstance(max_patches, int) or max_patches < 1:
        raise InvalidInput(f"max_patches must be a whole number >= 1, got {max_patches!r}")
    if count < 0:
        raise InvalidInput(f"a grid has 0 or more rows, got {count}")
    if count == 0:
        return np.zeros(0, np.int64)
    picks = np.linspace(0, count - 1, min(count, max_patches)).round().astype(np.int64)
    return np.unique(picks)


def grid_descriptors(
    reader: SlideReader, grid: pd.DataFrame, patch_um: float, max_patches: int
) -> np.ndarray:
    """Descriptors of up to ``max_patches`` patches of a slide's grid, read raw.

    Args:
        reader: The open slide.
        grid: Its patch grid: ``x``, ``y`` (level-0 px) per patch, in grid order
            (``PreparedSlide.grid`` or TilingService's ``grid.parquet``).
        patch_um: Side of a grid patch, µm (``patch_px`` x the grid's µm/px).
        max_patches: Most patches described (:func:`spread_rows` picks them).

    Returns:
        ``float32`` (N, len(PATCH_FEATURES)), N = min(len(grid), max_patches).

    Raises:
        InvalidInput: A bad ``patch_um`` or ``max_patches``, or patches too small
            to describe.
    """
    if not (isinstance(patch_um, int | float) and np.isfinite(patch_um) and patch_um > 0):
        raise InvalidInput(f"patch_um must be a positive size in µm, got {patch_um!r}")
    picks = spread_rows(len(grid), max_patches)
    # Slides coarser than 20x are read as they are; the descriptors resample them.
    read_mpp = max(DESCRIPTOR_MPP, float(max(reader.mpp)))
    size_px = max(1, round(patch_um / read_mpp))
    patches = np.zeros((len(picks), size_px, size_px, 3), np.uint8)
    xs, ys = grid["x"].to_numpy()[picks], grid["y"].to_numpy()[picks]
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        patches[i] = reader.read_patch(int(x), int(y), size_px, read_mpp, allow_upsample=True)
    return patch_descriptors(patches, read_mpp)


def check_slide_ood(
    reader: SlideReader,
    prepared: PreparedSlide,
    detector: OodDetector,
    grid: GridParams,
    *,
    max_patches: int | None = None,
) -> dict[str, Any]:
    """How far a prepared slide is from the training slides, and the verdict.

    Args:
        reader: The open slide.
        prepared: The slide as :func:`~services.slide.prepare.prepare_slide` made it
            ready; its usable grid must hold at least one patch (check
            ``prepared.grid.empty`` first: such a slide has no tissue to judge).
        detector: The fitted reference (``Deployment.ood``).
        grid: The parameters the grid was laid with (its patch side).
        max_patches: Patches described; None takes as many as the reference was
            fitted with per slide (``detector.training["max_patches_per_slide"]``),
            else :data:`DEFAULT_MAX_PATCHES`.

    Returns:
        The result's ``out_of_distribution`` entry (the proto's OutOfDistribution):
        ``out_of_distribution`` (bool), ``distance`` and ``threshold`` (the
        detector's unitless standardised distance; out of distribution when the
        distance is above the threshold), ``basis`` (text) and ``patch_count``.

    Raises:
        InvalidInput: An empty grid or a bad ``max_patches``.
    """
    if prepared.grid.empty:
        raise InvalidInput("the slide has no usable tissue patch to compare with the training")
    if max_patches is None:
        fitted_with = detector.training.get(PATCHES_PER_SLIDE_KEY)
        max_patches = int(fitted_with) if fitted_with else DEFAULT_MAX_PATCHES
    desc = grid_descriptors(reader, prepared.grid, grid.patch_px * grid.target_mpp, max_patches)
    decision = detector.decide(desc)
    return {
        "out_of_distribution": bool(decision.ood),
        "distance": round(float(decision.distance), 4),
        "threshold": round(float(decision.threshold), 4),
        "basis": basis_of(detector),
        "patch_count": len(desc),
    }


def basis_of(detector: OodDetector) -> str:
    """What ``detector``'s distance is measured on, in words."""
    if detector.method == "knn":
        how = f"mean standardised distance to the {detector.k} nearest training slides"
    else:
        how = "Mahalanobis distance to the training slides"
    return f"{BASIS}; {how}"


def refusal_message(decision: dict[str, Any]) -> str:
    """One line saying why a slide out of distribution gets no calls."""
    return (
        f"the slide is out of the models' training distribution (distance "
        f"{float(decision['distance']):.3g} > threshold {float(decision['threshold']):.3g}, "
        f"on {decision['patch_count']} patches): no biomarker calls; ask for them anyway "
        "with answer_out_of_distribution"
    )
