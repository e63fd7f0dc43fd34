"""Client channels to histomarker services, with the same TLS and token settings.

Used by the CLI, the flows, the PredictionService (towards the other services) and
tests, so that every client sends the bearer token and request ids the same way.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import grpc

from services.common.errors import InvalidInput
from services.common.interceptors import REQUEST_ID_KEY


class _CallDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: Any
    compression: Any


class _MetadataInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds the bearer token and a request id to every call's metadata."""

    def __init__(self, token: str | None) -> None:
        self._token = token

    def _details(self, details: Any) -> _CallDetails:
        metadata = list(details.metadata or ())
        keys = {key for key, _ in metadata}
        if self._token is not None and "authorization" not in keys:
            metadata.append(("authorization", f"Bearer {self._token}"))
        if REQUEST_ID_KEY not in keys:
            metadata.append((REQUEST_ID_KEY, uuid.uuid4().hex[:16]))
        return _CallDetails(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(
        self, continuation: Callable[..., Any], details: Any, requests: Any
    ) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(
        self, continuation: Callable[..., Any], details: Any, requests: Any
    ) -> Any:
        return continuation(self._details(details), requests)


def open_channel(
    target: str,
    *,
    token: str | None = None,
    tls_ca_file: Path | str | None = None,
    tls_server_name: str | None = None,
    max_message_mb: int = 64,
) -> grpc.Channel:
    """Open a channel to ``target`` (``host:port``).

    Args:
        target: Server address, ``host:port``.
        token: Bearer token to send with every call, if the server wants one.
        tls_ca_file: PEM file of the CA that signed the server's certificate; TLS is
            used when given.
        tls_server_name: Name to check the server's certificate against, when it is not
            the host of ``target`` (e.g. ``localhost`` for 127.0.0.1).
        max_message_mb: Largest message sent or received, in mebibytes.

    Returns:
        A channel; close it when done.
    """
    if not target or ":" not in target:
        raise InvalidInput(f"gRPC target {target!r} is not of the form HOST:PORT")
    limit = max_message_mb * 1024 * 1024
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
    ]
    if tls_ca_file is not None:
        try:
            root = Path(tls_ca_file).read_bytes()
        except OSError as exc:
            raise InvalidInput(
                f"cannot read the TLS CA file {str(tls_ca_file)!r}: {exc.strerror}"
            ) from exc
        if tls_server_name:
            options.append(("grpc.ssl_target_name_override", tls_server_name))
        channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root), options=options)
    else:
        channel = grpc.insecure_channel(target, options=options)
    return grpc.intercept_channel(channel, _MetadataInterceptor(token))
