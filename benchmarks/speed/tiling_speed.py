"""Whole tiling pipeline vs raw OpenSlide reads, and peak memory, on synthetic slides.

For a slide it measures, in child processes pinned to one core:
- raw: OpenSlide ``read_region`` of every grid patch (512 px at 20x, level 1), nothing else;
- pipeline: ``tile_slide`` end to end (masks, grid, slide stains, Vahadane
  normalization to a reference, JPEG encoding, shards, grid table) on the same slide;
and reports patches/s of both, their ratio (target >= 50%) and each child's peak RSS.

    .venv/bin/python benchmarks/speed/tiling_speed.py [--preset small] [--preset standard]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

SETUP = r"""
import json, os, sys, time
from pathlib import Path
os.sched_setaffinity(0, {0})
mode, slide, grid_path, out = sys.argv[1:5]


def peak_rss_mb():
    # VmHWM is this process's own peak; ru_maxrss would include the parent's at exec.
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
"""

RAW = (
    SETUP
    + r"""
import openslide, pandas as pd
grid = pd.read_parquet(grid_path)
s = openslide.OpenSlide(slide)
start = time.perf_counter()
for row in grid.itertuples():
    s.read_region((int(row.x), int(row.y)), 1, (512, 512)).convert("RGB")
elapsed = time.perf_counter() - start
print(json.dumps({"patches": len(grid), "seconds": elapsed, "rss_mb": peak_rss_mb()}))
"""
)

PIPELINE = (
    SETUP
    + r"""
from services.common.objectstore import open_store
from services.tiling.pipeline import TileParams, tile_slide
from services.slide.reader import open_slide
from services.slide.stain import get_normalizer
with open_slide(slide) as reader:
    reference = get_normalizer("vahadane").fit(reader.read_region(0, 0, 1, 2048, 2048)).target
    store = open_store(Path(out).as_uri())
    start = time.perf_counter()
    result = tile_slide(reader, "bench", store, "t", TileParams(), reference)
    elapsed = time.perf_counter() - start
print(json.dumps({"patches": result.patch_count, "seconds": elapsed, "rss_mb": peak_rss_mb()}))
"""
)


def _child(code: str, *args: str, cwd: Path) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=cwd, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", action="append", default=None)
    args = parser.parse_args()
    presets = args.preset or ["small"]
    root = Path(__file__).resolve().parents[2]
    sys.path.insert(0, str(root))
    from services.common.objectstore import open_store
    from services.slide.reader import open_slide
    from services.synth.cohort import generate_cohort
    from services.tiling.pipeline import tile_slide

    print(
        "| preset | patches | raw OpenSlide patches/s | pipeline patches/s | ratio "
        "| raw peak RSS MB | pipeline peak RSS MB |"
    )
    print("|---|---|---|---|---|---|---|")
    for preset in presets:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            # One slide: a cohort of one is a cancer slide.
            generate_cohort(work / "c", 1, 1, preset, truth_crops=0)
            slide = next((work / "c" / "slides").glob("*-01Z-*.tiff"))
            # The grid (same patches for both sides) from an unnormalized run.
            store = open_store((work / "grid").as_uri())
            with open_slide(slide) as reader:
                tile_slide(reader, "grid", store, "g")
            grid_path = work / "grid" / "g" / "grid.parquet"
            raw = _child(RAW, "raw", str(slide), str(grid_path), "", cwd=root)
            full = _child(
                PIPELINE, "pipeline", str(slide), str(grid_path), str(work / "out"), cwd=root
            )
            raw_rate = raw["patches"] / raw["seconds"]
            full_rate = full["patches"] / full["seconds"]
            print(
                f"| {preset} | {full['patches']} | {raw_rate:.1f} | {full_rate:.1f} | "
                f"{full_rate / raw_rate:.0%} | {raw['rss_mb']:.0f} | {full['rss_mb']:.0f} |"
            )


if __name__ == "__main__":
    main()
