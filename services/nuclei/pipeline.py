"""Nuclei of one image and the feature table of many shard patches.

The pure logic behind the NucleiService and ``histomarker nuclei`` (no gRPC here):

- :func:`analyze_patch`: segmentation, per-nucleus table and the 75 patch features
  of one RGB image;
- :func:`decode_image`: encoded bytes (PNG, JPEG, TIFF) to RGB with the size and
  colour checks a server needs before it spends memory on them;
- :func:`encode_labels_tiff`: instance labels as an unsigned 16-bit TIFF when they
  fit, else 32-bit;
- :func:`extract_shard_features`: every patch of tar shards (or chosen members) to
  one parquet table in the object store, written whole at the end or not at all.

Units: mpp in µm per px; x, y of shard patches in level-0 px; per-nucleus lengths in
µm and areas in µm² (see :mod:`services.nuclei.features`).
"""

from __future__ import annotations

import io
import math
import re
import tarfile
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO

import numpy as np
import pandas as pd

from services.common.cancellation import WorkBudget
from services.common.errors import InvalidInput, NotFound
from services.common.images import decode_rgb
from services.common.objectstore import ObjectStore
from services.nuclei.features import FEATURE_NAMES, PatchFeatures, nucleus_table, patch_features
from services.nuclei.methods import segment_batch
from services.nuclei.segment import MAX_SIDE_PX, SegmentationParams, check_patch
from services.slide.shards import decode_patch

#: Resolution assumed when none is given, µm/px (40x, the biomarker models' input).
DEFAULT_MPP = 0.25
#: Relative difference under which two given resolutions count as the same.
_MPP_TOLERANCE = 1e-6
#: Patches segmented together (one U-Net batch; on a GPU larger batches pay).
BATCH_PATCHES = 16
#: Columns of the shard feature table before the 75 feature columns.
TABLE_COLUMNS = ("slide_id", "shard", "member", "x", "y", "mpp", "nucleus_count", "few_nuclei")
_MEMBER_ORIGIN = re.compile(r"^(?:.*/)?x?(\d+)_y?(\d+)\.[A-Za-z0-9]+$")
_TILES_KEY = re.compile(r"^tiles/([^/]+)/")

#: Called with (stage, done, total) as work proceeds.
ProgressCallback = Callable[[str, int, int], None]


@dataclass(frozen=True)
class PatchAnalysis:
    """The nuclei of one image.

    Attributes:
        labels: int32 (H, W) instance labels: 0 background, 1..n one per nucleus.
        nuclei: One row per nucleus (``features.NUCLEUS_COLUMNS``): centroids in px,
            lengths in µm, areas in µm².
        features: The 75 patch features with the nucleus count and few-nuclei flag.
        mpp: Resolution the image was measured at, µm/px.
    """

    labels: np.ndarray
    nuclei: pd.DataFrame
    features: PatchFeatures
    mpp: float


def segmentation_params(
    min_area_um2: float = 0.0,
    max_area_um2: float = 0.0,
    min_solidity: float = 0.0,
    threshold_step: int = 0,
    method: str = "",
) -> SegmentationParams:
    """Segmentation parameters where 0 (or '' for the method) means the default (the
    RPCs' convention).

    Raises:
        InvalidInput: A value out of range (NaN included) or an unknown method,
            naming it.
    """
    given = {
        "min_area_um2": float(min_area_um2),
        "max_area_um2": float(max_area_um2),
        "min_solidity": float(min_solidity),
        "threshold_step": int(threshold_step),
    }
    for name, value in given.items():
        if not math.isfinite(value) or value < 0:
            raise InvalidInput(f"params.{name} must be a finite number >= 0, got {value}")
    changes: dict[str, object] = {name: value for name, value in given.items() if value != 0}
    if method:
        changes["method"] = method
    try:
        return replace(SegmentationParams(), **changes)  # type: ignore[arg-type]
    except InvalidInput as exc:
        raise InvalidInput(f"params: {exc}") from None


