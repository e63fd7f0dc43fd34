"""Bags of patch embeddings: one HDF5 file per slide and encoder.

The layout is the one CLAM and TRIDENT write, plus the attributes a model needs to
refuse features it was not trained on:

``features``
    float32 dataset, shape (N, D): one embedding per patch, D = the encoder's width.
``coords``
    int64 dataset, shape (N, 2): level-0 pixel (x, y) of each patch's top-left
    corner, in the same order as ``features``.

File attributes:

``slide_id`` (str)
    The slide the patches come from.
``encoder`` (str)
    Name of the encoder that embedded them (``services.encoders`` names, e.g. ``uni``).
``encoder_sha256`` (str)
    SHA-256 of the encoder's weights file (empty when it ran with random weights), so
    bags from two different checkpoints of one encoder are never mixed.
``patch_px`` (int)
    Side of a patch in pixels at the patch resolution.
``patch_mpp`` (float)
    Resolution the patches were embedded at, µm per pixel (0.5 = 20x).
``level0_mpp`` (float)
    The slide's level-0 resolution, µm per pixel: with it, ``coords`` and
    ``patch_px * patch_mpp / level0_mpp`` (the patch side in level-0 pixels) place
    every patch on the slide.
``format_version`` (int)
    :data:`FORMAT_VERSION`.

N may be 0 (a slide without usable tissue); such a bag can be stored and read, but
no model can score it.

Files are written atomically (:func:`write_bag`): a temporary file beside the target
is renamed over it, so a reader sees the whole bag or none. Long embedding runs use
:class:`BagWriter`, which appends chunks to ``<path>.partial`` and can be reopened
after a crash to continue from the last chunk it recorded.

A patient's bag (:func:`merge_bags`) concatenates the bags of the patient's slides;
its ``slide_index`` says which slide (position in ``slide_ids``) each patch comes
from, and each patch keeps its own slide's level-0 coordinates.
"""

from __future__ import annotations

import contextlib
import math
import os
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from services.common.errors import AlreadyExists, InvalidInput, NotFound

#: Version of the layout above, written as the ``format_version`` attribute.
FORMAT_VERSION = 1
#: Suffix of a :class:`BagWriter`'s file while it is being written.
PARTIAL_SUFFIX = ".partial"
#: Attribute of a partial file: how many patches are written and complete.
_DONE_ATTR = "done_patches"
#: Rows per HDF5 chunk of a partial file's resizable datasets.
_CHUNK_ROWS = 256

_TEXT_ATTRS = ("slide_id", "encoder", "encoder_sha256")


@dataclass(frozen=True, eq=False)
class Bag:
    """The patches of one slide (or one patient) as embeddings and positions.

    Attributes:
        features: float32 (N, D) embeddings.
        coords: int64 (N, 2) level-0 pixel (x, y) of each patch's top-left corner.
        slide_id: The slide, or for a merged bag the patient (see :func:`merge_bags`).
        encoder: Name of the encoder that made ``features``.
        encoder_sha256: SHA-256 of its weights file ("" for random weights).
        patch_px: Patch side in pixels at ``patch_mpp``.
        patch_mpp: Resolution of the patches, µm per pixel.
        level0_mpp: The slide's level-0 resolution, µm per pixel; NaN for a merged
            bag whose slides differ (then read each slide's own bag to place patches).
        slide_index: int64 (N,): which of ``slide_ids`` each patch comes from.
        slide_ids: The slides in the bag, one for a slide's own bag.
    """

    features: np.ndarray
    coords: np.ndarray
    slide_id: str
    encoder: str
    encoder_sha256: str
    patch_px: int
    patch_mpp: float
    level0_mpp: float
    slide_index: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    slide_ids: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # A slide's own bag: every patch from slide 0, itself.
        if not self.slide_ids:
            object.__setattr__(self, "slide_ids", (self.slide_id,))
        if len(self.slide_index) != len(self.features):
            object.__setattr__(self, "slide_index", np.zeros(len(self.features), np.int64))

    @property
    def n_patches(self) -> int:
        """N, the number of patches."""
        return int(self.features.shape[0])

    @property
    def feature_dim(self) -> int:
        """D, the embedding width."""
        return int(self.features.shape[1])

    def attributes(self) -> dict[str, Any]:
        """The file attributes of this bag (module docstring), as written."""
        return {
            "slide_id": self.slide_id,
            "encoder": self.encoder,
            "encoder_sha256": self.encoder_sha256,
            "patch_px": int(self.patch_px),
            "patch_mpp": float(self.patch_mpp),
            "level0_mpp": float(self.level0_mpp),
            "format_version": FORMAT_VERSION,
        }


