"""Tissue and artifact masks from a low-resolution RGB image of a slide.

The caller reads the slide's thumbnail or a low pyramid level; the functions here
take that image as a ``uint8`` RGB array with its downsample relative to level 0
and the level-0 resolution, so they need no slide reader. Every size in
:class:`TissueParams` is in µm or µm² and is converted to mask pixels with the mask
resolution ``mpp0 * downsample`` (µm/px).

Rules, in order (parameters in :class:`TissueParams`):

1. **Glass.** The glass colour ``I0`` is estimated from the image: the brightest
   mode of the grey-level histogram that holds at least ``glass_min_mode_fraction``
   of the pixels and whose median colour is nearly neutral (saturation <=
   ``glass_max_saturation``), and ``I0`` per channel is that median colour. Without
   such a mode brighter than ``glass_min_grey`` (a crop that is all tissue), white
   (255) is taken and there is no glass in view.
2. **Features.** Optical density ``OD = -log10(I / I0)`` (mean of the three channels,
   clipped at 0) and the HSV saturation of the glass-balanced colour ``I / I0``, both
   smoothed with a Gaussian of ``smooth_um``.
3. **Tissue threshold.** Otsu's threshold on each smoothed feature, raised to a floor
   (``min_od``, ``min_saturation``). Otsu always splits, even pure glass (it would
   split the noise), so a feature whose two Otsu classes differ by less than
   ``min_od_contrast`` / ``min_saturation_contrast`` finds no tissue at all, unless
   the typical pixel is stained (then the view is all tissue and the floors are
   the thresholds). Otsu's thresholds are capped (``tissue_max_od_threshold``,
   ``tissue_max_saturation_threshold``): in a view that is mostly tissue they
   would split pale from dense tissue. With no glass in view the floors are the
   thresholds. A pixel is core tissue when either feature is above its threshold
   and it is no neutral absorber. Faint tissue (fat:
   white vacuoles in thin pink membranes, nearly glass at low resolution) is added
   by hysteresis: connected regions of saturation above ``faint_saturation`` that
   touch core tissue.
4. **Clean-up.** Morphological closing (disk of radius ``close_um``) then opening
   (``open_um``); objects smaller than ``min_object_um2`` removed; holes smaller than
   ``max_hole_um2`` filled (background touching the image border is never a hole).
5. **Pen ink**, each colour its own mask, on the glass-balanced, smoothed colour
   (hue in degrees, saturation and value 0-1):

   - green: hue in ``green_hue_deg``, G > R, saturation >= ``pen_min_saturation``;
   - blue: hue in ``blue_hue_deg``, B > R, saturation >= ``blue_min_saturation``
     (higher than for green because hematoxylin is blue-purple too; its hue lies
     above the blue band's upper end and it is less saturated than ink);
   - black, by hysteresis. Ink absorbs in every channel: it adds about the same OD
     to all three, on glass or over tissue, whereas haematoxylin and eosin each
     leave one channel nearly clear. Cores: value <= ``black_max_value`` (least
     channel OD >= ``-log10`` of it, darker than any nucleus cluster at low
     resolution) and either saturation <= ``black_max_saturation`` (ink on glass)
     or *neutrality* (least / largest channel OD) >= ``black_min_neutrality`` (ink
     over tissue keeps the tissue's channel ratios, hence its saturation, but its
     OD is mostly the ink's grey). Cores grow into the 8-connected pixels of the
     lightly smoothed image (sigma ``smooth_um / 4``) with least channel OD >=
     ``black_grow_min_od`` and neutrality >= ``black_grow_min_neutrality``: the
     stroke's blurred edges and ink thinned over tissue. Grown strokes smaller than
     ``black_min_area_um2`` are dropped so that a few dark nuclei or dust never
     count (judged after growth: thin strokes have small cores).

   - by **absorbance direction** (the unit vector of the three channel ODs: the
     colour of an absorber whatever its amount; haematoxylin and eosin mixes fill
     one narrow band of it): green ink absorbs red most (red share >=
     ``green_min_dir_red``; outside the blue hues, where dense haematoxylin comes
     close); red ink leaves red nearly clear and absorbs blue almost as much as
     green (blue/green >= ``red_min_blue_over_green``, where eosin-rich stroma
     stays near 0.55-0.6), and is darker (``red_min_od``); other colours
     (yellow, orange) absorb blue more than green. Each grows from its cores into
     its fainter rim (looser bounds, at most ``ink_grow_um``).

   Regions smaller than ``pen_min_area_um2`` (red: ``red_min_area_um2``) are
   dropped; the masks are dilated by ``pen_dilate_um`` to take the ink's faint rim,
   black (already grown into its rim) by ``black_dilate_um``, a margin for the
   anti-aliased edge. Pen pixels are removed from the tissue mask (ink on glass is
   never tissue; tissue under ink is unusable).

   **Neutral absorbers** (direction within ``grey_max_angle_deg`` of the grey
   axis: dust, coverslip, label, ink) are never tissue. Those that are long and
   straight, or long and touching the image border without being as dark as
   black ink, are **edges** (coverslip edges, cracks, label bands): their own
   class, removed from the tissue and from black ink.
6. **Blur.** Local sharpness = local mean of the squared Laplacian of the grey image
   divided by the local grey variance (both Gaussian-weighted over ``blur_window_um``),
   on the image itself. Normalising by the local variance makes pale and dense tissue
   comparable; defocus removes fine detail (Laplacian) much faster than contrast.
   Both are computed over tissue pixels only (the window weighted by the tissue
   mask, the Laplacian away from its rim), so a sharp tissue edge against glass is
   not mistaken for blur. Tissue whose sharpness is below ``blur_fraction`` of the
   tissue median (the slide's own focus), and which has enough contrast to judge
   (local grey std >= ``blur_min_std``, relative to glass), is blurred; the mask is
   cleaned with an opening and regions smaller than ``blur_min_area_um2`` dropped.
   Defocus that matters to 20x patches is lost at the masks' few µm/px: a slide with
   a level at or finer than :data:`SHARPNESS_UM` (1 µm/px) has its blur judged again
   at 1 µm/px (:func:`refine_blur`, through :func:`compute_masks`): the level is read
   in tiles where there is tissue and resampled to 1 µm/px, and focus is the **band
   ratio**, the energy of the finest detail (the Laplacian, periods of 2-4 µm) over
   the energy of the next band (grey smoothed by 1 µm minus grey smoothed by 2 µm,
   periods of about 6-16 µm), each pooled into its mask pixel from the fine pixels
   (tissue only, away from its rim) and Gaussian-weighted over
   ``blur_fine_window_um``. Defocus takes the finest band first, so the ratio falls
   wherever the focus is off, whatever the tissue: dense and pale tissue, nuclei and
   stroma have nearly the same ratio in focus, where a Laplacian-over-variance
   measure swings with the tissue's layout. Tissue whose ratio is below
   ``blur_fine_fraction`` of the slide's median ratio is blurred, cleaned as above.
7. **Folds.** Tissue lying doubled absorbs about twice as much: OD smoothed over
   ``fold_smooth_um`` above ``p50 + fold_k_mad * 1.4826 * MAD`` of the tissue OD, and
   saturation above the tissue median, as regions of at least ``fold_min_area_um2``.

``usable = tissue & ~pen & ~blur & ~fold``. A slide without tissue gives empty masks
(``TissueMasks.empty``), which is not an error: the summary says so.

:func:`save_masks` writes ``tissue.png``, ``pen_{green,blue,black,red,other}.png``,
``blur.png``, ``fold.png``, ``edge.png`` (255 = set) and ``tissue.json`` (written last, so a folder
with ``tissue.json`` is complete) with the downsample, the mask resolution, the
thresholds and the areas; every file is written atomically (temp file + rename).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu

from services.common.errors import InvalidInput, NotFound

if TYPE_CHECKING:
    from services.slide.reader import SlideReader

#: Pen ink colours, in the order of their codes (1, 2, 3) in pen code images.
PEN_COLOURS: tuple[str, ...] = ("green", "blue", "black", "red", "other")
#: Finest mask resolution worked at, µm/px: finer images are segmented at this one.
FINEST_MASK_UM = 2.0
#: Name of the metadata file; it is written last.
MASKS_JSON = "tissue.json"
_FORMAT_VERSION = 1
_MAD_TO_SIGMA = 1.4826
#: Largest slide level read whole for the masks, pixels.
MAX_MASK_PX = 40_000_000


def check_finite_non_negative(params: Any, what: str, fractions: tuple[str, ...] = ()) -> None:
    """Every field of a parameter dataclass (numbers or tuples of them) is finite and
    >= 0, and the fields named in ``fractions`` at most 1, else :class:`InvalidInput`
    naming it as ``{what} {field}``."""
    for f in fields(params):
        value = getattr(params, f.name)
        values = value if isinstance(value, tuple) else (value,)
        if not all(math.isfinite(v) and v >= 0 for v in values):
            raise InvalidInput(f"{what} {f.name} must be finite and >= 0")
    for name in fractions:
        if getattr(params, name) > 1:
            raise InvalidInput(f"{what} {name} must be in 0-1")


@dataclass(frozen=True)
class TissueParams:
    """Parameters of tissue and artifact segmentation (sizes in µm, areas in µm²).

    Attributes:
        glass_min_mode_fraction: Least fraction of pixels in a histogram mode for it
            to be taken as glass.
        glass_min_grey: Darkest grey level (0-255) a glass mode may have.
        smooth_um: Gaussian sigma of the feature smoothing before Otsu, µm.
        min_od: Floor of the OD threshold (mean OD of the three channels).
        min_saturation: Floor of the saturation threshold (0-1).
        min_od_contrast: Least difference of the two Otsu class means of OD for the
            OD threshold to count (below it the image is uniform: no tissue).
        min_saturation_contrast: The same for saturation.
        faint_saturation: Saturation above which faint tissue (fat) joins tissue
            it touches; above the glass noise of the balanced, smoothed image.
        close_um: Radius of the morphological closing, µm.
        open_um: Radius of the morphological opening, µm.
        min_object_um2: Smaller tissue objects are removed, µm².
        max_hole_um2: Smaller holes in tissue are filled, µm².
        green_hue_deg: Hue band of green ink, degrees.
        blue_hue_deg: Hue band of blue ink, degrees.
        pen_min_saturation: Least saturation of green ink.
        blue_min_saturation: Least saturation of blue ink.
        black_max_value: Largest HSV value (glass = 1) of a black-ink core.
        black_max_saturation: Largest saturation of a black-ink core on glass.
        black_min_area_um2: Smallest black-ink region (after growth), µm².
        black_min_neutrality: Least neutrality (least / largest channel OD, 0-1)
            of a black-ink core that is more saturated than
            ``black_max_saturation`` (ink over tissue).
        black_grow_min_od: Least channel OD (the smallest of the three) of the
            pixels black-ink cores grow into (stroke edges, thin ink).
        black_grow_min_neutrality: Least neutrality (0-1) of those pixels.
        black_dilate_um: Dilation of the black-ink mask, µm (less than
            ``pen_dilate_um``: the growth already reaches the faint rim).
        pen_min_area_um2: Smallest green, blue or other-coloured ink region, µm².
        pen_dilate_um: Dilation of the green, blue, red and other ink masks, µm.
        ink_min_od: Least absorbance (Euclidean norm of the channel ODs) of a
            green or other-coloured ink core.
        ink_grow_min_od: Least absorbance of the rim pixels ink cores grow into.
        ink_grow_um: Farthest an ink core grows into its rim, µm.
        green_min_dir_red: Least red share of the absorbance direction (unit OD
            vector) of green ink (it absorbs red most; tissue stays under ~0.7).
        red_max_dir_red: Largest red share of the direction of red and
            other-coloured ink cores (they leave red light nearly clear).
        red_grow_max_dir_red: The same for the rim red ink grows into (ink over
            tissue takes some of the tissue's colour).
        red_min_blue_over_green: Least blue-over-green ratio of the direction of a
            red-ink core (eosin stays near 0.55-0.6).
        red_grow_min_blue_over_green: The same for the rim.
        red_min_od: Least absorbance of a red-ink core (darker than stroma).
        red_min_area_um2: Smallest red-ink region, µm².
        other_min_blue_over_green: Other-coloured ink (yellow, orange) absorbs blue
            more than green by at least this share of the direction.
        grey_max_angle_deg: Largest angle between a pixel's absorbance direction
            and the grey axis for it to count as a neutral absorber (black ink,
            dust, coverslip, label); stained tissue lies farther from it.
        grey_min_od: Least absorbance of a neutral absorber.
        edge_min_length_um: Least length of a coverslip edge or label band, µm.
        edge_max_width_um: Widest a straight neutral streak may be to count as an
            edge (a broader one touching the border is a band, unless it is
            mostly as dark as black ink).
        tissue_max_od_threshold: Cap of Otsu's OD threshold: in a view that is
            mostly tissue Otsu would split pale from dense tissue.
        tissue_max_saturation_threshold: The same for saturation.
        glass_max_saturation: Most saturated a histogram mode may be to be glass.
        min_object_image_fraction: The smallest tissue object is also at most this
            share of the image (a crop of a few hundred µm is one small object).
        blur_window_um: Gaussian sigma of the local sharpness window, µm.
        blur_fraction: Blurred below this fraction of the tissue median sharpness.
        blur_min_std: Least local grey standard deviation (glass = 1) to judge focus.
        blur_min_area_um2: Smallest blurred region, µm².
        blur_fine_fraction: Blurred below this fraction of the slide's median band
            ratio when blur is judged at 1 µm/px (:func:`refine_blur`).
        blur_fine_window_um: Gaussian sigma of the band-ratio window at 1 µm/px, µm.
        fold_smooth_um: Gaussian sigma of the OD smoothing for folds, µm.
        fold_k_mad: Folds lie this many robust standard deviations above the median.
        fold_min_area_um2: Smallest fold region, µm².
    """

    glass_min_mode_fraction: float = 0.005
    glass_min_grey: float = 170.0
    smooth_um: float = 8.0
    min_od: float = 0.04
    min_saturation: float = 0.06
    min_od_contrast: float = 0.05
    min_saturation_contrast: float = 0.05
    faint_saturation: float = 0.025
    close_um: float = 16.0
    open_um: float = 8.0
    min_object_um2: float = 10_000.0
    max_hole_um2: float = 20_000.0
    green_hue_deg: tuple[float, float] = (80.0, 180.0)
    blue_hue_deg: tuple[float, float] = (190.0, 250.0)
    pen_min_saturation: float = 0.3
    blue_min_saturation: float = 0.55
    black_max_value: float = 0.35
    black_max_saturation: float = 0.25
    black_min_area_um2: float = 2_000.0
    black_min_neutrality: float = 0.7
    black_grow_min_od: float = 0.3
    black_grow_min_neutrality: float = 0.6
    black_dilate_um: float = 4.0
    pen_min_area_um2: float = 500.0
    pen_dilate_um: float = 8.0
    ink_min_od: float = 0.15
    ink_grow_min_od: float = 0.08
    green_min_dir_red: float = 0.75
    red_max_dir_red: float = 0.2
    red_grow_max_dir_red: float = 0.3
    red_min_blue_over_green: float = 0.66
    red_grow_min_blue_over_green: float = 0.62
    red_min_od: float = 0.45
    red_min_saturation: float = 0.5
    ink_grow_um: float = 100.0
    red_min_area_um2: float = 20_000.0
    other_min_blue_over_green: float = 0.05
    grey_max_angle_deg: float = 8.0
    grey_min_od: float = 0.06
    edge_min_length_um: float = 3_000.0
    edge_max_width_um: float = 600.0
    tissue_max_od_threshold: float = 0.15
    tissue_max_saturation_threshold: float = 0.15
    glass_max_saturation: float = 0.08
    min_object_image_fraction: float = 0.02
    blur_window_um: float = 24.0
    blur_fraction: float = 0.3
    blur_min_std: float = 0.02
    blur_min_area_um2: float = 5_000.0
    blur_fine_fraction: float = 0.4
    blur_fine_window_um: float = 8.0
    fold_smooth_um: float = 16.0
    fold_k_mad: float = 3.0
    fold_min_area_um2: float = 5_000.0

    def __post_init__(self) -> None:
        check_finite_non_negative(
            self, "tissue parameter", ("black_min_neutrality", "black_grow_min_neutrality")
        )
        for name in ("green_hue_deg", "blue_hue_deg"):
            low, high = getattr(self, name)
            if not low < high <= 360:
                raise InvalidInput(f"tissue parameter {name} must be (low, high) in 0-360")
        for name in ("blur_fraction", "blur_fine_fraction"):
            if not 0 < getattr(self, name) < 1:
                raise InvalidInput(f"tissue parameter {name} must be in (0, 1)")


@dataclass
class TissueMasks:
    """Masks of one slide at one low resolution (all of the same shape).

    Attributes:
        tissue: Tissue, pen and edges already removed.
        pen: Pen ink per colour (:data:`PEN_COLOURS`), glass included.
        blur: Out-of-focus tissue.
        fold: Folded (doubled) tissue.
        edge: Coverslip edges, cracks and label bands (never tissue).
        usable: ``tissue & ~pen & ~blur & ~fold``.
        downsample: Level-0 px per mask px.
        mpp: Resolution of the mask pixels, µm/px.
        thresholds: Thresholds used (glass colour, OD, saturation, blur, fold).
    """

    tissue: np.ndarray
    pen: dict[str, np.ndarray]
    blur: np.ndarray
    fold: np.ndarray
    edge: np.ndarray
    usable: np.ndarray
    downsample: float
    mpp: float
    thresholds: dict[str, float] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        """True when no tissue was found (not an error: the grid is empty)."""
        return not bool(self.tissue.any())

    def pen_any(self) -> np.ndarray:
        """Union of the pen masks of every colour."""
        return union_of(self.pen.values(), self.tissue.shape)

    def summary(self) -> dict[str, Any]:
        """JSON-able areas (mm²), fractions of the tissue area and thresholds."""
        px_mm2 = (self.mpp / 1000.0) ** 2
        tissue_px = int(self.tissue.sum())

        def area(mask: np.ndarray) -> float:
            return round(float(mask.sum()) * px_mm2, 6)

        def fraction(mask: np.ndarray) -> float:
            return round(float((mask & self.tissue).sum()) / tissue_px, 6) if tissue_px else 0.0

        pen_any = self.pen_any()
        return {
            "empty": self.empty,
            "message": "no tissue found" if self.empty else "tissue found",
            "downsample": float(self.downsample),
            "mpp": float(self.mpp),
            "size_px": [int(self.tissue.shape[1]), int(self.tissue.shape[0])],
            "area_mm2": {
                "tissue": area(self.tissue),
                "usable": area(self.usable),
                "pen": area(pen_any),
                **{f"pen_{name}": area(mask) for name, mask in self.pen.items()},
                "blur": area(self.blur),
                "fold": area(self.fold),
                "edge": area(self.edge),
            },
            "fraction_of_tissue": {
                "usable": fraction(self.usable),
                "blur": fraction(self.blur),
                "fold": fraction(self.fold),
            },
            # Non-finite thresholds (e.g. no OD split on blank glass) are not JSON: null.
            "thresholds": {
                k: (round(float(v), 6) if math.isfinite(v) else None)
                for k, v in self.thresholds.items()
            },
        }


# ----------------------------------------------------------------------------- helpers


def _disk(radius_px: float) -> np.ndarray | None:
    """A disk structuring element, or None when it would be under one pixel."""
    r = round(radius_px)
    if r < 1:
        return None
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))


def _morph(mask: np.ndarray, op: int, radius_px: float) -> np.ndarray:
    kernel = _disk(radius_px)
    if kernel is None or not mask.any():
        return mask
    # Pad so that closing does not glue objects to the border nor erode from it.
    pad = kernel.shape[0]
    padded = cv2.copyMakeBorder(mask.astype(np.uint8), pad, pad, pad, pad, cv2.BORDER_CONSTANT)
    out = cv2.morphologyEx(padded, op, kernel)
    return np.asarray(out[pad:-pad, pad:-pad], dtype=bool)


def _remove_small(mask: np.ndarray, min_px: float) -> np.ndarray:
    """Drop 8-connected objects of fewer than ``min_px`` pixels."""
    if min_px <= 1 or not mask.any():
        return mask
    count, labels, stats, _ = cv2.connectedComponentsWithStats(
        mask.astype(np.uint8), connectivity=8
    )
    keep = np.zeros(count, dtype=bool)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= min_px
    return np.asarray(keep[labels], dtype=bool)


def _fill_holes(mask: np.ndarray, max_px: float) -> np.ndarray:
    """Fill 4-connected background regions under ``max_px`` not touching the border."""
    if max_px <= 0 or not mask.any():
        return mask
    _, labels, stats, _ = cv2.connectedComponentsWithStats((~mask).astype(np.uint8), connectivity=4)
    h, w = mask.shape
    x, y = stats[:, cv2.CC_STAT_LEFT], stats[:, cv2.CC_STAT_TOP]
    bw, bh = stats[:, cv2.CC_STAT_WIDTH], stats[:, cv2.CC_STAT_HEIGHT]
    inner = (x > 0) & (y > 0) & (x + bw < w) & (y + bh < h)
    fill = inner & (stats[:, cv2.CC_STAT_AREA] < max_px)
    fill[0] = False  # label 0 is the tissue itself
    return mask | fill[labels]


def union_of(masks: Iterable[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    """The union of boolean masks of ``shape`` (all False when there are none)."""
    out = np.zeros(shape, dtype=bool)
    for mask in masks:
        out |= mask
    return out


def _smooth(image: np.ndarray, sigma_px: float) -> np.ndarray:
    if sigma_px < 0.3:
        return image
    return np.asarray(cv2.GaussianBlur(image, (0, 0), sigma_px), dtype=np.float32)


def estimate_glass(rgb: np.ndarray, params: TissueParams = TissueParams()) -> np.ndarray:
    """The glass (background) colour: the median colour of the brightest neutral
    histogram mode (see :func:`find_glass`); white when there is none."""
    return find_glass(rgb, params)[0]


def find_glass(rgb: np.ndarray, params: TissueParams = TissueParams()) -> tuple[np.ndarray, bool]:
    """The glass colour and whether glass is in view at all.

    Glass is the brightest mode of the grey-level histogram (at least
    ``glass_min_grey`` and ``glass_min_mode_fraction`` of the pixels) whose median
    colour is nearly neutral (saturation <= ``glass_max_saturation``): a pale pink
    stretch of tissue in a crop with no glass is bright too, but coloured.

    Args:
        rgb: ``uint8`` RGB image, shape (height, width, 3).
        params: Segmentation parameters.

    Returns:
        ``(colour, found)``: glass colour (R, G, B) as 0-255 floats, white when no
        glass mode is found, and whether one was.
    """
    grey = rgb.astype(np.float32).mean(axis=2)
    hist = np.bincount(np.clip(grey + 0.5, 0, 255).astype(np.int64).ravel(), minlength=256)
    smooth = ndi.gaussian_filter1d(hist.astype(np.float64), 2.0)
    least = params.glass_min_mode_fraction * grey.size
    peaks = [
        g
        for g in range(int(params.glass_min_grey), 256)
        if smooth[g] >= least
        and smooth[g] >= smooth[max(g - 1, 0)]
        and smooth[g] >= smooth[min(g + 1, 255)]
    ]
    for mode in reversed(peaks):
        near = np.abs(grey - mode) <= 4
        glass = np.median(rgb[near].astype(np.float64), axis=0)
        if float(glass.max() - glass.min()) <= params.glass_max_saturation * float(glass.max()):
            return np.asarray(np.clip(glass, 1.0, 255.0), dtype=np.float64), True
    return np.full(3, 255.0), False


def _otsu_threshold(values: np.ndarray, floor: float, min_contrast: float) -> float:
    """Otsu's threshold raised to ``floor``; +inf when the classes barely differ."""
    if values.size == 0 or float(values.max() - values.min()) < 1e-6:
        return math.inf
    t = float(threshold_otsu(values))
    low, high = values[values <= t], values[values > t]
    if high.size == 0 or low.size == 0 or float(high.mean() - low.mean()) < min_contrast:
        return math.inf
    return max(t, floor)


def _hsv(balanced: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hue (degrees), saturation and value (0-1) of a float RGB image in 0-1."""
    hsv = cv2.cvtColor(np.ascontiguousarray(balanced, dtype=np.float32), cv2.COLOR_RGB2HSV)
    return hsv[..., 0], hsv[..., 1], hsv[..., 2]


def _neutral_dark(balanced: np.ndarray, min_od: float, min_neutrality: float) -> np.ndarray:
    """Pixels whose least channel OD is >= ``min_od`` and neutrality >= ``min_neutrality``.

    Neutrality is the least over the largest channel OD of the glass-balanced colour:
    1 for a grey absorber, about 0.4 or less for haematoxylin and eosin. Computed on
    the dark pixels only (a few percent of a slide).
    """
    # Channel by channel, not .max(axis=2): numpy reduces a short last axis slowly.
    lightest = np.maximum(np.maximum(balanced[..., 0], balanced[..., 1]), balanced[..., 2])
    out = lightest <= np.float32(10.0**-min_od)
    if not out.any():
        return out
    floor = np.float32(1.0 / 255.0)
    od_min = -np.log10(np.maximum(lightest[out], floor))
    od_max = -np.log10(np.maximum(balanced[out].min(axis=1), floor))
    out[out] = od_min >= min_neutrality * np.maximum(od_max, np.float32(1e-3))
    return out


def _grow(core: np.ndarray, weak: np.ndarray) -> np.ndarray:
    """Hysteresis: the 8-connected regions of ``weak | core`` that hold core pixels."""
    if not core.any():
        return core
    count, labels = cv2.connectedComponents((weak | core).astype(np.uint8), connectivity=8)
    seeded = np.zeros(count, dtype=bool)
    seeded[np.unique(labels[core])] = True
    seeded[0] = False
    return np.asarray(seeded[labels], dtype=bool)


def _black_ink(
    balanced: np.ndarray,
    val: np.ndarray,
    sat: np.ndarray,
    balanced_fine: np.ndarray,
    px_area_um2: float,
    params: TissueParams,
) -> np.ndarray:
    """Black ink: confident dark, grey cores grown into their fainter, greyish rims.

    Ink absorbs in every channel, so it adds about the same OD to all three; over
    tissue the stain's OD adds on top. The least channel OD (``-log10`` of the HSV
    value) is therefore high on ink wherever it lies, while haematoxylin and eosin
    each leave one channel nearly clear (blue, red) so that their least/largest OD
    ratio stays low even in nucleus-dense tissue. HSV saturation alone fails over
    tissue: ink multiplies the tissue's colour, whose channel ratios (hence its
    saturation) it keeps.
    """
    core = (val <= params.black_max_value) & (sat <= params.black_max_saturation)
    core_od = -math.log10(max(params.black_max_value, 1e-6))
    core |= _neutral_dark(balanced, core_od, params.black_min_neutrality)
    # The rim, on the lightly smoothed image: the full smoothing would spread the
    # stroke (and the tissue next to it) and move its edge outwards.
    weak = _neutral_dark(balanced_fine, params.black_grow_min_od, params.black_grow_min_neutrality)
    # The area is judged on the grown stroke: a thin or faint stroke has a small core.
    return _remove_small(_grow(core, weak), params.black_min_area_um2 / px_area_um2)


def _od_direction(balanced: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Absorbance strength (Euclidean norm of the three channel ODs) and its direction
    (the OD vector over its norm, (h, w, 3)) of a glass-balanced colour in 0-1.

    The direction is the colour of an absorber whatever its amount: haematoxylin and
    eosin mixes fill one narrow band of directions (red absorbed least after green,
    blue absorbed less than green), while inks lie outside it: green ink absorbs red
    most, red ink leaves red nearly clear and absorbs blue almost as much as green,
    yellow and orange inks absorb blue most, and black or grey absorb all three alike.
    """
    od = -np.log10(np.maximum(balanced, np.float32(1.0 / 255.0)))
    strength = np.sqrt(od[..., 0] ** 2 + od[..., 1] ** 2 + od[..., 2] ** 2)
    direction = od / np.maximum(strength, np.float32(1e-6))[..., None]
    return strength.astype(np.float32), direction.astype(np.float32)


