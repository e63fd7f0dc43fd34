"""Nuclei segmentation methods by name.

- ``unet`` (the default): the small U-Net trained on real annotated H&E
  (:mod:`services.nuclei.unet`), the most accurate on real tissue;
- ``phoulady``: the paper's hierarchical multilevel thresholding
  (:mod:`services.nuclei.segment`), no learned weights;
- ``otsu``: the naive baseline (:mod:`services.nuclei.baseline`), for comparison.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from services.common.errors import InvalidInput
from services.nuclei.segment import (
    DEFAULT_METHOD,
    METHODS,
    SegmentationParams,
    check_method,
    check_patch,
    segment_nuclei,
)

__all__ = ["DEFAULT_METHOD", "METHODS", "check_method", "segment_batch"]


def segment_batch(
    rgbs: Sequence[np.ndarray],
    mpps: Sequence[float],
    method: str = "",
    params: SegmentationParams | None = None,
    weights: Path | None = None,
) -> list[np.ndarray]:
    """Instance labels (int32, 0 background, 1..n) of each RGB patch.

    Args:
        rgbs: uint8 (H, W, 3) patches.
        mpps: Their resolutions, µm/px.
        method: One of :data:`METHODS`; '' means ``params.method`` (or the default).
        params: The parameters (the thresholds apply to ``phoulady`` only).
        weights: Another weights file for ``unet``; the shipped one when None.

    Raises:
        InvalidInput: Unknown method, bad image or mpp.
        FailedPrecondition: The U-Net's weights are missing or do not fit.
    """
    method = check_method(method or (params.method if params is not None else ""))
    if len(rgbs) != len(mpps):
        raise InvalidInput(f"{len(rgbs)} patches but {len(mpps)} resolutions")
    checked = [check_patch(rgb, mpp) for rgb, mpp in zip(rgbs, mpps, strict=True)]
    if method == "unet":
        from services.nuclei.unet import segment_unet_batch, shared_net

        return segment_unet_batch(checked, mpps, net=shared_net(weights))
    if method == "otsu":
        from services.nuclei.baseline import segment_otsu

        return [segment_otsu(rgb, mpp) for rgb, mpp in zip(checked, mpps, strict=True)]
    return [segment_nuclei(rgb, mpp, params) for rgb, mpp in zip(checked, mpps, strict=True)]
