"""The training pipeline's parameters: what to compute, never where (that is
:mod:`flows.runtime.settings`). Defaults are the method's (docs/method.md); tests and demos shrink
them (a tiny backbone, small patches, few epochs)."""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import Field, model_validator

from flows.runtime.records import Record
from services.analysis.tables import MAX_BOOTSTRAP, MAX_FOLDS, MAX_SEED, MAX_TREES, MIN_FOLDS
from services.common.vocabulary import BIOMARKERS
from services.inference.tta import TRANSFORM_NAMES


class TilingConfig(Record):
    """How TilingService tiles every slide (20x patches, Vahadane normalization)."""

    #: Side of the square 20x patches, px.
    patch_px: int = Field(default=512, ge=32, le=4096)
    #: Most patches kept per slide, sampled with ``seed``; 0 keeps all.
    max_patches: int = Field(default=0, ge=0)
    #: Seed of the sampling.
    seed: int = 0
    #: Smallest tissue fraction of a kept patch (0-1).
    min_tissue_fraction: float = Field(default=0.5, ge=0.0, le=1.0)
    #: (ours) Overlap of neighbouring 20x patches, px; 0 is the method's grid. Small
    #: slides give the models more patches with it. The models' ``model.json``
    #: record it, and the PredictionService tiles new slides with the detector's.
    overlap_px: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _overlap_below_patch(self) -> TilingConfig:
        if self.overlap_px >= self.patch_px:
            raise ValueError(
                f"overlap_px must be below patch_px ({self.patch_px}), got {self.overlap_px}"
            )
        return self


class ModelTraining(Record):
    """How each patch classifier is trained (``services.inference.training``)."""

    backbone: str = "inception_v3"
    input_px: int = Field(default=512, ge=16)
    epochs: int = Field(default=10, ge=1)
    batch_size: int = Field(default=32, ge=1)
    lr: float = Field(default=3e-4, gt=0)
    seed: int = 0
    val_fraction: float = Field(default=0.2, gt=0, lt=1)
    max_patches_per_epoch: int | None = Field(default=None, ge=1)
    max_val_patches: int | None = Field(default=None, ge=1)
    #: Local file of ImageNet weights for the backbone; random init without it.
    weights_path: str | None = None
    mixed_precision: str = "auto"
    #: Test-time views of the served model (``services.inference.tta``); all eight by
    #: default, fewer make evaluation and serving cheaper.
    tta: tuple[str, ...] = TRANSFORM_NAMES
    #: CPU threads of training (0: the machine's cores). The weights depend on it:
    #: pin it to get the same models on a machine with another core count.
    threads: int = Field(default=0, ge=0)


class Selection(Record):
    """How discriminative patches are chosen (CD by the detector, BD by a biomarker
    model)."""

    #: Calibrated confidence above which a patch is discriminative (the method's 0.9).
    threshold: float = Field(default=0.9, ge=0.0, le=1.0)
    #: (ours) A slide with fewer CD patches keeps its most confident ones, up to this
    #: many, flagged as a fallback; 0 is the method (no fallback).
    min_patches_per_slide: int = Field(default=0, ge=0)
    #: (ours) Most CD patches per slide, the most confident first; 0 keeps all.
    max_patches_per_slide: int = Field(default=0, ge=0)
    #: Patches per TorchServe request.
    batch_size: int = Field(default=16, ge=1, le=1024)


class Analysis(Record):
    """The feature analysis: random-forest ablation and statistics, run by the
    AnalysisService; the bounds are the service's, so a run asking for more is refused
    before it trains, not after."""

    folds: int = Field(default=5, ge=MIN_FOLDS, le=MAX_FOLDS)
    n_estimators: int = Field(default=200, ge=1, le=MAX_TREES)
    bootstrap: int = Field(default=1000, ge=0, le=MAX_BOOTSTRAP)
    seed: int = Field(default=0, ge=0, le=MAX_SEED)


class OodConfig(Record):
    """(ours) How the out-of-distribution reference is fitted
    (``flows.training.ood_reference``): on the training cohort's slides, its threshold
    on held-out ones of them; stored as ``ood.json`` beside the cancer detector, so
    that the PredictionService refuses slides unlike any the models learned from."""

    #: Fit and store one; False leaves the models without (every slide answered).
    enabled: bool = True
    #: Raw usable patches described per slide, evenly spread over its grid (the
    #: PredictionService samples a new slide alike).
    max_patches_per_slide: int = Field(default=32, ge=1, le=1024)
    #: Most slides read in all (fit and calibration), whole patients drawn with
    #: ``seed``: the cost (each slide is fetched and read) and the size of
    #: ``ood.json`` (it holds the fit slides' descriptors) grow with it.
    max_slides: int = Field(default=96, ge=15, le=10_000)
    #: Share of those slides, by patient, that set the threshold instead of fitting.
    calibration_fraction: float = Field(default=1 / 3, gt=0.0, lt=1.0)
    #: Share of the calibration slides meant below the threshold before its margin
    #: (``OodDetector.fit``).
    answer_rate: float = Field(default=0.975, gt=0.5, lt=1.0)
    #: Seed of the draw of patients.
    seed: int = 0


class PipelineConfig(Record):
    """Everything that decides a training run's results (and so its run id)."""

    #: Seed of the paper's split (which cancer slides train the detector).
    split_seed: int = 0
    tiling: TilingConfig = TilingConfig()
    detector: ModelTraining = ModelTraining()
    biomarker: ModelTraining = ModelTraining()
    selection: Selection = Selection()
    analysis: Analysis = Analysis()
    ood: OodConfig = OodConfig()
    #: The biomarkers to train, in the method's order.
    biomarkers: tuple[str, ...] = BIOMARKERS
    #: Slides tiled (or scored) at once.
    max_concurrent_slides: int = Field(default=2, ge=1, le=64)
    #: (ours) Epochs of some biomarkers' models instead of ``biomarker.epochs``, e.g.
    #: ``{"pik3ca": 24}``: a label whose cue is faint may train longer than one whose
    #: cue is plain. The other settings stay ``biomarker``'s.
    biomarker_epochs: dict[str, int] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _known_epoch_overrides(self) -> PipelineConfig:
        unknown = sorted(set(self.biomarker_epochs) - set(BIOMARKERS))
        if unknown:
            raise ValueError(
                f"biomarker_epochs names unknown biomarkers {unknown}; use {', '.join(BIOMARKERS)}"
            )
        low = {name: n for name, n in self.biomarker_epochs.items() if n < 1}
        if low:
            raise ValueError(f"biomarker_epochs must be >= 1, got {low}")
        return self


def training_of(
    biomarker: str, training: ModelTraining, biomarker_epochs: Mapping[str, int]
) -> ModelTraining:
    """How ``biomarker``'s model trains: ``training``, with its own epochs if set."""
    epochs = biomarker_epochs.get(biomarker)
    if epochs is None or epochs == training.epochs:
        return training
    return training.model_copy(update={"epochs": epochs})
