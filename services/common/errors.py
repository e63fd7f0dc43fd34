"""Typed exceptions raised by histomarker logic.

Logic never imports gRPC: it raises one of these, and the server interceptor in
``services.common.grpc_server`` maps each to its gRPC status code. The CLI maps them
to exit code 2 with one readable line.
"""

from __future__ import annotations


class HistomarkerError(Exception):
    """Base class of every error histomarker raises on purpose.

    Its message is meant for the caller: it says what was wrong and, where it can,
    what to do about it. It never carries secrets or tracebacks.
    """

    #: Name of the gRPC status code this error maps to (``grpc.StatusCode[...]``).
    status_name = "INTERNAL"


class InvalidInput(HistomarkerError):
    """The caller's input is malformed or out of range (gRPC INVALID_ARGUMENT)."""

    status_name = "INVALID_ARGUMENT"


class NotFound(HistomarkerError):
    """A named object, slide or model does not exist (gRPC NOT_FOUND)."""

    status_name = "NOT_FOUND"


class AlreadyExists(HistomarkerError):
    """The object to create exists already and may not be replaced (ALREADY_EXISTS)."""

    status_name = "ALREADY_EXISTS"


class FailedPrecondition(HistomarkerError):
    """The system is not in a state to do this yet, e.g. no model trained."""

    status_name = "FAILED_PRECONDITION"


class Unavailable(HistomarkerError):
    """A dependency (object store, TorchServe, another service) cannot be reached."""

    status_name = "UNAVAILABLE"


class ResourceExhausted(HistomarkerError):
    """A queue or size limit was reached; the caller may retry later."""

    status_name = "RESOURCE_EXHAUSTED"


class Unauthenticated(HistomarkerError):
    """Missing or wrong credentials."""

    status_name = "UNAUTHENTICATED"


class Unimplemented(HistomarkerError):
    """The server does not implement the RPC called (a server older than its client)."""

    status_name = "UNIMPLEMENTED"


class DeadlineExceeded(HistomarkerError):
    """The caller's deadline passed before the work finished."""

    status_name = "DEADLINE_EXCEEDED"


class Cancelled(HistomarkerError):
    """The caller went away (cancelled the call); the work was stopped."""

    status_name = "CANCELLED"
