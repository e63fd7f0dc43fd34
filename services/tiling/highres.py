"""From a 20x patch to its four 40x patches (METHOD.md, stage 1).

Each cancer-discriminative 20x patch becomes four 40x patches of the same pixel size:
read from the slide's native 40x level when it has one, otherwise the paper's way —
zoom the 20x patch x2 with Lanczos interpolation and crop the four quadrants. The
quadrants are returned in row-major order (top-left, top-right, bottom-left,
bottom-right) with their level-0 origins.
"""

from __future__ import annotations

from enum import StrEnum

import cv2
import numpy as np

from services.common.errors import InvalidInput


class HighResSource(StrEnum):
    """Where a 40x patch's pixels came from."""

    NATIVE = "native"
    UPSAMPLED = "upsampled"


def quadrant_origins(x: int, y: int, footprint_px: float) -> list[tuple[int, int]]:
    """Level-0 origins of the four quadrants of a patch at (x, y) with that footprint."""
    half = footprint_px / 2
    return [(round(x + dx * half), round(y + dy * half)) for dy in (0, 1) for dx in (0, 1)]


def upsample_quadrants(patch: np.ndarray) -> list[np.ndarray]:
    """Zoom a square RGB patch x2 (Lanczos) and cut it into four of the same size.

    Args:
        patch: ``uint8`` (n, n, 3) patch at 20x.

    Returns:
        Four ``uint8`` (n, n, 3) patches at 40x, row-major.
    """
    if patch.ndim != 3 or patch.shape[2] != 3 or patch.shape[0] != patch.shape[1]:
        raise InvalidInput(f"expected a square RGB patch, got shape {patch.shape}")
    if patch.dtype != np.uint8:
        raise InvalidInput(f"expected uint8 pixels, got {patch.dtype}")
    n = patch.shape[0]
    zoomed = cv2.resize(patch, (2 * n, 2 * n), interpolation=cv2.INTER_LANCZOS4)
    return [
        np.ascontiguousarray(zoomed[r * n : (r + 1) * n, c * n : (c + 1) * n])
        for r in (0, 1)
        for c in (0, 1)
    ]
