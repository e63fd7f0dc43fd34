"""Nuclei segmentation on real annotated H&E: accuracy per method and speed per core.

For each shared data set (``../shared/realdata/monuseg-train``, ``cpm15``) it runs
``histomarker evaluate nuclei`` (the same :func:`evaluate_index`) with

- ``otsu``: the naive baseline;
- ``phoulady``: the paper's multilevel thresholding;
- ``unet held out``: the U-Net recipe scored on images it never saw: the images of
  fold a by the model trained without fold a, those of fold b by the one trained
  without fold b (``python -m services.nuclei.train_unet --holdout a|b``; MoNuSeg
  folds are by organ, CPM-15 by image number);
- ``unet shipped``: the shipped weights, which saw every image here (a fit, not a
  score).

Then patches/s on one core (torch and OpenCV limited to one thread, the process
pinned to one CPU): segmentation plus the 75 features of 512 x 512 px 40x crops of the
MoNuSeg images. Run:

    .venv/bin/python benchmarks/quality/nuclei_real.py --folds /tmp/nuc [--core 0] [--json out.json]

where ``/tmp/nuc`` holds ``fold-a.pt`` and ``fold-b.pt``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[2]
REALDATA = Path(os.environ.get("HISTOMARKER_REALDATA", REPO.parent / "shared" / "realdata"))
DATASETS = ("monuseg-train", "cpm15")


def _fold_index(folder: Path, fold: str, out: Path) -> Path | None:
    """An index of the rows of one fold (absolute paths); None when it has none."""
    from services.nuclei.train_unet import fold_of

    with open(folder / "index.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    chosen = [row for row in rows if fold_of(row["organ"], row["name"]) == fold]
    if not chosen:
        return None
    for row in chosen:
        for column in ("image", "instances", "binary"):
            if row[column]:
                row[column] = str((folder / row[column]).resolve())
    with open(out, "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(chosen)
    return out


def _summary(records: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    import numpy as np

    out: dict[str, Any] = {"seconds": round(seconds, 1)}
    for score in ("f1", "aji", "dice", "pq"):
        values = [r[score] for r in records if score in r and "f1" in r]
        if values:
            out[score] = float(np.mean(values))
    breast = [r["f1"] for r in records if r.get("organ") == "breast" and "f1" in r]
    if breast:
        out["breast_f1"] = float(np.mean(breast))
    out["scored"] = sum("f1" in r for r in records)
    return out


def accuracy(folds: Path) -> dict[str, dict[str, Any]]:
    from services.nuclei.evaluate import evaluate_index

    table: dict[str, dict[str, Any]] = {}
    for name in DATASETS:
        folder = REALDATA / name
        for method in ("otsu", "phoulady", "unet"):
            result = evaluate_index(folder / "index.csv", method)
            label = "unet shipped (saw these)" if method == "unet" else method
            table[f"{name} | {label}"] = _summary(result["images"], result["seconds"])
            print(f"{name} {label}: {table[f'{name} | {label}']}", file=sys.stderr, flush=True)
        records: list[dict[str, Any]] = []
        seconds = 0.0
        with tempfile.TemporaryDirectory() as tmp:
            for fold in ("a", "b"):
                index = _fold_index(folder, fold, Path(tmp) / f"{fold}.csv")
                if index is None:
                    continue
                result = evaluate_index(index, "unet", weights=folds / f"fold-{fold}.pt")
                records.extend(result["images"])
                seconds += result["seconds"]
        table[f"{name} | unet held out"] = _summary(records, seconds)
        print(f"{name} held out: {table[f'{name} | unet held out']}", file=sys.stderr, flush=True)
    return table


def speed(core: int, repeat: int) -> dict[str, float]:
    import cv2
    import torch

    from services.nuclei.annotations import read_index, read_rgb_file
    from services.nuclei.pipeline import analyze_patch
    from services.nuclei.segment import SegmentationParams

    os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    crops = []
    for row in read_index(REALDATA / "monuseg-train" / "index.csv")[::3]:
        rgb = read_rgb_file(row.image)
        crops.extend([rgb[:512, :512], rgb[-512:, -512:]])
    rates = {}
    for method in ("unet", "phoulady", "otsu"):
        params = SegmentationParams(method=method)
        analyze_patch(crops[0], 0.25, params)  # load the model, warm the caches
        best = float("inf")
        for _ in range(repeat):
            began = time.perf_counter()
            for crop in crops:
                analyze_patch(crop, 0.25, params)
            best = min(best, time.perf_counter() - began)
        rates[method] = len(crops) / best
        print(f"{method}: {rates[method]:.2f} patches/s on one core", file=sys.stderr, flush=True)
    return rates


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folds", type=Path, required=True, help="folder of fold-a/b.pt")
    parser.add_argument("--core", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--skip-speed", action="store_true")
    args = parser.parse_args()
    for fold in ("a", "b"):
        if not (args.folds / f"fold-{fold}.pt").is_file():
            print(f"error: no {args.folds / f'fold-{fold}.pt'}", file=sys.stderr)
            return 2
    table = accuracy(args.folds)
    rates = {} if args.skip_speed else speed(args.core, args.repeat)
    print("| data set | method | F1@0.5 | AJI | Dice | PQ | breast F1 | images |")
    print("|---|---|---|---|---|---|---|---|")
    for key, row in table.items():
        data, method = key.split(" | ")
        breast = f"{row['breast_f1']:.3f}" if "breast_f1" in row else "-"
        print(
            f"| {data} | {method} | {row['f1']:.3f} | {row['aji']:.3f} | {row['dice']:.3f} | "
            f"{row['pq']:.3f} | {breast} | {row['scored']} |"
        )
    if rates:
        print()
        print("| method | patches/s per core (512 px, 40x, segmentation + 75 features) |")
        print("|---|---|")
        for method, rate in rates.items():
            print(f"| {method} | {rate:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"accuracy": table, "speed": rates}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
