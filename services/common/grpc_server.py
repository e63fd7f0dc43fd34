"""The gRPC bootstrap every histomarker service uses.

``create_server(settings, bindings)`` builds a server with health checking
(grpc.health.v1), server reflection, the interceptors of ``interceptors.py``
(request ids, optional bearer-token auth, typed-error mapping), message size limits,
a bound on concurrent RPCs and optional TLS, bound to ``settings.host:settings.port``
(port 0 picks a free one). ``serve`` runs it until SIGTERM/SIGINT and shuts down
gracefully: health turns NOT_SERVING first, in-flight calls get a grace period.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass
from types import FrameType
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common.errors import InvalidInput
from services.common.interceptors import (
    AuthInterceptor,
    ErrorMappingInterceptor,
    RequestContextInterceptor,
)
from services.common.logs import configure_logging
from services.common.settings import ServiceSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServiceBinding:
    """One gRPC service to host: its full name, implementation and registrar.

    Attributes:
        name: Fully qualified service name, e.g. ``histomarker.v1.TilingService``.
        servicer: The object implementing the service's RPCs.
        add_to_server: The generated ``add_XxxServicer_to_server`` function.
    """

    name: str
    servicer: Any
    add_to_server: Callable[[Any, grpc.Server], None]


class HistomarkerServer:
    """A started-or-not gRPC server together with its health servicer.

    Behaves like ``grpc.Server`` for ``start``, ``stop`` and ``wait_for_termination``
    and adds ``shutdown`` (health NOT_SERVING, then a graceful stop).
    """

    def __init__(
        self, server: grpc.Server, health_servicer: health.HealthServicer, port: int
    ) -> None:
        self.grpc_server = server
        self.health = health_servicer
        self.port = port

    def start(self) -> None:
        """Start serving."""
        self.grpc_server.start()

    def stop(self, grace_s: float | None = None) -> threading.Event:
        """Stop the server; calls in flight get ``grace_s`` seconds to finish."""
        return self.grpc_server.stop(grace_s)

    def shutdown(self, grace_s: float | None = None) -> None:
        """Report NOT_SERVING to health checks, then stop and wait for the stop."""
        self.health.enter_graceful_shutdown()
        self.grpc_server.stop(grace_s).wait()

    def wait_for_termination(self, timeout_s: float | None = None) -> bool:
        """Block until the server stops; True if it did within ``timeout_s``."""
        return not self.grpc_server.wait_for_termination(timeout_s)


def _read_pem(path: Any, what: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise InvalidInput(
            f"cannot read the TLS {what} file {str(path)!r}: {exc.strerror}"
        ) from exc


def create_server(
    settings: ServiceSettings, bindings: Sequence[ServiceBinding]
) -> tuple[HistomarkerServer, int]:
    """Build a gRPC server for ``bindings``, bound but not started.

    Args:
        settings: Address, limits, TLS and auth settings.
        bindings: The services to host.

    Returns:
        The server and the TCP port it is bound to.

    Raises:
        InvalidInput: The address cannot be bound or the TLS files cannot be read.
    """
    interceptors: list[grpc.ServerInterceptor] = [RequestContextInterceptor()]
    if settings.auth_token is not None:
        interceptors.append(AuthInterceptor(settings.auth_token.get_secret_value()))
    interceptors.append(ErrorMappingInterceptor())
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.server(
        futures.ThreadPoolExecutor(
            max_workers=settings.max_workers, thread_name_prefix=settings.service_name
        ),
        interceptors=interceptors,
        options=options,
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
    )

    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for binding in bindings:
        binding.add_to_server(binding.servicer, server)
        health_servicer.set(binding.name, health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)

    service_names = [binding.name for binding in bindings]
    service_names += [health.SERVICE_NAME, reflection.SERVICE_NAME]
    reflection.enable_server_reflection(service_names, server)

    address = f"{settings.host}:{settings.port}"
    try:
        if settings.tls_enabled:
            key = _read_pem(settings.tls_key_file, "key")
            cert = _read_pem(settings.tls_cert_file, "certificate")
            credentials = grpc.ssl_server_credentials([(key, cert)])
            port = server.add_secure_port(address, credentials)
        else:
            port = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise InvalidInput(f"cannot listen on {address}: {exc}") from exc
    if port == 0:
        raise InvalidInput(f"cannot listen on {address}: the address is in use or invalid")
    return HistomarkerServer(server, health_servicer, port), port


def serve(settings: ServiceSettings, bindings: Sequence[ServiceBinding]) -> None:
    """Run the services until SIGTERM or SIGINT, then shut down gracefully.

    Writes one JSON log line ``listening`` with the bound port, which process
    supervisors (``histomarker up``, tests) read to learn the port.
    """
    configure_logging(settings.service_name, settings.log_level)
    server, port = create_server(settings, bindings)
    stopping = threading.Event()

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        if stopping.is_set():
            return
        stopping.set()
        log.info("shutting down", extra={"signal": signal.Signals(signum).name})
        # Stop from another thread: the signal handler must return promptly.
        threading.Thread(
            target=server.shutdown, args=(settings.shutdown_grace_s,), daemon=True
        ).start()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    server.start()
    log.info(
        "listening",
        extra={
            "host": settings.host,
            "port": port,
            "tls": settings.tls_enabled,
            "auth": settings.auth_token is not None,
            "services": [binding.name for binding in bindings],
        },
    )
    server.wait_for_termination()
    log.info("stopped")
