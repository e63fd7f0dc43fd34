"""The low-resolution plan of a synthetic slide: where tissue, tumour and artifacts are.

A :class:`SlideLayout` is drawn once per slide at ``downsample`` (default 32, i.e.
8 µm per layout pixel for a 0.25 µm/px slide). The renderer upsamples it tile by tile;
the ground-truth masks are its maps. Region classes:

====  ==========  =========================================================
code  name        what it is
====  ==========  =========================================================
0     background  glass
1     stroma      fibrous connective tissue (eosin), stromal nuclei, lymphocytes
2     fat         adipocytes: empty vacuoles with thin membranes
3     lobule      normal breast lobules: ducts (glands) in loose stroma
4     tumour      invasive carcinoma: sheets or tubules of tumour cells
5     necrosis    necrotic tumour: eosinophilic debris, karyorrhexis
====  ==========  =========================================================
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

BACKGROUND, STROMA, FAT, LOBULE, TUMOUR, NECROSIS = range(6)
REGION_NAMES = ("background", "stroma", "fat", "lobule", "tumour", "necrosis")
PEN_NONE, PEN_GREEN, PEN_BLUE, PEN_BLACK = range(4)
PEN_NAMES = ("none", "green", "blue", "black")


@dataclass
class Gland:
    """A duct or tubule: a lumen ringed by epithelial or tumour cells.

    Attributes:
        x_px: Centre, level-0 px.
        y_px: Centre, level-0 px.
        radius_px: Outer radius (lumen plus cell layer), level-0 px.
        lumen_ratio: Lumen radius as a share of the outer radius.
        tumour: True for a tumour tubule, False for a normal duct.
        phase: Shape phase (radians) of the gland's irregular outline.
    """

    x_px: float
    y_px: float
    radius_px: float
    lumen_ratio: float
    tumour: bool
    phase: float


@dataclass
class SlideLayout:
    """Everything about a slide that is decided at low resolution.

    Attributes:
        width_px: Level-0 width of the slide.
        height_px: Level-0 height of the slide.
        downsample: Level-0 px per layout px.
        region: Region class per layout px (``uint8``, codes in the module docstring).
        tumour_proximity: 0-1 closeness to tumour per layout px (lymphocytes gather there).
        fiber_angle: Local stroma fibre direction per layout px, radians.
        pen: Pen ink per layout px (``PEN_*`` codes).
        pen_strength: 0-1 ink density per layout px.
        blur: 0-1 out-of-focus weight per layout px.
        fold: 0-1 tissue-fold weight per layout px (tissue lying doubled).
        dust: 0-1 dust weight per layout px.
        tumour_bed: Boolean tumour bed (tumour with its stroma and necrosis).
        glands: Ducts and tubules, level-0 coordinates.
    """

    width_px: int
    height_px: int
    downsample: int
    region: np.ndarray
    tumour_proximity: np.ndarray
    fiber_angle: np.ndarray
    pen: np.ndarray
    pen_strength: np.ndarray
    blur: np.ndarray
    fold: np.ndarray
    dust: np.ndarray
    tumour_bed: np.ndarray | None = None
    glands: list[Gland] = field(default_factory=list)

    @property
    def tissue(self) -> np.ndarray:
        """Boolean tissue mask at layout resolution."""
        return self.region != BACKGROUND

    @property
    def tumour(self) -> np.ndarray:
        """Boolean tumour bed at layout resolution: tumour, its stroma and necrosis."""
        if self.tumour_bed is not None:
            return self.tumour_bed
        return (self.region == TUMOUR) | (self.region == NECROSIS)


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-smoothed white noise scaled to zero mean, unit deviation.

    Args:
        rng: Random generator.
        shape: (height, width) of the field.
        sigma: Smoothing, in pixels of the field.
    """
    noise = rng.standard_normal(shape).astype(np.float32)
    smoothed = cv2.GaussianBlur(
        noise, (0, 0), sigmaX=max(sigma, 0.5), borderType=cv2.BORDER_REFLECT
    )
    std = float(smoothed.std()) or 1.0
    return (smoothed - float(smoothed.mean())) / std


