"""Wire format of the served encoders (``encoder_<name>``) and MIL heads (``mil_<name>``),
as pure functions testable without TorchServe; the handlers and the clients of
:mod:`services.mil.remote` both use them.

Encoder
    Request: one ``.npy`` of uint8 RGB patches (N, H, W, 3), N at most
    :data:`MAX_PATCHES_PER_REQUEST` and sides at most :data:`MAX_PATCH_PX` (the patch
    classifier's limits); patches of another size than the encoder's input are
    resized by it. Response: one ``.npy`` of float32 embeddings (N, D).
MIL head
    Request: one ``.npy`` of float32 embeddings (N, D), one bag: 1 <= N <=
    :data:`MAX_BAG_PATCHES`, D the head's width, every value finite. Response: JSON
    ``{"tasks": [...], "probabilities": {task: p}, "logits": {task: z},
    "attention": {task: [N floats]}}``.

A request that cannot be decoded is answered with status 400 and
``{"error": ..., "code": "INVALID_ARGUMENT"}`` (over gRPC: status OK and that body);
the other requests of its batch are answered normally. The ``.npy`` header is read
first: dtype, shape and the payload's length are checked before any array is made,
so a header claiming a huge shape costs nothing.
"""

from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from services.common.errors import (
    FailedPrecondition,
    HistomarkerError,
    InvalidInput,
    NotFound,
    Unavailable,
)
from services.encoders.registry import EncoderSpec
from services.inference.serving_io import (
    MAX_PATCH_PX,
    MAX_PATCHES_PER_REQUEST,
    error_output,
    request_payload,
)
from services.inference.torchserve import error_from_output
from services.mil.model import MilPrediction

__all__ = [
    "BAD_REQUEST",
    "EMBED_BATCH_SIZE",
    "ENCODER_CONFIG_FILE",
    "MAX_BAG_PATCHES",
    "MAX_PATCHES_PER_REQUEST",
    "MAX_PATCH_PX",
    "MAX_REQUEST_BYTES",
    "MIL_MODEL_FILE",
    "EncoderArchive",
    "answer_requests",
    "decode_bag",
    "decode_embeddings",
    "decode_mil_output",
    "decode_patches",
    "decode_requests",
    "encode_bag",
    "encode_embeddings",
    "encode_patches",
    "encoded_responses",
    "mil_output",
    "rejections",
]

#: Most patches one MIL request (one bag) may hold: about 2.5x the patches of a large
#: resection slide at 20x in 224 px tiles. The request is N x D x 4 bytes and must
#: also fit :data:`MAX_REQUEST_BYTES`.
MAX_BAG_PATCHES = 65_536
#: Largest request body a client sends, bytes: TorchServe's ``max_request_size`` and
#: the gRPC client's message limit (``TorchServeConfig``, ``TorchServeGrpcClient``).
MAX_REQUEST_BYTES = 64 * 1024 * 1024
#: Patches per forward pass of a served encoder (``LocalEmbedder``'s, so that served
#: and in-process embeddings run the same batches).
EMBED_BATCH_SIZE = 32
#: HTTP status of a request whose payload was rejected.
BAD_REQUEST = 400
#: What an encoder archive says about its weights (:class:`EncoderArchive`).
ENCODER_CONFIG_FILE = "encoder.json"
#: The fitted head in a MIL archive (``FittedMIL.save``).
MIL_MODEL_FILE = "mil.pt"

_NPY_MAGIC = b"\x93NUMPY"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

#: One request after decoding or answering: its value, or why it was rejected.
Outcome = Any | HistomarkerError


# --- the encoder archive's own file ------------------------------------------------------


