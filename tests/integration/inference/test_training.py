"""Training end to end on synthetic H&E-like patches in a file:// object store.

Twelve patients, one slide each, tiled into JPEG shards the way the tiling service
leaves them. Cancer patches are pink with many dense purple nuclei-like blobs, normal
ones pink with a few small pale blobs, each patient with its own stain shade: the
tiny backbone separates them within a few seconds on CPU.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from services.common.errors import InvalidInput
from services.common.objectstore import ObjectStore, open_store
from services.inference.bundle import load_bundle
from services.inference.calibration import softmax
from services.inference.dataset import PatchReader, ShardCache, build_patch_table
from services.inference.preprocess import to_input
from services.inference.training import TrainConfig, TrainResult, train
from services.slide.shards import ShardWriter

pytestmark = pytest.mark.slow

PATCH_PX = 64
PATCHES_PER_SLIDE = 28
PATIENTS_PER_CLASS = 6


def _patch(rng: np.random.Generator, cancer: bool, shade: np.ndarray) -> np.ndarray:
    """A pink patch with nuclei-like blobs: many dense purple ones for cancer."""
    background = np.array([236.0, 172.0, 204.0]) + shade
    rgb = np.empty((PATCH_PX, PATCH_PX, 3), np.float64)
    rgb[:] = background
    rgb += rng.normal(0, 6, (PATCH_PX, PATCH_PX, 3))
    canvas = np.ascontiguousarray(np.clip(rgb, 0, 255).astype(np.uint8))
    count = int(rng.integers(14, 22)) if cancer else int(rng.integers(2, 5))
    for _ in range(count):
        centre = (int(rng.integers(0, PATCH_PX)), int(rng.integers(0, PATCH_PX)))
        radius = int(rng.integers(3, 6)) if cancer else int(rng.integers(2, 4))
        colour = (95, 45, 150) if cancer else (170, 120, 185)
        jitter = rng.integers(-15, 16, 3)
        cv2.circle(
            canvas,
            centre,
            radius,
            tuple(int(c + j) for c, j in zip(colour, jitter, strict=True)),
            -1,
        )
    return canvas


def _cohort(store: ObjectStore, seed: int = 0) -> pd.DataFrame:
    """Tile the synthetic slides into ``store``; the manifest (slide_id, patient_id, kind)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(2 * PATIENTS_PER_CLASS):
        cancer = i % 2 == 0
        slide_id, patient = f"SYN-{i:02d}", f"P{i:02d}"
        prefix = f"tiles/{slide_id}/h0"
        writer = ShardWriter(store, prefix, "20x", patches_per_shard=10)
        shade = rng.normal(0, 8, 3)
        for k in range(PATCHES_PER_SLIDE):
            writer.add(_patch(rng, cancer, shade), x=k * 512, y=0)
        grid = pd.DataFrame(writer.close())
        buffer = io.BytesIO()
        grid.to_parquet(buffer, index=False)
        store.put_bytes(f"{prefix}/grid.parquet", buffer.getvalue())
        store.put_bytes(f"{prefix}/tile.json", json.dumps({"params_hash": "h0"}).encode())
        rows.append(
            {"slide_id": slide_id, "patient_id": patient, "kind": "cancer" if cancer else "normal"}
        )
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ObjectStore, pd.DataFrame]]:
    store = open_store(tmp_path_factory.mktemp("store").as_uri())
    manifest = _cohort(store)
    table = build_patch_table(store, manifest, "kind", ("normal", "cancer"))
    yield store, table
    store.close()


def _config(tmp: Path, **changes: object) -> TrainConfig:
    config = TrainConfig(
        backbone="tiny",
        input_px=48,
        class_names=("normal", "cancer"),
        model_name="cancer_detector",
        version="test",
        epochs=3,
        batch_size=16,
        lr=3e-3,
        seed=7,
        val_fraction=0.34,
        # The CPU mixed precision, forced on (auto leaves it off on CPUs
        # without AMX, where it is slower).
        mixed_precision="on",
        checkpoint_dir=tmp / "checkpoints",
    )
    return replace(config, **changes)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def trained(
    cohort: tuple[ObjectStore, pd.DataFrame], tmp_path_factory: pytest.TempPathFactory
) -> TrainResult:
    store, table = cohort
    tmp = tmp_path_factory.mktemp("run")
    return train(table, store, _config(tmp), tmp / "bundle", progress=False)


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        torch.testing.assert_close(state_a[key], state_b[key], atol=1e-6, rtol=0, msg=key)


def _without_timing(history: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in r.items() if k not in ("seconds", "patches_per_s")} for r in history]