# --- checks ----------------------------------------------------------------------------


def _check_attributes(where: str, attrs: dict[str, Any]) -> dict[str, Any]:
    """The bag attributes of ``attrs`` checked and typed; InvalidInput naming ``where``."""
    out: dict[str, Any] = {}
    for name in (*_TEXT_ATTRS, "patch_px", "patch_mpp", "level0_mpp", "format_version"):
        if name not in attrs:
            raise InvalidInput(f"{where}: attribute {name!r} is missing")
    for name in _TEXT_ATTRS:
        value = attrs[name]
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        if not isinstance(value, str):
            raise InvalidInput(f"{where}: attribute {name!r} must be text, got {value!r}")
        out[name] = value
    if not out["slide_id"]:
        raise InvalidInput(f"{where}: attribute 'slide_id' is empty")
    if not out["encoder"]:
        raise InvalidInput(f"{where}: attribute 'encoder' is empty")
    try:
        out["patch_px"] = int(attrs["patch_px"])
        out["patch_mpp"] = float(attrs["patch_mpp"])
        out["level0_mpp"] = float(attrs["level0_mpp"])
        version = int(attrs["format_version"])
    except (TypeError, ValueError):
        raise InvalidInput(
            f"{where}: attributes patch_px, patch_mpp, level0_mpp and format_version "
            "must be numbers"
        ) from None
    if out["patch_px"] <= 0:
        raise InvalidInput(f"{where}: patch_px must be > 0, got {out['patch_px']}")
    for name in ("patch_mpp", "level0_mpp"):
        if not (math.isfinite(out[name]) and out[name] > 0):
            raise InvalidInput(f"{where}: {name} must be a positive number, got {out[name]}")
    if version != FORMAT_VERSION:
        raise InvalidInput(
            f"{where}: bag format_version {version}, this code reads {FORMAT_VERSION}"
        )
    return out


def _check_arrays(where: str, features: Any, coords: Any) -> tuple[np.ndarray, np.ndarray]:
    """``features`` as float32 (N, D) and ``coords`` as int64 (N, 2), or InvalidInput.

    Floating features of another width (float16/64) and integer coordinates of
    another width (CLAM writes int32 in places) are converted; anything else is
    refused.
    """
    f = np.asarray(features)
    c = np.asarray(coords)
    if f.ndim != 2 or f.shape[1] == 0:
        raise InvalidInput(f"{where}: features must be (N, D) with D >= 1, got shape {f.shape}")
    if not np.issubdtype(f.dtype, np.floating):
        raise InvalidInput(f"{where}: features must be floating point, got {f.dtype}")
    if c.ndim != 2 or c.shape[1] != 2:
        raise InvalidInput(f"{where}: coords must be (N, 2), got shape {c.shape}")
    if c.size and not np.issubdtype(c.dtype, np.integer):
        raise InvalidInput(f"{where}: coords must be integers (level-0 px), got {c.dtype}")
    if c.shape[0] != f.shape[0]:
        raise InvalidInput(
            f"{where}: {f.shape[0]} feature rows but {c.shape[0]} coords; they must match"
        )
    f = f.astype(np.float32, copy=False)
    if not np.isfinite(f).all():
        bad = int(np.flatnonzero(~np.isfinite(f).all(axis=1))[0])
        raise InvalidInput(f"{where}: features hold NaN or infinity (first at row {bad})")
    return f, c.astype(np.int64, copy=False)


# --- whole files -----------------------------------------------------------------------


def _bag_attributes(
    where: str,
    slide_id: str,
    encoder: str,
    encoder_sha256: str,
    patch_px: int,
    patch_mpp: float,
    level0_mpp: float,
) -> dict[str, Any]:
    """The file attributes of a bag (module docstring), checked."""
    values = {
        "slide_id": slide_id,
        "encoder": encoder,
        "encoder_sha256": encoder_sha256,
        "patch_px": patch_px,
        "patch_mpp": patch_mpp,
        "level0_mpp": level0_mpp,
        "format_version": FORMAT_VERSION,
    }
    return _check_attributes(where, values)


