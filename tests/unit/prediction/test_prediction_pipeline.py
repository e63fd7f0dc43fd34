"""The per-slide prediction pipeline with an in-process scorer of tiny real models.

The seven models (cancer_detector and six biomarker_*) are tiny backbones with
random weights, saved as bundles and loaded back through ``load_bundle`` and the
handler's ``serving_io`` functions: real models, not mocks. Their probabilities
are arbitrary, so the tests steer the cancer threshold (0 keeps every patch, 1
none) and check the pipeline's own logic: statuses, mean aggregation, top-k order,
outputs in the store, cancellation, and the 40x windows of an overlapping grid.
"""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from tiny_models import untrained_scorer

from services.common.cancellation import WorkBudget
from services.common.errors import Cancelled, FailedPrecondition, InvalidInput
from services.common.objectstore import ObjectStore, open_store
from services.common.vocabulary import BIOMARKERS
from services.prediction.models import (
    DeployedModel,
    Deployment,
    LocalScorer,
)
from services.prediction.pipeline import PredictionParams, predict_slide, prediction_digest
from services.prediction.progress import BusyMeter
from services.prediction.results import ProgressEvent
from services.slide.grid import GridParams, TissueRule, footprint_px, patch_grid
from services.slide.highres import quadrant_origins
from services.slide.qc import QcThresholds
from services.slide.reader import SlideReader, open_slide
from services.slide.tissue import TissueParams, compute_masks
from services.synth.cohort import generate_cohort
from services.synth.slide import QC_MIN_USABLE_MM2
from services.tiling.pipeline import TileParams, tile_slide

INPUT_PX = 32
#: The 20x grid of the demo's training: 512 px patches, half-overlapping.
HALF_OVERLAP = GridParams(overlap_px=256)


@pytest.fixture(scope="module")
def scorer(tmp_path_factory: pytest.TempPathFactory) -> LocalScorer:
    root = tmp_path_factory.mktemp("bundles")
    return untrained_scorer(root, INPUT_PX, temperature=1.3, tta=("rot0", "rot90"))


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("cohort")
    generate_cohort(folder, 2, seed=3, preset="tiny", truth_crops=0)
    manifest = pd.read_csv(folder / "manifest.csv")
    row = manifest[manifest["kind"] == "cancer"].iloc[0]
    return folder / row["slide_path"]


@pytest.fixture()
def store(tmp_path: Path) -> ObjectStore:
    return open_store((tmp_path / "store").as_uri())


#: The tiny synthetic slides hold 0.3-0.4 mm² of tissue: under a real slide's QC floor.
SYNTHETIC_QC = QcThresholds(min_usable_mm2=QC_MIN_USABLE_MM2)


def _params(**changes: object) -> PredictionParams:
    base = PredictionParams(batch_size=8, max_in_flight=2, qc=SYNTHETIC_QC)
    return replace(base, **changes)  # type: ignore[arg-type]


def _table(store: ObjectStore, key: str) -> pd.DataFrame:
    return pd.read_parquet(io.BytesIO(store.get_bytes(key)))


