from __future__ import annotations

import io
import json
import logging

from services.common.logs import configure_logging, current_request_id, log_context


def test_json_lines_carry_service_request_and_slide_ids() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    try:
        configure_logging("tiling", "INFO", stream=stream)
        logger = logging.getLogger("histomarker.test")
        with log_context(request_id="req-1", slide_id="TCGA-A1-0001"):
            assert current_request_id() == "req-1"
            logger.info("tiled", extra={"patches": 12})
        logger.info("outside")
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed")
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len(lines) == 3
    first, second, third = lines
    assert first["service"] == "tiling" and first["msg"] == "tiled"
    assert first["request_id"] == "req-1" and first["slide_id"] == "TCGA-A1-0001"
    assert first["patches"] == 12 and first["level"] == "INFO"
    assert "request_id" not in second and "slide_id" not in second
    assert "ValueError: boom" in third["traceback"]
    assert current_request_id() is None
