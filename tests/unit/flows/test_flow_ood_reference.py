"""What the training flow puts on the model cards and beside the cancer detector: the
cohort a model learned from (``flows.training.provenance``) and the out-of-distribution
reference fitted on the cohort's slides (``flows.training.ood_reference``)."""

from __future__ import annotations

import io

import pandas as pd
import pytest

from flows.runtime.records import TiledSlide
from flows.training.config import OodConfig, PipelineConfig
from flows.training.ood_reference import (
    build_reference,
    describe_slide,
    reference_split,
    usable_slides,
)
from flows.training.provenance import is_synthetic, slide_sites, training_data
from services.common.objectstore import ObjectStore, open_store
from services.inference.ood import MIN_CALIBRATION_SLIDES, OodDetector
from services.prediction.ood_check import PATCHES_PER_SLIDE_KEY
from services.slide.grid import GridParams
from services.slide.prepare import PrepParams, prepare_slide
from services.slide.reader import open_slide
from services.synth.cohort import generate_cohort

# -- the model card's training_data -------------------------------------------------


def _manifest(
    patients: list[str], sites: list[str] | None = None, **extra: list[str]
) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "slide_id": [f"{p}-01Z-00-DX1" for p in patients],
            "patient_id": patients,
            "site": sites if sites is not None else [""] * len(patients),
            **extra,
        }
    )


def test_a_synthetic_cohort_is_known_by_its_truth_columns_or_its_ids() -> None:
    ids = ["SYN-SA-0001", "SYN-SB-0002"]
    assert is_synthetic(_manifest(ids)) is True
    renamed = ["P1", "P2"]
    assert is_synthetic(_manifest(renamed, truth_masks=["a", "b"])) is True
    assert is_synthetic(_manifest(["TCGA-A2-A0T2", "TCGA-E2-A14V"])) is False
    assert is_synthetic(_manifest(renamed)) is None  # an in-house cohort: not said
    assert is_synthetic(_manifest(["SYN-SA-0001", "TCGA-A2-A0T2"])) is None


def test_sites_come_from_the_site_column_else_from_the_ids() -> None:
    table = _manifest(["TCGA-A2-A0T2", "TCGA-E2-A14V", "P7"], sites=["", "XX", ""])
    assert slide_sites(table) == ["A2", "XX"]  # P7 has neither: no site


def test_the_card_counts_the_models_own_slides_and_patients() -> None:
    table = pd.concat(
        [
            _manifest(["SYN-SA-0001", "SYN-SB-0002", "SYN-SC-0003"], sites=["SA", "SB", "SC"]),
            pd.DataFrame(
                {
                    "slide_id": ["SYN-SA-0001-11A-00-DX1"],
                    "patient_id": ["SYN-SA-0001"],
                    "site": ["SA"],
                }
            ),
        ],
        ignore_index=True,
    )
    card = training_data(table, "demo", ["SYN-SA-0001-01Z-00-DX1", "SYN-SA-0001-11A-00-DX1"])
    assert card == {
        "cohort": "demo",
        "synthetic": True,
        "sites": ["SA"],
        "n_slides": 2,
        "n_patients": 1,
    }


# -- which slides fit the reference and which set its threshold ---------------------


def test_the_split_keeps_patients_whole_is_seeded_and_bounded() -> None:
    slides = [f"S{i:02d}" for i in range(30)]
    patients = {s: f"P{int(s[1:]) // 2}" for s in slides}  # two slides a patient
    config = OodConfig(max_slides=20, calibration_fraction=0.3, seed=1)
    fit, calibration = reference_split(slides, patients, config)
    assert len(fit) + len(calibration) == 20
    assert len(calibration) == 6  # ceil(0.3 x 20), in whole patients
    assert not {patients[s] for s in fit} & {patients[s] for s in calibration}
    assert reference_split(list(reversed(slides)), patients, config) == (fit, calibration)
    other = reference_split(slides, patients, config.model_copy(update={"seed": 2}))
    assert other != (fit, calibration)
    few = reference_split(slides[:8], patients, OodConfig())
    assert len(few[1]) >= MIN_CALIBRATION_SLIDES  # the calibration floor first