def _grey(strength: np.ndarray, direction: np.ndarray, params: TissueParams) -> np.ndarray:
    """Neutral absorbers (within ``grey_max_angle_deg`` of the grey axis): ink, dust,
    coverslip edges, label bands; never stained tissue."""
    cosine = direction.sum(axis=2) / np.float32(math.sqrt(3.0))
    least = np.float32(math.cos(math.radians(params.grey_max_angle_deg)))
    return (strength >= params.grey_min_od) & (cosine >= least)


def _colour_ink(
    strength: np.ndarray,
    direction: np.ndarray,
    strength_fine: np.ndarray,
    direction_fine: np.ndarray,
    grey_fine: np.ndarray,
    saturation: np.ndarray,
    px_um: float,
    params: TissueParams,
) -> dict[str, np.ndarray]:
    """Green, red and other-coloured ink by absorbance direction, each grown by
    hysteresis into its fainter rim on the lightly smoothed image (at most
    ``ink_grow_um`` from the confident core).

    Red ink and eosin both leave red light nearly clear; red ink also absorbs blue
    almost as much as green (blue over green OD >= ``red_min_blue_over_green``),
    eosin-rich stroma clearly less (about 0.55-0.6), and ink is darker.
    """
    r_dir, g_dir, b_dir = direction[..., 0], direction[..., 1], direction[..., 2]
    rf_dir, gf_dir, bf_dir = direction_fine[..., 0], direction_fine[..., 1], direction_fine[..., 2]
    reddish = r_dir <= params.red_max_dir_red
    reddish_fine = rf_dir <= params.red_grow_max_dir_red
    core = {
        "green": (strength >= params.ink_min_od) & (r_dir >= params.green_min_dir_red),
        "red": (strength >= params.red_min_od)
        & (saturation >= params.red_min_saturation)
        & reddish
        & (b_dir >= params.red_min_blue_over_green * g_dir),
        "other": (strength >= params.ink_min_od)
        & reddish
        & (b_dir >= g_dir + params.other_min_blue_over_green),
    }
    weak = {
        "green": (strength_fine >= params.ink_grow_min_od) & (rf_dir >= params.green_min_dir_red),
        "red": (strength_fine >= params.ink_grow_min_od)
        & reddish_fine
        & (bf_dir >= params.red_grow_min_blue_over_green * gf_dir),
        "other": (strength_fine >= params.ink_grow_min_od)
        & reddish_fine
        & (bf_dir >= gf_dir + params.other_min_blue_over_green),
    }
    core["other"] &= ~core["red"]
    out = {}
    for name in core:
        seed = core[name] & ~grey_fine
        near = _morph(seed, cv2.MORPH_DILATE, params.ink_grow_um / px_um)
        out[name] = _grow(seed, weak[name] & ~grey_fine & near)
    out["red"] &= ~out["green"]
    out["other"] &= ~out["green"] & ~out["red"]
    return out


