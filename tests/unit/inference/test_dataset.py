"""Patch table, patient split, balanced epochs and shard reading on a tiny store."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from services.common.errors import InvalidInput, NotFound
from services.common.objectstore import ObjectStore, open_store
from services.inference.dataset import (
    PATCH_COLUMNS,
    EpochDataset,
    FittedReader,
    PatchCollate,
    PatchReader,
    ShardCache,
    balanced_epoch_indices,
    build_patch_table,
    encode_labels,
    find_grid_key,
    patient_split,
    seed_worker,
    validate_patch_table,
)
from services.inference.preprocess import PreprocessConfig, fit_to_input
from services.slide.shards import ShardWriter


def _patch(seed: int, side: int = 24) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)


def _seed(slide_id: str, index: int) -> int:
    """The seed of a slide's patch ``index`` (slide ids are S1, S2, ...)."""
    return int(slide_id[1:]) * 100 + index


def _tile(store: ObjectStore, slide_id: str, count: int, params_hash: str = "h1") -> list[dict]:
    """A finished tiling run of ``count`` PNG patches (lossless, so reads are exact)."""
    prefix = f"tiles/{slide_id}/{params_hash}"
    writer = ShardWriter(store, prefix, "20x", image_format="png", patches_per_shard=3)
    for k in range(count):
        writer.add(_patch(_seed(slide_id, k)), x=512 * k, y=1024, tissue_fraction=1.0)
    rows = writer.close()
    buffer = io.BytesIO()
    pd.DataFrame(rows).to_parquet(buffer, index=False)
    store.put_bytes(f"{prefix}/grid.parquet", buffer.getvalue())
    store.put_bytes(f"{prefix}/tile.json", json.dumps({"params_hash": params_hash}).encode())
    return rows


@pytest.fixture
def store(tmp_path: Path) -> ObjectStore:
    store = open_store((tmp_path / "store").as_uri())
    _tile(store, "S1", 5)
    _tile(store, "S2", 4)
    _tile(store, "S3", 2)
    return store


def _manifest() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "slide_id": ["S1", "S2", "S3", "S4"],
            "patient_id": ["P1", "P2", "P3", "P4"],
            "tp53": pd.array([1, 0, 1, None], dtype="Int8"),
        }
    )


def _table(patients: int, per_patient: int, positives: int) -> pd.DataFrame:
    """A synthetic patch table: the first ``positives`` patients have label 1."""
    rows = [
        {
            "slide_id": f"S{p}",
            "patient_id": f"P{p:02d}",
            "label": int(p < positives),
            "shard": f"tiles/S{p}/h/shards/20x-00000.tar",
            "member": f"{k}_0.png",
            "x": k,
            "y": 0,
        }
        for p in range(patients)
        for k in range(per_patient)
    ]
    return pd.DataFrame(rows)


def test_patch_table_joins_grids_with_labels_and_skips_unknown_labels(store: ObjectStore) -> None:
    table = build_patch_table(store, _manifest(), "tp53", ("wildtype", "mutated"))
    assert tuple(table.columns) == PATCH_COLUMNS
    # S4's label is unknown (and it was never tiled): left out, no error.
    assert table.groupby("slide_id").size().to_dict() == {"S1": 5, "S2": 4, "S3": 2}
    assert table.groupby("slide_id")["label"].first().to_dict() == {"S1": 1, "S2": 0, "S3": 1}
    assert table["member"].iloc[1] == "512_1024.png" and table["x"].iloc[1] == 512
    assert table["shard"].iloc[3] == "tiles/S1/h1/shards/20x-00001.tar"


def test_labels_by_name_or_index_and_bad_ones_named() -> None:
    names = ("normal", "cancer")
    assert encode_labels(pd.Series(["cancer", "normal"]), names).tolist() == [1, 0]
    assert encode_labels(pd.Series([1, 0, True]), names).tolist() == [1, 0, 1]
    with pytest.raises(InvalidInput, match="'tumour' is not a class"):
        encode_labels(pd.Series(["tumour"]), names)
    with pytest.raises(InvalidInput, match="not a class index 0-1"):
        encode_labels(pd.Series([2]), names)


