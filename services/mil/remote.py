"""The MIL pipeline's models as TorchServe serves them: :class:`TorchServeEmbedder`
(``encoder_<name>``) and :class:`TorchServeBagPredictor` (``mil_<name>``), the
:class:`~services.mil.scoring.Embedder` and :class:`~services.mil.scoring.BagPredictor`
of the PredictionService.

Both talk to TorchServe's gRPC inference API in the wire format of
:mod:`services.mil.serving_io` and take what they state about themselves (encoder,
weights digest, width, tasks, thresholds) from the model card that
:func:`services.mil.archive.publish_encoder` / ``publish_mil`` stored
(:func:`load_card`). Errors are the project's: a rejected request is InvalidInput,
TorchServe down or failing is Unavailable. Requests have no side effects, so one
TorchServe failed as down or busy (a worker that died mid-request included) is sent
again after each of ``retry_delays_s``, as ``TorchServeScorer`` does.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np

from services.common.errors import (
    FailedPrecondition,
    InvalidInput,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from services.common.objectstore import ObjectStore
from services.encoders.loading import require_rgb_patches
from services.inference.preprocess import shrink_to_input
from services.inference.registry import COMPLETE_MARKER, model_prefix
from services.inference.torchserve import TorchServeGrpcClient
from services.mil.archive import ENCODER_KIND, MIL_KIND
from services.mil.model import MilPrediction
from services.mil.scoring import card_thresholds
from services.mil.serving_io import (
    MAX_PATCHES_PER_REQUEST,
    MAX_REQUEST_BYTES,
    decode_bag,
    decode_embeddings,
    decode_mil_output,
    encode_bag,
    encode_patches,
)
from services.prediction.models import SCORE_RETRY_DELAYS_S

#: Patches per encoder request by default: 8 of the handler's forward passes
#: (``serving_io.EMBED_BATCH_SIZE``), so that served embeddings run the batches an
#: in-process ``LocalEmbedder`` runs; fewer when the patches are large
#: (:data:`~services.mil.serving_io.MAX_REQUEST_BYTES`).
ENCODER_REQUEST_PATCHES = 256
#: Room left in a request for the ``.npy`` header and the gRPC message, bytes.
_REQUEST_OVERHEAD_BYTES = 64 * 1024

log = logging.getLogger(__name__)

T = TypeVar("T")


def load_card(store: ObjectStore, model_name: str, version: str) -> dict[str, Any]:
    """The model card (``model.json``) stored for one served model version.

    Raises:
        NotFound: No card at ``models/{model_name}/{version}/model.json``.
        FailedPrecondition: The card is not a JSON object, or describes another
            model or version.
    """
    key = f"{model_prefix(model_name, version)}/{COMPLETE_MARKER}"
    try:
        data = store.get_bytes(key)
    except NotFound:
        raise NotFound(
            f"{model_name} version {version} has no model card at {key}: build its archive "
            "and publish it (services.mil.archive.publish_encoder / publish_mil)"
        ) from None
    try:
        card = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise FailedPrecondition(f"{key} is not JSON: {exc}") from None
    if not isinstance(card, dict):
        raise FailedPrecondition(f"{key} holds {type(card).__name__}, not a model card")
    stored = (card.get("model_name", model_name), card.get("version", version))
    if stored != (model_name, version):
        raise FailedPrecondition(f"{key} describes {stored[0]} version {stored[1]}")
    return card


class TorchServeEmbedder:
    """An :class:`~services.mil.scoring.Embedder` served as ``encoder_<name>``.

    Args:
        client: A client of TorchServe's gRPC inference API (with the inference key).
        model_name: TorchServe name (``encoder_uni``...).
        version: The version to call.
        card: Its stored model card (:func:`load_card`), kind ``encoder``.
        max_patches_per_request: Most patches one request carries.
        retry_delays_s: Seconds before each new attempt of a failed request.

    Raises:
        FailedPrecondition: ``card`` is not an encoder card.
    """

    def __init__(
        self,
        client: TorchServeGrpcClient,
        model_name: str,
        version: str,
        card: dict[str, Any],
        *,
        max_patches_per_request: int = ENCODER_REQUEST_PATCHES,
        retry_delays_s: Sequence[float] = SCORE_RETRY_DELAYS_S,
    ) -> None:
        if not 1 <= max_patches_per_request <= MAX_PATCHES_PER_REQUEST:
            raise InvalidInput(
                f"max_patches_per_request must be 1-{MAX_PATCHES_PER_REQUEST}, "
                f"got {max_patches_per_request}"
            )
        _check_kind(card, ENCODER_KIND, model_name, version)
        self.client = client
        self.model_name = model_name
        self.version = version
        self.card = dict(card)
        try:
            self.encoder = str(card["encoder"])
            self.sha256 = str(card["sha256"])
            self.embed_dim = int(card["embed_dim"])
            self.input_px = int(card["input_px"])
            self.mpp = float(card["mpp"])
        except (KeyError, TypeError, ValueError) as exc:
            raise FailedPrecondition(f"the card of {model_name} {version} lacks {exc}") from None
        # Cards written before encoders stated it: colours as scanned.
        stain_reference = card.get("stain_reference")
        if stain_reference is not None and not isinstance(stain_reference, str):
            raise FailedPrecondition(
                f"the card of {model_name} {version} has stain_reference {stain_reference!r}, "
                "not text or null"
            )
        self.stain_reference: str | None = stain_reference
        self.max_patches_per_request = max_patches_per_request
        self.retry_delays_s = tuple(retry_delays_s)

    def embed(self, patches: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) uint8 RGB -> (N, embed_dim) float32, in requests of at most
        ``max_patches_per_request`` patches (fewer when they are large).

        Raises:
            InvalidInput: Not uint8 RGB patches, or TorchServe rejected them.
            Unavailable: TorchServe is down or failed, after the retries.
        """
        require_rgb_patches(patches)
        if len(patches) == 0:
            return np.zeros((0, self.embed_dim), dtype=np.float32)
        # Shrunk here as the handler would: the same answer, less to send.
        patches = shrink_to_input(patches, self.input_px)
        step = self._patches_per_request(patches.shape[1:])
        parts = [self._embed_request(patches[i : i + step]) for i in range(0, len(patches), step)]
        return np.concatenate(parts)

    def _patches_per_request(self, patch_shape: tuple[int, ...]) -> int:
        patch_bytes = int(np.prod(patch_shape))
        fitting = (MAX_REQUEST_BYTES - _REQUEST_OVERHEAD_BYTES) // max(patch_bytes, 1)
        return max(1, min(self.max_patches_per_request, fitting))

    def _embed_request(self, patches: np.ndarray) -> np.ndarray:
        data = encode_patches(patches)
        answer = with_retries(
            lambda: self.client.predict_raw(self.model_name, data, self.version),
            f"embedding with {self.model_name}",
            self.retry_delays_s,
        )
        return decode_embeddings(answer, len(patches), self.embed_dim)


