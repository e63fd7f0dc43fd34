"""Per-nucleus features and the 75 features of a patch.

Per nucleus (15, physical units from the patch's mpp):

- morphology (8): minor and major axis of the ellipse with the nucleus's second
  moments (µm), their ratio, area (µm²), perimeter (µm), circularity
  4π·area/perimeter², eccentricity of the ellipse, solidity (area / convex hull);
- intensity (3): mean red, green and blue of the nucleus's pixels (0-255);
- spatial (4): from the Delaunay triangulation of the patch's nucleus centroids, the
  shortest, longest and mean edge to a neighbour (µm) and the number of neighbours.

Morphology follows ``skimage.measure.regionprops`` definitions (axes from the
inertia tensor, the 4-neighbourhood perimeter estimate) but is computed for all
nuclei at once from label-image moments.

Per patch, each feature's values are binned into a 10-bin histogram over a fixed
range (:data:`FEATURES`; values outside fall in the end bins), normalized to sum 1,
and summarised by its mean, standard deviation, entropy (bits), skewness and excess
kurtosis over the bin centres: 15 x 5 = 75 values named ``<group>.<feature>.<stat>``
(e.g. ``morph.area.mean``). Fixed ranges make patches comparable. A patch with fewer
than 3 nuclei has no triangulation: its spatial values are 0, every value is
defined (never NaN), and ``few_nuclei`` is set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import pandas as pd

from services.common.errors import InvalidInput


@dataclass(frozen=True)
class FeatureSpec:
    """One per-nucleus feature and its histogram range.

    Attributes:
        group: ``morph``, ``intensity`` or ``spatial``.
        name: Short name used in feature names (``area``).
        column: Column of the per-nucleus table (``area_um2``).
        low: Lower edge of the histogram, in the column's unit.
        high: Upper edge of the histogram, in the column's unit.
    """

    group: str
    name: str
    column: str
    low: float
    high: float


#: The 15 per-nucleus features, in order, with their fixed histogram ranges.
FEATURES: tuple[FeatureSpec, ...] = (
    FeatureSpec("morph", "minor_axis", "minor_axis_um", 0.0, 16.0),
    FeatureSpec("morph", "major_axis", "major_axis_um", 0.0, 28.0),
    FeatureSpec("morph", "axis_ratio", "axis_ratio", 1.0, 5.0),
    FeatureSpec("morph", "area", "area_um2", 0.0, 250.0),
    FeatureSpec("morph", "perimeter", "perimeter_um", 0.0, 80.0),
    FeatureSpec("morph", "circularity", "circularity", 0.0, 1.0),
    FeatureSpec("morph", "eccentricity", "eccentricity", 0.0, 1.0),
    FeatureSpec("morph", "solidity", "solidity", 0.5, 1.0),
    FeatureSpec("intensity", "red", "mean_red", 0.0, 255.0),
    FeatureSpec("intensity", "green", "mean_green", 0.0, 255.0),
    FeatureSpec("intensity", "blue", "mean_blue", 0.0, 255.0),
    FeatureSpec("spatial", "min_distance", "min_neighbor_distance_um", 0.0, 40.0),
    FeatureSpec("spatial", "max_distance", "max_neighbor_distance_um", 0.0, 80.0),
    FeatureSpec("spatial", "mean_distance", "mean_neighbor_distance_um", 0.0, 50.0),
    FeatureSpec("spatial", "degree", "degree", 0.0, 15.0),
)
STATISTICS = ("mean", "std", "entropy", "skewness", "kurtosis")
BINS = 10
#: The 75 patch feature names, in order.
FEATURE_NAMES: tuple[str, ...] = tuple(
    f"{spec.group}.{spec.name}.{stat}" for spec in FEATURES for stat in STATISTICS
)
#: Columns of the per-nucleus table, in order.
NUCLEUS_COLUMNS = (
    "label",
    "centroid_x_px",
    "centroid_y_px",
    "orientation_deg",
    *(spec.column for spec in FEATURES),
)
#: Fewer nuclei than this and a patch has no triangulation.
MIN_NUCLEI = 3


@dataclass(frozen=True)
class PatchFeatures:
    """The 75 features of one patch.

    Attributes:
        values: float64 (75,), in :data:`FEATURE_NAMES` order; never NaN.
        nucleus_count: Nuclei in the patch.
        few_nuclei: Fewer than 3 nuclei: spatial features are 0 and meaningless.
    """

    values: np.ndarray
    nucleus_count: int
    few_nuclei: bool

    def as_dict(self) -> dict[str, float]:
        return dict(zip(FEATURE_NAMES, (float(v) for v in self.values), strict=True))


def _check(labels: np.ndarray, rgb: np.ndarray, mpp: float) -> None:
    if labels.ndim != 2 or rgb.shape[:2] != labels.shape or rgb.ndim != 3:
        raise InvalidInput(
            f"labels {labels.shape} and image {rgb.shape} must be (H, W) and (H, W, 3)"
        )
    if not np.issubdtype(labels.dtype, np.integer) or (labels.size and labels.min() < 0):
        raise InvalidInput("labels must be non-negative integers")
    if not np.isfinite(mpp) or mpp <= 0:
        raise InvalidInput(f"mpp must be a positive number of µm/px, got {mpp}")


def _perimeters(labels: np.ndarray, count: int) -> np.ndarray:
    """Per label, regionprops' 4-neighbourhood perimeter estimate, all at once.

    A border pixel has a 4-neighbour outside its nucleus. Each border pixel is
    weighted by how many border pixels of the same nucleus touch it along the axes
    and diagonally (straight runs count 1, diagonal steps sqrt 2, corners between).
    """
    padded = np.pad(labels.astype(np.int32), 1)
    height, width = labels.shape
    centre = padded[1:-1, 1:-1]
    interior = centre > 0
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        interior &= padded[1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width] == centre
    ys, xs = np.nonzero((centre > 0) & ~interior)
    if len(ys) == 0:
        return np.zeros(count)
    owner = centre[ys, xs]
    border = np.zeros_like(padded)
    border[ys + 1, xs + 1] = owner
    code = np.ones(len(ys), np.int64)
    for (dy, dx), weight in (
        ((-1, 0), 2),
        ((1, 0), 2),
        ((0, -1), 2),
        ((0, 1), 2),
        ((-1, -1), 10),
        ((-1, 1), 10),
        ((1, -1), 10),
        ((1, 1), 10),
    ):
        code += weight * (border[ys + 1 + dy, xs + 1 + dx] == owner)
    weights = np.zeros(50)
    weights[[5, 7, 15, 17, 25, 27]] = 1.0
    weights[[21, 33]] = np.sqrt(2.0)
    weights[[13, 23]] = (1.0 + np.sqrt(2.0)) / 2.0
    return np.bincount(owner, weights=weights[np.minimum(code, 49)], minlength=count)


def _convex_areas(labels: np.ndarray, count: int) -> np.ndarray:
    """Per label, the pixels whose centres lie in or on the convex hull of the
    nucleus's pixels widened by half a pixel (regionprops' convex area), px."""
    from scipy import ndimage as ndi

    areas = np.zeros(count)
    # The pixels' edge midpoints, as regionprops takes them.
    corners = np.array([[-0.5, 0.0], [0.5, 0.0], [0.0, -0.5], [0.0, 0.5]], np.float32)
    for label, box in enumerate(ndi.find_objects(labels), start=1):
        if box is None:
            continue
        window = (labels[box] == label).astype(np.uint8)
        contours, _ = cv2.findContours(window, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        points = np.concatenate([c.reshape(-1, 2) for c in contours]).astype(np.float32)
        points = (points[:, None, :] + corners[None]).reshape(-1, 2)
        hull = cv2.convexHull(points).reshape(-1, 2).astype(np.float64)  # (x, y)
        # A centre is in or on a convex polygon when it lies on the same side of
        # (or on) every edge; the coordinates are multiples of 0.5, so exact.
        start, end = hull, np.roll(hull, -1, axis=0)
        along_x = (end[:, 0] - start[:, 0])[:, None, None]
        along_y = (end[:, 1] - start[:, 1])[:, None, None]
        ys = np.arange(window.shape[0], dtype=np.float64)[None, :, None] - start[:, 1, None, None]
        xs = np.arange(window.shape[1], dtype=np.float64)[None, None, :] - start[:, 0, None, None]
        side = along_x * ys - along_y * xs
        inside = (side >= 0).all(axis=0) | (side <= 0).all(axis=0)
        areas[label] = max(int(inside.sum()), int(window.sum()))
    return areas


def _delaunay_neighbours(points: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Each point's neighbours in the Delaunay triangulation, as (indptr, indices):
    point i's are ``indices[indptr[i]:indptr[i + 1]]``; None when the points are too
    few or all on a line."""
    if len(points) < MIN_NUCLEI:
        return None
    from scipy.spatial import Delaunay, QhullError

    try:
        triangulation = Delaunay(points)
    except (QhullError, ValueError):
        return None
    indptr, indices = triangulation.vertex_neighbor_vertices
    return indptr, indices


