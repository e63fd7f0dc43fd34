"""Tiling one slide: tissue masks, patch grid, stain normalization, patch shards.

``tile_slide`` writes everything under one key prefix of an object store
(``tiles/{slide_id}/{params_hash}`` for the services, the output folder itself for
the CLI)::

    tissue.png, pen_*.png, blur.png, fold.png, tissue.json   masks and their downsample
    grid.parquet       one row per patch: x, y, width, height (level 0), row, col,
                       tissue_fraction, shard, member
    stain.json         the slide's stain matrix and the target reference (if normalized)
    shards/20x-00000.tar ...   the patches (JPEG q90 by default)
    tile.json          written last: parameters, hash, counts, status

A run whose ``tile.json`` exists with the same parameter hash is reused; a run that
fails removes what it wrote, and in any case never writes ``tile.json``, so nothing
half-done looks finished.
"""

from __future__ import annotations

import io
import json
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

from services.common.cancellation import WorkBudget
from services.common.errors import InvalidInput
from services.common.objectstore import ObjectStore
from services.tiling.grid import GridParams, TissueRule, grid_shape, params_hash, patch_grid
from services.tiling.reader import SlideReader
from services.tiling.shards import ShardWriter
from services.tiling.stain import LabStats, Normalizer, StainMatrix, get_normalizer
from services.tiling.tissue import TissueMasks, TissueParams, save_masks, segment_tissue

log = logging.getLogger(__name__)

#: Bump when the output layout or the algorithms change, so old results are not reused.
PIPELINE_VERSION = 2
TILE_JSON = "tile.json"
GRID_FILE = "grid.parquet"
STAIN_JSON = "stain.json"
#: Largest thumbnail read for the masks, pixels.
MAX_MASK_PX = 40_000_000

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class TileParams:
    """Everything that decides a tiling result (and so its hash).

    Attributes:
        grid: Patch grid (magnification, size, tissue share, overlap).
        tissue: Tissue and artifact mask parameters.
        mask_downsample: Downsample of the level the masks are computed on.
        stain_method: ``vahadane``, ``macenko`` or ``reinhard``; used when a
            reference is given.
        image_format: ``jpeg`` or ``png`` patches.
        quality: JPEG quality.
        stain_sample_patches: Patches sampled to estimate the slide's stains.
        exclude_blur: Leave blurred regions out of the grid.
        exclude_fold: Leave tissue folds out of the grid (pen ink is always left out).
        max_patches: Most patches kept, sampled uniformly without replacement with
            ``seed`` (0 keeps every patch).
        seed: Seed of that sampling.
    """

    grid: GridParams = field(default_factory=GridParams)
    tissue: TissueParams = field(default_factory=TissueParams)
    mask_downsample: float = 16.0
    stain_method: str = "vahadane"
    image_format: str = "jpeg"
    quality: int = 90
    stain_sample_patches: int = 24
    exclude_blur: bool = True
    exclude_fold: bool = True
    max_patches: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_patches < 0:
            raise InvalidInput(f"max_patches must be >= 0, got {self.max_patches}")


@dataclass
class TileResult:
    """What a tiling run produced (JSON-able through :meth:`as_dict`)."""

    slide_id: str
    prefix: str
    params_hash: str
    status: str
    message: str
    patch_count: int
    tissue_patch_fraction: float
    mpp: float
    dimensions: tuple[int, int]
    reused: bool = False
    elapsed_s: float = 0.0
    shards: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """The result as plain JSON values."""
        return asdict(self)


