"""Pictures of a generated slide and its ground truth, for people to look at.

``python -m services.synth.preview COHORT OUT [--slide SLIDE_ID]`` writes
``synth-thumbnail.png`` (the slide, and its masks drawn over it) and
``synth-crop-40x.png`` (a 40x crop read through OpenSlide, and its nuclei outlined by
type). The README's pictures are made this way.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import cv2
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import openslide
import tifffile
from matplotlib.patches import Patch

from services.common.errors import InvalidInput
from services.common.vocabulary import BIOMARKERS

TYPE_COLOURS = {
    "tumour": "#ffdd00",
    "lymphocyte": "#00e5ff",
    "stromal": "#7cff4d",
    "epithelial": "#ff7b00",
    "karyorrhexis": "#ff1744",
}
MASK_COLOURS = {"tumour.png": "#000000", "pen.png": "#d50000", "blur.png": "#2962ff"}


def _pick_slide(cohort: Path, slide_id: str | None) -> dict[str, str]:
    with (cohort / "manifest.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    if slide_id is not None:
        rows = [row for row in rows if row["slide_id"] == slide_id]
    else:
        rows = [row for row in rows if row["kind"] == "cancer"] or rows
    if not rows:
        raise InvalidInput(f"no slide {slide_id!r} in {cohort / 'manifest.csv'}")
    return rows[0]


def _read_mask(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise InvalidInput(f"cannot read the mask {path}")
    return np.asarray(image) > 0


def _outline(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    big = cv2.resize(mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)
    return cv2.morphologyEx(big, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)) > 0


def write_thumbnail_figure(cohort: Path, row: dict[str, str], out: Path) -> Path:
    """The slide's thumbnail beside the same with tumour, pen and blur masks outlined."""
    slide = openslide.OpenSlide(str(cohort / row["slide_path"]))
    thumb = np.asarray(slide.get_thumbnail((1200, 1200)).convert("RGB"))
    truth = cohort / "truth" / row["slide_id"]
    overlay = thumb.copy()
    size = (thumb.shape[1], thumb.shape[0])
    for name, colour in MASK_COLOURS.items():
        mask = _read_mask(truth / name)
        edge = cv2.dilate(_outline(mask, size).astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
        overlay[edge] = np.array(matplotlib.colors.to_rgb(colour)) * 255
    figure, axes = plt.subplots(1, 2, figsize=(14, 5.6), dpi=110)
    labels = {key: row[key] for key in BIOMARKERS}
    width, height = slide.dimensions
    axes[0].imshow(thumb)
    axes[0].set_title(
        f"{row['slide_id']} ({row['kind']}, site {row['site']}), {width}x{height} px at 0.25 µm/px"
    )
    axes[1].imshow(overlay)
    axes[1].set_title("ground truth: " + ", ".join(f"{k}={v}" for k, v in labels.items()))
    axes[1].legend(
        handles=[
            Patch(edgecolor=c, facecolor="none", label=n.removesuffix(".png"))
            for n, c in MASK_COLOURS.items()
        ],
        loc="lower right",
    )
    for axis in axes:
        axis.set_axis_off()
    figure.tight_layout()
    path = out / "synth-thumbnail.png"
    figure.savefig(path)
    plt.close(figure)
    slide.close()
    return path


def write_crop_figure(cohort: Path, row: dict[str, str], out: Path) -> Path:
    """A 40x crop read through OpenSlide beside its nuclei outlined by type."""
    truth = cohort / "truth" / row["slide_id"]
    meta = json.loads((truth / "masks.json").read_text())
    crops = sorted(meta["nuclei_crops"], key=lambda crop: -crop["nuclei"])
    if not crops:
        raise InvalidInput(f"slide {row['slide_id']} has no nucleus ground truth crops")
    crop = crops[0]
    slide = openslide.OpenSlide(str(cohort / row["slide_path"]))
    size = crop["size_px"]
    image = np.asarray(slide.read_region((crop["x"], crop["y"]), 0, (size, size)).convert("RGB"))
    labels = tifffile.imread(truth / "nuclei" / f"{crop['name']}_labels.tif")
    with (truth / "nuclei" / f"{crop['name']}.csv").open() as handle:
        kinds = {int(r["label"]): r["type"] for r in csv.DictReader(handle)}
    overlay = image.copy()
    edges = cv2.morphologyEx(labels.astype(np.float32), cv2.MORPH_GRADIENT, np.ones((3, 3))) > 0
    for label, kind in kinds.items():
        overlay[edges & (labels == label)] = (
            np.array(matplotlib.colors.to_rgb(TYPE_COLOURS[kind])) * 255
        )
    figure, axes = plt.subplots(1, 2, figsize=(13, 6.8), dpi=110)
    axes[0].imshow(image)
    axes[0].set_title(f"40x crop at ({crop['x']}, {crop['y']}), {size}x{size} px = 128 µm")
    axes[1].imshow(overlay)
    axes[1].set_title(f"{len(kinds)} nuclei, instance labels outlined by type")
    axes[1].legend(
        handles=[Patch(color=c, label=k) for k, c in TYPE_COLOURS.items()],
        loc="lower right",
        fontsize=8,
    )
    for axis in axes:
        axis.set_axis_off()
    figure.tight_layout()
    path = out / "synth-crop-40x.png"
    figure.savefig(path)
    plt.close(figure)
    slide.close()
    return path


def main(argv: list[str] | None = None) -> None:
    """Write the two preview figures for one slide of a generated cohort."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("cohort", type=Path, help="folder written by `histomarker synth`")
    parser.add_argument("out", type=Path, help="folder for the PNG files")
    parser.add_argument("--slide", help="slide id (default: the first cancer slide)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    row = _pick_slide(args.cohort, args.slide)
    print(write_thumbnail_figure(args.cohort, row, args.out))
    print(write_crop_figure(args.cohort, row, args.out))


if __name__ == "__main__":
    main()
