"""Nuclei segmentation against the synthetic ground truth (40x instance labels): the
paper's thresholding (``segment_nuclei``) and the default method.

Nuclei under pen ink, blur or folds are left out on both sides: those areas are
excluded from analysis upstream. Three unseen cohorts are pooled.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
from skimage import data

from services.nuclei.accuracy import MatchResult, match_instances
from services.nuclei.methods import segment_batch
from services.nuclei.segment import segment_nuclei
from services.synth.cohort import generate_cohort

SEEDS = (7, 11, 21)


@pytest.fixture(scope="module")
def crops(
    tmp_path_factory: pytest.TempPathFactory,
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    root = tmp_path_factory.mktemp("nuclei-truth")
    out = []
    for seed in SEEDS:
        cohort = root / f"seed{seed}"
        generate_cohort(cohort, n_slides=4, seed=seed, preset="tiny", truth_crops=4)
        for truth_dir in sorted((cohort / "truth").iterdir()):
            out.extend(_crops_of(truth_dir))
    return out


def _crops_of(truth_dir: Path) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    info = json.loads((truth_dir / "masks.json").read_text())
    step = info["downsample"]
    artifacts = np.zeros(tuple(reversed(info["mask_size_px"])), bool)
    for name in ("pen", "blur", "fold"):
        artifacts |= cv2.imread(str(truth_dir / f"{name}.png"), cv2.IMREAD_GRAYSCALE) > 0
    found = []
    for crop in info["nuclei_crops"]:
        bgr = cv2.imread(str(truth_dir / "nuclei" / f"{crop['name']}.png"))
        truth = tifffile.imread(truth_dir / "nuclei" / f"{crop['name']}_labels.tif")
        rows = np.minimum((crop["y"] + np.arange(truth.shape[0])) // step, artifacts.shape[0] - 1)
        cols = np.minimum((crop["x"] + np.arange(truth.shape[1])) // step, artifacts.shape[1] - 1)
        found.append((cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), truth, artifacts[rows][:, cols]))
    return found


@pytest.fixture(scope="module")
def pooled(crops: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> MatchResult:
    total = MatchResult(0, 0, 0, ())
    for rgb, truth, ignore in crops:
        total = total + match_instances(truth, segment_nuclei(rgb, 0.25), ignore=ignore)
    print(
        f"\nnuclei {total.true_positives + total.false_negatives}: F1 {total.f1:.3f} "
        f"precision {total.precision:.3f} recall {total.recall:.3f} Dice {total.mean_dice:.3f}"
    )
    return total


@pytest.mark.slow
def test_the_default_method_meets_the_targets_on_synthetic_tissue_too(
    crops: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
) -> None:
    """The default (the U-Net trained on real H&E only, never on the generator's
    tissue): measured F1 0.897 (precision 0.941, recall 0.857), Dice 0.942."""
    total = MatchResult(0, 0, 0, ())
    labels = segment_batch([rgb for rgb, _, _ in crops], [0.25] * len(crops))
    for (_, truth, ignore), found in zip(crops, labels, strict=True):
        total = total + match_instances(truth, found, ignore=ignore)
    print(f"\ndefault method: F1 {total.f1:.3f} Dice {total.mean_dice:.3f}")
    assert total.mean_dice >= 0.80
    assert total.f1 >= 0.85


@pytest.mark.slow
def test_segmentation_meets_the_targets(pooled: MatchResult) -> None:
    """The issue's targets: detection F1 >= 0.85 at IoU >= 0.5, mean Dice of matched
    nuclei >= 0.80. Measured with the generator's rules version 3: F1 0.853 (precision
    0.915, recall 0.799), Dice 0.906 (version 2: F1 0.861; version 1: 0.851)."""
    total = pooled
    assert total.true_positives + total.false_negatives > 1000
    assert total.mean_dice >= 0.80
    assert total.precision >= 0.90  # what is found is right
    assert total.f1 >= 0.85


def test_counts_on_the_real_stained_sample_are_plausible() -> None:
    """scikit-image's immunohistochemistry sample (hematoxylin counterstain + DAB): by
    eye ~150-250 nuclei, stromal ones well separated, epithelial ones pale in brown
    membranes. At an assumed 0.5 µm/px (the image carries no resolution)."""
    labels = segment_nuclei(data.immunohistochemistry(), 0.5)
    count = int(labels.max())
    area_um2 = np.bincount(labels.ravel())[1:] * 0.25
    assert 80 <= count <= 300
    assert 15 <= float(np.median(area_um2)) <= 80
