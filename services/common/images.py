"""Decoding one encoded picture (PNG, JPEG, TIFF) to 8-bit RGB, with the checks a
server needs before it spends memory on bytes from a client.

One rule for every service and command that takes a picture: colour only (RGB,
RGBA, palette; the alpha channel is dropped), greyscale and 16-bit images are refused
(an H&E patch is colour, and a grey one has lost its stains), and the size is read
from the header before any pixel is decoded, so a small file claiming a huge image
costs nothing.
"""

from __future__ import annotations

import io
import warnings

import cv2
import numpy as np

from services.common.errors import InvalidInput

#: Longest side decoded, px (a 40x patch is 512; 4096 covers big crops).
MAX_SIDE_PX = 4096
#: Image modes accepted as colour (palette images are expanded to RGB).
_COLOUR_MODES = {"RGB": "RGB", "RGBA": "RGB", "RGBX": "RGB", "P": "RGB", "PA": "RGB"}
_FORMATS = {"PNG", "JPEG", "TIFF", "MPO"}


def decode_rgb(data: bytes, what: str = "image", max_side_px: int = MAX_SIDE_PX) -> np.ndarray:
    """Decode a PNG, JPEG or TIFF into uint8 RGB after checking its header.

    The size is read from the header before any pixel is decoded, so a small file
    claiming a huge image costs nothing.

    Args:
        data: The encoded file content.
        what: How errors name the image (e.g. ``patch 'a.png'``).

    Raises:
        InvalidInput: Empty, not an image, not PNG/JPEG/TIFF, not colour, not 8-bit,
            or over ``max_side_px`` a side.
    """
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise InvalidInput(f"{what} is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        # Pillow refuses headers declaring ~180 million pixels or more: far over our side.
        raise InvalidInput(
            f"{what} declares an image over {max_side_px} px a side: send it in patches"
        ) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise InvalidInput(f"{what} is not a PNG, JPEG or TIFF image") from exc
    with image:
        if image.format not in _FORMATS:
            raise InvalidInput(f"{what} is {image.format}, not PNG, JPEG or TIFF")
        width, height = image.size
        if max(width, height) > max_side_px:
            raise InvalidInput(
                f"{what} is {width}x{height} px, over {max_side_px} px a side: send it in patches"
            )
        if min(width, height) < 1:
            raise InvalidInput(f"{what} has no pixels")
        if image.mode not in _COLOUR_MODES:
            raise InvalidInput(
                f"{what} has mode {image.mode!r}: need an 8-bit RGB H&E image "
                "(greyscale, 16-bit and CMYK images are refused)"
            )
        # OpenCV decodes PNG and JPEG about twice as fast as Pillow; Pillow is the
        # fallback for what OpenCV does not read.
        bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        if bgr is not None and bgr.shape[:2] == (height, width):
            return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                rgb = np.asarray(image.convert(_COLOUR_MODES[image.mode]))
        except Exception as exc:  # Pillow raises many types for corrupt content
            raise InvalidInput(f"{what} cannot be decoded ({type(exc).__name__})") from exc
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise InvalidInput(f"{what} did not decode to 8-bit RGB")
    return np.ascontiguousarray(rgb)
