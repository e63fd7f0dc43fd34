"""Speed and memory of the synthetic slide generator, one slide per preset.

Each slide is generated in a child process pinned to one CPU core (the target is
"a standard slide in under 2 minutes on one core"), and the table gives wall time,
CPU time, peak resident memory and throughput. Run:

    .venv/bin/python benchmarks/speed/synth_speed.py [--presets tiny small standard]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, os, resource, sys, time
os.sched_setaffinity(0, {int(sys.argv[3])})
from services.synth.labels import sample_cohort
from services.synth.slide import PRESETS, generate_slide
preset, out = sys.argv[1], sys.argv[2]
spec = next(s for s in sample_cohort(4, 7) if s.kind == "cancer")
started, cpu = time.perf_counter(), time.process_time()
files = generate_slide(spec, __import__("pathlib").Path(out), preset, truth_crops=4)
wall = time.perf_counter() - started
width, height = PRESETS[preset]
print(json.dumps({
    "preset": preset, "size": f"{width}x{height}", "wall_s": round(wall, 1),
    "cpu_s": round(time.process_time() - cpu, 1),
    "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    "mpx_per_s": round(width * height / 1e6 / wall, 1),
    "file_mb": round(os.path.getsize(os.path.join(out, files.slide)) / 1e6, 1),
}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--presets", nargs="+", default=["tiny", "small", "standard"])
    parser.add_argument("--core", type=int, default=0, help="CPU core to pin the child to")
    args = parser.parse_args()
    root = Path(__file__).resolve().parents[2]
    rows = []
    for preset in args.presets:
        with tempfile.TemporaryDirectory() as out:
            result = subprocess.run(
                [sys.executable, "-c", CHILD, preset, out, str(args.core)],
                capture_output=True,
                text=True,
                cwd=root,
                check=True,
            )
            rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    header = ["preset", "size", "wall_s", "cpu_s", "peak_rss_mb", "mpx_per_s", "file_mb"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(row[key]) for key in header) + " |")


if __name__ == "__main__":
    main()
