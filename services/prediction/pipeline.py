"""One slide's biomarker prediction, stage by stage (docs/method.md, stages 1 and 2).

Stages: ``tissue``, ``grid`` and ``stain`` are the slide preparation training's
tiling uses too (:func:`services.slide.prepare.prepare_slide`: masks and their QC
verdict; 20x patches on the usable tissue, on the grid the models were trained on,
plain or overlapping by ``grid.overlap_px``; the slide's stain matrix, once). A
slide whose QC verdict is ``fail`` (too little usable tissue, or mostly artifact)
gets status ``qc_failed`` and no calls. Then ``cancer_detection`` (20x patches, read
and normalized, scored by ``cancer_detector``; kept when the calibrated cancer
probability is above the threshold, 0.9 by default) -> ``high_res`` (each kept patch
becomes four 40x patches, its quadrants: the native 40x level, or Lanczos x2 of the
normalized 20x patch) -> ``biomarkers`` (every 40x patch scored by each
``biomarker_*`` model) -> ``aggregate`` (slide probability = mean of the patch
probabilities, the paper's; the call at the model's threshold; top-k patches) ->
``heatmaps``.

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
reference and the model versions::

    tissue.png, tissue.json, ...   the tissue masks (``slide.prepare.store_masks``)
    patches.parquet                one row per 40x window scored: slide_id, x, y,
                                   width, height (level 0 px), parent_x, parent_y (its
                                   20x patch), cancer_probability and one probability
                                   column per biomarker (named after it)
    heatmap_{biomarker}.png        patch probabilities over the slide's thumbnail,
                                   same size and downsample as tissue.png
    prediction.json                the result (written last)

Nothing here imports gRPC; the service, the benchmark and the tests call
:func:`predict_slide` with a :class:`~services.prediction.models.PatchScorer`.
"""

from __future__ import annotations

import io
import itertools
import json
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import cv2
import numpy as np
import pandas as pd

from services.common.cancellation import WorkBudget
from services.common.errors import InvalidInput
from services.common.objectstore import ObjectStore
from services.common.vocabulary import BIOMARKERS
from services.inference.serving_io import MAX_PATCHES_PER_REQUEST
from services.prediction.models import DeployedModel, Deployment, PatchScorer
from services.slide.grid import TissueRule, footprint_px, params_hash
from services.slide.highres import HighResSource, WindowClaims, choose_source, make_windows
from services.slide.prepare import PrepParams, SlideStains, prepare_slide, store_masks
from services.slide.reader import SlideReader
from services.slide.stain import StainMatrix

#: Bump when outputs or algorithms change (part of the hash).
PIPELINE_VERSION = 3
RUNS_PREFIX = "runs/predictions"
PREDICTION_JSON = "prediction.json"
PATCH_TABLE = "patches.parquet"
#: Statuses of a result (the proto's PredictionStatus).
STATUS_OK = "ok"
STATUS_NO_TISSUE = "no_tissue"
STATUS_NO_CANCER = "no_cancer_patches"
STATUS_QC_FAILED = "qc_failed"
#: Progress fractions at which the pipeline's stages start.
_STAGE_START = {
    "tissue": 0.0,
    "grid": 0.04,
    "stain": 0.06,
    "cancer_detection": 0.1,
    "biomarkers": 0.1,
    "aggregate": 0.9,
    "heatmaps": 0.92,
}
_SCORING_SPAN = 0.8


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

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.stain_method not in ("vahadane", "macenko"):
            raise InvalidInput(
                f"stain method {self.stain_method!r} has no stain matrix; use vahadane or macenko"
            )
        unknown = [b for b in self.biomarkers if b not in BIOMARKERS]
        if unknown or not self.biomarkers or len(set(self.biomarkers)) != len(self.biomarkers):
            raise InvalidInput(
                f"biomarkers must be distinct names of {', '.join(BIOMARKERS)}; "
                f"got {list(self.biomarkers)}"
            )
        if not 1 <= self.top_k <= 64:
            raise InvalidInput(f"top_k must be within 1-64, got {self.top_k}")
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


