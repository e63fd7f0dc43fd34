"""TorchServe handler of a patch encoder packed by ``services.mil.archive``
(``encoder_<name>``): uint8 patches in, float32 embeddings out.

Inside a ``.mar`` this file is the archive's ``handler.py`` and imports the packed
copy of ``services/`` next to it (TorchServe puts the model folder first on the
worker's ``PYTHONPATH``). The archive's ``encoder.json`` names the encoder, its
weights file and that file's SHA-256; the worker loads them with
:func:`services.encoders.load_encoder`, on the GPU TorchServe assigns when CUDA is
available. Each request is embedded on its own, :data:`EMBED_BATCH_SIZE` patches per
forward pass; the wire format is :mod:`services.mil.serving_io`'s. A request that
cannot be decoded gets status 400 and ``{"error": ..., "code": "INVALID_ARGUMENT"}``;
the others in its batch are answered normally.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from ts.torch_handler.base_handler import BaseHandler

from services.common.errors import FailedPrecondition
from services.encoders.loading import LoadedEncoder, load_encoder
from services.inference.serving_io import worker_device
from services.mil.serving_io import (
    BAD_REQUEST,
    EMBED_BATCH_SIZE,
    EncoderArchive,
    Outcome,
    answer_requests,
    decode_patches,
    decode_requests,
    encode_embeddings,
    encoded_responses,
    rejections,
)

# TorchServe takes the only class defined in this module as the entry point: keep
# every other class out of it.


class EncoderHandler(BaseHandler):
    """Serves one encoder: patches in, embeddings out."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder: LoadedEncoder | None = None

    def initialize(self, context: Any) -> None:
        """Load the encoder of the model folder (:func:`load_archived_encoder`)."""
        properties = context.system_properties
        self.device = worker_device(properties)
        self.manifest = context.manifest
        self.encoder = load_archived_encoder(Path(properties["model_dir"]), self.device)
        self.initialized = True

    def preprocess(self, data: list[dict[str, Any]]) -> list[Outcome]:
        """Decode each request's ``.npy`` of uint8 patches; bad ones keep their error."""
        return decode_requests(data, decode_patches)

    def inference(self, data: list[Outcome], *args: Any, **kwargs: Any) -> list[Outcome]:
        """The embeddings of each accepted request, request by request."""
        return answer_requests(data, self._embed)

    def postprocess(self, data: list[Outcome]) -> list[Any]:
        """One ``.npy`` per request; rejected requests get status 400."""
        if self.context is not None:
            for index, message in rejections(data):
                self.context.set_response_status(BAD_REQUEST, message, idx=index)
        return encoded_responses(data, encode_embeddings)

    def _embed(self, patches: np.ndarray) -> np.ndarray:
        if self.encoder is None:
            raise RuntimeError("the handler was not initialized")
        return self.encoder.embed(patches, batch_size=EMBED_BATCH_SIZE)


def load_archived_encoder(folder: Path, device: torch.device | str = "cpu") -> LoadedEncoder:
    """The encoder of an unpacked encoder archive: the weights ``encoder.json`` names,
    loaded with :func:`services.encoders.load_encoder`.

    Raises:
        NotFound: No ``encoder.json``.
        InvalidInput: A malformed ``encoder.json``, or weights that do not fit.
        FailedPrecondition: The weights' SHA-256 or the loaded encoder's spec is not
            the one the archive was built with.
    """
    archive = EncoderArchive.read(folder)
    encoder = load_encoder(
        archive.encoder, folder / archive.weights_file, device=device, tiny=archive.tiny
    )
    if encoder.sha256 != archive.sha256:
        raise FailedPrecondition(
            f"{archive.weights_file} has sha256 {encoder.sha256[:12]}; the archive was "
            f"built from {archive.sha256[:12]}"
        )
    if encoder.spec != archive.spec:
        raise FailedPrecondition(
            f"the loaded {archive.encoder} encoder is {encoder.spec}; the archive was built "
            f"for {archive.spec}"
        )
    return encoder
