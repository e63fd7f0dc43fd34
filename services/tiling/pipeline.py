"""Tiling one slide: tissue masks, patch grid, stain normalization, patch shards.

``tile_slide`` writes everything under one key prefix of an object store
(``tiles/{slide_id}/{params_hash}`` for the services, the output folder itself for
the CLI)::

    tissue.png, pen_*.png, blur.png, fold.png, tissue.json   masks and their downsample
    grid.parquet       one row per patch: x, y, width, height (level 0), row, col,
                       tissue_fraction, shard, member
    stain.json         the slide's stain matrix and the target reference (if normalized)
    shards/20x-00000.tar ...   the patches (JPEG q90 by default)
    tile.json          written last: parameters, hash, counts, status, QC metrics

A run whose ``tile.json`` exists with the same parameter hash is reused; a run that
fails removes what it wrote, and in any case never writes ``tile.json``, so nothing
half-done looks finished.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import cv2
import numpy as np
import pandas as pd

from services.common.cancellation import WorkBudget
from services.common.errors import InvalidInput
from services.common.objectstore import ObjectStore
from services.slide.grid import GridParams, TissueRule, grid_shape, params_hash
from services.slide.prepare import PrepParams, allowed_area, prepare_slide, store_masks
from services.slide.qc import QcSummary, QcThresholds, judged
from services.slide.reader import SlideReader
from services.slide.shards import ShardWriter
from services.slide.stain import LabStats, SlideStains, StainMatrix, get_normalizer

log = logging.getLogger(__name__)

#: Bump when the output layout or the algorithms change, so old results are not reused.
PIPELINE_VERSION = 2
TILE_JSON = "tile.json"
GRID_FILE = "grid.parquet"
STAIN_JSON = "stain.json"

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class TileParams(PrepParams):
    """Everything that decides a tiling result (and so its hash): the slide
    preparation's parameters (:class:`~services.slide.prepare.PrepParams`: grid,
    masks, excluded artifacts, stain sample, patch cap, QC thresholds) and these.

    Attributes:
        stain_method: ``vahadane``, ``macenko`` or ``reinhard``; used when a
            reference is given.
        image_format: ``jpeg`` or ``png`` patches.
        quality: JPEG quality.
    """

    stain_method: str = "vahadane"
    image_format: str = "jpeg"
    quality: int = 90


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
    #: The slide's QC metrics and verdict (``QcSummary.as_dict``).
    qc: dict[str, Any] = field(default_factory=dict)

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


def load_slide_stain(store: ObjectStore, prefix: str) -> SlideStains | None:
    """The stains a tiling normalized its slide with, from its ``stain.json``.

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
    return SlideStains(
        method=str(method),
        normalizer=normalizer,
        source=LabStats.from_json(slide) if reinhard else StainMatrix.from_json(slide),
        reference=reference,
        estimate=str(stain.get("slide_estimate", "ok")),
    )


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
    """The hash naming a tiling result: parameters, reference stains and version.

    The QC thresholds are not part of it: they judge the slide, they change nothing
    tiling writes (a failing slide is tiled too), so a tiling is reused under other
    thresholds and judged again (hashed as the defaults, so a digest is what it was
    before the thresholds were parameters).
    """
    reference_id = None if reference is None else reference.to_json()
    return params_hash(
        replace(params, qc=QcThresholds()),
        {"reference": reference_id, "version": PIPELINE_VERSION},
    )


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
        if found.qc:  # judged again under this request's thresholds
            found.qc = judged(QcSummary.from_dict(found.qc), params.qc).as_dict()
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
    prepared = prepare_slide(
        reader, slide_id, params, reference=reference, stain_method=params.stain_method
    )
    store_masks(store, prefix, prepared.masks, written)
    grid = prepared.grid
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
            qc=prepared.qc.as_dict(),
        )

    if grid.empty:
        _put_table(store, _key(prefix, GRID_FILE), grid.assign(shard="", member=""), written)
        return result("no_tissue", "no patch has enough tissue: the grid is empty", 0, [])

    stains = prepared.stains
    if stains is not None:
        stain = {
            "method": stains.method,
            "slide": json.loads(stains.source.to_json()),
            "target": json.loads(stains.reference.to_json()),
            "slide_estimate": stains.estimate,
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
            if stains is not None:
                rgb = stains.transform(rgb)
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
