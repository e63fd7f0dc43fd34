"""The OOD detector fitted on synthetic cohorts: held-out synthetic slides answered,
real H&E (CMU-1-Small-Region, MoNuSeg tiles) refused.

The slides are prepared and the real tiles cut exactly as ``benchmarks/quality/
ood_real.py`` does (its functions are loaded from the file). The synthetic cohorts
are generated once into ``$HISTOMARKER_SYNTH_CACHE`` (default: the benchmark's cache,
``/tmp/tissue_quality``) and reused.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from realdata import realdata

from services.inference.ood import OodDetector, patch_descriptors

pytestmark = pytest.mark.slow

BENCHMARK = Path(__file__).resolve().parents[3] / "benchmarks" / "quality" / "ood_real.py"
CACHE = Path(
    os.environ.get("HISTOMARKER_SYNTH_CACHE", Path(tempfile.gettempdir()) / "tissue_quality")
)
FIT_SEEDS = (0, 1, 2)
CALIBRATION_SEED = 3
HELDOUT_SEED = 4
SLIDES_PER_SEED = 6
#: MoNuSeg tiles checked: the breast ones and the two nearest the synthetic slides in
#: the benchmark (a breast and a kidney tile).
MONUSEG = (
    "TCGA-A7-A13E-01Z-00-DX1",
    "TCGA-A7-A13F-01Z-00-DX1",
    "TCGA-AR-A1AK-01Z-00-DX1",
    "TCGA-E2-A14V-01Z-00-DX1",
    "TCGA-B0-5710-01Z-00-DX1",
)


def load_benchmark() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ood_real_benchmark", BENCHMARK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    realdata("qc/slides")  # skip before generating anything when the real data is absent
    return load_benchmark()


def seed_slides(bench: ModuleType, seed: int) -> list[np.ndarray]:
    root = bench.cohort(CACHE, seed, SLIDES_PER_SEED)
    slides = []
    for path in sorted((root / "slides").glob("*.tiff")):
        patches = bench.slide_patches(path, 64)
        if len(patches):
            slides.append(patch_descriptors(patches))
    return slides


@pytest.fixture(scope="module")
def detector(bench: ModuleType) -> OodDetector:
    train = [slide for seed in FIT_SEEDS for slide in seed_slides(bench, seed)]
    calibration = seed_slides(bench, CALIBRATION_SEED)
    fitted = OodDetector().fit(train, calibration, description=f"tiny seeds {FIT_SEEDS}")
    print(f"threshold {fitted.threshold:.1f}; {fitted.training}")
    return fitted


def test_held_out_synthetic_slides_are_answered(bench: ModuleType, detector: OodDetector) -> None:
    decisions = [detector.decide(slide) for slide in seed_slides(bench, HELDOUT_SEED)]
    print("held-out distances:", [round(d.distance, 1) for d in decisions])
    assert len(decisions) == SLIDES_PER_SEED
    assert sum(not d.ood for d in decisions) >= SLIDES_PER_SEED - 1


def test_a_real_aperio_slide_is_refused_whole_and_patch_by_patch(
    bench: ModuleType, detector: OodDetector
) -> None:
    patches = bench.slide_patches(realdata("qc/slides") / "CMU-1-Small-Region.svs", 64)
    desc = patch_descriptors(patches)
    decision = detector.decide(desc)
    print(f"CMU-1-Small-Region: distance {decision.distance:.1f}")
    assert decision.ood
    one_patch = [detector.decide(desc[[i]]) for i in range(len(desc))]
    assert all(d.ood for d in one_patch), [round(d.distance, 1) for d in one_patch]
    # The heatmap view: most of its patches look unfamiliar on their own too.
    assert np.mean(detector.patch_distances(desc) > detector.patch_threshold) >= 0.9
    # And a detector read back from its JSON says the same.
    assert OodDetector.from_json(detector.to_json()).decide(desc) == decision


def test_real_monuseg_tiles_are_refused(bench: ModuleType, detector: OodDetector) -> None:
    folder = realdata("monuseg-train")
    with (folder / "index.csv").open() as handle:
        rows = {row["name"]: row for row in csv.DictReader(handle)}
    distances = {}
    for name in MONUSEG:
        tile = bench.tile_patches(folder / rows[name]["image"], float(rows[name]["mpp"]))
        decision = detector.decide(patch_descriptors(tile))
        distances[name] = round(decision.distance, 1)
        assert decision.ood, f"{name} answered: distance {decision.distance:.1f}"
    print(f"MoNuSeg distances (threshold {detector.threshold:.1f}): {distances}")