@dataclass(frozen=True)
class EncoderArchive:
    """``encoder.json`` of an encoder archive: which encoder its weights file fits and
    what it expects and returns with them.

    Attributes:
        encoder: Registry name (``uni``, ``resnet50-trunc``...).
        weights_file: The weights file's name at the archive's root.
        sha256: Hex SHA-256 of that file, checked when the worker loads it.
        spec: The encoder's spec with these weights
            (:func:`services.encoders.effective_spec`: a detector's is its bundle's
            input side, resolution and normalisation, a ``biomarker-cnns``' its
            sidecar's, with its stain reference), checked against the loaded one.
        tiny: The tiny test variant (tests only).
    """

    encoder: str
    weights_file: str
    sha256: str
    spec: EncoderSpec
    tiny: bool = False

    def __post_init__(self) -> None:
        if not self.encoder:
            raise InvalidInput("an encoder archive needs the encoder's registry name")
        if not isinstance(self.spec, EncoderSpec) or self.spec.name != self.encoder:
            raise InvalidInput(f"the archive's spec must be encoder {self.encoder}'s")
        if not self.weights_file or Path(self.weights_file).name != self.weights_file:
            raise InvalidInput(f"weights_file must be a file name, got {self.weights_file!r}")
        if not _SHA256.match(self.sha256):
            raise InvalidInput(f"sha256 must be 64 lowercase hex digits, got {self.sha256!r}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> EncoderArchive:
        """Parse ``encoder.json``.

        Raises:
            InvalidInput: Not JSON, or keys missing, unknown or of the wrong type.
        """
        try:
            data = json.loads(text)
        except (UnicodeDecodeError, ValueError) as exc:
            raise InvalidInput(f"{ENCODER_CONFIG_FILE} is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise InvalidInput(f"{ENCODER_CONFIG_FILE} must hold a JSON object")
        try:
            spec = data.pop("spec")
            spec = EncoderSpec(**{**spec, "mean": tuple(spec["mean"]), "std": tuple(spec["std"])})
            archive = cls(spec=spec, **data)
        except KeyError as exc:
            raise InvalidInput(f"{ENCODER_CONFIG_FILE} has no {exc}") from None
        except TypeError as exc:
            raise InvalidInput(f"{ENCODER_CONFIG_FILE}: {exc}") from None
        if not isinstance(archive.tiny, bool) or not all(
            isinstance(v, str) for v in (archive.encoder, archive.weights_file, archive.sha256)
        ):
            raise InvalidInput(f"{ENCODER_CONFIG_FILE}: strings and a boolean 'tiny' expected")
        return archive

    @classmethod
    def read(cls, folder: Path) -> EncoderArchive:
        """``encoder.json`` of an unpacked archive (TorchServe's model folder).

        Raises:
            NotFound: The folder has no ``encoder.json``.
            InvalidInput: The file is malformed.
        """
        path = Path(folder) / ENCODER_CONFIG_FILE
        if not path.is_file():
            raise NotFound(f"{folder} has no {ENCODER_CONFIG_FILE}: not an encoder archive")
        return cls.from_json(path.read_bytes())


# --- .npy payloads -------------------------------------------------------------------------


def encode_patches(patches: np.ndarray) -> bytes:
    """uint8 patches (N, H, W, 3) as an encoder request."""
    return _npy_bytes(np.asarray(patches, dtype=np.uint8))


def decode_patches(item: Any) -> np.ndarray:
    """An encoder request -> uint8 RGB patches (N, H, W, 3), C-contiguous.

    Raises:
        InvalidInput: Not a ``.npy``, not uint8, not (N, H, W, 3), or out of the
            limits (:data:`MAX_PATCHES_PER_REQUEST`, :data:`MAX_PATCH_PX`).
    """

    def check(shape: tuple[int, ...]) -> None:
        if len(shape) != 4 or shape[-1] != 3:
            raise InvalidInput(f"patches must be RGB (N, H, W, 3); got shape {shape}")
        count, height, width = shape[:3]
        if not 1 <= count <= MAX_PATCHES_PER_REQUEST:
            raise InvalidInput(f"a request holds 1-{MAX_PATCHES_PER_REQUEST} patches, got {count}")
        if not (1 <= height <= MAX_PATCH_PX and 1 <= width <= MAX_PATCH_PX):
            raise InvalidInput(f"patch sides must be 1-{MAX_PATCH_PX} px, got {width} x {height}")

    return _read_npy(item, "patches", np.dtype(np.uint8), check)


def encode_embeddings(embeddings: np.ndarray) -> bytes:
    """float32 embeddings (N, D) as an encoder response."""
    return _npy_bytes(np.asarray(embeddings, dtype=np.float32))


def decode_embeddings(answer: bytes, count: int, width: int) -> np.ndarray:
    """An encoder response -> float32 embeddings (count, width).

    Raises:
        InvalidInput (or the error the body names): The answer is the handler's
            error body (a rejected request).
        Unavailable: Anything else that is not float32 (count, width) embeddings.
    """
    answer = bytes(answer)
    if not answer.startswith(_NPY_MAGIC):
        raise _error_body(answer, "embeddings")

    def check(shape: tuple[int, ...]) -> None:
        if shape != (count, width):
            raise InvalidInput(f"shape {shape}, expected {(count, width)}")

    try:
        return _read_npy(answer, "embeddings", np.dtype(np.float32), check)
    except InvalidInput as exc:
        raise Unavailable(f"the encoder answered unusable embeddings: {exc}") from None


def encode_bag(features: np.ndarray) -> bytes:
    """One bag's embeddings (N, D) as a float32 MIL request."""
    return _npy_bytes(np.asarray(features, dtype=np.float32))


def decode_bag(item: Any, in_dim: int) -> np.ndarray:
    """A MIL request -> one bag's float32 embeddings (N, in_dim), C-contiguous.

    Raises:
        InvalidInput: Not a ``.npy``, not float32, not 2-D, an empty bag, more than
            :data:`MAX_BAG_PATCHES` patches, another width than ``in_dim``, or a NaN
            or infinite value.
    """

    def check(shape: tuple[int, ...]) -> None:
        if len(shape) != 2:
            raise InvalidInput(f"a bag must be (N, {in_dim}) embeddings; got shape {shape}")
        count, width = shape
        if count < 1:
            raise InvalidInput("the bag is empty (N = 0): nothing to score")
        if count > MAX_BAG_PATCHES:
            raise InvalidInput(f"a bag holds at most {MAX_BAG_PATCHES} patches, got {count}")
        if width != in_dim:
            raise InvalidInput(f"the bag's embeddings are {width} wide; this head reads {in_dim}")

    bag = _read_npy(item, "the bag", np.dtype(np.float32), check)
    bad = int(np.count_nonzero(~np.isfinite(bag)))
    if bad:
        raise InvalidInput(f"the bag holds {bad} NaN or infinite values")
    return bag


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def _read_npy(
    item: Any, what: str, dtype: np.dtype, check: Callable[[tuple[int, ...]], None]
) -> np.ndarray:
    """A ``.npy`` payload as a writable C-contiguous array of ``dtype``, its shape
    checked by ``check`` before the data is read."""
    if isinstance(item, bytearray | memoryview):
        item = bytes(item)
    if not isinstance(item, bytes) or not item.startswith(_NPY_MAGIC):
        raise InvalidInput(
            f"{what}: send one .npy file of {dtype.name} values (got {_describe(item)})"
        )
    stream = io.BytesIO(item)
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran, found = np.lib.format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, fortran, found = np.lib.format.read_array_header_2_0(stream)
        else:
            raise ValueError(f"unsupported .npy version {version[0]}.{version[1]}")
    except (ValueError, SyntaxError, EOFError) as exc:
        raise InvalidInput(f"{what}: unreadable .npy header: {exc}") from None
    if found != dtype:
        raise InvalidInput(f"{what} must be {dtype.name}, got {found}")
    shape = tuple(int(v) for v in shape)
    check(shape)
    count = math.prod(shape)
    offset = stream.tell()
    if len(item) - offset != count * dtype.itemsize:
        raise InvalidInput(
            f"{what}: the .npy holds {len(item) - offset} data bytes; shape {shape} "
            f"needs {count * dtype.itemsize}"
        )
    flat = np.frombuffer(item, dtype=dtype, count=count, offset=offset)
    # A copy: writable (torch warns on read-only arrays) and C-ordered.
    return np.array(flat.reshape(shape, order="F" if fortran else "C"), order="C")


def _describe(item: Any) -> str:
    if isinstance(item, bytes):
        return f"{len(item)} bytes starting {item[:8]!r}"
    return type(item).__name__


def _error_body(answer: bytes, what: str) -> HistomarkerError:
    """The error of a response that is not the expected payload: the handler's error
    body as its typed error, anything else Unavailable."""
    try:
        data = json.loads(answer)
    except (UnicodeDecodeError, ValueError):
        data = None
    if isinstance(data, dict) and isinstance(data.get("error"), str):
        return error_from_output(data)
    return Unavailable(f"TorchServe answered neither {what} nor an error: {_describe(answer)}")


# --- MIL responses -------------------------------------------------------------------------


def mil_output(prediction: MilPrediction, tasks: Sequence[str]) -> dict[str, Any]:
    """One bag's calls as the JSON-ready MIL response (tasks in the head's order)."""
    return {
        "tasks": list(tasks),
        "probabilities": {t: float(prediction.probabilities[t]) for t in tasks},
        "logits": {t: float(prediction.logits[t]) for t in tasks},
        "attention": {
            t: [float(v) for v in np.asarray(prediction.attention[t], np.float32)] for t in tasks
        },
    }


def decode_mil_output(answer: Any, tasks: Sequence[str], count: int) -> MilPrediction:
    """A MIL response (parsed JSON) -> the bag's :class:`MilPrediction`.

    Args:
        answer: The handler's answer, parsed.
        tasks: The tasks the model card names, in order.
        count: Patches in the bag sent (the attention's length).

    Raises:
        FailedPrecondition: The served head calls other tasks than its card names.
        Unavailable: The answer is not a MIL response for ``count`` patches.
    """
    tasks = list(tasks)
    if not isinstance(answer, Mapping) or not isinstance(answer.get("tasks"), list):
        raise Unavailable(f"TorchServe answered a bag with {type(answer).__name__}, not calls")
    if answer["tasks"] != tasks:
        raise FailedPrecondition(
            f"the served MIL head calls {answer['tasks']}; its model card names {tasks}"
        )
    try:
        probabilities = {t: float(answer["probabilities"][t]) for t in tasks}
        logits = {t: float(answer["logits"][t]) for t in tasks}
        attention = {t: np.asarray(answer["attention"][t], dtype=np.float32) for t in tasks}
    except (KeyError, TypeError, ValueError) as exc:
        raise Unavailable(f"TorchServe answered a malformed MIL response: {exc!r}") from None
    wrong = {t: a.shape for t, a in attention.items() if a.shape != (count,)}
    if wrong:
        raise Unavailable(f"attention of {count} patches expected, got shapes {wrong}")
    return MilPrediction(probabilities, logits, attention)


# --- a TorchServe batch ---------------------------------------------------------------------


def decode_requests(
    rows: Sequence[Mapping[str, Any]], decode: Callable[[Any], np.ndarray]
) -> list[Outcome]:
    """Decode every request of a TorchServe batch; a rejected one keeps its error."""
    outcomes: list[Outcome] = []
    for row in rows:
        try:
            outcomes.append(decode(request_payload(row)))
        except HistomarkerError as exc:
            outcomes.append(exc)
    return outcomes


def answer_requests(outcomes: Sequence[Outcome], answer: Callable[[Any], Any]) -> list[Outcome]:
    """``answer`` each accepted request on its own (its result never depends on the
    batch TorchServe made); errors, and the HistomarkerErrors ``answer`` raises, stay
    errors of their request."""
    answered: list[Outcome] = []
    for outcome in outcomes:
        if isinstance(outcome, HistomarkerError):
            answered.append(outcome)
            continue
        try:
            answered.append(answer(outcome))
        except HistomarkerError as exc:
            answered.append(exc)
    return answered


def rejections(outcomes: Sequence[Outcome]) -> list[tuple[int, str]]:
    """(index, message) of every rejected request, for their 400 statuses."""
    return [(i, str(o)) for i, o in enumerate(outcomes) if isinstance(o, HistomarkerError)]


def encoded_responses(outcomes: Sequence[Outcome], encode: Callable[[Any], Any]) -> list[Any]:
    """One response per request: ``encode(result)``, or the error body of a rejected one."""
    return [error_output(o) if isinstance(o, HistomarkerError) else encode(o) for o in outcomes]
