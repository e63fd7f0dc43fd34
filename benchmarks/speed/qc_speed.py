"""``histomarker qc`` on a standard synthetic slide (40960 x 30720 px), on one core.

A cancer slide of the ``standard`` preset is generated once into ``--cache`` (default
``/tmp/qc_speed``); then, in a child process pinned to one CPU core with OpenCV and
torch on one thread, the command's work runs end to end: open the slide, read the
mask level, segment tissue and artifacts, judge, and write thumbnail, masks, overlay,
GeoJSON and ``qc.json``. Target: under 20 s. Best of ``--repeat`` runs.

    .venv/bin/python benchmarks/speed/qc_speed.py [--cache /tmp/qc_speed] [--repeat 3] [--core 0]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

MAKE = r"""
import sys
from pathlib import Path
from services.synth.labels import sample_cohort
from services.synth.slide import generate_slide
spec = next(s for s in sample_cohort(4, 7) if s.kind == "cancer")
files = generate_slide(spec, Path(sys.argv[1]), "standard", truth_crops=0)
print(Path(sys.argv[1]) / files.slide)
"""

CHILD = r"""
import json, os, sys, tempfile, time
os.sched_setaffinity(0, {int(sys.argv[2])})
import cv2
cv2.setNumThreads(1)
from services.slide.qc import run_qc, write_report
from services.slide.reader import open_slide
slide, repeat = sys.argv[1], int(sys.argv[3])
best = float("inf")
for _ in range(repeat):
    with tempfile.TemporaryDirectory() as out:
        began = time.perf_counter()
        with open_slide(slide) as reader:
            result = run_qc(reader)
            size = reader.dimensions
        write_report(result, out)
        best = min(best, time.perf_counter() - began)
print(json.dumps({"size": f"{size[0]}x{size[1]}", "seconds": round(best, 2),
                  "mask_px": result.report["size_px"], "verdict": result.report["verdict"]}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=Path("/tmp/qc_speed"))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--core", type=int, default=0)
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    slides = sorted(args.cache.glob("slides/*.tiff"))
    if slides:
        slide = slides[0]
    else:
        made = subprocess.run(
            [sys.executable, "-c", MAKE, str(args.cache)],
            capture_output=True, text=True, cwd=ROOT, check=True,
        )  # fmt: skip
        slide = Path(made.stdout.strip().splitlines()[-1])
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(slide), str(args.core), str(args.repeat)],
        capture_output=True, text=True, cwd=ROOT, check=True, env=env,
    )  # fmt: skip
    row = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"| slide | mask px | seconds on one core (best of {args.repeat}) | verdict |")
    print("|---|---|---|---|")
    mask = f"{row['mask_px'][0]} x {row['mask_px'][1]}"
    print(f"| {row['size']} | {mask} | {row['seconds']} | {row['verdict']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
