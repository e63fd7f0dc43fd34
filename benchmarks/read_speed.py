"""Region-read speed: OpenSlide vs the tifffile fast path of services.tiling.reader.

Reads the same 512x512 regions at level 1 (20x from a 40x slide) at random tissue
positions of a small-preset synthetic slide with both backends, in this process
pinned to one CPU core, and prints patches per second. Each backend reads the
list once to warm up, then is timed over ``--repeats`` passes. Run:

    .venv/bin/python benchmarks/read_speed.py [--patches 300] [--slide PATH]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PATCH_PX = 512
LEVEL = 1


def tissue_positions(path: Path, count: int, seed: int) -> list[tuple[int, int]]:
    """Level-0 (x, y) of level-1 patches whose centre lies on tissue."""
    from services.tiling.reader import open_slide

    with open_slide(path) as reader:
        thumb_level = reader.level_count - 1
        thumb = reader.read_level(thumb_level).astype(np.int16)
        downsample = reader.level_downsamples[thumb_level]
        width0, height0 = reader.dimensions
    # Tissue: not near-white and somewhat coloured (H&E).
    tissue = (thumb.min(axis=2) < 215) & (np.ptp(thumb, axis=2) > 15)
    rows, cols = np.nonzero(tissue)
    if rows.size == 0:
        raise SystemExit("no tissue found on the slide")
    rng = np.random.default_rng(seed)
    footprint0 = PATCH_PX * 2**LEVEL
    picks = rng.integers(0, rows.size, count)
    positions = []
    for pick in picks:
        x = int(cols[pick] * downsample) - footprint0 // 2
        y = int(rows[pick] * downsample) - footprint0 // 2
        # Level-aligned, inside the slide.
        x = min(max(x, 0), width0 - footprint0) // 2**LEVEL * 2**LEVEL
        y = min(max(y, 0), height0 - footprint0) // 2**LEVEL * 2**LEVEL
        positions.append((x, y))
    return positions


def time_backend(
    path: Path, backend: str, positions: list[tuple[int, int]], repeats: int
) -> tuple[float, list[np.ndarray]]:
    """Patches per second over ``repeats`` passes, and the first pass's patches."""
    from services.tiling.reader import open_slide

    with open_slide(path, backend=backend) as reader:
        patches = [reader.read_region(x, y, LEVEL, PATCH_PX, PATCH_PX) for x, y in positions]
        started = time.perf_counter()
        for _ in range(repeats):
            for x, y in positions:
                reader.read_region(x, y, LEVEL, PATCH_PX, PATCH_PX)
        elapsed = time.perf_counter() - started
    return repeats * len(positions) / elapsed, patches


def run(path: Path, count: int, repeats: int, seed: int) -> None:
    positions = tissue_positions(path, count, seed)
    rates: dict[str, float] = {}
    patches: dict[str, list[np.ndarray]] = {}
    for backend in ("openslide", "tifffile"):
        rates[backend], patches[backend] = time_backend(path, backend, positions, repeats)
    diffs = [
        np.abs(a.astype(np.int16) - b.astype(np.int16))
        for a, b in zip(patches["openslide"], patches["tifffile"], strict=True)
    ]
    max_diff = max(int(d.max()) for d in diffs)
    mean_diff = float(np.mean([d.mean() for d in diffs]))
    print(f"slide {path.name}, {len(positions)} patches x {repeats} passes, one core")
    print("| backend | patches/s | speed-up | max abs diff | mean abs diff |")
    print("|---|---|---|---|---|")
    base = rates["openslide"]
    for backend, rate in rates.items():
        diff_max, diff_mean = (max_diff, mean_diff) if backend == "tifffile" else (0, 0.0)
        print(f"| {backend} | {rate:.1f} | {rate / base:.2f}x | {diff_max} | {diff_mean:.4f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--patches", type=int, default=300, help="distinct tissue patches")
    parser.add_argument("--repeats", type=int, default=2, help="timed passes over them")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--core", type=int, default=0, help="CPU core to pin to")
    parser.add_argument("--slide", type=Path, help="an existing slide (else a small synth one)")
    args = parser.parse_args()
    os.sched_setaffinity(0, {args.core})
    if args.slide is not None:
        run(args.slide, args.patches, args.repeats, args.seed)
        return
    from services.synth.cohort import generate_cohort

    with tempfile.TemporaryDirectory() as tmp:
        generate_cohort(tmp, 1, 0, "small")
        (slide,) = sorted((Path(tmp) / "slides").glob("*.tiff"))
        run(slide, args.patches, args.repeats, args.seed)


if __name__ == "__main__":
    main()
