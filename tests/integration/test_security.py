"""Security of the stack, as tests: token auth and TLS on each of the four services,
no secret in any log line, loopback binding unless configured, and the compose
files' TorchServe token auth and MinIO credentials.

The services run for real on 127.0.0.1 (in this process, and one as its own process
whose log output is read whole).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from badinputs import he_rgb, png_bytes
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tls import self_signed

from services import cli
from services.analysis.server import AnalysisSettings
from services.analysis.server import create as create_analysis
from services.common.grpc_client import open_channel
from services.common.grpc_server import HistomarkerServer
from services.common.settings import ServiceSettings
from services.common.stubs.histomarker.v1 import (
    analysis_pb2,
    analysis_pb2_grpc,
    common_pb2,
    nuclei_pb2,
    nuclei_pb2_grpc,
    prediction_pb2,
    prediction_pb2_grpc,
    tiling_pb2,
    tiling_pb2_grpc,
)
from services.inference.torchserve import TorchServeConfig
from services.nuclei.server import NucleiSettings
from services.nuclei.server import create as create_nuclei
from services.prediction.server import PredictionSettings
from services.prediction.server import create as create_prediction
from services.tiling.server import TilingSettings
from services.tiling.server import create as create_tiling

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "tok-7f3c1e9a-never-in-a-log"
S3_SECRET = "s3-secret-4b8d2a6f-never-in-a-log"
TIMEOUT_S = 30.0
SETTINGS = {
    "tiling": TilingSettings,
    "nuclei": NucleiSettings,
    "analysis": AnalysisSettings,
    "prediction": PredictionSettings,
}
CREATE: dict[str, Callable[[Any], tuple[HistomarkerServer, int]]] = {
    "tiling": create_tiling,
    "nuclei": create_nuclei,
    "analysis": create_analysis,
    "prediction": create_prediction,
}
SERVICE_NAMES = {
    "tiling": "histomarker.v1.TilingService",
    "nuclei": "histomarker.v1.NucleiService",
    "analysis": "histomarker.v1.AnalysisService",
    "prediction": "histomarker.v1.PredictionService",
}


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return self_signed(tmp_path_factory.mktemp("tls"))


def _image() -> common_pb2.Image:
    return common_pb2.Image(data=png_bytes(he_rgb()), format=common_pb2.IMAGE_FORMAT_PNG)


def _authorized_call(service: str, channel: grpc.Channel) -> Any:
    """One call of ``service`` that passes auth; it may still be refused for its
    content (PredictSlide of a missing slide), which proves it reached the service."""
    if service == "tiling":
        stub: Any = tiling_pb2_grpc.TilingServiceStub(channel)
        request = tiling_pb2.NormalizePatchesRequest(images=[_image()])
        return list(stub.NormalizePatches(iter([request]), timeout=TIMEOUT_S))
    if service == "nuclei":
        stub = nuclei_pb2_grpc.NucleiServiceStub(channel)
        return stub.SegmentNuclei(
            nuclei_pb2.SegmentNucleiRequest(image=_image(), mpp=0.25, omit_labels=True),
            timeout=TIMEOUT_S,
        )
    if service == "analysis":
        stub = analysis_pb2_grpc.AnalysisServiceStub(channel)
        scores = analysis_pb2.PatchScores(slide_ids=["A", "B"], probabilities=[0.2, 0.8])
        return stub.AggregateSlides(
            analysis_pb2.AggregateSlidesRequest(scores=scores), timeout=TIMEOUT_S
        )
    stub = prediction_pb2_grpc.PredictionServiceStub(channel)
    slide = common_pb2.SlideRef(object=common_pb2.ObjectRef(key="slides/NOPE-1.svs"))
    return stub.PredictSlide(prediction_pb2.PredictSlideRequest(slide=slide), timeout=TIMEOUT_S)


def _error(function: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        function()
    return info.value


@pytest.fixture(params=list(SETTINGS))
def secured(
    request: pytest.FixtureRequest, tmp_path: Path, tls_files: tuple[Path, Path]
) -> Iterator[tuple[str, int, Path]]:
    """One service with a token and TLS, on 127.0.0.1; yields (name, port, CA file)."""
    service = str(request.param)
    cert_file, key_file = tls_files
    settings = SETTINGS[service](
        port=0,
        store_url=(tmp_path / "store").as_uri(),
        auth_token=TOKEN,
        tls_cert_file=cert_file,
        tls_key_file=key_file,
    )
    server, port = CREATE[service](settings)
    server.start()
    try:
        yield service, port, cert_file
    finally:
        server.stop(0).wait()


def _tls_channel(port: int, ca_file: Path, token: str | None) -> grpc.Channel:
    return open_channel(
        f"127.0.0.1:{port}", token=token, tls_ca_file=ca_file, tls_server_name="localhost"
    )


def test_token_and_tls_on_each_service(secured: tuple[str, int, Path]) -> None:
    service, port, ca_file = secured
    for token, reason in [(None, "missing"), ("wrong-" + TOKEN, "wrong bearer token")]:
        channel = _tls_channel(port, ca_file, token)
        try:
            error = _error(lambda: _authorized_call(service, channel))  # noqa: B023
        finally:
            channel.close()
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error.details()
        assert reason in error.details() and TOKEN not in error.details()

    channel = _tls_channel(port, ca_file, TOKEN)
    try:
        if service == "prediction":
            error = _error(lambda: _authorized_call(service, channel))
            assert error.code() == grpc.StatusCode.NOT_FOUND, error.details()
        else:
            assert _authorized_call(service, channel)
    finally:
        channel.close()

    # Health stays reachable without the token, so orchestrators can probe.
    channel = _tls_channel(port, ca_file, None)
    try:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", SERVICE_NAMES[service]):
            answer = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=TIMEOUT_S)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        channel.close()

    # Plaintext gets nowhere, not even the health check.
    plain = open_channel(f"127.0.0.1:{port}", token=TOKEN)
    try:
        error = _error(
            lambda: health_pb2_grpc.HealthStub(plain).Check(
                health_pb2.HealthCheckRequest(), timeout=3
            )
        )
        assert error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    finally:
        plain.close()


def test_the_predict_command_sends_the_token_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = PredictionSettings(port=0, store_url=(tmp_path / "store").as_uri(), auth_token=TOKEN)
    server, port = create_prediction(settings)
    server.start()
    argv = ["predict", "slides/NOPE-1.svs", "--stored", "--json", "--target", f"127.0.0.1:{port}"]
    try:
        monkeypatch.delenv("HISTOMARKER_AUTH_TOKEN", raising=False)
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert "missing 'authorization: Bearer'" in err and len(err.strip().splitlines()) == 1
        monkeypatch.setenv("HISTOMARKER_AUTH_TOKEN", TOKEN)
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert "NOPE-1.svs" in err and TOKEN not in err  # past auth: the slide is missing
    finally:
        server.stop(0).wait()


# -- logs and the bound address of a service run as its own process -------------------


def _listening_sockets(port: int) -> set[str]:
    """Local IPv4/IPv6 addresses with a listening TCP socket on ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            address, hex_port = fields[1].split(":")
            if int(hex_port, 16) != port or fields[3] != "0A":  # 0A: LISTEN
                continue
            # The kernel prints each 32-bit word of the address in host (little) order.
            raw = b"".join(
                bytes.fromhex(address[i : i + 8])[::-1] for i in range(0, len(address), 8)
            )
            ip = ipaddress.ip_address(raw)
            mapped = getattr(ip, "ipv4_mapped", None)  # gRPC listens on ::ffff:127.0.0.1
            found.add(str(mapped or ip))
    return found


