"""The QC metrics of a slide (``QcSummary.as_dict``) as a ``SlideQc`` message and back.

Tiling and prediction compute them in the slide library; their servers send them,
and clients and flows read them, through these two functions.
"""

from __future__ import annotations

from typing import Any

from services.common.stubs.histomarker.v1 import common_pb2

_VERDICTS = {
    "pass": common_pb2.QC_VERDICT_PASS,
    "warn": common_pb2.QC_VERDICT_WARN,
    "fail": common_pb2.QC_VERDICT_FAIL,
}
_NAMES = {value: name for name, value in _VERDICTS.items()}


def qc_to_proto(summary: dict[str, Any]) -> common_pb2.SlideQc:
    """A ``SlideQc`` message of a QC summary dict (empty dict: an unset message)."""
    if not summary:
        return common_pb2.SlideQc()
    return common_pb2.SlideQc(
        verdict=_VERDICTS[summary["verdict"]],
        reasons=list(summary["reasons"]),
        tissue_area_mm2=float(summary["tissue_area_mm2"]),
        usable_area_mm2=float(summary["usable_area_mm2"]),
        usable_fraction=float(summary["usable_fraction"]),
        artifacts=[
            common_pb2.ArtifactShare(name=name, fraction=float(share))
            for name, share in summary["artifact_fractions"].items()
        ],
    )


def qc_from_proto(message: common_pb2.SlideQc) -> dict[str, Any]:
    """The QC summary dict of a ``SlideQc`` message (``{}`` when it was not judged)."""
    if message.verdict == common_pb2.QC_VERDICT_UNSPECIFIED:
        return {}
    return {
        "verdict": _NAMES[message.verdict],
        "reasons": list(message.reasons),
        "tissue_area_mm2": message.tissue_area_mm2,
        "usable_area_mm2": message.usable_area_mm2,
        "usable_fraction": message.usable_fraction,
        "artifact_fractions": {item.name: item.fraction for item in message.artifacts},
    }
