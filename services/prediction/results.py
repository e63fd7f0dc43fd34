"""What a slide's prediction gives back: progress events and the result, per
biomarker and per slide (the proto's Progress, BiomarkerPrediction and SlidePrediction
as plain data)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from services.common.errors import InvalidInput
from services.common.vocabulary import BIOMARKERS

#: Statuses of a result (the proto's PredictionStatus).
STATUS_OK = "ok"
STATUS_NO_TISSUE = "no_tissue"
STATUS_NO_CANCER = "no_cancer_patches"
STATUS_QC_FAILED = "qc_failed"
STATUS_OOD = "out_of_distribution"

#: Pipelines (the proto's PredictionPipeline).
PIPELINE_PAPER = "paper"
PIPELINE_MIL = "mil"


def attention_column(biomarker: str) -> str:
    """The column of a MIL attention table holding a biomarker's attention."""
    return f"attention_{biomarker}"


def check_request(biomarkers: tuple[str, ...], top_k: int) -> None:
    """InvalidInput unless ``biomarkers`` are distinct names of ``BIOMARKERS`` (at least
    one) and ``top_k`` is within 1-64: what both pipelines are asked for."""
    unknown = [b for b in biomarkers if b not in BIOMARKERS]
    if unknown or not biomarkers or len(set(biomarkers)) != len(biomarkers):
        raise InvalidInput(
            f"biomarkers must be distinct names of {', '.join(BIOMARKERS)}; got {list(biomarkers)}"
        )
    if not 1 <= top_k <= 64:
        raise InvalidInput(f"top_k must be within 1-64, got {top_k}")


@dataclass(frozen=True)
class ProgressEvent:
    """How far a prediction has got (the proto's Progress).

    Attributes:
        stage: Current stage (see :mod:`services.prediction.pipeline`).
        done: Items of the stage finished (patches).
        total: Items of the stage (0 = not known yet).
        fraction: 0-1 share of the whole prediction done; never decreases.
        message: One readable line.
    """

    stage: str
    done: int
    total: int
    fraction: float
    message: str


ProgressFn = Callable[[ProgressEvent], None]


@dataclass(frozen=True)
class TopPatch:
    """A patch supporting a call: level-0 footprint, its probability (0-1, paper's
    pipeline) or its share of the MIL head's attention (0-1, MIL pipeline)."""

    x: int
    y: int
    width: int
    height: int
    probability: float
    attention: float = 0.0


@dataclass
class BiomarkerResult:
    """The prediction of one biomarker.

    Attributes:
        biomarker: Its name (``tp53``...).
        model_name: TorchServe name of the model.
        model_version: Version of the model.
        probability: Mean calibrated patch probability (0-1).
        threshold: The model's decision threshold (0-1).
        positive: The call: probability >= threshold.
        patch_count: 40x patches averaged.
        top_patches: Strongest support first (highest p for a positive call,
            lowest for a negative one).
        heatmap_key: Store key of the heatmap PNG, "" when not rendered.
    """

    biomarker: str
    model_name: str
    model_version: str
    probability: float
    threshold: float
    positive: bool
    patch_count: int
    top_patches: list[TopPatch]
    heatmap_key: str = ""


@dataclass
class SlidePredictionResult:
    """Everything predicted for one slide (the proto's SlidePrediction), plus timings.

    Attributes:
        slide_id: The slide.
        status: ``ok``, ``no_tissue``, ``qc_failed`` or ``no_cancer_patches``.
        message: One readable line about the status.
        biomarkers: One result per requested biomarker; empty unless ``ok``.
        tissue_patch_count: 20x tissue patches scored.
        cancer_patch_count: 20x patches above the cancer threshold.
        cancer_patch_fraction: Their share of the tissue patches (0-1).
        cancer_confidence: The cancer threshold used (0-1).
        high_res_source: ``native``, ``upsampled``, or "" when no 40x patch was made.
        cancer_model_name: TorchServe name of the detector.
        cancer_model_version: Its version.
        params_hash: Hash naming the output prefix.
        prefix: ``runs/predictions/{slide_id}/{params_hash}``.
        tissue_mask_key: Key of ``tissue.png``.
        patch_table_key: Key of ``patches.parquet``, "" when no 40x patch was scored.
        elapsed_s: Wall-clock seconds.
        timings: Seconds per stage: wall time of the sequential stages (``tissue``,
            ``grid``, ``stain``, ``scoring``, ``aggregate``, ``heatmaps``, ``geojson``
            when asked for) and summed
            thread time inside ``scoring`` (``read_20x``, ``normalize``, ``make_40x``,
            ``cancer_requests``, ``biomarker_requests``).
        utilisation: The :class:`BusyMeter` summary of the scorer.
        qc: The slide's QC metrics and verdict (``QcSummary.as_dict``).
        pipeline: ``paper`` or ``mil``.
        encoder_model_name, encoder_model_version, encoder_sha256: The patch encoder
            (MIL pipeline; "" otherwise).
        mil_model_name, mil_model_version: The MIL head (MIL pipeline).
        bag_key: Store key of the slide's bag (MIL pipeline).
        training_data: What the calling models were trained on (the model card's
            ``training_data``: cohort, synthetic, sites, n_slides, n_patients).
        out_of_distribution: The slide's distance to the training distribution
            (``OodDecision`` as a dict: out_of_distribution, distance, threshold,
            basis, patch_count); {} when not measured.
        patch_mpp, patch_px: Resolution (µm/px) and side (px) of the patches in
            ``top_patches``: 40x 512 px for the paper's pipeline, the encoder's for MIL.
        geojson_key: Store key of the slide's objects as QuPath GeoJSON
            (``{prefix}/{slide_id}.geojson``), "" when not asked for or no calls.
    """

    slide_id: str
    status: str
    message: str
    biomarkers: list[BiomarkerResult]
    tissue_patch_count: int
    cancer_patch_count: int
    cancer_patch_fraction: float
    cancer_confidence: float
    high_res_source: str
    cancer_model_name: str
    cancer_model_version: str
    params_hash: str
    prefix: str
    tissue_mask_key: str
    patch_table_key: str = ""
    elapsed_s: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    utilisation: dict[str, float] = field(default_factory=dict)
    qc: dict[str, Any] = field(default_factory=dict)
    pipeline: str = PIPELINE_PAPER
    encoder_model_name: str = ""
    encoder_model_version: str = ""
    encoder_sha256: str = ""
    mil_model_name: str = ""
    mil_model_version: str = ""
    bag_key: str = ""
    training_data: dict[str, Any] = field(default_factory=dict)
    out_of_distribution: dict[str, Any] = field(default_factory=dict)
    patch_mpp: float = 0.25
    patch_px: int = 512
    geojson_key: str = ""

    def as_dict(self) -> dict[str, Any]:
        """The result as plain JSON values."""
        return asdict(self)
