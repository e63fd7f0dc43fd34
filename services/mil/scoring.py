"""What the MIL pipeline scores with: an :class:`Embedder` (patches -> embeddings) and
a :class:`BagPredictor` (a bag's embeddings -> calibrated calls and attention).

The PredictionService uses the TorchServe ones (``encoder_<name>`` and ``mil_<name>``,
:mod:`services.mil.remote`); offline runs and tests use :class:`LocalEmbedder` and
:class:`LocalBagPredictor`, which wrap a loaded encoder and a fitted head in this
process. Both kinds answer the same questions, so the pipeline does not know which
it has.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from services.encoders.loading import LoadedEncoder
from services.mil.model import FittedMIL, MilPrediction

#: Version reported for a model loaded in this process rather than served.
LOCAL_VERSION = "local"


class Embedder(Protocol):
    """Turns patches into embeddings with one frozen encoder.

    Attributes:
        encoder: Registry name of the encoder (``uni``, ``detector``...).
        model_name: Where it runs: TorchServe name (``encoder_<name>``) or
            ``local:<name>``.
        version: The served version (:data:`LOCAL_VERSION` in process).
        sha256: Digest of the weights file.
        embed_dim: Width of one embedding.
        input_px: Side of the square patches it takes, in px.
        mpp: Resolution of those patches, in µm per px.
        stain_reference: The stain normalization its patches need
            (``EncoderSpec.stain_reference``): None for colours as scanned, "" for
            the built-in reference, else a store key of a ``stain.json``.
    """

    encoder: str
    model_name: str
    version: str
    sha256: str
    embed_dim: int
    input_px: int
    mpp: float
    stain_reference: str | None

    def embed(self, patches: np.ndarray) -> np.ndarray:
        """(N, input_px, input_px, 3) uint8 RGB -> (N, embed_dim) float32."""
        ...


class BagPredictor(Protocol):
    """Calls every task of one bag with a fitted MIL head.

    Attributes:
        model_name: TorchServe name (``mil_<name>``) or ``local:<file stem>``.
        version: The served version (:data:`LOCAL_VERSION` in process).
        encoder: Registry name of the encoder whose bags it reads (None: any).
        encoder_sha256: Digest of that encoder's weights (None: not recorded).
        in_dim: Width of the embeddings it reads.
        tasks: Task names, in the order of its outputs.
        thresholds: Task -> decision threshold on the calibrated probability.
        card: The model card (``FittedMIL.model_card``), with ``training_data``.
    """

    model_name: str
    version: str
    encoder: str | None
    encoder_sha256: str | None
    in_dim: int
    tasks: tuple[str, ...]
    thresholds: dict[str, float]
    card: dict[str, Any]

    def predict(self, features: np.ndarray) -> MilPrediction:
        """(N, in_dim) float32 -> calibrated probabilities, logits and attention."""
        ...


def card_thresholds(card: dict[str, Any], tasks: tuple[str, ...]) -> dict[str, float]:
    """Task -> decision threshold from a model card (``thresholds``), 0.5 where the
    card gives none (the calibrated probabilities make 0.5 the natural cut)."""
    stored = card.get("thresholds") or {}
    return {t: float(stored.get(t, 0.5)) for t in tasks}


class LocalEmbedder:
    """An :class:`Embedder` running a loaded encoder in this process."""

    def __init__(self, loaded: LoadedEncoder, batch_size: int = 32) -> None:
        self.loaded = loaded
        self.batch_size = batch_size
        spec = loaded.spec
        self.encoder = spec.name
        self.model_name = f"local:{spec.name}"
        self.version = LOCAL_VERSION
        self.sha256 = loaded.sha256
        self.embed_dim = spec.embed_dim
        self.input_px = spec.input_px
        self.mpp = spec.mpp
        self.stain_reference = spec.stain_reference

    def embed(self, patches: np.ndarray) -> np.ndarray:
        return self.loaded.embed(patches, batch_size=self.batch_size)


class LocalBagPredictor:
    """A :class:`BagPredictor` running a fitted head in this process."""

    def __init__(self, model: FittedMIL, name: str = "mil") -> None:
        self.model = model
        self.model_name = f"local:{name}"
        self.version = LOCAL_VERSION
        self.encoder = model.encoder
        self.encoder_sha256 = model.encoder_sha256
        self.in_dim = model.in_dim
        self.tasks = model.tasks
        self.card = model.model_card()
        self.thresholds = card_thresholds(self.card, self.tasks)

    def predict(self, features: np.ndarray) -> MilPrediction:
        return self.model.predict_bag(np.asarray(features, np.float32))
