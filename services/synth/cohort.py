"""``histomarker synth``: a synthetic cohort of slides with ground truth.

Writes, under the output folder::

    manifest.csv             one row per slide (services.cohort.manifest columns, plus
                             the ground-truth paths ``truth_masks``, ``tissue_mask``,
                             ``tumour_mask``, ``nuclei_truth``)
    slides/{slide_id}.tiff   pyramidal tiled TIFF, 40x base level (0.25 µm/px)
    truth/{slide_id}/...     masks and nucleus ground truth (see services.synth.slide)

The same seed gives byte-identical files. The manifest is written last, so a run
that stops half-way leaves no manifest that looks finished.
"""

from __future__ import annotations

import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pandas as pd

from services.cohort.manifest import Manifest
from services.common.errors import InvalidInput
from services.common.progress import ProgressBar
from services.synth.labels import BIOMARKERS, SlideSpec, manifest_rows, sample_cohort
from services.synth.slide import SlideFiles, generate_slide, preset_size

MANIFEST_NAME = "manifest.csv"


def generate_cohort(
    out_dir: str | Path,
    n_slides: int,
    seed: int,
    preset: str = "tiny",
    *,
    truth_crops: int = 4,
    progress: bool = False,
    overwrite: bool = False,
    normal_fraction: float = 0.25,
    workers: int = 1,
) -> dict[str, Any]:
    """Generate a cohort and return a JSON-able summary.

    Args:
        out_dir: Output folder (created).
        n_slides: Number of slides (one per patient).
        seed: Random seed; the same seed gives the same files.
        preset: Slide size preset: ``tiny``, ``small`` or ``standard``.
        truth_crops: 40x crops with nucleus ground truth per slide.
        progress: Show a progress bar per slide on standard error.
        overwrite: Replace an existing cohort's manifest.
        normal_fraction: Share of normal slides (see ``sample_cohort``).
        workers: Slides rendered at once, each in its own process; with more than
            one, progress is a line per finished slide instead of a bar per slide.

    Returns:
        Counts per kind and label, the manifest path and the time taken.
    """
    preset_size(preset)  # fail fast on an unknown preset
    if truth_crops < 0:
        raise InvalidInput(f"truth crops must be >= 0, got {truth_crops}")
    out = Path(out_dir)
    manifest_path = out / MANIFEST_NAME
    if manifest_path.exists() and not overwrite:
        raise InvalidInput(f"{manifest_path} exists already; choose another folder")
    if workers < 1:
        raise InvalidInput(f"workers must be >= 1, got {workers}")
    specs = sample_cohort(n_slides, seed, normal_fraction)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows = manifest_rows(specs)
    if workers == 1:
        written = []
        for index, spec in enumerate(specs, start=1):
            label = f"slide {index}/{len(specs)} {spec.slide_id}"
            bar = ProgressBar(label, "tiles") if progress else None
            written.append(generate_slide(spec, out, preset, truth_crops=truth_crops, progress=bar))
    else:
        written = _generate_in_processes(specs, out, preset, truth_crops, workers, progress)
    for row, files in zip(rows, written, strict=True):
        row["slide_path"] = files.slide
        row["truth_masks"] = files.masks
        row["tissue_mask"] = files.tissue_mask
        row["tumour_mask"] = files.tumour_mask
        row["nuclei_truth"] = files.nuclei_dir
    manifest = Manifest.from_frame(pd.DataFrame(rows), root=out)
    manifest.write(manifest_path, overwrite=overwrite)
    kinds = [spec.kind for spec in specs]
    positives = {
        name: sum(int(getattr(spec.labels, name)) for spec in specs if spec.labels is not None)
        for name in BIOMARKERS
    }
    return {
        "manifest": str(manifest_path),
        "slides": len(specs),
        "cancer": kinds.count("cancer"),
        "normal": kinds.count("normal"),
        "positives": positives,
        "preset": preset,
        "seed": seed,
        "elapsed_s": round(time.perf_counter() - started, 1),
    }


def _generate_in_processes(
    specs: list[SlideSpec],
    out: Path,
    preset: str,
    truth_crops: int,
    workers: int,
    progress: bool,
) -> list[SlideFiles]:
    """Render the slides ``workers`` at a time; results in the order of ``specs``."""
    bar = ProgressBar("synthetic slides", "slides") if progress else None
    with ProcessPoolExecutor(min(workers, len(specs))) as pool:
        futures = [
            pool.submit(generate_slide, spec, out, preset, truth_crops=truth_crops)
            for spec in specs
        ]
        written = []
        for done, future in enumerate(futures, start=1):
            written.append(future.result())
            if bar is not None:
                bar(done, len(futures))
    return written
