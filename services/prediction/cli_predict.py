"""``histomarker predict SLIDE``: calibrated biomarker calls from a PredictionService.

The options are declared with the subcommand in ``services/cli.py`` (so that the
parser does not import gRPC). A local slide file is uploaded in chunks (with its
size and sha256) and predicted; ``--stored`` takes SLIDE as an object key of the
service's store instead. With ``--json`` the UploadAndPredict (or SlidePrediction)
answer is printed as JSON (proto field names); without it, a readable table.
``--geojson`` asks the service to store the slide's objects as QuPath GeoJSON beside
its other outputs; its key is the answer's ``prediction.geojson.key`` (and a line of
the table). The bearer token, when the service wants one, comes from
``HISTOMARKER_AUTH_TOKEN``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, TextIO

from services.common.errors import InvalidInput, NotFound
from services.common.progress import ProgressBar
from services.common.stubs.histomarker.v1 import common_pb2, prediction_pb2
from services.prediction.client import PredictionClient, options_of, to_dict

_CALLS = {
    prediction_pb2.BIOMARKER_CALL_POSITIVE: "positive",
    prediction_pb2.BIOMARKER_CALL_NEGATIVE: "negative",
}


def run_predict(args: argparse.Namespace, out: TextIO | None = None) -> dict[str, Any]:
    """Run the subcommand; returns the JSON answer with ``--json``, else prints a
    table to ``out`` (standard output) and returns nothing more to print."""
    if args.timeout <= 0:
        raise InvalidInput(f"--timeout must be positive, got {args.timeout}")
    options = options_of(
        args.biomarker,
        top_k=args.top_k,
        skip_heatmaps=getattr(args, "no_heatmaps", False),
        pipeline=getattr(args, "pipeline", ""),
        mil_model=getattr(args, "mil_model", ""),
        answer_out_of_distribution=getattr(args, "answer_out_of_distribution", False),
        geojson=getattr(args, "geojson", False),
    )
    quiet = bool(getattr(args, "json", False))
    token = os.environ.get("HISTOMARKER_AUTH_TOKEN") or None
    with PredictionClient(args.target, token=token, timeout_s=args.timeout) as client:
        if getattr(args, "bag", False):
            prediction = client.predict_from_bag(args.slide, options=options)
            answer: dict[str, Any] = {"prediction": to_dict(prediction)}
        elif args.stored:
            progress = None
            if not quiet:
                bar = ProgressBar(f"predicting {args.slide}", "%")

                def progress(event: common_pb2.Progress) -> None:
                    bar(round(100 * event.fraction), 100)

            prediction = client.predict_stored(
                args.slide, slide_id=args.slide_id, options=options, progress=progress
            )
            answer = {"prediction": to_dict(prediction)}
        else:
            path = Path(args.slide)
            if not path.is_file():
                raise NotFound(f"no slide file {args.slide!r} (use --stored for an object key)")
            uploading = None if quiet else ProgressBar(f"uploading {path.name}", "bytes")
            response = client.predict_file(
                path, slide_id=args.slide_id, options=options, upload_progress=uploading
            )
            prediction = response.prediction
            answer = to_dict(response)
    if quiet:
        return answer
    print_table(prediction, out or sys.stdout)
    return {}


def print_table(prediction: prediction_pb2.SlidePrediction, out: TextIO) -> None:
    """A readable summary of a prediction: one line per biomarker."""
    status = prediction_pb2.PredictionStatus.Name(prediction.status)
    status = status.removeprefix("PREDICTION_STATUS_").lower()
    out.write(f"slide {prediction.slide_id}: {status} - {prediction.status_message}\n")
    if prediction.pipeline == prediction_pb2.PREDICTION_PIPELINE_MIL:
        out.write(
            f"MIL pipeline: {prediction.tissue_patch_count} patches embedded by "
            f"{prediction.encoder_model_name} v{prediction.encoder_model_version} "
            f"(weights {prediction.encoder_sha256[:12]}), called by "
            f"{prediction.mil_model_name} v{prediction.mil_model_version}; "
            f"{prediction.elapsed_seconds:.1f} s\n"
        )
    else:
        out.write(
            f"cancer patches: {prediction.cancer_patch_count} of "
            f"{prediction.tissue_patch_count} ({prediction.cancer_patch_fraction:.1%}) above "
            f"{prediction.cancer_confidence:g}, {prediction.cancer_model_name} "
            f"v{prediction.cancer_model_version}; {prediction.elapsed_seconds:.1f} s\n"
        )
    if prediction.HasField("training_data"):
        data = prediction.training_data
        kind = (
            ""
            if not data.HasField("synthetic")
            else " (synthetic)"
            if data.synthetic
            else " (real)"
        )
        out.write(
            f"trained on: {data.cohort}{kind}, {data.slide_count or '?'} slides, "
            f"{len(data.sites)} sites\n"
        )
    if prediction.HasField("out_of_distribution"):
        ood = prediction.out_of_distribution
        verdict = "OUT of" if ood.out_of_distribution else "within"
        out.write(
            f"distribution: {verdict} the training slides' (distance {ood.distance:.3g}, "
            f"threshold {ood.threshold:.3g})\n"
        )
    if prediction.HasField("qc") and prediction.qc.verdict:
        qc = prediction.qc
        verdict = common_pb2.QcVerdict.Name(qc.verdict).removeprefix("QC_VERDICT_").lower()
        reasons = f" ({'; '.join(qc.reasons)})" if qc.reasons else ""
        out.write(
            f"QC: {verdict}{reasons}; tissue {qc.tissue_area_mm2:.2f} mm², "
            f"{qc.usable_fraction:.0%} usable\n"
        )
    if not prediction.biomarkers:
        return
    header = f"{'biomarker':<10}{'probability':>12}{'threshold':>11}  {'call':<9}"
    out.write(f"{header}{'patches':>8}  model\n")
    for item in prediction.biomarkers:
        name = common_pb2.Biomarker.Name(item.biomarker).removeprefix("BIOMARKER_")
        call = _CALLS.get(item.call, "-")
        out.write(
            f"{name:<10}{item.probability:>12.3f}{item.threshold:>11.3f}  {call:<9}"
            f"{item.patch_count:>8}  {item.model_name} v{item.model_version}\n"
        )
    heatmaps = [item.heatmap.key for item in prediction.biomarkers if item.heatmap.key]
    if heatmaps:
        folder = heatmaps[0].rsplit("/", 1)[0]
        out.write(f"heatmaps and patch table: {folder}/\n")
    if prediction.geojson.key:
        out.write(f"QuPath GeoJSON: {prediction.geojson.key}\n")
