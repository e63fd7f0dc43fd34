"""Tiny models for tests that need TorchServe serving something (seconds to train).

Synthetic 20x patch shards stored as a tiling run would store them (pink patches,
dense purple blobs for the positive class), a ``tiny`` backbone trained on them for
an epoch or two, the bundle packed as a ``.mar`` and published under
``models/{name}/{version}/``. The models only have to exist and be deterministic;
what they learn does not matter.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import pandas as pd

from services.common.objectstore import ObjectStore
from services.common.vocabulary import (
    BIOMARKERS,
    CANCER_DETECTOR,
    biomarker_of_model,
    model_name_of,
)

if TYPE_CHECKING:
    from services.prediction.models import LocalScorer

#: Every model of the method: the detector and one per biomarker.
ALL_MODELS = (CANCER_DETECTOR, *(model_name_of(b) for b in BIOMARKERS))
PATCH_PX = 48
PATCHES_PER_SLIDE = 16


def patch_image(rng: np.random.Generator, positive: bool) -> np.ndarray:
    """A ``PATCH_PX`` RGB patch: pink with purple blobs, many dense ones if positive."""
    canvas = np.clip(
        np.array([236.0, 172.0, 204.0]) + rng.normal(0, 6, (PATCH_PX, PATCH_PX, 3)), 0, 255
    ).astype(np.uint8)
    canvas = np.ascontiguousarray(canvas)
    for _ in range(int(rng.integers(10, 16)) if positive else int(rng.integers(1, 4))):
        centre = (int(rng.integers(0, PATCH_PX)), int(rng.integers(0, PATCH_PX)))
        colour = (95, 45, 150) if positive else (170, 120, 185)
        cv2.circle(canvas, centre, int(rng.integers(2, 5)), colour, -1)
    return canvas


def training_cohort(store: ObjectStore, slides: int) -> pd.DataFrame:
    """``slides`` slides of stored patch shards, alternating positive and negative.

    Returns:
        Their manifest (slide_id, patient_id, kind and one column per biomarker).
    """
    from services.slide.shards import ShardWriter

    rng = np.random.default_rng(0)
    rows = []
    for i in range(slides):
        positive = i % 2 == 0
        slide_id = f"TRAIN-{i:02d}"
        prefix = f"tiles/{slide_id}/h0"
        writer = ShardWriter(store, prefix, "20x", patches_per_shard=PATCHES_PER_SLIDE)
        for k in range(PATCHES_PER_SLIDE):
            writer.add(patch_image(rng, positive), x=k * 512, y=0)
        buffer = io.BytesIO()
        pd.DataFrame(writer.close()).to_parquet(buffer, index=False)
        store.put_bytes(f"{prefix}/grid.parquet", buffer.getvalue())
        store.put_bytes(f"{prefix}/tile.json", json.dumps({"params_hash": "h0"}).encode())
        row = {"slide_id": slide_id, "patient_id": f"P{i:02d}"}
        row["kind"] = "cancer" if positive else "normal"
        row.update({b: int(positive) for b in BIOMARKERS})
        rows.append(row)
    return pd.DataFrame(rows)


def train_tiny(
    store: ObjectStore, manifest: pd.DataFrame, name: str, out: Path, detector_epochs: int = 1
) -> Path:
    """Train model ``name`` (version "1") on ``manifest``; returns its bundle folder."""
    from services.inference.dataset import build_patch_table
    from services.inference.training import TrainConfig, train

    detector = name == CANCER_DETECTOR
    column = "kind" if detector else biomarker_of_model(name)
    classes = ("normal", "cancer") if detector else ("negative", "positive")
    table = build_patch_table(store, manifest, column, classes)
    config = TrainConfig(
        backbone="tiny",
        input_px=32,
        class_names=classes,
        model_name=name,
        version="1",
        epochs=detector_epochs if detector else 1,
        batch_size=16,
        lr=3e-3,
        seed=1,
        val_fraction=0.5,
        augment=False,
        mixed_precision="off",
        checkpoint_dir=out / "checkpoints",
    )
    return train(table, store, config, out / "bundle", progress=False).bundle_dir


def publish_models(
    store: ObjectStore, bundles: Mapping[str, Path], model_store: Path
) -> dict[str, Path]:
    """Pack each bundle as a ``.mar`` in ``model_store`` (two at a time) and publish it
    with its bundle in the store; returns the archives by model name."""
    from services.inference.archive import build_mar
    from services.inference.registry import publish_bundle

    names: Sequence[str] = list(bundles)
    with ThreadPoolExecutor(2) as pool:
        built = pool.map(lambda n: build_mar(bundles[n], model_store), names)
        mars = dict(zip(names, built, strict=True))
    for name in names:
        publish_bundle(store, bundles[name], mars[name])
    return mars


def untrained_scorer(folder: Path, input_px: int = 32, **config: Any) -> LocalScorer:
    """The seven models as tiny networks with random weights, scored in this process:
    for tests that stop before any score matters (input checks, fuzzing); ``config``
    adds ``ModelConfig`` fields (temperature, TTA views)."""
    import torch

    from services.inference.backbones import build_backbone
    from services.inference.bundle import ModelConfig, save_bundle
    from services.inference.preprocess import PreprocessConfig
    from services.prediction.models import LocalScorer

    bundles = {}
    for seed, name in enumerate([CANCER_DETECTOR, *(model_name_of(b) for b in BIOMARKERS)]):
        torch.manual_seed(seed)
        classes = ("normal", "cancer") if name == CANCER_DETECTOR else ("negative", "positive")
        model_config = ModelConfig(
            name=name,
            version="1",
            backbone="tiny",
            class_names=classes,
            preprocess=PreprocessConfig(input_px=input_px),
            **config,
        )
        model = build_backbone("tiny", 2, input_px=input_px)
        bundles[name] = save_bundle(folder / name, model, model_config)
    return LocalScorer(bundles)
