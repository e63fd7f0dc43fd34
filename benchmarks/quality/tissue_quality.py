"""Tissue and pen mask quality against the synthetic truth, one table row per seed.

For each seed a cohort of tiny slides is generated (or reused from ``--cache``), read
at downsample 8 and segmented with :func:`segment_tissue`; the masks are reduced to
the truth grid (downsample 32) by area averaging, > 0.5 = set, as in
``tests/unit/tiling/test_tissue.py``. Pen over tissue counts as not tissue. Columns:

- tissue IoU, mean and min over the slides (target mean >= 0.90, min >= 0.85);
- pen excluded: truth pen pixels (every colour, on glass or tissue) outside our
  tissue mask, pooled over the cohort (target >= 95%);
- recall per pen colour: truth pixels of that colour inside our mask of that colour;
- false pen: clean tissue (truth tissue without truth pen) flagged as pen of any
  colour, as a fraction of the truth tissue, pooled (and the worst slide);
- ms per slide of ``segment_tissue`` (median);
- blur recall: truth out-of-focus tissue flagged as blur by the masks the services
  use (blur judged again on the slide's 1 µm/px level by :func:`refine_blur`, as
  :func:`compute_masks` does), pooled;
  false blur: clean tissue (no truth blur, pen or fold) flagged as blur, pooled.

    .venv/bin/python benchmarks/quality/tissue_quality.py [--seeds 0 1 2 3 4 5] [--slides 6]
        [--cache /tmp/tissue_quality] [--per-slide]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import openslide
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from services.slide.reader import open_slide
from services.slide.tissue import (
    PEN_COLOURS,
    TissueParams,
    refine_blur,
    segment_tissue,
    sharpness_level,
)
from services.synth.cohort import MANIFEST_NAME, generate_cohort

MPP0 = 0.25
DOWNSAMPLE = 8


def read_level(path: Path, downsample: float) -> tuple[np.ndarray, float]:
    """The level nearest ``downsample``, composited on white, and its downsample."""
    slide = openslide.OpenSlide(str(path))
    try:
        level = slide.get_best_level_for_downsample(downsample + 0.5)
        rgba = slide.read_region((0, 0), level, slide.level_dimensions[level])
        white = Image.new("RGB", rgba.size, (255, 255, 255))
        white.paste(rgba, mask=rgba.split()[3])
        return np.asarray(white), float(slide.level_downsamples[level])
    finally:
        slide.close()


def read_png(path: Path) -> np.ndarray:
    """A grey PNG as a uint8 array."""
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise FileNotFoundError(path)
    return np.asarray(image, dtype=np.uint8)


def to_grid(mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Area-average ``mask`` onto a grid of ``shape``; > 0.5 = set."""
    small = cv2.resize(mask.astype(np.float32), (shape[1], shape[0]), interpolation=cv2.INTER_AREA)
    return np.asarray(small > 0.5)


def cohort(cache: Path, seed: int, n_slides: int) -> Path:
    """The cohort folder of ``seed``, generated unless the cache holds it."""
    root = cache / f"tiny-seed{seed}-n{n_slides}"
    if not (root / MANIFEST_NAME).exists():
        generate_cohort(root, n_slides=n_slides, seed=seed, preset="tiny", truth_crops=0)
    return root