def resolve_mpp(requested: float, image_mpp: float = 0.0) -> float:
    """The resolution to measure an image at, µm/px.

    Args:
        requested: The caller's mpp; 0 means not given.
        image_mpp: The mpp recorded with the image; 0 means not known.

    Returns:
        ``requested``, else ``image_mpp``, else :data:`DEFAULT_MPP`.

    Raises:
        InvalidInput: Both given and different, or not a finite positive number.
    """
    for name, value in (("mpp", requested), ("image.mpp", image_mpp)):
        if not math.isfinite(value) or value < 0:
            raise InvalidInput(f"{name} must be a positive number of µm/px, got {value}")
    if requested and image_mpp and abs(requested - image_mpp) > _MPP_TOLERANCE * requested:
        raise InvalidInput(f"mpp {requested} µm/px differs from image.mpp {image_mpp} µm/px")
    return float(requested or image_mpp or DEFAULT_MPP)


def analyze_patch(
    rgb: np.ndarray, mpp: float = DEFAULT_MPP, params: SegmentationParams | None = None
) -> PatchAnalysis:
    """Segment the nuclei of an RGB patch and measure them.

    Args:
        rgb: uint8 (H, W, 3) RGB patch, stain-normalized, at most 4096 px a side.
        mpp: Resolution, µm/px (0.25 at 40x).
        params: Segmentation parameters; the defaults when None.

    Returns:
        Labels, per-nucleus table and the 75 features. An image without nuclei is
        not an error: it gives 0 nuclei, ``few_nuclei`` and all-zero features.

    Raises:
        InvalidInput: Not an 8-bit RGB image, too small or large, or a bad mpp.
    """
    return analyze_patches([rgb], [mpp], params)[0]


def analyze_patches(
    rgbs: Sequence[np.ndarray], mpps: Sequence[float], params: SegmentationParams | None = None
) -> list[PatchAnalysis]:
    """:func:`analyze_patch` of several patches, segmented as one batch (the U-Net
    runs them together, on the GPU when there is one)."""
    labels = segment_batch(rgbs, mpps, params=params)  # checks each patch first
    analyses = []
    for rgb, mpp, patch_labels in zip(rgbs, mpps, labels, strict=True):
        table = nucleus_table(patch_labels, rgb, mpp)
        analyses.append(PatchAnalysis(patch_labels, table, patch_features(table), float(mpp)))
    return analyses


def decode_image(data: bytes, what: str = "image") -> np.ndarray:
    """Encoded bytes to RGB under the nuclei's side limit (see :func:`decode_rgb`)."""
    return decode_rgb(data, what, MAX_SIDE_PX)


def labels_dtype(labels: np.ndarray) -> type[np.unsignedinteger]:
    """uint16 when every label is below 65536, else uint32."""
    top = int(labels.max()) if labels.size else 0
    if top < 0 or top >= 2**32:
        raise InvalidInput(f"labels must be within 0 to 2^32 - 1, got {top}")
    return np.uint16 if top < 2**16 else np.uint32


def encode_labels_tiff(labels: np.ndarray, mpp: float | None = None) -> bytes:
    """Instance labels as a zlib-compressed TIFF, uint16 when they fit else uint32.

    Args:
        labels: Integer (H, W) label image, 0 background.
        mpp: Resolution recorded in the TIFF (as px per cm), µm/px; None for none.
    """
    import tifffile

    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise InvalidInput(f"labels must be a 2-D integer image, got {labels.dtype} {labels.shape}")
    per_cm = 1e4 / mpp if mpp else None
    buffer = io.BytesIO()
    tifffile.imwrite(
        buffer,
        labels.astype(labels_dtype(labels)),
        compression="zlib",
        metadata=None,
        resolution=(per_cm, per_cm) if per_cm else None,
        resolutionunit="CENTIMETER" if per_cm else None,
    )
    return buffer.getvalue()


def decode_labels_tiff(data: bytes) -> np.ndarray:
    """The label image of :func:`encode_labels_tiff` (its uint16 or uint32 dtype)."""
    import tifffile

    return np.asarray(tifffile.imread(io.BytesIO(data)))


def slide_id_from_key(key: str) -> str:
    """The slide id of a tiling output key ``tiles/{slide_id}/...``; '' otherwise."""
    match = _TILES_KEY.match(key)
    return match.group(1) if match else ""


def member_origin(member: str) -> tuple[int, int] | None:
    """Level-0 (x, y) from a shard member name ``{x}_{y}.{ext}`` (or
    ``x{x}_y{y}.{ext}``); None when the name says nothing."""
    match = _MEMBER_ORIGIN.match(member)
    return (int(match.group(1)), int(match.group(2))) if match else None


