"""gRPC adapter of the PredictionService: `histomarker serve prediction`.

The logic lives beside this file without any gRPC import (``pipeline``: the
per-slide stages; ``models``: which models are deployed and how patches are
scored); this module converts messages and binds it to
``histomarker.v1.PredictionService``.

Admission control: at most ``max_concurrent_predictions`` slides are predicted at
once and at most ``max_queued_predictions`` more wait for a slot (honouring their
deadline and cancellation while they wait); a call beyond that is refused at once
with RESOURCE_EXHAUSTED. The gRPC thread pool is sized above both, so refused calls
and ListModels/health answer even when the queue is full.

Uploads (UploadAndPredict): the first message carries the metadata, the rest the
file's bytes. A declared size above ``max_upload_mb`` is RESOURCE_EXHAUSTED before a
byte is read; more bytes than declared, fewer, or another sha256 is
INVALID_ARGUMENT. The bytes go to a local file while hashed and are put to
``slides/{slide_id}.{ext}`` (atomically, so a failed upload leaves nothing) only
once checked. An upload takes its admission slot before its bytes are read.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
import threading
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path, PurePosixPath
from typing import Any

import grpc
from pydantic import Field, SecretStr, model_validator

from services.common.cancellation import WorkBudget
from services.common.errors import (
    FailedPrecondition,
    HistomarkerError,
    InvalidInput,
    NotFound,
    ResourceExhausted,
)
from services.common.grpc_server import HistomarkerServer, ServiceBinding, create_server, serve
from services.common.objectstore import ObjectStore
from services.common.qc_messages import qc_to_proto
from services.common.refs import served_key
from services.common.settings import DEFAULT_PORTS, ServiceSettings
from services.common.streaming import Report, run_streaming
from services.common.stubs.histomarker.v1 import common_pb2, prediction_pb2, prediction_pb2_grpc
from services.common.vocabulary import (
    BIOMARKER_ENUMS,
    BIOMARKER_NAMES,
    BIOMARKERS,
    CANCER_DETECTOR,
)
from services.inference.torchserve import KeyFile, RestClient, Token, TorchServeGrpcClient
from services.mil.bags import read_bag
from services.prediction.mil_models import MilModels, ServedMilModels
from services.prediction.mil_pipeline import (
    MilParams,
    check_pair,
    predict_from_bag,
    predict_slide_mil,
)
from services.prediction.models import (
    DeployedModel,
    ModelRegistry,
    PatchScorer,
    TorchServeScorer,
    ordered,
)
from services.prediction.pipeline import PredictionParams, predict_slide
from services.prediction.results import (
    PIPELINE_MIL,
    PIPELINE_PAPER,
    ProgressEvent,
    SlidePredictionResult,
)
from services.slide.grid import GridParams
from services.slide.qc import QcSettings, QcThresholds
from services.slide.reader import open_slide
from services.slide.slides import SlideCache, slide_id_for
from services.slide.stain import StainMatrix, builtin_reference

SERVICE_NAME = "histomarker.v1.PredictionService"
#: File extensions an uploaded slide may have (one file; DICOM and MRXS are folders).
UPLOAD_EXTENSIONS = ("svs", "tif", "tiff", "ndpi", "scn", "svslide", "bif", "vms", "qptiff")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_POLICIES = {
    common_pb2.HIGH_RES_POLICY_NATIVE: "native",
    common_pb2.HIGH_RES_POLICY_UPSAMPLE: "upsample",
}
_STATUSES = {
    "ok": prediction_pb2.PREDICTION_STATUS_OK,
    "no_tissue": prediction_pb2.PREDICTION_STATUS_NO_TISSUE,
    "no_cancer_patches": prediction_pb2.PREDICTION_STATUS_NO_CANCER_PATCHES,
    "qc_failed": prediction_pb2.PREDICTION_STATUS_QC_FAILED,
    "out_of_distribution": prediction_pb2.PREDICTION_STATUS_OUT_OF_DISTRIBUTION,
}
_PIPELINES = {
    prediction_pb2.PREDICTION_PIPELINE_PAPER: PIPELINE_PAPER,
    prediction_pb2.PREDICTION_PIPELINE_MIL: PIPELINE_MIL,
}
_PIPELINE_ENUMS = {name: value for value, name in _PIPELINES.items()}
#: One prediction job once its models are found: (slide_id, local path, digest,
#: budget, progress) -> the message.
Job = Callable[
    [str, Path, str, WorkBudget, Callable[[ProgressEvent], None] | None],
    prediction_pb2.SlidePrediction,
]
_SOURCES = {
    "native": common_pb2.HIGH_RES_SOURCE_NATIVE,
    "upsampled": common_pb2.HIGH_RES_SOURCE_UPSAMPLED,
}
_ESTIMATES = ("patch_auroc", "slide_auroc", "patch_auprc", "slide_auprc", "slide_mcc_f1")


class PredictionSettings(QcSettings):
    """Settings of the PredictionService (environment prefix ``HISTOMARKER_``)."""

    service_name: str = "prediction"
    port: int = DEFAULT_PORTS["prediction"]
    #: Threads of the gRPC server: above the admitted predictions, so that refusals,
    #: ListModels and health checks are answered when the queue is full.
    max_workers: int = Field(default=16, ge=1, le=256)
    #: The bucket this service serves (refs naming another bucket are refused).
    bucket: str = "histomarker"
    #: Local folder for downloaded and uploaded slides; a temporary folder when unset.
    slide_cache_dir: Path | None = None
    #: TorchServe's gRPC inference API, HOST:PORT.
    torchserve_grpc_target: str = "127.0.0.1:7070"
    #: TorchServe's REST management API (model discovery).
    torchserve_management_url: str = "http://127.0.0.1:8081"
    #: TorchServe's inference key (token authorization); from the environment only.
    torchserve_inference_token: SecretStr | None = None
    #: TorchServe's management key; from the environment only.
    torchserve_management_token: SecretStr | None = None
    #: TorchServe's ``key_file.json``, read for the keys not given (local stacks).
    torchserve_key_file: Path | None = None
    #: Seconds one TorchServe request may take.
    torchserve_timeout_s: float = Field(default=120.0, gt=0)
    #: Seconds a discovery of the deployed models is reused.
    model_cache_s: float = Field(default=5.0, ge=0)
    #: Slides predicted at once.
    max_concurrent_predictions: int = Field(default=2, ge=1)
    #: Slides waiting for a slot; one more call gets RESOURCE_EXHAUSTED.
    max_queued_predictions: int = Field(default=4, ge=0)
    #: Largest slide upload, in mebibytes.
    max_upload_mb: int = Field(default=4096, ge=1)
    #: Store key of the stain reference (a StainMatrix JSON) patches are normalized
    #: to, or ``none``; unset means what the cancer detector was trained on (its
    #: model.json: a key, the built-in reference, or none).
    stain_reference_key: str | None = None
    #: Stain normalization method (``vahadane`` or ``macenko``).
    stain_method: str = "vahadane"
    #: Overlap of neighbouring 20x patches, px at 20x (below the 512 px patch); unset
    #: means the grid the cancer detector was trained on (its model.json; 0 = plain).
    grid_overlap_px: int | None = Field(default=None, ge=0, lt=GridParams().patch_px)
    #: Patches per TorchServe request.
    batch_size: int = Field(default=16, ge=1, le=1024)
    #: TorchServe requests in flight per slide.
    max_in_flight: int = Field(default=4, ge=1, le=64)
    #: Threads reading and normalizing patches per slide.
    reader_threads: int = Field(default=2, ge=1, le=64)
    #: Pipeline of a request that does not choose one: ``paper`` (cancer detector and
    #: one patch CNN per biomarker) or ``mil`` (encoder_<name> and mil_<name>).
    pipeline: str = Field(default=PIPELINE_PAPER, pattern="^(paper|mil)$")
    #: Patches per encoder request of the MIL pipeline.
    encoder_batch_size: int = Field(default=32, ge=1, le=256)

    @model_validator(mode="after")
    def _threads_for_the_queue(self) -> PredictionSettings:
        admitted = self.max_concurrent_predictions + self.max_queued_predictions
        if admitted > self.max_workers - 2:
            raise ValueError(
                f"max_workers ({self.max_workers}) must exceed max_concurrent_predictions + "
                f"max_queued_predictions ({admitted}) by 2, so refusals are answered"
            )
        return self

    @property
    def max_upload_bytes(self) -> int:
        return self.max_upload_mb * 1024 * 1024


class Admission:
    """A bounded queue of predictions: ``max_running`` at once, ``max_queued`` waiting.

    Args:
        max_running: Predictions run at once.
        max_queued: Predictions that may wait for a slot.
    """

    def __init__(self, max_running: int, max_queued: int) -> None:
        self.max_running = max_running
        self.max_queued = max_queued
        self._cond = threading.Condition()
        self.running = 0
        self.waiting = 0

    @contextmanager
    def slot(
        self, budget: WorkBudget, on_wait: Callable[[int], None] | None = None
    ) -> Iterator[None]:
        """Hold a slot for the ``with`` block.

        Raises:
            ResourceExhausted: The queue is full.
            DeadlineExceeded, Cancelled: The budget ran out while waiting.
        """
        with self._cond:
            if self.running + self.waiting >= self.max_running + self.max_queued:
                raise ResourceExhausted(
                    f"the prediction queue is full ({self.running} running, {self.waiting} "
                    "waiting): retry later"
                )
            self.waiting += 1
            try:
                while self.running >= self.max_running:
                    budget.check()
                    if on_wait is not None:
                        on_wait(self.waiting)
                    self._cond.wait(0.1)
            finally:
                self.waiting -= 1
            self.running += 1
        try:
            yield
        finally:
            with self._cond:
                self.running -= 1
                self._cond.notify()


def _management_client(settings: PredictionSettings, token: Token) -> RestClient:
    url = urllib.parse.urlsplit(settings.torchserve_management_url)
    if url.scheme != "http" or not url.hostname:
        raise InvalidInput(
            f"torchserve_management_url {settings.torchserve_management_url!r} must be "
            "http://HOST:PORT"
        )
    return RestClient(url.hostname, url.port or 80, token, settings.torchserve_timeout_s)


def _tokens(settings: PredictionSettings) -> tuple[Token, Token]:
    """The inference and management keys: the settings' own, else from the key file,
    read again whenever TorchServe writes new keys (at each of its starts), so the
    service goes on scoring after a TorchServe restart."""
    inference = settings.torchserve_inference_token
    management = settings.torchserve_management_token
    keys = None
    if settings.torchserve_key_file is not None and (inference is None or management is None):
        keys = KeyFile(settings.torchserve_key_file)
    return (
        inference.get_secret_value() if inference else (keys.inference if keys else None),
        management.get_secret_value() if management else (keys.management if keys else None),
    )


class PredictionServicer(prediction_pb2_grpc.PredictionServiceServicer):
    """Implements ``histomarker.v1.PredictionService``.

    Args:
        settings: The service's settings.
        scorer: Scores patches; TorchServe's gRPC API by default.
        registry: Finds the deployed models; TorchServe's management API and the
            store by default.
    """

    def __init__(
        self,
        settings: PredictionSettings,
        scorer: PatchScorer | None = None,
        registry: ModelRegistry | None = None,
        mil_models: MilModels | None = None,
    ) -> None:
        self.settings = settings
        self.store: ObjectStore = settings.open_store()
        self.slides = SlideCache.of(self.store, settings.slide_cache_dir)
        self.cache_dir = self.slides.folder
        self.admission = Admission(
            settings.max_concurrent_predictions, settings.max_queued_predictions
        )
        inference_token, management_token = _tokens(settings)
        # One TorchServe client for the patch scorer and the MIL models (it connects
        # on first use).
        client = TorchServeGrpcClient(
            settings.torchserve_grpc_target, inference_token, settings.torchserve_timeout_s
        )
        self.scorer = scorer or TorchServeScorer(client)
        management = _management_client(settings, management_token)
        self.registry = registry or ModelRegistry(self.store, management, settings.model_cache_s)
        self.mil_models: MilModels = mil_models or ServedMilModels(
            self.store, management, client, settings.model_cache_s
        )
        #: Finished predictions by status name (OK, CANCELLED, ...): for tests and logs.
        self.outcomes: Counter[str] = Counter()
        self._outcomes_lock = threading.Lock()

    # -- helpers ---------------------------------------------------------------------
    def _key(self, ref: common_pb2.ObjectRef, what: str) -> str:
        return served_key(ref, self.settings.bucket, what)

    def _ref(self, key: str) -> common_pb2.ObjectRef:
        return common_pb2.ObjectRef(bucket=self.settings.bucket, key=key)

    def _params(self, options: prediction_pb2.PredictionOptions) -> PredictionParams:
        biomarkers = []
        for value in options.biomarkers:
            if value not in BIOMARKER_NAMES:
                raise InvalidInput(f"options.biomarkers: {value} is not a biomarker")
            biomarkers.append(BIOMARKER_NAMES[value])
        if not 0 <= options.top_k <= 64:
            raise InvalidInput(f"options.top_k must be within 0-64, got {options.top_k}")
        return PredictionParams(
            biomarkers=tuple(biomarkers) or BIOMARKERS,
            top_k=options.top_k or 8,
            heatmaps=not options.skip_heatmaps,
            cancer_confidence=options.cancer_confidence
            if options.HasField("cancer_confidence")
            else None,
            high_res_policy=_POLICIES.get(options.high_res_policy, "auto"),
            stain_method=self.settings.stain_method,
            qc=QcThresholds.from_settings(self.settings),
            batch_size=self.settings.batch_size,
            max_in_flight=self.settings.max_in_flight,
            reader_threads=self.settings.reader_threads,
            answer_out_of_distribution=options.answer_out_of_distribution,
            geojson=options.geojson,
        )

    def _pipeline(self, options: prediction_pb2.PredictionOptions) -> str:
        if options.pipeline and options.pipeline not in _PIPELINES:
            raise InvalidInput(f"options.pipeline: {options.pipeline} is not a pipeline")
        return _PIPELINES.get(options.pipeline, self.settings.pipeline)

    def _mil_params(self, options: prediction_pb2.PredictionOptions) -> MilParams:
        paper = self._params(options)  # the same checks of the shared options
        return MilParams(
            biomarkers=paper.biomarkers,
            top_k=paper.top_k,
            heatmaps=paper.heatmaps,
            answer_out_of_distribution=options.answer_out_of_distribution,
            qc=paper.qc,
            batch_size=self.settings.encoder_batch_size,
            geojson=paper.geojson,
        )

    def _plan(
        self, options: prediction_pb2.PredictionOptions, before_models: Callable[[], Any]
    ) -> Job:
        """Check the options, call ``before_models`` (the slide's NOT_FOUND comes before
        the models' FAILED_PRECONDITION), find the models; returns the job that
        predicts one slide with them. Every error comes before queueing."""
        pipeline = self._pipeline(options)
        if options.mil_model and pipeline != PIPELINE_MIL:
            raise InvalidInput(
                f"options.mil_model names a MIL head ({options.mil_model}) but the pipeline is "
                "the paper's, which has none: set options.pipeline to PREDICTION_PIPELINE_MIL "
                "or leave mil_model empty"
            )
        if pipeline == PIPELINE_MIL:
            mil = self._mil_params(options)
            before_models()
            embedder, head = self.mil_models.pair(options.mil_model)
            check_pair(embedder, head)
            # An encoder trained on normalized patches (the paper's CNNs) sees them so.
            stain = getattr(embedder, "stain_reference", None)
            reference = self._reference(stain) if stain is not None else None

            def mil_job(
                slide_id: str,
                path: Path,
                digest: str,
                budget: WorkBudget,
                progress: Callable[[ProgressEvent], None] | None,
            ) -> prediction_pb2.SlidePrediction:
                with open_slide(path) as reader:
                    result = predict_slide_mil(
                        reader,
                        slide_id,
                        self.store,
                        embedder,
                        head,
                        mil,
                        slide_digest=digest,
                        ood=self._ood(),
                        progress=progress,
                        budget=budget,
                        reference=reference,
                        stain_method=self.settings.stain_method,
                    )
                return self._prediction(result)

            return mil_job
        params = self._params(options)
        before_models()
        self.registry.deployment(params.biomarkers)

        def paper_job(
            slide_id: str,
            path: Path,
            digest: str,
            budget: WorkBudget,
            progress: Callable[[ProgressEvent], None] | None,
        ) -> prediction_pb2.SlidePrediction:
            return self._run(slide_id, path, digest, params, budget, progress)

        return paper_job

    def _ood(self) -> Any:
        """The out-of-distribution reference stored beside the deployed cancer
        detector, None when there is none (or no detector is deployed: a MIL-only
        service then answers unchecked)."""
        try:
            return self.registry.deployment(()).ood
        except FailedPrecondition:
            return None

    def _reference(self, trained_with: str = "") -> StainMatrix | None:
        """The stain reference: the service's setting, else the one the models were
        trained on (empty: the built-in reference; ``none``: no normalization)."""
        key = self.settings.stain_reference_key or trained_with
        if key.lower() == "none":
            return None
        if not key:
            return builtin_reference(self.settings.stain_method)
        if not self.store.exists(key):
            raise NotFound(f"the stain reference {key} is not in the store")
        return StainMatrix.from_json(self.store.get_bytes(key).decode())

    def _grid(self, trained_with: int = 0) -> GridParams:
        """The 20x grid: the service's overlap setting, else the overlap of the grid
        the cancer detector was trained on (px at 20x; 0 = plain grid).

        Raises:
            FailedPrecondition: The detector records an overlap of a patch or more.
        """
        overlap = self.settings.grid_overlap_px
        if overlap is None:
            overlap = trained_with
        grid = GridParams()
        if not 0 <= overlap < grid.patch_px:
            raise FailedPrecondition(
                f"the cancer detector was trained on a 20x grid overlapping by {overlap} px: "
                f"the {grid.patch_px} px patches need less; set grid_overlap_px"
            )
        return replace(grid, overlap_px=overlap)

    @staticmethod
    def _budget(context: grpc.ServicerContext) -> WorkBudget:
        return WorkBudget(context.time_remaining(), lambda: not context.is_active())

    def _counted(self, work: Callable[[], Any]) -> Any:
        status = "OK"
        try:
            return work()
        except HistomarkerError as exc:
            status = exc.status_name
            raise
        except BaseException:
            status = "INTERNAL"
            raise
        finally:
            with self._outcomes_lock:
                self.outcomes[status] += 1

    def _run(
        self,
        slide_id: str,
        path: Path,
        digest: str,
        params: PredictionParams,
        budget: WorkBudget,
        progress: Callable[[ProgressEvent], None] | None,
    ) -> prediction_pb2.SlidePrediction:
        deployment = self.registry.deployment(params.biomarkers)
        cancer = deployment.cancer.config
        params = replace(params, grid=self._grid(cancer.grid_overlap_px))
        with open_slide(path) as reader:
            result = predict_slide(
                reader,
                slide_id,
                self.store,
                deployment,
                self.scorer,
                params,
                reference=self._reference(cancer.stain_reference),
                slide_digest=digest,
                progress=progress,
                budget=budget,
            )
        return self._prediction(result)

    def _predict_stored(
        self,
        request: Any,
        context: grpc.ServicerContext,
        progress: Callable[[ProgressEvent], None] | None = None,
    ) -> prediction_pb2.SlidePrediction:
        if not request.slide.HasField("object"):
            raise InvalidInput("slide: the slide's object reference is required")
        key = self._key(request.slide.object, "slide.object")
        slide_id = slide_id_for(request.slide.slide_id, key)
        stat: list[Any] = []
        job = self._plan(request.options, lambda: stat.append(self.store.stat(key)))
        info = stat[0]
        budget = self._budget(context)

        def waiting(count: int) -> None:
            if progress is not None:
                progress(ProgressEvent("queued", 0, 0, 0.0, f"waiting for a slot ({count})"))

        def work() -> prediction_pb2.SlidePrediction:
            with self.admission.slot(budget, waiting):
                path = self.slides.local_path(key)
                digest = info.sha256 or info.etag
                return job(slide_id, path, digest, budget, progress)

        return self._counted(work)

    # -- messages --------------------------------------------------------------------
    def _prediction(self, result: SlidePredictionResult) -> prediction_pb2.SlidePrediction:
        message = prediction_pb2.SlidePrediction(
            slide_id=result.slide_id,
            status=_STATUSES[result.status],
            status_message=result.message,
            cancer_patch_fraction=result.cancer_patch_fraction,
            tissue_patch_count=result.tissue_patch_count,
            cancer_patch_count=result.cancer_patch_count,
            cancer_confidence=result.cancer_confidence,
            high_res_source=_SOURCES.get(result.high_res_source, 0),  # type: ignore[arg-type]
            cancer_model_name=result.cancer_model_name,
            cancer_model_version=result.cancer_model_version,
            params_hash=result.params_hash,
            tissue_mask=self._ref(result.tissue_mask_key),
            elapsed_seconds=result.elapsed_s,
            qc=qc_to_proto(result.qc),
            pipeline=_PIPELINE_ENUMS.get(result.pipeline, 0),  # type: ignore[arg-type]
            encoder_model_name=result.encoder_model_name,
            encoder_model_version=result.encoder_model_version,
            encoder_sha256=result.encoder_sha256,
            mil_model_name=result.mil_model_name,
            mil_model_version=result.mil_model_version,
        )
        if not result.tissue_mask_key:
            message.ClearField("tissue_mask")
        if result.patch_table_key:
            message.patch_table.CopyFrom(self._ref(result.patch_table_key))
        if result.bag_key:
            message.bag.CopyFrom(self._ref(result.bag_key))
        if result.geojson_key:
            message.geojson.CopyFrom(self._ref(result.geojson_key))
        if result.training_data:
            message.training_data.CopyFrom(training_data_message(result.training_data))
        if result.out_of_distribution:
            ood = result.out_of_distribution
            message.out_of_distribution.CopyFrom(
                prediction_pb2.OutOfDistribution(
                    out_of_distribution=bool(ood.get("out_of_distribution")),
                    distance=float(ood.get("distance", 0.0)),
                    threshold=float(ood.get("threshold", 0.0)),
                    basis=str(ood.get("basis", "")),
                    patch_count=int(ood.get("patch_count", 0)),
                )
            )
        for item in result.biomarkers:
            biomarker = prediction_pb2.BiomarkerPrediction(
                biomarker=BIOMARKER_ENUMS[item.biomarker],
                probability=item.probability,
                call=prediction_pb2.BIOMARKER_CALL_POSITIVE
                if item.positive
                else prediction_pb2.BIOMARKER_CALL_NEGATIVE,
                threshold=item.threshold,
                patch_count=item.patch_count,
                model_name=item.model_name,
                model_version=item.model_version,
            )
            for top in item.top_patches:
                biomarker.top_patches.append(
                    prediction_pb2.TopPatch(
                        patch=common_pb2.PatchRef(
                            slide_id=result.slide_id,
                            x=top.x,
                            y=top.y,
                            width=top.width,
                            height=top.height,
                            mpp=result.patch_mpp,
                            size_px=result.patch_px,
                        ),
                        probability=top.probability,
                        attention=top.attention,
                    )
                )
            if item.heatmap_key:
                biomarker.heatmap.CopyFrom(self._ref(item.heatmap_key))
            message.biomarkers.append(biomarker)
        return message

    def _model_info(self, model: DeployedModel) -> common_pb2.ModelInfo:
        detector = model.name == CANCER_DETECTOR
        info = common_pb2.ModelInfo(
            name=model.name,
            version=model.version,
            kind=common_pb2.MODEL_KIND_CANCER_DETECTOR
            if detector
            else common_pb2.MODEL_KIND_BIOMARKER,
            biomarker=BIOMARKER_ENUMS.get(model.biomarker or "", 0),  # type: ignore[arg-type]
            architecture=model.config.backbone,
            temperature=model.config.temperature,
            threshold=model.threshold,
            input_mpp=0.5 if detector else 0.25,
            input_size_px=512,
            serving=model.serving,
        )
        validation = model.validation()
        for name in _ESTIMATES:
            value = validation.get(name)
            if isinstance(value, dict) and "value" in value:
                point = float(value["value"])
                getattr(info.validation, name).CopyFrom(
                    common_pb2.Estimate(
                        value=point,
                        ci_low=float(value.get("ci_low") or point),
                        ci_high=float(value.get("ci_high") or point),
                        confidence=float(value.get("confidence") or 0.0),
                    )
                )
        info.validation.slide_count = int(validation.get("slide_count", 0))
        info.validation.patch_count = int(validation.get("patch_count", 0))
        info.validation.dataset = str(validation.get("dataset", ""))
        if model.archive_key:
            info.archive.CopyFrom(self._ref(model.archive_key))
        if model.trained_at is not None:
            info.trained_at.FromDatetime(model.trained_at)
        if model.training_data:  # unset when the model card does not say
            info.training_data.CopyFrom(training_data_message(model.training_data))
        return info

    # -- RPCs ------------------------------------------------------------------------
    def PredictSlide(self, request: Any, context: grpc.ServicerContext) -> Any:
        prediction = self._predict_stored(request, context)
        return prediction_pb2.PredictSlideResponse(prediction=prediction)

    def PredictFromBag(self, request: Any, context: grpc.ServicerContext) -> Any:
        if not request.HasField("bag") or not request.bag.key:
            raise InvalidInput("bag: the bag's object reference is required")
        key = self._key(request.bag, "bag")
        params = self._mil_params(request.options)
        info = self.store.stat(key)  # NOT_FOUND before the head's FAILED_PRECONDITION
        head = self.mil_models.head(request.options.mil_model)
        if request.bag.HasField("sha256") and info.sha256 and info.sha256 != request.bag.sha256:
            raise InvalidInput(f"bag {key}: its sha256 is {info.sha256}, not {request.bag.sha256}")

        def work() -> Any:
            with tempfile.TemporaryDirectory(prefix="bag-", dir=self.cache_dir) as folder:
                path = Path(folder) / "bag.h5"
                path.write_bytes(self.store.get_bytes(key))
                bag = read_bag(path)
            result = predict_from_bag(
                bag,
                self.store,
                head,
                params,
                bag_key=key,
                bag_digest=info.sha256 or info.etag,
            )
            return prediction_pb2.PredictFromBagResponse(prediction=self._prediction(result))

        return self._counted(work)

    def PredictSlideStream(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        def work(report: Report) -> Any:
            return self._predict_stored(request, context, report)

        for kind, event in run_streaming(work, "predict-stream"):
            if kind == "result":
                yield prediction_pb2.PredictSlideStreamResponse(result=event)
                continue
            yield prediction_pb2.PredictSlideStreamResponse(
                progress=common_pb2.Progress(
                    stage=event.stage,
                    done=event.done,
                    total=event.total,
                    fraction=event.fraction,
                    message=event.message,
                )
            )

    def UploadAndPredict(self, requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
        messages = iter(requests)
        first = next(messages, None)
        if first is None or first.WhichOneof("content") != "metadata":
            raise InvalidInput("the first message must carry the upload's metadata")
        meta = first.metadata
        name = meta.filename
        if not name or PurePosixPath(name).name != name or "\\" in name:
            raise InvalidInput(f"metadata.filename {name!r} must be a bare file name")
        extension = name.rsplit(".", 1)[-1].lower() if "." in name else ""
        if extension not in UPLOAD_EXTENSIONS:
            raise InvalidInput(
                f"metadata.filename {name!r}: the extension must be one of "
                f"{', '.join(UPLOAD_EXTENSIONS)}"
            )
        if meta.size_bytes <= 0:
            raise InvalidInput("metadata.size_bytes must be the file's size, > 0")
        if meta.size_bytes > self.settings.max_upload_bytes:
            raise ResourceExhausted(
                f"the upload of {meta.size_bytes} bytes exceeds the limit of "
                f"{self.settings.max_upload_mb} MiB"
            )
        if not _SHA256.match(meta.sha256):
            raise InvalidInput("metadata.sha256 must be 64 lowercase hex characters")
        slide_id = slide_id_for(meta.slide_id, name)
        key = f"slides/{slide_id}.{extension}"
        job = self._plan(meta.options, lambda: None)
        budget = self._budget(context)

        def work() -> Any:
            with self.admission.slot(budget):
                folder = Path(tempfile.mkdtemp(prefix="upload-", dir=self.cache_dir))
                try:
                    path = folder / f"{slide_id}.{extension}"
                    self._receive(messages, meta.size_bytes, meta.sha256, path, budget)
                    with open_slide(path):  # a file no reader opens is refused, not stored
                        pass
                    stored = self.store.put_file(key, path)
                    prediction = job(slide_id, path, meta.sha256, budget, None)
                finally:
                    shutil.rmtree(folder, ignore_errors=True)
            slide = common_pb2.ObjectRef(
                bucket=self.settings.bucket,
                key=key,
                sha256=meta.sha256,
                size_bytes=stored.size_bytes,
            )
            return prediction_pb2.UploadAndPredictResponse(slide=slide, prediction=prediction)

        return self._counted(work)

    @staticmethod
    def _receive(
        messages: Iterator[Any], size: int, sha256: str, path: Path, budget: WorkBudget
    ) -> None:
        """Write the chunks to ``path``, checking their size and sha256."""
        digest = hashlib.sha256()
        received = 0
        with path.open("wb") as out:
            for number, message in enumerate(messages, start=1):
                budget.check()
                if message.WhichOneof("content") != "chunk":
                    raise InvalidInput(f"message {number}: only the first carries metadata")
                received += len(message.chunk)
                if received > size:
                    raise InvalidInput(f"the upload sent more than the declared {size} bytes")
                digest.update(message.chunk)
                out.write(message.chunk)
        if received != size:
            raise InvalidInput(f"the upload sent {received} bytes, {size} declared")
        if digest.hexdigest() != sha256:
            raise InvalidInput(
                f"the upload's sha256 is {digest.hexdigest()}, the metadata says {sha256}"
            )

    def ListModels(self, request: Any, context: grpc.ServicerContext) -> Any:
        wanted = set()
        for value in request.biomarkers:
            if value not in BIOMARKER_NAMES:
                raise InvalidInput(f"biomarkers: {value} is not a biomarker")
            wanted.add(BIOMARKER_NAMES[value])
        models, _ = self.registry.deployed()
        chosen = [
            m
            for m in models.values()
            if not wanted or (m.biomarker is not None and m.biomarker in wanted)
        ]
        return prediction_pb2.ListModelsResponse(
            models=[self._model_info(m) for m in ordered(chosen)]
        )


def training_data_message(data: dict[str, Any]) -> common_pb2.TrainingData:
    """A model card's ``training_data`` as the proto's TrainingData."""
    message = common_pb2.TrainingData(
        cohort=str(data.get("cohort") or ""),
        sites=[str(s) for s in data.get("sites") or ()],
        slide_count=int(data.get("n_slides") or 0),
        patient_count=int(data.get("n_patients") or 0),
    )
    if data.get("synthetic") is not None:
        message.synthetic = bool(data["synthetic"])
    return message


def bindings(settings: PredictionSettings | None = None) -> list[ServiceBinding]:
    """The service this process hosts."""
    servicer = PredictionServicer(settings or PredictionSettings())
    return [
        ServiceBinding(
            SERVICE_NAME, servicer, prediction_pb2_grpc.add_PredictionServiceServicer_to_server
        )
    ]


def create(settings: ServiceSettings | None = None) -> tuple[HistomarkerServer, int]:
    """Build the server (bound, not started) and return it with its port."""
    prediction = (
        settings
        if isinstance(settings, PredictionSettings)
        else PredictionSettings(**settings.model_dump())
        if settings is not None
        else PredictionSettings()
    )
    return create_server(prediction, bindings(prediction))


def main() -> None:
    """Serve until SIGTERM/SIGINT."""
    settings = PredictionSettings()
    serve(settings, bindings(settings))


if __name__ == "__main__":
    main()