def evaluate(root: Path, per_slide: bool) -> dict[str, float]:
    """Quality numbers of one cohort (see the module docstring)."""
    ious: list[float] = []
    times: list[float] = []
    pen_total = pen_excluded = tissue_total = false_pen = 0
    blur_total = blur_found = clean_total = false_blur = 0
    worst_false = 0.0
    found = dict.fromkeys(PEN_COLOURS, 0)
    total = dict.fromkeys(PEN_COLOURS, 0)
    for path in sorted((root / "slides").glob("*.tiff")):
        truth_dir = root / "truth" / path.stem
        meta = json.loads((truth_dir / "masks.json").read_text())
        tissue = read_png(truth_dir / "tissue.png") > 0
        pen = read_png(truth_dir / "pen.png")
        rgb, downsample = read_level(path, DOWNSAMPLE)
        assert meta["downsample"] == 32 and downsample == DOWNSAMPLE
        start = time.perf_counter()
        masks = segment_tissue(rgb, downsample, MPP0)
        times.append(time.perf_counter() - start)

        truth_pen = pen > 0
        truth = tissue & ~truth_pen
        ours = to_grid(masks.tissue, truth.shape)
        iou = float((ours & truth).sum() / max(int((ours | truth).sum()), 1))
        ious.append(iou)
        pen_total += int(truth_pen.sum())
        pen_excluded += int((truth_pen & ~ours).sum())
        recalls = []
        for code, name in enumerate(PEN_COLOURS, start=1):
            colour = pen == code
            hit = int((colour & to_grid(masks.pen[name], pen.shape)).sum())
            found[name] += hit
            total[name] += int(colour.sum())
            if colour.any():
                recalls.append(f"{name} {hit / colour.sum():.3f}")
        flagged = int((to_grid(masks.pen_any(), tissue.shape) & tissue & ~truth_pen).sum())
        false_pen += flagged
        tissue_total += int(tissue.sum())
        worst_false = max(worst_false, flagged / max(int(tissue.sum()), 1))

        # The served masks are these with blur judged again on the 1 µm/px level
        # (what compute_masks does after segment_tissue).
        with open_slide(path) as reader:
            level = sharpness_level(reader, masks.downsample)
            if level is not None and masks.tissue.any():
                masks = refine_blur(masks, reader, level, TissueParams())
        ours_blur = to_grid(masks.blur, tissue.shape)
        truth_blur = (read_png(truth_dir / "blur.png") > 0) & tissue
        clean = tissue & ~truth_blur & ~truth_pen & ~(read_png(truth_dir / "fold.png") > 0)
        blur_total += int(truth_blur.sum())
        blur_found += int((truth_blur & ours_blur).sum())
        clean_total += int(clean.sum())
        false_blur += int((clean & ours_blur).sum())
        if per_slide:
            excluded = (truth_pen & ~ours).sum() / max(int(truth_pen.sum()), 1)
            print(
                f"  {path.stem}: IoU {iou:.3f}, pen px {int(truth_pen.sum())}, "
                f"excluded {excluded:.3f}, {', '.join(recalls) or 'no pen'}, "
                f"false pen {flagged / max(int(tissue.sum()), 1):.4f}",
                file=sys.stderr,
            )
    row: dict[str, float] = {
        "mean_iou": float(np.mean(ious)),
        "min_iou": float(np.min(ious)),
        "pen_excluded": pen_excluded / pen_total if pen_total else float("nan"),
        "false_pen": false_pen / max(tissue_total, 1),
        "worst_false_pen": worst_false,
        "ms": 1000.0 * float(np.median(times)),
        "blur_recall": blur_found / blur_total if blur_total else float("nan"),
        "false_blur": false_blur / max(clean_total, 1),
    }
    for name in PEN_COLOURS:
        row[f"recall_{name}"] = found[name] / total[name] if total[name] else float("nan")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    parser.add_argument("--slides", type=int, default=6)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/tissue_quality"))
    parser.add_argument("--per-slide", action="store_true", help="per-slide lines on stderr")
    args = parser.parse_args()

    def pct(value: float) -> str:
        return "-" if not np.isfinite(value) else f"{100 * value:.1f}%"

    print(
        "| seed | mean IoU | min IoU | pen excluded | green recall | blue recall "
        "| black recall | false pen (worst slide) | ms / slide | blur recall | false blur |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for seed in args.seeds:
        root = cohort(args.cache, seed, args.slides)
        if args.per_slide:
            print(f"seed {seed}", file=sys.stderr)
        r = evaluate(root, args.per_slide)
        print(
            f"| {seed} | {r['mean_iou']:.3f} | {r['min_iou']:.3f} | {pct(r['pen_excluded'])} "
            f"| {pct(r['recall_green'])} | {pct(r['recall_blue'])} | {pct(r['recall_black'])} "
            f"| {pct(r['false_pen'])} ({pct(r['worst_false_pen'])}) | {r['ms']:.0f} "
            f"| {pct(r['blur_recall'])} | {pct(r['false_blur'])} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
