"""A fitted multi-task MIL model: head, per-task temperatures and its model card.

:class:`FittedMIL` scores one bag at a time: ``predict(bag)`` gives each task's
calibrated probability sigmoid(logit_t / T_t), ``predict_bag(bag)`` adds the
per-task attention maps for heatmaps. It is saved as one file
(``torch.save`` of plain types and tensors, so :meth:`FittedMIL.load` reads it with
``weights_only=True``) holding:

``format``
    :data:`MODEL_FORMAT`.
``head``
    {"name", "in_dim", "n_tasks", "options"}: how to rebuild the head.
``state_dict``
    The head's weights.
``tasks``, ``temperatures``
    Task names and their temperatures, in the logits' order.
``encoder``
    {"name", "sha256"} of the encoder whose embeddings the head reads; a bag made by
    another encoder is refused.
``training_data``
    :class:`TrainingData` as a dict: cohort, synthetic or real, sites, slide and
    patient counts, plus the bags used to train and validate.
``training``
    The training settings, per-epoch history and the epoch kept.
``calibration``
    :class:`~services.mil.calibration.TaskCalibration` per task, as dicts.
``grid_overlap``
    The share of a patch side neighbouring patches of the training bags overlapped
    (prediction tiles a new slide the same way).
``validation``
    {"logits", "labels"}: validation logits and labels (NaN = unknown) as tensors,
    so reliability diagrams can be drawn again from the file.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from services.common.errors import InvalidInput, NotFound
from services.mil.bags import Bag
from services.mil.calibration import TaskCalibration, reliability_diagrams, sigmoid
from services.mil.heads import build_head

#: Value of the saved file's ``format`` key.
MODEL_FORMAT = "histomarker.mil/1"

#: What a head scores: a bag, or its (N, D) features as an array or tensor.
BagInput = Bag | np.ndarray | torch.Tensor


@dataclass(frozen=True)
class TrainingData:
    """What a model was trained on, for its model card.

    Attributes:
        cohort: The cohort's name (e.g. ``TCGA-BRCA`` or a synthetic cohort's folder).
        synthetic: True for the synthetic generator's slides, False for real H&E,
            None when not stated.
        sites: Tissue source sites of the training and validation slides.
        n_slides: Slides behind the training and validation bags (None: unknown).
        n_patients: Patients behind them (None: unknown).
    """

    cohort: str = "unspecified"
    synthetic: bool | None = None
    sites: tuple[str, ...] = ()
    n_slides: int | None = None
    n_patients: int | None = None

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["sites"] = list(self.sites)
        return out


@dataclass(frozen=True)
class MilPrediction:
    """One bag's calls.

    Attributes:
        probabilities: Task -> calibrated probability of the positive class.
        logits: Task -> the raw logit.
        attention: Task -> (N,) float32 attention over the bag's patches (sums to 1).
    """

    probabilities: dict[str, float]
    logits: dict[str, float]
    attention: dict[str, np.ndarray]


def check_bag_fits(
    bag: Bag, encoder: str | None, encoder_sha256: str | None, in_dim: int, reader: str
) -> None:
    """InvalidInput unless ``bag`` holds embeddings of ``encoder`` (None: any), made
    with the weights ``encoder_sha256`` (None or "": not recorded) and ``in_dim`` wide
    (an empty bag has no width to check); ``reader`` names the head in the message."""
    if encoder is not None and bag.encoder != encoder:
        raise InvalidInput(
            f"bag {bag.slide_id} holds {bag.encoder} embeddings; {reader} reads {encoder}"
        )
    if encoder_sha256 and bag.encoder_sha256 != encoder_sha256:
        raise InvalidInput(
            f"bag {bag.slide_id} was embedded with other {bag.encoder} weights "
            f"(sha256 {bag.encoder_sha256[:12] or 'none'}; {reader} was trained on "
            f"{encoder_sha256[:12]})"
        )
    if bag.n_patches and bag.feature_dim != in_dim:
        raise InvalidInput(
            f"bag {bag.slide_id} has width {bag.feature_dim}; {reader} reads {in_dim}"
        )


@dataclass
class FittedMIL:
    """A trained head with its temperatures and model-card facts.

    Build one with :func:`services.mil.train.train_mil` or :meth:`load`.
    """

    head: nn.Module
    head_name: str
    head_options: dict[str, Any]
    in_dim: int
    tasks: tuple[str, ...]
    temperatures: tuple[float, ...]
    encoder: str | None = None
    encoder_sha256: str | None = None
    training_data: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    calibration: list[TaskCalibration] = field(default_factory=list)
    validation_logits: np.ndarray | None = None
    validation_labels: np.ndarray | None = None
    grid_overlap: float = 0.0

    def __post_init__(self) -> None:
        if len(self.temperatures) != len(self.tasks):
            raise InvalidInput(f"{len(self.temperatures)} temperatures for {len(self.tasks)} tasks")
        self.head.eval()

    # --- scoring ------------------------------------------------------------------------

    def check_bag(self, bag: Bag) -> None:
        """InvalidInput unless ``bag`` holds embeddings of this model's encoder, its
        weights (when recorded) and its width."""
        check_bag_fits(bag, self.encoder, self.encoder_sha256, self.in_dim, "this model")

    def _features(self, bag: BagInput) -> torch.Tensor:
        if isinstance(bag, Bag):
            self.check_bag(bag)
            features: Any = bag.features
        else:
            features = bag
        x = torch.as_tensor(features, dtype=torch.float32)
        device = next(self.head.parameters()).device
        return x.to(device)

    def _forward(self, bag: BagInput) -> tuple[np.ndarray, np.ndarray]:
        x = self._features(bag)
        self.head.eval()
        with torch.inference_mode():
            out = self.head(x)
        return (
            out.logits.double().cpu().numpy(),
            out.attention.float().cpu().numpy(),
        )

    def logits(self, bag: BagInput) -> np.ndarray:
        """(T,) uncalibrated logits of one bag."""
        return self._forward(bag)[0]

    def calibrate(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated probabilities sigmoid(z_t / T_t) of (T,) or (n, T) logits."""
        return sigmoid(np.asarray(logits, np.float64) / np.asarray(self.temperatures))

    def predict(self, bag: BagInput) -> dict[str, float]:
        """Task -> calibrated probability of the positive class for one bag.

        Raises:
            InvalidInput: An empty bag, a wrong width, or a bag of another encoder.
        """
        return self.predict_bag(bag).probabilities

    def predict_bag(self, bag: BagInput) -> MilPrediction:
        """Calibrated probabilities, logits and per-task attention of one bag."""
        z, attention = self._forward(bag)
        p = self.calibrate(z)
        return MilPrediction(
            probabilities={task: float(p[t]) for t, task in enumerate(self.tasks)},
            logits={task: float(z[t]) for t, task in enumerate(self.tasks)},
            attention={task: attention[t] for t, task in enumerate(self.tasks)},
        )

    def predict_many(self, bags: Sequence[BagInput]) -> np.ndarray:
        """(n, T) calibrated probabilities of several bags."""
        if not bags:
            return np.zeros((0, len(self.tasks)))
        return np.stack([self.calibrate(self.logits(bag)) for bag in bags])

    def reliability_diagrams(self, folder: str | Path) -> dict[str, Path]:
        """Reliability PNGs (before / after T) per task from the validation logits kept
        at training time; task -> file."""
        if self.validation_logits is None or self.validation_labels is None:
            raise InvalidInput("this model keeps no validation logits to draw from")
        return reliability_diagrams(
            self.calibration, self.validation_logits, self.validation_labels, folder
        )

    # --- the file -----------------------------------------------------------------------

    def model_card(self) -> dict[str, Any]:
        """The facts a model card states: head, tasks, temperatures, encoder, data,
        validation calibration, training settings."""
        return {
            "format": MODEL_FORMAT,
            "head": {
                "name": self.head_name,
                "in_dim": self.in_dim,
                "n_tasks": len(self.tasks),
                "options": dict(self.head_options),
            },
            "tasks": list(self.tasks),
            "temperatures": [float(t) for t in self.temperatures],
            "encoder": {"name": self.encoder, "sha256": self.encoder_sha256},
            "training_data": dict(self.training_data),
            "training": dict(self.training),
            "calibration": [c.as_dict() for c in self.calibration],
            "grid_overlap": float(self.grid_overlap),
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the model to one file, atomically (temporary file, then rename)."""
        target = Path(path)
        state = self.model_card()
        state["state_dict"] = {k: v.detach().cpu() for k, v in self.head.state_dict().items()}
        state["validation"] = {
            "logits": _tensor_or_none(self.validation_logits),
            "labels": _tensor_or_none(self.validation_labels),
        }
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            torch.save(state, tmp)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        return target

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: str = "cpu") -> FittedMIL:
        """Read a file written by :meth:`save` (``weights_only=True``).

        Raises:
            NotFound: No such file.
            InvalidInput: Not a MIL model file of this format.
        """
        source = Path(path)
        if not source.is_file():
            raise NotFound(f"MIL model {source} does not exist")
        try:
            state = torch.load(source, map_location=device, weights_only=True)
        except Exception as exc:  # torch raises several types for a foreign file
            raise InvalidInput(f"{source}: not a readable MIL model ({exc})") from None
        if not isinstance(state, dict) or state.get("format") != MODEL_FORMAT:
            found = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise InvalidInput(f"{source}: format {found!r}, expected {MODEL_FORMAT!r}")
        spec = state["head"]
        head = build_head(spec["name"], spec["in_dim"], spec["n_tasks"], **spec["options"])
        head.load_state_dict(state["state_dict"])
        head.to(device)
        validation = state.get("validation") or {}
        return cls(
            head=head,
            head_name=spec["name"],
            head_options=dict(spec["options"]),
            in_dim=int(spec["in_dim"]),
            tasks=tuple(state["tasks"]),
            temperatures=tuple(float(t) for t in state["temperatures"]),
            encoder=state["encoder"]["name"],
            encoder_sha256=state["encoder"]["sha256"],
            training_data=dict(state["training_data"]),
            training=dict(state["training"]),
            calibration=[TaskCalibration(**c) for c in state["calibration"]],
            validation_logits=_array_or_none(validation.get("logits")),
            validation_labels=_array_or_none(validation.get("labels")),
            grid_overlap=float(state.get("grid_overlap", 0.0)),
        )


def _tensor_or_none(array: np.ndarray | None) -> torch.Tensor | None:
    return None if array is None else torch.as_tensor(np.asarray(array, np.float64))


def _array_or_none(tensor: torch.Tensor | None) -> np.ndarray | None:
    return None if tensor is None else tensor.cpu().numpy()