def _top_fraction(values: np.ndarray, where: np.ndarray, fraction: float) -> np.ndarray:
    """Mask of the ``fraction`` highest ``values`` inside ``where``."""
    if fraction <= 0 or not where.any():
        return np.zeros_like(where)
    if fraction >= 1:
        return where.copy()
    threshold = np.quantile(values[where], 1.0 - fraction)
    return where & (values > threshold)


def _tissue_mask(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Irregular tissue islands covering roughly 35-55 % of the slide."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cy, cx = h * rng.uniform(0.42, 0.58), w * rng.uniform(0.42, 0.58)
    envelope = 1.0 - (((yy - cy) / (0.48 * h)) ** 2 + ((xx - cx) / (0.46 * w)) ** 2)
    field_ = envelope + 0.55 * smooth_noise(rng, shape, sigma=min(h, w) / 10)
    field_ += 0.15 * smooth_noise(rng, shape, sigma=min(h, w) / 40)
    margin = np.zeros(shape, dtype=bool)
    edge = max(2, min(h, w) // 25)
    margin[edge:-edge, edge:-edge] = True
    tissue = _top_fraction(field_, margin, rng.uniform(0.35, 0.55))
    # Keep solid islands: fill pinholes, drop crumbs.
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
    closed = cv2.morphologyEx(tissue.astype(np.uint8), cv2.MORPH_CLOSE, kernel)
    tissue_u8 = np.asarray(cv2.morphologyEx(closed, cv2.MORPH_OPEN, kernel), dtype=np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(tissue_u8, connectivity=8)
    keep = np.zeros(count, dtype=bool)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= max(30, tissue_u8.sum() // 200)
    return keep[labels]


def _draw_pen(
    rng: np.random.Generator, layout: SlideLayout, tissue: np.ndarray, scale: float
) -> None:
    """Pen strokes: circles around tissue and short annotation strokes."""
    h, w = tissue.shape
    strokes = rng.integers(1, 4)
    ink = np.zeros((h, w), dtype=np.float32)
    colour = np.zeros((h, w), dtype=np.uint8)
    ys, xs = np.nonzero(tissue)
    for _ in range(strokes):
        pen = int(rng.integers(PEN_GREEN, PEN_BLACK + 1))
        canvas = np.zeros((h, w), dtype=np.uint8)
        # Marker lines are ~0.3-0.6 mm wide; on very small slides keep them thin.
        thickness = max(1, round(min(rng.uniform(0.3, 0.6) * scale, 0.03 * min(h, w))))
        if rng.random() < 0.5 and len(xs):
            # An arc circling part of the tissue, as pathologists mark tumour areas.
            i = int(rng.integers(len(xs)))
            centre = (int(xs[i]), int(ys[i]))
            axes = (int(rng.uniform(0.08, 0.2) * w), int(rng.uniform(0.08, 0.2) * h))
            start = float(rng.uniform(0, 360))
            cv2.ellipse(
                canvas,
                centre,
                axes,
                float(rng.uniform(0, 180)),
                start,
                start + float(rng.uniform(90, 300)),
                255,
                thickness,
                cv2.LINE_AA,
            )
        else:
            # A short stroke or tick on the glass or the tissue edge.
            x0, y0 = int(rng.uniform(0.05, 0.95) * w), int(rng.uniform(0.05, 0.95) * h)
            points = [(x0, y0)]
            for _ in range(int(rng.integers(2, 5))):
                x0 += int(rng.normal(0, 0.06 * w))
                y0 += int(rng.normal(0, 0.06 * h))
                points.append((x0, y0))
            cv2.polylines(
                canvas, [np.array(points, dtype=np.int32)], False, 255, thickness, cv2.LINE_AA
            )
        stroke = canvas.astype(np.float32) / 255.0
        newer = stroke > ink
        colour[newer & (stroke > 0.05)] = pen
        ink = np.maximum(ink, stroke)
    layout.pen = np.where(ink > 0.05, colour, PEN_NONE).astype(np.uint8)
    layout.pen_strength = (ink * rng.uniform(0.7, 1.0)).astype(np.float32)


def _blob(
    rng: np.random.Generator, shape: tuple[int, int], where: np.ndarray, radius: float
) -> np.ndarray:
    """A soft irregular blob centred on a random pixel of ``where``; 0-1 weights."""
    h, w = shape
    ys, xs = np.nonzero(where)
    if not len(xs):
        return np.zeros(shape, dtype=np.float32)
    i = int(rng.integers(len(xs)))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    dx, dy = xx - xs[i], yy - ys[i]
    u = (dx * np.cos(angle) + dy * np.sin(angle)) / radius
    v = (-dx * np.sin(angle) + dy * np.cos(angle)) / (radius * rng.uniform(0.25, 0.7))
    d = u**2 + v**2 + 0.3 * smooth_noise(rng, shape, sigma=radius / 3)
    return np.clip(1.2 - d, 0.0, 1.0).astype(np.float32)


def build_layout(
    rng: np.random.Generator,
    width_px: int,
    height_px: int,
    *,
    downsample: int,
    mpp: float,
    tumour_fraction: float,
    necrosis_fraction: float,
    gland_fraction: float,
    fat_fraction: float,
    solid_fraction: float = 1.0,
    lobule_fraction: float = 0.12,
    artifacts: bool = True,
) -> SlideLayout:
    """Draw the layout of one slide.

    Args:
        rng: The slide's random generator.
        width_px: Level-0 width.
        height_px: Level-0 height.
        downsample: Level-0 px per layout px.
        mpp: Level-0 microns per pixel.
        tumour_fraction: Share of the tissue that is tumour (0 for a normal slide).
        necrosis_fraction: Share of the tumour that is necrotic.
        gland_fraction: Share of the tumour area forming tubules.
        fat_fraction: Share of the non-tumour tissue that is fat.
        solid_fraction: Share of the viable tumour growing as solid sheets; the rest
            is broken into nests and cords by strands of intratumoral stroma.
        lobule_fraction: Share of the non-tumour tissue that is normal lobules.
        artifacts: Draw pen marks, blur, folds and dust.

    Returns:
        The layout.
    """
    h = max(8, -(-height_px // downsample))
    w = max(8, -(-width_px // downsample))
    shape = (h, w)
    um_per_layout_px = mpp * downsample
    tissue = _tissue_mask(rng, shape)
    region = np.where(tissue, STROMA, BACKGROUND).astype(np.uint8)

    tumour = np.zeros(shape, dtype=bool)
    if tumour_fraction > 0:
        # A few tumour foci among normal tissue; their size sets the fraction.
        weight = np.zeros(shape, dtype=np.float32)
        for _ in range(int(rng.integers(1, 4))):
            weight = np.maximum(weight, _blob(rng, shape, tissue, radius=min(h, w) / 4))
        weight += 0.25 * smooth_noise(rng, shape, sigma=min(h, w) / 30)
        tumour = _top_fraction(weight, tissue, tumour_fraction)
        region[tumour] = TUMOUR
        # Nests and cords: stroma strands run through the non-solid part of the tumour.
        strands = smooth_noise(rng, shape, sigma=max(1.0, 40.0 / um_per_layout_px))
        nest_stroma = _top_fraction(-np.abs(strands), tumour, 0.45 * (1.0 - solid_fraction))
        region[nest_stroma] = STROMA
        if necrosis_fraction > 0:
            # Necrosis sits in the middle of tumour sheets.
            depth = np.asarray(
                cv2.distanceTransform(tumour.astype(np.uint8), cv2.DIST_L2, 5), dtype=np.float64
            )
            wobble = smooth_noise(rng, shape, sigma=3) * max(1.0, float(depth.max()) / 6)
            inner = depth + 0.8 * wobble
            viable = tumour & ~nest_stroma
            region[_top_fraction(inner, viable, necrosis_fraction)] = NECROSIS

    rest = tissue & ~tumour
    fat_field = smooth_noise(rng, shape, sigma=min(h, w) / 18)
    fat = _top_fraction(fat_field, rest, fat_fraction)
    region[fat] = FAT
    lobule_field = smooth_noise(rng, shape, sigma=max(2.0, 150.0 / um_per_layout_px))
    share = lobule_fraction / max(1e-6, 1.0 - fat_fraction)
    lobules = _top_fraction(lobule_field, rest & ~fat, min(1.0, share))
    region[lobules] = LOBULE

    tumour_distance = cv2.distanceTransform((~tumour).astype(np.uint8), cv2.DIST_L2, 5)
    reach = 400.0 / um_per_layout_px  # lymphocytes gather within ~0.4 mm of tumour
    proximity = np.exp(-tumour_distance / max(reach, 1.0)).astype(np.float32)
    proximity[tumour] = 1.0

    fiber_angle = (np.pi * (0.5 + 0.35 * smooth_noise(rng, shape, sigma=min(h, w) / 12))).astype(
        np.float32
    )
    zeros = np.zeros(shape, dtype=np.float32)
    layout = SlideLayout(
        tumour_bed=tumour,
        width_px=width_px,
        height_px=height_px,
        downsample=downsample,
        region=region,
        tumour_proximity=proximity,
        fiber_angle=fiber_angle,
        pen=np.zeros(shape, dtype=np.uint8),
        pen_strength=zeros.copy(),
        blur=zeros.copy(),
        fold=zeros.copy(),
        dust=zeros.copy(),
    )
    layout.glands = _place_glands(rng, layout, mpp, gland_fraction)
    if artifacts:
        scale = 1000.0 / um_per_layout_px  # layout px per mm
        if rng.random() < 0.7:
            _draw_pen(rng, layout, tissue, scale)
        if rng.random() < 0.6:
            size = min(rng.uniform(0.5, 1.2) * scale, 0.15 * min(h, w))
            layout.blur = _blob(rng, shape, tissue, radius=size)
        if rng.random() < 0.5:
            size = min(rng.uniform(0.6, 1.5) * scale, 0.15 * min(h, w))
            fold = _blob(rng, shape, tissue, radius=size)
            layout.fold = np.where(tissue, (fold > 0.35) * np.clip(fold * 2, 0, 1), 0).astype(
                np.float32
            )
        specks = (rng.random(shape) < 0.0004).astype(np.float32)
        dust = np.clip(cv2.GaussianBlur(specks, (0, 0), 0.7) * 4, 0, 1)
        layout.dust = np.where(dust > 0.05, dust, 0).astype(np.float32)
    return layout


def _place_glands(
    rng: np.random.Generator, layout: SlideLayout, mpp: float, gland_fraction: float
) -> list[Gland]:
    """Ducts in lobules and tubules in tumour, as discs that do not overlap much."""
    glands: list[Gland] = []
    ds = layout.downsample
    for region_code, tumour, fill, radius_um in (
        (LOBULE, False, 0.45, (25.0, 55.0)),
        (TUMOUR, True, gland_fraction * 0.6, (15.0, 40.0)),
    ):
        ys, xs = np.nonzero(layout.region == region_code)
        if not len(xs) or fill <= 0:
            continue
        area_px = len(xs) * (ds**2)
        mean_r_px = np.mean(radius_um) / mpp
        count = int(fill * area_px / (np.pi * mean_r_px**2))
        count = min(count, 200_000)
        picks = rng.integers(0, len(xs), size=count)
        jitter = rng.uniform(0, ds, size=(count, 2))
        radii = rng.uniform(*radius_um, size=count) / mpp
        order = np.argsort(-radii)
        # Greedy thinning on a coarse grid keeps glands from piling up.
        occupied: dict[tuple[int, int], list[int]] = {}
        cell = 2 * radius_um[1] / mpp
        for k in order:
            x = xs[picks[k]] * ds + jitter[k, 0]
            y = ys[picks[k]] * ds + jitter[k, 1]
            r = radii[k]
            key = (int(x // cell), int(y // cell))
            clash = False
            for gx in (key[0] - 1, key[0], key[0] + 1):
                for gy in (key[1] - 1, key[1], key[1] + 1):
                    for j in occupied.get((gx, gy), ()):
                        other = glands[j]
                        if (other.x_px - x) ** 2 + (other.y_px - y) ** 2 < (
                            0.95 * (other.radius_px + r)
                        ) ** 2:
                            clash = True
                            break
            if clash:
                continue
            occupied.setdefault(key, []).append(len(glands))
            glands.append(
                Gland(
                    x_px=float(x),
                    y_px=float(y),
                    radius_px=float(r),
                    lumen_ratio=float(
                        rng.uniform(0.35, 0.6) if not tumour else rng.uniform(0.2, 0.5)
                    ),
                    tumour=tumour,
                    phase=float(rng.uniform(0, 2 * np.pi)),
                )
            )
    return glands