def test_every_patch_kept_gives_mean_aggregated_calls_with_outputs(
    scorer: LocalScorer, slide_path: Path, store: ObjectStore
) -> None:
    events: list[ProgressEvent] = []
    with open_slide(slide_path) as reader:
        result = predict_slide(
            reader,
            "S1",
            store,
            scorer.deployment(),
            scorer,
            _params(cancer_confidence=0.0),
            progress=events.append,
        )
    assert result.status == "ok"
    assert result.tissue_patch_count > 0
    assert result.cancer_patch_count == result.tissue_patch_count
    assert result.cancer_patch_fraction == 1.0
    assert result.high_res_source == "native"  # the synthetic slides are 40x
    assert [b.biomarker for b in result.biomarkers] == list(BIOMARKERS)
    table = _table(store, result.patch_table_key)
    # The plain grid: the 40x windows are the quadrants of their own parent that hold
    # enough tissue (at least one per parent); the slide's edges leave some out.
    with open_slide(slide_path) as reader:
        rule = _tissue_rule(reader)
    parents = table.groupby(["parent_x", "parent_y"])
    assert parents.ngroups == result.cancer_patch_count
    assert len(table) < 4 * result.cancer_patch_count
    for (px, py), quads in parents:
        origins = quadrant_origins(px, py, 2 * int(quads["width"].iat[0]))
        kept = {
            o
            for o, keep in zip(origins, rule.keeps(origins, quads["width"].iat[0]), strict=True)
            if keep
        }
        assert set(zip(quads["x"], quads["y"], strict=True)) == kept
    for item in result.biomarkers:
        # The paper's aggregation: the slide probability is the mean patch probability.
        assert item.probability == pytest.approx(table[item.biomarker].mean(), abs=1e-12)
        assert item.patch_count == len(table)
        assert item.positive == (item.probability >= item.threshold)
        assert item.model_name == f"biomarker_{item.biomarker}" and item.model_version == "1"
        heatmap = cv2.imdecode(np.frombuffer(store.get_bytes(item.heatmap_key), np.uint8), 1)
        mask = cv2.imdecode(np.frombuffer(store.get_bytes(result.tissue_mask_key), np.uint8), 0)
        assert heatmap.shape[:2] == mask.shape[:2]
    # The detector's probabilities in the table are the scorer's own.
    stored = json.loads(store.get_bytes(f"{result.prefix}/prediction.json"))
    assert stored["status"] == "ok" and stored["params_hash"] == result.params_hash
    assert result.prefix == f"runs/predictions/S1/{result.params_hash}"
    # Progress: the stages in order, the fraction never decreasing, 1.0 at the end.
    fractions = [e.fraction for e in events]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    stages = [e.stage for e in events]
    assert stages[0] == "tissue" and "heatmaps" in stages and stages[-1] == "done"
    assert {"tissue", "grid", "stain", "scoring", "aggregate", "heatmaps"} <= set(result.timings)
    assert result.utilisation["requests"] > 0
    assert 0 < result.utilisation["busy_fraction"] <= 1.0


def test_top_patches_are_the_strongest_support_in_order(
    scorer: LocalScorer, slide_path: Path, store: ObjectStore
) -> None:
    deployment = scorer.deployment(("tp53", "er"))
    always = {
        # threshold 0: every call positive; 1.0 + a probability below 1: negative.
        "tp53": _with_threshold(deployment.biomarkers["tp53"], 0.0),
        "er": _with_threshold(deployment.biomarkers["er"], 1.0),
    }
    deployment = Deployment(deployment.cancer, always)
    with open_slide(slide_path) as reader:
        result = predict_slide(
            reader,
            "S2",
            store,
            deployment,
            scorer,
            _params(biomarkers=("tp53", "er"), cancer_confidence=0.0, top_k=5, heatmaps=False),
        )
    table = _table(store, result.patch_table_key)
    tp53, er = result.biomarkers
    assert tp53.positive and not er.positive
    assert tp53.heatmap_key == "" and er.heatmap_key == ""
    positive = [p.probability for p in tp53.top_patches]
    assert positive == sorted(positive, reverse=True)
    assert positive == sorted(table["tp53"], reverse=True)[:5]
    negative = [p.probability for p in er.top_patches]
    assert negative == sorted(negative) and negative == sorted(table["er"])[:5]
    best = tp53.top_patches[0]
    row = table[(table["x"] == best.x) & (table["y"] == best.y)].iloc[0]
    assert row["tp53"] == best.probability and row["width"] == best.width


def _with_threshold(model: DeployedModel, threshold: float) -> DeployedModel:
    return replace(model, config=replace(model.config, decision_threshold=threshold))


def _tissue_rule(reader: SlideReader) -> TissueRule:
    """The tissue rule of the prediction's 20x grid (its own masks, 50% tissue)."""
    params = PredictionParams()
    masks = compute_masks(reader, "S", params.tissue, params.mask_downsample)
    return TissueRule(masks.tissue, masks.downsample, params.grid.min_tissue)


def _first_parents(
    grid: pd.DataFrame, footprint: float, rule: TissueRule
) -> dict[tuple[int, int], tuple[int, int]]:
    """Each 40x window of the 20x patches with enough tissue, with the first patch
    (grid order) that has it."""
    parents: dict[tuple[int, int], tuple[int, int]] = {}
    for x, y in zip(grid["x"], grid["y"], strict=True):
        origins = quadrant_origins(int(x), int(y), footprint)
        for window, keep in zip(origins, rule.keeps(origins, footprint / 2), strict=True):
            if keep:
                parents.setdefault(window, (int(x), int(y)))
    return parents


def _row_of(grid: pd.DataFrame, x: int, y: int) -> int:
    return int(np.flatnonzero((grid["x"] == x).to_numpy() & (grid["y"] == y).to_numpy())[0])