def test_grid_lookup_needs_a_finished_and_unambiguous_run(store: ObjectStore) -> None:
    assert find_grid_key(store, "S1") == "tiles/S1/h1/grid.parquet"
    with pytest.raises(NotFound, match="S9"):
        find_grid_key(store, "S9")
    _tile(store, "S1", 2, params_hash="h2")
    with pytest.raises(InvalidInput, match="several tiling runs"):
        find_grid_key(store, "S1")
    assert find_grid_key(store, "S1", "h2") == "tiles/S1/h2/grid.parquet"
    # A run without tile.json is unfinished: ignored.
    store.delete("tiles/S1/h2/tile.json")
    assert find_grid_key(store, "S1") == "tiles/S1/h1/grid.parquet"


def test_patient_split_keeps_patients_apart_and_stratifies() -> None:
    table = _table(patients=20, per_patient=7, positives=5)
    train, val = patient_split(table, 0.2, seed=3)
    assert len(train) + len(val) == len(table)
    assert not set(train["patient_id"]) & set(val["patient_id"])
    # 20% of each class's patients: 1 of 5 positives, 3 of 15 negatives.
    val_patients = val.groupby("label")["patient_id"].nunique().to_dict()
    assert val_patients == {0: 3, 1: 1}
    # Repeatable, independent of row order; another seed gives another split.
    again = patient_split(table.sample(frac=1.0, random_state=1), 0.2, seed=3)[1]
    assert set(again["patient_id"]) == set(val["patient_id"])
    other = patient_split(table, 0.2, seed=4)[1]
    assert set(other["patient_id"]) != set(val["patient_id"])


def test_patient_split_refuses_what_cannot_be_split() -> None:
    with pytest.raises(InvalidInput, match="single patient"):
        patient_split(_table(patients=2, per_patient=3, positives=1), 0.5, seed=0)
    with pytest.raises(InvalidInput, match="val_fraction"):
        patient_split(_table(patients=4, per_patient=3, positives=2), 1.0, seed=0)


def test_balanced_epochs_undersample_with_replacement() -> None:
    labels = np.array([0] * 90 + [1] * 10)
    rows = balanced_epoch_indices(labels, np.random.default_rng(0))
    assert len(rows) == 20
    assert np.bincount(labels[rows]).tolist() == [10, 10]
    # With replacement: over many epochs some minority rows repeat within an epoch.
    epochs = [balanced_epoch_indices(labels, np.random.default_rng(s)) for s in range(20)]
    assert any(len(set(e[labels[e] == 1])) < 10 for e in epochs)
    # A fixed count per class, larger than the minority.
    rows = balanced_epoch_indices(labels, np.random.default_rng(0), per_class=25)
    assert np.bincount(labels[rows]).tolist() == [25, 25]
    # Shuffled: the classes are interleaved, and seeded epochs repeat.
    assert labels[rows[:10]].tolist() != sorted(labels[rows[:10]].tolist())
    np.testing.assert_array_equal(
        rows, balanced_epoch_indices(labels, np.random.default_rng(0), per_class=25)
    )
    with pytest.raises(InvalidInput):
        balanced_epoch_indices(np.array([], int), np.random.default_rng(0))


def test_table_checks_name_the_problem() -> None:
    table = _table(patients=4, per_patient=2, positives=2)
    with pytest.raises(InvalidInput, match="empty"):
        validate_patch_table(table.iloc[:0], 2)
    with pytest.raises(InvalidInput, match="two classes"):
        validate_patch_table(table.assign(label=0), 2)
    with pytest.raises(InvalidInput, match="no patient_id"):
        validate_patch_table(table.assign(patient_id=None), 2)
    with pytest.raises(InvalidInput, match="lacks the column"):
        validate_patch_table(table.drop(columns="member"), 2)
    with pytest.raises(InvalidInput, match="class indices 0-1"):
        validate_patch_table(table.assign(label=table["label"] * 2), 2)