def _wait_for_listening(process: subprocess.Popen[str], lines: list[str]) -> int:
    deadline = time.monotonic() + 60
    assert process.stderr is not None
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        lines.append(line)
        if '"listening"' in line:
            return int(json.loads(line)["port"])
    raise AssertionError("the service did not start:\n" + "".join(lines))


def test_a_service_process_keeps_secrets_out_of_its_logs_and_binds_loopback(
    tmp_path: Path,
    s3_endpoint: str,
    s3_credentials: dict[str, str],
    tls_files: tuple[Path, Path],
) -> None:
    bucket = "security-logs"  # the service creates it
    cert_file, key_file = tls_files
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("HISTOMARKER_", "AWS_"))
    }
    env.update(
        {
            "HISTOMARKER_PORT": "0",
            "HISTOMARKER_STORE_URL": f"s3://{s3_endpoint}/{bucket}",
            "HISTOMARKER_S3_ACCESS_KEY": s3_credentials["access_key"],
            "HISTOMARKER_S3_SECRET_KEY": S3_SECRET,
            "HISTOMARKER_AUTH_TOKEN": TOKEN,
            "HISTOMARKER_TLS_CERT_FILE": str(cert_file),
            "HISTOMARKER_TLS_KEY_FILE": str(key_file),
            "HISTOMARKER_LOG_LEVEL": "DEBUG",
        }
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "services.nuclei.server"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    try:
        port = _wait_for_listening(process, lines)
        # HISTOMARKER_HOST unset: loopback only, on no other interface.
        assert _listening_sockets(port) == {"127.0.0.1"}
        target = f"127.0.0.1:{port}"

        def channel(token: str | None) -> grpc.Channel:
            return open_channel(
                target, token=token, tls_ca_file=cert_file, tls_server_name="localhost"
            )

        stubs = {t: nuclei_pb2_grpc.NucleiServiceStub(channel(t)) for t in (None, "x", TOKEN)}
        shards = nuclei_pb2.ExtractFeaturesForShardsRequest(
            shards=[common_pb2.ObjectRef(key="tiles/NOPE-1/0123456789abcdef/s.tar")],
            output=common_pb2.ObjectRef(key="runs/security/features.parquet"),
        )
        calls: list[tuple[Any, grpc.StatusCode | None]] = [
            (lambda: stubs[None].SegmentNuclei(nuclei_pb2.SegmentNucleiRequest()), "U"),
            (lambda: stubs["x"].SegmentNuclei(nuclei_pb2.SegmentNucleiRequest()), "U"),
            (
                lambda: stubs[TOKEN].SegmentNuclei(
                    nuclei_pb2.SegmentNucleiRequest(image=_image(), mpp=0.25)
                ),
                None,
            ),
            (lambda: list(stubs[TOKEN].ExtractFeaturesForShards(shards)), "N"),
            (
                lambda: stubs[TOKEN].SegmentNuclei(
                    nuclei_pb2.SegmentNucleiRequest(image=common_pb2.Image(data=b"junk"))
                ),
                "I",
            ),
        ]
        expected = {
            "U": grpc.StatusCode.UNAUTHENTICATED,
            "N": grpc.StatusCode.NOT_FOUND,
            "I": grpc.StatusCode.INVALID_ARGUMENT,
        }
        for call, outcome in calls:
            if outcome is None:
                call()
            else:
                assert _error(call).code() == expected[outcome]
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            out, err = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
    text = "".join(lines) + err + out
    records = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    messages = [record["msg"] for record in records]
    # The log holds what happened: the refusals, the calls and their codes.
    assert "unauthenticated call" in messages and "rpc done" in messages
    assert any(record.get("code") == "NOT_FOUND" for record in records)
    for secret in (TOKEN, S3_SECRET):
        assert secret not in text
        assert secret[:12] not in text  # not even a prefix


# -- defaults --------------------------------------------------------------------------


@pytest.mark.parametrize("settings_class", [ServiceSettings, *SETTINGS.values()])
def test_services_bind_loopback_unless_configured(
    settings_class: type[ServiceSettings], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HISTOMARKER_HOST", raising=False)
    assert settings_class().host == "127.0.0.1"
    monkeypatch.setenv("HISTOMARKER_HOST", "0.0.0.0")
    assert settings_class().host == "0.0.0.0"


def test_dependencies_default_to_loopback_and_torchserve_to_token_auth(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in list(os.environ):
        if name.startswith("HISTOMARKER_"):
            monkeypatch.delenv(name)
    settings = PredictionSettings()
    assert settings.torchserve_grpc_target.startswith("127.0.0.1:")
    assert settings.torchserve_management_url.startswith("http://127.0.0.1:")
    torchserve = TorchServeConfig(tmp_path / "models", tmp_path / "work")
    assert torchserve.host == "127.0.0.1" and torchserve.token_auth


# -- compose ---------------------------------------------------------------------------

COMPOSE_FILES = sorted(
    [*ROOT.glob("docker-compose*.yml"), *ROOT.glob("deploy/docker-compose*.yml")]
)
REQUIRED = re.compile(r"^\$\{([A-Z0-9_]+):\?[^}]+\}$")
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|ROOT_USER")


def _compose(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict) and "services" in data, path
    return data


def _words(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return value.split()
    return [str(word) for word in value]


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(key): str(value) for key, value in env.items()}


def test_compose_files_are_found() -> None:
    names = {path.relative_to(ROOT).as_posix() for path in COMPOSE_FILES}
    assert {
        "docker-compose.yml",
        "docker-compose.gpu.yml",
        "deploy/docker-compose.tls.yml",
    } <= names


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_keeps_torchserve_token_auth_on(path: Path) -> None:
    for name, service in _compose(path)["services"].items():
        words = _words(service.get("command")) + _words(service.get("entrypoint"))
        assert "--disable-token-auth" not in words, name
        for key, value in _environment(service).items():
            if "DISABLE_TOKEN" in key.upper():
                assert value.lower() == "false", f"{name}: {key}={value}"
    properties = (ROOT / "deploy" / "torchserve.properties").read_text()
    assert re.search(r"^disable_token_authorization=false$", properties, re.M)
    assert "--disable-token-auth" not in (ROOT / "deploy" / "torchserve.Dockerfile").read_text()


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_secrets_are_required_from_the_environment(path: Path) -> None:
    for name, service in _compose(path)["services"].items():
        for key, value in _environment(service).items():
            if SECRET_NAME.search(key):
                assert REQUIRED.match(value), f"{name}: {key} must be ${{VAR:?message}}"
    assert "minioadmin" not in path.read_text().lower()


def test_minio_requires_credentials_from_env_with_no_default() -> None:
    minio = _compose(ROOT / "docker-compose.yml")["services"]["minio"]
    env = _environment(minio)
    for key in ("MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"):
        match = REQUIRED.match(env[key])
        assert match and match.group(1) == key, env[key]
    example = (ROOT / ".env.example").read_text()
    assert "minioadmin" not in example.lower()
    for line in example.splitlines():
        key, _, value = line.partition("=")
        if not line.startswith("#") and SECRET_NAME.search(key):
            assert value.startswith("CHANGE-ME"), line


def test_minio_init_refuses_placeholder_credentials(tmp_path: Path) -> None:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "MINIO_ROOT_USER": "histomarker-root",
        "MINIO_ROOT_PASSWORD": "CHANGE-ME-at-least-8-chars",
        "HISTOMARKER_S3_ACCESS_KEY": "histomarker",
        "HISTOMARKER_S3_SECRET_KEY": "a-real-secret-1234",
    }
    done = subprocess.run(
        ["sh", str(ROOT / "deploy" / "minio-init.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode != 0
    assert "CHANGE-ME" in done.stderr and "MINIO_ROOT_PASSWORD" in done.stderr


def test_services_refuse_placeholder_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HISTOMARKER_AUTH_TOKEN", "CHANGE-ME")
    with pytest.raises(ValueError, match="CHANGE-ME"):
        NucleiSettings()
    monkeypatch.setenv("HISTOMARKER_AUTH_TOKEN", TOKEN)
    monkeypatch.setenv("HISTOMARKER_S3_SECRET_KEY", "CHANGE-ME-at-least-8-chars")
    with pytest.raises(ValueError, match="CHANGE-ME"):
        NucleiSettings()


def test_dot_env_is_never_committed() -> None:
    done = subprocess.run(
        ["git", "check-ignore", "-q", ".env"], cwd=ROOT, capture_output=True, check=False
    )
    assert done.returncode == 0, ".env must be git-ignored"
