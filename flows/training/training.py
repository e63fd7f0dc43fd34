"""Training one patch classifier from stored patches, and publishing it.

:func:`train_model` is the task both stages use: it builds the patch table from
the slides' patch indexes (``build_patch_table``), trains and calibrates with
``services.inference.training.train`` (resuming from its epoch checkpoint after a
crash), packs the ``.mar`` and puts the bundle under ``models/{name}/{version}/``
with ``model.json`` last. The version is a digest of the training inputs: the same
patches and settings give the same version, so a rerun reuses it. The bundle's
``model.json`` states what the model was trained on (``training_data``, from
``flows.training.provenance``), and so does the archive's.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pandas as pd
from prefect import get_run_logger

from flows.runtime.policy import input_digest, pipeline_task
from flows.runtime.records import ModelRef, Record
from flows.runtime.settings import FlowSettings
from flows.training.config import ModelTraining
from services.common.objectstore import ObjectStore
from services.inference.archive import build_mar
from services.inference.bundle import METRICS_FILE, load_config, write_config
from services.inference.dataset import build_patch_table
from services.inference.registry import archive_key, publish_bundle
from services.inference.training import TrainConfig, train

#: Length of a model version (hex digits of the inputs' digest).
VERSION_DIGITS = 12


class LabelledSlide(Record):
    """One training slide: its patient, class index and patch index in the store.

    Attributes:
        slide_id: The slide.
        patient_id: Its patient (the train/validation split is by patient).
        label: Class index into the model's class names.
        patches_key: Parquet with ``shard``, ``member``, ``x``, ``y`` per patch
            (TilingService's ``grid.parquet`` or its 40x index).
    """

    slide_id: str
    patient_id: str
    label: int
    patches_key: str


def train_config(
    name: str,
    class_names: tuple[str, ...],
    training: ModelTraining,
    version: str,
    grid_overlap_px: int,
) -> TrainConfig:
    """The TrainConfig of a model (folders are set by the caller); ``grid_overlap_px``
    is the overlap of the 20x grid its patches came from (``TilingConfig.overlap_px``),
    recorded in its ``model.json``."""
    return TrainConfig(
        backbone=training.backbone,
        input_px=training.input_px,
        class_names=class_names,
        model_name=name,
        version=version,
        epochs=training.epochs,
        batch_size=training.batch_size,
        lr=training.lr,
        seed=training.seed,
        val_fraction=training.val_fraction,
        max_patches_per_epoch=training.max_patches_per_epoch,
        max_val_patches=training.max_val_patches,
        mixed_precision=training.mixed_precision,
        weights_path=training.weights_path,
        tta=training.tta,
        grid_overlap_px=grid_overlap_px,
        threads=training.threads,
    )


def model_version(
    name: str, class_names: tuple[str, ...], training: ModelTraining, table: pd.DataFrame
) -> str:
    """Digest of what decides the weights: the settings and the patch table (whose
    shard keys name the tiling, so its grid overlap too)."""
    rows = table[["slide_id", "patient_id", "label", "shard", "member"]].astype(str)
    return input_digest(name, class_names, training, rows.to_numpy().tolist())[:VERSION_DIGITS]


def patch_table(
    store: ObjectStore, slides: list[LabelledSlide], class_names: tuple[str, ...]
) -> pd.DataFrame:
    """The patch table of the slides (``services.inference.dataset``)."""
    manifest = pd.DataFrame(
        {
            "slide_id": [s.slide_id for s in slides],
            "patient_id": [s.patient_id for s in slides],
            "label": [s.label for s in slides],
        }
    )
    keys = {s.slide_id: s.patches_key for s in slides}
    return build_patch_table(store, manifest, "label", class_names, grid_keys=keys)


@pipeline_task(task_run_name="train-{name}")
def train_model(
    name: str,
    class_names: tuple[str, ...],
    training: ModelTraining,
    slides: list[LabelledSlide],
    grid_overlap_px: int,
    training_data: dict[str, Any] | None = None,
) -> ModelRef:
    """Train, calibrate, archive and store one model (see the module docstring).

    ``grid_overlap_px`` is the overlap of the 20x grid the slides were tiled on
    (``TilingConfig.overlap_px``, px at 20x): the bundle records it for prediction.
    ``training_data`` (cohort, synthetic, sites, n_slides, n_patients:
    ``flows.training.provenance.training_data``) goes on the model card as it is;
    None leaves it empty. It does not enter the version, which the weights decide.
    """
    logger = get_run_logger()
    settings = FlowSettings()
    with settings.open_store() as store:
        table = patch_table(store, slides, class_names)
        version = model_version(name, class_names, training, table)
        work = settings.work_dir / "models" / name / version
        config = replace(
            train_config(name, class_names, training, version, grid_overlap_px),
            checkpoint_dir=work / "checkpoints",
            cache_dir=settings.work_dir / "shards",
        )
        logger.info("training %s %s on %d patches", name, version, len(table))
        result = train(
            table,
            store,
            config,
            work / "bundle",
            resume=True,
            progress=False,
            on_epoch_end=lambda record: logger.info("%s epoch %s", name, record),
        )
        card = load_config(result.bundle_dir).with_training_data(training_data)
        write_config(result.bundle_dir, card)  # before the archive, which packs it
        mar = build_mar(result.bundle_dir, work / "archive")
        prefix = publish_bundle(store, result.bundle_dir, mar)
        archive = archive_key(name, version)
    metrics = json.loads((result.bundle_dir / METRICS_FILE).read_text())
    return ModelRef(
        name=name,
        version=version,
        prefix=prefix,
        archive_key=archive,
        temperature=float(result.temperature),
        val_auroc=metrics.get("val_auroc"),
        val_patients=tuple(metrics.get("val_patients", ())),
    )
