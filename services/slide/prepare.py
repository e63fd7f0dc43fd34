"""One slide preparation for training and prediction.

Tiling (the patches the models learn from) and prediction (the patches they score)
must see a slide the same way, or the models are scored on patches unlike the ones
they were trained on. :func:`prepare_slide` is that one way:

1. ``masks``: tissue and artifact masks from the slide level nearest
   ``mask_downsample`` (:func:`~services.slide.tissue.compute_masks`);
2. ``qc``: the QC metrics and verdict of those masks (:func:`~services.slide.qc.qc_summary`);
3. ``usable``: where patches may come from, tissue (pen ink always out) less blur and
   folds unless told to keep them (:func:`allowed_area`);
4. ``grid``: the patch grid on that area (:func:`~services.slide.grid.patch_grid`),
   sampled down to ``max_patches`` when asked;
5. ``stain``: with a reference, the slide's own stains, estimated once from patches
   spread evenly over the grid (:func:`slide_stains`).

:class:`PrepParams` holds the parameters of these steps; the TilingService's
``TileParams`` and the PredictionService's ``PredictionParams`` both extend it, so a
field is declared once and means the same in both.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from services.common.errors import InvalidInput
from services.common.objectstore import ObjectStore
from services.slide.grid import GridParams, TissueRule, patch_grid
from services.slide.qc import QcSummary, QcThresholds, qc_summary
from services.slide.reader import SlideReader
from services.slide.stain import LabStats, SlideStains, StainMatrix, get_normalizer
from services.slide.tissue import TissueMasks, TissueParams, compute_masks, save_masks


@dataclass(frozen=True)
class PrepParams:
    """How a slide is prepared (the steps of the module docstring).

    Attributes:
        grid: Patch grid (magnification, size, tissue share, overlap).
        tissue: Tissue and artifact mask parameters.
        mask_downsample: Level-0 px per mask px wanted for the masks.
        exclude_blur: Leave blurred tissue out of the grid.
        exclude_fold: Leave tissue folds out of the grid (pen ink is always left out).
        stain_sample_patches: Grid patches sampled to estimate the slide's stains.
        max_patches: Most patches kept, sampled uniformly without replacement with
            ``seed`` (0 keeps every patch).
        seed: Seed of that sampling.
        qc: When the slide passes, warns or fails QC.
    """

    grid: GridParams = field(default_factory=GridParams)
    tissue: TissueParams = field(default_factory=TissueParams)
    mask_downsample: float = 16.0
    exclude_blur: bool = True
    exclude_fold: bool = True
    stain_sample_patches: int = 24
    max_patches: int = 0
    seed: int = 0
    qc: QcThresholds = field(default_factory=QcThresholds)

    def __post_init__(self) -> None:
        if self.max_patches < 0:
            raise InvalidInput(f"max_patches must be >= 0, got {self.max_patches}")
        if not 1 <= self.stain_sample_patches <= 1024:
            raise InvalidInput(
                f"stain_sample_patches must be within 1-1024, got {self.stain_sample_patches}"
            )
        if not self.mask_downsample >= 1.0:
            raise InvalidInput(f"mask_downsample must be >= 1, got {self.mask_downsample}")


@dataclass
class PreparedSlide:
    """A slide made ready for patches.

    Attributes:
        masks: Tissue and artifact masks.
        qc: Their QC metrics and verdict.
        usable: Where patches may come from (mask pixels).
        grid: One row per patch: x, y, width, height (level 0), row, col,
            tissue_fraction.
        stains: The slide's stains (None without a reference or without patches).
    """

    masks: TissueMasks
    qc: QcSummary
    usable: np.ndarray
    grid: pd.DataFrame
    stains: SlideStains | None

    def tissue_rule(self, min_tissue: float) -> TissueRule:
        """The rule anything cut from the slide later (its 40x windows) follows: the
        usable area, and the least share of it a window needs."""
        return TissueRule(self.usable, self.masks.downsample, min_tissue)


def allowed_area(
    tissue: np.ndarray,
    blur: np.ndarray,
    fold: np.ndarray,
    exclude_blur: bool = True,
    exclude_fold: bool = True,
) -> np.ndarray:
    """Where the grid may take patches: tissue (pen already out), less what is excluded."""
    allowed = tissue.copy()
    if exclude_blur:
        allowed &= ~blur
    if exclude_fold:
        allowed &= ~fold
    return allowed


def sample_for_stains(reader: SlideReader, grid: pd.DataFrame, params: PrepParams) -> np.ndarray:
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


def slide_stains(
    reader: SlideReader,
    grid: pd.DataFrame,
    params: PrepParams,
    reference: StainMatrix | LabStats,
    method: str,
) -> SlideStains:
    """The slide's stains, estimated once from patches spread over its grid.

    Too little tissue, or one stain only, is not an error: the slide is then
    normalized against the reference's own stains (colours kept, glass mapped).

    Raises:
        InvalidInput: An unknown method, or a reference of another method's kind.
    """
    if grid.empty:
        raise InvalidInput("the slide has no patch to estimate its stains from")
    normalizer = get_normalizer(method)
    normalizer.load_target(reference)  # type: ignore[arg-type]
    sample = sample_for_stains(reader, grid, params)
    estimate = "ok"
    try:
        source = normalizer.stain_matrix_of(sample)
    except InvalidInput as exc:
        source = normalizer.fallback_source(sample)
        estimate = f"fallback: {exc}"
    return SlideStains(method, normalizer, source, reference, estimate)


def prepare_slide(
    reader: SlideReader,
    slide_id: str,
    params: PrepParams,
    *,
    reference: StainMatrix | LabStats | None = None,
    stain_method: str = "vahadane",
    on_stage: Callable[[str], None] | None = None,
) -> PreparedSlide:
    """Masks, QC, usable area, grid and stains of one slide (the module docstring).

    Args:
        reader: The open slide.
        slide_id: Its id (error messages).
        params: How to prepare it.
        reference: Target stains; None leaves colours as scanned (no stain step).
        stain_method: Normalization method used with a reference.
        on_stage: Called with ``tissue``, ``grid`` and ``stain`` as each step
            starts (the stain step only runs with a reference and a non-empty grid).

    Returns:
        The prepared slide; an empty grid (no tissue) is an answer, not an error.
    """
    stage = on_stage or (lambda name: None)
    stage("tissue")
    masks = compute_masks(reader, slide_id, params.tissue, params.mask_downsample)
    stage("grid")
    qc = qc_summary(masks, params.qc)
    usable = allowed_area(
        masks.tissue, masks.blur, masks.fold, params.exclude_blur, params.exclude_fold
    )
    grid = patch_grid(
        reader.dimensions, float(reader.mpp[0]), usable, masks.downsample, params.grid
    )
    if params.max_patches and len(grid) > params.max_patches:
        # A uniform sample, kept in grid order (neighbours stay neighbours in shards).
        grid = grid.sample(n=params.max_patches, random_state=params.seed).sort_index()
        grid = grid.reset_index(drop=True)
    stains = None
    if reference is not None and not grid.empty:
        stage("stain")
        stains = slide_stains(reader, grid, params, reference, stain_method)
    return PreparedSlide(masks, qc, usable, grid, stains)


def store_masks(
    store: ObjectStore, prefix: str, masks: TissueMasks, written: list[str] | None = None
) -> list[str]:
    """Put the mask PNGs and ``tissue.json`` (last) under ``prefix``; returns the keys."""
    keys = written if written is not None else []
    with tempfile.TemporaryDirectory() as folder:
        save_masks(masks, folder)
        paths = sorted(Path(folder).iterdir(), key=lambda p: (p.name == "tissue.json", p.name))
        for path in paths:
            key = f"{prefix}/{path.name}" if prefix else path.name
            store.put_file(key, path)
            keys.append(key)
    return keys