def _parents_in(table: pd.DataFrame) -> dict[tuple[int, int], tuple[int, int]]:
    columns = [table[c].astype(int) for c in ("x", "y", "parent_x", "parent_y")]
    return {(x, y): (px, py) for x, y, px, py in zip(*columns, strict=True)}


def test_an_overlapping_grid_scores_each_40x_window_once(
    scorer: LocalScorer, slide_path: Path, store: ObjectStore
) -> None:
    """Tiled as in training (half-overlapping 20x patches): more 20x patches than the
    plain grid, each 40x window scored once under the first cancer patch that has it,
    whichever scoring request finishes first (small batches, many in flight)."""
    deployment = scorer.deployment()
    overlapping = _params(
        grid=HALF_OVERLAP, batch_size=2, max_in_flight=4, heatmaps=False, cancer_confidence=0.0
    )
    with open_slide(slide_path) as reader:
        plain = predict_slide(
            reader, "PLAIN", store, deployment, scorer, _params(cancer_confidence=0.0)
        )
        every = predict_slide(reader, "HALF", store, deployment, scorer, overlapping)
        masks = compute_masks(reader, "HALF", overlapping.tissue, overlapping.mask_downsample)
        mpp0 = float(reader.mpp[0])
        grid = patch_grid(reader.dimensions, mpp0, masks.tissue, masks.downsample, HALF_OVERLAP)
        rule = _tissue_rule(reader)
    footprint = footprint_px(HALF_OVERLAP, mpp0)
    assert every.status == "ok" and every.params_hash != plain.params_hash
    assert len(grid) == every.tissue_patch_count == every.cancer_patch_count
    assert every.tissue_patch_count > 2 * plain.tissue_patch_count
    table = _table(store, every.patch_table_key)
    assert not table.duplicated(["x", "y"]).any()
    # The windows are the union of the cancer patches' quadrants, each under the first.
    assert _parents_in(table) == _first_parents(grid, footprint, rule)
    assert len(table) < 4 * every.cancer_patch_count
    assert (table["width"] == round(footprint / 2)).all()
    for item in every.biomarkers:
        assert item.patch_count == len(table)
        assert item.probability == pytest.approx(table[item.biomarker].mean(), abs=1e-12)

    # Half the 20x patches above the threshold (their probabilities, from the table:
    # on a half-overlap grid each patch is the first to have its bottom-right quadrant,
    # unless that one lacks tissue).
    cancer = table.groupby(["parent_x", "parent_y"])["cancer_probability"].first()
    assert len(cancer) >= 0.8 * len(grid)
    with open_slide(slide_path) as reader:  # no stain reference: the patches as read
        pixels = np.stack(
            [
                reader.read_patch(int(x), int(y), 512, 0.5)
                for x, y in zip(grid["x"], grid["y"], strict=True)
            ]
        )
    scored = [float(o["probabilities"][-1]) for o in scorer.score(deployment.cancer, pixels)]
    for (x, y), probability in cancer.items():
        assert probability == pytest.approx(scored[_row_of(grid, x, y)], abs=1e-6)
    cancer = pd.Series(scored, index=pd.MultiIndex.from_arrays([grid["x"], grid["y"]]))
    ranked = np.sort(cancer.to_numpy())
    threshold = float(ranked[len(ranked) // 2 - 1] + ranked[len(ranked) // 2]) / 2
    kept = grid[[cancer[(x, y)] > threshold for x, y in zip(grid["x"], grid["y"], strict=True)]]
    with open_slide(slide_path) as reader:
        some = predict_slide(
            reader,
            "HALF",
            store,
            deployment,
            scorer,
            replace(overlapping, cancer_confidence=threshold, high_res_policy="upsample"),
        )
    assert some.cancer_patch_count == len(kept) and some.high_res_source == "upsampled"
    table = _table(store, some.patch_table_key)
    assert not table.duplicated(["x", "y"]).any()
    assert _parents_in(table) == _first_parents(kept, footprint, rule)
    for item in some.biomarkers:
        assert item.probability == pytest.approx(table[item.biomarker].mean(), abs=1e-12)


def test_the_answer_is_the_same_bits_whatever_runs_concurrently(
    scorer: LocalScorer, slide_path: Path, store: ObjectStore
) -> None:
    """One request at a time, or many requests and readers at once: the same 40x rows
    in the same order, the same requests, so the same probabilities to the bit."""
    deployment = scorer.deployment()
    serial = _params(
        grid=HALF_OVERLAP,
        batch_size=2,
        max_in_flight=1,
        reader_threads=1,
        heatmaps=False,
        cancer_confidence=0.0,
    )
    busy = replace(serial, max_in_flight=6, reader_threads=3)
    with open_slide(slide_path) as reader:
        first = predict_slide(reader, "ONE", store, deployment, scorer, serial)
        second = predict_slide(reader, "MANY", store, deployment, scorer, busy)
    one, many = _table(store, first.patch_table_key), _table(store, second.patch_table_key)
    assert len(one) > 8
    pd.testing.assert_frame_equal(
        one.drop(columns="slide_id"), many.drop(columns="slide_id"), check_exact=True
    )
    assert [b.probability for b in first.biomarkers] == [b.probability for b in second.biomarkers]


#: A blur rule eager enough to flag part of any slide: the test below is about the grid
#: leaving out what tiling leaves out, not about how well blur is found.
EAGER_BLUR = TissueParams(blur_fraction=0.9, blur_fine_fraction=0.9)


@pytest.fixture(scope="module")
def blurred_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cancer slide (the third of this cohort, which has a blurred region)."""
    folder = tmp_path_factory.mktemp("blurred")
    generate_cohort(folder, 4, seed=3, preset="tiny", truth_crops=0)
    manifest = pd.read_csv(folder / "manifest.csv")
    return folder / manifest[manifest["slide_id"] == "SYN-SC-0002-01Z-00-DX1"]["slide_path"].iat[0]


def test_the_grid_is_the_one_training_tiled(
    scorer: LocalScorer, blurred_slide: Path, store: ObjectStore
) -> None:
    """Blurred tissue is left out of the 20x grid as tiling leaves it out for training:
    the same patches, so the same stain sample and the same 40x windows."""
    deployment = scorer.deployment()
    params = _params(grid=HALF_OVERLAP, heatmaps=False, cancer_confidence=0.0, tissue=EAGER_BLUR)
    with open_slide(blurred_slide) as reader:
        masks = compute_masks(reader, "B", params.tissue, params.mask_downsample)
        assert masks.blur.any()  # the slide has what the test is about
        tiled = tile_slide(
            reader, "B", store, "tiles/B", TileParams(grid=HALF_OVERLAP, tissue=EAGER_BLUR)
        )
        predicted = predict_slide(reader, "B", store, deployment, scorer, params)
        with_blur = predict_slide(
            reader, "B", store, deployment, scorer, replace(params, exclude_blur=False)
        )
    grid = _table(store, "tiles/B/grid.parquet")
    assert predicted.tissue_patch_count == tiled.patch_count == len(grid)
    assert with_blur.tissue_patch_count > predicted.tissue_patch_count
    assert with_blur.params_hash != predicted.params_hash
    table = _table(store, predicted.patch_table_key)
    tiled_at = set(zip(grid["x"], grid["y"], strict=True))
    assert set(zip(table["parent_x"], table["parent_y"], strict=True)) <= tiled_at
    blurred = _table(store, with_blur.patch_table_key)
    assert not set(zip(blurred["parent_x"], blurred["parent_y"], strict=True)) <= tiled_at


def test_the_digest_covers_the_grid_overlap(scorer: LocalScorer) -> None:
    deployment = scorer.deployment()

    def digest(params: PredictionParams) -> str:
        return prediction_digest(params, deployment, None, "slide-sha256")

    plain = digest(PredictionParams())
    assert digest(PredictionParams(grid=HALF_OVERLAP)) != plain
    assert digest(PredictionParams(grid=GridParams(overlap_px=128))) != digest(
        PredictionParams(grid=HALF_OVERLAP)
    )
    assert digest(PredictionParams(batch_size=4, max_in_flight=8)) == plain  # speed only


def test_no_cancer_patch_is_an_answer_not_an_error(
    scorer: LocalScorer, slide_path: Path, store: ObjectStore
) -> None:
    with open_slide(slide_path) as reader:
        result = predict_slide(
            reader, "S3", store, scorer.deployment(), scorer, _params(cancer_confidence=1.0)
        )
    assert result.status == "no_cancer_patches"
    assert result.biomarkers == [] and result.patch_table_key == ""
    assert result.tissue_patch_count > 0 and result.cancer_patch_count == 0
    assert "no biomarker calls" in result.message
    assert store.exists(f"{result.prefix}/prediction.json")


def test_a_blank_slide_has_no_tissue(
    scorer: LocalScorer, tmp_path: Path, store: ObjectStore
) -> None:
    blank = tmp_path / "blank.png"
    cv2.imwrite(str(blank), np.full((1024, 1024, 3), 242, np.uint8))
    with open_slide(blank, mpp=0.5) as reader:
        result = predict_slide(reader, "BLANK", store, scorer.deployment(), scorer, _params())
    assert result.status == "no_tissue"
    assert result.tissue_patch_count == 0 and result.biomarkers == []
    assert store.exists(result.tissue_mask_key)


def test_a_cancelled_budget_stops_the_work(
    scorer: LocalScorer, slide_path: Path, store: ObjectStore
) -> None:
    checks = iter(range(1000))
    budget = WorkBudget(None, lambda: next(checks) >= 3)
    with open_slide(slide_path) as reader, pytest.raises(Cancelled):
        predict_slide(
            reader,
            "S4",
            store,
            scorer.deployment(),
            scorer,
            _params(cancer_confidence=0.0),
            budget=budget,
        )
    assert not any(info.key.endswith("prediction.json") for info in store.list("runs/"))


def test_a_slide_under_the_qc_floor_gets_qc_failed_and_no_calls(
    scorer: LocalScorer, slide_path: Path, store: ObjectStore
) -> None:
    # The real-slide default: 0.5 mm² of usable tissue; a tiny slide holds less.
    params = _params(cancer_confidence=0.0, qc=QcThresholds())
    with open_slide(slide_path) as reader:
        result = predict_slide(reader, "S5", store, scorer.deployment(), scorer, params)
    assert result.status == "qc_failed"
    assert result.qc["verdict"] == "fail"
    assert any("usable tissue" in reason for reason in result.qc["reasons"])
    assert result.qc["usable_area_mm2"] < 0.5
    assert "usable tissue" in result.message and result.biomarkers == []
    assert result.tissue_patch_count > 0 and not result.patch_table_key
    stored = json.loads(store.get_bytes(f"{result.prefix}/prediction.json"))
    assert stored["status"] == "qc_failed" and stored["qc"] == result.qc
    assert store.exists(result.tissue_mask_key)  # the masks that failed are kept
    # The same slide with the tests' floor passes QC and is predicted.
    with open_slide(slide_path) as reader:
        passed = predict_slide(
            reader, "S5", store, scorer.deployment(), scorer, _params(cancer_confidence=0.0)
        )
    assert passed.status == "ok" and passed.qc["verdict"] in {"pass", "warn"}
    assert passed.qc["tissue_area_mm2"] == result.qc["tissue_area_mm2"]


def test_missing_models_are_named(scorer: LocalScorer) -> None:
    partial = LocalScorer.__new__(LocalScorer)
    partial._models = {k: v for k, v in scorer._models.items() if k != "biomarker_her2"}
    with pytest.raises(FailedPrecondition, match="biomarker_her2"):
        partial.deployment()
    assert partial.deployment(("tp53",)).biomarkers["tp53"].name == "biomarker_tp53"


def test_parameters_are_checked() -> None:
    with pytest.raises(InvalidInput, match="top_k"):
        PredictionParams(top_k=0)
    with pytest.raises(InvalidInput, match="biomarkers"):
        PredictionParams(biomarkers=("tp53", "kras"))
    with pytest.raises(InvalidInput, match="cancer_confidence"):
        PredictionParams(cancer_confidence=1.5)
    with pytest.raises(InvalidInput, match="reinhard"):
        PredictionParams(stain_method="reinhard")  # the 40x patches need a stain matrix
    with pytest.raises(InvalidInput, match="max_patches"):
        PredictionParams(max_patches=-1)  # the slide preparation's own checks run too


def test_busy_meter_measures_the_union_of_requests() -> None:
    now = [0.0]
    meter = BusyMeter(clock=lambda: now[0])
    first = meter.request()
    first.__enter__()
    now[0] = 1.0
    second = meter.request()
    second.__enter__()
    now[0] = 2.0
    first.__exit__(None, None, None)
    now[0] = 3.0
    second.__exit__(None, None, None)
    now[0] = 4.0  # idle between requests
    with meter.request():
        now[0] = 5.0
    summary = meter.summary()
    assert summary["window_s"] == 5.0 and summary["busy_s"] == 4.0
    assert summary["busy_fraction"] == 0.8 and summary["idle_s"] == 1.0
    assert summary["mean_in_flight"] == pytest.approx((2 + 2 + 1) / 5)
