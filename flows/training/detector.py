"""``train_cancer_detector``: the paper's split, then the stage-1 model on TorchServe."""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_table_artifact

from flows.runtime.policy import pipeline_task
from flows.runtime.records import CohortRef, ModelRef, Record, Registration, TiledSlide
from flows.training.config import ModelTraining
from flows.training.ingest import read_cohort
from flows.training.serving import register_model
from flows.training.split import CohortSplit, paper_split
from flows.training.training import LabelledSlide, train_model
from services.common.vocabulary import CANCER_DETECTOR

#: The detector's classes, index order (the last is the positive class).
DETECTOR_CLASSES = ("normal", "cancer")


class DetectorResult(Record):
    """The split and the served cancer detector."""

    split: CohortSplit
    model: ModelRef
    registration: Registration


@pipeline_task()
def split_cohort(cohort: CohortRef, seed: int) -> CohortSplit:
    """The paper's split of the stored cohort (see ``flows.training.split``)."""
    return paper_split(read_cohort(cohort), seed)


def detector_slides(
    cohort: CohortRef, split: CohortSplit, tiled: list[TiledSlide]
) -> list[LabelledSlide]:
    """The detector's training slides, labelled normal (0) or cancer (1)."""
    table = read_cohort(cohort).set_index("slide_id")
    grids = {t.slide_id: t.grid_key for t in tiled if t.patch_count > 0}
    return [
        LabelledSlide(
            slide_id=slide_id,
            patient_id=str(table.at[slide_id, "patient_id"]),
            label=DETECTOR_CLASSES.index(str(table.at[slide_id, "kind"])),
            patches_key=grids[slide_id],
        )
        for slide_id in split.detector
        if slide_id in grids
    ]


@flow(name="train_cancer_detector", log_prints=True)
def train_cancer_detector(
    cohort: CohortRef,
    tiled: list[TiledSlide],
    training: ModelTraining,
    split_seed: int = 0,
    grid_overlap_px: int = 0,
) -> DetectorResult:
    """Split the cohort, train and calibrate the detector, store and serve it.

    ``grid_overlap_px`` is the overlap of the 20x grid the slides were tiled on
    (``TilingConfig.overlap_px``): the detector's ``model.json`` records it, and the
    PredictionService tiles new slides with it.
    """
    split = split_cohort(cohort, split_seed)
    model = train_model(
        CANCER_DETECTOR,
        DETECTOR_CLASSES,
        training,
        detector_slides(cohort, split, tiled),
        grid_overlap_px,
    )
    registration = register_model(model)
    create_table_artifact(
        [
            {
                "model": model.name,
                "version": model.version,
                "temperature": round(model.temperature, 4),
                "val_patch_auroc": model.val_auroc,
                "detector_slides": len(split.detector),
                "biomarker_slides": len(split.biomarker),
                "ready_workers": registration.ready_workers,
            }
        ],
        key="cancer-detector",
        description="The stage-1 cancer detector: calibration and validation AUROC.",
    )
    return DetectorResult(split=split, model=model, registration=registration)