@dataclass(frozen=True)
class ProgressEvent:
    """How far a prediction has got (the proto's Progress).

    Attributes:
        stage: Current stage (see the module doc).
        done: Items of the stage finished (patches).
        total: Items of the stage (0 = not known yet).
        fraction: 0-1 share of the whole prediction done; never decreases.
        message: One readable line.
    """

    stage: str
    done: int
    total: int
    fraction: float
    message: str


ProgressFn = Callable[[ProgressEvent], None]


@dataclass(frozen=True)
class TopPatch:
    """A 40x patch supporting a call: level-0 footprint and its probability (0-1)."""

    x: int
    y: int
    width: int
    height: int
    probability: float


@dataclass
class BiomarkerResult:
    """The prediction of one biomarker.

    Attributes:
        biomarker: Its name (``tp53``...).
        model_name: TorchServe name of the model.
        model_version: Version of the model.
        probability: Mean calibrated patch probability (0-1).
        threshold: The model's decision threshold (0-1).
        positive: The call: probability >= threshold.
        patch_count: 40x patches averaged.
        top_patches: Strongest support first (highest p for a positive call,
            lowest for a negative one).
        heatmap_key: Store key of the heatmap PNG, "" when not rendered.
    """

    biomarker: str
    model_name: str
    model_version: str
    probability: float
    threshold: float
    positive: bool
    patch_count: int
    top_patches: list[TopPatch]
    heatmap_key: str = ""


@dataclass
class SlidePredictionResult:
    """Everything predicted for one slide (the proto's SlidePrediction), plus timings.

    Attributes:
        slide_id: The slide.
        status: ``ok``, ``no_tissue``, ``qc_failed`` or ``no_cancer_patches``.
        message: One readable line about the status.
        biomarkers: One result per requested biomarker; empty unless ``ok``.
        tissue_patch_count: 20x tissue patches scored.
        cancer_patch_count: 20x patches above the cancer threshold.
        cancer_patch_fraction: Their share of the tissue patches (0-1).
        cancer_confidence: The cancer threshold used (0-1).
        high_res_source: ``native``, ``upsampled``, or "" when no 40x patch was made.
        cancer_model_name: TorchServe name of the detector.
        cancer_model_version: Its version.
        params_hash: Hash naming the output prefix.
        prefix: ``runs/predictions/{slide_id}/{params_hash}``.
        tissue_mask_key: Key of ``tissue.png``.
        patch_table_key: Key of ``patches.parquet``, "" when no 40x patch was scored.
        elapsed_s: Wall-clock seconds.
        timings: Seconds per stage: wall time of the sequential stages (``tissue``,
            ``grid``, ``stain``, ``scoring``, ``aggregate``, ``heatmaps``) and summed
            thread time inside ``scoring`` (``read_20x``, ``normalize``, ``make_40x``,
            ``cancer_requests``, ``biomarker_requests``).
        utilisation: The :class:`BusyMeter` summary of the scorer.
        qc: The slide's QC metrics and verdict (``QcSummary.as_dict``).
    """

    slide_id: str
    status: str
    message: str
    biomarkers: list[BiomarkerResult]
    tissue_patch_count: int
    cancer_patch_count: int
    cancer_patch_fraction: float
    cancer_confidence: float
    high_res_source: str
    cancer_model_name: str
    cancer_model_version: str
    params_hash: str
    prefix: str
    tissue_mask_key: str
    patch_table_key: str = ""
    elapsed_s: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    utilisation: dict[str, float] = field(default_factory=dict)
    qc: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The result as plain JSON values."""
        return asdict(self)


class BusyMeter:
    """When the scorer had at least one request in flight.

    ``busy_fraction`` = busy time / the inference window (first request sent to
    last answer received): 1.0 means the scorer never waited for patches.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._in_flight = 0
        self._busy_since = 0.0
        self._busy_s = 0.0
        self._first: float | None = None
        self._last = 0.0
        self._requests = 0
        self._request_s = 0.0

    @contextmanager
    def request(self) -> Iterator[None]:
        """Wrap one request."""
        with self._lock:
            started = self._clock()
            if self._in_flight == 0:
                self._busy_since = started
            if self._first is None:
                self._first = started
            self._in_flight += 1
        try:
            yield
        finally:
            with self._lock:
                now = self._clock()
                self._in_flight -= 1
                self._requests += 1
                self._request_s += now - started
                if self._in_flight == 0:
                    self._busy_s += now - self._busy_since
                self._last = max(self._last, now)

    def summary(self) -> dict[str, float]:
        """``requests``, ``busy_s``, ``window_s``, ``busy_fraction`` (0-1),
        ``mean_in_flight`` (requests) and ``idle_s`` of the inference window."""
        with self._lock:
            window = self._last - self._first if self._first is not None else 0.0
            return {
                "requests": float(self._requests),
                "busy_s": round(self._busy_s, 4),
                "window_s": round(window, 4),
                "busy_fraction": round(self._busy_s / window, 4) if window > 0 else 0.0,
                "mean_in_flight": round(self._request_s / window, 3) if window > 0 else 0.0,
                "idle_s": round(max(window - self._busy_s, 0.0), 4),
            }


