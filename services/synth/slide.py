"""One synthetic slide: the pyramidal TIFF and its ground truth.

For a :class:`~services.synth.labels.SlideSpec` this draws the layout, renders level 0
tile by tile straight into the pyramid writer (memory stays bounded whatever the
size) and writes the ground truth beside it:

```
truth/{slide_id}/masks.json        downsample, sizes, mpp, file names, region codes
truth/{slide_id}/tissue.png        tissue mask (255 = tissue) at the layout downsample
truth/{slide_id}/tumour.png        tumour bed (tumour, intratumoral stroma, necrosis)
truth/{slide_id}/regions.png       region code per pixel (see layout.REGION_NAMES)
truth/{slide_id}/pen.png           pen ink colour code per pixel (layout.PEN_NAMES)
truth/{slide_id}/blur.png, fold.png, dust.png   artifact masks (255 = affected)
truth/{slide_id}/nuclei/{name}.png              40x crops (RGB) ...
truth/{slide_id}/nuclei/{name}_labels.tif       ... their nucleus instance labels
truth/{slide_id}/nuclei/{name}.csv              ... and one row per nucleus
```
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import tifffile

from services.common.errors import InvalidInput
from services.synth.labels import SlideSpec
from services.synth.layout import (
    PEN_NAMES,
    REGION_NAMES,
    SlideLayout,
    build_layout,
    smooth_noise,
)
from services.synth.nuclei import NUCLEUS_TYPE_NAMES, NucleusField, NucleusParams
from services.synth.pyramid import PyramidSpec, write_pyramid
from services.synth.render import Stain, TileRenderer
from services.synth.textures import TextureAtlas

#: Level-0 sizes (width, height) of the presets, px at 0.25 µm/px (40x).
PRESETS: dict[str, tuple[int, int]] = {
    "tiny": (4096, 3072),
    "demo": (8192, 6144),
    "small": (12288, 8192),
    "standard": (40960, 30720),
}
#: Level-0 resolution of every synthetic slide, µm/px (40x).
MPP = 0.25
#: Least usable tissue, mm², for QC of the synthetic slides (``HISTOMARKER_QC_MIN_USABLE_MM2``
#: of the demo's and the tests' services): a ``tiny`` slide (1.0 x 0.77 mm) holds 0.3-0.4
#: mm² of tissue, under a real slide's floor (``QcThresholds.min_usable_mm2``, 0.5).
QC_MIN_USABLE_MM2 = 0.05
#: Level-0 px per layout (ground-truth mask) px.
LAYOUT_DOWNSAMPLE = 32
#: Side of rendered tiles and TIFF tiles, px.
TILE_PX = 512
#: Side of the 40x crops with nucleus ground truth, px.
TRUTH_CROP_PX = 512


@dataclass(frozen=True)
class SlideFiles:
    """Where one generated slide and its ground truth are (relative to the cohort)."""

    slide: str
    masks: str
    tissue_mask: str
    tumour_mask: str
    nuclei_dir: str


def preset_size(preset: str) -> tuple[int, int]:
    """Level-0 (width, height) of a preset, or InvalidInput naming the presets."""
    try:
        return PRESETS[preset]
    except KeyError:
        names = ", ".join(PRESETS)
        raise InvalidInput(f"unknown preset {preset!r}; use one of: {names}") from None


class SyntheticSlide:
    """Everything needed to render one slide, built from its spec.

    Args:
        spec: The slide's labels, morphology, site and seed.
        width_px: Level-0 width.
        height_px: Level-0 height.
    """

    def __init__(self, spec: SlideSpec, width_px: int, height_px: int) -> None:
        self.spec = spec
        self.width_px = width_px
        self.height_px = height_px
        m = spec.morphology
        rng = np.random.default_rng([spec.seed, 1])
        self.layout: SlideLayout = build_layout(
            rng,
            width_px,
            height_px,
            downsample=LAYOUT_DOWNSAMPLE,
            mpp=MPP,
            tumour_fraction=m.tumour_fraction,
            necrosis_fraction=m.necrosis_fraction,
            gland_fraction=m.gland_fraction,
            solid_fraction=m.solid_fraction,
            fat_fraction=m.fat_fraction,
            lobule_fraction=m.normal_epithelium_fraction,
        )
        atlas = TextureAtlas.create(np.random.default_rng([spec.seed, 2]), MPP, 2 * TILE_PX)
        immune_patch = np.exp(
            0.6 * smooth_noise(np.random.default_rng([spec.seed, 3]), self.layout.region.shape, 3)
        ).astype(np.float32)
        params = NucleusParams(
            mpp=MPP,
            tumour_major_um=m.tumour_nucleus_major_um,
            tumour_axis_ratio=m.tumour_nucleus_axis_ratio,
            tumour_cv=m.tumour_nucleus_cv,
            tumour_nucleolus=m.tumour_nucleolus_fraction,
            tumour_density_per_mm2=m.tumour_density_per_mm2,
            lymphocyte_density_per_mm2=m.lymphocyte_density_per_mm2,
            tumour_lymphocyte_share=m.tumour_lymphocyte_share,
            karyorrhexis_rate=m.karyorrhexis_rate,
            epithelial_major_um=m.normal_nucleus_major_um,
        )
        self.nuclei = NucleusField(self.layout, params, spec.seed, immune_patch)
        site = spec.site
        stain = Stain(
            hematoxylin=site.hematoxylin_od,
            eosin=site.eosin_od,
            h_scale=site.h_strength * m.hematoxylin_scale,
            e_scale=site.e_strength * m.eosin_scale,
            background_rgb=site.background_rgb,
        )
        self.renderer = TileRenderer(self.layout, atlas, self.nuclei, stain, spec.seed)

    def tiles(self, progress: Callable[[int, int], None] | None = None) -> Iterator[np.ndarray]:
        """Level-0 tiles of ``TILE_PX`` in row-major order, edge tiles padded."""
        cols = -(-self.width_px // TILE_PX)
        rows = -(-self.height_px // TILE_PX)
        total = rows * cols
        for row in range(rows):
            for col in range(cols):
                yield self.renderer.render(col * TILE_PX, row * TILE_PX, TILE_PX, TILE_PX).rgb
                if progress is not None:
                    progress(row * cols + col + 1, total)

    def truth_crop_origins(self, count: int) -> list[tuple[int, int]]:
        """Level-0 origins of the crops that get nucleus ground truth.

        Half in tumour (when there is tumour), the rest anywhere in tissue; origins are
        multiples of the layout downsample and crops lie inside the slide.
        """
        rng = np.random.default_rng([self.spec.seed, 4])
        layout = self.layout
        ds = layout.downsample
        half = TRUTH_CROP_PX // ds // 2
        # Origins (in layout px) whose crop lies inside the slide, judged by the
        # layout pixel at the crop's centre.
        rows = max(1, (self.height_px - TRUTH_CROP_PX) // ds + 1)
        cols = max(1, (self.width_px - TRUTH_CROP_PX) // ds + 1)
        centre = (slice(half, half + rows), slice(half, half + cols))
        origins: list[tuple[int, int]] = []
        for pool, wanted in (
            (layout.tumour[centre], (count + 1) // 2),
            (layout.tissue[centre], count),
        ):
            ys, xs = np.nonzero(pool)
            order = rng.permutation(len(xs))
            for i in order:
                if len(origins) >= wanted:
                    break
                origin = (int(xs[i]) * ds, int(ys[i]) * ds)
                far = all(
                    abs(origin[0] - ox) >= TRUTH_CROP_PX or abs(origin[1] - oy) >= TRUTH_CROP_PX
                    for ox, oy in origins
                )
                if far:
                    origins.append(origin)
        return origins[:count]


def _write_png(path: Path, image: np.ndarray) -> None:
    """Write a PNG atomically (temp file in the same folder, then rename)."""
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, encoded = cv2.imencode(".png", image)
    if not ok:
        raise RuntimeError(f"cannot encode {path.name}")
    _write_bytes(path, encoded.tobytes())


def _write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _write_truth_masks(slide: SyntheticSlide, folder: Path) -> dict[str, Any]:
    layout = slide.layout
    masks = {
        "tissue.png": layout.tissue,
        "tumour.png": layout.tumour,
        "blur.png": layout.blur > 0.05,
        "fold.png": layout.fold > 0.05,
        "dust.png": layout.dust > 0.05,
    }
    for name, mask in masks.items():
        _write_png(folder / name, np.where(mask, 255, 0).astype(np.uint8))
    _write_png(folder / "regions.png", layout.region)
    _write_png(folder / "pen.png", layout.pen)
    return {
        "downsample": layout.downsample,
        "mask_size_px": [int(layout.region.shape[1]), int(layout.region.shape[0])],
        "level0_size_px": [slide.width_px, slide.height_px],
        "mpp": MPP,
        "masks": sorted([*masks, "regions.png", "pen.png"]),
        "region_codes": dict(enumerate(REGION_NAMES)),
        "pen_codes": dict(enumerate(PEN_NAMES)),
        "tissue_fraction": round(float(layout.tissue.mean()), 6),
        "pen_fraction": round(float((layout.pen > 0).mean()), 6),
    }


def _write_nuclei_truth(slide: SyntheticSlide, folder: Path, count: int) -> list[dict[str, Any]]:
    folder.mkdir(parents=True, exist_ok=True)
    crops = []
    for x0, y0 in slide.truth_crop_origins(count):
        tile = slide.renderer.render(x0, y0, TRUTH_CROP_PX, TRUTH_CROP_PX, with_labels=True)
        assert tile.labels is not None
        name = f"x{x0:06d}_y{y0:06d}"
        labels = tile.labels
        present = np.unique(labels)
        present = present[present > 0]
        # Renumber 1..n in the order of the nucleus table, dropping nuclei hidden
        # behind others or outside the crop.
        lookup = np.zeros(int(labels.max()) + 1, dtype=np.uint32)
        lookup[present] = np.arange(1, len(present) + 1, dtype=np.uint32)
        _write_png(folder / f"{name}.png", tile.rgb)
        tmp = folder / f".{name}_labels.tif.tmp"
        tifffile.imwrite(tmp, lookup[labels], compression="zlib", metadata=None)
        os.replace(tmp, folder / f"{name}_labels.tif")
        n = tile.nuclei
        rows = ["label,type,x_px,y_px,major_um,minor_um,angle_deg,area_px"]
        areas = np.bincount(labels.ravel(), minlength=int(labels.max()) + 1)
        for new_label, old in enumerate(present, start=1):
            i = int(old) - 1
            rows.append(
                f"{new_label},{NUCLEUS_TYPE_NAMES[int(n.kind[i])]},"
                f"{n.x[i] - x0:.2f},{n.y[i] - y0:.2f},{n.major[i] * MPP:.3f},"
                f"{n.minor[i] * MPP:.3f},{float(n.angle[i]) % 180:.2f},{int(areas[old])}"
            )
        _write_bytes(folder / f"{name}.csv", ("\n".join(rows) + "\n").encode())
        crops.append(
            {"name": name, "x": x0, "y": y0, "size_px": TRUTH_CROP_PX, "nuclei": len(present)}
        )
    return crops


def generate_slide(
    spec: SlideSpec,
    out_dir: Path,
    preset: str = "tiny",
    *,
    truth_crops: int = 4,
    progress: Callable[[int, int], None] | None = None,
) -> SlideFiles:
    """Render one slide and its ground truth under ``out_dir``.

    Args:
        spec: The slide to make.
        out_dir: The cohort folder (``slides/`` and ``truth/`` are made in it).
        preset: Size preset (``tiny``, ``small`` or ``standard``).
        truth_crops: How many 40x crops get nucleus ground truth.
        progress: Called with (tiles done, tiles in total) while level 0 renders.

    Returns:
        The files written, relative to ``out_dir``.
    """
    width, height = preset_size(preset)
    slide = SyntheticSlide(spec, width, height)
    slide_rel = f"slides/{spec.slide_id}.tiff"
    truth_rel = f"truth/{spec.slide_id}"
    truth_dir = out_dir / truth_rel
    truth_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "slides").mkdir(parents=True, exist_ok=True)

    masks = _write_truth_masks(slide, truth_dir)
    crops = _write_nuclei_truth(slide, truth_dir / "nuclei", truth_crops)
    masks["nuclei_crops"] = crops
    masks["slide"] = f"../../{slide_rel}"
    _write_bytes(truth_dir / "masks.json", json.dumps(masks, indent=1, sort_keys=True).encode())
    write_pyramid(
        out_dir / slide_rel,
        PyramidSpec(width_px=width, height_px=height, mpp=MPP, tile_px=TILE_PX),
        slide.tiles(progress),
        description=f"synthetic {spec.kind} slide {spec.slide_id} site={spec.site.code}",
    )
    return SlideFiles(
        slide=slide_rel,
        masks=f"{truth_rel}/masks.json",
        tissue_mask=f"{truth_rel}/tissue.png",
        tumour_mask=f"{truth_rel}/tumour.png",
        nuclei_dir=f"{truth_rel}/nuclei",
    )
