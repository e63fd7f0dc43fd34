"""Training patches: the patch table, the patient split, balanced epochs, shard reading.

The tiling service leaves, per slide, ``tiles/{slide_id}/{params_hash}/grid.parquet``
(one row per patch with its level-0 ``x``, ``y``, ``shard`` key and tar ``member``)
beside the tar shards. Training joins those grids with the cohort manifest's labels
into one *patch table*, one row per patch:

==========  ==============================================================
slide_id    the slide
patient_id  its patient (labels and the train/validation split are per patient)
label       class index into the model's ``class_names`` (int)
shard       object-store key of the tar shard holding the patch
member      the patch's member name inside that shard
x, y        level-0 origin of the patch, px
==========  ==============================================================

Reading: every shard the table needs is downloaded once into a local cache folder
(:class:`ShardCache`), its members' byte ranges are indexed, and a patch read is then
one ``seek`` + ``read`` + JPEG decode of a local file (:class:`PatchReader`). Nothing
but paths and offsets is shared with DataLoader workers, so any number of worker
processes read the same cache.
"""

from __future__ import annotations

import hashlib
import io
import logging
import random
import tarfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from services.common.errors import InvalidInput, NotFound
from services.common.objectstore import ObjectStore
from services.inference.augment import random_augment
from services.inference.preprocess import PreprocessConfig, fit_to_input, to_input
from services.slide.shards import decode_patch

log = logging.getLogger(__name__)

#: Columns of a patch table, in order.
PATCH_COLUMNS = ("slide_id", "patient_id", "label", "shard", "member", "x", "y")
#: Key prefix of the tiling outputs: ``tiles/{slide_id}/{params_hash}/``.
TILES_PREFIX = "tiles"
GRID_FILE = "grid.parquet"
#: Written last by a finished tiling run; a folder without it is ignored.
TILE_JSON = "tile.json"

Progress = Callable[[int, int], None]


# ------------------------------------------------------------------------ the table


def encode_labels(values: pd.Series, class_names: Sequence[str]) -> np.ndarray:
    """Class indices of labels given as class names or as indices.

    A text label must be one of ``class_names`` (``"cancer"`` with
    ``("normal", "cancer")`` -> 1); a number or boolean is the index itself
    (a manifest's ``1``/``0`` biomarker labels with ``("negative", "positive")``).

    Raises:
        InvalidInput: A label that names no class, or an index out of range.
    """
    indices = np.empty(len(values), np.int64)
    for i, value in enumerate(values.tolist()):
        if isinstance(value, str):
            if value not in class_names:
                raise InvalidInput(
                    f"label {value!r} is not a class; classes are {', '.join(class_names)}"
                )
            indices[i] = list(class_names).index(value)
        else:
            number = float(value)
            if number != int(number) or not 0 <= int(number) < len(class_names):
                raise InvalidInput(
                    f"label {value!r} is not a class index 0-{len(class_names) - 1} "
                    f"({', '.join(class_names)})"
                )
            indices[i] = int(number)
    return indices


def find_grid_key(
    store: ObjectStore, slide_id: str, params_hash: str | None = None, prefix: str = TILES_PREFIX
) -> str:
    """The key of a slide's finished ``grid.parquet``.

    Args:
        store: Where the tiling outputs are.
        slide_id: The slide.
        params_hash: Which tiling run; None picks the only finished one.
        prefix: Key prefix of the tiling outputs.

    Raises:
        NotFound: The slide has no finished tiling run (with that hash).
        InvalidInput: ``params_hash`` is None and the slide has several finished runs.
    """
    if params_hash is not None:
        folder = f"{prefix}/{slide_id}/{params_hash}"
        if not store.exists(f"{folder}/{TILE_JSON}"):
            raise NotFound(f"slide {slide_id} has no finished tiling run {params_hash}")
        return f"{folder}/{GRID_FILE}"
    done = [
        info.key[: -len(TILE_JSON)]
        for info in store.list(f"{prefix}/{slide_id}/")
        if info.key.endswith(f"/{TILE_JSON}") and info.key.count("/") == prefix.count("/") + 3
    ]
    if not done:
        raise NotFound(f"slide {slide_id} has no finished tiling run under {prefix}/{slide_id}/")
    if len(done) > 1:
        hashes = ", ".join(key.rstrip("/").rsplit("/", 1)[1] for key in done)
        raise InvalidInput(f"slide {slide_id} has several tiling runs ({hashes}): give params_hash")
    return f"{done[0]}{GRID_FILE}"