def _edge_mask(
    grey: np.ndarray, black: np.ndarray, px_um: float, params: TissueParams
) -> np.ndarray:
    """Coverslip edges, cracks and label bands: neutral regions that are long and
    straight (the short side of their rotated bounding box at most
    ``edge_max_width_um``, the long side at least ``edge_min_length_um``), or long,
    touching the image border and mostly not as dark as black ink (a label or a
    mounting band). A curved or broad ink stroke stays ink."""
    out = np.zeros(grey.shape, dtype=bool)
    if not grey.any():
        return out
    count, labels, stats, _ = cv2.connectedComponentsWithStats(
        grey.astype(np.uint8), connectivity=8
    )
    height, width = grey.shape
    least_px = params.edge_min_length_um / px_um
    for index in range(1, count):
        x, y, w, h, _area = (int(v) for v in stats[index])
        if max(w, h) < least_px:
            continue
        touches = x == 0 or y == 0 or x + w == width or y + h == height
        points = cv2.findNonZero((labels[y : y + h, x : x + w] == index).astype(np.uint8))
        (_, _), (side_a, side_b), _ = cv2.minAreaRect(points)
        long_side, short_side = max(side_a, side_b), min(side_a, side_b)
        member = labels[y : y + h, x : x + w] == index
        thin = long_side >= least_px and short_side * px_um <= params.edge_max_width_um
        band = touches and int((black[y : y + h, x : x + w] & member).sum()) < 0.5 * int(
            member.sum()
        )
        if thin or band:
            out[y : y + h, x : x + w] |= member
    return out


