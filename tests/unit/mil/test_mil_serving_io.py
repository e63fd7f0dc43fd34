"""Wire format of the served encoders and MIL heads: round trips, every rejected
payload with its message, a batch answered request by request, and the handler's
MIL path end to end without TorchServe."""

from __future__ import annotations

import dataclasses
import functools
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from services.common.errors import (
    FailedPrecondition,
    InvalidInput,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from services.encoders import encoder_spec, tiny_spec
from services.mil.heads import build_head
from services.mil.model import FittedMIL, MilPrediction
from services.mil.serving_io import (
    ENCODER_CONFIG_FILE,
    MAX_BAG_PATCHES,
    MAX_PATCH_PX,
    MAX_PATCHES_PER_REQUEST,
    EncoderArchive,
    answer_requests,
    decode_bag,
    decode_embeddings,
    decode_mil_output,
    decode_patches,
    decode_requests,
    encode_bag,
    encode_embeddings,
    encode_patches,
    encoded_responses,
    mil_output,
    rejections,
)

DIM = 12
TASKS = ("tp53", "pik3ca", "er")


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _header_only(shape: tuple[int, ...], dtype: str) -> bytes:
    """A ``.npy`` header claiming ``shape`` with no data after it."""
    buffer = io.BytesIO()
    header = {"descr": np.dtype(dtype).str, "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue()


def _patches(count: int = 3, side: int = 8) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (count, side, side, 3), dtype=np.uint8)


def _bag(count: int = 5) -> np.ndarray:
    return np.random.default_rng(1).normal(size=(count, DIM)).astype(np.float32)


# --- encoder payloads -------------------------------------------------------------------


def test_patches_round_trip_as_writable_c_arrays() -> None:
    patches = _patches()
    decoded = decode_patches(encode_patches(patches))
    np.testing.assert_array_equal(decoded, patches)
    assert decoded.flags.c_contiguous and decoded.flags.writeable
    # TorchServe hands binary bodies over as bytearray.
    np.testing.assert_array_equal(decode_patches(bytearray(encode_patches(patches))), patches)


def test_fortran_ordered_patches_keep_their_values() -> None:
    patches = _patches()
    decoded = decode_patches(_npy(np.asfortranarray(patches)))
    np.testing.assert_array_equal(decoded, patches)
    assert decoded.flags.c_contiguous


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"\x89PNG\r\n\x1a\n not npy", "send one .npy file of uint8"),
        ("a string", "send one .npy file of uint8"),
        ({"shape": [1, 8, 8, 3]}, "got dict"),
        (_npy(np.zeros((2, 8, 8, 3), np.float32)), "patches must be uint8, got float32"),
        (_npy(np.zeros((8, 8, 3), np.uint8)), r"\(N, H, W, 3\); got shape \(8, 8, 3\)"),
        (_npy(np.zeros((2, 8, 8, 4), np.uint8)), r"\(N, H, W, 3\)"),
        (_npy(np.zeros((0, 8, 8, 3), np.uint8)), "1-1024 patches, got 0"),
        (_header_only((MAX_PATCHES_PER_REQUEST + 1, 8, 8, 3), "u1"), "1-1024 patches"),
        (_header_only((1, MAX_PATCH_PX + 1, 8, 3), "u1"), "patch sides must be"),
        (_npy(np.zeros((2, 8, 8, 3), np.uint8))[:-5], "needs 384"),
        (b"\x93NUMPY\x09\x00garbage", "unreadable .npy header"),
    ],
)
def test_bad_patch_payloads_are_refused_readably(payload: Any, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        decode_patches(payload)


def test_a_header_claiming_a_huge_array_is_refused_before_allocating() -> None:
    with pytest.raises(InvalidInput, match="patches"):
        decode_patches(_header_only((1000, 4000, 4000, 3), "u1"))
    with pytest.raises(InvalidInput, match="needs"):
        decode_bag(_header_only((60_000, 10**6), "<f4"), 10**6)


def test_embeddings_round_trip_and_bad_answers_are_typed() -> None:
    embeddings = np.random.default_rng(2).normal(size=(4, 16)).astype(np.float32)
    np.testing.assert_array_equal(
        decode_embeddings(encode_embeddings(embeddings), 4, 16), embeddings
    )
    with pytest.raises(Unavailable, match=r"shape \(4, 16\), expected \(5, 16\)"):
        decode_embeddings(encode_embeddings(embeddings), 5, 16)
    with pytest.raises(Unavailable, match="must be float32"):
        decode_embeddings(encode_embeddings(embeddings).replace(b"<f4", b"<f8"), 4, 16)
    # The handler's error body becomes the error it names.
    body = json.dumps({"error": "patches must be uint8", "code": "INVALID_ARGUMENT"})
    with pytest.raises(InvalidInput, match="patches must be uint8"):
        decode_embeddings(body.encode(), 4, 16)
    busy = json.dumps({"error": "queue full", "code": "RESOURCE_EXHAUSTED"}).encode()
    with pytest.raises(ResourceExhausted):
        decode_embeddings(busy, 4, 16)
    with pytest.raises(Unavailable, match="neither embeddings nor an error"):
        decode_embeddings(b"<html>oops</html>", 4, 16)


# --- MIL payloads -----------------------------------------------------------------------


def test_bags_round_trip_and_other_float_widths_are_cast_by_the_client() -> None:
    bag = _bag()
    np.testing.assert_array_equal(decode_bag(encode_bag(bag), DIM), bag)
    as_float64 = decode_bag(encode_bag(bag.astype(np.float64)), DIM)
    assert as_float64.dtype == np.float32
    np.testing.assert_array_equal(as_float64, bag)


def _with(bag: np.ndarray, row: int, value: float) -> np.ndarray:
    bag = bag.copy()
    bag[row, 0] = value
    return bag


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"not a bag at all", "the bag: send one .npy file of float32"),
        (_npy(_bag().astype(np.float64)), "the bag must be float32, got float64"),
        (_npy(_bag().astype(np.float16)), "must be float32, got float16"),
        (_npy(np.zeros((5,), np.float32)), r"\(N, 12\) embeddings; got shape \(5,\)"),
        (_npy(np.zeros((1, 5, DIM), np.float32)), r"got shape \(1, 5, 12\)"),
        (_npy(np.zeros((0, DIM), np.float32)), r"the bag is empty \(N = 0\)"),
        (_npy(np.zeros((5, DIM + 1), np.float32)), "13 wide; this head reads 12"),
        (_npy(_with(_bag(), 2, np.nan)), "1 NaN or infinite values"),
        (_npy(_with(_with(_bag(), 0, np.inf), 1, -np.inf)), "2 NaN or infinite values"),
        (_header_only((MAX_BAG_PATCHES + 1, DIM), "<f4"), "at most 65536 patches"),
        (_npy(_bag())[:-1], "data bytes"),
    ],
)
def test_bad_bags_are_refused_readably(payload: bytes, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        decode_bag(payload, DIM)


def _prediction(count: int) -> MilPrediction:
    rng = np.random.default_rng(3)
    return MilPrediction(
        probabilities={t: float(rng.random()) for t in TASKS},
        logits={t: float(rng.normal()) for t in TASKS},
        attention={t: rng.dirichlet(np.ones(count)).astype(np.float32) for t in TASKS},
    )


def test_mil_outputs_survive_json_exactly() -> None:
    prediction = _prediction(7)
    answer = json.loads(json.dumps(mil_output(prediction, TASKS)))
    assert answer["tasks"] == list(TASKS)
    decoded = decode_mil_output(answer, TASKS, 7)
    assert decoded.probabilities == prediction.probabilities
    assert decoded.logits == prediction.logits
    for task in TASKS:
        assert decoded.attention[task].dtype == np.float32
        np.testing.assert_array_equal(decoded.attention[task], prediction.attention[task])


def test_bad_mil_answers_are_typed() -> None:
    answer = json.loads(json.dumps(mil_output(_prediction(7), TASKS)))
    with pytest.raises(FailedPrecondition, match="its model card names"):
        decode_mil_output(answer, ("tp53", "er"), 7)
    with pytest.raises(Unavailable, match="attention of 8 patches"):
        decode_mil_output(answer, TASKS, 8)
    with pytest.raises(Unavailable, match="not calls"):
        decode_mil_output([1, 2], TASKS, 7)
    broken = {**answer, "probabilities": {"tp53": 0.5}}
    with pytest.raises(Unavailable, match="malformed"):
        decode_mil_output(broken, TASKS, 7)


# --- a batch ------------------------------------------------------------------------------


def test_a_bad_request_is_rejected_alone_and_the_others_are_answered() -> None:
    good, other = _bag(4), _bag(6)
    rows: list[dict[str, Any]] = [
        {"data": bytearray(encode_bag(good))},
        {"body": b"junk"},
        {},
        {"body": encode_bag(other)},
    ]
    decoded = decode_requests(rows, functools.partial(decode_bag, in_dim=DIM))
    np.testing.assert_array_equal(decoded[0], good)
    assert isinstance(decoded[1], InvalidInput) and isinstance(decoded[2], InvalidInput)

    def answer(bag: np.ndarray) -> dict[str, int]:
        if len(bag) == 6:
            raise InvalidInput("six is too many")
        return {"n": len(bag)}

    answered = answer_requests(decoded, answer)
    assert [i for i, _ in rejections(answered)] == [1, 2, 3]
    assert "no data" in rejections(answered)[1][1]
    responses = encoded_responses(answered, lambda output: output)
    assert responses[0] == {"n": 4}
    assert responses[3] == {"error": "six is too many", "code": "INVALID_ARGUMENT"}
    assert all(r["code"] == "INVALID_ARGUMENT" for r in responses[1:])


def test_the_handlers_mil_path_equals_predict_bag() -> None:
    torch.manual_seed(0)
    head = build_head("abmil", DIM, len(TASKS), hidden_dim=8, attention_dim=4)
    model = FittedMIL(head, "abmil", {}, DIM, TASKS, (1.0, 2.0, 0.5))
    bag = _bag(9)
    # What MilHandler does with a batch of one, then what the client does.
    outcomes = decode_requests(
        [{"data": encode_bag(bag)}], functools.partial(decode_bag, in_dim=DIM)
    )
    answered = answer_requests(outcomes, lambda b: mil_output(model.predict_bag(b), TASKS))
    (response,) = encoded_responses(answered, lambda output: output)
    served = decode_mil_output(json.loads(json.dumps(response)), TASKS, len(bag))
    local = model.predict_bag(bag)
    assert served.probabilities == local.probabilities and served.logits == local.logits
    for task in TASKS:
        np.testing.assert_array_equal(served.attention[task], local.attention[task])


# --- encoder.json -------------------------------------------------------------------------


def test_encoder_archive_file_round_trips_and_is_checked(tmp_path: Path) -> None:
    # A detector at 64 px with its own normalisation, as effective_spec gives it.
    spec = dataclasses.replace(
        tiny_spec("detector"), input_px=64, mpp=4.0, mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2)
    )
    archive = EncoderArchive("detector", "weights.pt", "ab" * 32, spec, tiny=True)
    (tmp_path / ENCODER_CONFIG_FILE).write_text(archive.to_json())
    assert EncoderArchive.read(tmp_path) == archive
    stored = json.loads(archive.to_json())
    assert stored["spec"]["input_px"] == 64 and stored["spec"]["mean"] == [0.5, 0.5, 0.5]
    with pytest.raises(NotFound, match="not an encoder archive"):
        EncoderArchive.read(tmp_path / "elsewhere")
    uni = encoder_spec("uni")
    with pytest.raises(InvalidInput, match="64 lowercase hex"):
        EncoderArchive("uni", "w.bin", "XYZ", uni)
    with pytest.raises(InvalidInput, match="must be a file name"):
        EncoderArchive("uni", "../w.bin", "ab" * 32, uni)
    with pytest.raises(InvalidInput, match="spec must be encoder uni's"):
        EncoderArchive("uni", "w.bin", "ab" * 32, spec)
    with pytest.raises(InvalidInput, match="not JSON"):
        EncoderArchive.from_json("{")
    with pytest.raises(InvalidInput, match="unexpected keyword"):
        EncoderArchive.from_json(json.dumps({**stored, "extra": 1}))
    with pytest.raises(InvalidInput, match="has no 'spec'"):
        EncoderArchive.from_json(json.dumps({k: v for k, v in stored.items() if k != "spec"}))
    with pytest.raises(InvalidInput, match="boolean 'tiny'"):
        EncoderArchive.from_json(json.dumps({**stored, "tiny": "yes"}))
