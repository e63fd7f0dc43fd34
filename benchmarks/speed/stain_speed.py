"""Per-patch time of stain normalization: ours (slide matrix known) vs staintools.

Both normalize 512 px tissue patches of a synthetic slide to the same reference.
Ours is given the slide's stain matrix, estimated once beforehand (as the tiling
service does), so a patch costs a lookup table, two per-pixel matrix products and an
exp. staintools' ``StainNormalizer.transform`` re-estimates the stain matrix by
dictionary learning and solves a lasso per pixel for every patch. The process is
pinned to one CPU core. Run:

    .venv/bin/python benchmarks/speed/stain_speed.py [--ours 20] [--theirs 3] [--core 0]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

os.environ.setdefault("OMP_NUM_THREADS", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ours", type=int, default=20, help="patches timed for ours")
    parser.add_argument("--theirs", type=int, default=3, help="patches timed for staintools")
    parser.add_argument("--core", type=int, default=0, help="CPU core to pin to")
    args = parser.parse_args()
    os.sched_setaffinity(0, {args.core})

    import cv2
    import staintools

    from services.slide.stain import MacenkoNormalizer, VahadaneNormalizer
    from services.synth.labels import sample_cohort
    from services.synth.slide import SyntheticSlide

    cv2.setNumThreads(1)
    spec = next(s for s in sample_cohort(8, 3) if s.kind == "cancer")
    slide = SyntheticSlide(spec, 4096, 3072)
    origins = [(2304, 768), (2560, 1280), (1280, 768), (1536, 1280), (2048, 1024)]
    patches = [slide.renderer.render(x, y, 512, 512).rgb for x, y in origins]
    reference = slide.renderer.render(1024, 1024, 1024, 1024).rgb
    sample = np.concatenate([p.reshape(-1, 3) for p in patches])

    rows = []
    for name, normalizer in (
        ("ours vahadane", VahadaneNormalizer()),
        ("ours macenko", MacenkoNormalizer()),
    ):
        normalizer.fit(reference)
        started = time.perf_counter()
        source = normalizer.stain_matrix_of(sample)
        once_s = time.perf_counter() - started
        normalizer.transform(patches[0], source)  # warm-up
        started = time.perf_counter()
        for i in range(args.ours):
            normalizer.transform(patches[i % len(patches)], source)
        rows.append((name, (time.perf_counter() - started) / args.ours, once_s))
    theirs = staintools.StainNormalizer(method="vahadane")
    theirs.fit(reference.copy())
    started = time.perf_counter()
    for i in range(args.theirs):
        theirs.transform(patches[i % len(patches)].copy())
    rows.append(("staintools vahadane", (time.perf_counter() - started) / args.theirs, 0.0))

    baseline = rows[-1][1]
    print("| method | ms / 512 px patch | speed-up vs staintools | slide matrix once, ms |")
    print("|---|---|---|---|")
    for name, per_patch_s, once_s in rows:
        once = f"{once_s * 1e3:.0f}" if once_s else "-"
        print(f"| {name} | {per_patch_s * 1e3:.2f} | {baseline / per_patch_s:.0f}x | {once} |")


if __name__ == "__main__":
    main()
