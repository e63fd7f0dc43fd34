"""Nuclei segmentation + the 75 features per 40x patch: ours vs plain scikit-image.

Both run the same steps on the same 512 px 40x crops of synthetic slides (the
generator's nucleus ground-truth crops), pinned to one CPU core:

- ours: ``services.nuclei.segment.segment_nuclei`` then ``nucleus_table`` and
  ``patch_features`` (OpenCV connected components and contours per threshold level,
  region nesting by array gathers, moments for all nuclei at once);
- baseline: a straightforward scikit-image version of the same method — per level
  ``skimage.measure.label`` and ``regionprops`` (area, solidity), nesting by label
  lookups, the same bottom-up choice, watershed splits seeded by ``peak_local_max``,
  then the same split of unclaimed clusters by stain basins (``watershed`` from
  ``h_minima``), then ``regionprops`` per nucleus for the features and a Delaunay
  triangulation.

It also reports detection F1 (IoU > 0.5) and Dice of matched nuclei of both against
the ground truth, outside pen, blur and fold masks. Run:

    .venv/bin/python benchmarks/speed/nuclei_speed.py [--seeds 7 11 21] [--core 0] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("OMP_NUM_THREADS", "1")

MPP = 0.25


def baseline_segment(rgb: np.ndarray, mpp: float = MPP) -> np.ndarray:
    """The method written plainly with scikit-image (no vectorised tree)."""
    from scipy import ndimage as ndi
    from skimage.color import rgb2hed
    from skimage.feature import peak_local_max
    from skimage.filters import gaussian, threshold_otsu
    from skimage.measure import label, regionprops
    from skimage.morphology import h_minima, remove_small_objects
    from skimage.segmentation import watershed

    from services.nuclei.segment import SegmentationParams

    params = SegmentationParams()
    h = rgb2hed(rgb)[..., 0]
    scale = np.clip(np.percentile(h, 99.5), 0.05, None)
    h8 = (np.clip(gaussian(h, 1.0) / scale, 0, 1) * 255).astype(np.uint8)
    min_px, max_px = params.min_area_um2 / mpp**2, params.max_area_um2 / mpp**2
    levels = list(range(params.min_level, int(h8.max()) + 1, params.threshold_step))
    tree = []
    for level in levels:
        labels = label(ndi.binary_fill_holes(h8 >= level), connectivity=2)
        valid = {}
        for region in regionprops(labels):
            ok = min_px <= region.area <= max_px and region.solidity >= params.min_solidity
            valid[region.label] = ok
        tree.append((labels, valid))
    chosen: list[dict[int, bool]] = [{} for _ in tree]
    below: dict[int, int] = {}
    for k in range(len(tree) - 1, -1, -1):
        labels, valid = tree[k]
        counts: dict[int, int] = {}
        if k + 1 < len(tree):
            child_labels = tree[k + 1][0]
            for child, n in below.items():
                ys, xs = np.nonzero(child_labels == child)
                parent = int(labels[ys[0], xs[0]])
                counts[parent] = counts.get(parent, 0) + n
        below = {}
        for region_label, ok in valid.items():
            n = counts.get(region_label, 0)
            chosen[k][region_label] = ok and n <= 1
            below[region_label] = 1 if chosen[k][region_label] else n
    out = np.zeros(h8.shape, np.int32)
    blocked = np.zeros(h8.shape, bool)
    next_label = 1
    for k, (labels, _) in enumerate(tree):
        for region_label, is_chosen in chosen[k].items():
            if not is_chosen:
                continue
            mask = labels == region_label
            if blocked[mask].any():
                continue
            out[mask] = next_label
            blocked |= mask
            next_label += 1
    # Split non-solid nuclei along distance-transform watersheds.
    for region in regionprops(out):
        if region.solidity >= params.split_below_solidity:
            continue
        distance = ndi.distance_transform_edt(region.image)
        peaks = peak_local_max(distance, min_distance=int(3 / mpp), labels=region.image)
        if len(peaks) < 2:
            continue
        markers = np.zeros(region.image.shape, np.int32)
        markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
        parts = watershed(-distance, markers, mask=region.image)
        r0, c0, r1, c1 = region.bbox
        window = out[r0:r1, c0:c1]
        for part in range(2, len(peaks) + 1):
            window[parts == part] = next_label
            next_label += 1
    # Unclaimed clusters: flood the stain from the bottoms of its deep basins, keep
    # nucleus-sized basins.
    h_raw = (np.clip(h / scale, 0, 1) * 255).astype(np.uint8)
    fine = gaussian(h_raw.astype(float), 0.5 / mpp, preserve_range=True)
    claimed = ndi.binary_dilation(out > 0)
    free = ndi.binary_fill_holes(fine >= max(params.min_level, threshold_otsu(h_raw))) & ~claimed
    free = remove_small_objects(free, int(2 * min_px))
    deep = h_minima(fine, params.basin_depth).astype(bool) & free & (fine >= params.min_level)
    basins = watershed(h_raw, label(deep), mask=free)
    for region in regionprops(basins):
        if min_px <= region.area <= max_px and region.solidity >= params.basin_min_solidity:
            r0, c0, r1, c1 = region.bbox
            out[r0:r1, c0:c1][region.image] = next_label
            next_label += 1
    return out


def baseline_features(labels: np.ndarray, rgb: np.ndarray, mpp: float = MPP) -> np.ndarray:
    """Per nucleus with regionprops and Delaunay, then the 75 histogram statistics."""
    from scipy.spatial import Delaunay, QhullError
    from skimage.measure import regionprops

    from services.nuclei.features import FEATURES, histogram_statistics

    rows = []
    for region in regionprops(labels, intensity_image=rgb):
        major, minor = region.axis_major_length * mpp, region.axis_minor_length * mpp
        perimeter = region.perimeter * mpp
        rows.append(
            {
                "minor_axis_um": minor,
                "major_axis_um": major,
                "axis_ratio": major / minor if minor else 1.0,
                "area_um2": region.area * mpp * mpp,
                "perimeter_um": perimeter,
                "circularity": min(1.0, 4 * np.pi * region.area * mpp * mpp / perimeter**2)
                if perimeter
                else 0.0,
                "eccentricity": region.eccentricity,
                "solidity": region.solidity,
                "mean_red": region.intensity_mean[0],
                "mean_green": region.intensity_mean[1],
                "mean_blue": region.intensity_mean[2],
                "centroid": np.array(region.centroid) * mpp,
            }
        )
    points = np.array([r["centroid"] for r in rows]) if rows else np.zeros((0, 2))
    for r in rows:
        r.update(
            min_neighbor_distance_um=0.0,
            max_neighbor_distance_um=0.0,
            mean_neighbor_distance_um=0.0,
            degree=0.0,
        )
    if len(points) >= 3:
        try:
            tri = Delaunay(points)
            indptr, indices = tri.vertex_neighbor_vertices
            for i, r in enumerate(rows):
                around = indices[indptr[i] : indptr[i + 1]]
                d = np.linalg.norm(points[around] - points[i], axis=1)
                r.update(
                    min_neighbor_distance_um=d.min(),
                    max_neighbor_distance_um=d.max(),
                    mean_neighbor_distance_um=d.mean(),
                    degree=float(len(around)),
                )
        except QhullError:
            pass
    return np.concatenate(
        [
            histogram_statistics(np.array([r[s.column] for r in rows]), s.low, s.high)
            for s in FEATURES
        ]
    )


def load_crops(seeds: list[int], folder: Path) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(rgb, truth labels, ignore mask) of every ground-truth crop of the cohorts."""
    import cv2
    import tifffile

    from services.synth.cohort import generate_cohort

    crops = []
    for seed in seeds:
        cohort = folder / f"seed{seed}"
        if not (cohort / "manifest.csv").exists():
            generate_cohort(cohort, n_slides=4, seed=seed, preset="tiny", truth_crops=4)
        for truth_dir in sorted((cohort / "truth").iterdir()):
            info = json.loads((truth_dir / "masks.json").read_text())
            step = info["downsample"]
            artifacts = np.zeros(tuple(reversed(info["mask_size_px"])), bool)
            for name in ("pen", "blur", "fold"):
                artifacts |= cv2.imread(str(truth_dir / f"{name}.png"), 0) > 0
            for crop in info["nuclei_crops"]:
                image = cv2.imread(str(truth_dir / "nuclei" / f"{crop['name']}.png"))
                truth = tifffile.imread(truth_dir / "nuclei" / f"{crop['name']}_labels.tif")
                ys = np.clip((crop["y"] + np.arange(truth.shape[0])) // step, 0, None)
                xs = np.clip((crop["x"] + np.arange(truth.shape[1])) // step, 0, None)
                ys = np.minimum(ys, artifacts.shape[0] - 1)
                xs = np.minimum(xs, artifacts.shape[1] - 1)
                crops.append((cv2.cvtColor(image, cv2.COLOR_BGR2RGB), truth, artifacts[ys][:, xs]))
    return crops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[7, 11, 21])
    parser.add_argument("--core", type=int, default=0, help="CPU core to pin to")
    parser.add_argument("--baseline-crops", type=int, default=12, help="crops for the baseline")
    parser.add_argument("--cache", type=Path, default=None, help="cohort folder to reuse")
    parser.add_argument("--repeat", type=int, default=3, help="timed passes; the fastest counts")
    args = parser.parse_args()
    os.sched_setaffinity(0, {args.core})
    import cv2

    from services.nuclei.accuracy import MatchResult, match_instances
    from services.nuclei.features import nucleus_table, patch_features
    from services.nuclei.segment import segment_nuclei

    cv2.setNumThreads(1)
    folder = args.cache or Path(tempfile.mkdtemp(prefix="nuclei-bench-"))
    crops = load_crops(args.seeds, folder)

    def ours(rgb: np.ndarray) -> np.ndarray:
        labels = segment_nuclei(rgb, MPP)
        patch_features(nucleus_table(labels, rgb, MPP))
        return labels

    def theirs(rgb: np.ndarray) -> np.ndarray:
        labels = baseline_segment(rgb)
        baseline_features(labels, rgb)
        return labels

    rows = []
    for name, run, subset in (
        ("ours (OpenCV + vectorised tree)", ours, crops),
        ("scikit-image, straightforward", theirs, crops[: args.baseline_crops]),
    ):
        run(subset[0][0])  # warm-up (imports)
        # Only segmentation + features are timed (the fastest of --repeat passes:
        # the machine is shared); the scoring comes after.
        seconds = float("inf")
        for _ in range(args.repeat):
            elapsed = 0.0
            found = []
            for rgb, _, _ in subset:
                started = time.perf_counter()
                found.append(run(rgb))
                elapsed += time.perf_counter() - started
            seconds = min(seconds, elapsed)
        match = MatchResult(0, 0, 0, ())
        for (_, truth, ignore), labels in zip(subset, found, strict=True):
            match = match + match_instances(truth, labels, ignore=ignore)
        rows.append((name, len(subset), len(subset) / seconds, match))
    print(f"seeds {args.seeds}, 512 px 40x crops, one core")
    print("| implementation | crops | patches/s | detection F1 (IoU > 0.5) | Dice |")
    print("|---|---|---|---|---|")
    for name, count, rate, match in rows:
        print(f"| {name} | {count} | {rate:.1f} | {match.f1:.3f} | {match.mean_dice:.3f} |")
    print(f"speed-up: {rows[0][2] / rows[1][2]:.1f}x (goal >= 10 patches/s/core)")


if __name__ == "__main__":
    main()