class TorchServeBagPredictor:
    """A :class:`~services.mil.scoring.BagPredictor` served as ``mil_<name>``.

    Args:
        client: A client of TorchServe's gRPC inference API (with the inference key).
        model_name: TorchServe name (``mil_brca_abmil``...).
        version: The version to call.
        card: Its stored model card (:func:`load_card`), kind ``mil``.
        retry_delays_s: Seconds before each new attempt of a failed request.

    Raises:
        FailedPrecondition: ``card`` is not a MIL card.
    """

    def __init__(
        self,
        client: TorchServeGrpcClient,
        model_name: str,
        version: str,
        card: dict[str, Any],
        *,
        retry_delays_s: Sequence[float] = SCORE_RETRY_DELAYS_S,
    ) -> None:
        _check_kind(card, MIL_KIND, model_name, version)
        self.client = client
        self.model_name = model_name
        self.version = version
        self.card = dict(card)
        try:
            encoder = card["encoder"] or {}
            self.encoder: str | None = encoder.get("name")
            self.encoder_sha256: str | None = encoder.get("sha256")
            self.in_dim = int(card["head"]["in_dim"])
            self.tasks = tuple(str(t) for t in card["tasks"])
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise FailedPrecondition(f"the card of {model_name} {version} lacks {exc}") from None
        self.thresholds = card_thresholds(self.card, self.tasks)
        self.retry_delays_s = tuple(retry_delays_s)

    def predict(self, features: np.ndarray) -> MilPrediction:
        """(N, in_dim) embeddings of one bag -> calibrated probabilities, logits and
        attention, in one request.

        Raises:
            InvalidInput: An empty bag, another width, a NaN or infinite value, more
                patches than ``serving_io.MAX_BAG_PATCHES`` or a request over
                ``serving_io.MAX_REQUEST_BYTES``; or TorchServe rejected it.
            FailedPrecondition: The served head calls other tasks than its card.
            Unavailable: TorchServe is down or failed, after the retries.
        """
        data = encode_bag(np.asarray(features, dtype=np.float32))
        bag = decode_bag(data, self.in_dim)  # the handler's checks, before sending
        if len(data) > MAX_REQUEST_BYTES - _REQUEST_OVERHEAD_BYTES:
            raise InvalidInput(
                f"a bag of {bag.shape[0]} x {bag.shape[1]} embeddings is "
                f"{len(data) / 2**20:.0f} MiB; one request carries at most "
                f"{(MAX_REQUEST_BYTES - _REQUEST_OVERHEAD_BYTES) / 2**20:.0f} MiB"
            )
        answer = with_retries(
            lambda: self.client.predict(self.model_name, data, self.version),
            f"scoring a bag with {self.model_name}",
            self.retry_delays_s,
        )
        return decode_mil_output(answer, self.tasks, len(bag))


def with_retries(call: Callable[[], T], what: str, delays_s: Sequence[float]) -> T:
    """``call()``, again after each of ``delays_s`` while TorchServe fails it as down
    or busy (Unavailable, ResourceExhausted); the last failure propagates."""
    for delay_s in delays_s:
        try:
            return call()
        except (Unavailable, ResourceExhausted) as exc:
            log.warning("%s failed, again in %.1f s: %s", what, delay_s, exc)
            time.sleep(delay_s)
    return call()


def _check_kind(card: dict[str, Any], kind: str, model_name: str, version: str) -> None:
    found = card.get("kind")
    if found != kind:
        raise FailedPrecondition(
            f"the card of {model_name} {version} is of kind {found!r}, not {kind!r}"
        )
