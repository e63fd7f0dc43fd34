"""Client-side helpers for the TilingService's streaming RPCs.

``TileSlide`` streams progress and then one result; ``NormalizePatches`` is a
bidirectional stream. These helpers give callers (flows, the prediction service,
tests) plain calls over a ``TilingServiceStub``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from services.common.errors import Unavailable
from services.common.stubs.histomarker.v1 import common_pb2, tiling_pb2

ProgressCallback = Callable[[common_pb2.Progress], None]


def final_tiling_result(
    responses: Iterable[tiling_pb2.TileSlideResponse],
    on_progress: ProgressCallback | None = None,
) -> tiling_pb2.TilingResult:
    """The result at the end of a ``TileSlide`` stream; progress goes to ``on_progress``.

    Raises:
        Unavailable: the stream ended without a result.
    """
    for response in responses:
        if response.HasField("result"):
            return response.result
        if on_progress is not None and response.HasField("progress"):
            on_progress(response.progress)
    raise Unavailable("TileSlide ended without a result")


def tile_slide(
    stub: Any,
    request: tiling_pb2.TileSlideRequest,
    timeout_s: float | None = None,
    on_progress: ProgressCallback | None = None,
) -> tiling_pb2.TilingResult:
    """Call ``TileSlide`` and wait for its result."""
    return final_tiling_result(stub.TileSlide(request, timeout=timeout_s), on_progress)


def normalize_batches(
    stub: Any,
    batches: Iterable[tiling_pb2.NormalizePatchesRequest],
    timeout_s: float | None = None,
) -> Iterator[tiling_pb2.NormalizePatchesResponse]:
    """Stream request messages to ``NormalizePatches``; yields one response for each."""
    return iter(stub.NormalizePatches(iter(batches), timeout=timeout_s))