def test_training_separates_the_classes_and_writes_a_calibrated_bundle(
    trained: TrainResult, cohort: tuple[ObjectStore, pd.DataFrame]
) -> None:
    assert [r["epoch"] for r in trained.history] == [1, 2, 3]
    assert trained.val_auroc > 0.9, trained.history
    assert trained.history[-1]["train_loss"] < trained.history[0]["train_loss"]
    # No patient is on both sides.
    store, table = cohort
    val_patients = set(trained.val_table["patient_id"])
    assert val_patients == set(trained.metrics["val_patients"])
    assert trained.metrics["train"]["patients"] + len(val_patients) == table["patient_id"].nunique()

    folder = trained.bundle_dir
    assert {"weights.pt", "model.json", "metrics.json", "reliability.png"} <= {
        p.name for p in folder.iterdir()
    }
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["temperature"] == pytest.approx(trained.temperature)
    assert metrics["calibration"]["after"]["nll"] <= metrics["calibration"]["before"]["nll"] + 1e-9

    model, config = load_bundle(folder)
    assert config.temperature == pytest.approx(trained.temperature)
    assert config.class_names == ("normal", "cancer") and config.preprocess.input_px == 48
    # The loaded bundle gives the calibrated validation probabilities.
    paths = ShardCache(store, folder.parent / "cache").fetch(trained.val_table["shard"])
    reader = PatchReader(trained.val_table, paths)
    patches = np.stack([reader.read(i) for i in range(len(reader))])
    with torch.inference_mode():
        logits = model(to_input(patches, config.preprocess)).numpy()
    np.testing.assert_allclose(
        softmax(logits, config.temperature),
        softmax(trained.val_logits, trained.temperature),
        atol=1e-5,
    )


def test_a_crashed_run_resumes_to_the_same_weights(
    trained: TrainResult, cohort: tuple[ObjectStore, pd.DataFrame], tmp_path: Path
) -> None:
    store, table = cohort
    config = _config(tmp_path)

    def crash_after_epoch_2(record: dict[str, float]) -> None:
        if record["epoch"] == 2:
            raise KeyboardInterrupt("simulated crash")

    with pytest.raises(KeyboardInterrupt):
        train(
            table,
            store,
            config,
            tmp_path / "bundle",
            progress=False,
            on_epoch_end=crash_after_epoch_2,
        )
    assert not (tmp_path / "bundle" / "model.json").exists()
    resumed = train(table, store, config, tmp_path / "bundle", resume=True, progress=False)
    assert resumed.resumed_from_epoch == 2
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3]
    # Same seed, interrupted or not: the same weights, history and temperature. This
    # is also the determinism check (two separate runs of the same seed).
    _assert_same_weights(resumed.model, trained.model)
    assert _without_timing(resumed.history) == _without_timing(trained.history)
    assert resumed.temperature == pytest.approx(trained.temperature, abs=1e-6)


def test_another_seed_gives_other_weights_and_resume_refuses_other_settings(
    trained: TrainResult, cohort: tuple[ObjectStore, pd.DataFrame], tmp_path: Path
) -> None:
    store, table = cohort
    config = _config(tmp_path, seed=8, epochs=1)
    other = train(table, store, config, tmp_path / "bundle", progress=False)
    first = next(iter(trained.model.state_dict()))
    assert not torch.equal(other.model.state_dict()[first], trained.model.state_dict()[first])
    with pytest.raises(InvalidInput, match=r"other settings.*lr"):
        train(table, store, replace(config, lr=1e-2), tmp_path / "b2", resume=True, progress=False)


def test_bad_inputs_are_refused_with_readable_messages(
    cohort: tuple[ObjectStore, pd.DataFrame], tmp_path: Path
) -> None:
    store, table = cohort
    with pytest.raises(InvalidInput, match="unknown backbone 'vgg'"):
        _config(tmp_path, backbone="vgg")
    with pytest.raises(InvalidInput, match="unknown schedule"):
        _config(tmp_path, schedule="step")
    with pytest.raises(InvalidInput, match="empty"):
        train(table.iloc[:0], store, _config(tmp_path), tmp_path / "b", progress=False)
    one_class = table[table["label"] == 1]
    with pytest.raises(InvalidInput, match="two classes"):
        train(one_class, store, _config(tmp_path), tmp_path / "b", progress=False)
    no_patient = table.assign(patient_id=table["patient_id"].where(table.index > 0, ""))
    with pytest.raises(InvalidInput, match="no patient_id"):
        train(no_patient, store, _config(tmp_path), tmp_path / "b", progress=False)
    with pytest.raises(InvalidInput, match="fewer than one batch"):
        train(table, store, _config(tmp_path, batch_size=10_000), tmp_path / "b", progress=False)
