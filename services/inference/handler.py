"""TorchServe handler of a patch classifier packed by ``services.inference.archive``.

Inside a ``.mar`` this file is the archive's ``handler.py`` and imports the packed
copy of ``services/`` next to it (TorchServe puts the model folder first on the
worker's ``PYTHONPATH``), so the archive runs wherever torch, numpy and Pillow are
installed. The work happens in the pure functions of ``serving_io``; this class only
wires them to TorchServe's lifecycle. A request that cannot be decoded gets status
400 and ``{"error": ..., "code": "INVALID_ARGUMENT"}``; the others in its batch are
answered normally.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ts.torch_handler.base_handler import BaseHandler

from services.inference.bundle import ModelConfig, load_bundle
from services.inference.serving_io import (
    PreparedBatch,
    batch_responses,
    predict_by_request,
    prepare_batch,
    worker_device,
)

#: HTTP status of a request whose payload was rejected.
BAD_REQUEST = 400

# TorchServe takes the only class defined in this module as the entry point: keep
# every other class out of it.


class PatchClassifierHandler(BaseHandler):
    """Serves a model bundle: patches in, calibrated TTA probabilities out."""

    def __init__(self) -> None:
        super().__init__()
        self.config: ModelConfig | None = None

    def initialize(self, context: Any) -> None:
        """Load ``weights.pt`` and ``model.json`` from the model folder."""
        properties = context.system_properties
        self.device = worker_device(properties)
        self.manifest = context.manifest
        self.model, self.config = load_bundle(Path(properties["model_dir"]), self.device)
        self.initialized = True

    def preprocess(self, data: list[dict[str, Any]]) -> PreparedBatch:
        """Decode the batch's requests (PNG/JPEG, ``.npy`` or JSON) into one input."""
        return prepare_batch(data, self._config)

    def inference(self, data: PreparedBatch, *args: Any, **kwargs: Any) -> PreparedBatch:
        """Calibrated TTA probabilities of every accepted patch, one forward pass per
        request (its answer does not depend on the batch TorchServe made)."""
        if data.x is not None:
            data.probabilities, data.logits = predict_by_request(
                self.model, data.x.to(self.device), data.counts, self._config
            )
        return data

    def postprocess(self, data: PreparedBatch) -> list[Any]:
        """One response per request; rejected requests get status 400."""
        for index, error in enumerate(data.errors):
            if error is not None and self.context is not None:
                self.context.set_response_status(BAD_REQUEST, str(error), idx=index)
        return batch_responses(data, self._config)

    @property
    def _config(self) -> ModelConfig:
        if self.config is None:
            raise RuntimeError("the handler was not initialized")
        return self.config
