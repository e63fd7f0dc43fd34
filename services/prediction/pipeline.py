"""One slide's biomarker prediction, stage by stage (docs/method.md, stages 1 and 2).

Stages: ``tissue``, ``grid`` and ``stain`` are the slide preparation training's
tiling uses too (:func:`services.slide.prepare.prepare_slide`: masks and their QC
verdict; 20x patches on the usable tissue, on the grid the models were trained on,
plain or overlapping by ``grid.overlap_px``; the slide's stain matrix, once). A
slide whose QC verdict is ``fail`` (too little usable tissue, or mostly artifact)
gets status ``qc_failed`` and no calls. When the deployment has an out-of-distribution
reference (the ``ood.json`` training stored beside the cancer detector), the slide is
measured against the training slides
(:func:`services.prediction.ood_check.check_slide_ood`: stain, texture and nucleus
statistics of some raw usable patches, 32 by default); one beyond the reference's
threshold gets status ``out_of_distribution``, with the distance and threshold and no
calls, unless ``answer_out_of_distribution`` asks for the calls anyway (the result
still records the measurement). Every result carries the detector's
``training_data`` (its model card's). Then ``cancer_detection`` (20x patches, read
and normalized, scored by ``cancer_detector``; kept when the calibrated cancer
probability is above the threshold, 0.9 by default) -> ``high_res`` (each kept patch
becomes four 40x patches, its quadrants: the native 40x level, or Lanczos x2 of the
normalized 20x patch) -> ``biomarkers`` (every 40x patch scored by each
``biomarker_*`` model) -> ``aggregate`` (slide probability = mean of the patch
probabilities, the paper's; the call at the model's threshold; top-k patches) ->
``heatmaps`` -> ``geojson`` (when asked for: the slide's objects for QuPath,
:mod:`services.prediction.qupath`).

The middle stages run as one pipeline, so inference never waits for pixels: reader
threads read and normalize batches of 20x patches ahead (a bounded read-ahead),
batches go to the scorer concurrently (``max_in_flight`` requests at once), cancer
results turn into 40x batches on the reader threads, and 40x batches are sent first
whenever a request slot frees, which keeps memory bounded. A :class:`BusyMeter`
records when at least one request was in flight: its ``busy_fraction`` over the
inference window is the scorer's (TorchServe's) utilisation.

On an overlapping grid neighbouring 20x patches share quadrants (on a half-overlap
grid, two with each neighbour). Each 40x window (by its level-0 origin) is scored
once, under the first cancer 20x patch in grid order that has it — its parent — as
tiling stores it (both take windows from ``services.slide.highres.WindowClaims``).
Cancer results are taken in grid order for that, so a window's parent, and its pixels
when upsampled, never depend on which request finished first.

Outputs go to the object store under ``runs/predictions/{slide_id}/{params_hash}/``
where the hash covers the slide's content digest, the parameters, the stain
reference, the model versions and the OOD reference (its threshold and fit summary;
``answer_out_of_distribution`` only counts when there is a reference)::

    tissue.png, tissue.json, ...   the tissue masks (``slide.prepare.store_masks``)
    patches.parquet                one row per 40x window scored: slide_id, x, y,
                                   width, height (level 0 px), parent_x, parent_y (its
                                   20x patch), cancer_probability and one probability
                                   column per biomarker (named after it)
    heatmap_{biomarker}.png        patch probabilities over the slide's thumbnail,
                                   same size and downsample as tissue.png
    {slide_id}.geojson             when asked for (``geojson``) and calls were made:
                                   QuPath objects, one tile per 40x patch with its
                                   probabilities, the CD and BD patches (level 0 px)
    prediction.json                the result (written last)

The GeoJSON is not part of the hash: it is derived from the patch table alone, so a
prediction with it and one without describe the same calls and share their prefix.

Nothing here imports gRPC; the service, the benchmark and the tests call
:func:`predict_slide` with a :class:`~services.prediction.models.PatchScorer`.
"""

from __future__ import annotations

import io
import itertools
import json
import time
from dataclasses import asdict, dataclass
from typing import Any

import cv2

