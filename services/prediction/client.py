"""Python client of the PredictionService.

    with PredictionClient("127.0.0.1:50050") as client:
        answer = client.predict_file("case-17.svs")            # upload, then predict
        prediction = client.predict_stored("slides/case-17.svs", progress=print)
        models = client.list_models()

Errors come back as the typed exceptions of ``services.common.errors`` (by gRPC
status), so callers handle a local failure and a remote one the same way.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict

from services.common import errors
from services.common.errors import HistomarkerError, InvalidInput, NotFound
from services.common.grpc_client import open_channel
from services.common.stubs.histomarker.v1 import common_pb2, prediction_pb2, prediction_pb2_grpc
from services.common.vocabulary import BIOMARKER_ENUMS

#: Bytes per upload message (the proto recommends at most 1 MiB).
CHUNK_BYTES = 1024 * 1024
_ERRORS: dict[str, type[HistomarkerError]] = {
    kind.status_name: kind
    for kind in vars(errors).values()
    if isinstance(kind, type) and issubclass(kind, HistomarkerError)
}

ProgressCallback = Callable[[common_pb2.Progress], None]
UploadCallback = Callable[[int, int], None]


def error_of(exc: grpc.RpcError) -> HistomarkerError:
    """The typed error of a failed call (its status and details)."""
    code = exc.code() if hasattr(exc, "code") else None
    name = code.name if code is not None else "UNAVAILABLE"
    kind = _ERRORS.get(name, HistomarkerError)
    details = exc.details() if hasattr(exc, "details") else str(exc)
    error = kind(f"{name}: {details}")
    error.status_name = name
    return error


def options_of(
    biomarkers: Sequence[str] = (),
    *,
    top_k: int = 0,
    skip_heatmaps: bool = False,
    cancer_confidence: float | None = None,
    pipeline: str = "",
    mil_model: str = "",
    answer_out_of_distribution: bool = False,
    geojson: bool = False,
) -> prediction_pb2.PredictionOptions:
    """PredictionOptions from plain values (InvalidInput for an unknown biomarker or
    pipeline; ``pipeline`` "" leaves the service's default; ``geojson`` asks for the
    slide's QuPath GeoJSON in the store)."""
    unknown = [b for b in biomarkers if b.lower() not in BIOMARKER_ENUMS]
    if unknown:
        raise InvalidInput(
            f"unknown biomarker {unknown[0]!r}; use one of {', '.join(BIOMARKER_ENUMS)}"
        )
    options = prediction_pb2.PredictionOptions(
        biomarkers=[BIOMARKER_ENUMS[b.lower()] for b in biomarkers],
        top_k=top_k,
        skip_heatmaps=skip_heatmaps,
        mil_model=mil_model,
        answer_out_of_distribution=answer_out_of_distribution,
        geojson=geojson,
    )
    if pipeline:
        if pipeline not in PIPELINES:
            raise InvalidInput(f"unknown pipeline {pipeline!r}; use one of {', '.join(PIPELINES)}")
        options.pipeline = PIPELINES[pipeline]
    if cancer_confidence is not None:
        options.cancer_confidence = cancer_confidence
    return options


#: Pipelines by name (PredictionOptions.pipeline).
PIPELINES = {
    "paper": prediction_pb2.PREDICTION_PIPELINE_PAPER,
    "mil": prediction_pb2.PREDICTION_PIPELINE_MIL,
}


def to_dict(message: Any) -> dict[str, Any]:
    """A response as JSON-able values (field names as in the proto, enums by name)."""
    return MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def file_digest(path: Path) -> tuple[int, str]:
    """(size in bytes, sha256 hex) of a local file."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


class PredictionClient:
    """A channel to one PredictionService.

    Args:
        target: ``HOST:PORT``.
        token: Bearer token the server wants, if any.
        tls_ca_file: CA of the server's certificate; TLS when given.
        timeout_s: Default deadline of a call, seconds (None: none).
    """

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        tls_ca_file: Path | str | None = None,
        timeout_s: float | None = 3600.0,
    ) -> None:
        self.channel = open_channel(target, token=token, tls_ca_file=tls_ca_file)
        self.stub = prediction_pb2_grpc.PredictionServiceStub(self.channel)
        self.timeout_s = timeout_s

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> PredictionClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def predict_file(
        self,
        path: str | os.PathLike[str],
        *,
        slide_id: str = "",
        options: prediction_pb2.PredictionOptions | None = None,
        upload_progress: UploadCallback | None = None,
        timeout_s: float | None = None,
        chunk_bytes: int = CHUNK_BYTES,
    ) -> prediction_pb2.UploadAndPredictResponse:
        """Upload a local slide file in chunks (with its size and sha256), then
        predict it.

        Args:
            path: The slide file.
            slide_id: Id to give it; the file name without its extension by default.
            options: What to predict; all six biomarkers by default.
            upload_progress: Called with (bytes sent, bytes in total).
            timeout_s: Deadline of the call; the client's default when None.
            chunk_bytes: Bytes per message.

        Raises:
            NotFound: No such file.
            HistomarkerError: The service's error, typed by its status.
        """
        source = Path(path)
        if not source.is_file():
            raise NotFound(f"no slide file {str(source)!r}")
        size, sha256 = file_digest(source)
        metadata = prediction_pb2.UploadMetadata(
            filename=source.name,
            size_bytes=size,
            sha256=sha256,
            slide_id=slide_id,
            options=options or prediction_pb2.PredictionOptions(),
        )

        def messages() -> Iterator[prediction_pb2.UploadAndPredictRequest]:
            yield prediction_pb2.UploadAndPredictRequest(metadata=metadata)
            sent = 0
            with source.open("rb") as handle:
                while chunk := handle.read(chunk_bytes):
                    sent += len(chunk)
                    yield prediction_pb2.UploadAndPredictRequest(chunk=chunk)
                    if upload_progress is not None:
                        upload_progress(sent, size)

        try:
            response: prediction_pb2.UploadAndPredictResponse = self.stub.UploadAndPredict(
                messages(), timeout=self._timeout(timeout_s)
            )
        except grpc.RpcError as exc:
            raise error_of(exc) from None
        return response

    def predict_stored(
        self,
        key: str,
        *,
        slide_id: str = "",
        bucket: str = "",
        options: prediction_pb2.PredictionOptions | None = None,
        progress: ProgressCallback | None = None,
        timeout_s: float | None = None,
    ) -> prediction_pb2.SlidePrediction:
        """Predict a slide already in the object store.

        With ``progress`` the streaming RPC is used and the callback gets each
        Progress message; without, the unary one.

        Raises:
            HistomarkerError: The service's error, typed by its status.
        """
        slide = common_pb2.SlideRef(
            slide_id=slide_id, object=common_pb2.ObjectRef(bucket=bucket, key=key)
        )
        options = options or prediction_pb2.PredictionOptions()
        timeout = self._timeout(timeout_s)
        try:
            if progress is None:
                answer = self.stub.PredictSlide(
                    prediction_pb2.PredictSlideRequest(slide=slide, options=options),
                    timeout=timeout,
                )
                prediction: prediction_pb2.SlidePrediction = answer.prediction
                return prediction
            request = prediction_pb2.PredictSlideStreamRequest(slide=slide, options=options)
            for event in self.stub.PredictSlideStream(request, timeout=timeout):
                if event.WhichOneof("event") == "progress":
                    progress(event.progress)
                else:
                    final: prediction_pb2.SlidePrediction = event.result
                    return final
        except grpc.RpcError as exc:
            raise error_of(exc) from None
        raise HistomarkerError("the prediction stream ended without a result")

    def predict_from_bag(
        self,
        key: str,
        *,
        bucket: str = "",
        options: prediction_pb2.PredictionOptions | None = None,
        timeout_s: float | None = None,
    ) -> prediction_pb2.SlidePrediction:
        """Call the biomarkers of a bag already in the object store with a MIL head.

        Raises:
            HistomarkerError: The service's error, typed by its status.
        """
        request = prediction_pb2.PredictFromBagRequest(
            bag=common_pb2.ObjectRef(bucket=bucket, key=key), options=options
        )
        try:
            answer = self.stub.PredictFromBag(request, timeout=self._timeout(timeout_s))
        except grpc.RpcError as exc:
            raise error_of(exc) from None
        prediction: prediction_pb2.SlidePrediction = answer.prediction
        return prediction

    def list_models(self, biomarkers: Sequence[str] = ()) -> list[common_pb2.ModelInfo]:
        """The deployed models, the cancer detector first."""
        request = prediction_pb2.ListModelsRequest(biomarkers=options_of(biomarkers).biomarkers)
        try:
            answer = self.stub.ListModels(request, timeout=self._timeout(60.0))
        except grpc.RpcError as exc:
            raise error_of(exc) from None
        return list(answer.models)

    def _timeout(self, timeout_s: float | None) -> float | None:
        return timeout_s if timeout_s is not None else self.timeout_s