@dataclass(frozen=True)
class ShardJob:
    """Which patches of one shard to process.

    Attributes:
        shard: Key of the tar shard.
        members: Member names to process; None means every member.
        mpp: Resolution of the shard's patches, µm/px.
        slide_id: The slide the patches come from ('' when not known).
        member_mpp: Per-member resolution overriding ``mpp``, µm/px.
        member_slide: Per-member slide id overriding ``slide_id``.
    """

    shard: str
    members: tuple[str, ...] | None
    mpp: float
    slide_id: str = ""
    member_mpp: dict[str, float] = field(default_factory=dict)
    member_slide: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PatchRequest:
    """One single patch asked for by shard and member.

    Attributes:
        shard: Key of the tar shard.
        member: Member name inside the shard.
        mpp: Resolution of the patch, µm/px; 0 means the call's.
        slide_id: The slide; '' means from the shard key.
    """

    shard: str
    member: str
    mpp: float = 0.0
    slide_id: str = ""


def plan_jobs(shards: Sequence[str], patches: Sequence[PatchRequest], mpp: float) -> list[ShardJob]:
    """Group whole shards and single patches into one job per shard (first-seen
    order); a patch of a shard that is processed whole adds nothing, a repeated one
    counts once.

    Raises:
        InvalidInput: Nothing to do, a patch without a member, or a bad mpp.
    """
    if not shards and not patches:
        raise InvalidInput("shards or patches: at least one is required")
    mpp = _checked_mpp(mpp, "mpp")
    whole = list(dict.fromkeys(shards))
    chosen: dict[str, dict[str, PatchRequest]] = {}
    for i, patch in enumerate(patches):
        if not patch.member:
            raise InvalidInput(f"patches[{i}]: member is required (the image's name in the shard)")
        if patch.mpp:
            _checked_mpp(patch.mpp, f"patches[{i}].mpp")
        if patch.shard not in whole:
            chosen.setdefault(patch.shard, {}).setdefault(patch.member, patch)
    jobs = [ShardJob(key, None, mpp, slide_id_from_key(key)) for key in whole]
    for key, members in chosen.items():
        jobs.append(
            ShardJob(
                key,
                tuple(members),
                mpp,
                slide_id_from_key(key),
                member_mpp={m: p.mpp for m, p in members.items() if p.mpp},
                member_slide={m: p.slide_id for m, p in members.items() if p.slide_id},
            )
        )
    return jobs


def _checked_mpp(mpp: float, what: str) -> float:
    """``mpp`` resolved (0 means the default) and within the segmentation's range,
    checked before any shard is fetched."""
    try:
        mpp = resolve_mpp(mpp)
        check_patch(np.zeros((8, 8, 3), np.uint8), mpp)  # the segmentation's own check
    except InvalidInput as exc:
        raise InvalidInput(f"{what}: {exc}") from None
    return mpp


@dataclass(frozen=True)
class ShardFeatures:
    """What :func:`extract_shard_features` wrote.

    Attributes:
        key: Key of the parquet table.
        patch_count: Rows (patches) in the table.
        few_nuclei_count: Patches with fewer than 3 nuclei.
    """

    key: str
    patch_count: int
    few_nuclei_count: int


def _fetch_shards(
    store: ObjectStore,
    jobs: list[ShardJob],
    folder: Path,
    budget: WorkBudget,
    progress: ProgressCallback | None,
) -> list[tuple[ShardJob, Path, list[str]]]:
    fetched = []
    for i, job in enumerate(jobs):
        budget.check()
        path = folder / f"{i:05d}.tar"
        store.get_file(job.shard, path)
        try:
            with tarfile.open(path, mode="r") as tar:
                names = [member.name for member in tar if member.isfile()]
        except (tarfile.TarError, OSError) as exc:
            raise InvalidInput(f"shard {job.shard!r} is not a tar shard") from exc
        if job.members is not None:
            missing = sorted(set(job.members) - set(names))
            if missing:
                raise NotFound(f"shard {job.shard!r} has no member {missing[0]!r}")
            names = [name for name in names if name in set(job.members)]
        fetched.append((job, path, names))
        if progress is not None:
            progress("download", i + 1, len(jobs))
    return fetched