def _pen_masks(
    hue: np.ndarray,
    sat: np.ndarray,
    val: np.ndarray,
    balanced: np.ndarray,
    balanced_fine: np.ndarray,
    px_area_um2: float,
    px_um: float,
    params: TissueParams,
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Pen ink per colour, the coverslip/label edge and every neutral absorber."""
    r, g, b = balanced[..., 0], balanced[..., 1], balanced[..., 2]
    green = (
        (hue >= params.green_hue_deg[0])
        & (hue <= params.green_hue_deg[1])
        & (g > r)
        & (sat >= params.pen_min_saturation)
    )
    blue = (
        (hue >= params.blue_hue_deg[0])
        & (hue <= params.blue_hue_deg[1])
        & (b > r)
        & (sat >= params.blue_min_saturation)
    )
    strength, direction = _od_direction(balanced)
    strength_fine, direction_fine = _od_direction(balanced_fine)
    grey_fine = _grey(strength_fine, direction_fine, params)
    coloured = _colour_ink(
        strength, direction, strength_fine, direction_fine, grey_fine, sat, px_um, params
    )
    black = _black_ink(balanced, val, sat, balanced_fine, px_area_um2, params)
    edge = _edge_mask(grey_fine, black, px_um, params)
    black &= ~edge
    # Ink that absorbs red most is green or blue: by direction alone it is green only
    # outside the blue hues (where dense haematoxylin comes close to it); blue ink
    # needs the hue rule's saturation.
    bluish = (hue >= params.blue_hue_deg[0]) & (hue <= params.blue_hue_deg[1])
    min_px = params.pen_min_area_um2 / px_area_um2
    raw = {
        "green": _remove_small(green | (coloured["green"] & ~bluish), min_px),
        "blue": _remove_small(blue, min_px),
        "black": black,
        "red": _remove_small(coloured["red"], params.red_min_area_um2 / px_area_um2),
        "other": _remove_small(coloured["other"] & ~blue & ~black, min_px),
    }
    dilate_um = {"black": params.black_dilate_um}
    pen = {
        name: _morph(mask, cv2.MORPH_DILATE, dilate_um.get(name, params.pen_dilate_um) / px_um)
        for name, mask in raw.items()
    }
    edge = _morph(edge, cv2.MORPH_DILATE, params.black_dilate_um / px_um)
    return pen, edge, grey_fine


def _sharpness(
    grey: np.ndarray, sigma_px: float, weight: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Local Laplacian energy over local variance, the local standard deviation and
    the share of tissue in the window, all over tissue pixels only.

    The window is weighted by the tissue mask (normalized convolution), and the
    Laplacian only counts away from the tissue's rim: a window across the tissue's
    edge would otherwise see the glass-tissue step as a large variance with little
    fine detail, and call sharp tissue edges blurred.
    """
    pieces = _focus_pieces(grey, weight)
    return _sharpness_of({name: _smooth(image, sigma_px) for name, image in pieces.items()})


def _grey_over_glass(rgb: np.ndarray, glass: np.ndarray) -> np.ndarray:
    """Mean of the three channels as a share of the glass colour (glass = 1)."""
    return (rgb.astype(np.float32) / glass.astype(np.float32).reshape(1, 1, 3)).mean(axis=2)


def _focus_pieces(grey: np.ndarray, weight: np.ndarray) -> dict[str, np.ndarray]:
    """The per-pixel terms of :func:`_sharpness`, to be windowed (summed) before they
    are combined: squared Laplacian away from the tissue's rim and that rim-free
    weight, grey and squared grey over tissue, and the tissue weight."""
    lap = cv2.Laplacian(grey, cv2.CV_32F, ksize=3)
    inner = cv2.erode(weight, np.ones((3, 3), np.uint8)).astype(np.float32)
    tissue = weight.astype(np.float32)
    return {
        "lap": lap * lap * inner,
        "inner": inner,
        "g": grey * tissue,
        "g2": grey * grey * tissue,
        "w": tissue,
    }


def _sharpness_of(windowed: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sharpness, local standard deviation and tissue share from windowed
    :func:`_focus_pieces`."""
    share, var = _windowed_variance(windowed)
    energy = windowed["lap"] / np.maximum(windowed["inner"], np.float32(1e-3))
    return energy / (var + 1e-4), np.sqrt(var), share


def _windowed_variance(windowed: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Tissue share and grey variance over tissue from the windowed ``w``, ``g`` and
    ``g2`` pieces (:func:`_focus_pieces`, :func:`_band_pieces`)."""
    share = windowed["w"]
    norm = np.maximum(share, np.float32(1e-3))
    mean = windowed["g"] / norm
    return share, np.maximum(windowed["g2"] / norm - mean * mean, 0.0)


def _band_pieces(grey: np.ndarray, weight: np.ndarray) -> dict[str, np.ndarray]:
    """The per-pixel terms of the band ratio (module docstring, step 6) of a grey image
    at :data:`SHARPNESS_UM`: squared Laplacian and squared 1-2 µm difference of
    Gaussians away from the tissue's rim, that rim-free weight, grey and squared grey
    over tissue, and the tissue weight. Windowed (summed) before they are combined
    by :func:`_band_ratio_of`."""
    lap = cv2.Laplacian(grey, cv2.CV_32F, ksize=3)
    band = cv2.GaussianBlur(grey, (0, 0), 1.0) - cv2.GaussianBlur(grey, (0, 0), 2.0)
    # The 2 µm Gaussian reaches about 5 px: away from the rim by that much.
    inner = cv2.erode(weight, np.ones((5, 5), np.uint8)).astype(np.float32)
    tissue = weight.astype(np.float32)
    return {
        "lap": lap * lap * inner,
        "band": band * band * inner,
        "inner": inner,
        "g": grey * tissue,
        "g2": grey * grey * tissue,
        "w": tissue,
    }


def _band_ratio_of(windowed: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Band ratio, local standard deviation and tissue share from windowed
    :func:`_band_pieces`. Where the window has no rim-free tissue the ratio is 0
    with no contrast, so the pixel is not judged."""
    share, var = _windowed_variance(windowed)
    inner = windowed["inner"] > np.float32(1e-3)
    ratio = np.where(inner, windowed["lap"] / (windowed["band"] + np.float32(1e-9)), 0.0)
    return ratio.astype(np.float32), np.where(inner, np.sqrt(var), 0.0), share


def _blur_mask(
    rgb: np.ndarray,
    glass: np.ndarray,
    tissue: np.ndarray,
    px_um: float,
    px_area_um2: float,
    params: TissueParams,
) -> tuple[np.ndarray, float]:
    """Blur judged on the mask image itself (:func:`refine_blur` judges it finer)."""
    grey = _grey_over_glass(rgb, glass)
    sharp, std, share = _sharpness(grey, params.blur_window_um / px_um, tissue.astype(np.uint8))
    return _blur_from_sharpness(sharp, std, share, tissue, px_um, px_area_um2, params)


def _blur_from_sharpness(
    sharp: np.ndarray,
    std: np.ndarray,
    share: np.ndarray,
    tissue: np.ndarray,
    px_um: float,
    px_area_um2: float,
    params: TissueParams,
) -> tuple[np.ndarray, float]:
    """Blurred tissue: sharpness under ``blur_fraction`` of the slide's own median."""
    # Judged where the window holds enough tissue with enough contrast.
    judged = tissue & (std >= params.blur_min_std) & (share >= 0.5)
    if not judged.any():
        return np.zeros_like(tissue), math.nan
    threshold = params.blur_fraction * float(np.median(sharp[judged]))
    blur = judged & (_smooth(sharp, 1.0) < threshold)
    blur = _morph(blur, cv2.MORPH_OPEN, params.open_um / px_um)
    blur = _morph(blur, cv2.MORPH_CLOSE, params.close_um / px_um)
    blur = _remove_small(blur, params.blur_min_area_um2 / px_area_um2) & tissue
    return blur, threshold


def _fold_mask(
    od: np.ndarray,
    sat: np.ndarray,
    tissue: np.ndarray,
    px_um: float,
    px_area_um2: float,
    params: TissueParams,
) -> tuple[np.ndarray, float]:
    if not tissue.any():
        return np.zeros_like(tissue), math.nan
    od_s = _smooth(od, params.fold_smooth_um / px_um)
    values = od_s[tissue]
    p50 = float(np.median(values))
    mad = float(np.median(np.abs(values - p50)))
    threshold = p50 + params.fold_k_mad * _MAD_TO_SIGMA * mad
    sat_p50 = float(np.median(sat[tissue]))
    fold = tissue & (od_s > threshold) & (sat > sat_p50)
    fold = _morph(fold, cv2.MORPH_OPEN, params.open_um / px_um)
    fold = _remove_small(fold, params.fold_min_area_um2 / px_area_um2) & tissue
    return fold, threshold


def _check_rgb(name: str, image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise InvalidInput(f"{name} must be a uint8 numpy array")
    if image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 2:
        raise InvalidInput(f"{name} must be RGB of shape (height, width, 3), got {image.shape}")


# -------------------------------------------------------------------------------- API


def segment_tissue(
    rgb: np.ndarray,
    downsample: float,
    mpp0: float,
    params: TissueParams = TissueParams(),
) -> TissueMasks:
    """Tissue, pen, blur and fold masks of a low-resolution slide image.

    Args:
        rgb: ``uint8`` RGB image of the whole slide, shape (height, width, 3),
            transparent areas already composited on white.
        downsample: Level-0 px per image px.
        mpp0: Level-0 resolution, µm/px.
        params: Segmentation parameters (µm / µm²).

    Returns:
        The masks at the image's resolution (``mpp = mpp0 * downsample``) and the
        thresholds used. No tissue gives empty masks, not an error.

    Raises:
        InvalidInput: Bad image, downsample or resolution.
    """
    _check_rgb("rgb", rgb)
    for name, value in (("downsample", downsample), ("mpp0", mpp0)):
        if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
            raise InvalidInput(f"{name} must be a positive number, got {value!r}")
    px_um = float(mpp0) * float(downsample)
    if px_um < 0.9 * FINEST_MASK_UM and min(rgb.shape[:2]) * px_um >= 16 * FINEST_MASK_UM:
        # Masks need no sub-µm detail; a crop at 40x is segmented at FINEST_MASK_UM
        # (its µm-sized windows would cost hundreds of pixels each) and brought back.
        return _segment_finer(rgb, float(downsample), float(mpp0), params)
    px_area_um2 = px_um * px_um

    glass, glass_found = find_glass(rgb, params)
    image = rgb.astype(np.float32)
    balanced = np.clip(image / glass.astype(np.float32), 0.0, 1.0)
    od = (-np.log10(np.maximum(balanced, 1.0 / 255.0))).mean(axis=2).astype(np.float32)
    sigma = params.smooth_um / px_um
    od_s = _smooth(od, sigma)
    balanced_s = np.clip(_smooth(balanced, sigma), 0.0, 1.0)
    hue, sat_s, val_s = _hsv(balanced_s)

    # Lightly smoothed colour for the hysteresis steps (black ink rims, faint tissue).
    balanced_fine = np.clip(_smooth(balanced, sigma / 4), 0.0, 1.0)

    pen, edge, grey = _pen_masks(
        hue, sat_s, val_s, balanced_s, balanced_fine, px_area_um2, px_um, params
    )
    pen_any = union_of([edge, *pen.values()], edge.shape)
    # Ink is far darker and more saturated than tissue: left in, it would pull Otsu's
    # threshold between tissue and ink instead of between glass and tissue.
    sample = ~(pen_any | grey)
    if not sample.any():
        sample = np.ones_like(pen_any)
    if glass_found:
        t_od = _otsu_threshold(od_s[sample], params.min_od, params.min_od_contrast)
        t_sat = _otsu_threshold(
            sat_s[sample], params.min_saturation, params.min_saturation_contrast
        )
        if math.isfinite(t_od) or math.isfinite(t_sat):
            # Otsu splits glass from tissue; where the view is mostly tissue it would
            # split pale from dense tissue instead, so it is capped.
            t_od = min(t_od, max(params.tissue_max_od_threshold, params.min_od))
            t_sat = min(t_sat, max(params.tissue_max_saturation_threshold, params.min_saturation))
        elif float(np.median(od_s[sample])) >= params.min_od or (
            float(np.median(sat_s[sample])) >= params.min_saturation
        ):
            # Nothing splits, yet the typical pixel is stained: all tissue, and the
            # glass-like mode was its palest stretch.
            t_od, t_sat = params.min_od, params.min_saturation
    else:
        # No glass in view (a crop inside the tissue): whatever is stained is tissue.
        t_od, t_sat = params.min_od, params.min_saturation
    # Neutral absorbers (dust, coverslip, label) are never tissue, however dark.
    core = ((od_s > t_od) | (sat_s > t_sat)) & sample
    # Hysteresis: faint tissue (fat, thin smears) counts where it touches the core.
    # On a lightly smoothed image: the full smoothing would smear the rim of strong
    # tissue outwards past the faint threshold and grow the mask by a kernel width.
    _, sat_fine, _ = _hsv(balanced_fine)
    raw = _grow(core, sat_fine > params.faint_saturation)

    # The smallest object kept: a crop of a few hundred µm is all one small object.
    min_object_px = min(
        params.min_object_um2 / px_area_um2, params.min_object_image_fraction * od.size
    )
    tissue = raw & ~pen_any
    tissue = _morph(tissue, cv2.MORPH_CLOSE, params.close_um / px_um)
    tissue = _morph(tissue, cv2.MORPH_OPEN, params.open_um / px_um)
    tissue = _remove_small(tissue & ~pen_any, min_object_px)
    tissue = _fill_holes(tissue, params.max_hole_um2 / px_area_um2) & ~pen_any
    # Pen often cuts tissue into slivers along its edges; drop those again.
    tissue = _remove_small(tissue, min_object_px)

    blur, t_blur = _blur_mask(rgb, glass, tissue, px_um, px_area_um2, params)
    fold, t_fold = _fold_mask(od, sat_s, tissue, px_um, px_area_um2, params)
    usable = tissue & ~pen_any & ~blur & ~fold
    thresholds = {
        "glass_r": float(glass[0]),
        "glass_g": float(glass[1]),
        "glass_b": float(glass[2]),
        "glass_found": float(glass_found),
        "od": t_od,
        "saturation": t_sat,
        "blur_sharpness": t_blur,
        "fold_od": t_fold,
    }
    return TissueMasks(
        tissue=tissue,
        pen=pen,
        blur=blur,
        fold=fold,
        edge=edge,
        usable=usable,
        downsample=float(downsample),
        mpp=px_um,
        thresholds=thresholds,
    )


def _segment_finer(
    rgb: np.ndarray,
    downsample: float,
    mpp0: float,
    params: TissueParams,
) -> TissueMasks:
    """:func:`segment_tissue` of a fine image at :data:`FINEST_MASK_UM`, the masks
    brought back to the image's size (nearest neighbour)."""
    height, width = rgb.shape[:2]
    factor = FINEST_MASK_UM / (mpp0 * downsample)
    size = (max(2, round(width / factor)), max(2, round(height / factor)))
    small = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
    coarse = segment_tissue(small, downsample * width / size[0], mpp0, params)

    def back(mask: np.ndarray) -> np.ndarray:
        up = cv2.resize(mask.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST)
        return np.asarray(up, dtype=bool)

    return TissueMasks(
        tissue=back(coarse.tissue),
        pen={name: back(mask) for name, mask in coarse.pen.items()},
        blur=back(coarse.blur),
        fold=back(coarse.fold),
        edge=back(coarse.edge),
        usable=back(coarse.usable),
        downsample=downsample,
        mpp=mpp0 * downsample,
        thresholds=coarse.thresholds,
    )


# --------------------------------------------------------------------------- storage


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _mask_files(masks_pen: dict[str, Any]) -> dict[str, str]:
    files = {"tissue": "tissue.png", "blur": "blur.png", "fold": "fold.png", "edge": "edge.png"}
    files.update({f"pen_{name}": f"pen_{name}.png" for name in masks_pen})
    return files


#: Resolution blur is judged at when the slide has a level that fine, µm/px (10x):
#: defocus that matters to 20x patches is visible there, and lost at the masks' own
#: few µm/px.
SHARPNESS_UM = 1.0
#: Side of the tiles the sharpness level is read in, px of that level.
SHARPNESS_TILE_PX = 2048


def sharpness_level(reader: SlideReader, mask_downsample: float) -> int | None:
    """The pyramid level blur is judged on: the one nearest :data:`SHARPNESS_UM`, if
    it is finer than the masks' own (None otherwise)."""
    mpp0 = float(reader.mpp[0])
    level = reader.best_level_for_downsample(max(1.0, SHARPNESS_UM / mpp0))
    if float(reader.level_downsamples[level]) * 1.5 > mask_downsample:
        return None
    return level


def refine_blur(
    masks: TissueMasks, reader: SlideReader, level: int, params: TissueParams
) -> TissueMasks:
    """The masks with blur judged again on a finer level of the slide, at 1 µm/px.

    The level is read in tiles of :data:`SHARPNESS_TILE_PX`, only where the mask
    has tissue, and resampled to :data:`SHARPNESS_UM` when it is finer; each tile's
    band energies and grey moments (:func:`_band_pieces`) are pooled into its mask
    pixels, then windowed at mask resolution over ``blur_fine_window_um`` and the
    band ratio judged against the slide's own median ratio with
    ``blur_fine_fraction`` (module docstring, step 6).
    """
    h, w = masks.tissue.shape
    level_ds = float(reader.level_downsamples[level])
    level_um = level_ds * float(reader.mpp[0])
    factor = masks.downsample / level_ds  # level px per mask px
    # Resampled to 1 µm/px (never up): the bands are defined there.
    scale = min(1.0, level_um / SHARPNESS_UM)
    glass = np.array([masks.thresholds.get(f"glass_{c}", 255.0) for c in "rgb"], np.float32)
    names = ("lap", "band", "inner", "g", "g2", "w")
    sums = {name: np.zeros((h, w), np.float32) for name in names}
    step = max(1, int(SHARPNESS_TILE_PX // factor))  # mask px per tile
    tissue_u8 = masks.tissue.astype(np.uint8)
    for y0 in range(0, h, step):
        for x0 in range(0, w, step):
            block = tissue_u8[y0 : y0 + step, x0 : x0 + step]
            if not block.any():
                continue
            bh, bw = block.shape
            tw, th = max(1, round(bw * factor)), max(1, round(bh * factor))
            rgb = reader.read_region(
                round(x0 * masks.downsample), round(y0 * masks.downsample), level, tw, th
            )
            if scale < 1.0:
                sw, sh = max(1, round(tw * scale)), max(1, round(th * scale))
                rgb = cv2.resize(rgb, (sw, sh), interpolation=cv2.INTER_AREA)
                tw, th = sw, sh
            weight = cv2.resize(block, (tw, th), interpolation=cv2.INTER_NEAREST)
            pieces = _band_pieces(_grey_over_glass(rgb, glass), weight)
            for name, image in pieces.items():
                pooled = cv2.resize(image, (bw, bh), interpolation=cv2.INTER_AREA)
                sums[name][y0 : y0 + bh, x0 : x0 + bw] = pooled
    sigma = params.blur_fine_window_um / masks.mpp
    ratio, std, share = _band_ratio_of({k: _smooth(v, sigma) for k, v in sums.items()})
    px_um = masks.mpp
    fine = replace(params, blur_fraction=params.blur_fine_fraction)
    blur, threshold = _blur_from_sharpness(
        ratio, std, share, masks.tissue, px_um, px_um * px_um, fine
    )
    return replace(
        masks,
        blur=blur,
        usable=masks.tissue & ~masks.pen_any() & ~blur & ~masks.fold,
        thresholds={
            **masks.thresholds,
            "blur_sharpness": threshold,
            "blur_level_um": level_um,
        },
    )


def mask_level_image(
    reader: SlideReader, slide_id: str, mask_downsample: float
) -> tuple[np.ndarray, float]:
    """The slide level nearest ``mask_downsample`` (a plain image: itself), read
    whole, and its downsample: the image the masks are computed on.

    Raises:
        InvalidInput: Even that level is larger than :data:`MAX_MASK_PX`.
    """
    level = reader.best_level_for_downsample(mask_downsample)
    lw, lh = reader.level_dimensions[level]
    if lw * lh > MAX_MASK_PX:
        raise InvalidInput(
            f"slide {slide_id} has no level small enough for the tissue mask "
            f"(level {level} is {lw}x{lh} px)"
        )
    return reader.read_level(level), float(reader.level_downsamples[level])


def compute_masks(
    reader: SlideReader, slide_id: str, params: TissueParams, mask_downsample: float
) -> TissueMasks:
    """Tissue and artifact masks from the slide level nearest ``mask_downsample``, with
    blur judged on the level nearest :data:`SHARPNESS_UM` when that is finer."""
    thumbnail, downsample = mask_level_image(reader, slide_id, mask_downsample)
    return masks_of_level(reader, thumbnail, downsample, params)


def masks_of_level(
    reader: SlideReader, thumbnail: np.ndarray, downsample: float, params: TissueParams
) -> TissueMasks:
    """:func:`segment_tissue` of a slide's mask-level image, blur refined on a finer
    level (:func:`sharpness_level`, :func:`refine_blur`) when the slide has one."""
    masks = segment_tissue(thumbnail, downsample, float(reader.mpp[0]), params)
    level = sharpness_level(reader, masks.downsample)
    if level is None or not masks.tissue.any():
        return masks
    return refine_blur(masks, reader, level, params)


def save_masks(masks: TissueMasks, folder: str | Path) -> Path:
    """Write the masks as PNGs (255 = set) and ``tissue.json`` last, atomically.

    Args:
        masks: The masks to save.
        folder: Output folder (created).

    Returns:
        Path of ``tissue.json``.
    """
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    images = {"tissue": masks.tissue, "blur": masks.blur, "fold": masks.fold, "edge": masks.edge}
    images.update({f"pen_{name}": mask for name, mask in masks.pen.items()})
    files = _mask_files(masks.pen)
    for key, name in files.items():
        ok, encoded = cv2.imencode(".png", np.where(images[key], 255, 0).astype(np.uint8))
        if not ok:
            raise RuntimeError(f"cannot encode {name}")
        _write_atomic(out / name, encoded.tobytes())
    meta = {"format_version": _FORMAT_VERSION, "files": files, **masks.summary()}
    path = out / MASKS_JSON
    _write_atomic(path, json.dumps(meta, indent=1, sort_keys=True).encode())
    return path


def load_masks(folder: str | Path) -> TissueMasks:
    """Read masks written by :func:`save_masks`.

    Args:
        folder: Folder holding ``tissue.json`` and the PNGs.

    Returns:
        The masks, with ``usable`` recomputed.

    Raises:
        NotFound: ``tissue.json`` or a mask file is missing.
        InvalidInput: The files are malformed or their sizes disagree.
    """
    root = Path(folder)
    path = root / MASKS_JSON
    if not path.is_file():
        raise NotFound(f"no {MASKS_JSON} in {root}")
    try:
        meta = json.loads(path.read_text())
        files: dict[str, str] = meta["files"]
        size = tuple(meta["size_px"])
        downsample, mpp = float(meta["downsample"]), float(meta["mpp"])
        thresholds = {
            k: (math.nan if v is None else float(v)) for k, v in meta["thresholds"].items()
        }
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidInput(f"{path} is not a tissue mask file: {exc}") from None
    loaded: dict[str, np.ndarray] = {}
    for key, name in files.items():
        file = root / name
        if not file.is_file():
            raise NotFound(f"mask {name} listed in {path} is missing")
        image = cv2.imread(str(file), cv2.IMREAD_GRAYSCALE)
        if image is None or (image.shape[1], image.shape[0]) != size:
            raise InvalidInput(f"{file} is unreadable or not of size {size}")
        loaded[key] = image > 127
    pen = {name: loaded[f"pen_{name}"] for name in PEN_COLOURS if f"pen_{name}" in loaded}
    tissue, blur, fold = loaded["tissue"], loaded["blur"], loaded["fold"]
    # Folders written before edges were found have none.
    edge = loaded.get("edge", np.zeros(tissue.shape, dtype=bool))
    pen_any = union_of(pen.values(), tissue.shape)
    return TissueMasks(
        tissue=tissue,
        pen=pen,
        blur=blur,
        fold=fold,
        edge=edge,
        usable=tissue & ~pen_any & ~blur & ~fold,
        downsample=downsample,
        mpp=mpp,
        thresholds=thresholds,
    )
