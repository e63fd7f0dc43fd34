"""TorchServe handler of a MIL head packed by ``services.mil.archive`` (``mil_<name>``):
one bag's embeddings in, calibrated calls and attention out.

Inside a ``.mar`` this file is the archive's ``handler.py`` and imports the packed
copy of ``services/`` next to it (TorchServe puts the model folder first on the
worker's ``PYTHONPATH``). The worker loads ``mil.pt`` with
:meth:`services.mil.model.FittedMIL.load`, on the GPU TorchServe assigns when CUDA is
available. Each request is one bag, scored on its own; the wire format is
:mod:`services.mil.serving_io`'s. A request that cannot be decoded gets status 400
and ``{"error": ..., "code": "INVALID_ARGUMENT"}``; the others in its batch are
answered normally.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
from ts.torch_handler.base_handler import BaseHandler

from services.inference.serving_io import worker_device
from services.mil.model import FittedMIL
from services.mil.serving_io import (
    BAD_REQUEST,
    MIL_MODEL_FILE,
    Outcome,
    answer_requests,
    decode_bag,
    decode_requests,
    encoded_responses,
    mil_output,
    rejections,
)

# TorchServe takes the only class defined in this module as the entry point: keep
# every other class out of it.


class MilHandler(BaseHandler):
    """Serves one fitted MIL head: a bag in, every task's call out."""

    def __init__(self) -> None:
        super().__init__()
        self.mil: FittedMIL | None = None

    def initialize(self, context: Any) -> None:
        """Load ``mil.pt`` from the model folder."""
        properties = context.system_properties
        self.device = worker_device(properties)
        self.manifest = context.manifest
        folder = Path(properties["model_dir"])
        self.mil = FittedMIL.load(folder / MIL_MODEL_FILE, device=str(self.device))
        self.initialized = True

    def preprocess(self, data: list[dict[str, Any]]) -> list[Outcome]:
        """Decode each request's ``.npy`` bag; bad ones keep their error."""
        return decode_requests(data, functools.partial(decode_bag, in_dim=self._mil.in_dim))

    def inference(self, data: list[Outcome], *args: Any, **kwargs: Any) -> list[Outcome]:
        """Each accepted bag's calls, bag by bag."""
        return answer_requests(data, self._predict)

    def postprocess(self, data: list[Outcome]) -> list[Any]:
        """One JSON answer per request; rejected requests get status 400."""
        if self.context is not None:
            for index, message in rejections(data):
                self.context.set_response_status(BAD_REQUEST, message, idx=index)
        return encoded_responses(data, lambda output: output)

    def _predict(self, bag: np.ndarray) -> dict[str, Any]:
        model = self._mil
        return mil_output(model.predict_bag(bag), model.tasks)

    @property
    def _mil(self) -> FittedMIL:
        if self.mil is None:
            raise RuntimeError("the handler was not initialized")
        return self.mil