def extract_shard_features(
    store: ObjectStore,
    jobs: list[ShardJob],
    output_key: str,
    params: SegmentationParams | None = None,
    *,
    max_patches: int = 10_000,
    progress: ProgressCallback | None = None,
    budget: WorkBudget | None = None,
) -> ShardFeatures:
    """The 75 features of every patch of the jobs, as one parquet table.

    Shards are fetched first (stage ``download``) so the patch count is known and the
    limit enforced before any segmentation; then each patch is processed (stage
    ``features``). The table is written with one ``put_bytes`` at the end: a call
    that fails or is cancelled leaves no table behind.

    Args:
        store: Where the shards are and the table goes.
        jobs: From :func:`plan_jobs`.
        output_key: Key of the table; must end in ``.parquet``.
        params: Segmentation parameters; defaults when None.
        max_patches: Most patches one call may process.
        progress: Called with (stage, done, total).
        budget: Deadline and cancellation, checked between patches.

    Returns:
        Where the table is and how many patches it holds.

    Raises:
        InvalidInput: A bad key, shard or patch image, or too many patches.
        NotFound: A missing shard or member.
    """
    if not output_key.endswith(".parquet"):
        raise InvalidInput(f"output: the key {output_key!r} must end in .parquet")
    budget = budget or WorkBudget.unlimited()
    with tempfile.TemporaryDirectory(prefix="histomarker-nuclei-") as tmp:
        fetched = _fetch_shards(store, jobs, Path(tmp), budget, progress)
        total = sum(len(names) for _, _, names in fetched)
        if total > max_patches:
            raise InvalidInput(
                f"{total} patches is over the limit of {max_patches} per call: "
                "split the shards over several calls"
            )
        rows: list[dict[str, object]] = []
        pending: list[tuple[ShardJob, str, np.ndarray, float]] = []

        def flush() -> None:
            rows.extend(_patch_rows(pending, params))
            pending.clear()
            if progress is not None:
                progress("features", len(rows), total)

        for job, path, names in fetched:
            wanted = set(names)
            with tarfile.open(path, mode="r") as tar:
                for member in tar:
                    if member.name not in wanted:
                        continue
                    budget.check()
                    pending.append(_decoded(job, member.name, tar.extractfile(member)))
                    if len(pending) >= BATCH_PATCHES:
                        flush()
        if pending:
            flush()
    budget.check()  # a late call writes nothing
    table = shard_table(rows)
    buffer = io.BytesIO()
    table.to_parquet(buffer, index=False)
    store.put_bytes(output_key, buffer.getvalue(), content_type="application/vnd.apache.parquet")
    return ShardFeatures(output_key, len(table), int(table["few_nuclei"].sum()))


def _decoded(
    job: ShardJob, member: str, handle: IO[bytes] | None
) -> tuple[ShardJob, str, np.ndarray, float]:
    """One shard member decoded and checked, errors naming it."""
    where = f"shard {job.shard!r} member {member!r}"
    if handle is None:
        raise InvalidInput(f"{where} cannot be read")
    mpp = job.member_mpp.get(member, job.mpp)
    try:
        rgb = check_patch(decode_patch(handle.read()), mpp)
    except InvalidInput as exc:
        raise InvalidInput(f"{where}: {exc}") from None
    return job, member, rgb, mpp


def _patch_rows(
    patches: list[tuple[ShardJob, str, np.ndarray, float]], params: SegmentationParams | None
) -> list[dict[str, object]]:
    """The table rows of decoded patches, segmented as one batch."""
    results = analyze_patches([p[2] for p in patches], [p[3] for p in patches], params)
    rows = []
    for (job, member, _, mpp), result in zip(patches, results, strict=True):
        origin = member_origin(member)
        row: dict[str, object] = {
            "slide_id": job.member_slide.get(member, job.slide_id),
            "shard": job.shard,
            "member": member,
            "x": origin[0] if origin else None,
            "y": origin[1] if origin else None,
            "mpp": mpp,
            "nucleus_count": result.features.nucleus_count,
            "few_nuclei": result.features.few_nuclei,
        }
        row.update(result.features.as_dict())
        rows.append(row)
    return rows


def shard_table(rows: list[dict[str, object]]) -> pd.DataFrame:
    """Rows of :func:`extract_shard_features` as a typed table (also when empty)."""
    table = pd.DataFrame(rows, columns=[*TABLE_COLUMNS, *FEATURE_NAMES])
    types = {
        "slide_id": "string",
        "shard": "string",
        "member": "string",
        "x": "Int64",
        "y": "Int64",
        "mpp": "float64",
        "nucleus_count": "int64",
        "few_nuclei": "bool",
    }
    types.update(dict.fromkeys(FEATURE_NAMES, "float64"))
    return table.astype(types)
