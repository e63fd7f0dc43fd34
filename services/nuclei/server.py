"""gRPC adapter of the NucleiService: `histomarker serve nuclei`.

The logic lives beside this file without any gRPC import (``segment``, ``features``,
``pipeline``); this module converts messages and binds it to
``histomarker.v1.NucleiService``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
from pydantic import Field

from services.common.cancellation import WorkBudget
from services.common.errors import InvalidInput
from services.common.grpc_server import HistomarkerServer, ServiceBinding, create_server, serve
from services.common.refs import served_key
from services.common.settings import DEFAULT_PORTS, ServiceSettings
from services.common.streaming import run_streaming
from services.common.stubs.histomarker.v1 import common_pb2, nuclei_pb2, nuclei_pb2_grpc
from services.nuclei.features import FEATURE_NAMES, NUCLEUS_COLUMNS, PatchFeatures
from services.nuclei.pipeline import (
    PatchAnalysis,
    PatchRequest,
    analyze_patch,
    decode_image,
    encode_labels_tiff,
    extract_shard_features,
    plan_jobs,
    resolve_mpp,
    segmentation_params,
)
from services.nuclei.segment import SegmentationParams

SERVICE_NAME = "histomarker.v1.NucleiService"
#: Longest patch id quoted in an error message, characters.
_MAX_QUOTED_ID = 80


class NucleiSettings(ServiceSettings):
    """Settings of the NucleiService (environment prefix ``HISTOMARKER_``)."""

    service_name: str = "nuclei"
    port: int = DEFAULT_PORTS["nuclei"]
    #: The bucket this service serves (refs naming another bucket are refused).
    bucket: str = "histomarker"
    #: Most patches one ExtractFeaturesForShards call may process (about 4 minutes
    #: per 1000 patches of 512 px on one core).
    max_patches_per_call: int = Field(default=10_000, ge=1)


def _quoted(patch_id: str) -> str:
    text = patch_id if len(patch_id) <= _MAX_QUOTED_ID else patch_id[:_MAX_QUOTED_ID] + "…"
    return repr(text)


def _params(request: Any) -> SegmentationParams:
    if not request.HasField("params"):
        return SegmentationParams()
    message = request.params
    return segmentation_params(
        message.min_area_um2,
        message.max_area_um2,
        message.min_solidity,
        message.threshold_step,
        message.method,
    )


def features_to_proto(features: PatchFeatures) -> nuclei_pb2.PatchFeatures:
    """Our patch features as a message, with their names."""
    return nuclei_pb2.PatchFeatures(
        names=list(FEATURE_NAMES),
        values=[float(v) for v in features.values],
        nucleus_count=features.nucleus_count,
        few_nuclei=features.few_nuclei,
    )


def nuclei_to_proto(analysis: PatchAnalysis) -> list[nuclei_pb2.Nucleus]:
    """One Nucleus message per row of the per-nucleus table, in label order."""
    # The per-nucleus table's columns are the Nucleus message's field names.
    messages = []
    for row in analysis.nuclei[list(NUCLEUS_COLUMNS)].to_dict("records"):
        values: dict[str, Any] = {name: float(value) for name, value in row.items()}
        values["label"] = int(row["label"])
        values["degree"] = int(row["degree"])
        messages.append(nuclei_pb2.Nucleus(**values))
    return messages


def _analyze(
    image: common_pb2.Image, mpp: float, params: SegmentationParams, where: str = ""
) -> PatchAnalysis:
    """Decode and analyze one image; errors start with ``where`` (a stream message)."""
    what = f"{where}: image" if where else "image"
    rgb = decode_image(image.data, what)
    try:
        return analyze_patch(rgb, resolve_mpp(mpp, image.mpp), params)
    except InvalidInput as exc:
        raise InvalidInput(f"{what}: {exc}") from None


class NucleiServicer(nuclei_pb2_grpc.NucleiServiceServicer):
    """Implements ``histomarker.v1.NucleiService`` over one object store."""

    def __init__(self, settings: NucleiSettings) -> None:
        self.settings = settings
        self.store = settings.open_store()

    def _key(self, ref: common_pb2.ObjectRef, what: str) -> str:
        return served_key(ref, self.settings.bucket, what)

    # -- RPCs ------------------------------------------------------------------------
    def SegmentNuclei(self, request: Any, context: grpc.ServicerContext) -> Any:
        params = _params(request)
        analysis = _analyze(request.image, request.mpp, params, "image")
        response = nuclei_pb2.SegmentNucleiResponse(
            nuclei=nuclei_to_proto(analysis),
            features=features_to_proto(analysis.features),
            mpp=analysis.mpp,
        )
        if not request.omit_labels:
            response.labels.CopyFrom(
                common_pb2.Image(
                    data=encode_labels_tiff(analysis.labels, analysis.mpp),
                    format=common_pb2.IMAGE_FORMAT_TIFF,
                    mpp=analysis.mpp,
                )
            )
        return response

    def ExtractFeatures(self, requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
        first: Any = None
        params = SegmentationParams()
        for number, request in enumerate(requests):
            what = f"message {number} (patch_id {_quoted(request.patch_id)})"
            if first is None:
                first = request
                try:
                    params = _params(request)
                except InvalidInput as exc:
                    raise InvalidInput(f"{what}: {exc}") from None
            elif request.HasField("params") and request.params != first.params:
                raise InvalidInput(f"{what}: params differ from the first message's")
            analysis = _analyze(request.image, request.mpp, params, what)
            yield nuclei_pb2.ExtractFeaturesResponse(
                patch_id=request.patch_id,
                features=features_to_proto(analysis.features),
                mpp=analysis.mpp,
            )

    def ExtractFeaturesForShards(self, request: Any, context: grpc.ServicerContext) -> Any:
        limit = self.settings.max_patches_per_call
        if len(request.shards) + len(request.patches) > limit:
            raise InvalidInput(
                f"shards and patches: at most {limit} entries per call; split the work"
            )
        if not request.HasField("output"):
            raise InvalidInput("output: where to write the feature table is required")
        output = self._key(request.output, "output")
        shards = [self._key(ref, f"shards[{i}]") for i, ref in enumerate(request.shards)]
        patches = [
            PatchRequest(
                self._key(patch.shard, f"patches[{i}].shard"),
                patch.member,
                patch.mpp,
                patch.slide_id,
            )
            for i, patch in enumerate(request.patches)
        ]
        params = _params(request)
        jobs = plan_jobs(shards, patches, request.mpp)
        budget = WorkBudget(context.time_remaining(), lambda: not context.is_active())

        def work(progress: Callable[[str, int, int], None]) -> Any:
            return extract_shard_features(
                self.store,
                jobs,
                output,
                params,
                max_patches=limit,
                progress=progress,
                budget=budget,
            )

        last: dict[str, float] = {}
        for kind, value in run_streaming(work, "nuclei-shards"):
            if kind == "progress":
                stage, done, total = value
                # Downloads are the first tenth of the work, features the rest.
                fraction = 0.1 * done / max(total, 1)
                if stage == "features":
                    fraction = 0.1 + 0.9 * done / max(total, 1)
                if fraction - last.get(stage, -1.0) >= 0.01 or done == total:
                    last[stage] = fraction
                    yield nuclei_pb2.ExtractFeaturesForShardsResponse(
                        progress=common_pb2.Progress(
                            stage=stage,
                            done=done,
                            total=total,
                            fraction=fraction,
                            message=f"{stage}: {done}/{total}",
                        )
                    )
                continue
            yield nuclei_pb2.ExtractFeaturesForShardsResponse(
                result=nuclei_pb2.FeatureTable(
                    table=common_pb2.ObjectRef(bucket=self.settings.bucket, key=value.key),
                    feature_names=list(FEATURE_NAMES),
                    patch_count=value.patch_count,
                    few_nuclei_count=value.few_nuclei_count,
                )
            )


def bindings(settings: NucleiSettings | None = None) -> list[ServiceBinding]:
    """The service this process hosts."""
    servicer = NucleiServicer(settings or NucleiSettings())
    return [
        ServiceBinding(SERVICE_NAME, servicer, nuclei_pb2_grpc.add_NucleiServiceServicer_to_server)
    ]


def create(settings: ServiceSettings | None = None) -> tuple[HistomarkerServer, int]:
    """Build the server (bound, not started) and return it with its port."""
    nuclei = NucleiSettings(**settings.model_dump()) if settings is not None else NucleiSettings()
    return create_server(nuclei, bindings(nuclei))


def main() -> None:
    """Serve until SIGTERM/SIGINT."""
    settings = NucleiSettings()
    serve(settings, bindings(settings))


if __name__ == "__main__":
    main()
