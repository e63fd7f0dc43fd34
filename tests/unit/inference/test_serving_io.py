"""The TorchServe handler's pure pre- and post-processing, without TorchServe."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from services.common.errors import InvalidInput
from services.inference.backbones import build_backbone
from services.inference.bundle import ModelConfig, save_bundle
from services.inference.preprocess import PreprocessConfig, shrink_to_input, to_input
from services.inference.serving_io import (
    batch_responses,
    decode_item,
    encode_json_array,
    encode_npy,
    model_transforms,
    patch_outputs,
    predict,
    predict_by_request,
    prepare_batch,
    request_payload,
    split_by_request,
    to_batch,
)
from services.inference.tta import DIHEDRAL, tta_probabilities

CONFIG = ModelConfig(
    name="cancer_detector",
    version="1",
    backbone="tiny",
    class_names=("normal", "cancer"),
    preprocess=PreprocessConfig(input_px=32),
    temperature=1.5,
)
OUTPUT_KEYS = {"probabilities", "logits", "label", "label_index", "confidence", "discriminative"}


def _patch(seed: int = 0, side: int = 40) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)


def _encoded(patch: np.ndarray, kind: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(patch).save(buffer, kind, **({"quality": 95} if kind == "JPEG" else {}))
    return buffer.getvalue()


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_backbone("tiny", 2, input_px=32).eval()


# Decoding.


def test_png_decodes_losslessly_to_one_patch() -> None:
    patch = _patch()
    decoded = decode_item(_encoded(patch, "PNG"))
    assert decoded.shape == (1, 40, 40, 3) and decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded[0], patch)


def test_jpeg_and_bytearray_decode_to_rgb() -> None:
    patch = np.full((24, 32, 3), (200, 120, 160), dtype=np.uint8)
    decoded = decode_item(bytearray(_encoded(patch, "JPEG")))
    assert decoded.shape == (1, 24, 32, 3)
    assert np.abs(decoded.astype(int) - patch).max() <= 3


def test_grayscale_and_rgba_images_become_rgb() -> None:
    gray = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(gray, "PNG")
    rgba = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 4), np.uint8)).save(rgba, "PNG")
    assert decode_item(gray.getvalue()).shape == (1, 8, 8, 3)
    assert decode_item(rgba.getvalue()).shape == (1, 8, 8, 3)


def test_npy_holds_one_patch_or_a_batch() -> None:
    batch = np.stack([_patch(1), _patch(2)])
    np.testing.assert_array_equal(decode_item(encode_npy(batch)), batch)
    assert decode_item(encode_npy(batch[0])).shape == (1, 40, 40, 3)


def test_json_with_shape_and_base64_data_decodes() -> None:
    batch = np.stack([_patch(3), _patch(4)])
    text = encode_json_array(batch)
    np.testing.assert_array_equal(decode_item(text), batch)
    np.testing.assert_array_equal(decode_item(text.encode()), batch)
    np.testing.assert_array_equal(decode_item(json.loads(text)), batch)


@pytest.mark.parametrize(
    ("item", "message"),
    [
        (b"junk", "unsupported patch encoding"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 20, "not a readable PNG or JPEG"),
        (encode_npy(np.zeros((4, 4, 3), np.float32)), "must be uint8"),
        (encode_npy(np.zeros((4, 4), np.uint8)), "RGB"),
        (encode_npy(np.zeros((1, 4, 4, 4), np.uint8)), "RGB"),
        (b"\x93NUMPY broken", ".npy payload is unreadable"),
        (json.dumps({"shape": [2, 2, 3], "data": "!!"}), "not valid base64"),
        (json.dumps({"shape": [2, 2, 3], "data": "AAAA"}), "needs 12"),
        (json.dumps({"shape": "2x2", "data": "AAAA"}), "'shape'"),
        (json.dumps({"shape": [1, 1, 3], "dtype": "float32", "data": "AAAA"}), "uint8"),
        (json.dumps([1, 2, 3]), "unsupported patch encoding"),
        (12, "unsupported patch encoding"),
    ],
)
def test_bad_items_are_refused_with_a_clear_message(item: object, message: str) -> None:
    with pytest.raises(InvalidInput, match=message.replace("(", r"\(").replace(".", r"\.")):
        decode_item(item)


def test_request_payload_takes_data_then_body() -> None:
    assert request_payload({"data": b"a", "body": b"b"}) == b"a"
    assert request_payload({"body": b"b"}) == b"b"
    with pytest.raises(InvalidInput, match="no data"):
        request_payload({"data": b""})


# Inference and outputs.


def test_predict_equals_tta_probabilities_with_the_model_temperature() -> None:
    model, patches = _model(), [_patch(5)[None], _patch(6, side=64)[None]]
    x = to_batch(patches, CONFIG)
    assert x.shape == (2, 3, 32, 32)
    probabilities, logits = predict(model, x, CONFIG)
    expected, expected_logits = tta_probabilities(model, x, 1.5, DIHEDRAL)
    torch.testing.assert_close(probabilities, expected)
    torch.testing.assert_close(logits, expected_logits)
    # Mixed sizes are resized one array at a time, like to_input on each.
    torch.testing.assert_close(x[1:], to_input(patches[1], CONFIG.preprocess))


def test_a_request_gets_the_same_bits_alone_or_batched_with_others() -> None:
    model = _model()
    mine = to_batch([np.stack([_patch(s) for s in range(3)])], CONFIG)
    others = to_batch([np.stack([_patch(s) for s in range(10, 27)])], CONFIG)
    alone, alone_logits = predict_by_request(model, mine, [3], CONFIG)
    # TorchServe batched a rejected request, another request and this one together.
    x = torch.cat([others, mine])
    batched, batched_logits = predict_by_request(model, x, [0, 17, 3], CONFIG)
    assert torch.equal(batched[17:], alone) and torch.equal(batched_logits[17:], alone_logits)
    whole, _ = predict(model, x, CONFIG)
    torch.testing.assert_close(batched, whole)  # the same answer, up to rounding
    with pytest.raises(ValueError, match="20 patches for requests of 19"):
        predict_by_request(model, x, [16, 3], CONFIG)


def test_no_tta_means_the_identity_view_only() -> None:
    assert model_transforms(replace(CONFIG, tta=())) == ((0, False),)
    assert model_transforms(CONFIG) == DIHEDRAL


def test_outputs_have_every_key_and_a_consistent_label() -> None:
    probabilities = torch.tensor([[0.2, 0.8], [0.97, 0.03], [0.5, 0.5]])
    logits = torch.log(probabilities)
    outputs = patch_outputs(probabilities, logits, CONFIG)
    assert [set(o) for o in outputs] == [OUTPUT_KEYS] * 3
    assert [o["label"] for o in outputs] == ["cancer", "normal", "cancer"]
    assert [o["label_index"] for o in outputs] == [1, 0, 1]
    assert outputs[0]["confidence"] == pytest.approx(0.8)
    assert outputs[0]["probabilities"] == pytest.approx([0.2, 0.8])
    assert outputs[1]["logits"] == pytest.approx(np.log([0.97, 0.03]).tolist())
    json.dumps(outputs)  # plain JSON types only


def test_discriminative_means_confidence_above_the_threshold() -> None:
    probabilities = torch.tensor([[0.05, 0.95], [0.1, 0.9], [0.85, 0.15]])
    outputs = patch_outputs(probabilities, probabilities.log(), CONFIG)
    assert [o["discriminative"] for o in outputs] == [True, False, False]
    lenient = replace(CONFIG, discriminative_threshold=0.8)
    outputs = patch_outputs(probabilities, probabilities.log(), lenient)
    assert [o["discriminative"] for o in outputs] == [True, True, True]


def test_decision_threshold_and_multiclass_argmax() -> None:
    probabilities = torch.tensor([[0.6, 0.4]])
    assert (
        patch_outputs(probabilities, probabilities, replace(CONFIG, decision_threshold=0.3))[0][
            "label"
        ]
        == "cancer"
    )
    three = replace(CONFIG, class_names=("a", "b", "c"))
    p3 = torch.tensor([[0.2, 0.5, 0.3]])
    assert patch_outputs(p3, p3, three)[0]["label"] == "b"
    with pytest.raises(ValueError, match="expected"):
        patch_outputs(p3, p3, CONFIG)


def test_split_by_request_regroups_patches() -> None:
    outputs = [{"i": i} for i in range(5)]
    assert split_by_request(outputs, [2, 1, 2]) == [
        [{"i": 0}, {"i": 1}],
        [{"i": 2}],
        [{"i": 3}, {"i": 4}],
    ]
    with pytest.raises(ValueError):
        split_by_request(outputs, [1])


def test_a_bad_request_does_not_spoil_its_batch() -> None:
    model = _model()
    good = _encoded(_patch(7), "PNG")
    rows = [{"data": good}, {"body": b"junk"}, {"data": encode_npy(np.stack([_patch(8)] * 2))}]
    batch = prepare_batch(rows, CONFIG)
    assert batch.counts == [1, 0, 2]
    assert batch.x is not None
    batch.probabilities, batch.logits = predict(model, batch.x, CONFIG)
    responses = batch_responses(batch, CONFIG)
    assert len(responses[0]) == 1 and len(responses[2]) == 2
    assert responses[1]["code"] == "INVALID_ARGUMENT"
    assert "unsupported patch encoding" in responses[1]["error"]
    # The same patch twice in one batch: the same answer (up to float rounding, which
    # a batched convolution may do differently per row).
    first, second = responses[2]
    assert first["probabilities"] == pytest.approx(second["probabilities"], abs=1e-6)
    assert {k: v for k, v in first.items() if k not in ("probabilities", "logits")} == {
        k: v for k, v in second.items() if k not in ("probabilities", "logits")
    }


def test_a_batch_of_only_bad_requests_answers_each() -> None:
    batch = prepare_batch([{"data": b"junk"}, {"data": b""}], CONFIG)
    assert batch.x is None
    assert [r["code"] for r in batch_responses(batch, CONFIG)] == ["INVALID_ARGUMENT"] * 2


def test_handler_serves_a_bundle_folder_through_its_lifecycle(tmp_path: Path) -> None:
    from services.inference.handler import PatchClassifierHandler

    model = _model()
    save_bundle(tmp_path, model, CONFIG)
    statuses: list[tuple[int, int]] = []
    context = SimpleNamespace(
        system_properties={"model_dir": str(tmp_path), "gpu_id": None},
        manifest={"model": {"modelName": "cancer_detector"}},
        metrics=SimpleNamespace(add_time=lambda *args, **kwargs: None),
        get_request_header=lambda idx, key: None,
        set_response_status=lambda code, phrase, idx: statuses.append((code, idx)),
    )
    handler = PatchClassifierHandler()
    handler.initialize(context)
    patch = _patch(9)
    answers = handler.handle([{"data": _encoded(patch, "PNG")}, {"data": b"junk"}], context)
    expected, _ = tta_probabilities(model, to_input(patch, CONFIG.preprocess), 1.5)
    assert answers[0][0]["probabilities"] == pytest.approx(expected[0].tolist(), abs=1e-6)
    assert answers[1]["code"] == "INVALID_ARGUMENT"
    assert statuses == [(400, 1)]


def test_patches_shrunk_before_sending_give_the_same_input() -> None:
    """A client may shrink patches to the model's input itself: the handler's input
    is then bit for bit the one it would make from the full-size patches."""
    rng = np.random.default_rng(5)
    config = PreprocessConfig(input_px=128)
    full = rng.integers(0, 256, (3, 512, 512, 3), dtype=np.uint8)
    shrunk = shrink_to_input(full, 128)
    assert shrunk.shape == (3, 128, 128, 3) and shrunk.dtype == np.uint8
    assert torch.equal(to_input(shrunk, config), to_input(full, config))
    # Patches not larger than the input on both sides go as they are.
    for patches in (shrunk, full[:, :100], rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)):
        assert shrink_to_input(patches, 128) is patches
