"""Nuclei segmentation by hierarchical multilevel thresholding (Phoulady et al. 2016).

The hematoxylin channel of the patch (colour deconvolution with Ruifrok and
Johnston's H&E vectors) is thresholded at a ladder of levels. Regions at a low level
are large (nuclei with their surroundings, or several nuclei together); as the level
rises they shrink and split. The levels form a tree of nested regions, and each
nucleus is taken at the lowest level — its widest extent — at which it is still one
nucleus-like region: size within limits (µm², scaled by the patch's mpp) and solid
enough (area / convex hull area). Touching nuclei that no level separates are then
split with a distance-transform watershed.

Packed clusters of vesicular nuclei (chromatin along the membrane, pale centres) are
one region at every level: the bright rims of neighbours touch, so no threshold
separates them and their union has no waist for a shape split. What separates them is
the rim itself, a ridge of hematoxylin between two pale basins. Foreground that no
level claimed is therefore flooded over the hematoxylin image (a watershed on the
stain, not on its inverse) from the bottoms of its deep basins (h-minima), and the
nucleus-sized basins are kept.

Everything works on whole label images per level (OpenCV connected components and
contours, NumPy gathers); there is no Python loop over pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage as ndi

from services.common.errors import InvalidInput

#: Ruifrok & Johnston's optical-density vectors of hematoxylin, eosin and DAB (rows).
_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_RGB_FROM_HED = _RGB_FROM_HED / np.linalg.norm(_RGB_FROM_HED, axis=1, keepdims=True)
#: Column of the unmixing matrix that gives the hematoxylin concentration.
_H_FROM_OD = np.linalg.inv(_RGB_FROM_HED)[:, 0].astype(np.float32)
_H_SHARE = [
    (-np.log((np.arange(256, dtype=np.float32) + 1.0) / 256.0) * weight).astype(np.float32)
    for weight in _H_FROM_OD
]
#: Hematoxylin optical density (natural log) mapped to grey level 255; darker
#: nuclei saturate, which only merges the top levels of the ladder.
H_OD_FULL_SCALE = 3.0
#: The full scale adapts to the image between these hematoxylin ODs: its 99.5th
#: percentile maps near the top, so a pale counterstain (IHC, faded H&E) uses the
#: whole ladder, while a nuclei-free patch is not stretched beyond 1 OD.
H_OD_SCALE_RANGE = (1.0, 3.0)
H_SCALE_PERCENTILE = 99.5
#: Largest clump of touching nuclei split by shape, in nuclei of the largest size.
CLUMP_MAX_NUCLEI = 10
FILL_ONLY_SMALL_HOLES = True
#: Least solidity of a clump worth splitting (a chain of blobs, not a smear).
CLUMP_MIN_SOLIDITY = 0.3
#: Radius of the opening that smooths nucleus outlines, µm.
OPENING_UM = 1.0
#: Largest image side accepted, px (a 40x patch is 512; 4096 covers big crops).
MAX_SIDE_PX = 4096
#: Segmentation methods by name (see :mod:`services.nuclei.methods`).
METHODS = ("unet", "phoulady", "otsu")
#: The most accurate on real tissue.
DEFAULT_METHOD = "unet"


@dataclass(frozen=True)
class SegmentationParams:
    """Parameters of the nuclei segmentation.

    Attributes:
        min_area_um2: Smallest nucleus, µm² (a small lymphocyte is ~20 µm²).
        max_area_um2: Largest nucleus, µm² (large pleomorphic tumour nuclei reach
            ~250 µm²).
        min_solidity: Least area / convex-hull area of a nucleus (0-1).
        threshold_step: Step between levels, in 8-bit grey levels of the
            hematoxylin channel (255 = H optical density 3.0).
        min_level: Lowest level tried, grey levels; below it is unstained tissue.
        min_contrast: Least rise of the hematoxylin level from a region's outline to
            its darkest part, grey levels: flat texture is not a nucleus.
        split_below_solidity: Nuclei less solid than this are tried for a
            watershed split into touching nuclei (0 disables the split).
        min_split_distance_um: Least distance between the centres of two touching
            nuclei to split, µm.
        notch_depth_um: Least depth of the two outline notches where overlapping
            nuclei meet, µm.
        basin_depth: Least depth of a basin of the hematoxylin (grey levels: from
            its bottom up to the rim where it spills into its neighbour) for the
            cluster split by stain basins (0 disables it).
        basin_min_solidity: Least solidity of a basin kept as a nucleus. Lower
            than ``min_solidity``: a basin's outline follows stain rims, and a
            nucleus partly under its neighbour is a crescent.
        method: Which method segments (:data:`METHODS`); the values above are the
            ``phoulady`` thresholding's and do not apply to the others.
    """

    min_area_um2: float = 12.0
    max_area_um2: float = 300.0
    min_solidity: float = 0.85
    threshold_step: int = 16
    min_level: int = 24
    min_contrast: int = 48
    split_below_solidity: float = 0.98
    min_split_distance_um: float = 3.0
    notch_depth_um: float = 0.5
    basin_depth: int = 20
    basin_min_solidity: float = 0.5
    method: str = DEFAULT_METHOD

    def __post_init__(self) -> None:
        check_method(self.method)
        if not 0 < self.min_area_um2 < self.max_area_um2:
            raise InvalidInput("need 0 < min_area_um2 < max_area_um2")
        if not 0 < self.min_solidity <= 1:
            raise InvalidInput("min_solidity must be within (0, 1]")
        if not 1 <= self.threshold_step <= 255:
            raise InvalidInput("threshold_step must be within 1-255 grey levels")
        if not 0 <= self.min_level <= 254:
            raise InvalidInput("min_level must be within 0-254 grey levels")
        if not 0 <= self.split_below_solidity <= 1:
            raise InvalidInput("split_below_solidity must be within 0-1")
        if not 0 <= self.basin_depth <= 255:
            raise InvalidInput("basin_depth must be within 0-255 grey levels")
        if not 0 < self.basin_min_solidity <= 1:
            raise InvalidInput("basin_min_solidity must be within (0, 1]")


def check_method(name: str) -> str:
    """The method's name ('' means the default).

    Raises:
        InvalidInput: Not a known method.
    """
    name = name or DEFAULT_METHOD
    if name not in METHODS:
        raise InvalidInput(f"unknown nuclei method {name!r}: choose one of {', '.join(METHODS)}")
    return name


def check_patch(rgb: np.ndarray, mpp: float) -> np.ndarray:
    """Validate an RGB patch and its resolution; returns it as contiguous uint8.

    Raises:
        InvalidInput: Not an RGB uint8 image, empty, too large, or a bad mpp.
    """
    if not isinstance(rgb, np.ndarray) or rgb.ndim != 3 or rgb.shape[2] != 3:
        shape = getattr(rgb, "shape", None)
        raise InvalidInput(f"need an RGB image (height, width, 3); got shape {shape}")
    if rgb.dtype != np.uint8:
        raise InvalidInput(f"need 8-bit RGB; got {rgb.dtype}")
    if min(rgb.shape[:2]) < 8:
        raise InvalidInput(f"image of {rgb.shape[1]}x{rgb.shape[0]} px is too small (< 8 px)")
    if max(rgb.shape[:2]) > MAX_SIDE_PX:
        raise InvalidInput(f"image side over {MAX_SIDE_PX} px: segment it in patches")
    if not np.isfinite(mpp) or not 0.05 <= mpp <= 2.0:
        raise InvalidInput(
            f"mpp {mpp} µm/px is outside 0.05-2.0: nuclei need about 0.25 (40x) to 0.5 (20x)"
        )
    return np.ascontiguousarray(rgb)


def hematoxylin_u8(rgb: np.ndarray, adaptive: bool = False) -> np.ndarray:
    """The hematoxylin concentration as 8-bit grey levels (0 = none).

    255 is an OD of 3 (``H_OD_FULL_SCALE``), or with ``adaptive`` the image's 99.5th
    percentile clipped to ``H_OD_SCALE_RANGE``.
    """
    # Per channel, a table from 8-bit value to its share of the hematoxylin OD.
    h = np.asarray(cv2.LUT(rgb[..., 0], _H_SHARE[0]), np.float32)
    h += np.asarray(cv2.LUT(rgb[..., 1], _H_SHARE[1]), np.float32)
    h += np.asarray(cv2.LUT(rgb[..., 2], _H_SHARE[2]), np.float32)
    full_scale = H_OD_FULL_SCALE
    if adaptive:
        top = float(
            np.percentile(
                h[:: max(1, h.shape[0] // 128), :: max(1, h.shape[1] // 128)], H_SCALE_PERCENTILE
            )
        )
        full_scale = float(np.clip(top, *H_OD_SCALE_RANGE))
    return np.clip(h * (255.0 / full_scale), 0, 255).astype(np.uint8)


@dataclass
class _Level:
    labels: np.ndarray  # int32 label image of this level
    count: int  # components + 1 (label 0 is background)
    valid: np.ndarray  # bool per label: nucleus-like
    clump: np.ndarray  # bool per label: may be several touching nuclei
    parent: np.ndarray  # int per label: the label one level down containing it
    contours: list  # outer contours of the regions
    contour_labels: np.ndarray  # int per contour: the label it bounds

    def box(self, label: int) -> tuple[int, int, int, int]:
        """x, y, width, height of a region: the union of its outer contours' boxes
        (a region filled over a hole can take in objects inside the hole)."""
        own = np.flatnonzero(self.contour_labels == label)
        rects = np.array([cv2.boundingRect(self.contours[c]) for c in own])
        x0, y0 = rects[:, 0].min(), rects[:, 1].min()
        x1 = (rects[:, 0] + rects[:, 2]).max()
        y1 = (rects[:, 1] + rects[:, 3]).max()
        return int(x0), int(y0), int(x1 - x0), int(y1 - y0)


def _level_regions(
    h: np.ndarray, level: int, max_hole_px: float
) -> tuple[int, np.ndarray, np.ndarray, list, np.ndarray]:
    """Regions of ``h >= level`` with their nucleus-sized holes filled (vesicular
    nuclei have pale centres; a gland's lumen inside a ring of nuclei stays open):
    (count, labels, areas per label, outer contours, label of each contour)."""
    binary = (h >= level).astype(np.uint8)
    found, hierarchy = cv2.findContours(binary, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    filled = np.zeros_like(binary)
    contours = []
    if found:
        outer = hierarchy[0, :, 3] < 0
        contours = [c for c, is_outer in zip(found, outer, strict=True) if is_outer]
        cv2.drawContours(filled, contours, -1, 1, thickness=cv2.FILLED)
        big_holes = [
            c
            for c, is_outer in zip(found, outer, strict=True)
            if not is_outer and cv2.contourArea(c) > max_hole_px
        ]
        if big_holes and FILL_ONLY_SMALL_HOLES:
            # Reopen large holes (their outline pixels belong to the region).
            cv2.drawContours(filled, big_holes, -1, 0, thickness=cv2.FILLED)
            filled |= binary
    # Labels without per-label statistics (OpenCV's statistics pass costs four
    # times the labelling): areas by counting, boxes from the contours on demand.
    count, labels = cv2.connectedComponents(filled, connectivity=8)
    areas = _label_areas(labels, count)
    contour_labels = np.zeros(0, np.int64)
    if contours:
        # Each outline starts on one of its region's pixels.
        starts = np.array([c[0, 0] for c in contours])
        contour_labels = labels[starts[:, 1], starts[:, 0]].astype(np.int64)
    return count, labels, areas, list(contours), contour_labels


def _solidity(
    contours: list, contour_labels: np.ndarray, areas: np.ndarray, candidates: np.ndarray
) -> np.ndarray:
    """Area / convex-hull area per label, for ``candidates`` only (else 0).

    The hull of the contour's pixel centres misses half a pixel all round; adding
    half its perimeter (and one pixel for the corners) compares like with like.
    """
    solidity = np.zeros(len(areas), np.float64)
    if not candidates.any():
        return solidity
    for contour, label in zip(contours, contour_labels, strict=True):
        if not candidates[label]:
            continue
        hull = cv2.convexHull(contour)
        hull_px = cv2.contourArea(hull) + cv2.arcLength(hull, True) / 2 + 1
        solidity[label] = min(1.0, areas[label] / hull_px)
    return solidity


def segment_nuclei(
    rgb: np.ndarray, mpp: float = 0.25, params: SegmentationParams | None = None
) -> np.ndarray:
    """Instance labels of the nuclei of an H&E patch.

    Args:
        rgb: uint8 (height, width, 3) RGB patch, stain-normalized.
        mpp: Resolution, µm/px (0.25 at 40x).
        params: Size and shape limits; defaults when None.

    Returns:
        int32 (height, width): 0 background, 1..n one label per nucleus, numbered
        in raster order of their first pixel.

    Raises:
        InvalidInput: Bad image or mpp.
    """
    params = params or SegmentationParams()
    rgb = check_patch(rgb, mpp)
    px_per_um2 = 1.0 / (mpp * mpp)
    min_px = params.min_area_um2 * px_per_um2
    max_px = params.max_area_um2 * px_per_um2
    h_raw = hematoxylin_u8(rgb, adaptive=True)
    h = cv2.GaussianBlur(h_raw, (0, 0), sigmaX=max(0.5, 0.25 / mpp))
    top = int(h.max())
    levels = list(range(params.min_level, top + 1, params.threshold_step))
    if not levels:
        return np.zeros(h.shape, np.int32)

    tree: list[_Level] = []
    previous: np.ndarray | None = None
    for level in levels:
        count, labels, areas, contours, contour_labels = _level_regions(h, level, max_px)
        in_range = (areas >= min_px) & (areas <= max_px)
        clump_size = (areas >= 2 * min_px) & (areas <= CLUMP_MAX_NUCLEI * max_px)
        in_range[0] = clump_size[0] = False
        solidity = _solidity(contours, contour_labels, areas, in_range | clump_size)
        valid = in_range & (solidity >= params.min_solidity)
        clump = clump_size & ~valid & (solidity >= CLUMP_MIN_SOLIDITY)
        parent = np.zeros(count, np.int64)
        if previous is not None and contours:
            # Any pixel of a region gives its container one level down (nesting):
            # each region's outline starts on one of its pixels.
            starts = np.array([c[0, 0] for c in contours])
            parent[contour_labels] = previous[starts[:, 1], starts[:, 0]]
        tree.append(_Level(labels, count, valid, clump, parent, contours, contour_labels))
        previous = labels

    # Bottom-up (high levels to low): a valid region replaces the single nucleus
    # below it; a region over two or more nuclei keeps them.
    chosen: list[np.ndarray] = [np.zeros(t.count, bool) for t in tree]
    clumps: dict[tuple[int, int], np.ndarray] = {}
    below_count = np.zeros(0, np.int64)
    below_peak = np.zeros(0, np.int64)
    for k in range(len(tree) - 1, -1, -1):
        t = tree[k]
        peak = np.full(t.count, levels[k], np.int64)
        if k + 1 < len(tree):
            child = tree[k + 1]
            nuclei_below = np.bincount(child.parent, weights=below_count, minlength=t.count).astype(
                np.int64
            )
            np.maximum.at(peak, child.parent, below_peak)
        else:
            nuclei_below = np.zeros(t.count, np.int64)
        contrasted = peak - levels[k] >= params.min_contrast
        chosen[k] = t.valid & contrasted & (nuclei_below <= 1)
        chosen[k][0] = False
        count_here = np.where(chosen[k], 1, nuclei_below).astype(np.int64)
        # A clump over at most one nucleus found higher up: split it by shape.
        for i in np.flatnonzero(t.clump & contrasted & (nuclei_below <= 1)):
            x, y, w, hh = t.box(int(i))
            region = t.labels[y : y + hh, x : x + w] == i
            window = h[y : y + hh, x : x + w]
            parts = None
            unfilled = region & (window >= levels[k])
            if region.sum() - unfilled.sum() >= min_px:
                # A hole the size of a nucleus was filled: a ring of nuclei round a
                # lumen splits only with the lumen left open.
                parts = _split_region(
                    unfilled, mpp, params, window, levels[k] + params.min_contrast
                )
            if parts is None:
                parts = _split_region(region, mpp, params, window, levels[k] + params.min_contrast)
            if parts is not None and parts.max() >= 2:
                clumps[(k, int(i))] = parts
                chosen[k][i] = True
                count_here[i] = int(parts.max())
        count_here[0] = 0
        below_count = count_here
        below_peak = peak

    # Top-down: keep chosen regions that no chosen region contains.
    out = np.zeros(h.shape, np.int32)
    blocked = np.zeros(tree[0].count, bool)
    next_label = 1
    for k, t in enumerate(tree):
        if k > 0:
            blocked = (blocked | chosen[k - 1])[t.parent]
            blocked[0] = False
        final = chosen[k] & ~blocked
        if final.any():
            ids = np.zeros(t.count, np.int32)
            ids[final] = np.arange(next_label, next_label + int(final.sum()), dtype=np.int32)
            next_label += int(final.sum())
            for i in np.flatnonzero(final):
                x, y, w, hh = t.box(int(i))
                window = out[y : y + hh, x : x + w]
                window[t.labels[y : y + hh, x : x + w] == i] = ids[i]
            for i in np.flatnonzero(final):
                parts = clumps.get((k, int(i)))
                if parts is None:
                    continue
                x, y, w, hh = t.box(int(i))
                window = out[y : y + hh, x : x + w]
                window[t.labels[y : y + hh, x : x + w] == i] = 0  # e.g. a lumen
                inside = parts > 0
                window[inside] = parts[inside] + next_label
                next_label += int(parts.max()) + 1
    out = _split_touching(out, mpp, params)
    out = _split_clusters(out, h_raw, mpp, params)
    return relabel_in_raster_order(_smooth_outlines(out, mpp))


def _split_clusters(
    labels: np.ndarray, h_raw: np.ndarray, mpp: float, params: SegmentationParams
) -> np.ndarray:
    """Add the nuclei of packed clusters that no threshold level separated.

    Foreground (Otsu level of the hematoxylin, holes filled) that no nucleus claimed
    is flooded over the stain image from the bottoms of its basins at least
    ``basin_depth`` deep (h-minima of the hematoxylin smoothed over 0.5 µm), so the
    basins meet on the rims between neighbours. Nucleus-sized basins that are not
    thin slivers are added; their outlines follow the rims, so a nucleus partly
    hidden under its neighbour keeps its crescent shape.
    """
    if params.basin_depth <= 0:
        return labels
    min_px = params.min_area_um2 / (mpp * mpp)
    otsu, _ = cv2.threshold(h_raw, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    fine = cv2.GaussianBlur(h_raw.astype(np.float32), (0, 0), sigmaX=0.5 / mpp)
    foreground = (fine >= max(params.min_level, otsu)).astype(np.uint8)
    claimed = cv2.dilate((labels > 0).astype(np.uint8), np.ones((3, 3), np.uint8))
    outlines, _ = cv2.findContours(foreground, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(foreground, outlines, -1, 1, thickness=cv2.FILLED)  # holes filled
    free = (foreground > 0) & (claimed == 0)
    _, regions, stats, _ = cv2.connectedComponentsWithStats(free.astype(np.uint8), connectivity=8)
    large = stats[:, cv2.CC_STAT_AREA] >= 2 * min_px
    large[0] = False
    if not large.any():
        return labels
    free = large[regions]
    # Work in the box of the free foreground (with a margin for the basins' rims).
    rows, cols = np.nonzero(free)
    margin = 4
    y0, x0 = max(0, int(rows.min()) - margin), max(0, int(cols.min()) - margin)
    y1 = min(free.shape[0], int(rows.max()) + 1 + margin)
    x1 = min(free.shape[1], int(cols.max()) + 1 + margin)
    free_box = free[y0:y1, x0:x1]
    fine_box = np.ascontiguousarray(fine[y0:y1, x0:x1])
    # A nucleus' basin spills within the largest nucleus' radius.
    reach_px = int(np.ceil(np.sqrt(params.max_area_um2 / np.pi) / mpp))
    bottoms = _basin_bottoms(fine_box, params.basin_depth, reach_px)
    # Pale, not empty: a vesicular nucleus' centre holds some chromatin; a gap
    # closed in by the rims of its neighbours holds none.
    bottoms &= fine_box >= params.min_level
    _, markers = cv2.connectedComponents((bottoms & free_box).astype(np.uint8), connectivity=8)
    if not markers.any():
        return labels
    from skimage.segmentation import watershed

    stain = h_raw[y0:y1, x0:x1]
    basins = watershed(stain, markers, mask=free_box).astype(np.int32)
    good = _nucleus_like_parts(basins, mpp, params, None, 0, min_solidity=params.basin_min_solidity)
    keep = good[basins]
    out = labels.copy()
    window = out[y0:y1, x0:x1]
    window[keep] = basins[keep] + int(labels.max())
    return out


def _basin_bottoms(image: np.ndarray, depth: float, reach_px: int) -> np.ndarray:
    """The bottoms of the basins of ``image`` at least ``depth`` deep (h-minima),
    judged within ``reach_px`` of each bottom.

    Reconstruction by erosion of ``image + depth`` over ``image`` fills every basin
    up to the level at which it spills over, but by at most ``depth``; where it rose
    by the full ``depth`` lies the bottom of a basin that deep. The filling spreads
    one pixel per erosion, so stopping after ``reach_px`` erosions keeps the basins
    whose rim lies within that distance: a nucleus' basin spills within its own
    radius, while a pale stretch wider than any nucleus would take hundreds.
    """
    kernel = np.ones((3, 3), np.uint8)
    filled = image + np.float32(depth)
    for _ in range(0, reach_px, 8):
        before = filled
        for _ in range(8):  # check for the fixed point every 8 erosions
            filled = np.maximum(cv2.erode(filled, kernel), image)
        if np.array_equal(before, filled):
            break
    return (filled - image) >= np.float32(depth) - 1e-3


def _pad1(image: np.ndarray) -> np.ndarray:
    """The image with a one-pixel border of zeros."""
    return cv2.copyMakeBorder(image, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)


def _mask_solidity(mask: np.ndarray) -> float:
    """Area / convex-hull area of a binary mask (hull widened by half a pixel)."""
    points = cv2.findNonZero(mask.astype(np.uint8))
    if points is None:
        return 0.0
    hull = cv2.convexHull(points)
    hull_px = cv2.contourArea(hull) + cv2.arcLength(hull, True) / 2 + 1
    return min(1.0, float(np.count_nonzero(mask)) / hull_px)


def _nucleus_like_parts(
    parts: np.ndarray,
    mpp: float,
    params: SegmentationParams,
    h: np.ndarray | None,
    min_peak: int,
    better_than: float = 0.0,
    all_or_none: bool = False,
    min_solidity: float | None = None,
) -> np.ndarray:
    """Per part (index 0 unused): nucleus-sized, solid (at least ``min_solidity``,
    by default the params', and more solid than ``better_than``) and, when ``h`` is
    given, dark enough somewhere (``min_peak``). With ``all_or_none`` the checks stop
    at the first part that fails."""
    count = int(parts.max())
    sizes = np.bincount(parts.ravel(), minlength=count + 1) * (mpp * mpp)
    good = (sizes >= params.min_area_um2) & (sizes <= params.max_area_um2)
    good[0] = False
    if all_or_none and not good[1:].all():
        return good
    if h is not None and count:
        peaks = ndi.maximum(h, parts, np.arange(1, count + 1))
        good[1:] &= np.asarray(peaks) >= min_peak
        if all_or_none and not good[1:].all():
            return good
    least = params.min_solidity if min_solidity is None else min_solidity
    threshold = max(least, better_than)
    for part in np.flatnonzero(good):
        good[part] = _mask_solidity(parts == part) >= threshold
        if all_or_none and not good[part]:
            break
    return good


def _parts_ok(
    parts: np.ndarray,
    mpp: float,
    params: SegmentationParams,
    h: np.ndarray | None,
    min_peak: int,
    better_than: float = 0.0,
) -> bool:
    """At least two parts, every one nucleus-like."""
    if parts.max() < 2:
        return False
    good = _nucleus_like_parts(parts, mpp, params, h, min_peak, better_than, all_or_none=True)
    return bool(good[1:].all())


def _distance_seeds(
    distance: np.ndarray, min_distance_px: float, prominence_px: float
) -> np.ndarray:
    """Markers of the distance transform's separate maxima.

    Local maxima at least ``min_distance_px`` apart (strongest first); two maxima
    belong to one seed unless the distance dips by ``prominence_px`` on the straight
    line between them (a waist between two nuclei).
    """
    markers = np.zeros(distance.shape, np.int32)
    local = (distance >= cv2.dilate(distance, np.ones((3, 3), np.uint8))) & (distance >= 1)
    ys, xs = np.nonzero(local)
    if len(ys) < 2:
        if len(ys):
            markers[ys, xs] = 1
        return markers
    order = np.argsort(-distance[ys, xs], kind="stable")
    ys, xs = ys[order], xs[order]
    # Greedy suppression, strongest first, vectorised over the candidates.
    suppressed = np.zeros(len(ys), bool)
    kept = []
    limit = min_distance_px**2
    while not suppressed.all():
        i = int(np.argmin(suppressed))  # the strongest candidate still standing
        kept.append(i)
        suppressed |= (ys - ys[i]) ** 2 + (xs - xs[i]) ** 2 < limit
        suppressed[i] = True
    ky, kx = ys[kept], xs[kept]
    n = len(kept)
    group = np.arange(n)
    if n > 1:
        # Sample every pair's segment at 16 points in one gather.
        first, second = np.triu_indices(n, 1)
        t = np.linspace(0.0, 1.0, 16)[None, :]
        dy = ky[second, None] - ky[first, None]
        dx = kx[second, None] - kx[first, None]
        line_y = np.rint(ky[first, None] + dy * t).astype(np.int64)
        line_x = np.rint(kx[first, None] + dx * t).astype(np.int64)
        dip = distance[line_y, line_x].min(axis=1)
        lower = np.minimum(distance[ky[first], kx[first]], distance[ky[second], kx[second]])
        joined = dip > lower - prominence_px
        for a, b in zip(first[joined], second[joined], strict=True):
            ra, rb = a, b
            while group[ra] != ra:
                ra = group[ra]
            while group[rb] != rb:
                rb = group[rb]
            group[max(ra, rb)] = min(ra, rb)
        for a in range(n):
            root = a
            while group[root] != root:
                root = group[root]
            group[a] = root
    _, seed = np.unique(group, return_inverse=True)
    markers[ky, kx] = seed + 1
    return markers


def _split_region(
    mask: np.ndarray,
    mpp: float,
    params: SegmentationParams,
    h: np.ndarray | None = None,
    min_peak: int = 0,
    better_than: float = 0.0,
) -> np.ndarray | None:
    """Cut one region into nuclei along the watershed of its distance transform.

    Seeds are maxima of the distance transform at least ``min_split_distance_um``
    apart with a waist of half a micron between them. The cut counts only when every
    part is nucleus-sized and solid and, when the hematoxylin window ``h`` is given,
    reaches ``min_peak`` somewhere (a pale part is cytoplasm, not a nucleus).

    Returns:
        int32 labels 1..n of the parts over ``mask``'s box (n >= 2), or None.
    """
    from skimage.segmentation import watershed

    padded = _pad1(mask.astype(np.uint8))
    distance = cv2.distanceTransform(padded, cv2.DIST_L2, 5)
    markers = _distance_seeds(distance, params.min_split_distance_um / mpp, max(1.0, 0.5 / mpp))
    seeds = int(markers.max())
    if seeds < 2:
        return None
    # Every part nucleus-sized: the whole must hold that many nuclei's areas.
    area_um2 = np.count_nonzero(padded) * (mpp * mpp)
    if not seeds * params.min_area_um2 <= area_um2 <= seeds * params.max_area_um2:
        return None
    parts = watershed(-distance, markers, mask=padded.astype(bool))[1:-1, 1:-1]
    parts = parts.astype(np.int32)
    return parts if _parts_ok(parts, mpp, params, h, min_peak, better_than) else None


def _split_touching(labels: np.ndarray, mpp: float, params: SegmentationParams) -> np.ndarray:
    """Split nuclei that no threshold separated and that passed as one (two
    overlapping nuclei can be as large and nearly as solid as one): a nucleus less
    solid than ``split_below_solidity`` is cut when every part is more solid than
    the whole was."""
    if params.split_below_solidity <= 0 or labels.max() == 0:
        return labels
    out = labels.copy()
    next_label = int(labels.max()) + 1
    # Two nuclei need twice the smallest nucleus' area.
    splittable = np.bincount(labels.ravel()) * (mpp * mpp) >= 2 * params.min_area_um2
    for index, window in enumerate(ndi.find_objects(labels), start=1):
        if window is None or not splittable[index]:
            continue
        mask = labels[window] == index
        whole = _mask_solidity(mask)
        if whole >= params.split_below_solidity:
            continue
        parts = _split_region(mask, mpp, params, better_than=whole + 0.02)
        if parts is None:
            parts = _split_at_notches(mask, mpp, params, better_than=whole + 0.02)
        if parts is None:
            continue
        target = out[window]
        for part in range(2, int(parts.max()) + 1):
            target[parts == part] = next_label
            next_label += 1
    return out


def _split_at_notches(
    mask: np.ndarray, mpp: float, params: SegmentationParams, better_than: float = 0.0
) -> np.ndarray | None:
    """Cut a region along the line between its two deepest outline notches.

    Two overlapping nuclei meet at two concave notches of the outline even when
    their union is nearly convex and its distance transform has one peak. Both
    notches must be at least ``notch_depth_um`` deep and lie on opposite sides
    (far apart along the outline); both parts must be nucleus-like.

    Returns:
        int32 labels 1..2 of the parts over ``mask``'s box, or None.
    """
    padded = _pad1(mask.astype(np.uint8))
    contours, _ = cv2.findContours(padded, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return None
    contour = max(contours, key=cv2.contourArea)
    if len(contour) < 8:
        return None
    try:
        defects = cv2.convexityDefects(contour, cv2.convexHull(contour, returnPoints=False))
    except cv2.error:  # self-intersecting outlines
        return None
    if defects is None:
        return None
    defects = defects.reshape(-1, 4)
    deep = defects[defects[:, 3] / 256.0 >= params.notch_depth_um / mpp]
    if len(deep) < 2:
        return None
    deep = deep[np.argsort(-deep[:, 3])][:2]
    i, j = sorted(int(d[2]) for d in deep)
    along = min(j - i, len(contour) - (j - i))
    if along < len(contour) / 4:
        return None  # both notches on one side: a dent, not a waist
    cut = padded.copy()
    a, b = contour[i, 0], contour[j, 0]
    cv2.line(cut, (int(a[0]), int(a[1])), (int(b[0]), int(b[1])), 0, thickness=2)
    count, parts = cv2.connectedComponents(cut, connectivity=4)
    if count != 3:
        return None
    # Give the cut line's pixels back to the nearer part.
    line = (padded > 0) & (parts == 0)
    if line.any():
        _, indices = ndi.distance_transform_edt(parts == 0, return_indices=True)
        parts[line] = parts[indices[0][line], indices[1][line]]
    parts = parts[1:-1, 1:-1].astype(np.int32)
    return parts if _parts_ok(parts, mpp, params, None, 0, better_than) else None


def _smooth_outlines(labels: np.ndarray, mpp: float) -> np.ndarray:
    """Open the nuclei with a disc of OPENING_UM radius: cuts the thin tails a low
    threshold level drags along from cytoplasm; nuclei are round enough to keep."""
    radius = round(OPENING_UM / mpp)
    count = int(labels.max()) + 1
    if radius < 1 or count == 1:
        return labels
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    # Labels as exact pixel values for OpenCV's min and max filters.
    values: np.ndarray = labels.astype(np.uint16 if count <= 65536 else np.float32)
    # Per nucleus: erode each label within itself (a pixel whose 4-neighbourhood
    # holds another label or the image edge counts as an edge), then grow back
    # inside the same label.
    cross = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))
    low = cv2.erode(values, cross, borderType=cv2.BORDER_CONSTANT, borderValue=0)
    high = cv2.dilate(values, cross, borderType=cv2.BORDER_CONSTANT, borderValue=0)
    same = low == high
    inner = ((labels > 0) & same).astype(np.uint8)
    core = cv2.erode(inner, disc)
    grown = cv2.dilate(core.astype(values.dtype) * values, disc)  # labels as values
    kept = (grown == values) & (labels > 0)
    out = np.where(kept, labels, 0).astype(np.int32)
    # A nucleus the opening removed entirely (smaller than the disc) stays as it was.
    lost = (_label_areas(labels, count) > 0) & (_label_areas(out, count) == 0)
    lost[0] = False
    if lost.any():
        restore = lost[labels]
        out[restore] = labels[restore]
    return out


def _label_areas(labels: np.ndarray, count: int) -> np.ndarray:
    """Pixels per label 0..count-1."""
    if count <= 65536:
        # A histogram of 16-bit labels counts twice as fast as numpy's bincount.
        hist = cv2.calcHist([labels.astype(np.uint16)], [0], None, [count], [0, count])
        return hist.ravel().astype(np.float64)
    return np.bincount(labels.ravel(), minlength=count).astype(np.float64)


def relabel_in_raster_order(labels: np.ndarray) -> np.ndarray:
    """Labels 1..n in raster order of first appearance; 0 stays background."""
    flat = labels.ravel()
    where = np.flatnonzero(flat)
    present, first = np.unique(flat[where], return_index=True)
    order = present[np.argsort(first, kind="stable")]
    lut = np.zeros(int(labels.max()) + 1, np.int32)
    lut[order] = np.arange(1, len(order) + 1, dtype=np.int32)
    return lut[labels]
