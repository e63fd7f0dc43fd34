"""Reading and writing whole small images (patches, references) for the CLI and RPCs.

Images go through the slide reader's plain-image path, so the same pixel limits,
format checks and one-line errors apply; a slide file works too, read at its lowest
level that fits the limit.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from services.common.errors import InvalidInput
from services.slide.reader import open_slide

#: Largest image read whole, pixels (a 512 px patch is 0.26 Mpx).
MAX_WHOLE_IMAGE_PX = 64_000_000


def read_image(path: str | os.PathLike[str], *, max_px: int = MAX_WHOLE_IMAGE_PX) -> np.ndarray:
    """The whole image at ``path`` as ``uint8`` RGB.

    Raises:
        NotFound: No such file.
        InvalidInput: Not an image, or larger than ``max_px``.
    """
    with open_slide(path, mpp=1.0) as slide:
        for level in range(slide.level_count):
            width, height = slide.level_dimensions[level]
            if width * height <= max_px:
                return slide.read_region(0, 0, level, width, height)
        width, height = slide.dimensions
        name = Path(path).name
        raise InvalidInput(f"{name} is {width}x{height} px, over the {max_px} px whole-image limit")


def write_png(path: str | os.PathLike[str], rgb: np.ndarray) -> None:
    """Write ``rgb`` as PNG atomically (a hidden temp file beside it, then a rename)."""
    target = Path(path)
    if target.suffix.lower() != ".png":
        raise InvalidInput(f"the output must be a .png file, got {target.name!r}")
    if not target.parent.is_dir():
        raise InvalidInput(f"the output folder {str(target.parent)!r} does not exist")
    ok, data = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise InvalidInput(f"cannot encode an image of shape {rgb.shape} as PNG")
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        tmp.write_bytes(data.tobytes())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
