"""A real TorchServe (Java 17) on 127.0.0.1 serving a tiny cancer_detector .mar."""

from __future__ import annotations

import http.client
import io
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from services.common.errors import InvalidInput, NotFound, Unauthenticated
from services.inference.archive import build_mar
from services.inference.backbones import build_backbone
from services.inference.bundle import ModelConfig, save_bundle
from services.inference.preprocess import PreprocessConfig, to_input
from services.inference.serving_io import encode_npy
from services.inference.torchserve import (
    TorchServe,
    TorchServeConfig,
    TorchServeGrpcClient,
)
from services.inference.tta import TRANSFORM_NAMES, tta_probabilities

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("java") is None, reason="TorchServe needs Java 17"),
]

CONFIG = ModelConfig(
    name="cancer_detector",
    version="1",
    backbone="tiny",
    class_names=("normal", "cancer"),
    preprocess=PreprocessConfig(input_px=32),
    temperature=1.7,
    tta=TRANSFORM_NAMES,
)
BATCH_SIZE = 4


def _png(patch: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(patch).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def model_and_mar(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(0)
    model = build_backbone("tiny", 2, input_px=32)
    # Non-trivial BatchNorm statistics, so eval mode matters.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
    bundle = save_bundle(tmp_path_factory.mktemp("bundle"), model, CONFIG)
    store = tmp_path_factory.mktemp("store")
    return model.eval(), build_mar(bundle, store)


@pytest.fixture(scope="module")
def patches() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    # Different sizes: resized to 32 px by the shared preprocessing.
    return [rng.integers(0, 256, (side, side, 3), dtype=np.uint8) for side in (32, 40, 48, 64, 96)]


@pytest.fixture(scope="module")
def expected(model_and_mar: tuple[torch.nn.Module, Path], patches: list[np.ndarray]) -> np.ndarray:
    model, _ = model_and_mar
    x = torch.cat([to_input(p, CONFIG.preprocess) for p in patches])
    probabilities, _ = tta_probabilities(model, x, CONFIG.temperature)
    return probabilities.numpy()


@pytest.fixture(scope="module")
def server(
    model_and_mar: tuple[torch.nn.Module, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TorchServe]:
    _, mar = model_and_mar
    work = tmp_path_factory.mktemp("torchserve")
    config = TorchServeConfig.with_free_ports(mar.parent, work)
    assert config.token_auth, "token auth must be on unless switched off explicitly"
    with TorchServe(config) as instance:
        instance.register(mar, batch_size=BATCH_SIZE, max_batch_delay_ms=50, initial_workers=1)
        yield instance
        pids = instance.processes()
    # The context manager waited: nothing it started may be left.
    alive = [pid for pid in pids if _alive(pid)]
    assert alive == [], f"processes left after stop: {alive}"


def test_config_properties_bind_loopback_and_keep_token_auth(server: TorchServe) -> None:
    text = server.config.config_path.read_text()
    assert f"inference_address=http://127.0.0.1:{server.config.inference_port}" in text
    assert f"grpc_inference_port={server.config.grpc_inference_port}" in text
    assert "disable_token_authorization=false" in text
    assert server.keys is not None


def test_batching_is_configured(server: TorchServe) -> None:
    description = server.describe("cancer_detector")
    assert description["batchSize"] == BATCH_SIZE
    assert description["maxBatchDelay"] == 50
    assert [w["status"] for w in description["workers"]] == ["READY"]
    assert [m["modelName"] for m in server.models()] == ["cancer_detector"]


def test_rest_outputs_equal_the_in_process_model(
    server: TorchServe, patches: list[np.ndarray], expected: np.ndarray
) -> None:
    # Concurrent requests, so TorchServe batches them into one handler call.
    with ThreadPoolExecutor(len(patches)) as pool:
        answers = list(pool.map(lambda p: server.predict_rest("cancer_detector", _png(p)), patches))
    for answer, probabilities in zip(answers, expected, strict=True):
        (output,) = answer
        np.testing.assert_allclose(output["probabilities"], probabilities, atol=1e-5)
        assert output["label"] == CONFIG.class_names[int(probabilities[1] >= 0.5)]
        assert output["discriminative"] == (output["confidence"] > 0.9)


def test_grpc_outputs_equal_the_in_process_model(
    server: TorchServe, patches: list[np.ndarray], expected: np.ndarray
) -> None:
    with server.grpc_client() as client:
        assert client.ping() == "Healthy"
        with ThreadPoolExecutor(len(patches)) as pool:
            answers = list(pool.map(lambda p: client.predict("cancer_detector", _png(p)), patches))
        # One request may carry a batch of raw arrays too.
        same_size = [p for p in patches if p.shape == patches[0].shape]
        stacked = client.predict("cancer_detector", encode_npy(np.stack(same_size * 2)))
    for answer, probabilities in zip(answers, expected, strict=True):
        np.testing.assert_allclose(answer[0]["probabilities"], probabilities, atol=1e-5)
    assert len(stacked) == 2 * len(same_size)
    np.testing.assert_allclose(stacked[0]["probabilities"], expected[0], atol=1e-5)


def test_bad_patches_are_refused_over_rest_and_grpc(server: TorchServe) -> None:
    with pytest.raises(InvalidInput, match="unsupported patch encoding"):
        server.predict_rest("cancer_detector", b"not an image")
    with server.grpc_client() as client, pytest.raises(InvalidInput, match="unsupported"):
        client.predict("cancer_detector", b"not an image")


def test_requests_without_the_token_are_refused(
    server: TorchServe, patches: list[np.ndarray]
) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", server.config.inference_port, timeout=30)
    connection.request("POST", "/predictions/cancer_detector", body=_png(patches[0]))
    response = connection.getresponse()
    body = response.read()
    connection.close()
    assert response.status in (400, 401, 403) and b"Token" in body
    with (
        TorchServeGrpcClient(server.grpc_inference_target) as anonymous,
        pytest.raises(Unauthenticated),
    ):
        anonymous.predict("cancer_detector", _png(patches[0]))
    server.management.token, token = "wrong", server.management.token
    try:
        with pytest.raises(Unauthenticated):
            server.models()
    finally:
        server.management.token = token


def test_unregister_stops_the_workers(
    server: TorchServe, model_and_mar: tuple[torch.nn.Module, Path]
) -> None:
    before = set(server.processes())
    server.unregister("cancer_detector")
    assert server.models() == []
    with pytest.raises(NotFound):
        server.describe("cancer_detector")
    # Register again (the worker count returns), for any test that runs later.
    server.register(model_and_mar[1], batch_size=BATCH_SIZE, max_batch_delay_ms=50)
    assert len(set(server.processes())) == len(before)


def test_two_instances_run_side_by_side_and_stop_cleanly(
    model_and_mar: tuple[torch.nn.Module, Path], tmp_path: Path, patches: list[np.ndarray]
) -> None:
    _, mar = model_and_mar
    store = tmp_path / "store"
    store.mkdir()
    shutil.copy(mar, store)
    config = TorchServeConfig.with_free_ports(store, tmp_path / "work", token_auth=False)
    instance = TorchServe(config).start()
    try:
        assert instance.keys is None
        assert "disable_token_authorization=true" in config.config_path.read_text()
        name = instance.register("cancer_detector.mar", model_name="second_detector")
        (output,) = instance.predict_rest(name, _png(patches[0]))
        assert set(output) >= {"probabilities", "label", "confidence", "discriminative"}
        pids = instance.processes()
        assert len(pids) >= 3  # launcher, Java frontend, one Python worker
    finally:
        instance.stop()
    assert instance.processes() == []
    alive = [pid for pid in pids if _alive(pid)]
    assert alive == [], f"processes left after stop: {alive}"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"