def test_patches_are_read_from_the_cached_shards(store: ObjectStore, tmp_path: Path) -> None:
    table = build_patch_table(store, _manifest(), "tp53", ("wildtype", "mutated"))
    cache = ShardCache(store, tmp_path / "cache")
    paths = cache.fetch(table["shard"])
    assert len(paths) == table["shard"].nunique() == 2 + 2 + 1
    stamps = {key: path.stat().st_mtime_ns for key, path in paths.items()}
    assert cache.fetch(table["shard"]) == paths  # a second fetch reuses the files
    assert {k: p.stat().st_mtime_ns for k, p in paths.items()} == stamps

    reader = PatchReader(table, paths)
    for row in range(len(table)):
        slide_id, k = table["slide_id"][row], int(table["x"][row]) // 512
        np.testing.assert_array_equal(reader.read(row), _patch(_seed(slide_id, k)))
    with pytest.raises(NotFound, match="not in shard"):
        PatchReader(table.assign(member="0_0.jpg"), paths)


def test_fitted_patches_are_resized_once_and_kept_read_only(
    store: ObjectStore, tmp_path: Path
) -> None:
    table = build_patch_table(store, _manifest(), "tp53", ("wildtype", "mutated"))
    reader = PatchReader(table, ShardCache(store, tmp_path / "cache").fetch(table["shard"]))
    fitted = FittedReader(reader, 16, max_bytes=3 * 16 * 16 * 3)  # three 16 px patches
    for row in range(len(table)):
        patch = fitted.read(row)
        assert patch.shape == (16, 16, 3) and patch.dtype == np.uint8
        np.testing.assert_array_equal(patch, fit_to_input(reader.read(row), 16))
    # The first three fit the budget and are the same arrays every time, read-only.
    assert fitted.read(0) is fitted.read(0) and not fitted.read(2).flags.writeable
    assert fitted.read(3) is not fitted.read(3)
    with pytest.raises(ValueError, match="read-only"):
        fitted.read(1)[0, 0, 0] = 0
    # Augmenting a cached patch leaves it as it was.
    before = fitted.read(0).copy()
    EpochDataset(fitted, table["label"].to_numpy(), np.array([0]), 5, 0, augment=True)[0]
    np.testing.assert_array_equal(fitted.read(0), before)


def test_epoch_batches_do_not_depend_on_the_workers(store: ObjectStore, tmp_path: Path) -> None:
    table = build_patch_table(store, _manifest(), "tp53", ("wildtype", "mutated"))
    reader = PatchReader(table, ShardCache(store, tmp_path / "cache").fetch(table["shard"]))
    labels = table["label"].to_numpy()
    rows = np.array([0, 0, 3, 7, 9, 10])  # a row twice: two different augmentations
    dataset = EpochDataset(reader, labels, rows, seed=5, epoch=2, augment=True)
    first, second = dataset[0][0], dataset[1][0]
    assert not np.array_equal(first, second)
    np.testing.assert_array_equal(first, dataset[0][0])

    collate = PatchCollate(PreprocessConfig(input_px=16))

    def batches(workers: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        loader = DataLoader(
            dataset,
            batch_size=4,
            num_workers=workers,
            collate_fn=collate,
            worker_init_fn=seed_worker,
            generator=torch.Generator().manual_seed(0),
        )
        return list(loader)

    inline, parallel = batches(0), batches(2)
    assert [tuple(x.shape) for x, _ in inline] == [(4, 3, 16, 16), (2, 3, 16, 16)]
    for (xa, ya), (xb, yb) in zip(inline, parallel, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert inline[0][1].tolist() == labels[rows[:4]].tolist()
