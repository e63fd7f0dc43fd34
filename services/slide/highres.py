"""From a 20x patch to its four 40x patches (docs/method.md, stage 1).

Each cancer-discriminative 20x patch becomes four 40x patches of the same pixel size:
read from the slide's native 40x level when it has one, otherwise the paper's way —
zoom the 20x patch x2 with Lanczos interpolation and crop the four quadrants. The
quadrants are returned in row-major order (top-left, top-right, bottom-left,
bottom-right) with their level-0 origins.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

import cv2
import numpy as np
import pandas as pd

from services.common.errors import FailedPrecondition, InvalidInput
from services.common.objectstore import ObjectStore
from services.slide.grid import TissueRule
from services.slide.reader import SlideReader
from services.slide.shards import ShardWriter
from services.slide.stain import SlideStains


class HighResSource(StrEnum):
    """Where a 40x patch's pixels came from."""

    NATIVE = "native"
    UPSAMPLED = "upsampled"


def quadrant_origins(x: int, y: int, footprint_px: float) -> list[tuple[int, int]]:
    """Level-0 origins of the four quadrants of a patch at (x, y) with that footprint."""
    half = footprint_px / 2
    return [(round(x + dx * half), round(y + dy * half)) for dy in (0, 1) for dx in (0, 1)]


def upsample_quadrants(patch: np.ndarray) -> list[np.ndarray]:
    """Zoom a square RGB patch x2 (Lanczos) and cut it into four of the same size.

    Args:
        patch: ``uint8`` (n, n, 3) patch at 20x.

    Returns:
        Four ``uint8`` (n, n, 3) patches at 40x, row-major.
    """
    if patch.ndim != 3 or patch.shape[2] != 3 or patch.shape[0] != patch.shape[1]:
        raise InvalidInput(f"expected a square RGB patch, got shape {patch.shape}")
    if patch.dtype != np.uint8:
        raise InvalidInput(f"expected uint8 pixels, got {patch.dtype}")
    n = patch.shape[0]
    zoomed = cv2.resize(patch, (2 * n, 2 * n), interpolation=cv2.INTER_LANCZOS4)
    return [
        np.ascontiguousarray(zoomed[r * n : (r + 1) * n, c * n : (c + 1) * n])
        for r in (0, 1)
        for c in (0, 1)
    ]


@dataclass
class HighResResult:
    """The 40x patches made from a set of 20x patches.

    Attributes:
        source: Native 40x level or Lanczos upsampling.
        level: Pyramid level read (the 40x level, or the 20x level when upsampled).
        mpp: Resolution of the 40x patches, µm/px.
        shards: Keys of the shard files.
        index_key: Key of the parquet index (one row per 40x patch).
        patch_count: Number of 40x patches.
    """

    source: HighResSource
    level: int
    mpp: float
    shards: list[str]
    index_key: str
    patch_count: int


def choose_source(reader: SlideReader, policy: str, high_mpp: float = 0.25) -> HighResSource:
    """Native when the slide has a level at least as fine as ``high_mpp`` (and the
    policy allows it), else upsampled; ``native`` on a slide without one is refused."""
    native = float(reader.mpp[0]) <= high_mpp * 1.02
    if policy == "native":
        if not native:
            raise FailedPrecondition(
                f"the slide's finest level is {reader.mpp[0]:.3g} µm/px: it has no native 40x "
                "level; use the auto or upsample policy"
            )
        return HighResSource.NATIVE
    if policy == "upsample":
        return HighResSource.UPSAMPLED
    if policy != "auto":
        raise InvalidInput(f"unknown 40x policy {policy!r}; use auto, native or upsample")
    return HighResSource.NATIVE if native else HighResSource.UPSAMPLED


class WindowClaims:
    """The 40x windows of a slide's 20x patches, each made once.

    A 20x patch at (x, y) with a level-0 footprint has four 40x windows, its
    quadrants. On an overlapping grid neighbours share windows (on a half-overlap
    grid, two with each neighbour): a window goes to the first patch, in the order
    claimed, that has it. With a tissue rule, windows with too little usable tissue
    (glass or pen ink beside the tissue of their 20x patch) are left out.

    Tiling (:func:`extract_40x`, the 40x patches the models learn from) and the
    PredictionService (the ones they score) both take their windows from here, so a
    slide's 40x windows are the same in training and in prediction.

    Args:
        tissue: The usable area and least tissue share (None keeps every window).
    """

    def __init__(self, tissue: TissueRule | None = None) -> None:
        self.tissue = tissue
        self.taken: set[tuple[int, int]] = set()

    def claim(self, x: int, y: int, footprint_px: float) -> list[tuple[int, int]]:
        """Level-0 origins of the windows of the patch at (x, y) not taken yet,
        taken now (row-major order)."""
        origins = quadrant_origins(x, y, footprint_px)
        if self.tissue is not None:
            keeps = self.tissue.keeps(origins, footprint_px / 2)
            origins = [o for o, keep in zip(origins, keeps, strict=True) if keep]
        fresh = [origin for origin in origins if origin not in self.taken]
        self.taken.update(fresh)
        return fresh


