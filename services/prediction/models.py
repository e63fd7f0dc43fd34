"""The deployed models: which are served, their thresholds and validation metrics,
and how patches are scored by them.

How the PredictionService learns what is deployed (no list of its own to keep in
sync):

1. TorchServe's management API says which models are registered, the default
   version of each and whether it has READY workers (``GET /models``, then
   ``GET /models/{name}``). Only the names of the method count: ``cancer_detector``
   and ``biomarker_{tp53,pik3ca,er,pr,her2,basal}``.
2. The object store holds what training wrote for that version, under
   ``models/{name}/{version}/`` (DESIGN.md): ``model.json`` (temperature, decision
   and discriminative thresholds, preprocessing), ``metrics.json`` (validation
   metrics) and ``{name}.mar``. :func:`services.inference.registry.publish_bundle` puts a
   bundle there.

A model registered in TorchServe whose version has no ``model.json`` in the store
is not usable (its threshold is unknown), and neither is a required model that is
not registered: :meth:`ModelRegistry.deployment` raises FailedPrecondition naming
every missing one. TorchServe down is Unavailable.

The deployed cancer detector's version folder may hold ``ood.json``, the
out-of-distribution reference training fitted on the training slides
(:class:`~services.inference.ood.OodDetector`): a deployment carries it
(:attr:`Deployment.ood`, None when that version has none) and the pipeline refuses
slides far from the training slides with it. It is read once per stored version and
content (its etag), not at every prediction.

Scoring goes through the :class:`PatchScorer` interface: :class:`TorchServeScorer`
(TorchServe's gRPC inference API, one ``.npy`` batch per request; a request that
fails because TorchServe is down or busy — a worker that died mid-request answers
"Worker died." — is sent again a few times with back-off while TorchServe starts a
new worker) in the service,
:class:`LocalScorer` (the same ``serving_io`` functions on bundles loaded in this
process) in unit tests and offline runs.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from services.common.errors import (
    FailedPrecondition,
    InvalidInput,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from services.common.objectstore import ObjectStore
from services.common.vocabulary import (
    BIOMARKERS,
    CANCER_DETECTOR,
    biomarker_of_model,
    model_name_of,
)
from services.inference.bundle import CONFIG_FILE, METRICS_FILE, ModelConfig, load_bundle
from services.inference.ood import OodDetector
from services.inference.preprocess import shrink_to_input
from services.inference.registry import MODELS_PREFIX, OOD_FILE, archive_key, model_prefix, ood_key
from services.inference.serving_io import encode_npy, patch_outputs, predict, to_batch
from services.inference.torchserve import RestClient, TorchServeGrpcClient

#: One patch's output as the handler returns it (``serving_io.patch_outputs``).
PatchOutput = dict[str, Any]
#: Seconds before each new attempt of a scoring request TorchServe failed as down or
#: busy (15.5 s in all: long enough for TorchServe to replace a dead worker).
SCORE_RETRY_DELAYS_S = (0.5, 1.0, 2.0, 4.0, 8.0)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeployedModel:
    """One model as served, with what training stored about it.

    Attributes:
        name: TorchServe name (``cancer_detector``, ``biomarker_tp53``...).
        version: Version TorchServe serves by default (and the store's folder).
        biomarker: The biomarker predicted; None for the cancer detector.
        config: The stored ``model.json``.
        metrics: The stored ``metrics.json`` ({} when there is none).
        archive_key: Key of the ``.mar`` in the store, "" when not stored.
        trained_at: When ``model.json`` was written (training's end), None if unknown.
        serving: Whether TorchServe reports a READY worker.
    """

    name: str
    version: str
    biomarker: str | None
    config: ModelConfig
    metrics: Mapping[str, Any] = field(default_factory=dict)
    archive_key: str = ""
    trained_at: datetime | None = None
    serving: bool = True

    @property
    def training_data(self) -> dict[str, Any]:
        """What the model was trained on, as its model card says (``ModelConfig.
        training_data``: cohort, synthetic, sites, n_slides, n_patients); {} when it
        does not say."""
        return dict(self.config.training_data)

    @property
    def threshold(self) -> float:
        """The model's decision threshold on the calibrated probability (0-1): the
        cancer confidence for the detector, the slide-call threshold for a biomarker."""
        if self.biomarker is None:
            return self.config.discriminative_threshold
        return self.config.decision_threshold

    def validation(self) -> dict[str, Any]:
        """The stored validation metrics in the shape of ``ValidationMetrics``.

        A ``metrics.json`` with a ``validation_metrics`` object (written by the
        analysis of a training run) is taken as it is; the one training writes gives
        the patch AUROC (``val_auroc``) and the validation counts (one slide per
        patient).
        """
        stored = self.metrics.get("validation_metrics")
        if isinstance(stored, Mapping):
            return dict(stored)
        out: dict[str, Any] = {}
        value = self.metrics.get("val_auroc")
        if isinstance(value, int | float) and np.isfinite(value):
            out["patch_auroc"] = {"value": float(value)}
        counts = self.metrics.get("validation")
        if isinstance(counts, Mapping):
            out["patch_count"] = int(counts.get("patches", 0))
            out["slide_count"] = int(counts.get("patients", 0))
        return out


@dataclass(frozen=True)
class Deployment:
    """The models one prediction uses: the detector and the requested biomarkers'.

    Attributes:
        cancer: The cancer detector.
        biomarkers: Biomarker name -> its model.
        ood: The out-of-distribution reference stored beside the detector's version
            (``ood.json``); None when there is none (the slides are not checked).
    """

    cancer: DeployedModel
    biomarkers: Mapping[str, DeployedModel]
    ood: OodDetector | None = field(default=None, compare=False, repr=False)

    def versions(self) -> dict[str, str]:
        """Model name -> version, for hashes and records."""
        models = [self.cancer, *self.biomarkers.values()]
        return {m.name: m.version for m in models}


class PatchScorer(Protocol):
    """Scores uint8 RGB patches (N, H, W, 3) with a named model version.

    Returns one :data:`PatchOutput` per patch, in order. Implementations must be
    safe to call from several threads at once (the pipeline keeps requests in
    flight concurrently).
    """

    def score(self, model: DeployedModel, patches: np.ndarray) -> list[PatchOutput]: ...


class TorchServeScorer:
    """Scores through TorchServe's gRPC inference API, one request per batch.

    Scoring has no side effects, so a request TorchServe failed as down or busy
    (Unavailable, ResourceExhausted) is sent again after each of ``retry_delays_s``.

    Args:
        client: A client of the gRPC inference API (with the inference key).
        retry_delays_s: Seconds before each new attempt.
        shrink: Send patches larger than the model's input shrunk to it
            (``preprocess.shrink_to_input``, as the handler would); False sends them
            as read (for comparison).
    """

    def __init__(
        self,
        client: TorchServeGrpcClient,
        retry_delays_s: Sequence[float] = SCORE_RETRY_DELAYS_S,
        shrink: bool = True,
    ) -> None:
        self.client = client
        self.retry_delays_s = tuple(retry_delays_s)
        self.shrink = shrink

    def score(self, model: DeployedModel, patches: np.ndarray) -> list[PatchOutput]:
        if self.shrink:
            # Shrunk here as the handler would shrink them: the same answer, and 16x
            # less to send and decode for 512 px patches and a 128 px model.
            patches = shrink_to_input(patches, model.config.preprocess.input_px)
        data = encode_npy(patches)
        for delay_s in (*self.retry_delays_s, None):
            try:
                answer = self.client.predict(model.name, data, model.version)
            except (Unavailable, ResourceExhausted) as exc:
                if delay_s is None:
                    raise
                log.warning("scoring with %s failed, again in %.1f s: %s", model.name, delay_s, exc)
                time.sleep(delay_s)
                continue
            break
        if not isinstance(answer, list) or len(answer) != len(patches):
            raise Unavailable(
                f"TorchServe answered {model.name} with {type(answer).__name__} for "
                f"{len(patches)} patches"
            )
        return answer


class LocalScorer:
    """Scores with bundles loaded in this process, exactly as the handler does.

    Args:
        bundles: Model name -> bundle folder (``weights.pt`` and ``model.json``; the
            cancer detector's may hold ``ood.json``, its deployment's OOD reference).
    """

    #: The detector folder's OOD reference (a class default: none unless loaded).
    _ood: OodDetector | None = None

    def __init__(self, bundles: Mapping[str, Path]) -> None:
        self._models = {name: load_bundle(Path(folder)) for name, folder in bundles.items()}
        self._lock = threading.Lock()  # one forward pass at a time: torch threads itself
        detector = bundles.get(CANCER_DETECTOR)
        reference = Path(detector) / OOD_FILE if detector is not None else None
        self._ood = (
            OodDetector.from_json(reference.read_text())
            if reference is not None and reference.is_file()
            else None
        )

    def config(self, name: str) -> ModelConfig:
        """The loaded config of a model."""
        return self._models[name][1]

    def score(self, model: DeployedModel, patches: np.ndarray) -> list[PatchOutput]:
        try:
            network, config = self._models[model.name]
        except KeyError:
            raise FailedPrecondition(f"model {model.name} is not loaded") from None
        x = to_batch([patches], config)
        with self._lock, torch.inference_mode():
            probabilities, logits = predict(network, x, config)
        return patch_outputs(probabilities, logits, config)

    def deployed(self) -> tuple[dict[str, DeployedModel], list[str]]:
        """The loaded models by name (as :meth:`ModelRegistry.deployed`; none unusable)."""
        return {name: _local_model(name, cfg) for name, (_, cfg) in self._models.items()}, []

    def deployment(self, biomarkers: Sequence[str] = BIOMARKERS) -> Deployment:
        """The loaded models as a deployment (FailedPrecondition naming missing ones),
        with the detector folder's OOD reference when it has one."""
        return _deployment(self.deployed()[0], biomarkers, self._ood)


def _local_model(name: str, config: ModelConfig) -> DeployedModel:
    return DeployedModel(name, config.version, biomarker_of_model(name), config)


def _deployment(
    models: Mapping[str, DeployedModel],
    biomarkers: Sequence[str],
    ood: OodDetector | None = None,
) -> Deployment:
    wanted = [CANCER_DETECTOR, *(model_name_of(b) for b in biomarkers)]
    missing = [name for name in wanted if name not in models]
    if missing:
        raise FailedPrecondition(
            f"models not deployed: {', '.join(missing)}; train them, store them under "
            f"{MODELS_PREFIX}/{{name}}/{{version}}/ and register their .mar on TorchServe"
        )
    return Deployment(
        cancer=models[CANCER_DETECTOR],
        biomarkers={b: models[model_name_of(b)] for b in biomarkers},
        ood=ood,
    )


class ModelRegistry:
    """What TorchServe serves, joined with what the store holds (see the module doc).

    Args:
        store: The object store with ``models/{name}/{version}/``.
        management: A client of TorchServe's management API (with its key).
        ttl_s: Seconds a discovery is reused before asking TorchServe again.
    """

    def __init__(self, store: ObjectStore, management: RestClient, ttl_s: float = 5.0) -> None:
        self.store = store
        self.management = management
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._cached: tuple[float, dict[str, DeployedModel], list[str]] | None = None
        # ood.json key -> (its etag, the reference): parsed once per content.
        self._ood: dict[str, tuple[str, OodDetector]] = {}

    def deployed(self) -> tuple[dict[str, DeployedModel], list[str]]:
        """The usable models by name, and the problems of registered but unusable ones.

        Raises:
            Unavailable: TorchServe's management API cannot be reached.
        """
        with self._lock:
            now = time.monotonic()
            if self._cached is not None and now - self._cached[0] < self.ttl_s:
                return dict(self._cached[1]), list(self._cached[2])
        models, problems = self._discover()
        with self._lock:
            self._cached = (time.monotonic(), models, problems)
        return dict(models), list(problems)

    def invalidate(self) -> None:
        """Forget the cached discovery (after a deployment changed)."""
        with self._lock:
            self._cached = None

    def deployment(self, biomarkers: Sequence[str] = BIOMARKERS) -> Deployment:
        """The models a prediction of ``biomarkers`` needs.

        The deployment carries the detector version's OOD reference (``ood.json``)
        when the store holds one.

        Raises:
            FailedPrecondition: A required model is not registered on TorchServe or
                not stored, the message naming each; or the detector's ``ood.json``
                is not a valid reference.
            Unavailable: TorchServe cannot be reached, or a required model has no
                READY worker.
        """
        models, problems = self.deployed()
        try:
            deployment = _deployment(models, biomarkers)
        except FailedPrecondition as exc:
            detail = f" ({'; '.join(problems)})" if problems else ""
            raise FailedPrecondition(f"{exc}{detail}") from None
        idle = [
            m.name for m in (deployment.cancer, *deployment.biomarkers.values()) if not m.serving
        ]
        if idle:
            raise Unavailable(f"TorchServe has no READY worker for {', '.join(idle)}")
        ood = self.ood_reference(deployment.cancer)
        return deployment if ood is None else replace(deployment, ood=ood)

    def ood_reference(self, model: DeployedModel) -> OodDetector | None:
        """The OOD reference stored beside a model version (``ood.json``), or None.

        Raises:
            FailedPrecondition: The stored reference is not a valid one (refusing to
                predict beats answering every slide unchecked).
        """
        key = ood_key(model.name, model.version)
        try:
            etag = self.store.stat(key).etag
        except NotFound:
            return None
        with self._lock:
            cached = self._ood.get(key)
        if cached is not None and cached[0] == etag:
            return cached[1]
        try:
            reference = OodDetector.from_json(self.store.get_bytes(key).decode())
        except (InvalidInput, UnicodeDecodeError) as exc:
            raise FailedPrecondition(f"{key} is not a valid OOD reference: {exc}") from None
        with self._lock:
            self._ood[key] = (etag, reference)
        return reference

    def _discover(self) -> tuple[dict[str, DeployedModel], list[str]]:
        answer = self.management.json("GET", "/models?limit=1000")
        listed = answer.get("models", []) if isinstance(answer, dict) else []
        known = {CANCER_DETECTOR, *(model_name_of(b) for b in BIOMARKERS)}
        models: dict[str, DeployedModel] = {}
        problems: list[str] = []
        for entry in listed:
            name = str(entry.get("modelName", ""))
            if name not in known:
                continue
            described = self.management.json("GET", f"/models/{urllib.parse.quote(name)}")
            info = described[0] if isinstance(described, list) and described else {}
            version = str(info.get("modelVersion", ""))
            workers = info.get("workers") or []
            serving = any(w.get("status") == "READY" for w in workers)
            try:
                models[name] = self._stored(name, version, serving)
            except (NotFound, InvalidInput) as exc:
                problems.append(str(exc))
        return models, problems

    def _stored(self, name: str, version: str, serving: bool) -> DeployedModel:
        prefix = model_prefix(name, version)
        key = f"{prefix}/{CONFIG_FILE}"
        if not version or not self.store.exists(key):
            raise NotFound(
                f"{name} version {version or '?'} is registered on TorchServe but "
                f"{key} is not in the store"
            )
        config = ModelConfig.from_json(self.store.get_bytes(key).decode())
        if config.name != name or config.version != version:
            raise InvalidInput(f"{key} describes {config.name} {config.version}")
        metrics: dict[str, Any] = {}
        if self.store.exists(f"{prefix}/{METRICS_FILE}"):
            try:
                metrics = json.loads(self.store.get_bytes(f"{prefix}/{METRICS_FILE}"))
            except ValueError:
                metrics = {}
        archive = archive_key(name, version)
        biomarker = biomarker_of_model(name)
        return DeployedModel(
            name=name,
            version=version,
            biomarker=biomarker,
            config=config,
            metrics=metrics,
            archive_key=archive if self.store.exists(archive) else "",
            trained_at=self.store.stat(key).modified,
            serving=serving,
        )


def ordered(models: Iterable[DeployedModel]) -> list[DeployedModel]:
    """The cancer detector first, then the biomarker models in the method's order."""
    rank = {CANCER_DETECTOR: 0, **{model_name_of(b): i + 1 for i, b in enumerate(BIOMARKERS)}}
    return sorted(models, key=lambda m: rank.get(m.name, len(rank)))
