"""The demo's models on its own held-out slides (answer) and on real H&E (refuse).

Reads a finished ``histomarker demo --out DIR``: the out-of-distribution reference its
training flow fitted and stored beside the cancer detector
(``store/models/cancer_detector/{version}/ood.json``), its cohort and its held-out
split. Then, as the PredictionService does for every slide:

- each held-out synthetic slide prepared as PredictSlide prepares it (the demo's
  half-overlapping 20x grid, the generator's QC floor) and checked with
  :func:`services.prediction.ood_check.check_slide_ood` (target: >= 95% answered);
- CMU-1-Small-Region (a real Aperio slide, skin) likewise (target: refused);
- the real tiles of ``../shared/realdata`` (MoNuSeg, CPM-15, HistoQC's templates, the
  stain examples), too small for one 512 px 20x patch, scored on the descriptors of
  their 512 px patches at 0.5 µm/px as ``ood_real.py`` cuts them (target: all refused).

No slide here was used to fit or calibrate the reference: the flow fits on the
demo's training patients only.

    .venv/bin/python benchmarks/quality/ood_demo.py --demo-out /path/to/demo-out
        [--realdata ../shared/realdata] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ood_real import STAIN_MPP, tile_patches

from services.apps.demo import SCALES, TRAIN_MANIFEST
from services.apps.demo_heldout.split import split_by_patient
from services.cohort.manifest import Manifest
from services.inference.ood import DESCRIPTOR_MPP, OodDetector, patch_descriptors
from services.prediction.ood_check import check_slide_ood
from services.slide.grid import GridParams
from services.slide.prepare import PrepParams, prepare_slide
from services.slide.qc import QcThresholds
from services.slide.reader import open_slide
from services.synth.slide import QC_MIN_USABLE_MM2


def reference(demo_out: Path) -> tuple[OodDetector, Path]:
    """The demo's stored reference (the one version of the detector it trained)."""
    found = sorted((demo_out / "store" / "models" / "cancer_detector").glob("*/ood.json"))
    if len(found) != 1:
        raise SystemExit(f"expected one cancer_detector/*/ood.json under {demo_out}/store")
    return OodDetector.from_json(found[0].read_text()), found[0]


def real_tiles(realdata: Path) -> dict[str, list[tuple[str, np.ndarray]]]:
    """Real tiles as 512 px patches at 0.5 µm/px, by group."""
    groups: dict[str, list[tuple[str, np.ndarray]]] = {}
    for group, folder in (("MoNuSeg tiles", "monuseg-train"), ("CPM-15 tiles", "cpm15")):
        with (realdata / folder / "index.csv").open() as handle:
            groups[group] = [
                (row["name"], tile_patches(realdata / folder / row["image"], float(row["mpp"])))
                for row in csv.DictReader(handle)
            ]
    groups["HistoQC templates"] = [
        (p.stem, tile_patches(p, DESCRIPTOR_MPP))
        for p in sorted((realdata / "qc" / "tiles").glob("template*.png"))
    ]
    groups["stain/ examples"] = [
        (p.stem, tile_patches(p, STAIN_MPP)) for p in sorted((realdata / "stain").glob("*.png"))
    ]
    return groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo-out", type=Path, required=True)
    parser.add_argument(
        "--realdata", type=Path, default=Path(__file__).resolve().parents[3] / "shared/realdata"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    detector, path = reference(args.demo_out)
    scale = SCALES["full"]
    cohort = args.demo_out / "cohort"
    table = Manifest.read(cohort / "manifest.csv").table
    train_ids = set(Manifest.read(cohort / TRAIN_MANIFEST).table["slide_id"])
    _, heldout = split_by_patient(table, scale.heldout_fraction, scale.split_seed)
    assert not train_ids & set(heldout["slide_id"]), "held-out slides in the training manifest"
    qc = QcThresholds(min_usable_mm2=QC_MIN_USABLE_MM2)
    params = PrepParams(grid=GridParams(overlap_px=scale.pipeline.tiling.overlap_px), qc=qc)

    rows: list[dict[str, Any]] = []
    seconds = []
    for row in heldout.itertuples(index=False):
        with open_slide(cohort / row.slide_path) as reader:
            prepared = prepare_slide(reader, row.slide_id, params)
            if prepared.grid.empty or prepared.qc.verdict == "fail":
                rows.append({"group": "held-out synthetic", "name": row.slide_id, "qc": "fail"})
                continue
            began = time.perf_counter()
            entry = check_slide_ood(reader, prepared, detector, params.grid)
            seconds.append(time.perf_counter() - began)
        rows.append({"group": "held-out synthetic", "name": row.slide_id, **entry})
    cmu = args.realdata / "qc" / "slides" / "CMU-1-Small-Region.svs"
    with open_slide(cmu) as reader:
        prepared = prepare_slide(reader, "CMU-1", PrepParams(grid=params.grid))
        entry = check_slide_ood(reader, prepared, detector, params.grid)
    rows.append({"group": "CMU-1-Small-Region (real slide)", "name": "CMU-1", **entry})
    for group, tiles in real_tiles(args.realdata).items():
        for name, patches in tiles:
            distance = detector.distance(patch_descriptors(patches))
            rows.append(
                {
                    "group": group,
                    "name": name,
                    "distance": distance,
                    "out_of_distribution": distance > detector.threshold,
                }
            )

    print(f"reference {path.relative_to(args.demo_out)}: threshold {detector.threshold:.2f}")
    print("| slides | n | answered | refused | distance median (min-max) |")
    print("|---|---|---|---|---|")
    summary = []
    for group in dict.fromkeys(r["group"] for r in rows):
        mine = [r for r in rows if r["group"] == group and "distance" in r]
        d = np.array([r["distance"] for r in mine])
        refused = int(sum(bool(r["out_of_distribution"]) for r in mine))
        summary.append({"group": group, "n": len(mine), "refused": refused})
        print(
            f"| {group} | {len(mine)} | {100 * (len(mine) - refused) / len(mine):.1f}% | "
            f"{100 * refused / len(mine):.1f}% | {np.median(d):.1f} ({d.min():.1f}-{d.max():.1f}) |"
        )
    print(f"check: {1000 * float(np.median(seconds)):.0f} ms per slide (median)")
    if args.json:
        args.json.write_text(
            json.dumps(
                {"threshold": detector.threshold, "summary": summary, "rows": rows},
                indent=1,
                default=float,
            )
        )


if __name__ == "__main__":
    main()
