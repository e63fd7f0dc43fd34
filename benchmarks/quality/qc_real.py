"""Slide QC masks on real H&E: ink of each colour, a coverslip edge, and clean tissue.

Reads ``../shared/realdata`` (or ``--realdata``) and runs :func:`segment_tissue` as
the tiling does, at each image's resolution:

- **Ink** (HistoQC's pen examples, ``qc/pen/pen_{green,red,black}.png`` with
  hand-drawn ink masks; their scale is not recorded, about 10-20 µm/px, so they are
  run at ``--pen-mpp``): the share of the marked ink flagged as pen of any colour,
  of its own colour, and left in the usable mask (targets >= 90% and <= 5%).
- **Coverslip edge** (``qc/pen/coverslip_edge.png``): the share of the marked edge
  in the tissue mask (target <= 10%) and flagged as edge or ink.
- **Clean tissue** (no ink, in focus): CMU-1-Small-Region read at downsample 16
  (the tiling's mask level), the four HistoQC templates (0.5 µm/px) and the 30
  MoNuSeg tiles (0.25 µm/px, all tissue): pen and blur as shares of the tissue
  (targets <= 0.5% and <= 2%) and the tissue share of the image (>= 90% on the
  all-tissue tiles). "Blur at 1 µm/px" is the blur the services serve for a
  scanned slide: each image written as a JPEG pyramid (downsamples 1-16) and
  masked by :func:`compute_masks` at downsample 16, which judges blur again on the
  level at or finer than 1 µm/px (:func:`refine_blur`).

The rules were set on the *tuning* images only (the synthetic cohort, CMU-1,
templates 1-2 and the first 15 MoNuSeg tiles in name order, all clean); the ink and
edge examples, templates 3-4 and the last 15 MoNuSeg tiles are held out, and the
table marks which rows are which.

    .venv/bin/python benchmarks/quality/qc_real.py [--realdata ../shared/realdata]
        [--pen-mpp 16] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from services.slide.reader import open_slide
from services.slide.tissue import TissueMasks, TissueParams, compute_masks, segment_tissue
from services.synth.pyramid import write_image_pyramid

ROOT = Path(__file__).resolve().parents[2]
INKS = ("green", "red", "black")
CMU_DOWNSAMPLE = 16
TEMPLATE_MPP = 0.5
TUNING_TEMPLATES = ("template1", "template2")
TUNING_MONUSEG = 15


def _rgb(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise SystemExit(f"error: cannot read {path}")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _mask(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise SystemExit(f"error: cannot read {path}")
    return image > 0


def _share(part: np.ndarray, whole: np.ndarray) -> float:
    return float((part & whole).sum()) / max(int(whole.sum()), 1)


def ink_rows(pen_dir: Path, mpp: float) -> list[dict[str, Any]]:
    """Flagged and usable shares of each marked ink, and the coverslip edge."""
    rows = []
    for colour in INKS:
        masks = segment_tissue(_rgb(pen_dir / f"pen_{colour}.png"), 1.0, mpp)
        ink = _mask(pen_dir / f"pen_{colour}_mask.png")
        rows.append(
            {
                "example": f"pen_{colour}",
                "flagged": _share(masks.pen_any(), ink),
                "as_colour": _share(masks.pen[colour], ink),
                "usable": _share(masks.usable, ink),
                "tissue": _share(masks.tissue, ink),
            }
        )
    masks = segment_tissue(_rgb(pen_dir / "coverslip_edge.png"), 1.0, mpp)
    edge = _mask(pen_dir / "coverslip_edge_mask.png")
    rows.append(
        {
            "example": "coverslip_edge",
            "flagged": _share(masks.edge | masks.pen_any(), edge),
            "as_colour": _share(masks.edge, edge),
            "usable": _share(masks.usable, edge),
            "tissue": _share(masks.tissue, edge),
        }
    )
    return rows


def _served_blur(rgb: np.ndarray, mpp: float, scratch: Path) -> float:
    """Blur share of the tissue when ``rgb`` is scanned as a pyramid (module docstring)."""
    path = write_image_pyramid(scratch / "image.tiff", rgb, mpp).path
    with open_slide(path) as reader:
        masks = compute_masks(reader, "image", TissueParams(), 16.0)
    return _share(masks.blur, masks.tissue)


def _clean(
    name: str, masks: TissueMasks, held_out: bool, rgb: np.ndarray, mpp: float, scratch: Path
) -> dict[str, Any]:
    tissue = masks.tissue
    return {
        "served_blur": _served_blur(rgb, mpp, scratch),
        "image": name,
        "held_out": held_out,
        "tissue": float(tissue.mean()),
        "pen": _share(masks.pen_any(), tissue),
        "blur": _share(masks.blur, tissue),
        "fold": _share(masks.fold, tissue),
        "edge": _share(masks.edge, tissue),
    }


def clean_rows(realdata: Path) -> list[dict[str, Any]]:
    """Pen, blur and tissue shares on in-focus, ink-free real H&E."""
    rows = []
    slide = open_slide(realdata / "qc" / "slides" / "CMU-1-Small-Region.svs")
    try:
        level = slide.best_level_for_downsample(CMU_DOWNSAMPLE)
        full = slide.read_level(level)
        scale = float(slide.level_downsamples[level])
        mpp0 = float(slide.mpp[0])
    finally:
        slide.close()
    factor = CMU_DOWNSAMPLE / scale
    size = (round(full.shape[1] / factor), round(full.shape[0] / factor))
    thumb = cv2.resize(full, size, interpolation=cv2.INTER_AREA)
    with tempfile.TemporaryDirectory(prefix="qc-real-") as folder:
        scratch = Path(folder)
        masks = segment_tissue(thumb, CMU_DOWNSAMPLE, mpp0)
        rows.append(_clean("CMU-1-Small-Region", masks, False, full, mpp0 * scale, scratch))
        for path in sorted((realdata / "qc" / "tiles").glob("template*.png")):
            rgb = _rgb(path)
            masks = segment_tissue(rgb, 1.0, TEMPLATE_MPP)
            held = path.stem not in TUNING_TEMPLATES
            rows.append(_clean(path.stem, masks, held, rgb, TEMPLATE_MPP, scratch))
        images = sorted((realdata / "monuseg-train" / "images").glob("*.png"))
        for i, path in enumerate(images):
            rgb = _rgb(path)
            masks = segment_tissue(rgb, 1.0, 0.25)
            rows.append(_clean(path.stem, masks, i >= TUNING_MONUSEG, rgb, 0.25, scratch))
    return rows


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--realdata", type=Path, default=ROOT.parent / "shared" / "realdata")
    parser.add_argument("--pen-mpp", type=float, default=16.0, help="µm/px of the ink examples")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if not (args.realdata / "qc").is_dir():
        print(f"error: no qc/ folder in {args.realdata}", file=sys.stderr)
        return 2
    inks = ink_rows(args.realdata / "qc" / "pen", args.pen_mpp)
    clean = clean_rows(args.realdata)
    print(f"Ink and edge examples (held out), run at {args.pen_mpp:g} µm/px:\n")
    print("| example | flagged (any class) | as its own class | left usable | in tissue |")
    print("|---|---|---|---|---|")
    for row in inks:
        print(
            f"| {row['example']} | {_pct(row['flagged'])} | {_pct(row['as_colour'])} "
            f"| {_pct(row['usable'])} | {_pct(row['tissue'])} |"
        )
    print("\nClean real tissue (pen, blur, fold, edge as shares of the tissue):\n")
    print(
        "| images | n | pen (max) | blur (max) | blur at 1 µm/px (max) | fold (max) "
        "| edge (max) | tissue share (min) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    groups = {
        "CMU-1-Small-Region (tuning)": [r for r in clean if r["image"].startswith("CMU")],
        "templates 1-2 (tuning)": [r for r in clean if r["image"] in TUNING_TEMPLATES],
        "templates 3-4 (held out)": [
            r for r in clean if r["image"].startswith("template") and r["held_out"]
        ],
        f"MoNuSeg first {TUNING_MONUSEG} (tuning)": [
            r for r in clean if r["image"].startswith("TCGA") and not r["held_out"]
        ],
        "MoNuSeg last 15 (held out)": [
            r for r in clean if r["image"].startswith("TCGA") and r["held_out"]
        ],
    }
    for name, rows in groups.items():
        keys = ("pen", "blur", "served_blur", "fold", "edge")
        cells = [_pct(max(r[key] for r in rows)) for key in keys]
        least = min(r["tissue"] for r in rows)
        print(f"| {name} | {len(rows)} | " + " | ".join(cells) + f" | {_pct(least)} |")
    if args.json:
        args.json.write_text(json.dumps({"ink": inks, "clean": clean}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