def build_patch_table(
    store: ObjectStore,
    manifest: pd.DataFrame,
    label_column: str,
    class_names: Sequence[str],
    *,
    params_hash: str | None = None,
    grid_keys: Mapping[str, str] | None = None,
    prefix: str = TILES_PREFIX,
) -> pd.DataFrame:
    """The patch table of the labelled slides of a manifest.

    Slides whose label is missing (unknown) are left out; so are patches without a
    shard (a slide without tissue).

    Args:
        store: Where the tiling outputs are.
        manifest: One row per slide with ``slide_id``, ``patient_id`` and
            ``label_column``.
        label_column: The column holding the label (``kind``, ``tp53``, ...).
        class_names: The model's classes, index order; labels are encoded by
            :func:`encode_labels`.
        params_hash: Which tiling run of every slide; None picks each slide's only one.
        grid_keys: ``slide_id`` -> ``grid.parquet`` key, overriding the lookup.
        prefix: Key prefix of the tiling outputs.

    Returns:
        A patch table (columns :data:`PATCH_COLUMNS`).

    Raises:
        InvalidInput: Missing columns, empty patient ids, bad labels, or no patches.
        NotFound: A labelled slide has no finished tiling run.
    """
    missing = [c for c in ("slide_id", "patient_id", label_column) if c not in manifest.columns]
    if missing:
        raise InvalidInput(f"the manifest lacks the column(s) {', '.join(missing)}")
    labelled = manifest[manifest[label_column].notna()]
    if labelled.empty:
        raise InvalidInput(f"no slide of the manifest has a {label_column!r} label")
    labels = encode_labels(labelled[label_column], class_names)
    frames = []
    for (slide_id, patient_id), label in zip(
        labelled[["slide_id", "patient_id"]].itertuples(index=False), labels, strict=True
    ):
        if pd.isna(patient_id) or not str(patient_id).strip():
            raise InvalidInput(f"slide {slide_id} has no patient_id")
        patient_id = str(patient_id)
        if grid_keys is not None and slide_id in grid_keys:
            key = grid_keys[slide_id]
        else:
            key = find_grid_key(store, slide_id, params_hash, prefix)
        grid = pd.read_parquet(io.BytesIO(store.get_bytes(key)))
        grid = grid[grid["shard"].astype(str) != ""]
        frames.append(
            pd.DataFrame(
                {
                    "slide_id": slide_id,
                    "patient_id": patient_id,
                    "label": np.full(len(grid), label, np.int64),
                    "shard": grid["shard"].astype(str).to_numpy(),
                    "member": grid["member"].astype(str).to_numpy(),
                    "x": grid["x"].to_numpy(np.int64),
                    "y": grid["y"].to_numpy(np.int64),
                }
            )
        )
    table = pd.concat(frames, ignore_index=True)
    validate_patch_table(table, len(class_names))
    return table


