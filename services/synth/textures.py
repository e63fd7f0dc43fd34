"""Periodic texture atlases a synthetic slide is shaded with.

Textures are made once per slide and sampled by absolute level-0 coordinates modulo
their size, so neighbouring tiles continue each other seamlessly and rendering a tile
costs a slice instead of fresh noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

#: Side of the fine textures, px (a power of two keeps the modulo cheap).
TEXTURE_PX = 1024
#: Side of the fat texture, px: adipocytes are ~100 µm across, larger than the others.
FAT_TEXTURE_PX = 2048
#: Directions of the stroma fibre textures, radians.
FIBER_ANGLES = (0.0, np.pi / 4, np.pi / 2, 3 * np.pi / 4)


def _wrap_gaussian(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of a periodic image (OpenCV's blur has no wrap-around border)."""
    pad = int(np.ceil(4 * sigma)) + 1
    padded = np.pad(image, pad, mode="wrap")
    return cv2.GaussianBlur(padded, (0, 0), sigmaX=sigma)[pad:-pad, pad:-pad]


def _wrap_filter(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Correlation of a periodic image with ``kernel``."""
    pad = max(kernel.shape) // 2 + 1
    padded = np.pad(image, pad, mode="wrap")
    return cv2.filter2D(padded, -1, kernel)[pad:-pad, pad:-pad]


def _periodic_blur(noise: np.ndarray, sigma: float) -> np.ndarray:
    return _standardize(_wrap_gaussian(noise, sigma))


def _standardize(values: np.ndarray) -> np.ndarray:
    std = float(values.std()) or 1.0
    return ((values - float(values.mean())) / std).astype(np.float32)


def _fibers(rng: np.random.Generator, size: int, angle: float, length_px: int) -> np.ndarray:
    """Wavy collagen-like fibres along ``angle``: noise smeared along a line."""
    noise = rng.standard_normal((size, size)).astype(np.float32)
    kernel = np.zeros((length_px, length_px), dtype=np.float32)
    centre = length_px // 2
    dx, dy = np.cos(angle), np.sin(angle)
    for t in np.linspace(-centre, centre, 2 * length_px):
        kernel[round(centre + t * dy) % length_px, round(centre + t * dx) % length_px] = 1
    kernel /= kernel.sum()
    smeared = _wrap_gaussian(_wrap_filter(noise, kernel), 1.2)
    # Sharpen the ridges so fibres read as strands, not fog.
    return _standardize(np.tanh(1.5 * _standardize(smeared)))


def _fat(rng: np.random.Generator, size: int, cell_px: float) -> np.ndarray:
    """Adipocyte membranes: the edges of a periodic Voronoi tessellation, 0-1."""
    count = max(4, int((size / cell_px) ** 2))
    seeds = rng.uniform(0, size, size=(count, 2))
    # Tile the seeds 3x3 so the tessellation wraps around the texture's edges; only a
    # margin of two cells around the texture is needed to get its cells right.
    margin = int(2 * cell_px)
    offsets = np.array([(dx, dy) for dx in (-size, 0, size) for dy in (-size, 0, size)])
    tiled = (seeds[None, :, :] + offsets[:, None, :]).reshape(-1, 2) + margin
    side = size + 2 * margin
    inside = np.all((tiled >= 0) & (tiled < side), axis=1)
    points = tiled[inside].astype(int)
    canvas = np.ones((side, side), dtype=np.uint8)
    canvas[points[:, 1], points[:, 0]] = 0
    _, labels = cv2.distanceTransformWithLabels(
        canvas, cv2.DIST_L2, 5, labelType=cv2.DIST_LABEL_CCOMP
    )
    labels = labels[margin : margin + size, margin : margin + size]
    edges = np.zeros(labels.shape, dtype=np.float32)
    edges[:, :-1] += labels[:, :-1] != labels[:, 1:]
    edges[:-1, :] += labels[:-1, :] != labels[1:, :]
    edges = _wrap_gaussian(np.clip(edges, 0, 1), 1.5)
    return np.clip(edges / max(float(edges.max()), 1e-6), 0, 1).astype(np.float32)


@dataclass
class TextureAtlas:
    """The textures of one slide, each padded by a wrap-around margin for slicing.

    Attributes:
        grain: Fine chromatin/cytoplasm grain (σ ≈ 1 px), unit variance.
        mottle: Medium mottling (σ ≈ 6 px), unit variance.
        coarse: Coarse variation (σ ≈ 24 px) that roughens region boundaries.
        fibers: One fibre texture per direction of ``FIBER_ANGLES``.
        fat: Adipocyte membranes, 0-1.
        sensor: Camera noise per pixel and channel, in 8-bit grey levels (-2 to 2).
        margin_px: Padding of each texture (the largest tile that can be sliced).
    """

    grain: np.ndarray
    mottle: np.ndarray
    coarse: np.ndarray
    fibers: list[np.ndarray]
    fat: np.ndarray
    sensor: np.ndarray
    margin_px: int

    @classmethod
    def create(cls, rng: np.random.Generator, mpp: float, margin_px: int) -> TextureAtlas:
        """Make the atlas of a slide scanned at ``mpp`` µm/px."""
        size = TEXTURE_PX

        def pad(texture: np.ndarray) -> np.ndarray:
            return np.pad(texture, ((0, margin_px), (0, margin_px)), mode="wrap")

        base = rng.standard_normal((size, size)).astype(np.float32)
        fiber_len = max(9, round(12.0 / mpp) | 1)  # strands ~12 µm long per segment
        return cls(
            grain=pad(_periodic_blur(base, 1.0)),
            mottle=pad(_periodic_blur(rng.standard_normal((size, size)).astype(np.float32), 6)),
            coarse=pad(_periodic_blur(rng.standard_normal((size, size)).astype(np.float32), 24)),
            fibers=[pad(_fibers(rng, size, angle, fiber_len)) for angle in FIBER_ANGLES],
            fat=np.pad(
                _fat(rng, FAT_TEXTURE_PX, cell_px=90.0 / mpp),
                ((0, margin_px), (0, margin_px)),
                mode="wrap",
            ),
            sensor=np.pad(
                rng.integers(-2, 3, size=(size, size, 3)).astype(np.float32),
                ((0, margin_px), (0, margin_px), (0, 0)),
                mode="wrap",
            ),
            margin_px=margin_px,
        )

    def window(
        self, texture: np.ndarray, x_px: int, y_px: int, width: int, height: int
    ) -> np.ndarray:
        """The texture over the level-0 box (x, y, width, height), wrapping around.

        A box within ``margin_px`` is a view of the padded texture; a larger one (a
        render of more than a tile) is gathered with wrapped indexes, same values.
        """
        size = texture.shape[0] - self.margin_px
        ox, oy = x_px % size, y_px % size
        if width <= self.margin_px and height <= self.margin_px:
            return texture[oy : oy + height, ox : ox + width]
        rows = (oy + np.arange(height)) % size
        cols = (ox + np.arange(width)) % size
        return texture[np.ix_(rows, cols)]
