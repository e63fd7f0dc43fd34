"""The four histomarker gRPC services, started for real on 127.0.0.1."""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import grpc
import pytest
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from services.common.grpc_client import open_channel
from services.common.settings import ServiceSettings
from services.common.stubs.histomarker.v1 import (
    common_pb2,
    prediction_pb2,
    prediction_pb2_grpc,
    tiling_pb2,
    tiling_pb2_grpc,
)

SERVICES = ["tiling", "nuclei", "analysis", "prediction"]
EXPECTED_RPCS = {
    "tiling": {"GetSlideInfo", "SegmentTissue", "TileSlide", "NormalizePatches"},
    "nuclei": {"SegmentNuclei", "ExtractFeatures", "ExtractFeaturesForShards"},
    "analysis": {"ComputeMetrics", "RunFeatureAblation", "CompareGroups", "BuildReport"},
    "prediction": {"PredictSlide", "UploadAndPredict", "PredictSlideStream", "ListModels"},
}
SERVING = health_pb2.HealthCheckResponse.SERVING


def _server_module(name: str) -> ModuleType:
    return importlib.import_module(f"services.{name}.server")


@pytest.fixture(params=SERVICES)
def running(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[ModuleType, grpc.Channel]]:
    module = _server_module(request.param)
    settings = ServiceSettings(service_name=request.param, port=0, store_url=tmp_path.as_uri())
    server, port = module.create(settings)
    server.start()
    channel = open_channel(f"127.0.0.1:{port}")
    try:
        yield module, channel
    finally:
        channel.close()
        server.stop(0).wait()


def test_health_reports_serving_per_service(running: tuple[ModuleType, grpc.Channel]) -> None:
    module, channel = running
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", module.SERVICE_NAME):
        reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
        assert reply.status == SERVING
    with pytest.raises(grpc.RpcError) as info:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_describes_the_service(running: tuple[ModuleType, grpc.Channel]) -> None:
    module, channel = running
    database = ProtoReflectionDescriptorDatabase(channel)
    services = set(database.get_services())
    assert module.SERVICE_NAME in services
    assert "grpc.health.v1.Health" in services
    # A client with no stubs can rebuild the whole contract from reflection alone.
    pool = descriptor_pool.DescriptorPool(database)
    described = pool.FindServiceByName(module.SERVICE_NAME)
    name = module.SERVICE_NAME.split(".")[-1].removesuffix("Service").lower()
    assert EXPECTED_RPCS[name] <= {method.name for method in described.methods}
    method = described.methods_by_name[sorted(EXPECTED_RPCS[name])[0]]
    assert method.input_type.full_name.startswith("histomarker.v1.")


def _slide_info(stub: tiling_pb2_grpc.TilingServiceStub, key: str) -> grpc.RpcError:
    request = tiling_pb2.GetSlideInfoRequest(
        slide=common_pb2.SlideRef(slide_id="s1", object=common_pb2.ObjectRef(key=key))
    )
    with pytest.raises(grpc.RpcError) as info:
        stub.GetSlideInfo(request, timeout=5)
    return info.value


def test_bad_request_is_invalid_argument_and_server_keeps_serving(tmp_path: Path) -> None:
    settings = ServiceSettings(port=0, store_url=tmp_path.as_uri())
    server, port = _server_module("tiling").create(settings)
    server.start()
    channel = open_channel(f"127.0.0.1:{port}")
    try:
        stub = tiling_pb2_grpc.TilingServiceStub(channel)
        for bad_key, reason in [
            ("../../etc/passwd", "'..'"),
            ("/etc/passwd", "relative"),
            ("slides/a\x00b.svs", "control"),
        ]:
            error = _slide_info(stub, bad_key)
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, bad_key
            details = error.details()
            assert details.startswith("slide.object:"), details
            assert reason in details, details
        # Still serving: health is fine and a well-formed request reaches the RPC.
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == SERVING
        error = _slide_info(stub, "slides/s1.svs")
        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert "slides/s1.svs" in error.details()
        # A request without its required slide is refused with the reason.
        with pytest.raises(grpc.RpcError) as info:
            stub.SegmentTissue(tiling_pb2.SegmentTissueRequest(), timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "slide" in info.value.details()
    finally:
        channel.close()
        server.stop(0).wait()


def test_bad_bucket_and_streaming_rpcs() -> None:
    server, port = _server_module("prediction").create(ServiceSettings(port=0))
    server.start()
    channel = open_channel(f"127.0.0.1:{port}")
    try:
        stub = prediction_pb2_grpc.PredictionServiceStub(channel)
        request = prediction_pb2.PredictSlideStreamRequest(
            slide=common_pb2.SlideRef(
                object=common_pb2.ObjectRef(bucket="Bad_Bucket", key="slides/a.svs")
            )
        )
        with pytest.raises(grpc.RpcError) as info:
            list(stub.PredictSlideStream(request, timeout=5))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "Bad_Bucket" in info.value.details()
        chunks = iter([prediction_pb2.UploadAndPredictRequest(chunk=b"abc")])
        with pytest.raises(grpc.RpcError) as info:
            stub.UploadAndPredict(chunks, timeout=5)
        # An upload must start with its metadata: a bare chunk is bad input.
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        channel.close()
        server.stop(0).wait()


def _read_listening_port(process: subprocess.Popen[str], timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    assert process.stderr is not None
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            if process.poll() is not None:
                break
            continue
        entry = json.loads(line)
        if entry.get("msg") == "listening":
            return int(entry["port"])
    raise AssertionError("the server never logged that it was listening")


def test_serve_command_shuts_down_gracefully_on_sigterm(tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("histomarker")
    env = dict(os.environ, HISTOMARKER_PORT="0", HISTOMARKER_STORE_URL=tmp_path.as_uri())
    process = subprocess.Popen(
        [str(exe), "serve", "nuclei"], stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        port = _read_listening_port(process, timeout_s=60)
        channel = open_channel(f"127.0.0.1:{port}")
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == SERVING
        channel.close()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        rest = process.stderr.read() if process.stderr else ""
        messages = [json.loads(line)["msg"] for line in rest.splitlines() if line.strip()]
        assert "shutting down" in messages and messages[-1] == "stopped"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
