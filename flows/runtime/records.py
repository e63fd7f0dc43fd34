"""What the pipeline's tasks hand each other: plain records of object-store keys.

Every record is JSON (pydantic), so it can be a flow parameter, a cached task
result and part of the next task's cache key. Pixels and tables stay in the store.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Record(BaseModel):
    """Immutable, JSON-only base of the records."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class CohortRef(Record):
    """A cohort in the store.

    Attributes:
        name: Cohort name (``cohorts/{name}/``).
        manifest_key: ``cohorts/{name}/manifest.csv``; its rows name each slide's
            store key (``slide_key``) and content digest (``slide_sha256``).
        manifest_sha256: Digest of the manifest's bytes (changes with any row).
    """

    name: str
    manifest_key: str
    manifest_sha256: str


class SlideRef(Record):
    """One slide in the store."""

    slide_id: str
    key: str
    sha256: str


class TiledSlide(Record):
    """A slide after TileSlide: its 20x patch grid and shards, and its QC.

    Attributes:
        qc_verdict: ``pass``, ``warn`` or ``fail`` (recorded: a failing slide is
            still tiled; its usable patches are as good as any).
        qc_reasons: Why, one line each.
        usable_area_mm2: Tissue with no pen, blur or fold on it, mm².
        usable_fraction: Its share of the tissue (0-1).
    """

    slide_id: str
    slide_key: str
    params_hash: str
    grid_key: str
    patch_count: int
    patch_px: int
    patch_mpp: float
    qc_verdict: str = ""
    qc_reasons: tuple[str, ...] = ()
    usable_area_mm2: float = 0.0
    usable_fraction: float = 0.0


class ModelRef(Record):
    """A trained model version stored under ``models/{name}/{version}/``.

    Attributes:
        name: ``cancer_detector`` or ``biomarker_{name}``.
        version: Digest of its training inputs (the same inputs, the same version).
        prefix: ``models/{name}/{version}``.
        archive_key: The ``.mar`` in the store.
        temperature: Fitted calibration temperature T.
        val_auroc: Patch AUROC on the validation patients (calibrated, no TTA);
            None when undefined.
        val_patients: The held-out validation patients.
    """

    name: str
    version: str
    prefix: str
    archive_key: str
    temperature: float
    val_auroc: float | None
    val_patients: tuple[str, ...]


class Registration(Record):
    """A model version registered on TorchServe with READY workers."""

    name: str
    version: str
    ready_workers: int


class CdSlide(Record):
    """A biomarker-set slide after cancer detection and the 40x step.

    Attributes:
        slide_id: The slide.
        scores_key: Parquet of every 20x patch's cancer probability and confidence.
        patches_20x: 20x patches scored.
        cd_20x: 20x patches kept as cancer-discriminative.
        fallback: Whether the top patches were kept because fewer than the minimum
            passed the threshold (ours; never in the paper's settings).
        index_key: Parquet index of the 40x CD patches ("" when there are none).
        shards: The 40x shard keys.
        patches_40x: 40x patches made (up to four per CD patch: its quadrants with
            enough tissue, each window once).
        source_40x: ``native`` or ``upsampled``.
    """

    slide_id: str
    scores_key: str
    patches_20x: int
    cd_20x: int
    fallback: bool
    index_key: str
    shards: tuple[str, ...]
    patches_40x: int
    source_40x: str


class BiomarkerResult(Record):
    """One biomarker model after its TTA evaluation and BD selection.

    Attributes:
        biomarker: ``tp53``, ``pik3ca``, ``er``, ``pr``, ``her2`` or ``basal``.
        model: The stored model version.
        scores_key: Parquet: every CD patch of the labelled slides with its label,
            calibrated TTA probability, split (train/validation) and BD flag.
        evaluation_key: JSON of the patch- and slide-level validation metrics.
        bd_patches: BD patches selected (all splits).
        patch_auroc: Patch AUROC on the validation patients (TTA).
        slide_auroc: Slide AUROC on the validation patients (mean of patches).
    """

    biomarker: str
    model: ModelRef
    scores_key: str
    evaluation_key: str
    bd_patches: int
    patch_auroc: float | None
    slide_auroc: float | None


class SkippedBiomarker(Record):
    """A biomarker this cohort cannot train or analyse, and why."""

    biomarker: str
    reason: str


class FeatureTableRef(Record):
    """NucleiService's feature table of one slide's 40x CD patches."""

    slide_id: str
    table_key: str
    patch_count: int


class AnalysisResult(Record):
    """What the feature analysis wrote for one run."""

    report_key: str
    ablation_key: str
    statistics_key: str
    summary_key: str
    skipped: tuple[SkippedBiomarker, ...]