def make_windows(
    reader: SlideReader,
    x: int,
    y: int,
    footprint_px: float,
    windows: list[tuple[int, int]],
    *,
    source: HighResSource,
    patch_px: int,
    low_mpp: float,
    normalize: Callable[[np.ndarray], np.ndarray] | None = None,
    low_patch: np.ndarray | None = None,
    read: Callable[..., np.ndarray] | None = None,
) -> list[np.ndarray]:
    """The 40x pixels of some windows of the 20x patch at (x, y).

    Native: each window read from the slide at ``low_mpp / 2`` and normalized.
    Upsampled (the paper's way): the normalized 20x patch (``low_patch``, or read and
    normalized now) zoomed x2 with Lanczos and cut into its quadrants.

    Args:
        reader: The open slide.
        x, y: The 20x patch's level-0 origin.
        footprint_px: Its level-0 side.
        windows: Origins of the quadrants wanted (from :meth:`WindowClaims.claim`).
        source: Native level or upsampling (:func:`choose_source`).
        patch_px: Patch side, px (the same at 20x and 40x).
        low_mpp: Resolution of the 20x patch, µm/px.
        normalize: The slide's stain transform (None keeps its colours).
        low_patch: The 20x patch's normalized pixels, when already read.
        read: Reads a patch as ``reader.read_patch`` does (to time it); default that.

    Returns:
        One ``uint8`` (patch_px, patch_px, 3) image per window, in the order given.
    """
    normalize = normalize or (lambda rgb: rgb)
    read = read or reader.read_patch
    if source is HighResSource.NATIVE:
        return [normalize(read(qx, qy, patch_px, low_mpp / 2)) for qx, qy in windows]
    if low_patch is None:
        low_patch = normalize(read(x, y, patch_px, low_mpp))
    every = quadrant_origins(x, y, footprint_px)
    by_origin = dict(zip(every, upsample_quadrants(low_patch), strict=True))
    return [by_origin[window] for window in windows]


def extract_40x(
    reader: SlideReader,
    store: ObjectStore,
    prefix: str,
    patches: list[tuple[int, int, float]],
    *,
    policy: str = "auto",
    patch_px: int = 512,
    low_mpp: float = 0.5,
    patches_per_shard: int = 1000,
    stain: SlideStains | None = None,
    tissue: TissueRule | None = None,
) -> HighResResult:
    """Make the four 40x patches of each 20x patch and store them as shards.

    Overlapping 20x patches can share a quadrant (on a grid whose stride is half a
    patch, neighbours share two): each 40x window is stored once, under the first
    20x patch that has it. With ``tissue``, quadrants with too little tissue (glass
    or pen ink beside the tissue of their 20x patch) are left out.

    Args:
        reader: The open slide.
        store: Where the shards and index go.
        prefix: Key prefix (the slide's tiling folder).
        patches: The 20x patches as (x, y, footprint) in level-0 px.
        policy: ``auto`` (native when there is a 40x level), ``native`` or ``upsample``.
        patch_px: Patch side, px (the same at 20x and 40x).
        low_mpp: Resolution of the 20x patches, µm/px.
        patches_per_shard: Members per shard.
        stain: The slide's stains as the tiling the 20x patches came from
            normalized them (``pipeline.load_slide_stain``): native quadrants are normalized
            like the 20x patches were, and an upsampled one comes from the normalized
            20x patch, as in the PredictionService. None keeps the slide's colours.
        tissue: The tiling's tissue rule (``pipeline.load_tissue_rule``); None keeps
            every quadrant.

    Returns:
        Where the 40x patches are and how they were made.
    """
    source = choose_source(reader, policy, low_mpp / 2)
    normalized = None if stain is None else json.loads(stain.source.to_json())
    rule = (
        None
        if tissue is None
        else [tissue.min_tissue, hashlib.sha256(tissue.mask.tobytes()).hexdigest()]
    )
    selection = json.dumps([source.value, patch_px, low_mpp, sorted(patches), normalized, rule])
    digest = hashlib.sha256(selection.encode()).hexdigest()[:12]
    name = f"40x-{digest}"
    writer = ShardWriter(store, prefix, name, patches_per_shard=patches_per_shard)
    rows = []
    claims = WindowClaims(tissue)
    normalize = None if stain is None else stain.transform
    try:
        for x, y, footprint in patches:
            fresh = claims.claim(x, y, footprint)
            if not fresh:
                continue
            quads = make_windows(
                reader,
                x,
                y,
                footprint,
                fresh,
                source=source,
                patch_px=patch_px,
                low_mpp=low_mpp,
                normalize=normalize,
            )
            for (qx, qy), quad in zip(fresh, quads, strict=True):
                rows.append(
                    writer.add(
                        quad,
                        x=qx,
                        y=qy,
                        width=round(footprint / 2),
                        height=round(footprint / 2),
                        parent_x=x,
                        parent_y=y,
                        source=source.value,
                    )
                )
        writer.close()
    except BaseException:
        writer.abort()
        raise
    index_key = f"{prefix}/{name}-index.parquet"
    buffer = io.BytesIO()
    pd.DataFrame(rows).to_parquet(buffer, index=False)
    store.put_bytes(index_key, buffer.getvalue())
    level = reader.best_level_for_downsample(
        (low_mpp / 2 if source is HighResSource.NATIVE else low_mpp) / float(reader.mpp[0])
    )
    return HighResResult(
        source=source,
        level=level,
        mpp=low_mpp / 2,
        shards=sorted({row["shard"] for row in rows}),
        index_key=index_key,
        patch_count=len(rows),
    )
