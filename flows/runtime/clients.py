"""Clients of the services the flows drive, built from :class:`FlowSettings`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import grpc

from flows.runtime.settings import FlowSettings
from services.common import errors
from services.common.grpc_client import open_channel
from services.common.stubs.histomarker.v1 import (
    analysis_pb2_grpc,
    nuclei_pb2_grpc,
    tiling_pb2_grpc,
)
from services.inference.torchserve import RestClient, TorchServeGrpcClient

#: Typed errors by the gRPC status name they map to.
_ERRORS: dict[str, type[errors.HistomarkerError]] = {
    kind.status_name: kind
    for kind in vars(errors).values()
    if isinstance(kind, type) and issubclass(kind, errors.HistomarkerError)
}


@contextmanager
def service_errors(service: str) -> Iterator[None]:
    """Turn a failed gRPC call into the typed error of its status code.

    A task's error is stored with its state; gRPC's call objects cannot be, and a
    typed error says the same (and :func:`flows.runtime.policy.is_retryable` reads it).
    """
    try:
        yield
    except grpc.RpcError as exc:
        code = exc.code() if callable(getattr(exc, "code", None)) else None
        name = getattr(code, "name", "UNKNOWN")
        details = exc.details() if callable(getattr(exc, "details", None)) else str(exc)
        kind = _ERRORS.get(name, errors.HistomarkerError)
        raise kind(f"{service} answered {name}: {details}") from None


@contextmanager
def _stub(settings: FlowSettings, target: str, stub_class: Any) -> Iterator[Any]:
    """A service stub over a channel (the flows' token and message limit) closed on exit."""
    channel = open_channel(
        target, token=settings.secret("auth_token"), max_message_mb=settings.max_message_mb
    )
    try:
        yield stub_class(channel)
    finally:
        channel.close()


def tiling_stub(settings: FlowSettings) -> Any:
    """A TilingService stub over a channel closed on exit (a context manager)."""
    return _stub(settings, settings.tiling_target, tiling_pb2_grpc.TilingServiceStub)


def nuclei_stub(settings: FlowSettings) -> Any:
    """A NucleiService stub over a channel closed on exit (a context manager)."""
    return _stub(settings, settings.nuclei_target, nuclei_pb2_grpc.NucleiServiceStub)


def analysis_stub(settings: FlowSettings) -> Any:
    """An AnalysisService stub over a channel closed on exit (a context manager)."""
    return _stub(settings, settings.analysis_target, analysis_pb2_grpc.AnalysisServiceStub)


def torchserve_management(settings: FlowSettings) -> RestClient:
    """TorchServe's management API, with its key."""
    return settings.management_client()


def torchserve_inference(settings: FlowSettings) -> TorchServeGrpcClient:
    """TorchServe's gRPC inference API, with its key (a context manager)."""
    return TorchServeGrpcClient(
        settings.torchserve_grpc_target, settings.secret("torchserve_inference_token")
    )
