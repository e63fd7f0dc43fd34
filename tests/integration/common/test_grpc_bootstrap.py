"""The shared gRPC bootstrap over real channels on 127.0.0.1.

A small probe service (its messages borrowed from grpc.health.v1 so no extra proto is
needed) exercises the interceptors: typed errors, hidden tracebacks, malformed
requests, deadlines, streaming, auth and TLS.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tls import self_signed

from services.common.cancellation import WorkBudget
from services.common.errors import InvalidInput, NotFound, Unavailable
from services.common.grpc_client import open_channel
from services.common.grpc_server import ServiceBinding, create_server
from services.common.settings import ServiceSettings

PROBE = "histomarker.test.Probe"
Req = health_pb2.HealthCheckRequest
Resp = health_pb2.HealthCheckResponse


class ProbeServicer:
    """Answers by the request's ``service`` field, which names the behaviour."""

    def __init__(self) -> None:
        self.stopped_by_deadline = threading.Event()

    def Call(self, request: Req, context: grpc.ServicerContext) -> Resp:
        what = request.service
        if what == "ok":
            return Resp(status=Resp.SERVING)
        if what == "bad":
            raise InvalidInput("tile size must be positive, got -3 px")
        if what == "missing":
            raise NotFound("no object 'slides/x.svs' in bucket 'histomarker'")
        if what == "down":
            raise Unavailable("TorchServe at 127.0.0.1:7070 is not answering")
        if what == "crash":
            raise RuntimeError("secret-internal-detail /etc/passwd")
        if what == "slow":
            budget = WorkBudget(
                timeout_s=context.time_remaining(), is_cancelled=lambda: not context.is_active()
            )
            try:
                for _ in range(200):
                    budget.check()
                    time.sleep(0.05)
            except Exception:
                self.stopped_by_deadline.set()
                raise
            return Resp(status=Resp.SERVING)
        raise InvalidInput(f"unknown probe behaviour {what!r}")

    def Stream(self, request: Req, context: grpc.ServicerContext) -> Iterator[Resp]:
        for _ in range(3):
            yield Resp(status=Resp.SERVING)
        if request.service == "bad":
            raise InvalidInput("stopped after three: bad input discovered late")

    def Upload(self, requests: Iterator[Req], context: grpc.ServicerContext) -> Resp:
        count = sum(1 for _ in requests)
        return Resp(status=Resp.SERVING if count else Resp.NOT_SERVING)


def _probe_binding(servicer: ProbeServicer) -> ServiceBinding:
    def add(servicer: ProbeServicer, server: grpc.Server) -> None:
        handlers = {
            "Call": grpc.unary_unary_rpc_method_handler(
                servicer.Call, Req.FromString, Resp.SerializeToString
            ),
            "Stream": grpc.unary_stream_rpc_method_handler(
                servicer.Stream, Req.FromString, Resp.SerializeToString
            ),
            "Upload": grpc.stream_unary_rpc_method_handler(
                servicer.Upload, Req.FromString, Resp.SerializeToString
            ),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(PROBE, handlers),))

    return ServiceBinding(PROBE, servicer, add)