def write_bag(
    path: str | os.PathLike[str],
    features: Any,
    coords: Any,
    *,
    slide_id: str,
    encoder: str,
    encoder_sha256: str,
    patch_px: int,
    patch_mpp: float,
    level0_mpp: float,
) -> Path:
    """Write a bag file atomically.

    Args:
        path: The ``.h5`` file to write; replaced if it exists.
        features: (N, D) embeddings (stored as float32).
        coords: (N, 2) level-0 pixel (x, y) of each patch's top-left corner.
        slide_id, encoder, encoder_sha256, patch_px, patch_mpp, level0_mpp: The
            attributes of the module docstring.

    Returns:
        The path written.

    Raises:
        InvalidInput: Bad shapes, dtypes or attributes (nothing is written).
    """
    import h5py

    target = Path(path)
    f, c = _check_arrays(str(target), features, coords)
    attrs = _bag_attributes(
        str(target), slide_id, encoder, encoder_sha256, patch_px, patch_mpp, level0_mpp
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    with _temporary_beside(target) as tmp:
        with h5py.File(tmp, "w") as handle:
            handle.create_dataset("features", data=f)
            handle.create_dataset("coords", data=c)
            _set_attributes(handle, attrs)
        os.replace(tmp, target)
    return target


def save_bag(path: str | os.PathLike[str], bag: Bag) -> Path:
    """Write ``bag`` with :func:`write_bag` (a merged bag's ``slide_index`` is not kept)."""
    return write_bag(
        path,
        bag.features,
        bag.coords,
        slide_id=bag.slide_id,
        encoder=bag.encoder,
        encoder_sha256=bag.encoder_sha256,
        patch_px=bag.patch_px,
        patch_mpp=bag.patch_mpp,
        level0_mpp=bag.level0_mpp,
    )


def read_bag(path: str | os.PathLike[str]) -> Bag:
    """Read and validate a bag file.

    Raises:
        NotFound: No such file.
        InvalidInput: Not an HDF5 bag, or a dataset or attribute is missing or has the
            wrong shape or type; the message names the file.
    """
    import h5py

    source = Path(path)
    if not source.is_file():
        raise NotFound(f"bag {source} does not exist")
    try:
        with h5py.File(source, "r") as handle:
            for name in ("features", "coords"):
                if not isinstance(handle.get(name), h5py.Dataset):
                    raise InvalidInput(f"{source}: dataset {name!r} is missing")
            features = handle["features"][()]
            coords = handle["coords"][()]
            attrs = dict(handle.attrs)
    except OSError as exc:
        raise InvalidInput(f"{source}: not a readable HDF5 bag ({exc})") from None
    f, c = _check_arrays(str(source), features, coords)
    return Bag(f, c, **_check_attributes(str(source), attrs))


def grid_overlap(bag: Bag) -> float | None:
    """The share (0-1) of a patch side that neighbouring patches of the bag's grid
    overlap, read from its coordinates: 1 - the smallest step between patches / the
    patch's level-0 side, to 0.01. None for a bag of fewer than two patches, or one
    whose level-0 resolution is unknown (a merged bag of several scanners)."""
    if bag.n_patches < 2 or not np.isfinite(bag.level0_mpp) or bag.level0_mpp <= 0:
        return None
    side = bag.patch_px * bag.patch_mpp / bag.level0_mpp
    steps = []
    for axis in (0, 1):
        values = np.unique(bag.coords[:, axis])
        if len(values) > 1:
            steps.append(float(np.diff(values).min()))
    if not steps:
        return None
    return round(float(np.clip(1.0 - min(steps) / side, 0.0, 0.99)), 2)


def merge_bags(bags: Sequence[Bag], bag_id: str | None = None) -> Bag:
    """One bag of all patches of several slides (e.g. one patient's).

    Args:
        bags: The slides' bags; same encoder (and weights), width, ``patch_px`` and
            ``patch_mpp``.
        bag_id: Name of the merged bag, e.g. the patient id (default: the slide ids
            joined with ``+``).

    Returns:
        The patches of ``bags`` in order, with ``slide_index`` (position in
        ``slide_ids``) per patch; ``coords`` stay in each slide's level-0 pixels.

    Raises:
        InvalidInput: No bags, a slide twice, or bags that cannot be pooled.
    """
    if not bags:
        raise InvalidInput("merge_bags needs at least one bag")
    first = bags[0]
    slide_ids: list[str] = []
    for bag in bags:
        for what, mine, theirs in (
            ("encoder", bag.encoder, first.encoder),
            ("encoder_sha256", bag.encoder_sha256, first.encoder_sha256),
            ("feature width", bag.feature_dim, first.feature_dim),
            ("patch_px", bag.patch_px, first.patch_px),
            ("patch_mpp", bag.patch_mpp, first.patch_mpp),
        ):
            if mine != theirs:
                raise InvalidInput(
                    f"cannot merge bag {bag.slide_id} with {first.slide_id}: "
                    f"{what} {mine!r} != {theirs!r}"
                )
        slide_ids.extend(bag.slide_ids)
    if len(set(slide_ids)) != len(slide_ids):
        raise InvalidInput(f"merge_bags: a slide appears twice in {', '.join(slide_ids)}")
    offsets = np.cumsum([0] + [len(b.slide_ids) for b in bags[:-1]])
    level0 = {b.level0_mpp for b in bags}
    return Bag(
        features=np.concatenate([b.features for b in bags]),
        coords=np.concatenate([b.coords for b in bags]),
        slide_id=bag_id or "+".join(slide_ids),
        encoder=first.encoder,
        encoder_sha256=first.encoder_sha256,
        patch_px=first.patch_px,
        patch_mpp=first.patch_mpp,
        level0_mpp=first.level0_mpp if len(level0) == 1 else math.nan,
        slide_index=np.concatenate(
            [b.slide_index + off for b, off in zip(bags, offsets, strict=True)]
        ).astype(np.int64),
        slide_ids=tuple(slide_ids),
    )


# --- resumable writing -----------------------------------------------------------------


class BagWriter:
    """Writes a bag chunk by chunk into ``<path>.partial``, resumable after a crash.

    Each :meth:`append` extends the partial file's resizable datasets and then
    records the new patch count (:attr:`done`) and flushes; rows past the recorded
    count (an append interrupted half-way) are dropped on reopening. Opening a
    writer on a path whose partial file exists continues it, provided its
    attributes and width match; :meth:`finish` renames it to ``path``.

        >>> with BagWriter(path, feature_dim=1024, slide_id=..., ...) as writer:
        ...     for coords, features in chunks_after(writer.done):
        ...         writer.append(coords, features)
        ...     writer.finish()

    Leaving the ``with`` block without :meth:`finish` closes the partial file and
    keeps it for the next run.

    Args:
        path: The final bag file.
        feature_dim: D, the embedding width.
        slide_id, encoder, encoder_sha256, patch_px, patch_mpp, level0_mpp: The
            attributes of the module docstring.

    Raises:
        AlreadyExists: ``path`` is a finished bag already.
        InvalidInput: Bad attributes, or a partial file written for another slide,
            encoder or width.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        feature_dim: int,
        slide_id: str,
        encoder: str,
        encoder_sha256: str,
        patch_px: int,
        patch_mpp: float,
        level0_mpp: float,
    ) -> None:
        import h5py

        self.path = Path(path)
        self.partial_path = self.path.with_name(self.path.name + PARTIAL_SUFFIX)
        if self.path.exists():
            raise AlreadyExists(f"bag {self.path} is finished already; delete it to redo it")
        if feature_dim < 1:
            raise InvalidInput(f"{self.path}: feature_dim must be >= 1, got {feature_dim}")
        self.feature_dim = int(feature_dim)
        self._attrs = _bag_attributes(
            str(self.path), slide_id, encoder, encoder_sha256, patch_px, patch_mpp, level0_mpp
        )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.partial_path.exists():
            self._file = self._reopen()
        else:
            self._file = self._create(h5py)

    def _create(self, h5py: Any) -> Any:
        # Build the empty partial file under a temporary name, so a crash during
        # creation never leaves a partial file without its attributes.
        with _temporary_beside(self.partial_path) as tmp:
            with h5py.File(tmp, "w") as handle:
                chunk = (_CHUNK_ROWS, self.feature_dim)
                handle.create_dataset(
                    "features",
                    (0, self.feature_dim),
                    np.float32,
                    maxshape=(None, None),
                    chunks=chunk,
                )
                handle.create_dataset(
                    "coords", (0, 2), np.int64, maxshape=(None, 2), chunks=(_CHUNK_ROWS, 2)
                )
                _set_attributes(handle, self._attrs)
                handle.attrs[_DONE_ATTR] = 0
            os.replace(tmp, self.partial_path)
        return h5py.File(self.partial_path, "r+")

    def _reopen(self) -> Any:
        import h5py

        where = str(self.partial_path)
        try:
            handle = h5py.File(self.partial_path, "r+")
        except OSError as exc:
            raise InvalidInput(
                f"{where}: cannot reopen the partial bag ({exc}); delete it to start over"
            ) from None
        try:
            found = _check_attributes(where, dict(handle.attrs))
            for name, value in self._attrs.items():
                if found[name] != value:
                    raise InvalidInput(
                        f"{where}: partial bag has {name}={found[name]!r}, this run "
                        f"{value!r}; delete it to start over"
                    )
            features, coords = handle.get("features"), handle.get("coords")
            if not isinstance(features, h5py.Dataset) or not isinstance(coords, h5py.Dataset):
                raise InvalidInput(f"{where}: partial bag lacks its datasets; delete it")
            if features.shape[1] != self.feature_dim:
                raise InvalidInput(
                    f"{where}: partial bag has width {features.shape[1]}, this run "
                    f"{self.feature_dim}; delete it to start over"
                )
            done = int(handle.attrs.get(_DONE_ATTR, 0))
            if min(features.shape[0], coords.shape[0]) < done:
                raise InvalidInput(f"{where}: records {done} patches but holds fewer; delete it")
            # Rows past the recorded count belong to an append that did not finish.
            features.resize(done, axis=0)
            coords.resize(done, axis=0)
        except BaseException:
            handle.close()
            raise
        return handle

    @property
    def done(self) -> int:
        """Patches written and recorded so far (continue from this one)."""
        return int(self._file.attrs[_DONE_ATTR])

    def append(self, coords: Any, features: Any) -> int:
        """Add a chunk of patches.

        Args:
            coords: (n, 2) level-0 pixel (x, y) of the chunk's patches.
            features: (n, D) their embeddings.

        Returns:
            :attr:`done` after the chunk.

        Raises:
            InvalidInput: Bad shapes or dtypes, a width other than ``feature_dim``, or
                a writer already finished or closed.
        """
        if not self._file:
            raise InvalidInput(f"{self.partial_path}: the writer is closed")
        f, c = _check_arrays(str(self.partial_path), features, coords)
        if f.shape[1] != self.feature_dim:
            raise InvalidInput(
                f"{self.partial_path}: chunk has width {f.shape[1]}, expected {self.feature_dim}"
            )
        start, stop = self.done, self.done + len(f)
        for name, rows in (("features", f), ("coords", c)):
            dataset = self._file[name]
            dataset.resize(stop, axis=0)
            dataset[start:stop] = rows
        # The count moves last: a crash before this line leaves rows that reopening drops.
        self._file.flush()
        self._file.attrs[_DONE_ATTR] = stop
        self._file.flush()
        return stop

    def finish(self) -> Path:
        """Close the partial file and rename it to the final path.

        Returns:
            The final bag path.
        """
        if not self._file:
            raise InvalidInput(f"{self.partial_path}: the writer is closed")
        del self._file.attrs[_DONE_ATTR]
        self._file.close()
        os.replace(self.partial_path, self.path)
        return self.path

    def close(self) -> None:
        """Close the partial file, keeping it for a later run to continue."""
        if self._file:
            self._file.close()

    def __enter__(self) -> BagWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- helpers ---------------------------------------------------------------------------


def _set_attributes(handle: Any, attrs: dict[str, Any]) -> None:
    for name, value in attrs.items():
        handle.attrs[name] = value
    handle.attrs["format_version"] = FORMAT_VERSION


@contextlib.contextmanager
def _temporary_beside(target: Path) -> Iterator[Path]:
    """A temporary path in ``target``'s folder, removed on exit unless it was renamed."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
