"""Structured logs: one JSON object a line, with service, request id and slide id.

The request id and slide id live in context variables so that every log line written
while serving one request carries them, whichever module writes it.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
import time
from collections.abc import Iterator
from typing import Any, TextIO

_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "histomarker_request_id", default=None
)
_slide_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "histomarker_slide_id", default=None
)

# LogRecord attributes that are not user-supplied ``extra`` fields.
_STANDARD_ATTRS = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object on one line."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = _request_id.get()
        if request_id is not None:
            entry["request_id"] = request_id
        slide_id = _slide_id.get()
        if slide_id is not None:
            entry["slide_id"] = slide_id
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def configure_logging(service: str, level: str = "INFO", stream: TextIO | None = None) -> None:
    """Send every log record of the process as JSON lines to ``stream`` (stderr).

    Args:
        service: Service name written in every line.
        level: Level name such as ``"INFO"``.
        stream: Where to write; standard error by default.
    """
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


@contextlib.contextmanager
def log_context(request_id: str | None = None, slide_id: str | None = None) -> Iterator[None]:
    """Tag every log line written inside the block with a request id and/or slide id."""
    tokens = []
    if request_id is not None:
        tokens.append((_request_id, _request_id.set(request_id)))
    if slide_id is not None:
        tokens.append((_slide_id, _slide_id.set(slide_id)))
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


def current_request_id() -> str | None:
    """The request id of the request being served, if any."""
    return _request_id.get()