class _Clock:
    """Summed seconds per named piece of work (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seconds: dict[str, float] = {}

    @contextmanager
    def time(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - started
            with self._lock:
                self.seconds[name] = self.seconds.get(name, 0.0) + elapsed


class _Reporter:
    """Turns stage counts into monotonic ProgressEvents, at most every 0.1 s."""

    def __init__(self, callback: ProgressFn | None) -> None:
        self._callback = callback
        self._fraction = 0.0
        self._last_emit = float("-inf")
        self._last_stage = ""

    def __call__(
        self, stage: str, done: int, total: int, fraction: float, message: str = ""
    ) -> None:
        if self._callback is None:
            return
        self._fraction = max(self._fraction, min(1.0, fraction))
        now = time.monotonic()
        if stage == self._last_stage and now - self._last_emit < 0.1 and done < total:
            return
        self._last_emit, self._last_stage = now, stage
        self._callback(
            ProgressEvent(stage, done, total, round(self._fraction, 4), message or stage)
        )


@dataclass
class _Scores:
    """What the scoring stages produced."""

    cancer: np.ndarray  # (n20,) calibrated cancer probability per 20x patch
    hi_rows: list[dict[str, int]] = field(default_factory=list)  # one per 40x window
    hi_probs: dict[str, list[np.ndarray]] = field(default_factory=dict)
    hi_batches: list[tuple[int, int]] = field(default_factory=list)  # row ranges


def prediction_digest(
    params: PredictionParams,
    deployment: Deployment,
    reference: StainMatrix | None,
    slide_digest: str,
) -> str:
    """The hash naming a prediction's outputs."""
    scoring = ("batch_size", "max_in_flight", "reader_threads", "read_ahead_batches")
    decisive = {k: v for k, v in asdict(params).items() if k not in scoring}
    return params_hash(
        decisive,
        {
            "models": deployment.versions(),
            "reference": None if reference is None else reference.to_json(),
            "slide": slide_digest,
            "version": PIPELINE_VERSION,
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
        The result; ``no_tissue`` and ``no_cancer_patches`` are answers, not errors.

    Raises:
        InvalidInput: A slide coarser than 20x, or bad parameters.
        FailedPrecondition: The native 40x policy on a slide without a 40x level.
        DeadlineExceeded, Cancelled: The budget ran out.
        Unavailable: The scorer (TorchServe) failed.
    """
    budget = budget or WorkBudget.unlimited()
    started = time.perf_counter()
    report = _Reporter(progress)
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
        report(name, 0, 1, _STAGE_START[name], titles[name])

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
            **extra,
        )

    if grid.empty:
        out = result(STATUS_NO_TISSUE, "no tissue found: no 20x patch has enough tissue")
        return _finish(store, out, started, wall, {}, {}, report)
    if prepared.qc.verdict == "fail":
        out = result(
            STATUS_QC_FAILED,
            "the slide failed QC, no biomarker calls: " + "; ".join(prepared.qc.reasons),
        )
        return _finish(store, out, started, wall, {}, {}, report)

    hi_source = choose_source(reader, params.high_res_policy, params.grid.target_mpp / 2)

    t = time.perf_counter()
    engine = _Engine(
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
        return _finish(
            store, out, started, wall, engine.clock.seconds, engine.meter.summary(), report
        )

    report("aggregate", 0, 1, _STAGE_START["aggregate"], "mean aggregation")
    t = time.perf_counter()
    table = _patch_table(slide_id, scores, params.biomarkers)
    table_key = f"{prefix}/{PATCH_TABLE}"
    buffer = io.BytesIO()
    table.to_parquet(buffer, index=False)
    store.put_bytes(table_key, buffer.getvalue())
    results = [
        _aggregate(b, deployment.biomarkers[b], table, params.top_k) for b in params.biomarkers
    ]
    wall["aggregate"] = time.perf_counter() - t

    if params.heatmaps:
        report("heatmaps", 0, len(results), _STAGE_START["heatmaps"], "heatmaps")
        t = time.perf_counter()
        thumbnail = _thumbnail(reader, params.mask_downsample, masks.tissue.shape)
        for done, item in enumerate(results, start=1):
            budget.check()
            image = render_heatmap(thumbnail, table, item.biomarker, masks.downsample, masks.tissue)
            key = f"{prefix}/heatmap_{item.biomarker}.png"
            ok, png = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
            if not ok:
                raise InvalidInput(f"cannot encode the {item.biomarker} heatmap")
            store.put_bytes(key, png.tobytes(), content_type="image/png")
            item.heatmap_key = key
            report("heatmaps", done, len(results), _STAGE_START["heatmaps"] + 0.02 * done)
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
    return _finish(store, out, started, wall, engine.clock.seconds, engine.meter.summary(), report)


def _finish(
    store: ObjectStore,
    out: SlidePredictionResult,
    started: float,
    wall: dict[str, float],
    threads: dict[str, float],
    utilisation: dict[str, float],
    report: _Reporter,
) -> SlidePredictionResult:
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


class _Engine:
    """Reads, normalizes and scores the patches of one slide with overlapping stages."""

    def __init__(
        self,
        reader: SlideReader,
        grid: pd.DataFrame,
        params: PredictionParams,
        deployment: Deployment,
        scorer: PatchScorer,
        stains: SlideStains | None,
        hi_source: HighResSource,
        footprint: float,
        threshold: float,
        budget: WorkBudget,
        report: _Reporter,
        tissue: TissueRule,
    ) -> None:
        self.reader = reader
        self.tissue = tissue
        self.xs = grid["x"].to_numpy(np.int64)
        self.ys = grid["y"].to_numpy(np.int64)
        self.params = params
        self.deployment = deployment
        self.scorer = scorer
        self.stains = stains
        self.hi_source = hi_source
        self.footprint = footprint
        self.threshold = threshold
        self.budget = budget
        self.report = report
        self.meter = BusyMeter()
        self.clock = _Clock()
        self.scores = _Scores(
            cancer=np.full(len(grid), np.nan),
            hi_probs={b: [] for b in params.biomarkers},
        )
        #: The 40x windows queued so far (coordinator thread only).
        self.windows = WindowClaims(tissue)

    # -- work done on the pools ----------------------------------------------------
    def _normalized(self, rgb: np.ndarray) -> np.ndarray:
        if self.stains is None:
            return rgb
        with self.clock.time("normalize"):
            return self.stains.transform(rgb)

    def _read_20x(self, indices: np.ndarray) -> np.ndarray:
        grid = self.params.grid
        patches = []
        for i in indices:
            with self.clock.time("read_20x"):
                rgb = self.reader.read_patch(
                    int(self.xs[i]),
                    int(self.ys[i]),
                    grid.patch_px,
                    grid.target_mpp,
                    allow_upsample=grid.allow_upsample,
                )
            patches.append(self._normalized(rgb))
        return np.stack(patches)

    def _read_40x(self, *args: Any) -> np.ndarray:
        with self.clock.time("read_40x"):
            return self.reader.read_patch(*args)

    def _make_40x(
        self, work: list[tuple[int, np.ndarray, list[tuple[int, int]]]]
    ) -> tuple[list[dict[str, int]], np.ndarray]:
        """The 40x patches of ``work``: (20x patch index, its normalized pixels, the
        level-0 origins of the windows to make), with one table row each."""
        grid = self.params.grid
        rows: list[dict[str, int]] = []
        quads: list[np.ndarray] = []
        side = round(self.footprint / 2)
        upsampled = self.hi_source is HighResSource.UPSAMPLED
        for i, patch, windows in work:
            x, y = int(self.xs[i]), int(self.ys[i])
            with self.clock.time("make_40x") if upsampled else nullcontext():
                made = make_windows(
                    self.reader,
                    x,
                    y,
                    self.footprint,
                    windows,
                    source=self.hi_source,
                    patch_px=grid.patch_px,
                    low_mpp=grid.target_mpp,
                    normalize=self._normalized,
                    low_patch=patch,  # the normalized 20x patch
                    read=self._read_40x,
                )
            for (qx, qy), quad in zip(windows, made, strict=True):
                rows.append(
                    {
                        "x": qx,
                        "y": qy,
                        "width": side,
                        "height": side,
                        "parent": i,
                        "parent_x": x,
                        "parent_y": y,
                    }
                )
                quads.append(quad)
        return rows, np.stack(quads)

    def _claim_40x(
        self, indices: np.ndarray, patches20: np.ndarray
    ) -> list[tuple[int, np.ndarray, list[tuple[int, int]]]]:
        """The windows of these cancer 20x patches not queued yet, claimed now (in
        grid order: a window shared by overlapping patches goes to the first; those
        with too little usable tissue are left out), as in training
        (:class:`~services.slide.highres.WindowClaims`).

        Returns:
            (20x patch index, its pixels, level-0 origins of its unclaimed windows)
            for each patch with at least one.
        """
        work = []
        for i, patch in zip(indices, patches20, strict=True):
            fresh = self.windows.claim(int(self.xs[i]), int(self.ys[i]), self.footprint)
            if fresh:
                work.append((int(i), patch, fresh))
        return work

    def _score(self, model: DeployedModel, patches: np.ndarray, what: str) -> np.ndarray:
        with self.meter.request(), self.clock.time(what):
            outputs = self.scorer.score(model, patches)
        return np.array([float(o["probabilities"][-1]) for o in outputs], np.float64)

    # -- the coordinator -------------------------------------------------------------
    def run(self) -> _Scores:
        params = self.params
        n20 = len(self.xs)
        batches = [
            np.arange(start, min(start + params.batch_size, n20))
            for start in range(0, n20, params.batch_size)
        ]
        readers = ThreadPoolExecutor(params.reader_threads, thread_name_prefix="predict-read")
        scorers = ThreadPoolExecutor(params.max_in_flight, thread_name_prefix="predict-score")
        pending: dict[Future[Any], tuple[str, Any]] = {}
        ready20: deque[tuple[int, np.ndarray, np.ndarray]] = deque()  # (batch, indices, px)
        jobs40: deque[tuple[str, int, np.ndarray]] = deque()  # (biomarker, batch, patches)
        # Scored 20x batches waiting for an earlier one: taken in grid order, so that
        # a shared 40x window always goes to the same 20x patch.
        scored20: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        # Made 40x patches waiting for an earlier make: queued in grid order too, so
        # the 40x rows and every request's patches are the same whatever finishes
        # first (a request's answer may depend on the batch it went in).
        made40: dict[int, tuple[list[dict[str, int]], np.ndarray]] = {}
        next_make = 0
        next_queued = 0
        next_batch = 0
        next_taken = 0
        reads_out = 0  # 20x batches read or being read, not yet scored and taken
        in_flight = 0
        cancer_done = 0
        hi_expected = 0
        hi_done = 0
        backlog = params.read_ahead_batches * len(params.biomarkers) * 4
        failed = True
        try:
            while True:
                self.budget.check()
                while (
                    next_batch < len(batches)
                    and reads_out < params.read_ahead_batches
                    and len(jobs40) < backlog
                ):
                    indices = batches[next_batch]
                    job = readers.submit(self._read_20x, indices)
                    pending[job] = ("read", (next_batch, indices))
                    next_batch += 1
                    reads_out += 1
                while in_flight < params.max_in_flight and (jobs40 or ready20):
                    if jobs40:  # downstream first: bounded memory, early results
                        biomarker, number, patches = jobs40.popleft()
                        model = self.deployment.biomarkers[biomarker]
                        job = scorers.submit(self._score, model, patches, "biomarker_requests")
                        pending[job] = ("bio", (biomarker, number))
                    else:
                        number, indices, patches = ready20.popleft()
                        model = self.deployment.cancer
                        job = scorers.submit(self._score, model, patches, "cancer_requests")
                        pending[job] = ("cancer", (number, indices, patches))
                    in_flight += 1
                if not pending:
                    break
                done, _ = wait(list(pending), timeout=0.05, return_when=FIRST_COMPLETED)
                for future in done:
                    kind, payload = pending.pop(future)
                    value = future.result()  # re-raises the task's error
                    if kind == "read":
                        number, indices = payload
                        ready20.append((number, indices, value))
                    elif kind == "cancer":
                        in_flight -= 1
                        number, indices, patches = payload
                        self.scores.cancer[indices] = value
                        scored20[number] = (indices, patches, value > self.threshold)
                        while next_taken in scored20:
                            indices, patches, keep = scored20.pop(next_taken)
                            next_taken += 1
                            reads_out -= 1
                            cancer_done += len(indices)
                            work = self._claim_40x(indices[keep], patches[keep])
                            if work:
                                hi_expected += sum(len(windows) for _, _, windows in work)
                                made = readers.submit(self._make_40x, work)
                                pending[made] = ("make40", next_make)
                                next_make += 1
                    elif kind == "make40":
                        made40[payload] = value
                        while next_queued in made40:
                            rows, quads = made40.pop(next_queued)
                            next_queued += 1
                            self._queue_40x(rows, quads, jobs40)
                    else:
                        in_flight -= 1
                        biomarker, number = payload
                        self.scores.hi_probs[biomarker][number] = value
                        hi_done += len(value)
                self._progress(cancer_done, n20, hi_done, hi_expected)
            failed = False
        finally:
            for future in pending:
                future.cancel()
            # Readers touch the slide, which the caller closes next: wait for them.
            readers.shutdown(wait=True, cancel_futures=True)
            scorers.shutdown(wait=not failed, cancel_futures=True)
        return self.scores

    def _queue_40x(
        self,
        rows: list[dict[str, int]],
        quads: np.ndarray,
        jobs40: deque[tuple[str, int, np.ndarray]],
    ) -> None:
        size = self.params.batch_size
        for start in range(0, len(rows), size):
            number = len(self.scores.hi_batches)
            first = len(self.scores.hi_rows)
            chunk = rows[start : start + size]
            self.scores.hi_rows.extend(chunk)
            self.scores.hi_batches.append((first, first + len(chunk)))
            patches = quads[start : start + size]
            for biomarker in self.params.biomarkers:
                self.scores.hi_probs[biomarker].append(np.full(len(chunk), np.nan))
                jobs40.append((biomarker, number, patches))

    def _progress(self, cancer_done: int, n20: int, hi_done: int, hi_expected: int) -> None:
        models = len(self.params.biomarkers)
        cancer_share = cancer_done / max(n20, 1)
        bio_total = hi_expected * models
        # Until the detector finishes, the 40x work is extrapolated from what it kept.
        estimate = bio_total / max(cancer_share, 1e-9) if cancer_share else 0.0
        bio_share = hi_done * models / estimate if estimate else 0.0
        fraction = _STAGE_START["cancer_detection"] + _SCORING_SPAN * (
            0.3 * cancer_share + 0.7 * min(bio_share, 1.0)
        )
        if cancer_done < n20:
            self.report("cancer_detection", cancer_done, n20, fraction, "scoring 20x patches")
        else:
            self.report("biomarkers", hi_done, hi_expected, fraction, "scoring 40x patches")


def _patch_table(slide_id: str, scores: _Scores, biomarkers: tuple[str, ...]) -> pd.DataFrame:
    rows = scores.hi_rows
    parents = np.array([r["parent"] for r in rows], np.int64)
    table = pd.DataFrame(
        {
            "slide_id": slide_id,
            "x": np.array([r["x"] for r in rows], np.int64),
            "y": np.array([r["y"] for r in rows], np.int64),
            "width": np.array([r["width"] for r in rows], np.int64),
            "height": np.array([r["height"] for r in rows], np.int64),
            "parent_x": np.array([r["parent_x"] for r in rows], np.int64),
            "parent_y": np.array([r["parent_y"] for r in rows], np.int64),
            "cancer_probability": scores.cancer[parents],
        }
    )
    for biomarker in biomarkers:
        table[biomarker] = np.concatenate(scores.hi_probs[biomarker])
    return table


def _aggregate(
    biomarker: str, model: DeployedModel, table: pd.DataFrame, top_k: int
) -> BiomarkerResult:
    """Mean aggregation (the paper's) and the top-k supporting patches."""
    probabilities = table[biomarker].to_numpy(np.float64)
    probability = float(probabilities.mean())
    positive = probability >= model.threshold
    # Strongest support first; ties keep the table's (reading) order.
    order = np.argsort(-probabilities if positive else probabilities, kind="stable")[:top_k]
    top = [
        TopPatch(
            x=int(table["x"].iat[i]),
            y=int(table["y"].iat[i]),
            width=int(table["width"].iat[i]),
            height=int(table["height"].iat[i]),
            probability=float(probabilities[i]),
        )
        for i in order
    ]
    return BiomarkerResult(
        biomarker=biomarker,
        model_name=model.name,
        model_version=model.version,
        probability=probability,
        threshold=model.threshold,
        positive=bool(positive),
        patch_count=len(probabilities),
        top_patches=top,
    )


def _thumbnail(reader: SlideReader, downsample: float, shape: tuple[int, ...]) -> np.ndarray:
    """The slide's thumbnail at the masks' size (the level the masks came from)."""
    level = reader.best_level_for_downsample(downsample)
    image = reader.read_level(level)
    height, width = shape[:2]
    if image.shape[:2] != (height, width):
        image = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
    return image


def render_heatmap(
    thumbnail: np.ndarray,
    table: pd.DataFrame,
    biomarker: str,
    downsample: float,
    tissue: np.ndarray,
    alpha: float = 0.55,
) -> np.ndarray:
    """Patch probabilities as colours (turbo: blue 0 -> red 1) over the thumbnail.

    Args:
        thumbnail: uint8 RGB at the mask's size.
        table: The patch table (level-0 footprints and a column per biomarker).
        biomarker: The column to draw.
        downsample: Level-0 px per thumbnail px.
        tissue: The tissue mask (tissue outside scored patches is dimmed less than
            glass).
        alpha: Opacity of the colours over scored patches.

    Returns:
        uint8 RGB, the thumbnail's size.
    """
    height, width = thumbnail.shape[:2]
    values = np.zeros((height, width), np.float64)
    counts = np.zeros((height, width), np.float64)
    for x, y, w, h, p in zip(
        table["x"], table["y"], table["width"], table["height"], table[biomarker], strict=True
    ):
        x0, y0 = int(x / downsample), int(y / downsample)
        x1 = max(x0 + 1, round((x + w) / downsample))
        y1 = max(y0 + 1, round((y + h) / downsample))
        values[y0:y1, x0:x1] += p
        counts[y0:y1, x0:x1] += 1
    scored = counts > 0
    probability = np.divide(values, counts, out=np.zeros_like(values), where=scored)
    colours = cv2.applyColorMap(
        np.clip(probability * 255, 0, 255).astype(np.uint8), cv2.COLORMAP_TURBO
    )
    colours = cv2.cvtColor(colours, cv2.COLOR_BGR2RGB).astype(np.float64)
    base = thumbnail.astype(np.float64)
    grey = base.mean(axis=2, keepdims=True).repeat(3, axis=2)
    out = np.where(tissue[..., None], 0.5 * base + 0.5 * grey, grey * 0.6 + 102)
    out = np.where(scored[..., None], (1 - alpha) * base + alpha * colours, out)
    return np.clip(out, 0, 255).astype(np.uint8)