def nucleus_table(labels: np.ndarray, rgb: np.ndarray, mpp: float) -> pd.DataFrame:
    """The 15 features of every nucleus (one row per label present, label order).

    Args:
        labels: int (H, W) instance labels, 0 background.
        rgb: uint8 (H, W, 3) the patch the labels segment.
        mpp: Resolution, µm/px.

    Returns:
        A table with :data:`NUCLEUS_COLUMNS`: centroids in px of the patch,
        lengths in µm, areas in µm², orientation in degrees.
    """
    _check(labels, rgb, mpp)
    labels = labels.astype(np.int64)
    count = int(labels.max()) + 1 if labels.size else 1
    area_px = np.bincount(labels.ravel(), minlength=count).astype(np.float64)
    present = np.flatnonzero(area_px)
    present = present[present > 0]
    if len(present) == 0:
        return pd.DataFrame({column: pd.Series(dtype=float) for column in NUCLEUS_COLUMNS})
    # Only labelled pixels matter: work on their coordinates (a fraction of the patch).
    ys, xs = np.nonzero(labels)
    owner = labels[ys, xs]
    safe = np.maximum(area_px, 1.0)

    def mean_of(values: Any) -> np.ndarray:
        return np.bincount(owner, weights=values, minlength=count) / safe

    cy, cx = mean_of(ys.astype(np.float64)), mean_of(xs.astype(np.float64))
    dy = ys - cy[owner]
    dx = xs - cx[owner]
    mu20 = mean_of(dy * dy)  # row variance
    mu02 = mean_of(dx * dx)  # column variance
    mu11 = mean_of(dy * dx)
    half_trace = (mu20 + mu02) / 2
    root = np.sqrt(((mu20 - mu02) / 2) ** 2 + mu11**2)
    l1, l2 = half_trace + root, np.maximum(half_trace - root, 0.0)
    major_px, minor_px = 4 * np.sqrt(l1), 4 * np.sqrt(l2)
    eccentricity = np.sqrt(np.clip(1 - l2 / np.maximum(l1, 1e-12), 0.0, 1.0))
    # Orientation of the major axis, counter-clockwise from the x axis (image y down).
    orientation = np.degrees(0.5 * np.arctan2(-2 * mu11, mu02 - mu20))
    perimeter_px = _perimeters(labels, count)
    convex_px = _convex_areas(labels, count)
    pixels = rgb[ys, xs].astype(np.float64)
    colour = [mean_of(pixels[:, channel]) for channel in range(3)]

    p = present
    table = pd.DataFrame(
        {
            "label": p,
            "centroid_x_px": cx[p],
            "centroid_y_px": cy[p],
            "orientation_deg": orientation[p],
            "minor_axis_um": minor_px[p] * mpp,
            "major_axis_um": major_px[p] * mpp,
            "axis_ratio": major_px[p] / np.maximum(minor_px[p], 1e-9),
            "area_um2": area_px[p] * mpp * mpp,
            "perimeter_um": perimeter_px[p] * mpp,
            "circularity": np.clip(
                4 * np.pi * area_px[p] / np.maximum(perimeter_px[p], 1e-9) ** 2, 0.0, 1.0
            ),
            "eccentricity": eccentricity[p],
            "solidity": np.clip(area_px[p] / np.maximum(convex_px[p], 1.0), 0.0, 1.0),
            "mean_red": colour[0][p],
            "mean_green": colour[1][p],
            "mean_blue": colour[2][p],
        }
    )
    # A one-pixel nucleus has a zero minor axis: keep the ratio finite and defined.
    table.loc[table["minor_axis_um"] <= 0, "axis_ratio"] = 1.0
    _add_spatial(table, mpp)
    return table[list(NUCLEUS_COLUMNS)]


