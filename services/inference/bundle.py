"""A trained model as files: what training writes, the archive packs and the handler
loads.

A bundle folder holds ``weights.pt`` (the ``state_dict``), ``model.json`` (backbone,
classes, preprocessing, temperature, TTA, thresholds) and optionally
``metrics.json`` (validation metrics at training time) and ``reliability.png``.
In the object store it lives under ``models/{model_name}/{version}/``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from services.common.errors import InvalidInput, NotFound
from services.inference.backbones import build_backbone
from services.inference.preprocess import PreprocessConfig
from services.inference.tta import TRANSFORM_NAMES

WEIGHTS_FILE = "weights.pt"
CONFIG_FILE = "model.json"
METRICS_FILE = "metrics.json"
#: Model names TorchServe and the object store accept: cancer_detector, biomarker_tp53...
_MODEL_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_VERSION = re.compile(r"^[0-9A-Za-z][0-9A-Za-z._-]{0,63}$")
#: Keys of a model card's ``training_data`` (the proto's TrainingData).
TRAINING_DATA_KEYS = ("cohort", "synthetic", "sites", "n_slides", "n_patients")


def training_data_of(value: Mapping[str, Any] | None) -> dict[str, Any]:
    """A model card's ``training_data``, checked and in canonical form.

    Args:
        value: ``cohort`` (name, text), ``synthetic`` (True for the synthetic
            generator's slides, False for real H&E, None when not known), ``sites``
            (tissue source site codes, text), ``n_slides`` and ``n_patients`` (counts
            behind the training and validation data, 0 when not known); any of them
            may be left out. None or {} when nothing is known.

    Returns:
        {} when ``value`` is empty; else every key of :data:`TRAINING_DATA_KEYS`,
        the sites sorted and without repeats.

    Raises:
        InvalidInput: Not a mapping, an unknown key, or a value of the wrong type.
    """
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidInput(f"training_data must be an object, got {type(value).__name__}")
    if not value:
        return {}
    unknown = sorted(str(k) for k in value if k not in TRAINING_DATA_KEYS)
    if unknown:
        raise InvalidInput(
            f"training_data has unknown keys {unknown}; use {', '.join(TRAINING_DATA_KEYS)}"
        )
    cohort = value.get("cohort", "")
    if not isinstance(cohort, str):
        raise InvalidInput(f"training_data.cohort must be text, got {cohort!r}")
    synthetic = value.get("synthetic")
    if synthetic is not None and not isinstance(synthetic, bool):
        raise InvalidInput(
            f"training_data.synthetic must be true, false or null, got {synthetic!r}"
        )
    sites = value.get("sites", [])
    if isinstance(sites, str) or not isinstance(sites, list | tuple):
        raise InvalidInput(f"training_data.sites must be a list of site codes, got {sites!r}")
    if not all(isinstance(site, str) and site for site in sites):
        raise InvalidInput(f"training_data.sites must be non-empty text, got {list(sites)!r}")
    counts = {}
    for key in ("n_slides", "n_patients"):
        count = value.get(key, 0)
        if isinstance(count, float) and math.isfinite(count) and count.is_integer():
            count = int(count)
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise InvalidInput(f"training_data.{key} must be a count >= 0, got {count!r}")
        counts[key] = count
    return {"cohort": cohort, "synthetic": synthetic, "sites": sorted(set(sites)), **counts}


@dataclass(frozen=True)
class ModelConfig:
    """Everything besides the weights that serving a model needs.

    Attributes:
        name: Model name (``cancer_detector``, ``biomarker_tp53``, ...).
        version: Version string, e.g. ``1`` or a date.
        backbone: Backbone name for ``build_backbone``.
        class_names: One name per output, index order (e.g. ``["normal", "cancer"]``);
            the last is the positive class of a binary task.
        preprocess: How patches become input tensors.
        temperature: Calibration temperature T (1.0 = uncalibrated).
        tta: Names of the test-time transforms (see ``tta.TRANSFORM_NAMES``); empty
            means none (the identity only).
        discriminative_threshold: Calibrated confidence above which a patch counts
            as discriminative (the method's 0.9).
        decision_threshold: Positive-class probability at or above which the call is
            positive (chosen at training time; 0.5 by default).
        stain_reference: The stain reference the training patches were normalized
            to, so that prediction normalizes new slides the same way: a store key
            of a ``stain.json``, empty for the built-in reference (TilingService's
            default), or ``none`` when they were not normalized.
        grid_overlap_px: Overlap of neighbouring patches of the 20x grid the training
            slides were tiled on, px at the grid's magnification (0 = the plain,
            non-overlapping grid), so that prediction tiles new slides the same way.
            A ``model.json`` written before this field loads as 0.
        training_data: What the model was trained on (:func:`training_data_of`:
            cohort, synthetic, sites, n_slides, n_patients); {} when unknown, as a
            ``model.json`` written before this field loads.
    """

    name: str
    version: str
    backbone: str
    class_names: tuple[str, ...] = ("negative", "positive")
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    temperature: float = 1.0
    tta: tuple[str, ...] = TRANSFORM_NAMES
    discriminative_threshold: float = 0.9
    decision_threshold: float = 0.5
    stain_reference: str = ""
    grid_overlap_px: int = 0
    # Not hashed: a dict cannot be, and the other fields name the model already.
    training_data: dict[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if not _MODEL_NAME.match(self.name):
            raise InvalidInput(f"model name {self.name!r}: use lowercase letters, digits and _")
        if not _VERSION.match(self.version):
            raise InvalidInput(f"model version {self.version!r}: use letters, digits, . _ -")
        if len(self.class_names) < 2:
            raise InvalidInput("a model needs at least two class names")
        if not 0.01 <= self.temperature <= 100:
            raise InvalidInput(f"temperature must be within 0.01-100, got {self.temperature}")
        unknown = [n for n in self.tta if n not in TRANSFORM_NAMES]
        if unknown:
            raise InvalidInput(f"unknown TTA transform {unknown[0]!r}")
        for what in ("discriminative_threshold", "decision_threshold"):
            if not 0.0 <= getattr(self, what) <= 1.0:
                raise InvalidInput(f"{what} must be within 0-1")
        overlap = self.grid_overlap_px
        if isinstance(overlap, bool) or not isinstance(overlap, int) or overlap < 0:
            raise InvalidInput(
                f"grid_overlap_px must be a whole number of px >= 0, got {overlap!r}"
            )
        # A copy in canonical form: the frozen config does not share the caller's dict.
        object.__setattr__(self, "training_data", training_data_of(self.training_data))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def with_temperature(self, temperature: float) -> ModelConfig:
        return replace(self, temperature=float(temperature))

    def with_training_data(self, training_data: Mapping[str, Any] | None) -> ModelConfig:
        """The same config stating what the model was trained on."""
        return replace(self, training_data=training_data_of(training_data))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        try:
            data = json.loads(text)
            data["class_names"] = tuple(data["class_names"])
            data["tta"] = tuple(data.get("tta", ()))
            data["preprocess"] = PreprocessConfig.from_json(json.dumps(data["preprocess"]))
            return cls(**data)
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInput(f"model config is malformed: {exc}") from exc


def save_bundle(
    folder: Path, model: nn.Module, config: ModelConfig, metrics: dict | None = None
) -> Path:
    """Write a bundle folder (weights, config, metrics); returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save(state, folder / WEIGHTS_FILE)
    if metrics is not None:
        (folder / METRICS_FILE).write_text(json.dumps(metrics, indent=2, sort_keys=True))
    # The config last: a folder with model.json is complete.
    (folder / CONFIG_FILE).write_text(config.to_json())
    return folder


def write_config(folder: Path, config: ModelConfig) -> Path:
    """Write (or replace) a bundle folder's ``model.json``; returns its path."""
    path = folder / CONFIG_FILE
    partial = path.with_name(f".{CONFIG_FILE}.part")
    partial.write_text(config.to_json())
    partial.replace(path)  # atomic: a reader never sees half a config
    return path


def load_config(folder: Path) -> ModelConfig:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise NotFound(f"no {CONFIG_FILE} in {folder}: not a model bundle")
    return ModelConfig.from_json(path.read_text())


def load_bundle(folder: Path, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelConfig]:
    """The model (in eval mode, on ``device``) and its config from a bundle folder."""
    config = load_config(folder)
    model = build_backbone(config.backbone, config.num_classes, input_px=config.preprocess.input_px)
    state = torch.load(folder / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise InvalidInput(f"weights in {folder} do not fit {config.backbone}: {exc}") from exc
    return model.to(device).eval(), config