def _key(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if prefix else name


def _existing(store: ObjectStore, prefix: str, digest: str) -> TileResult | None:
    key = _key(prefix, TILE_JSON)
    if not store.exists(key):
        return None
    meta = json.loads(store.get_bytes(key))
    if meta.get("params_hash") != digest:
        return None
    result = TileResult(**meta["result"])
    result.reused = True
    return result


def _sample_for_stains(reader: SlideReader, grid: pd.DataFrame, params: TileParams) -> np.ndarray:
    """Pixels of patches spread evenly over the grid, for the slide's stain estimate."""
    count = min(len(grid), params.stain_sample_patches)
    picks = np.linspace(0, len(grid) - 1, count).round().astype(int)
    patches = [
        reader.read_patch(
            int(grid.iloc[i]["x"]),
            int(grid.iloc[i]["y"]),
            params.grid.patch_px,
            params.grid.target_mpp,
            allow_upsample=params.grid.allow_upsample,
        )[::4, ::4]
        for i in picks
    ]
    return np.concatenate([patch.reshape(-1, 3) for patch in patches])


def load_slide_stain(
    store: ObjectStore, prefix: str
) -> tuple[Normalizer, StainMatrix | LabStats] | None:
    """The normalizer a tiling used and its slide's stains, from its ``stain.json``.

    Anything cut from the slide later (its 40x patches) goes through the same
    transform as its 20x patches. None when the tiling did not normalize.

    Raises:
        InvalidInput: A malformed ``stain.json``.
    """
    key = _key(prefix, STAIN_JSON)
    if not store.exists(key):
        return None
    try:
        stain = json.loads(store.get_bytes(key))
        slide, target = json.dumps(stain["slide"]), json.dumps(stain["target"])
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidInput(f"{key} is not a stain record: {exc}") from exc
    reinhard = "mean" in stain["target"]
    reference = LabStats.from_json(target) if reinhard else StainMatrix.from_json(target)
    # The method the 20x patches were normalized with (older records: the target's).
    method = stain.get("method") or ("reinhard" if reinhard else reference.method)  # type: ignore[union-attr]
    normalizer = get_normalizer(str(method))
    normalizer.load_target(reference)  # type: ignore[arg-type]
    return normalizer, LabStats.from_json(slide) if reinhard else StainMatrix.from_json(slide)


def allowed_area(
    tissue: np.ndarray,
    blur: np.ndarray,
    fold: np.ndarray,
    exclude_blur: bool = True,
    exclude_fold: bool = True,
) -> np.ndarray:
    """Where the grid may take patches: tissue (pen already out), less what is excluded.

    The PredictionService lays its grid on the same area, so that a slide is scored
    on the kind of patches the models were trained on.
    """
    allowed = tissue.copy()
    if exclude_blur:
        allowed &= ~blur
    if exclude_fold:
        allowed &= ~fold
    return allowed


#: The stored masks that decide where the grid may take patches.
MASK_NAMES = ("tissue", "blur", "fold")


def _stored_mask(store: ObjectStore, key: str) -> np.ndarray:
    encoded = np.frombuffer(store.get_bytes(key), np.uint8)
    mask = cv2.imdecode(encoded, cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise InvalidInput(f"{key} is not a mask image")
    return mask > 0


def load_tissue_rule(store: ObjectStore, prefix: str) -> TissueRule | None:
    """The tissue rule a stored tiling's grid followed: its usable mask and least share.

    Whatever is cut from the slide later (its 40x patches) follows the same rule.
    None when there is no finished tiling under ``prefix``.

    Raises:
        InvalidInput: A malformed ``tile.json`` or mask.
    """
    key = _key(prefix, TILE_JSON)
    if not store.exists(key):
        return None
    try:
        meta = json.loads(store.get_bytes(key))["params"]
        params = TileParams(
            grid=GridParams(**meta["grid"]),
            exclude_blur=bool(meta["exclude_blur"]),
            exclude_fold=bool(meta["exclude_fold"]),
        )
        info = json.loads(store.get_bytes(_key(prefix, "tissue.json")))
        downsample = float(info["downsample"])
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidInput(f"{key} is not a tiling record: {exc}") from exc
    tissue, blur, fold = (_stored_mask(store, _key(prefix, f"{n}.png")) for n in MASK_NAMES)
    allowed = allowed_area(tissue, blur, fold, params.exclude_blur, params.exclude_fold)
    return TissueRule(allowed, downsample, params.grid.min_tissue)


def tiling_digest(params: TileParams, reference: StainMatrix | LabStats | None) -> str:
    """The hash naming a tiling result: parameters, reference stains and version."""
    reference_id = None if reference is None else reference.to_json()
    return params_hash(params, {"reference": reference_id, "version": PIPELINE_VERSION})


def tile_slide(
    reader: SlideReader,
    slide_id: str,
    store: ObjectStore,
    prefix: str,
    params: TileParams = TileParams(),
    reference: StainMatrix | LabStats | None = None,
    *,
    progress: Progress | None = None,
    budget: WorkBudget | None = None,
) -> TileResult:
    """Tile one slide into ``store`` under ``prefix``.

    Args:
        reader: The open slide.
        slide_id: The slide's id (recorded, and part of log lines).
        store: Where to write.
        prefix: Key prefix of the outputs ("" for the root of the store).
        params: Tiling parameters.
        reference: Target stains (a stored reference); None leaves colours as scanned.
        progress: Called with (patches done, patches in total).
        budget: Deadline and cancellation, checked between patches.

    Returns:
        The result; ``status`` is ``ok`` or ``no_tissue`` (an empty grid, not an error).
    """
    budget = budget or WorkBudget.unlimited()
    started = time.perf_counter()
    digest = tiling_digest(params, reference)
    found = _existing(store, prefix, digest)
    if found is not None:
        return found
    written: list[str] = []
    try:
        result = _run(
            reader, slide_id, store, prefix, params, reference, digest, written, progress, budget
        )
    except BaseException:
        for key in written:
            try:
                store.delete(key)
            except Exception as exc:  # the original error matters more; log and go on
                log.warning("could not remove a partial output %s: %s", key, exc)
        raise
    result.elapsed_s = round(time.perf_counter() - started, 2)
    meta = {"params_hash": digest, "params": asdict(params), "result": result.as_dict()}
    store.put_bytes(_key(prefix, TILE_JSON), json.dumps(meta, indent=1, default=str).encode())
    return result


def mask_level_image(
    reader: SlideReader, slide_id: str, mask_downsample: float
) -> tuple[np.ndarray, float]:
    """The slide level nearest ``mask_downsample`` (a plain image: itself), read
    whole, and its downsample: the image the masks are computed on.

    Raises:
        InvalidInput: Even that level is larger than :data:`MAX_MASK_PX`.
    """
    level = reader.best_level_for_downsample(mask_downsample)
    lw, lh = reader.level_dimensions[level]
    if lw * lh > MAX_MASK_PX:
        raise InvalidInput(
            f"slide {slide_id} has no level small enough for the tissue mask "
            f"(level {level} is {lw}x{lh} px)"
        )
    return reader.read_level(level), float(reader.level_downsamples[level])


def compute_masks(
    reader: SlideReader, slide_id: str, params: TissueParams, mask_downsample: float
) -> TissueMasks:
    """Tissue and artifact masks from the slide level nearest ``mask_downsample``."""
    thumbnail, downsample = mask_level_image(reader, slide_id, mask_downsample)
    return segment_tissue(thumbnail, downsample, float(reader.mpp[0]), params)


def store_masks(
    store: ObjectStore, prefix: str, masks: TissueMasks, written: list[str] | None = None
) -> list[str]:
    """Put the mask PNGs and ``tissue.json`` (last) under ``prefix``; returns the keys."""
    keys = written if written is not None else []
    with tempfile.TemporaryDirectory() as folder:
        save_masks(masks, folder)
        paths = sorted(Path(folder).iterdir(), key=lambda p: (p.name == "tissue.json", p.name))
        for path in paths:
            key = _key(prefix, path.name)
            store.put_file(key, path)
            keys.append(key)
    return keys


def _run(
    reader: SlideReader,
    slide_id: str,
    store: ObjectStore,
    prefix: str,
    params: TileParams,
    reference: StainMatrix | LabStats | None,
    digest: str,
    written: list[str],
    progress: Progress | None,
    budget: WorkBudget,
) -> TileResult:
    mpp0 = float(reader.mpp[0])
    width, height = reader.dimensions
    masks = compute_masks(reader, slide_id, params.tissue, params.mask_downsample)
    store_masks(store, prefix, masks, written)
    downsample = masks.downsample
    allowed = allowed_area(
        masks.tissue, masks.blur, masks.fold, params.exclude_blur, params.exclude_fold
    )
    grid = patch_grid((width, height), mpp0, allowed, downsample, params.grid)
    if params.max_patches and len(grid) > params.max_patches:
        # A uniform sample, kept in grid order (neighbours stay neighbours in shards).
        grid = grid.sample(n=params.max_patches, random_state=params.seed).sort_index()
        grid = grid.reset_index(drop=True)
    grid_rows, grid_cols = grid_shape((width, height), mpp0, params.grid)
    total_positions = grid_rows * grid_cols

    def result(status: str, message: str, count: int, shard_keys: list[str]) -> TileResult:
        return TileResult(
            slide_id=slide_id,
            prefix=prefix,
            params_hash=digest,
            status=status,
            message=message,
            patch_count=count,
            tissue_patch_fraction=round(count / max(1, total_positions), 4),
            mpp=mpp0,
            dimensions=(int(width), int(height)),
            shards=shard_keys,
        )

    if grid.empty:
        _put_table(store, _key(prefix, GRID_FILE), grid.assign(shard="", member=""), written)
        return result("no_tissue", "no patch has enough tissue: the grid is empty", 0, [])

    normalizer = None
    source = None
    if reference is not None:
        normalizer = get_normalizer(params.stain_method)
        normalizer.load_target(reference)  # type: ignore[arg-type]
        sample = _sample_for_stains(reader, grid, params)
        estimate = "ok"
        try:
            source = normalizer.stain_matrix_of(sample)
        except InvalidInput as exc:
            # Too little tissue, or one stain only: normalize against the target's own
            # stains (colours kept, glass mapped) rather than fail the slide.
            source = normalizer.fallback_source(sample)
            estimate = f"fallback: {exc}"
        stain = {
            "method": params.stain_method,
            "slide": json.loads(source.to_json()),
            "target": json.loads(reference.to_json()),
            "slide_estimate": estimate,
        }
        key = _key(prefix, STAIN_JSON)
        store.put_bytes(key, json.dumps(stain, indent=1).encode())
        written.append(key)

    shards = ShardWriter(
        store, prefix, "20x", image_format=params.image_format, quality=params.quality
    )
    rows = []
    try:
        for done, patch in enumerate(grid.itertuples(index=False), start=1):
            budget.check()
            rgb = reader.read_patch(
                int(patch.x),
                int(patch.y),
                params.grid.patch_px,
                params.grid.target_mpp,
                allow_upsample=params.grid.allow_upsample,
            )
            if normalizer is not None:
                rgb = normalizer.transform(rgb, source)  # type: ignore[arg-type]
            row = shards.add(rgb, x=int(patch.x), y=int(patch.y))
            if row["shard"] not in written:
                written.append(row["shard"])
            rows.append(row)
            if progress is not None:
                progress(done, len(grid))
        shards.close()
    except BaseException:
        shards.abort()
        raise
    table = grid.assign(
        shard=[row["shard"] for row in rows], member=[row["member"] for row in rows]
    )
    _put_table(store, _key(prefix, GRID_FILE), table, written)
    return result("ok", f"{len(grid)} patches", len(grid), sorted(set(table["shard"])))


def _put_table(store: ObjectStore, key: str, table: pd.DataFrame, written: list[str]) -> None:
    buffer = io.BytesIO()
    table.to_parquet(buffer, index=False)
    store.put_bytes(key, buffer.getvalue())
    written.append(key)
