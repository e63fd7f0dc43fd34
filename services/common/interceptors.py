"""Server interceptors shared by every histomarker gRPC service.

- ``RequestContextInterceptor``: gives each call a request id (the client's
  ``x-request-id`` metadata or a new one) and tags the call's log lines with it.
- ``AuthInterceptor``: requires ``authorization: Bearer <token>``; health checks are
  exempt so that orchestrators can probe without the secret.
- ``ErrorMappingInterceptor``: refuses unparsable requests and bad object references
  (INVALID_ARGUMENT) before the RPC runs, and turns the typed exceptions of
  ``services.common.errors`` into gRPC status codes with their readable message;
  anything else becomes INTERNAL with the traceback logged on the server and only the
  request id sent to the client.
"""

from __future__ import annotations

import hmac
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from google.protobuf.message import Message

from services.common.errors import HistomarkerError, InvalidInput
from services.common.logs import current_request_id, log_context
from services.common.refs import validate_refs

log = logging.getLogger(__name__)

REQUEST_ID_KEY = "x-request-id"
_HEALTH_PREFIX = "/grpc.health.v1.Health/"
_MAX_REQUEST_ID_CHARS = 64

Behavior = Callable[[Any, grpc.ServicerContext], Any]


def _rebuild(
    handler: grpc.RpcMethodHandler,
    wrap: Callable[[Behavior, bool], Behavior],
    deserializer: Callable[[bytes], Any] | None = None,
) -> Any:
    """A copy of ``handler`` whose behaviour is ``wrap(behaviour, response_streaming)``.

    ``deserializer``, when given, replaces the handler's request deserializer.
    """
    if handler.request_streaming and handler.response_streaming:
        factory, behavior = grpc.stream_stream_rpc_method_handler, handler.stream_stream
    elif handler.request_streaming:
        factory, behavior = grpc.stream_unary_rpc_method_handler, handler.stream_unary
    elif handler.response_streaming:
        factory, behavior = grpc.unary_stream_rpc_method_handler, handler.unary_stream
    else:
        factory, behavior = grpc.unary_unary_rpc_method_handler, handler.unary_unary
    return factory(
        wrap(behavior, handler.response_streaming),
        request_deserializer=deserializer or handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _metadata_value(details: grpc.HandlerCallDetails, key: str) -> str | None:
    for item_key, value in details.invocation_metadata or ():
        if item_key == key:
            return value if isinstance(value, str) else value.decode("utf-8", "replace")
    return None


def _clean_request_id(raw: str | None) -> str:
    """The client's request id if it is short and printable, else a new one."""
    if raw and len(raw) <= _MAX_REQUEST_ID_CHARS and raw.isprintable() and raw.isascii():
        return raw
    return uuid.uuid4().hex[:16]


class RequestContextInterceptor(grpc.ServerInterceptor):
    """Tags every call with a request id and logs its outcome and duration."""

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Any], details: Any
    ) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        request_id = _clean_request_id(_metadata_value(details, REQUEST_ID_KEY))
        method = details.method

        def wrap(behavior: Behavior, streaming: bool) -> Behavior:
            if streaming:

                def stream_call(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                    started = time.perf_counter()
                    with log_context(request_id=request_id):
                        try:
                            yield from behavior(request, context)
                        finally:
                            _log_done(method, context, started)

                return stream_call

            def unary_call(request: Any, context: grpc.ServicerContext) -> Any:
                started = time.perf_counter()
                with log_context(request_id=request_id):
                    try:
                        return behavior(request, context)
                    finally:
                        _log_done(method, context, started)

            return unary_call

        return _rebuild(handler, wrap)


def _log_done(method: str, context: grpc.ServicerContext, started: float) -> None:
    if method.startswith(_HEALTH_PREFIX):
        return
    code = context.code() if hasattr(context, "code") else None
    log.info(
        "rpc done",
        extra={
            "method": method,
            "code": (code or grpc.StatusCode.OK).name,
            "duration_ms": round((time.perf_counter() - started) * 1000, 1),
        },
    )


class AuthInterceptor(grpc.ServerInterceptor):
    """Rejects calls without the right bearer token with UNAUTHENTICATED.

    Args:
        token: The shared secret clients must present.
    """

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("the auth token must not be empty")
        self._expected = f"Bearer {token}".encode()

    def _authorized(self, details: grpc.HandlerCallDetails) -> bool:
        presented = _metadata_value(details, "authorization")
        if presented is None:
            return False
        return hmac.compare_digest(presented.encode("utf-8", "replace"), self._expected)

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Any], details: Any
    ) -> Any:
        handler = continuation(details)
        if handler is None or details.method.startswith(_HEALTH_PREFIX):
            return handler
        if self._authorized(details):
            return handler
        present = _metadata_value(details, "authorization") is not None
        reason = "wrong bearer token" if present else "missing 'authorization: Bearer' metadata"
        log.warning("unauthenticated call", extra={"method": details.method, "reason": reason})

        def wrap(_behavior: Behavior, streaming: bool) -> Behavior:
            def deny(_request: Any, context: grpc.ServicerContext) -> Any:
                context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

            if streaming:

                def deny_stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                    deny(request, context)
                    yield  # pragma: no cover - deny always raises

                return deny_stream
            return deny

        return _rebuild(handler, wrap)