def test_failed_and_empty_slides_do_not_enter_the_reference() -> None:
    def tiled(slide_id: str, patches: int, verdict: str) -> TiledSlide:
        return TiledSlide(
            slide_id=slide_id,
            slide_key=f"slides/{slide_id}.tiff",
            params_hash="h",
            grid_key=f"tiles/{slide_id}/h/grid.parquet",
            patch_count=patches,
            patch_px=512,
            patch_mpp=0.5,
            qc_verdict=verdict,
        )

    slides = [tiled("A", 4, "pass"), tiled("B", 4, "warn"), tiled("C", 0, "pass")]
    slides.append(tiled("D", 9, "fail"))
    assert [t.slide_id for t in usable_slides(slides)] == ["A", "B"]


def test_the_pipeline_fits_a_reference_unless_told_not_to() -> None:
    assert PipelineConfig().ood.enabled and PipelineConfig().ood.max_patches_per_slide == 32


# -- the reference fitted from stored slides and grids ------------------------------

SLIDES = 3
VARIANTS = 6  # each slide enters as six "slides", each a sixth of its grid


@pytest.fixture(scope="module")
def stored_cohort(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[ObjectStore, pd.DataFrame, list[TiledSlide]]:
    """Three generated slides in a file:// store, each as six slides of a patient whose
    grids hold every sixth patch of its half-overlapping 512 px grid."""
    root = tmp_path_factory.mktemp("ood-cohort")
    generate_cohort(root / "cohort", SLIDES, seed=4, preset="tiny", truth_crops=0)
    store = open_store((root / "store").as_uri())
    params = PrepParams(grid=GridParams(overlap_px=256))
    rows, tiled = [], []
    for i, path in enumerate(sorted((root / "cohort" / "slides").glob("*.tiff"))):
        key = f"slides/{path.name}"
        store.put_file(key, path)
        with open_slide(path) as reader:
            grid = prepare_slide(reader, path.stem, params).grid
        for j in range(VARIANTS):
            slide_id = f"S{i}V{j}"
            buffer = io.BytesIO()
            grid.iloc[j::VARIANTS].to_parquet(buffer, index=False)
            grid_key = f"tiles/{slide_id}/h/grid.parquet"
            store.put_bytes(grid_key, buffer.getvalue())
            count = len(grid.iloc[j::VARIANTS])
            tiled.append(
                TiledSlide(
                    slide_id=slide_id,
                    slide_key=key,
                    params_hash="h",
                    grid_key=grid_key,
                    patch_count=count,
                    patch_px=512,
                    patch_mpp=0.5,
                    qc_verdict="pass",
                )
            )
            rows.append({"slide_id": slide_id, "patient_id": f"P{i}"})
    return store, pd.DataFrame(rows), tiled


def test_the_reference_is_fitted_on_stored_slides_and_stored(
    stored_cohort: tuple[ObjectStore, pd.DataFrame, list[TiledSlide]],
) -> None:
    store, table, tiled = stored_cohort
    config = OodConfig(max_patches_per_slide=8)
    key = "models/cancer_detector/v1/ood.json"
    reference = build_reference(store, table, tiled, config, key, "tiny")
    assert reference.key == key and reference.reason == ""
    # Three patients of six slides: one patient holds out six, two fit twelve.
    assert (reference.fit_slides, reference.calibration_slides) == (12, 6)
    assert reference.patches == sum(min(t.patch_count, 8) for t in tiled)
    detector = OodDetector.from_json(store.get_bytes(key).decode())
    assert detector.threshold == reference.threshold > 0
    assert detector.training[PATCHES_PER_SLIDE_KEY] == 8
    assert detector.training["train_slides"] == 12
    assert "cohort tiny" in detector.training["description"]


def test_too_few_slides_store_no_reference_and_say_why(
    stored_cohort: tuple[ObjectStore, pd.DataFrame, list[TiledSlide]],
) -> None:
    store, table, tiled = stored_cohort
    key = "models/cancer_detector/v2/ood.json"
    reference = build_reference(store, table, tiled[:12], OodConfig(), key)
    assert reference.key == "" and reference.threshold is None
    assert "12 usable slides" in reference.reason and "at least 15" in reference.reason
    assert not store.exists(key)


def test_a_tiled_slide_is_read_from_its_grid_in_the_store(
    stored_cohort: tuple[ObjectStore, pd.DataFrame, list[TiledSlide]],
) -> None:
    store, _, tiled = stored_cohort
    desc = describe_slide(store, tiled[0], 2)
    assert desc.shape[0] == min(2, tiled[0].patch_count)
    assert (desc == describe_slide(store, tiled[0], 2)).all()
