"""``predict_batch``: new slides in the store's inbox -> predictions and heatmaps.

Slides to predict are the objects under an inbox prefix (``inbox/`` by default):
``inbox/{slide_id}.{svs|tif|tiff|ndpi|...}``, one file per slide, the slide id being
the file name before its first dot. Each one goes through the PredictionService's
``PredictSlide`` (which writes ``runs/predictions/{slide_id}/{params_hash}/``: masks,
patch table, heatmaps, ``prediction.json``), at most ``max_concurrent_slides`` at
once, retried with back-off while the service or TorchServe is UNAVAILABLE.

Idempotent: after a slide is predicted (or refused for a reason a retry cannot
change: bad input, an unreadable file) its outcome is recorded at
``runs/predictions/done/{slide_id}/{digest}.json``, where the digest covers the
slide object's version tag (etag), the deployed models (names and versions) and
the options. A later batch skips a slide with a record of the same digest; a
replaced slide, a new model version or other options predict it again. Slides stay
in the inbox: the records, not moves, say what is done.

Each batch that predicted (or failed) at least one slide writes its summary,
one row per inbox slide, to ``runs/predictions/batches/{batch_id}.parquet`` and a
Prefect table artifact; a batch in which every slide was skipped writes nothing,
so an interval schedule over an unchanged inbox leaves no trail of empty batches.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import PurePosixPath
from typing import Any, Literal

import pandas as pd
from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.runtime import flow_run
from pydantic import Field

from flows.runtime.fanout import submit_bounded
from flows.runtime.policy import input_digest, is_retryable, pipeline_task
from flows.runtime.records import Record
from flows.runtime.runners import with_fanout_runner
from flows.runtime.settings import FlowSettings
from services.common.errors import FailedPrecondition, HistomarkerError, InvalidInput
from services.common.objectstore import ObjectInfo
from services.common.qc_messages import qc_from_proto
from services.common.vocabulary import BIOMARKERS, CANCER_DETECTOR, model_name_of
from services.prediction.client import PredictionClient, options_of
from services.slide.slides import slide_id_for

#: The PredictionService's output prefix (``services.prediction.pipeline.RUNS_PREFIX``).
PREDICTIONS_PREFIX = "runs/predictions"
#: Its result file in each prediction's folder (``...pipeline.PREDICTION_JSON``).
PREDICTION_JSON = "prediction.json"
#: Per-slide outcome records (what makes a batch idempotent).
DONE_PREFIX = f"{PREDICTIONS_PREFIX}/done"
#: Batch summary tables.
BATCHES_PREFIX = f"{PREDICTIONS_PREFIX}/batches"
#: File extensions of single-file slides OpenSlide reads (DICOM and MRXS are folders).
SLIDE_SUFFIXES = frozenset(
    {".svs", ".tif", ".tiff", ".ndpi", ".scn", ".svslide", ".bif", ".vms", ".qptiff"}
)
#: Hex digits of a record's digest.
DIGEST_DIGITS = 24

Outcome = Literal["predicted", "skipped", "failed"]


class BatchOptions(Record):
    """What ``predict_batch`` asks PredictSlide for (part of each record's digest)."""

    #: The biomarkers, in the method's order; all six by default.
    biomarkers: tuple[str, ...] = BIOMARKERS
    #: Top patches per biomarker in each prediction.json.
    top_k: int = Field(default=0, ge=0, le=100)
    #: Leave the heatmap PNGs out.
    skip_heatmaps: bool = False
    #: Calibrated cancer confidence above which a 20x patch is kept; None: the
    #: detector's own threshold (the method's 0.9).
    cancer_confidence: float | None = Field(default=None, ge=0.0, le=1.0)


class InboxSlide(Record):
    """A slide found in the inbox."""

    slide_id: str
    key: str
    #: The object's version tag: a replaced file is a new slide to predict.
    etag: str


class BiomarkerOutcome(Record):
    """One biomarker's slide-level call."""

    biomarker: str
    #: Calibrated slide probability (0-1): the mean of the patch probabilities.
    probability: float
    #: ``positive`` or ``negative`` at the model's threshold.
    call: str
    #: The heatmap PNG ("" when skipped).
    heatmap_key: str
    model_version: str


class SlideOutcome(Record):
    """What happened to one inbox slide in a batch.

    Attributes:
        slide_id: The slide.
        slide_key: Its inbox key.
        status: ``predicted`` in this batch, ``skipped`` (recorded by an earlier
            batch, whose result the other fields repeat) or ``failed``.
        prediction_status: The service's status: ``ok``, ``no_tissue``,
            ``qc_failed``, ``no_cancer_patches``; "" when it failed.
        message: The service's status line, or the error.
        prediction_key: The stored ``prediction.json`` ("" when it failed).
        qc_verdict: The slide's QC verdict (``pass``, ``warn``, ``fail``; "" when
            the call failed).
        qc_reasons: Why, ``; ``-joined.
        usable_area_mm2: Its usable tissue, mm².
        biomarkers: One call per biomarker (empty unless ``ok``).
    """

    slide_id: str
    slide_key: str
    status: Outcome
    prediction_status: str = ""
    message: str = ""
    prediction_key: str = ""
    qc_verdict: str = ""
    qc_reasons: str = ""
    usable_area_mm2: float = 0.0
    biomarkers: tuple[BiomarkerOutcome, ...] = ()


class BatchResult(Record):
    """A batch: its id, where its summary is ("" when nothing was written), rows."""

    batch_id: str
    table_key: str
    outcomes: tuple[SlideOutcome, ...]


# Pure logic: which slides, which digest, which rows.


def inbox_slides(objects: Iterable[ObjectInfo]) -> tuple[list[InboxSlide], list[str]]:
    """The slides among an inbox listing, and the keys left out with the reason.

    Objects that are not single-file slides (by extension) are ignored quietly;
    a name that is not a valid slide id, or a second file of the same slide id, is
    left out and reported.

    Returns:
        (slides sorted by key, reasons for the keys left out).
    """
    slides: dict[str, InboxSlide] = {}
    rejected: list[str] = []
    for info in sorted(objects, key=lambda o: o.key):
        name = PurePosixPath(info.key)
        if name.suffix.lower() not in SLIDE_SUFFIXES:
            continue
        try:
            slide_id = slide_id_for("", info.key)
        except InvalidInput as error:
            rejected.append(f"{info.key}: {error}")
            continue
        if slide_id in slides:
            rejected.append(f"{info.key}: slide id {slide_id!r} is {slides[slide_id].key} too")
            continue
        slides[slide_id] = InboxSlide(slide_id=slide_id, key=info.key, etag=info.etag)
    return list(slides.values()), rejected


def models_digest(models: Iterable[tuple[str, str]], options: BatchOptions) -> str:
    """Digest of the deployed models (name, version) and the options."""
    return input_digest(sorted(models), options)[:DIGEST_DIGITS]


def record_key(slide: InboxSlide, models: str) -> str:
    """Where the outcome of ``slide`` under the models digest ``models`` is recorded."""
    digest = input_digest(slide.key, slide.etag, models)[:DIGEST_DIGITS]
    return f"{DONE_PREFIX}/{slide.slide_id}/{digest}.json"


def _enum_name(prefix: str, name: str) -> str:
    return name.removeprefix(prefix).lower()


def outcome_of(slide: InboxSlide, prediction: Any) -> SlideOutcome:
    """The outcome of a ``SlidePrediction`` message of ``slide``."""
    from services.common.stubs.histomarker.v1 import common_pb2, prediction_pb2

    status = _enum_name(
        "PREDICTION_STATUS_", prediction_pb2.PredictionStatus.Name(prediction.status)
    )
    biomarkers = tuple(
        BiomarkerOutcome(
            biomarker=_enum_name("BIOMARKER_", common_pb2.Biomarker.Name(item.biomarker)),
            probability=float(item.probability),
            call=_enum_name("BIOMARKER_CALL_", prediction_pb2.BiomarkerCall.Name(item.call)),
            heatmap_key=item.heatmap.key if item.HasField("heatmap") else "",
            model_version=item.model_version,
        )
        for item in prediction.biomarkers
    )
    prefix = f"{PREDICTIONS_PREFIX}/{prediction.slide_id}/{prediction.params_hash}"
    qc = qc_from_proto(prediction.qc)
    return SlideOutcome(
        slide_id=slide.slide_id,
        slide_key=slide.key,
        status="predicted",
        prediction_status=status,
        message=prediction.status_message,
        prediction_key=f"{prefix}/{PREDICTION_JSON}",
        qc_verdict=qc.get("verdict", ""),
        qc_reasons="; ".join(qc.get("reasons", ())),
        usable_area_mm2=float(qc.get("usable_area_mm2", 0.0)),
        biomarkers=biomarkers,
    )


def summary_table(outcomes: Sequence[SlideOutcome], biomarkers: Sequence[str]) -> pd.DataFrame:
    """One row per slide: slide_id, slide_key, status, prediction_status, message,
    prediction_key, then ``{b}_probability``, ``{b}_call`` and ``{b}_heatmap_key`` per
    biomarker (NaN / "" where there is no call)."""
    rows = []
    for outcome in outcomes:
        row: dict[str, Any] = outcome.model_dump(exclude={"biomarkers"})
        calls = {item.biomarker: item for item in outcome.biomarkers}
        for name in biomarkers:
            item = calls.get(name)
            row[f"{name}_probability"] = item.probability if item else float("nan")
            row[f"{name}_call"] = item.call if item else ""
            row[f"{name}_heatmap_key"] = item.heatmap_key if item else ""
        rows.append(row)
    columns = [c for c in SlideOutcome.model_fields if c != "biomarkers"]
    for name in biomarkers:
        columns += [f"{name}_probability", f"{name}_call", f"{name}_heatmap_key"]
    return pd.DataFrame(rows, columns=columns)


def new_batch_id(now: datetime, run_id: str) -> str:
    """``{UTC time}-{first 8 hex digits of the flow run id}``: sortable and unique."""
    return f"{now.astimezone(UTC):%Y%m%dT%H%M%SZ}-{run_id.replace('-', '')[:8] or 'local'}"


def skipped(recorded: SlideOutcome) -> SlideOutcome:
    """A recorded outcome repeated in a later batch."""
    return recorded.model_copy(update={"status": "skipped"})


# Tasks and flows.


@pipeline_task(cached=False)
def list_inbox(prefix: str) -> list[InboxSlide]:
    """The slides under the inbox prefix (see :func:`inbox_slides`)."""
    with FlowSettings().open_store() as store:
        slides, rejected = inbox_slides(store.list(prefix))
    for reason in rejected:
        get_run_logger().warning("left out of the batch: %s", reason)
    return slides


@pipeline_task(cached=False)
def deployed_models(biomarkers: tuple[str, ...]) -> list[tuple[str, str]]:
    """(name, version) of the models PredictionService would use.

    Raises:
        FailedPrecondition: No cancer detector or a biomarker model is missing.
    """
    settings = FlowSettings()
    with PredictionClient(
        settings.prediction_target, token=settings.secret("auth_token"), timeout_s=60.0
    ) as client:
        # Unfiltered: a biomarker filter leaves the cancer detector out.
        deployed = {m.name: m.version for m in client.list_models()}
    wanted = [CANCER_DETECTOR, *(model_name_of(b) for b in biomarkers)]
    missing = [name for name in wanted if name not in deployed]
    if missing:
        raise FailedPrecondition(f"PredictionService has no model {', '.join(missing)} deployed")
    return [(name, deployed[name]) for name in wanted]


def read_records(slides: Sequence[InboxSlide], models: str) -> dict[str, SlideOutcome]:
    """The recorded outcomes of the slides under the models digest, by slide id."""
    found: dict[str, SlideOutcome] = {}
    with FlowSettings().open_store() as store:
        for slide in slides:
            key = record_key(slide, models)
            if store.exists(key):
                found[slide.slide_id] = SlideOutcome.model_validate_json(store.get_bytes(key))
    return found


@pipeline_task(cached=False, task_run_name="predict-{slide_id}")
def predict_slide(
    slide_id: str, slide_key: str, etag: str, options: BatchOptions, models: str
) -> SlideOutcome:
    """PredictSlide of one inbox slide; its outcome is recorded before it is returned.

    A dependency down (UNAVAILABLE, RESOURCE_EXHAUSTED) raises, so the task is
    retried and nothing is recorded; any other refusal is a ``failed`` outcome,
    recorded: predicting the same slide with the same models would fail again.
    """
    settings = FlowSettings()
    slide = InboxSlide(slide_id=slide_id, key=slide_key, etag=etag)
    key = record_key(slide, models)
    with settings.open_store() as store:
        if store.exists(key):  # another batch got here first
            return skipped(SlideOutcome.model_validate_json(store.get_bytes(key)))
        request = options_of(
            options.biomarkers,
            top_k=options.top_k,
            skip_heatmaps=options.skip_heatmaps,
            cancer_confidence=options.cancer_confidence,
        )
        try:
            with PredictionClient(
                settings.prediction_target,
                token=settings.secret("auth_token"),
                timeout_s=settings.rpc_timeout_s,
            ) as client:
                prediction = client.predict_stored(slide_key, slide_id=slide_id, options=request)
            outcome = outcome_of(slide, prediction)
        except HistomarkerError as error:
            if is_retryable(error):
                raise
            message = " ".join(str(error).split())
            outcome = SlideOutcome(
                slide_id=slide_id, slide_key=slide_key, status="failed", message=message
            )
        store.put_bytes(
            key, outcome.model_dump_json(indent=1).encode(), content_type="application/json"
        )
    return outcome


@flow(name="predict_slides", log_prints=True)
def predict_slides(
    slides: list[InboxSlide], options: BatchOptions, models: str, max_concurrent_slides: int
) -> list[SlideOutcome]:
    """PredictSlide of each slide, ``max_concurrent_slides`` at once (the fan-out)."""
    calls = [
        {
            "slide_id": s.slide_id,
            "slide_key": s.key,
            "etag": s.etag,
            "options": options,
            "models": models,
        }
        for s in slides
    ]
    return submit_bounded(predict_slide, calls, max_concurrent_slides)


@pipeline_task(cached=False)
def write_summary(batch_id: str, outcomes: list[SlideOutcome], biomarkers: tuple[str, ...]) -> str:
    """Store the batch's summary table; returns its key."""
    table = summary_table(outcomes, biomarkers)
    buffer = io.BytesIO()
    table.to_parquet(buffer, index=False)
    key = f"{BATCHES_PREFIX}/{batch_id}.parquet"
    with FlowSettings().open_store() as store:
        store.put_bytes(key, buffer.getvalue())
    return key


@flow(name="predict_batch", log_prints=True)
def predict_batch(
    inbox_prefix: str = "inbox/",
    options: BatchOptions | None = None,
    max_concurrent_slides: int = 2,
) -> BatchResult:
    """Predict the inbox's new slides through PredictionService (see the module doc).

    Args:
        inbox_prefix: Where the slides are in the store.
        options: What to predict; all six biomarkers with heatmaps by default.
        max_concurrent_slides: Slides in flight at once (PredictionService queues
            beyond its own limit, and refuses beyond its queue: retried).

    Returns:
        The batch id, its summary table's key ("" when nothing was written) and
        one outcome per inbox slide.
    """
    if max_concurrent_slides < 1:
        raise InvalidInput(f"max_concurrent_slides must be >= 1, got {max_concurrent_slides}")
    options = options or BatchOptions()
    logger = get_run_logger()
    slides = list_inbox(inbox_prefix)
    batch_id = new_batch_id(datetime.now(UTC), str(flow_run.get_id() or ""))
    if not slides:
        logger.info("no slides under %s", inbox_prefix)
        return BatchResult(batch_id=batch_id, table_key="", outcomes=())
    models = models_digest(deployed_models(options.biomarkers), options)
    recorded = read_records(slides, models)
    todo = [s for s in slides if s.slide_id not in recorded]
    fresh: dict[str, SlideOutcome] = {}
    if todo:
        fanout = with_fanout_runner(predict_slides)
        done = fanout(todo, options, models, max_concurrent_slides)
        fresh = {o.slide_id: o for o in done}
    outcomes = tuple(
        fresh[s.slide_id] if s.slide_id in fresh else skipped(recorded[s.slide_id]) for s in slides
    )
    counts = {k: sum(o.status == k for o in outcomes) for k in ("predicted", "skipped", "failed")}
    logger.info("batch %s: %s", batch_id, json.dumps(counts))
    if not todo:
        return BatchResult(batch_id=batch_id, table_key="", outcomes=outcomes)
    table_key = write_summary(batch_id, list(outcomes), options.biomarkers)
    table = summary_table(outcomes, options.biomarkers)
    create_table_artifact(
        json.loads(table.to_json(orient="records")),
        key="prediction-batch",
        description=f"Batch {batch_id}: {json.dumps(counts)}; table `{table_key}`.",
    )
    return BatchResult(batch_id=batch_id, table_key=table_key, outcomes=outcomes)
