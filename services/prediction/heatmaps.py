"""Heatmaps of a slide's patch probabilities over its thumbnail."""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd

from services.slide.reader import SlideReader


def slide_thumbnail(reader: SlideReader, downsample: float, shape: tuple[int, ...]) -> np.ndarray:
    """The slide's thumbnail at the masks' size (the level the masks came from)."""
    level = reader.best_level_for_downsample(downsample)
    image = reader.read_level(level)
    height, width = shape[:2]
    if image.shape[:2] != (height, width):
        image = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
    return image


def render_heatmap(
    thumbnail: np.ndarray,
    table: pd.DataFrame,
    biomarker: str,
    downsample: float,
    tissue: np.ndarray,
    alpha: float = 0.55,
) -> np.ndarray:
    """Patch probabilities as colours (turbo: blue 0 -> red 1) over the thumbnail.

    Args:
        thumbnail: uint8 RGB at the mask's size.
        table: The patch table (level-0 footprints and a column per biomarker).
        biomarker: The column to draw.
        downsample: Level-0 px per thumbnail px.
        tissue: The tissue mask (tissue outside scored patches is dimmed less than
            glass).
        alpha: Opacity of the colours over scored patches.

    Returns:
        uint8 RGB, the thumbnail's size.
    """
    height, width = thumbnail.shape[:2]
    values = np.zeros((height, width), np.float64)
    counts = np.zeros((height, width), np.float64)
    for x, y, w, h, p in zip(
        table["x"], table["y"], table["width"], table["height"], table[biomarker], strict=True
    ):
        x0, y0 = int(x / downsample), int(y / downsample)
        x1 = max(x0 + 1, round((x + w) / downsample))
        y1 = max(y0 + 1, round((y + h) / downsample))
        values[y0:y1, x0:x1] += p
        counts[y0:y1, x0:x1] += 1
    scored = counts > 0
    probability = np.divide(values, counts, out=np.zeros_like(values), where=scored)
    colours = cv2.applyColorMap(
        np.clip(probability * 255, 0, 255).astype(np.uint8), cv2.COLORMAP_TURBO
    )
    colours = cv2.cvtColor(colours, cv2.COLOR_BGR2RGB).astype(np.float64)
    base = thumbnail.astype(np.float64)
    grey = base.mean(axis=2, keepdims=True).repeat(3, axis=2)
    out = np.where(tissue[..., None], 0.5 * base + 0.5 * grey, grey * 0.6 + 102)
    out = np.where(scored[..., None], (1 - alpha) * base + alpha * colours, out)
    return np.clip(out, 0, 255).astype(np.uint8)
