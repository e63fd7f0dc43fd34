"""PredictionService end to end: real gRPC, a real TorchServe, models trained here.

The module trains a tiny cancer_detector and six tiny biomarker models on synthetic
patch shards (a few seconds each), packs them as .mar archives, publishes them
under ``models/{name}/{version}/`` in a file:// store, registers them on a
TorchServe started on 127.0.0.1 with free ports and its own folder, and serves the
PredictionService on port 0. The slides are synthetic ``tiny`` WSIs (4096x3072 px at
0.25 µm/px). The tests that take models away (missing model, TorchServe stopped)
run last.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pandas as pd
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tiny_models import ALL_MODELS, publish_models, train_tiny, training_cohort

from services import cli
from services.common.errors import InvalidInput, ResourceExhausted
from services.common.grpc_client import open_channel
from services.common.grpc_server import HistomarkerServer, ServiceBinding, create_server
from services.common.objectstore import ObjectStore, open_store
from services.common.qc_messages import qc_from_proto
from services.common.stubs.histomarker.v1 import common_pb2, prediction_pb2, prediction_pb2_grpc
from services.common.vocabulary import BIOMARKERS
from services.inference.torchserve import TorchServe, TorchServeConfig
from services.prediction.client import PredictionClient, file_digest, options_of
from services.prediction.models import CANCER_DETECTOR, LocalScorer
from services.prediction.pipeline import PredictionParams, predict_slide
from services.prediction.server import SERVICE_NAME, PredictionServicer, PredictionSettings
from services.slide.qc import ARTIFACTS, QcThresholds
from services.slide.reader import open_slide
from services.slide.stain import builtin_reference
from services.synth.cohort import generate_cohort

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("java") is None, reason="TorchServe needs Java 17"),
]

SLIDES_PER_CLASS = 4
MAX_UPLOAD_MB = 64
#: Keeps every 20x tissue patch as cancer: the tiny detector was not trained on
#: these slides, and the tests exercise the service, not the model.
KEEP_ALL = 0.0


@dataclass
class Stack:
    store: ObjectStore
    torchserve: TorchServe
    servicer: PredictionServicer
    server: HistomarkerServer
    target: str
    channel: grpc.Channel
    stub: prediction_pb2_grpc.PredictionServiceStub
    bundles: dict[str, Path]
    metrics: dict[str, dict]
    slide_key: str
    slide_path: Path


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("prediction")
    store = open_store((root / "store").as_uri())
    manifest = training_cohort(store, 2 * SLIDES_PER_CLASS)
    names = list(ALL_MODELS)
    bundles = {
        name: train_tiny(store, manifest, name, root / "train" / name, detector_epochs=2)
        for name in names
    }
    model_store = root / "model-store"
    mars = publish_models(store, bundles, model_store)
    metrics = {n: json.loads((bundles[n] / "metrics.json").read_text()) for n in names}

    cohort = root / "cohort"
    generate_cohort(cohort, 2, seed=5, preset="tiny", truth_crops=0)
    table = pd.read_csv(cohort / "manifest.csv")
    row = table[table["kind"] == "cancer"].iloc[0]
    slide_path = cohort / row["slide_path"]
    slide_key = f"slides/{slide_path.name}"
    store.put_file(slide_key, slide_path)

    config = TorchServeConfig.with_free_ports(model_store, root / "torchserve")
    torchserve = TorchServe(config).start()
    try:
        with ThreadPoolExecutor(len(mars)) as pool:
            list(pool.map(lambda m: torchserve.register(m, initial_workers=1), mars.values()))
        settings = PredictionSettings(
            port=0,
            store_url=store.url,
            slide_cache_dir=root / "slide-cache",
            torchserve_grpc_target=torchserve.grpc_inference_target,
            torchserve_management_url=torchserve.management_url,
            torchserve_key_file=config.work_dir / "key_file.json",
            max_concurrent_predictions=1,
            max_queued_predictions=1,
            max_upload_mb=MAX_UPLOAD_MB,
            batch_size=8,
            max_in_flight=2,
            model_cache_s=0.0,
        )
        servicer = PredictionServicer(settings)
        binding = ServiceBinding(
            SERVICE_NAME, servicer, prediction_pb2_grpc.add_PredictionServiceServicer_to_server
        )
        server, port = create_server(settings, [binding])
        server.start()
        channel = open_channel(f"127.0.0.1:{port}")
        try:
            yield Stack(
                store=store,
                torchserve=torchserve,
                servicer=servicer,
                server=server,
                target=f"127.0.0.1:{port}",
                channel=channel,
                stub=prediction_pb2_grpc.PredictionServiceStub(channel),
                bundles=bundles,
                metrics=metrics,
                slide_key=slide_key,
                slide_path=slide_path,
            )
        finally:
            channel.close()
            server.stop(0).wait()
    finally:
        torchserve.stop()


def _request(
    stack: Stack, slide_id: str = "", **options: object
) -> prediction_pb2.PredictSlideRequest:
    return prediction_pb2.PredictSlideRequest(
        slide=common_pb2.SlideRef(
            slide_id=slide_id, object=common_pb2.ObjectRef(key=stack.slide_key)
        ),
        options=prediction_pb2.PredictionOptions(**options),  # type: ignore[arg-type]
    )


def _code(call: object, *args: object, **kwargs: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)  # type: ignore[operator]
    return info.value


def _wait_until(condition: object, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def test_list_models_reports_what_is_deployed_with_metrics(stack: Stack) -> None:
    models = stack.stub.ListModels(prediction_pb2.ListModelsRequest(), timeout=30).models
    assert [m.name for m in models] == [
        CANCER_DETECTOR,
        *(f"biomarker_{b}" for b in BIOMARKERS),
    ]
    detector, tp53 = models[0], models[1]
    assert detector.kind == common_pb2.MODEL_KIND_CANCER_DETECTOR and detector.threshold == 0.9
    assert tp53.kind == common_pb2.MODEL_KIND_BIOMARKER
    assert tp53.biomarker == common_pb2.BIOMARKER_TP53 and tp53.threshold == 0.5
    for model in models:
        stored = stack.metrics[model.name]
        assert model.version == "1" and model.serving and model.architecture == "tiny"
        assert model.temperature == pytest.approx(stored["temperature"])
        assert model.validation.patch_auroc.value == pytest.approx(stored["val_auroc"])
        assert model.validation.patch_count == stored["validation"]["patches"]
        assert stack.store.exists(model.archive.key) and model.archive.key.endswith(".mar")
        assert model.trained_at.seconds > 0
    only = stack.stub.ListModels(
        prediction_pb2.ListModelsRequest(biomarkers=[common_pb2.BIOMARKER_ER]), timeout=30
    ).models
    assert [m.name for m in only] == ["biomarker_er"]


def test_predict_stored_slide_matches_the_models_run_in_process(stack: Stack) -> None:
    answer = stack.stub.PredictSlide(
        _request(stack, cancer_confidence=KEEP_ALL, top_k=5), timeout=120
    )
    prediction = answer.prediction
    assert prediction.status == prediction_pb2.PREDICTION_STATUS_OK
    assert prediction.cancer_patch_count == prediction.tissue_patch_count > 0
    assert prediction.cancer_patch_fraction == 1.0
    assert prediction.high_res_source == common_pb2.HIGH_RES_SOURCE_NATIVE
    assert (prediction.cancer_model_name, prediction.cancer_model_version) == (
        CANCER_DETECTOR,
        "1",
    )
    table = pd.read_parquet(io.BytesIO(stack.store.get_bytes(prediction.patch_table.key)))
    # Each cancer 20x patch yields its quadrants with enough tissue, at least one.
    per_parent = table.groupby(["parent_x", "parent_y"]).size()
    assert len(per_parent) == prediction.cancer_patch_count and per_parent.between(1, 4).all()
    for item in prediction.biomarkers:
        name = common_pb2.Biomarker.Name(item.biomarker).removeprefix("BIOMARKER_").lower()
        assert item.probability == pytest.approx(table[name].mean(), abs=1e-9)
        assert item.patch_count == len(table) and item.model_version == "1"
        positive = item.call == prediction_pb2.BIOMARKER_CALL_POSITIVE
        assert positive == (item.probability >= item.threshold)
        tops = [t.probability for t in item.top_patches]
        assert len(tops) == 5 and tops == sorted(tops, reverse=positive)
        assert item.top_patches[0].patch.width == 512 and item.top_patches[0].patch.mpp == 0.25
        assert stack.store.exists(item.heatmap.key)
    # The same slide through the same bundles in this process, normalized to the
    # reference the models record (none set: the built-in one): the same numbers.
    scorer = LocalScorer(stack.bundles)
    with open_slide(stack.slide_path) as reader:
        local = predict_slide(
            reader,
            "local-check",
            stack.store,
            scorer.deployment(),
            scorer,
            PredictionParams(
                cancer_confidence=KEEP_ALL,
                heatmaps=False,
                qc=QcThresholds.from_settings(stack.servicer.settings),
            ),
            reference=builtin_reference(),
        )
    remote = {item.model_name: item.probability for item in prediction.biomarkers}
    assert local.status == "ok" and len(local.biomarkers) == len(BIOMARKERS)
    assert qc_from_proto(prediction.qc) == local.qc
    for item in local.biomarkers:
        assert remote[item.model_name] == pytest.approx(item.probability, abs=1e-5)


def test_stream_reports_progress_then_the_result(stack: Stack) -> None:
    request = prediction_pb2.PredictSlideStreamRequest(
        slide=common_pb2.SlideRef(object=common_pb2.ObjectRef(key=stack.slide_key)),
        options=prediction_pb2.PredictionOptions(cancer_confidence=KEEP_ALL, skip_heatmaps=True),
    )
    events = list(stack.stub.PredictSlideStream(request, timeout=120))
    *progress, last = events
    assert last.WhichOneof("event") == "result"
    assert last.result.status == prediction_pb2.PREDICTION_STATUS_OK
    assert all(e.WhichOneof("event") == "progress" for e in progress)
    fractions = [e.progress.fraction for e in progress]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    stages = [e.progress.stage for e in progress]
    assert stages[0] == "tissue" and "biomarkers" in stages
    assert all(not b.HasField("heatmap") for b in last.result.biomarkers)


def test_no_cancer_patch_is_a_valid_answer(stack: Stack) -> None:
    prediction = stack.stub.PredictSlide(
        _request(stack, cancer_confidence=1.0), timeout=120
    ).prediction
    assert prediction.status == prediction_pb2.PREDICTION_STATUS_NO_CANCER_PATCHES
    assert list(prediction.biomarkers) == [] and prediction.tissue_patch_count > 0
    assert "no biomarker calls" in prediction.status_message


def test_a_slide_failing_qc_gets_qc_failed_with_its_reasons(stack: Stack) -> None:
    # A service with a real slide's floor (0.5 mm² of usable tissue; the tiny slide
    # holds about 0.37): the slide is answered QC_FAILED, with no calls.
    strict = PredictionServicer(
        stack.servicer.settings.model_copy(update={"qc_min_usable_mm2": 0.5})
    )
    binding = ServiceBinding(
        SERVICE_NAME, strict, prediction_pb2_grpc.add_PredictionServiceServicer_to_server
    )
    server, port = create_server(strict.settings, [binding])
    server.start()
    channel = open_channel(f"127.0.0.1:{port}")
    try:
        stub = prediction_pb2_grpc.PredictionServiceStub(channel)
        prediction = stub.PredictSlide(
            _request(stack, cancer_confidence=KEEP_ALL), timeout=120
        ).prediction
    finally:
        channel.close()
        server.stop(0).wait()
    assert prediction.status == prediction_pb2.PREDICTION_STATUS_QC_FAILED
    assert list(prediction.biomarkers) == [] and not prediction.HasField("patch_table")
    assert prediction.qc.verdict == common_pb2.QC_VERDICT_FAIL
    assert prediction.qc.usable_area_mm2 < 0.5 and prediction.qc.tissue_area_mm2 > 0.2
    assert any("under 0.5 mm²" in reason for reason in prediction.qc.reasons)
    assert "failed QC" in prediction.status_message
    assert [a.name for a in prediction.qc.artifacts] == list(ARTIFACTS)
    # The same slide on the tests' service (its floor lowered for tiny slides) passes.
    passed = stack.stub.PredictSlide(_request(stack, cancer_confidence=1.0), timeout=120)
    assert passed.prediction.qc.verdict in (common_pb2.QC_VERDICT_PASS, common_pb2.QC_VERDICT_WARN)


def test_upload_and_predict_checks_size_and_checksum(stack: Stack, tmp_path: Path) -> None:
    copy = tmp_path / "UPLOADED-1.tiff"
    shutil.copy(stack.slide_path, copy)
    with PredictionClient(stack.target) as client:
        answer = client.predict_file(
            copy, options=options_of(["tp53"], cancer_confidence=KEEP_ALL), timeout_s=120
        )
    size, sha256 = file_digest(copy)
    assert answer.slide.key == "slides/UPLOADED-1.tiff"
    assert answer.slide.sha256 == sha256 and answer.slide.size_bytes == size
    assert stack.store.stat("slides/UPLOADED-1.tiff").sha256 == sha256
    assert answer.prediction.slide_id == "UPLOADED-1"
    assert [b.model_name for b in answer.prediction.biomarkers] == ["biomarker_tp53"]

    data = copy.read_bytes()

    def upload(meta: prediction_pb2.UploadMetadata, body: bytes) -> grpc.RpcError:
        messages = [prediction_pb2.UploadAndPredictRequest(metadata=meta)]
        messages += [
            prediction_pb2.UploadAndPredictRequest(chunk=body[i : i + 65536])
            for i in range(0, len(body), 65536)
        ]
        return _code(stack.stub.UploadAndPredict, iter(messages), timeout=60)

    wrong = upload(
        prediction_pb2.UploadMetadata(
            filename="BAD-SUM.tiff", size_bytes=len(data), sha256="0" * 64
        ),
        data,
    )
    assert wrong.code() == grpc.StatusCode.INVALID_ARGUMENT and "sha256" in wrong.details()
    assert not stack.store.exists("slides/BAD-SUM.tiff")
    longer = upload(
        prediction_pb2.UploadMetadata(
            filename="LONG.tiff", size_bytes=100, sha256=hashlib.sha256(data[:100]).hexdigest()
        ),
        data,
    )
    assert longer.code() == grpc.StatusCode.INVALID_ARGUMENT and "more than" in longer.details()
    huge = upload(
        prediction_pb2.UploadMetadata(
            filename="HUGE.svs", size_bytes=(MAX_UPLOAD_MB + 1) << 20, sha256="0" * 64
        ),
        b"",
    )
    assert huge.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "limit" in huge.details()
    odd = upload(
        prediction_pb2.UploadMetadata(filename="../x.svs", size_bytes=1, sha256="0" * 64), b"x"
    )
    assert odd.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_full_queue_refuses_with_resource_exhausted_and_keeps_serving(stack: Stack) -> None:
    request = _request(stack, cancer_confidence=1.0)
    calls = [stack.stub.PredictSlide.future(request, timeout=120) for _ in range(8)]
    codes = []
    for call in calls:
        try:
            call.result()
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as exc:
            codes.append(exc.code())
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 1
    assert codes.count(grpc.StatusCode.OK) >= 2  # one running, one queued
    health = health_pb2_grpc.HealthStub(stack.channel)
    status = health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5)
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    assert stack.servicer.admission.running == 0 and stack.servicer.admission.waiting == 0
    # The client sees the typed error too.
    with PredictionClient(stack.target) as client:
        refused = []

        def one() -> None:
            try:
                client.predict_stored(stack.slide_key, timeout_s=120)
            except ResourceExhausted as exc:
                refused.append(exc)

        threads = [threading.Thread(target=one) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert refused and "queue is full" in str(refused[0])


def test_a_short_deadline_is_honoured(stack: Stack) -> None:
    before = sum(stack.servicer.outcomes.values())
    error = _code(stack.stub.PredictSlide, _request(stack, cancer_confidence=KEEP_ALL), timeout=0.3)
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # The server stopped the work, with the deadline (or the cancel that follows it).
    _wait_until(lambda: sum(stack.servicer.outcomes.values()) > before)
    _wait_until(lambda: stack.servicer.admission.running == 0)
    assert stack.servicer.outcomes["DEADLINE_EXCEEDED"] + stack.servicer.outcomes["CANCELLED"] >= 1


def test_a_client_cancel_stops_the_work(stack: Stack) -> None:
    before = stack.servicer.outcomes["CANCELLED"]
    request = prediction_pb2.PredictSlideStreamRequest(
        slide=common_pb2.SlideRef(
            slide_id="CANCELLED-1", object=common_pb2.ObjectRef(key=stack.slide_key)
        ),
        options=prediction_pb2.PredictionOptions(cancer_confidence=KEEP_ALL),
    )
    call = stack.stub.PredictSlideStream(request, timeout=120)
    first = next(call)
    assert first.WhichOneof("event") == "progress"
    call.cancel()
    _wait_until(lambda: stack.servicer.outcomes["CANCELLED"] > before)
    _wait_until(lambda: stack.servicer.admission.running == 0)
    finished = [
        info.key
        for info in stack.store.list("runs/predictions/CANCELLED-1/")
        if info.key.endswith("prediction.json")
    ]
    assert finished == []


def test_cli_predict_uploads_and_prints_json_or_a_table(
    stack: Stack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = tmp_path / "CLI-1.tiff"
    shutil.copy(stack.slide_path, copy)
    argv = ["predict", str(copy), "--target", stack.target, "--biomarker", "er"]
    assert cli.main([*argv, "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["slide"]["key"] == "slides/CLI-1.tiff"
    assert answer["prediction"]["slide_id"] == "CLI-1"
    assert answer["prediction"]["status"] in {
        "PREDICTION_STATUS_OK",
        "PREDICTION_STATUS_NO_CANCER_PATCHES",
    }
    assert answer["prediction"]["qc"]["verdict"] in {"QC_VERDICT_PASS", "QC_VERDICT_WARN"}
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("slide CLI-1: ") and "cancer patches:" in out
    assert "\nQC: pass" in out or "\nQC: warn" in out
    assert cli.main(["predict", str(tmp_path / "missing.tiff"), "--target", stack.target]) == 2


def test_missing_models_are_failed_precondition_naming_them(stack: Stack) -> None:
    stack.torchserve.unregister("biomarker_her2")
    stack.torchserve.unregister("biomarker_basal")
    error = _code(stack.stub.PredictSlide, _request(stack), timeout=30)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "biomarker_her2" in error.details() and "biomarker_basal" in error.details()
    # A prediction of the biomarkers still deployed works.
    answer = stack.stub.PredictSlide(
        _request(stack, biomarkers=[common_pb2.BIOMARKER_TP53], cancer_confidence=1.0),
        timeout=60,
    )
    assert answer.prediction.status == prediction_pb2.PREDICTION_STATUS_NO_CANCER_PATCHES


def test_torchserve_down_is_unavailable_and_the_service_stays_up(stack: Stack) -> None:
    stack.torchserve.stop()
    error = _code(
        stack.stub.PredictSlide,
        _request(stack, biomarkers=[common_pb2.BIOMARKER_TP53], cancer_confidence=KEEP_ALL),
        timeout=60,
    )
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    error = _code(stack.stub.ListModels, prediction_pb2.ListModelsRequest(), timeout=30)
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    health = health_pb2_grpc.HealthStub(stack.channel)
    status = health.Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert status.status == health_pb2.HealthCheckResponse.SERVING


def test_bad_requests_are_invalid_argument(stack: Stack) -> None:
    error = _code(stack.stub.PredictSlide, _request(stack, top_k=65), timeout=10)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "top_k" in error.details()
    missing = prediction_pb2.PredictSlideRequest(
        slide=common_pb2.SlideRef(object=common_pb2.ObjectRef(key="slides/nope.svs"))
    )
    error = _code(stack.stub.PredictSlide, missing, timeout=10)
    assert error.code() == grpc.StatusCode.NOT_FOUND and "slides/nope.svs" in error.details()
    with pytest.raises(InvalidInput):
        options_of(["kras"])