class Probe:
    """Client side of the probe service."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.call = channel.unary_unary(f"/{PROBE}/Call", Req.SerializeToString, Resp.FromString)
        self.stream = channel.unary_stream(
            f"/{PROBE}/Stream", Req.SerializeToString, Resp.FromString
        )
        self.upload = channel.stream_unary(
            f"/{PROBE}/Upload", Req.SerializeToString, Resp.FromString
        )
        self.raw_call = channel.unary_unary(f"/{PROBE}/Call", None, Resp.FromString)


@pytest.fixture()
def probe_server() -> Iterator[tuple[int, ProbeServicer]]:
    servicer = ProbeServicer()
    server, port = create_server(ServiceSettings(port=0), [_probe_binding(servicer)])
    server.start()
    try:
        yield port, servicer
    finally:
        server.stop(0).wait()


@pytest.fixture()
def probe(probe_server: tuple[int, ProbeServicer]) -> Iterator[Probe]:
    channel = open_channel(f"127.0.0.1:{probe_server[0]}")
    try:
        yield Probe(channel)
    finally:
        channel.close()


def _code_and_details(call, *args, **kwargs) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        result = call(*args, **kwargs)
        if isinstance(result, Iterator):
            list(result)
    return info.value.code(), info.value.details()


def test_typed_errors_map_to_status_codes_and_server_keeps_serving(probe: Probe) -> None:
    assert _code_and_details(probe.call, Req(service="bad")) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "tile size must be positive, got -3 px",
    )
    code, details = _code_and_details(probe.call, Req(service="missing"))
    assert code == grpc.StatusCode.NOT_FOUND and "slides/x.svs" in details
    code, _ = _code_and_details(probe.call, Req(service="down"))
    assert code == grpc.StatusCode.UNAVAILABLE
    assert probe.call(Req(service="ok")).status == Resp.SERVING


def test_unexpected_errors_are_internal_without_traceback(
    probe: Probe, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR):
        code, details = _code_and_details(probe.call, Req(service="crash"))
    assert code == grpc.StatusCode.INTERNAL
    assert "secret-internal-detail" not in details and "Traceback" not in details
    assert "request id" in details
    # The server logged what happened, with the traceback.
    logged = [
        r for r in caplog.records if r.exc_info and "secret-internal-detail" in str(r.exc_info[1])
    ]
    assert logged
    assert probe.call(Req(service="ok")).status == Resp.SERVING


def test_malformed_request_bytes_are_invalid_argument(probe: Probe) -> None:
    code, details = _code_and_details(probe.raw_call, b"\xff\xff\xff\xff\x0f")
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("malformed request message")
    assert probe.call(Req(service="ok")).status == Resp.SERVING


def test_streaming_error_after_some_messages(probe: Probe) -> None:
    received = []
    with pytest.raises(grpc.RpcError) as info:
        for message in probe.stream(Req(service="bad")):
            received.append(message)
    assert len(received) == 3
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "discovered late" in info.value.details()
    assert len(list(probe.stream(Req(service="ok")))) == 3


def test_client_streaming_call(probe: Probe) -> None:
    assert probe.upload(iter([Req(service="a"), Req(service="b")])).status == Resp.SERVING


def test_deadline_stops_the_work(probe: Probe, probe_server: tuple[int, ProbeServicer]) -> None:
    started = time.monotonic()
    code, _ = _code_and_details(probe.call, Req(service="slow"), timeout=0.3)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 5
    # The handler noticed the deadline and stopped, rather than running 10 s on.
    assert probe_server[1].stopped_by_deadline.wait(timeout=5)


def test_message_size_limit_is_enforced() -> None:
    servicer = ProbeServicer()
    server, port = create_server(
        ServiceSettings(port=0, max_message_mb=1), [_probe_binding(servicer)]
    )
    server.start()
    channel = open_channel(f"127.0.0.1:{port}", max_message_mb=8)
    try:
        code, _ = _code_and_details(Probe(channel).call, Req(service="x" * (2 * 1024 * 1024)))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert Probe(channel).call(Req(service="ok")).status == Resp.SERVING
    finally:
        channel.close()
        server.stop(0).wait()


def test_bearer_token_auth() -> None:
    servicer = ProbeServicer()
    settings = ServiceSettings(port=0, auth_token="s3cret-token-for-tests")
    server, port = create_server(settings, [_probe_binding(servicer)])
    server.start()
    target = f"127.0.0.1:{port}"
    try:
        for token, expected in [(None, "missing"), ("wrong", "wrong bearer token")]:
            channel = open_channel(target, token=token)
            code, details = _code_and_details(Probe(channel).call, Req(service="ok"))
            channel.close()
            assert code == grpc.StatusCode.UNAUTHENTICATED
            assert expected in details
            assert "s3cret" not in details
        channel = open_channel(target, token="s3cret-token-for-tests")
        assert Probe(channel).call(Req(service="ok")).status == Resp.SERVING
        channel.close()
        # Health checks stay open so that orchestrators can probe without the secret.
        channel = open_channel(target)
        health = health_pb2_grpc.HealthStub(channel).Check(Req(service=""))
        assert health.status == Resp.SERVING
        channel.close()
    finally:
        server.stop(0).wait()


def test_tls(tmp_path: Path) -> None:
    cert_file, key_file = self_signed(tmp_path)
    settings = ServiceSettings(port=0, tls_cert_file=cert_file, tls_key_file=key_file)
    servicer = ProbeServicer()
    server, port = create_server(settings, [_probe_binding(servicer)])
    server.start()
    try:
        channel = open_channel(
            f"127.0.0.1:{port}", tls_ca_file=cert_file, tls_server_name="localhost"
        )
        assert Probe(channel).call(Req(service="ok"), timeout=10).status == Resp.SERVING
        channel.close()
        # A plaintext client cannot talk to a TLS server.
        plain = open_channel(f"127.0.0.1:{port}")
        code, _ = _code_and_details(Probe(plain).call, Req(service="ok"), timeout=2)
        plain.close()
        assert code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    finally:
        server.stop(0).wait()


def test_unreadable_tls_files_are_a_clear_error(tmp_path: Path) -> None:
    settings = ServiceSettings(
        port=0, tls_cert_file=tmp_path / "nope.crt", tls_key_file=tmp_path / "nope.key"
    )
    with pytest.raises(InvalidInput, match="nope"):
        create_server(settings, [])


def test_port_in_use_is_a_clear_error(probe_server: tuple[int, ProbeServicer]) -> None:
    with pytest.raises(InvalidInput, match="cannot listen"):
        create_server(ServiceSettings(port=probe_server[0]), [])
