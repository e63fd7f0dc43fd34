"""Knowing when not to answer: the out-of-distribution check of a prediction.

A reference is fitted on synthetic slides the way training fits it (raw usable
patches of the demo's half-overlapping 20x grid, :func:`grid_descriptors`); to keep
the test small its "slides" are interleaved thirds of a few generated slides' patches
(five slides fit, two set the threshold), and an eighth slide, used in neither, is
the new synthetic slide. Real H&E (CMU-1-Small-Region, an Aperio skin slide from
``../shared/realdata``) must be refused, by the check and by ``predict_slide``, which
then makes no calls unless asked to answer anyway. The scorer's tiny models are
untrained: only the pipeline's own logic is checked.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from realdata import realdata
from tiny_mil import tiny_embedder, tiny_head
from tiny_models import untrained_scorer

from services.common.errors import InvalidInput
from services.common.objectstore import ObjectStore, open_store
from services.common.vocabulary import CANCER_DETECTOR
from services.inference.ood import PATCH_FEATURES, OodDetector
from services.inference.registry import OOD_FILE
from services.prediction.mil_pipeline import MilParams, predict_slide_mil
from services.prediction.models import Deployment, LocalScorer
from services.prediction.ood_check import (
    BASIS,
    DEFAULT_MAX_PATCHES,
    PATCHES_PER_SLIDE_KEY,
    check_slide_ood,
    grid_descriptors,
    spread_rows,
)
from services.prediction.pipeline import PredictionParams, predict_slide, prediction_digest
from services.slide.grid import GridParams
from services.slide.prepare import PreparedSlide, prepare_slide
from services.slide.qc import QcThresholds
from services.slide.reader import open_slide
from services.synth.cohort import generate_cohort
from services.synth.slide import QC_MIN_USABLE_MM2

#: The demo's 20x grid: 512 px patches, half-overlapping (256 µm a side).
GRID = GridParams(overlap_px=256)
PARAMS = PredictionParams(
    grid=GRID,
    qc=QcThresholds(min_usable_mm2=QC_MIN_USABLE_MM2),
    batch_size=8,
    max_in_flight=2,
    heatmaps=False,
    biomarkers=("tp53", "basal"),
)
TRAINED_ON = {"cohort": "demo", "synthetic": True, "sites": ["SA", "SB"], "n_slides": 40}
ENTRY_KEYS = {"out_of_distribution", "distance", "threshold", "basis", "patch_count"}


def _interleaved(desc: np.ndarray, parts: int) -> list[np.ndarray]:
    return [desc[i::parts] for i in range(parts)]


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("cohort")
    generate_cohort(folder, 8, seed=5, preset="tiny", truth_crops=0, workers=2)
    return sorted((folder / "slides").glob("*.tiff"))


@pytest.fixture(scope="module")
def cmu1() -> Path:
    return realdata("qc/slides") / "CMU-1-Small-Region.svs"


@pytest.fixture(scope="module")
def detector(slides: list[Path]) -> OodDetector:
    described = []
    for path in slides[:7]:
        with open_slide(path) as reader:
            prepared = prepare_slide(reader, path.stem, PARAMS)
            described.append(grid_descriptors(reader, prepared.grid, 256.0, 32))
    fit = [part for desc in described[:5] for part in _interleaved(desc, 3)]
    calibration = [part for desc in described[5:] for part in _interleaved(desc, 3)]
    fitted = OodDetector().fit(fit, calibration, description="five tiny synthetic slides")
    fitted.training[PATCHES_PER_SLIDE_KEY] = 32
    return fitted


@pytest.fixture(scope="module")
def scorer(tmp_path_factory: pytest.TempPathFactory) -> LocalScorer:
    root = tmp_path_factory.mktemp("bundles")
    return untrained_scorer(root, 32, training_data=TRAINED_ON)


@pytest.fixture()
def store(tmp_path: Path) -> ObjectStore:
    return open_store((tmp_path / "store").as_uri())


def _prepared(path: Path) -> tuple[PreparedSlide, int]:
    with open_slide(path) as reader:
        prepared = prepare_slide(reader, path.stem, PARAMS)
    return prepared, len(prepared.grid)


def test_spread_rows_are_evenly_spread_bounded_and_fixed() -> None:
    picks = spread_rows(100, 32)
    assert len(picks) == 32 and picks[0] == 0 and picks[-1] == 99
    assert np.all(np.diff(picks) > 0)
    assert spread_rows(5, 32).tolist() == [0, 1, 2, 3, 4]
    assert spread_rows(0, 32).tolist() == []
    with pytest.raises(InvalidInput, match="max_patches"):
        spread_rows(10, 0)


def test_a_new_synthetic_slide_is_answered(slides: list[Path], detector: OodDetector) -> None:
    with open_slide(slides[7]) as reader:
        prepared = prepare_slide(reader, slides[7].stem, PARAMS)
        entry = check_slide_ood(reader, prepared, detector, GRID)
        again = check_slide_ood(reader, prepared, detector, GRID)
    print(f"new synthetic slide: {entry}")
    assert set(entry) == ENTRY_KEYS
    assert entry["out_of_distribution"] is False
    assert 0 < entry["distance"] <= entry["threshold"] == round(detector.threshold, 4)
    assert entry["patch_count"] == min(len(prepared.grid), 32)
    assert entry["basis"].startswith(BASIS) and "3 nearest" in entry["basis"]
    assert again == entry  # the same patches every time


def test_a_real_aperio_slide_is_refused(cmu1: Path, detector: OodDetector) -> None:
    with open_slide(cmu1) as reader:
        prepared = prepare_slide(reader, "CMU-1", PARAMS)
        entry = check_slide_ood(reader, prepared, detector, GRID)
        fewer = check_slide_ood(reader, prepared, detector, GRID, max_patches=4)
    print(f"CMU-1-Small-Region: {entry}")
    assert entry["out_of_distribution"] is True
    assert entry["distance"] > 1.5 * entry["threshold"]
    assert entry["patch_count"] == 32 < len(prepared.grid)
    assert fewer["patch_count"] == 4 and fewer["out_of_distribution"] is True


def test_the_patch_count_follows_the_reference_or_the_default(
    slides: list[Path], detector: OodDetector
) -> None:
    unsaid = OodDetector.from_json(detector.to_json())
    del unsaid.training[PATCHES_PER_SLIDE_KEY]
    said = OodDetector.from_json(detector.to_json())
    said.training[PATCHES_PER_SLIDE_KEY] = 3
    with open_slide(slides[7]) as reader:
        prepared = prepare_slide(reader, slides[7].stem, PARAMS)
        assert check_slide_ood(reader, prepared, said, GRID)["patch_count"] == 3
        expected = min(len(prepared.grid), DEFAULT_MAX_PATCHES)
        assert check_slide_ood(reader, prepared, unsaid, GRID)["patch_count"] == expected
        desc = grid_descriptors(reader, prepared.grid, 256.0, 5)
    assert desc.shape == (5, len(PATCH_FEATURES))


def test_a_slide_without_usable_patches_cannot_be_checked(
    slides: list[Path], detector: OodDetector
) -> None:
    with open_slide(slides[7]) as reader:
        prepared = prepare_slide(reader, slides[7].stem, PARAMS)
        empty = replace(prepared, grid=prepared.grid.iloc[:0])
        with pytest.raises(InvalidInput, match="no usable tissue"):
            check_slide_ood(reader, empty, detector, GRID)


def test_the_pipeline_refuses_a_slide_out_of_distribution_without_calls(
    cmu1: Path, detector: OodDetector, scorer: LocalScorer, store: ObjectStore
) -> None:
    deployment = replace(scorer.deployment(PARAMS.biomarkers), ood=detector)
    with open_slide(cmu1) as reader:
        result = predict_slide(reader, "CMU-1", store, deployment, scorer, PARAMS)
    assert result.status == "out_of_distribution"
    assert result.biomarkers == [] and result.patch_table_key == ""
    assert result.cancer_patch_count == 0 and result.tissue_patch_count > 0
    entry = result.out_of_distribution
    assert set(entry) == ENTRY_KEYS and entry["out_of_distribution"] is True
    assert f"{entry['distance']:.3g}" in result.message
    assert f"{entry['threshold']:.3g}" in result.message
    assert "answer_out_of_distribution" in result.message
    assert result.training_data == {**TRAINED_ON, "n_patients": 0}
    assert "ood" in result.timings and "scoring" not in result.timings
    stored = json.loads(store.get_bytes(f"{result.prefix}/prediction.json"))
    assert stored["status"] == "out_of_distribution"
    assert stored["out_of_distribution"] == entry
    assert not store.exists(f"{result.prefix}/patches.parquet")


def test_the_pipeline_answers_anyway_when_asked_and_says_so(
    cmu1: Path, detector: OodDetector, scorer: LocalScorer, store: ObjectStore
) -> None:
    deployment = replace(scorer.deployment(PARAMS.biomarkers), ood=detector)
    anyway = replace(PARAMS, answer_out_of_distribution=True, cancer_confidence=0.0)
    with open_slide(cmu1) as reader:
        result = predict_slide(reader, "CMU-1", store, deployment, scorer, anyway)
        refused = predict_slide(
            reader,
            "CMU-1",
            store,
            deployment,
            scorer,
            replace(anyway, answer_out_of_distribution=False),
        )
    assert result.status == "ok"
    assert [b.biomarker for b in result.biomarkers] == ["tp53", "basal"]
    assert result.out_of_distribution["out_of_distribution"] is True
    assert result.out_of_distribution == refused.out_of_distribution
    assert refused.status == "out_of_distribution"
    # Two answers to two questions: they do not share their outputs.
    assert result.params_hash != refused.params_hash


def test_the_pipeline_answers_a_synthetic_slide_and_records_the_check(
    slides: list[Path], detector: OodDetector, scorer: LocalScorer, store: ObjectStore
) -> None:
    deployment = replace(scorer.deployment(PARAMS.biomarkers), ood=detector)
    with open_slide(slides[7]) as reader:
        result = predict_slide(
            reader, "S6", store, deployment, scorer, replace(PARAMS, cancer_confidence=0.0)
        )
    assert result.status == "ok" and len(result.biomarkers) == 2
    assert result.out_of_distribution["out_of_distribution"] is False
    assert result.training_data["cohort"] == "demo"


def test_without_a_reference_nothing_is_checked_or_hashed(
    cmu1: Path, detector: OodDetector, scorer: LocalScorer, store: ObjectStore
) -> None:
    plain = scorer.deployment(PARAMS.biomarkers)
    assert plain.ood is None
    with open_slide(cmu1) as reader:
        result = predict_slide(
            reader, "CMU-1", store, plain, scorer, replace(PARAMS, cancer_confidence=0.0)
        )
    assert result.status == "ok" and result.out_of_distribution == {}
    assert "ood" not in result.timings
    anyway = replace(PARAMS, answer_out_of_distribution=True)
    # Without a reference the flag changes nothing, so neither does it the hash...
    assert prediction_digest(PARAMS, plain, None, "d") == prediction_digest(
        anyway, plain, None, "d"
    )
    # ...with one it does, and the reference itself counts.
    checked = replace(plain, ood=detector)
    assert prediction_digest(PARAMS, checked, None, "d") != prediction_digest(
        anyway, checked, None, "d"
    )
    assert prediction_digest(PARAMS, checked, None, "d") != prediction_digest(
        PARAMS, plain, None, "d"
    )


def test_a_local_scorer_serves_the_reference_beside_its_detector(
    tmp_path: Path, detector: OodDetector
) -> None:
    plain = untrained_scorer(tmp_path, 32)
    assert plain.deployment().ood is None
    folders = {name: tmp_path / name for name, _ in plain.deployed()[0].items()}
    (folders[CANCER_DETECTOR] / OOD_FILE).write_text(detector.to_json())
    deployment = LocalScorer(folders).deployment()
    assert isinstance(deployment, Deployment) and deployment.ood is not None
    assert deployment.ood.threshold == detector.threshold


def test_the_mil_pipeline_refuses_too_and_answers_when_asked(
    cmu1: Path, slides: list[Path], detector: OodDetector, store: ObjectStore, tmp_path: Path
) -> None:
    embedder = tiny_embedder(tmp_path)
    head = tiny_head(embedder)
    params = MilParams(qc=PARAMS.qc, max_patches=64, heatmaps=False)
    with open_slide(cmu1) as reader:
        refused = predict_slide_mil(reader, "CMU-1", store, embedder, head, params, ood=detector)
    assert refused.status == "out_of_distribution" and refused.biomarkers == []
    assert refused.out_of_distribution["out_of_distribution"] is True
    assert refused.bag_key == "" and not store.exists("bags/uni/CMU-1.h5")  # nothing embedded
    asked = replace(params, answer_out_of_distribution=True)
    with open_slide(cmu1) as reader:
        answered = predict_slide_mil(reader, "CMU-1", store, embedder, head, asked, ood=detector)
    assert answered.status == "ok" and len(answered.biomarkers) == 6
    assert answered.out_of_distribution == refused.out_of_distribution
    with open_slide(slides[7]) as reader:  # a synthetic slide the reference never saw
        fine = predict_slide_mil(reader, "syn", store, embedder, head, params, ood=detector)
    assert fine.status == "ok" and fine.out_of_distribution["out_of_distribution"] is False