from services.common.cancellation import WorkBudget
from services.common.errors import InvalidInput
from services.common.objectstore import ObjectStore
from services.common.vocabulary import BIOMARKERS
from services.inference.serving_io import MAX_PATCHES_PER_REQUEST
from services.prediction.engine import ScoringEngine, aggregate, patch_table
from services.prediction.heatmaps import render_heatmap, slide_thumbnail
from services.prediction.models import Deployment, PatchScorer
from services.prediction.ood_check import check_slide_ood, refusal_message
from services.prediction.progress import STAGE_START, Reporter
from services.prediction.qupath import store_prediction_geojson
from services.prediction.results import (
    STATUS_NO_CANCER,
    STATUS_NO_TISSUE,
    STATUS_OK,
    STATUS_OOD,
    STATUS_QC_FAILED,
    ProgressFn,
    SlidePredictionResult,
    check_request,
)
from services.slide.grid import footprint_px, params_hash
from services.slide.highres import HighResSource, choose_source
from services.slide.prepare import PrepParams, prepare_slide, store_masks
from services.slide.reader import SlideReader
from services.slide.stain import StainMatrix

#: Bump when outputs or algorithms change (part of the hash).
PIPELINE_VERSION = 4
RUNS_PREFIX = "runs/predictions"
PREDICTION_JSON = "prediction.json"
PATCH_TABLE = "patches.parquet"


@dataclass(frozen=True)
class PredictionParams(PrepParams):
    """How one slide is predicted: the slide preparation's parameters
    (:class:`~services.slide.prepare.PrepParams`, the same as tiling for training:
    grid, masks, excluded artifacts, stain sample, QC thresholds) and these.

    The grid's ``overlap_px`` should be the one the models were trained on (the
    service takes the cancer detector's).

    Attributes:
        biomarkers: Biomarkers to predict (names of ``BIOMARKERS``).
        top_k: Discriminative patches returned per biomarker (1-64).
        heatmaps: Render a heatmap PNG per biomarker.
        cancer_confidence: Calibrated cancer probability a 20x patch must exceed to
            count as cancer (0-1); None for the detector's own threshold (0.9).
        high_res_policy: ``auto``, ``native`` or ``upsample`` (40x patches).
        stain_method: Normalization method used when a reference is given
            (``vahadane`` or ``macenko``: the 40x patches need a stain matrix).
        batch_size: Patches per scoring request.
        max_in_flight: Scoring requests in flight at once.
        reader_threads: Threads reading, normalizing and upsampling patches.
        read_ahead_batches: 20x batches read ahead of the cancer detector.
        answer_out_of_distribution: Make the calls even for a slide the deployment's
            OOD reference finds out of distribution (the status is then ``ok`` and
            the result still records the distance).
        geojson: Also store the slide's objects as QuPath GeoJSON when calls are
            made (``{slide_id}.geojson`` in the prefix).
    """

    biomarkers: tuple[str, ...] = BIOMARKERS
    top_k: int = 8
    heatmaps: bool = True
    cancer_confidence: float | None = None
    high_res_policy: str = "auto"
    stain_method: str = "vahadane"
    batch_size: int = 16
    max_in_flight: int = 4
    reader_threads: int = 2
    read_ahead_batches: int = 4
    answer_out_of_distribution: bool = False
    geojson: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.stain_method not in ("vahadane", "macenko"):
            raise InvalidInput(
                f"stain method {self.stain_method!r} has no stain matrix; use vahadane or macenko"
            )
        check_request(self.biomarkers, self.top_k)
        if self.cancer_confidence is not None and not 0.0 <= self.cancer_confidence <= 1.0:
            raise InvalidInput(
                f"cancer_confidence must be a 0-1 probability, got {self.cancer_confidence}"
            )
        if self.high_res_policy not in ("auto", "native", "upsample"):
            raise InvalidInput(
                f"unknown 40x policy {self.high_res_policy!r}; use auto, native or upsample"
            )
        if not 1 <= self.batch_size <= MAX_PATCHES_PER_REQUEST:
            raise InvalidInput(f"batch_size must be within 1-{MAX_PATCHES_PER_REQUEST}")
        for name in ("max_in_flight", "reader_threads", "read_ahead_batches"):
            if not 1 <= getattr(self, name) <= 64:
                raise InvalidInput(f"{name} must be within 1-64, got {getattr(self, name)}")


def prediction_digest(
    params: PredictionParams,
    deployment: Deployment,
    reference: StainMatrix | None,
    slide_digest: str,
) -> str:
    """The hash naming a prediction's outputs.

    The OOD reference counts by its threshold and fit summary (its JSON is large);
    ``answer_out_of_distribution`` only when there is a reference, as without one
    it changes nothing; ``geojson`` never, as it changes no other output.
    """
    # How the work is scheduled, and the GeoJSON export, change no call.
    ignored = {"batch_size", "max_in_flight", "reader_threads", "read_ahead_batches", "geojson"}
    if deployment.ood is None:
        ignored.add("answer_out_of_distribution")
    decisive = {k: v for k, v in asdict(params).items() if k not in ignored}
    ood = deployment.ood
    return params_hash(
        decisive,
        {
            "models": deployment.versions(),
            "reference": None if reference is None else reference.to_json(),
            "slide": slide_digest,
            "version": PIPELINE_VERSION,
            "ood": None
            if ood is None
            else {"method": ood.method, "threshold": ood.threshold, "training": ood.training},
        },
    )


