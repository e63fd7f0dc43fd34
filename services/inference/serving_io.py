"""What the TorchServe handler does, as pure functions testable without TorchServe.

A request carries one item: an encoded image (PNG or JPEG bytes) holding one patch,
a NumPy ``.npy`` file holding one uint8 patch (H, W, 3) or a batch (N, H, W, 3), or
JSON ``{"shape": [...], "data": <base64 of the raw uint8 bytes, C order>}``. The
response to a request is a list with one dict per patch it carried::

    {"probabilities": [...], "logits": [...], "label": "cancer", "label_index": 1,
     "confidence": 0.97, "discriminative": true}

Probabilities are calibrated (softmax of logits / T) and averaged over the model's
test-time transforms; logits are the mean over the views, uncalibrated.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from services.common.errors import HistomarkerError, InvalidInput
from services.inference.bundle import ModelConfig
from services.inference.preprocess import to_input
from services.inference.tta import DIHEDRAL, transforms_by_name, tta_probabilities

#: Keys of a TorchServe request row that may hold the payload, in order of preference.
PAYLOAD_KEYS = ("data", "body")
#: Largest patch side accepted, px (a 40x patch of the method is 1024 px).
MAX_PATCH_PX = 4096
#: Most patches one request may carry.
MAX_PATCHES_PER_REQUEST = 1024

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_NPY_MAGIC = b"\x93NUMPY"

#: One patch's output.
PatchOutput = dict[str, Any]


def worker_device(properties: Mapping[str, Any]) -> torch.device:
    """The device a TorchServe worker runs on: its GPU when TorchServe gave it one
    (``gpu_id`` in the context's system properties) and CUDA is there, else the CPU."""
    gpu_id = properties.get("gpu_id")
    if torch.cuda.is_available() and gpu_id is not None:
        return torch.device(f"cuda:{gpu_id}")
    return torch.device("cpu")


def request_payload(row: Mapping[str, Any]) -> Any:
    """The payload of one TorchServe request row (``data`` or ``body``).

    Raises:
        InvalidInput: The row has neither key, or it is empty.
    """
    for key in PAYLOAD_KEYS:
        value = row.get(key)
        if value is not None and (not isinstance(value, bytes | bytearray | str) or value):
            return value
    raise InvalidInput("the request holds no data: send a PNG/JPEG patch, .npy or JSON")


def decode_item(item: Any) -> np.ndarray:
    """One request's payload -> uint8 RGB patches (N, H, W, 3).

    Args:
        item: PNG/JPEG/``.npy`` bytes, a JSON text or bytes, or an already parsed
            JSON object ``{"shape": [...], "data": base64 str}``.

    Returns:
        A C-contiguous uint8 array of N >= 1 patches.

    Raises:
        InvalidInput: Undecodable data, another dtype, or a shape that is not
            (H, W, 3) or (N, H, W, 3) within the size limits.
    """
    if isinstance(item, bytearray | memoryview):
        item = bytes(item)
    if isinstance(item, bytes):
        if item.startswith(_PNG_MAGIC) or item.startswith(_JPEG_MAGIC):
            return _checked(_decode_image(item)[None])
        if item.startswith(_NPY_MAGIC):
            return _checked(_decode_npy(item))
        item = _parse_json(item)
    elif isinstance(item, str):
        item = _parse_json(item.encode("utf-8"))
    if isinstance(item, Mapping):
        return _checked(_decode_json_array(item))
    raise InvalidInput(
        "unsupported patch encoding: send PNG or JPEG bytes, a .npy file of uint8 "
        '(H, W, 3) or (N, H, W, 3), or JSON {"shape": [...], "data": base64}'
    )


def encode_npy(patches: np.ndarray) -> bytes:
    """uint8 patches as ``.npy`` bytes, the raw-array form ``decode_item`` reads."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(patches), allow_pickle=False)
    return buffer.getvalue()


def encode_json_array(patches: np.ndarray) -> str:
    """uint8 patches as the JSON form ``decode_item`` reads."""
    array = np.ascontiguousarray(patches, dtype=np.uint8)
    data = base64.b64encode(array.tobytes()).decode("ascii")
    return json.dumps({"shape": list(array.shape), "dtype": "uint8", "data": data})


def _decode_image(data: bytes) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            rgb = image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise InvalidInput(f"the patch is not a readable PNG or JPEG: {exc}") from exc
    return np.asarray(rgb, dtype=np.uint8)


def _decode_npy(data: bytes) -> np.ndarray:
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise InvalidInput(f"the .npy payload is unreadable: {exc}") from exc
    return _as_uint8(array)


def _parse_json(data: bytes) -> Any:
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise InvalidInput("unsupported patch encoding: not PNG, JPEG, .npy or JSON") from None


def _decode_json_array(item: Mapping[str, Any]) -> np.ndarray:
    dtype = item.get("dtype", "uint8")
    if dtype != "uint8":
        raise InvalidInput(f"patches must be uint8, got dtype {dtype!r}")
    shape = item.get("shape")
    if (
        not isinstance(shape, list)
        or not shape
        or not all(isinstance(v, int) and v > 0 for v in shape)
    ):
        raise InvalidInput("JSON patches need 'shape': a list of positive integers")
    data = item.get("data")
    if not isinstance(data, str):
        raise InvalidInput("JSON patches need 'data': the base64 of the raw uint8 bytes")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInput(f"'data' is not valid base64: {exc}") from exc
    expected = int(np.prod(shape))
    if len(raw) != expected:
        raise InvalidInput(f"'data' holds {len(raw)} bytes; shape {shape} needs {expected}")
    return np.frombuffer(raw, dtype=np.uint8).reshape(shape)


def _as_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype != np.uint8:
        raise InvalidInput(f"patches must be uint8, got {array.dtype}")
    return array


def _checked(array: np.ndarray) -> np.ndarray:
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[-1] != 3:
        raise InvalidInput(
            f"patches must be RGB (H, W, 3) or (N, H, W, 3); got shape {tuple(array.shape)}"
        )
    count, height, width = array.shape[:3]
    if count < 1 or count > MAX_PATCHES_PER_REQUEST:
        raise InvalidInput(f"a request holds 1-{MAX_PATCHES_PER_REQUEST} patches, got {count}")
    if not (1 <= height <= MAX_PATCH_PX and 1 <= width <= MAX_PATCH_PX):
        raise InvalidInput(f"patch sides must be 1-{MAX_PATCH_PX} px, got {width} x {height}")
    return np.ascontiguousarray(array)


def model_transforms(config: ModelConfig) -> tuple[tuple[int, bool], ...]:
    """The test-time transforms of a model: its named ones, the identity when none."""
    return transforms_by_name(config.tta) if config.tta else DIHEDRAL[:1]


def to_batch(patches: Sequence[np.ndarray], config: ModelConfig) -> torch.Tensor:
    """Decoded patch arrays (each (N, H, W, 3)) -> one normalized input batch.

    Arrays of one size are resized together; others one array at a time.
    """
    if not patches:
        raise InvalidInput("no patches to classify")
    if len({p.shape[1:] for p in patches}) == 1:
        return to_input(np.concatenate(patches), config.preprocess)
    return torch.cat([to_input(p, config.preprocess) for p in patches])


def predict(
    model: nn.Module, x: torch.Tensor, config: ModelConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Calibrated TTA probabilities and mean logits, each (N, classes), on the CPU."""
    probabilities, logits = tta_probabilities(
        model, x, config.temperature, model_transforms(config)
    )
    return probabilities.float().cpu(), logits.float().cpu()


def predict_by_request(
    model: nn.Module, x: torch.Tensor, counts: Sequence[int], config: ModelConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`predict` one request at a time (``counts``: patches per request, 0 for
    a rejected one), concatenated.

    A request's answer then depends on its own patches alone, never on which other
    requests TorchServe's dynamic batching put beside it: a forward pass over a
    bigger batch may run other kernels and round differently, and a patch near a
    threshold (the detector's 0.9, which decides the CD patches) must not flip with
    the server's load.
    """
    sizes = [int(c) for c in counts if c]
    if sum(sizes) != len(x):
        raise ValueError(f"{len(x)} patches for requests of {sum(sizes)}")
    parts = [predict(model, chunk, config) for chunk in torch.split(x, sizes)]
    return torch.cat([p for p, _ in parts]), torch.cat([z for _, z in parts])


def patch_outputs(
    probabilities: torch.Tensor | np.ndarray,
    logits: torch.Tensor | np.ndarray,
    config: ModelConfig,
) -> list[PatchOutput]:
    """One output dict per patch.

    The label of a binary model is positive when p(positive) >= the decision
    threshold; of a multi-class model, the most probable class. ``confidence`` is
    the calibrated probability of that label and ``discriminative`` says whether it
    exceeds ``config.discriminative_threshold``.
    """
    probs = np.asarray(probabilities, dtype=np.float64)
    raw = np.asarray(logits, dtype=np.float64)
    if probs.ndim != 2 or probs.shape != raw.shape or probs.shape[1] != config.num_classes:
        raise ValueError(
            f"expected (N, {config.num_classes}) probabilities and logits, "
            f"got {probs.shape} and {raw.shape}"
        )
    outputs = []
    for p, z in zip(probs, raw, strict=True):
        if config.num_classes == 2:
            index = 1 if p[1] >= config.decision_threshold else 0
        else:
            index = int(np.argmax(p))
        confidence = float(p[index])
        outputs.append(
            {
                "probabilities": [float(v) for v in p],
                "logits": [float(v) for v in z],
                "label": config.class_names[index],
                "label_index": index,
                "confidence": confidence,
                "discriminative": confidence > config.discriminative_threshold,
            }
        )
    return outputs


def split_by_request(
    outputs: Sequence[PatchOutput], counts: Sequence[int]
) -> list[list[PatchOutput]]:
    """Regroup the batch's patch outputs into one list per request."""
    if sum(counts) != len(outputs):
        raise ValueError(f"{len(outputs)} outputs for {sum(counts)} patches")
    grouped, start = [], 0
    for count in counts:
        grouped.append(list(outputs[start : start + count]))
        start += count
    return grouped


def error_output(error: Exception) -> dict[str, str]:
    """The response body of a request that failed: its message and gRPC-style code."""
    return {"error": str(error), "code": getattr(error, "status_name", "INTERNAL")}


@dataclass
class PreparedBatch:
    """A TorchServe batch after decoding.

    Attributes:
        counts: Patches per request, 0 for a rejected request.
        errors: The rejection of each request, None when it was accepted.
        x: The normalized input of every accepted patch, None when there is none.
        probabilities: Calibrated TTA probabilities (N, classes), after inference.
        logits: Mean logits (N, classes), after inference.
    """

    counts: list[int]
    errors: list[HistomarkerError | None]
    x: torch.Tensor | None = None
    probabilities: torch.Tensor | None = field(default=None, repr=False)
    logits: torch.Tensor | None = field(default=None, repr=False)


def prepare_batch(rows: list[dict[str, Any]], config: ModelConfig) -> PreparedBatch:
    """Decode every request of a TorchServe batch; bad ones are kept as errors."""
    arrays: list[np.ndarray] = []
    counts: list[int] = []
    errors: list[HistomarkerError | None] = []
    for row in rows:
        try:
            patches = decode_item(request_payload(row))
        except HistomarkerError as exc:
            counts.append(0)
            errors.append(exc)
            continue
        arrays.append(patches)
        counts.append(len(patches))
        errors.append(None)
    x = to_batch(arrays, config) if arrays else None
    return PreparedBatch(counts, errors, x)


def batch_responses(batch: PreparedBatch, config: ModelConfig) -> list[Any]:
    """One response per request: a list of patch outputs, or an error dict."""
    if batch.probabilities is not None and batch.logits is not None:
        outputs = patch_outputs(batch.probabilities, batch.logits, config)
    else:
        outputs = []
    grouped = iter(split_by_request(outputs, [c for c in batch.counts if c]))
    return [error_output(e) if e is not None else next(grouped) for e in batch.errors]
