"""Which MIL heads and encoders the PredictionService can call, and how.

A MIL head is deployed as ``mil_<name>`` on TorchServe with its model card at
``models/mil_<name>/{version}/model.json`` in the store; the card names the encoder
whose embeddings it reads (registry name and weights sha256), and that encoder must
be deployed as ``encoder_<name>`` (a ``-`` in the registry name becomes ``_``) with
its own card. :class:`ServedMilModels` finds both through TorchServe's management
API (the default version of each) and the store, and checks they belong together;
:class:`LocalMilModels` holds in-process ones (offline runs and tests).

Errors name what is missing: no MIL head deployed, several without one named, a
head whose encoder is not deployed or serves other weights (FailedPrecondition).
"""

from __future__ import annotations

import threading
import time
from typing import Any, Protocol

from services.common.errors import FailedPrecondition
from services.common.objectstore import ObjectStore
from services.inference.served_models import served_on_torchserve
from services.inference.torchserve import RestClient, TorchServeGrpcClient
from services.mil.archive import ENCODER_PREFIX, MIL_PREFIX, encoder_model_name
from services.mil.scoring import BagPredictor, Embedder


class MilModels(Protocol):
    """Finds a MIL head, and the encoder it reads, by TorchServe name."""

    def head(self, mil_model: str = "") -> BagPredictor:
        """The head named (``mil_<name>``), or the only one deployed when empty."""
        ...

    def pair(self, mil_model: str = "") -> tuple[Embedder, BagPredictor]:
        """The head and the encoder whose embeddings it reads."""
        ...


def _choose(names: list[str], wanted: str) -> str:
    if wanted:
        if wanted not in names:
            listed = ", ".join(names) or "none"
            raise FailedPrecondition(f"MIL head {wanted} is not deployed (deployed: {listed})")
        return wanted
    if not names:
        raise FailedPrecondition(
            "no MIL head is deployed: train one (histomarker mil train) and deploy it as "
            "mil_<name> with its encoder as encoder_<name>"
        )
    if len(names) > 1:
        raise FailedPrecondition(
            f"several MIL heads are deployed ({', '.join(names)}): name one in options.mil_model"
        )
    return names[0]


class LocalMilModels:
    """In-process heads and encoders, by name (``mil_<name>`` and encoder registry
    name)."""

    def __init__(self, heads: dict[str, BagPredictor], encoders: dict[str, Embedder]) -> None:
        self.heads = dict(heads)
        self.encoders = dict(encoders)

    def head(self, mil_model: str = "") -> BagPredictor:
        return self.heads[_choose(sorted(self.heads), mil_model)]

    def pair(self, mil_model: str = "") -> tuple[Embedder, BagPredictor]:
        head = self.head(mil_model)
        embedder = self.encoders.get(head.encoder or "")
        if embedder is None:
            raise FailedPrecondition(
                f"{head.model_name} reads {head.encoder} embeddings and no such encoder is loaded"
            )
        return embedder, head


class ServedMilModels:
    """Heads and encoders served by TorchServe, with their cards from the store.

    Args:
        store: Where the cards are (``models/{name}/{version}/model.json``).
        management: TorchServe's management API (which models, default versions).
        inference: TorchServe's gRPC inference API (the calls).
        ttl_s: Seconds one discovery is reused.
    """

    def __init__(
        self,
        store: ObjectStore,
        management: RestClient,
        inference: TorchServeGrpcClient,
        ttl_s: float = 5.0,
    ) -> None:
        self.store = store
        self.management = management
        self.inference = inference
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._cached: tuple[float, dict[str, str]] | None = None

    def _defaults(self) -> dict[str, str]:
        """TorchServe name -> default version of every encoder and MIL head served."""
        with self._lock:
            now = time.monotonic()
            if self._cached is None or now - self._cached[0] >= self.ttl_s:
                served = served_on_torchserve(self.management)
                found = {
                    name: str(entry.get("default") or "")
                    for name, entry in served.items()
                    if name.startswith((MIL_PREFIX, ENCODER_PREFIX)) and entry.get("default")
                }
                self._cached = (now, found)
            return dict(self._cached[1])

    def _card(self, name: str, version: str) -> dict[str, Any]:
        from services.mil.remote import load_card

        return load_card(self.store, name, version)

    def head(self, mil_model: str = "") -> BagPredictor:
        from services.mil.remote import TorchServeBagPredictor

        served = self._defaults()
        name = _choose(sorted(n for n in served if n.startswith(MIL_PREFIX)), mil_model)
        version = served[name]
        return TorchServeBagPredictor(self.inference, name, version, self._card(name, version))

    def pair(self, mil_model: str = "") -> tuple[Embedder, BagPredictor]:
        from services.mil.remote import TorchServeEmbedder

        head = self.head(mil_model)
        if head.encoder is None:
            raise FailedPrecondition(f"the card of {head.model_name} names no encoder")
        name = encoder_model_name(head.encoder)
        version = self._defaults().get(name)
        if not version:
            raise FailedPrecondition(
                f"{head.model_name} reads {head.encoder} embeddings, but {name} is not deployed"
            )
        embedder = TorchServeEmbedder(self.inference, name, version, self._card(name, version))
        return embedder, head