def _already_aborted(context: grpc.ServicerContext) -> bool:
    code = context.code() if hasattr(context, "code") else None
    return code is not None and code != grpc.StatusCode.OK


def _abort_for(exc: Exception, context: grpc.ServicerContext, method: str) -> None:
    """Abort the call with the status that ``exc`` stands for; always raises."""
    if isinstance(exc, HistomarkerError):
        code = grpc.StatusCode[exc.status_name]
        if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
            log.error("internal error", exc_info=exc, extra={"method": method})
        else:
            log.info("request refused", extra={"method": method, "code": code.name})
        context.abort(code, str(exc) or code.name.lower().replace("_", " "))
    if _already_aborted(context):
        raise exc
    request_id = current_request_id() or "unknown"
    log.error("unhandled error", exc_info=exc, extra={"method": method})
    context.abort(
        grpc.StatusCode.INTERNAL,
        f"internal error; the server logged the details under request id {request_id}",
    )


class _Malformed:
    """Stands in for a request message whose bytes could not be parsed."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _tolerant(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """A deserializer that returns ``_Malformed`` instead of raising.

    gRPC answers a request it cannot parse with a bare INTERNAL; this lets the
    interceptor answer INVALID_ARGUMENT with the parser's reason instead.
    """
    if deserialize is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:  # protobuf raises DecodeError and others
            return _Malformed(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)

    return parse


def _refuse_malformed(request: Any) -> Any:
    """Raise InvalidInput for a malformed request or a bad object reference in it;
    pass streams through, checked item by item."""
    if isinstance(request, _Malformed):
        raise InvalidInput(f"malformed request message ({request.reason})")
    if isinstance(request, Iterator):
        return _checked_stream(request)
    if isinstance(request, Message):
        validate_refs(request)
    return request


def _checked_stream(requests: Iterator[Any]) -> Iterator[Any]:
    for item in requests:
        if isinstance(item, _Malformed):
            raise InvalidInput(f"malformed request message in the stream ({item.reason})")
        if isinstance(item, Message):
            validate_refs(item)
        yield item


class ErrorMappingInterceptor(grpc.ServerInterceptor):
    """Maps typed exceptions to gRPC status codes; never sends a traceback.

    Requests that cannot be parsed get INVALID_ARGUMENT with the parser's reason.
    """

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Any], details: Any
    ) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method

        def wrap(behavior: Behavior, streaming: bool) -> Behavior:
            if streaming:

                def stream_call(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                    try:
                        yield from behavior(_refuse_malformed(request), context)
                    except Exception as exc:
                        _abort_for(exc, context, method)

                return stream_call

            def unary_call(request: Any, context: grpc.ServicerContext) -> Any:
                try:
                    return behavior(_refuse_malformed(request), context)
                except Exception as exc:
                    _abort_for(exc, context, method)

            return unary_call

        return _rebuild(handler, wrap, _tolerant(handler.request_deserializer))