def predict_slide(
    reader: SlideReader,
    slide_id: str,
    store: ObjectStore,
    deployment: Deployment,
    scorer: PatchScorer,
    params: PredictionParams = PredictionParams(),
    *,
    reference: StainMatrix | None = None,
    slide_digest: str = "",
    progress: ProgressFn | None = None,
    budget: WorkBudget | None = None,
) -> SlidePredictionResult:
    """Predict the biomarkers of one slide (see the module doc for the stages).

    Args:
        reader: The open slide.
        slide_id: Its id (names the output prefix).
        store: Where the outputs go.
        deployment: The detector and biomarker models to use.
        scorer: Scores patches with a model (TorchServe in the service).
        params: What to predict and how.
        reference: Target stains; None leaves colours as scanned.
        slide_digest: The slide file's content digest or etag (part of the hash).
        progress: Called with :class:`ProgressEvent` as the work advances.
        budget: Deadline and cancellation, checked between batches.

    Returns:
        The result; ``no_tissue``, ``qc_failed``, ``out_of_distribution`` and
        ``no_cancer_patches`` are answers, not errors.

    Raises:
        InvalidInput: A slide coarser than 20x, or bad parameters.
        FailedPrecondition: The native 40x policy on a slide without a 40x level.
        DeadlineExceeded, Cancelled: The budget ran out.
        Unavailable: The scorer (TorchServe) failed.
    """
    budget = budget or WorkBudget.unlimited()
    started = time.perf_counter()
    report = Reporter(progress)
    wall: dict[str, float] = {}
    missing = [b for b in params.biomarkers if b not in deployment.biomarkers]
    if missing:
        raise InvalidInput(f"the deployment has no model for {', '.join(missing)}")
    threshold = (
        params.cancer_confidence
        if params.cancer_confidence is not None
        else deployment.cancer.threshold
    )
    digest = prediction_digest(params, deployment, reference, slide_digest)
    prefix = f"{RUNS_PREFIX}/{slide_id}/{digest}"
    mpp0 = float(reader.mpp[0])
    footprint = footprint_px(params.grid, mpp0)  # InvalidInput before any work

    # The slide prepared as tiling prepares it for training: masks, QC, the usable
    # area (tissue less blur and folds), the grid on it and the slide's stains.
    titles = {"tissue": "tissue masks", "grid": "20x patch grid", "stain": "slide stain matrix"}
    marks: list[tuple[str, float]] = []

    def on_stage(name: str) -> None:
        budget.check()
        marks.append((name, time.perf_counter()))
        report(name, 0, 1, STAGE_START[name], titles[name])

    prepared = prepare_slide(
        reader,
        slide_id,
        params,
        reference=reference,
        stain_method=params.stain_method,
        on_stage=on_stage,
    )
    marks.append(("", time.perf_counter()))
    wall["stain"] = 0.0  # no stain step without a reference
    for (name, begun), (_, ended) in itertools.pairwise(marks):
        wall[name] = ended - begun
    masks, grid = prepared.masks, prepared.grid
    t = time.perf_counter()
    store_masks(store, prefix, masks)
    wall["tissue"] += time.perf_counter() - t
    budget.check()
    measured: dict[str, Any] = {}  # the OOD check's entry, once made

    def result(status: str, message: str, **extra: Any) -> SlidePredictionResult:
        return SlidePredictionResult(
            slide_id=slide_id,
            status=status,
            message=message,
            biomarkers=extra.pop("biomarkers", []),
            tissue_patch_count=len(grid),
            cancer_patch_count=extra.pop("cancer_patch_count", 0),
            cancer_patch_fraction=extra.pop("cancer_patch_fraction", 0.0),
            cancer_confidence=float(threshold),
            high_res_source=extra.pop("high_res_source", ""),
            cancer_model_name=deployment.cancer.name,
            cancer_model_version=deployment.cancer.version,
            params_hash=digest,
            prefix=prefix,
            tissue_mask_key=f"{prefix}/tissue.png",
            qc=prepared.qc.as_dict(),
            training_data=deployment.cancer.training_data,
            out_of_distribution=dict(measured),
            **extra,
        )

    if grid.empty:
        out = result(STATUS_NO_TISSUE, "no tissue found: no 20x patch has enough tissue")
        return finish_result(store, out, started, wall, {}, {}, report)
    if prepared.qc.verdict == "fail":
        out = result(
            STATUS_QC_FAILED,
            "the slide failed QC, no biomarker calls: " + "; ".join(prepared.qc.reasons),
        )
        return finish_result(store, out, started, wall, {}, {}, report)
    if deployment.ood is not None:
        t = time.perf_counter()
        measured.update(check_slide_ood(reader, prepared, deployment.ood, params.grid))
        wall["ood"] = time.perf_counter() - t
        budget.check()
        if measured["out_of_distribution"] and not params.answer_out_of_distribution:
            out = result(STATUS_OOD, refusal_message(measured))
            return finish_result(store, out, started, wall, {}, {}, report)

    hi_source = choose_source(reader, params.high_res_policy, params.grid.target_mpp / 2)

    t = time.perf_counter()
    engine = ScoringEngine(
        reader,
        grid,
        params,
        deployment,
        scorer,
        prepared.stains,
        hi_source,
        footprint,
        threshold,
        budget,
        report,
        prepared.tissue_rule(params.grid.min_tissue),
    )
    scores = engine.run()
    wall["scoring"] = time.perf_counter() - t
    cancer_count = int((scores.cancer > threshold).sum())
    fraction = round(cancer_count / len(grid), 6)
    if cancer_count == 0:
        out = result(
            STATUS_NO_CANCER,
            f"no 20x patch of {len(grid)} has a calibrated cancer probability above "
            f"{threshold:g}: no biomarker calls",
        )
        return finish_result(
            store, out, started, wall, engine.clock.seconds, engine.meter.summary(), report
        )

    report("aggregate", 0, 1, STAGE_START["aggregate"], "mean aggregation")
    t = time.perf_counter()
    table = patch_table(slide_id, scores, params.biomarkers)
    table_key = f"{prefix}/{PATCH_TABLE}"
    buffer = io.BytesIO()
    table.to_parquet(buffer, index=False)
    store.put_bytes(table_key, buffer.getvalue())
    results = [
        aggregate(b, deployment.biomarkers[b], table, params.top_k) for b in params.biomarkers
    ]
    wall["aggregate"] = time.perf_counter() - t

    if params.heatmaps:
        report("heatmaps", 0, len(results), STAGE_START["heatmaps"], "heatmaps")
        t = time.perf_counter()
        thumbnail = slide_thumbnail(reader, params.mask_downsample, masks.tissue.shape)
        for done, item in enumerate(results, start=1):
            budget.check()
            image = render_heatmap(thumbnail, table, item.biomarker, masks.downsample, masks.tissue)
            key = f"{prefix}/heatmap_{item.biomarker}.png"
            ok, png = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
            if not ok:
                raise InvalidInput(f"cannot encode the {item.biomarker} heatmap")
            store.put_bytes(key, png.tobytes(), content_type="image/png")
            item.heatmap_key = key
            report("heatmaps", done, len(results), STAGE_START["heatmaps"] + 0.02 * done)
        wall["heatmaps"] = time.perf_counter() - t

    out = result(
        STATUS_OK,
        f"{cancer_count} of {len(grid)} tissue patches are cancer; {len(table)} 40x patches scored",
        biomarkers=results,
        cancer_patch_count=cancer_count,
        cancer_patch_fraction=fraction,
        high_res_source="native" if hi_source is HighResSource.NATIVE else "upsampled",
        patch_table_key=table_key,
    )
    if params.geojson:
        budget.check()
        report("geojson", 0, 1, STAGE_START["geojson"], "QuPath GeoJSON")
        t = time.perf_counter()
        out.geojson_key = store_prediction_geojson(store, out, table)
        wall["geojson"] = time.perf_counter() - t
    return finish_result(
        store, out, started, wall, engine.clock.seconds, engine.meter.summary(), report
    )


def finish_result(
    store: ObjectStore,
    out: SlidePredictionResult,
    started: float,
    wall: dict[str, float],
    threads: dict[str, float],
    utilisation: dict[str, float],
    report: Reporter,
) -> SlidePredictionResult:
    """Stamp the timings on a result, write its ``prediction.json`` (last, so a prefix
    with one is complete) and report the end; both pipelines finish here."""
    out.timings = {k: round(v, 4) for k, v in {**wall, **threads}.items()}
    out.utilisation = utilisation
    out.elapsed_s = round(time.perf_counter() - started, 4)
    store.put_bytes(
        f"{out.prefix}/{PREDICTION_JSON}",
        json.dumps(out.as_dict(), indent=1).encode(),
        content_type="application/json",
    )
    report("done", 1, 1, 1.0, out.message)
    return out