def validate_patch_table(table: pd.DataFrame, num_classes: int) -> None:
    """Check a patch table before training.

    Raises:
        InvalidInput: Missing columns, no rows, a missing patient, labels outside
            ``0..num_classes-1``, or fewer than two classes present.
    """
    missing = [c for c in PATCH_COLUMNS if c not in table.columns]
    if missing:
        raise InvalidInput(f"the patch table lacks the column(s) {', '.join(missing)}")
    if table.empty:
        raise InvalidInput("the patch table is empty: no patches to train on")
    patients = table["patient_id"]
    blank = patients.isna() | (patients.astype(str).str.strip() == "")
    if blank.any():
        slide = table.loc[blank, "slide_id"].iloc[0]
        raise InvalidInput(f"{int(blank.sum())} patch(es) have no patient_id (e.g. slide {slide})")
    labels = table["label"].to_numpy()
    if not np.issubdtype(labels.dtype, np.integer):
        raise InvalidInput(f"labels must be integer class indices, got {labels.dtype}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise InvalidInput(f"labels must be class indices 0-{num_classes - 1}")
    present = np.unique(labels)
    if len(present) < 2:
        raise InvalidInput(
            f"all {len(table)} patches have label {int(present[0])}: training needs two classes"
        )


# ------------------------------------------------------------------------ sampling


def patient_split(
    table: pd.DataFrame, val_fraction: float, seed: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split a patch table into training and validation patches by patient.

    No patient is in both. Patients are stratified by their label (the majority of
    their patches' labels): about ``val_fraction`` of each class's patients go to
    validation, at least one and never all of them, for every class with two or
    more patients (a class with one patient stays in training).

    Args:
        table: A patch table.
        val_fraction: Share of each class's patients for validation, in (0, 1).
        seed: Seed of the shuffle; the same table and seed give the same split.

    Returns:
        ``(train, validation)`` patch tables, each with a fresh index.

    Raises:
        InvalidInput: ``val_fraction`` out of range, or too few patients to split.
    """
    if not 0.0 < val_fraction < 1.0:
        raise InvalidInput(f"val_fraction must be within (0, 1), got {val_fraction}")
    patient_labels = (
        table.groupby("patient_id", sort=True)["label"]
        .agg(lambda labels: int(labels.mode().min()))
        .sort_index()
    )
    rng = np.random.default_rng(seed)
    val_patients: list[str] = []
    for label in sorted(patient_labels.unique()):
        patients = patient_labels.index[patient_labels == label].to_numpy()
        if len(patients) < 2:
            continue
        count = int(np.clip(round(val_fraction * len(patients)), 1, len(patients) - 1))
        val_patients += [str(p) for p in rng.permutation(patients)[:count]]
    if not val_patients:
        raise InvalidInput(
            f"cannot split {len(patient_labels)} patient(s) by patient: every class has "
            "a single patient; add patients"
        )
    in_val = table["patient_id"].isin(val_patients)
    train, val = table[~in_val].reset_index(drop=True), table[in_val].reset_index(drop=True)
    if train["label"].nunique() < 2:
        raise InvalidInput("after the patient split the training patches have one class only")
    return train, val


def balanced_epoch_indices(
    labels: np.ndarray, rng: np.random.Generator, per_class: int | None = None
) -> np.ndarray:
    """One epoch's rows: random undersampling with replacement, classes balanced.

    Every class present contributes ``per_class`` rows drawn uniformly with
    replacement from its rows (by default the minority class's count, so the epoch
    has ``classes x minority`` rows); the result is shuffled.

    Args:
        labels: Class index of every row, shape (N,).
        rng: The source of randomness (seed it per epoch for repeatable epochs).
        per_class: Rows per class; None for the minority count.

    Returns:
        Row indices into ``labels``, int64, shape (classes x per_class,).

    Raises:
        InvalidInput: No labels, or ``per_class`` < 1.
    """
    labels = np.asarray(labels)
    if labels.size == 0:
        raise InvalidInput("no rows to sample an epoch from")
    classes, counts = np.unique(labels, return_counts=True)
    count = int(counts.min()) if per_class is None else int(per_class)
    if count < 1:
        raise InvalidInput(f"per_class must be at least 1, got {per_class}")
    chosen = [rng.choice(np.flatnonzero(labels == c), count, replace=True) for c in classes]
    return rng.permutation(np.concatenate(chosen)).astype(np.int64)


# ------------------------------------------------------------------------ reading


def shard_members(path: Path) -> dict[str, tuple[int, int]]:
    """Byte range (offset, size) of every file member of a local tar shard.

    Only the 512-byte headers are read; tarfile seeks over the data.
    """
    members: dict[str, tuple[int, int]] = {}
    with tarfile.open(path, mode="r:") as tar:
        for info in tar:
            if info.isfile():
                members[info.name] = (info.offset_data, info.size)
    return members


class ShardCache:
    """Local copies of shards, one file per shard key, downloaded once.

    A shard already in the folder with the object's size is reused (a crashed and
    resumed run does not download it again); downloads are atomic
    (``ObjectStore.get_file``) and checked against the stored sha256.

    Args:
        store: Where the shards are.
        folder: Local cache folder (created if needed).
    """

    def __init__(self, store: ObjectStore, folder: Path) -> None:
        self.store = store
        self.folder = Path(folder)

    def path_of(self, key: str) -> Path:
        """The local file of a shard key (a hash of the key: keys may be long)."""
        digest = hashlib.sha256(key.encode()).hexdigest()[:24]
        return self.folder / f"{digest}.tar"

    def fetch(self, keys: Iterable[str], progress: Progress | None = None) -> dict[str, Path]:
        """Download the shards not in the cache yet; ``key -> local path`` for all."""
        unique = sorted(set(keys))
        self.folder.mkdir(parents=True, exist_ok=True)
        paths = {}
        for done, key in enumerate(unique, start=1):
            path = self.path_of(key)
            if not (path.is_file() and path.stat().st_size == self.store.stat(key).size_bytes):
                self.store.get_file(key, path)
            paths[key] = path
            if progress is not None:
                progress(done, len(unique))
        return paths


class PatchReader:
    """Reads the patches of a patch table from locally cached shards.

    Holds only paths and byte offsets (cheap to pickle into DataLoader workers).

    Args:
        table: A patch table.
        shard_paths: Local file of every shard key the table names
            (``ShardCache.fetch``).

    Raises:
        NotFound: A shard has no local file, or a member is not in its shard.
    """

    def __init__(self, table: pd.DataFrame, shard_paths: Mapping[str, Path]) -> None:
        keys = sorted(set(table["shard"]))
        absent = [k for k in keys if k not in shard_paths]
        if absent:
            raise NotFound(f"shard {absent[0]} is not in the local cache")
        self.paths = [str(shard_paths[k]) for k in keys]
        which = {k: i for i, k in enumerate(keys)}
        self.shard_index = table["shard"].map(which).to_numpy(np.int64)
        self.offsets = np.empty(len(table), np.int64)
        self.sizes = np.empty(len(table), np.int64)
        positions = pd.Series(np.arange(len(table)))
        for key, rows in positions.groupby(table["shard"].to_numpy()):
            members = shard_members(Path(shard_paths[str(key)]))
            for row, member in zip(rows, table["member"].to_numpy()[rows], strict=True):
                if member not in members:
                    raise NotFound(f"patch {member} is not in shard {key}")
                self.offsets[row], self.sizes[row] = members[member]

    def __len__(self) -> int:
        return len(self.offsets)

    def read(self, row: int) -> np.ndarray:
        """The (H, W, 3) uint8 RGB patch of a table row."""
        with open(self.paths[self.shard_index[row]], "rb") as handle:
            handle.seek(int(self.offsets[row]))
            data = handle.read(int(self.sizes[row]))
        return decode_patch(data)


class FittedReader:
    """A :class:`PatchReader`'s patches resized to the network input, kept in memory.

    Training decodes the same patches every epoch and augments them; at the input
    size (e.g. 128 px from 512 px patches) that is a sixteenth of the pixels, and the
    resized patches of a demo-sized cohort fit in memory. Patches are cached until
    ``max_bytes`` is used, then read again each time. Cached arrays are read-only.

    Args:
        reader: The patches at their stored size.
        side: Network input side, px (``preprocess.fit_to_input``).
        max_bytes: Memory for cached patches; 0 caches none.
    """

    def __init__(self, reader: PatchReader, side: int, max_bytes: int) -> None:
        self.reader = reader
        self.side = int(side)
        self.max_bytes = int(max_bytes)
        self._cache: dict[int, np.ndarray] = {}
        self._bytes = 0

    def __len__(self) -> int:
        return len(self.reader)

    def read(self, row: int) -> np.ndarray:
        """The (side, side, 3) uint8 RGB patch of a table row."""
        cached = self._cache.get(row)
        if cached is not None:
            return cached
        patch = fit_to_input(self.reader.read(row), self.side)
        if self._bytes + patch.nbytes <= self.max_bytes:
            patch = np.ascontiguousarray(patch)
            patch.setflags(write=False)
            self._cache[row] = patch
            self._bytes += patch.nbytes
        return patch


class EpochDataset(Dataset):
    """The patches of one epoch, in a given order, optionally augmented.

    Item ``j`` is table row ``rows[j]``, augmented (when ``augment``) by
    :func:`random_augment` with a generator seeded by ``(seed, 1, epoch, j)`` (the
    1 keeps it apart from other streams of the same seed, e.g. ``(seed, 0, epoch)``
    for the epoch's rows): the
    same patch twice in an epoch gets two draws, and the result does not depend
    on how many workers load it or in which order.

    Args:
        reader: Reads a table row's patch (a :class:`PatchReader`, or a
            :class:`FittedReader` to augment at the input size).
        labels: Class index of every table row.
        rows: Table rows of this epoch, in order.
        seed: The run's seed.
        epoch: The epoch number (0-based).
        augment: Apply one random augmentation per item (training) or none.
    """

    def __init__(
        self,
        reader: PatchReader | FittedReader,
        labels: np.ndarray,
        rows: np.ndarray,
        seed: int,
        epoch: int,
        augment: bool,
    ) -> None:
        self.reader = reader
        self.labels = np.asarray(labels, np.int64)
        self.rows = np.asarray(rows, np.int64)
        self.seed = int(seed)
        self.epoch = int(epoch)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, j: int) -> tuple[np.ndarray, int]:
        row = int(self.rows[j])
        patch = self.reader.read(row)
        if self.augment:
            patch = random_augment(patch, np.random.default_rng((self.seed, 1, self.epoch, j)))
        return patch, int(self.labels[row])


class PatchCollate:
    """DataLoader ``collate_fn``: uint8 patches -> normalized input batch and labels.

    Preprocessing runs batch-wise (one ``to_input`` call) in the worker.

    Args:
        preprocess: How patches become input tensors.
    """

    def __init__(self, preprocess: PreprocessConfig) -> None:
        self.preprocess = preprocess

    def __call__(self, items: list[tuple[np.ndarray, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        patches = [patch for patch, _ in items]
        labels = torch.tensor([label for _, label in items], dtype=torch.int64)
        if len({p.shape for p in patches}) == 1:
            return to_input(np.stack(patches), self.preprocess), labels
        # Patches of several sizes: each is resized on its own.
        return torch.cat([to_input(p, self.preprocess) for p in patches]), labels


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed the global generators from the loader's seed.

    The augmentations draw from their own seeded generators; this only makes any
    third-party use of numpy's or Python's global generator repeatable too. (It
    deliberately leaves OpenCV's thread count alone: ``cv2.setNumThreads`` in a
    forked worker can hang on the pool inherited from the parent.)
    """
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def describe(table: pd.DataFrame, class_names: Sequence[str]) -> dict[str, Any]:
    """Counts of a patch table for logs and metrics: patches and patients per class."""
    out: dict[str, Any] = {"patches": len(table), "patients": int(table["patient_id"].nunique())}
    for index, name in enumerate(class_names):
        rows = table[table["label"] == index]
        out[f"patches_{name}"] = len(rows)
        out[f"patients_{name}"] = int(rows["patient_id"].nunique())
    return out
