"""Bag files: round trip, validation, atomic writes, resumable writing, merging."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from services.common.errors import AlreadyExists, InvalidInput, NotFound
from services.mil import bags as bags_module
from services.mil.bags import Bag, BagWriter, merge_bags, read_bag, save_bag, write_bag

ATTRS: dict[str, Any] = {
    "slide_id": "SYN-SA-0002-01Z-00-DX1",
    "encoder": "uni",
    "encoder_sha256": "ab" * 32,
    "patch_px": 224,
    "patch_mpp": 0.5,
    "level0_mpp": 0.25,
}


def _arrays(n: int = 50, dim: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(n, dim)).astype(np.float32)
    coords = rng.integers(0, 100_000, size=(n, 2)).astype(np.int64)
    return features, coords


def _assert_same(a: Bag, b: Bag) -> None:
    np.testing.assert_array_equal(a.features, b.features)
    np.testing.assert_array_equal(a.coords, b.coords)
    assert a.attributes() == b.attributes()


def test_round_trip_keeps_arrays_dtypes_and_attributes(tmp_path: Path) -> None:
    features, coords = _arrays()
    path = write_bag(tmp_path / "bag.h5", features, coords, **ATTRS)
    bag = read_bag(path)
    assert bag.features.dtype == np.float32 and bag.coords.dtype == np.int64
    np.testing.assert_array_equal(bag.features, features)
    np.testing.assert_array_equal(bag.coords, coords)
    assert bag.attributes() == {**ATTRS, "format_version": bags_module.FORMAT_VERSION}
    assert (bag.n_patches, bag.feature_dim, bag.slide_ids) == (50, 8, (ATTRS["slide_id"],))
    # The file itself has the CLAM/TRIDENT layout.
    with h5py.File(path) as handle:
        assert handle["features"].dtype == np.float32 and handle["features"].shape == (50, 8)
        assert handle["coords"].dtype == np.int64 and handle["coords"].shape == (50, 2)
    _assert_same(read_bag(save_bag(tmp_path / "again.h5", bag)), bag)


def test_an_empty_bag_is_stored_and_read(tmp_path: Path) -> None:
    bag = read_bag(write_bag(tmp_path / "e.h5", np.zeros((0, 4)), np.zeros((0, 2)), **ATTRS))
    assert bag.features.shape == (0, 4) and bag.coords.shape == (0, 2)


@pytest.mark.parametrize(
    ("features", "coords", "message"),
    [
        (np.zeros((3, 4)), np.zeros((2, 2), np.int64), "3 feature rows but 2 coords"),
        (np.zeros(4), np.zeros((4, 2), np.int64), "features must be (N, D)"),
        (np.zeros((3, 4)), np.zeros((3, 3), np.int64), "coords must be (N, 2)"),
        (np.zeros((3, 4)), np.zeros((3, 2)), "coords must be integers"),
        (np.full((3, 4), np.nan), np.zeros((3, 2), np.int64), "NaN"),
    ],
)
def test_bad_arrays_are_refused_and_nothing_is_written(
    tmp_path: Path, features: np.ndarray, coords: np.ndarray, message: str
) -> None:
    with pytest.raises(InvalidInput, match=message.replace("(", r"\(").replace(")", r"\)")):
        write_bag(tmp_path / "bag.h5", features, coords, **ATTRS)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "bag.h5"
    old = read_bag(write_bag(path, *_arrays(seed=1), **ATTRS))

    def broken(handle: Any, attrs: dict[str, Any]) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(bags_module, "_set_attributes", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        write_bag(path, *_arrays(seed=2), **ATTRS)
    assert [p.name for p in tmp_path.iterdir()] == ["bag.h5"]
    monkeypatch.undo()
    _assert_same(read_bag(path), old)


def _rewrite(path: Path, edit: Any) -> None:
    with h5py.File(path, "r+") as handle:
        edit(handle)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda h: h.__delitem__("coords"), "dataset 'coords' is missing"),
        (lambda h: h.attrs.__delitem__("encoder"), "attribute 'encoder' is missing"),
        (lambda h: h.attrs.__setitem__("patch_mpp", -1.0), "patch_mpp must be a positive"),
        (lambda h: h.attrs.__setitem__("format_version", 99), "format_version 99"),
        (lambda h: h.attrs.__setitem__("slide_id", ""), "'slide_id' is empty"),
    ],
)
def test_read_names_the_file_and_what_is_wrong(tmp_path: Path, edit: Any, message: str) -> None:
    path = write_bag(tmp_path / "bag.h5", *_arrays(), **ATTRS)
    _rewrite(path, edit)
    with pytest.raises(InvalidInput, match=message) as caught:
        read_bag(path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_read_refuses_missing_and_foreign_files(tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        read_bag(tmp_path / "nothing.h5")
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(InvalidInput, match=r"text\.h5"):
        read_bag(tmp_path / "text.h5")


def test_int32_coords_and_float64_features_are_converted(tmp_path: Path) -> None:
    features, coords = _arrays()
    path = tmp_path / "clam.h5"
    with h5py.File(path, "w") as handle:
        handle["features"] = features.astype(np.float64)
        handle["coords"] = coords.astype(np.int32)
        for name, value in {**ATTRS, "format_version": 1}.items():
            handle.attrs[name] = value
    bag = read_bag(path)
    assert bag.features.dtype == np.float32 and bag.coords.dtype == np.int64
    np.testing.assert_array_equal(bag.coords, coords)


def test_writer_resumes_after_close_and_matches_a_whole_write(tmp_path: Path) -> None:
    features, coords = _arrays(n=700, dim=6)
    whole = read_bag(write_bag(tmp_path / "whole.h5", features, coords, **ATTRS))
    path = tmp_path / "chunked.h5"
    with BagWriter(path, feature_dim=6, **ATTRS) as writer:
        assert writer.done == 0
        writer.append(coords[:300], features[:300])
        assert writer.append(coords[300:450], features[300:450]) == 450
    # Stopped: only the partial file exists, and it is no bag yet.
    assert not path.exists() and (tmp_path / "chunked.h5.partial").exists()
    with BagWriter(path, feature_dim=6, **ATTRS) as writer:
        assert writer.done == 450
        writer.append(coords[writer.done :], features[writer.done :])
        assert writer.finish() == path
    assert not (tmp_path / "chunked.h5.partial").exists()
    _assert_same(read_bag(path), whole)


def test_writer_drops_rows_of_an_unfinished_append(tmp_path: Path) -> None:
    features, coords = _arrays(n=30, dim=4)
    path = tmp_path / "bag.h5"
    with BagWriter(path, feature_dim=4, **ATTRS) as writer:
        writer.append(coords[:10], features[:10])
    # A crash after the rows were extended but before the count moved.
    with h5py.File(tmp_path / "bag.h5.partial", "r+") as handle:
        handle["features"].resize(17, axis=0)
        handle["coords"].resize(17, axis=0)
    with BagWriter(path, feature_dim=4, **ATTRS) as writer:
        assert writer.done == 10
        writer.append(coords[10:], features[10:])
        writer.finish()
    bag = read_bag(path)
    np.testing.assert_array_equal(bag.features, features)
    np.testing.assert_array_equal(bag.coords, coords)


def test_writer_refuses_another_runs_partial_file_and_a_finished_bag(tmp_path: Path) -> None:
    path = tmp_path / "bag.h5"
    with BagWriter(path, feature_dim=4, **ATTRS) as writer:
        writer.append(np.zeros((2, 2), np.int64), np.zeros((2, 4)))
        with pytest.raises(InvalidInput, match="width 5, expected 4"):
            writer.append(np.zeros((2, 2), np.int64), np.zeros((2, 5)))
    with pytest.raises(InvalidInput, match="encoder='uni'"):
        BagWriter(path, feature_dim=4, **{**ATTRS, "encoder": "conch"})
    with pytest.raises(InvalidInput, match="width 4"):
        BagWriter(path, feature_dim=8, **ATTRS)
    with BagWriter(path, feature_dim=4, **ATTRS) as writer:
        writer.finish()
    with pytest.raises(AlreadyExists):
        BagWriter(path, feature_dim=4, **ATTRS)


def _bag(slide_id: str, n: int, seed: int, **changes: Any) -> Bag:
    features, coords = _arrays(n=n, dim=4, seed=seed)
    return Bag(features, coords, **{**ATTRS, "slide_id": slide_id, **changes})


def test_merge_concatenates_slides_with_an_index_per_patch() -> None:
    a, b = _bag("S-1", 3, 1), _bag("S-2", 5, 2, level0_mpp=0.2527)
    merged = merge_bags([a, b], bag_id="P-1")
    assert merged.slide_id == "P-1" and merged.slide_ids == ("S-1", "S-2")
    np.testing.assert_array_equal(merged.slide_index, [0, 0, 0, 1, 1, 1, 1, 1])
    np.testing.assert_array_equal(merged.coords[3:], b.coords)
    np.testing.assert_array_equal(merged.features[:3], a.features)
    assert np.isnan(merged.level0_mpp)  # the slides differ: each keeps its own coords
    # Merging merged bags keeps the slide numbering straight.
    again = merge_bags([merged, _bag("S-3", 2, 3)])
    assert again.slide_ids == ("S-1", "S-2", "S-3")
    np.testing.assert_array_equal(again.slide_index[-3:], [1, 2, 2])


def test_merge_refuses_mixed_encoders_and_repeated_slides() -> None:
    with pytest.raises(InvalidInput, match="encoder 'conch' != 'uni'"):
        merge_bags([_bag("S-1", 3, 1), _bag("S-2", 3, 2, encoder="conch")])
    with pytest.raises(InvalidInput, match="appears twice"):
        merge_bags([_bag("S-1", 3, 1), _bag("S-1", 3, 2)])
    with pytest.raises(InvalidInput):
        merge_bags([])
