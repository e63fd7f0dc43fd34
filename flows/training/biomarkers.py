"""``train_biomarkers``: the six stage-2 models on the CD patches, evaluated with TTA.

Per biomarker: the labelled biomarker-set slides with CD patches train a model
(``flows.training.training.train_model``; the slide's label on each of its 40x CD patches),
which is registered on TorchServe. :func:`evaluate_biomarker` then scores every CD
patch of those slides with the bundle as stored and the TorchServe handler's own
functions (``serving_io``: calibrated probabilities averaged over the fixed
test-time transforms), computes patch- and slide-level AUROC, AUPRC and MCC-F1 on
the held-out validation patients (slide score = mean patch probability), and marks
the biomarker-discriminative (BD) patches: called correctly with calibrated
confidence above the threshold. BD patches are chosen on every split; the ``split``
column says which patches the model trained on.

A biomarker whose slides hold fewer than two patients of a class cannot be held out
by patient; it is skipped and listed (a small cohort), never trained on one class.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from flows.runtime.policy import pipeline_task
from flows.runtime.records import (
    BiomarkerResult,
    CdSlide,
    CohortRef,
    ModelRef,
    Record,
    SkippedBiomarker,
)
from flows.runtime.settings import FlowSettings
from flows.training.config import ModelTraining, Selection, training_of
from flows.training.discriminative import write_parquet
from flows.training.ingest import read_cohort
from flows.training.provenance import training_data
from flows.training.serving import register_model
from flows.training.split import untrainable_reason
from flows.training.training import LabelledSlide, patch_table, train_model
from services.analysis.aggregate import patch_and_slide_metrics
from services.common.objectstore import ObjectStore
from services.common.vocabulary import model_name_of
from services.inference.bundle import CONFIG_FILE, WEIGHTS_FILE, load_bundle
from services.inference.dataset import PatchReader, ShardCache
from services.inference.serving_io import patch_outputs, predict, to_batch

BIOMARKER_CLASSES = ("negative", "positive")
#: Patches scored per forward pass in the evaluation.
EVAL_BATCH = 32


class BiomarkerRun(Record):
    """The trained biomarkers and the skipped ones."""

    results: tuple[BiomarkerResult, ...]
    skipped: tuple[SkippedBiomarker, ...]


def biomarker_slides(
    labels: pd.DataFrame, cd_slides: list[CdSlide], biomarker: str
) -> list[LabelledSlide]:
    """The slides with a known label and CD patches, labelled 0/1."""
    indexes = {s.slide_id: s.index_key for s in cd_slides if s.patches_40x > 0}
    known = labels[labels[biomarker].notna() & labels["slide_id"].isin(indexes)]
    return [
        LabelledSlide(
            slide_id=str(row.slide_id),
            patient_id=str(row.patient_id),
            label=int(getattr(row, biomarker)),
            patches_key=indexes[str(row.slide_id)],
        )
        for row in known.itertuples(index=False)
    ]


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def score_patches(
    store: ObjectStore, model_ref: ModelRef, table: pd.DataFrame, cache: Path
) -> pd.DataFrame:
    """Calibrated TTA outputs of every patch of a patch table, with the stored bundle."""
    with tempfile.TemporaryDirectory(prefix="histomarker-eval-") as scratch:
        folder = Path(scratch)
        for name in (WEIGHTS_FILE, CONFIG_FILE):
            store.get_file(f"{model_ref.prefix}/{name}", folder / name)
        network, config = load_bundle(folder)
    reader = PatchReader(table, ShardCache(store, cache).fetch(table["shard"]))
    outputs: list[dict[str, Any]] = []
    for start in range(0, len(table), EVAL_BATCH):
        rows = range(start, min(start + EVAL_BATCH, len(table)))
        x = to_batch([np.stack([reader.read(i) for i in rows])], config)
        probabilities, logits = predict(network, x, config)
        outputs += patch_outputs(probabilities, logits, config)
    return table.assign(
        probability=[float(o["probabilities"][-1]) for o in outputs],
        predicted=[int(o["label_index"]) for o in outputs],
        confidence=[float(o["confidence"]) for o in outputs],
    )


@pipeline_task(task_run_name="evaluate-{biomarker}")
def evaluate_biomarker(
    biomarker: str,
    model: ModelRef,
    slides: list[LabelledSlide],
    threshold: float,
    bootstrap: int,
    run_prefix: str,
) -> BiomarkerResult:
    """TTA scores of all CD patches, validation metrics and BD patches (module doc)."""
    settings = FlowSettings()
    folder = f"{run_prefix}/biomarkers/{biomarker}"
    with settings.open_store() as store:
        table = patch_table(store, slides, BIOMARKER_CLASSES)
        scores = score_patches(store, model, table, settings.work_dir / "shards")
        validation = scores["patient_id"].isin(model.val_patients)
        scores = scores.assign(
            split=np.where(validation, "validation", "train"),
            bd=(scores["predicted"] == scores["label"]) & (scores["confidence"] > threshold),
        )
        metrics = patch_and_slide_metrics(scores[validation], resamples=bootstrap, seed=0)
        evaluation = {
            "biomarker": biomarker,
            "model": model.model_dump(mode="json"),
            "tta": True,
            **metrics.as_dict(),
            "validation_metrics": {
                "patch_auroc": metrics.patch.auroc.as_dict(),
                "slide_auroc": metrics.slide.auroc.as_dict(),
                "patch_auprc": metrics.patch.auprc.as_dict(),
                "slide_auprc": metrics.slide.auprc.as_dict(),
                "slide_mcc_f1": metrics.slide.mcc_f1.as_dict(),
                "slide_count": len(metrics.slides),
                "patch_count": int(validation.sum()),
            },
        }
        scores_key = write_parquet(store, f"{folder}/patch_scores.parquet", scores)
        evaluation_key = f"{folder}/evaluation.json"
        store.put_bytes(
            evaluation_key,
            json.dumps(evaluation, indent=2, default=_json_default).encode(),
            content_type="application/json",
        )
    return BiomarkerResult(
        biomarker=biomarker,
        model=model,
        scores_key=scores_key,
        evaluation_key=evaluation_key,
        bd_patches=int(scores["bd"].sum()),
        patch_auroc=_finite(metrics.patch.auroc.value),
        slide_auroc=_finite(metrics.slide.auroc.value),
    )


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON")


@flow(name="train_biomarkers", log_prints=True)
def train_biomarkers(
    cohort: CohortRef,
    cd_slides: list[CdSlide],
    biomarkers: tuple[str, ...],
    training: ModelTraining,
    selection: Selection,
    bootstrap: int,
    run_prefix: str,
    grid_overlap_px: int = 0,
    biomarker_epochs: dict[str, int] | None = None,
) -> BiomarkerRun:
    """Train, serve and evaluate one model per biomarker (see the module docstring).

    ``grid_overlap_px`` is the overlap of the 20x grid the slides were tiled on
    (``TilingConfig.overlap_px``), recorded in each model's ``model.json``.
    ``biomarker_epochs`` gives some biomarkers their own epochs
    (``PipelineConfig.biomarker_epochs``); the others train ``training.epochs``.

    Models train and are evaluated one after another (both are CPU-bound, and
    building a network draws from torch's global generator, which training seeds);
    the registration of one on TorchServe overlaps the next one's training.
    """
    logger = get_run_logger()
    labels = read_cohort(cohort)
    skipped: list[SkippedBiomarker] = []
    results: list[BiomarkerResult] = []
    pending = []
    for biomarker in biomarkers:
        slides = biomarker_slides(labels, cd_slides, biomarker)
        frame = pd.DataFrame(
            {"patient_id": [s.patient_id for s in slides], biomarker: [s.label for s in slides]}
        )
        reason = untrainable_reason(frame, biomarker) if slides else "no slide with CD patches"
        if reason is not None:
            logger.warning("%s skipped: %s", biomarker, reason)
            skipped.append(SkippedBiomarker(biomarker=biomarker, reason=reason))
            continue
        own = training_of(biomarker, training, biomarker_epochs or {})
        card = training_data(labels, cohort.name, [s.slide_id for s in slides])
        model = train_model(
            model_name_of(biomarker), BIOMARKER_CLASSES, own, slides, grid_overlap_px, card
        )
        pending.append(register_model.submit(model))
        results.append(
            evaluate_biomarker(biomarker, model, slides, selection.threshold, bootstrap, run_prefix)
        )
    for registration in pending:
        registration.result()
    create_table_artifact(
        [
            {
                "biomarker": r.biomarker,
                "model": r.model.name,
                "version": r.model.version,
                "temperature": round(r.model.temperature, 4),
                "patch_auroc_tta": r.patch_auroc,
                "slide_auroc_tta": r.slide_auroc,
                "bd_patches": r.bd_patches,
            }
            for r in results
        ]
        + [{"biomarker": s.biomarker, "model": "skipped", "version": s.reason} for s in skipped],
        key="biomarker-models",
        description="Biomarker models: validation AUROC with TTA at patch and slide level.",
    )
    return BiomarkerRun(results=tuple(results), skipped=tuple(skipped))