def _add_spatial(table: pd.DataFrame, mpp: float) -> None:
    points = table[["centroid_x_px", "centroid_y_px"]].to_numpy() * mpp
    neighbours = _delaunay_neighbours(points)
    n = len(table)
    shortest, longest, mean, degree = (np.zeros(n) for _ in range(4))
    if neighbours is not None:
        indptr, indices = neighbours
        counts = np.diff(indptr)
        has = counts > 0
        source = np.repeat(np.arange(n), counts)
        distances = np.hypot(*(points[indices] - points[source]).T)
        starts = indptr[:-1][has]
        shortest[has] = np.minimum.reduceat(distances, starts)
        longest[has] = np.maximum.reduceat(distances, starts)
        mean[has] = np.add.reduceat(distances, starts) / counts[has]
        degree[:] = counts
    table["min_neighbor_distance_um"] = shortest
    table["max_neighbor_distance_um"] = longest
    table["mean_neighbor_distance_um"] = mean
    table["degree"] = degree


def histogram_statistics(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Mean, std, entropy (bits), skewness and excess kurtosis of the L1-normalized
    10-bin histogram of ``values`` over [low, high] (outside values in the end bins);
    all 0 for no values."""
    values = np.asarray(values, np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return np.zeros(len(STATISTICS))
    width = (high - low) / BINS
    index = np.clip(((values - low) / width).astype(np.int64), 0, BINS - 1)
    p = np.bincount(index, minlength=BINS) / values.size
    centres = low + width * (np.arange(BINS) + 0.5)
    mean = float(p @ centres)
    deviation = centres - mean
    variance = float(p @ deviation**2)
    std = np.sqrt(variance)
    nonzero = p[p > 0]
    entropy = float(-(nonzero * np.log2(nonzero)).sum())
    if std > 1e-12:
        skewness = float(p @ deviation**3) / std**3
        kurtosis = float(p @ deviation**4) / variance**2 - 3.0
    else:
        skewness = kurtosis = 0.0
    return np.array([mean, std, entropy, skewness, kurtosis])


def patch_features(table: pd.DataFrame) -> PatchFeatures:
    """The 75 features of a patch from its per-nucleus table."""
    count = len(table)
    values = np.concatenate(
        [
            histogram_statistics(
                table[spec.column].to_numpy() if count else np.zeros(0), spec.low, spec.high
            )
            for spec in FEATURES
        ]
    )
    few = count < MIN_NUCLEI
    if few or not (table["degree"].to_numpy() > 0).any():
        # No triangulation (too few nuclei, or all on a line): spatial values 0.
        spatial = [i for i, name in enumerate(FEATURE_NAMES) if name.startswith("spatial.")]
        values[spatial] = 0.0
    return PatchFeatures(np.nan_to_num(values), count, few)
