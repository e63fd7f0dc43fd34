"""``train_cancer_detector``: the paper's split, then the stage-1 model on TorchServe,
with the out-of-distribution reference of the cohort's slides beside it
(``flows.training.ood_reference``)."""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_table_artifact

from flows.runtime.policy import pipeline_task
from flows.runtime.records import CohortRef, ModelRef, Record, Registration, TiledSlide
from flows.training.config import ModelTraining, OodConfig
from flows.training.ingest import read_cohort
from flows.training.ood_reference import OodReference, fit_ood_reference
from flows.training.provenance import training_data
from flows.training.serving import register_model
from flows.training.split import CohortSplit, paper_split
from flows.training.training import LabelledSlide, train_model
from services.common.vocabulary import CANCER_DETECTOR

#: The detector's classes, index order (the last is the positive class).
DETECTOR_CLASSES = ("normal", "cancer")


class DetectorResult(Record):
    """The split, the served cancer detector and its OOD reference."""

    split: CohortSplit
    model: ModelRef
    registration: Registration
    ood: OodReference = OodReference(reason="not fitted")


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
    ood: OodConfig | None = None,
) -> DetectorResult:
    """Split the cohort, train and calibrate the detector, fit the OOD reference,
    store and serve them.

    ``grid_overlap_px`` is the overlap of the 20x grid the slides were tiled on
    (``TilingConfig.overlap_px``): the detector's ``model.json`` records it, and the
    PredictionService tiles new slides with it. The model card states the cohort and
    the detector's slides (``training_data``). ``ood`` says how the OOD reference is
    fitted on the cohort's slides (``OodConfig()`` when None); it is stored beside
    the detector before the detector is registered on TorchServe.
    """
    ood = ood or OodConfig()
    split = split_cohort(cohort, split_seed)
    slides = detector_slides(cohort, split, tiled)
    card = training_data(read_cohort(cohort), cohort.name, [s.slide_id for s in slides])
    model = train_model(CANCER_DETECTOR, DETECTOR_CLASSES, training, slides, grid_overlap_px, card)
    reference = (
        fit_ood_reference(cohort, tiled, ood, model)
        if ood.enabled
        else OodReference(reason="disabled by the configuration")
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
                "ood_threshold": reference.threshold,
                "ood_slides": f"{reference.fit_slides} fit + {reference.calibration_slides}"
                if reference.key
                else reference.reason,
            }
        ],
        key="cancer-detector",
        description=(
            "The stage-1 cancer detector: calibration and validation AUROC, and the "
            "out-of-distribution reference stored beside it."
        ),
    )
    return DetectorResult(split=split, model=model, registration=registration, ood=reference)
