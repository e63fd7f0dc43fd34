"""gRPC adapter of the TilingService: `histomarker serve tiling`.

The logic lives beside this file without any gRPC import (reader, tissue, grid,
stain, pipeline, highres); this module converts messages and binds it to
``histomarker.v1.TilingService``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import cv2
import grpc
import numpy as np

from services.common.cancellation import WorkBudget
from services.common.errors import InvalidInput
from services.common.grpc_server import HistomarkerServer, ServiceBinding, create_server, serve
from services.common.images import decode_rgb
from services.common.qc_messages import qc_to_proto
from services.common.refs import served_key
from services.common.settings import DEFAULT_PORTS, ServiceSettings
from services.common.streaming import Report, run_streaming
from services.common.stubs.histomarker.v1 import common_pb2, tiling_pb2, tiling_pb2_grpc
from services.slide.grid import GridParams, params_hash
from services.slide.highres import HighResSource, extract_40x
from services.slide.prepare import store_masks
from services.slide.qc import QcSettings, QcThresholds
from services.slide.reader import open_slide
from services.slide.slides import SlideCache, slide_id_for
from services.slide.stain import StainMatrix, builtin_reference, get_normalizer
from services.slide.tissue import MASKS_JSON, PEN_COLOURS, TissueParams, compute_masks
from services.tiling.pipeline import (
    PIPELINE_VERSION,
    TileParams,
    TileResult,
    load_slide_stain,
    load_tissue_rule,
    tile_slide,
    tiling_digest,
)

SERVICE_NAME = "histomarker.v1.TilingService"
#: Images one NormalizePatches message (or FitStainReference call) may carry, and their
#: largest side, px.
MAX_IMAGES = 256
#: Pixels of one reference image used to fit stains (a 512 px patch is 262144).
FIT_PIXELS_PER_IMAGE = 524_288
MAX_IMAGE_SIDE_PX = 4096
_PARAMS_HASH = re.compile(r"^[0-9a-f]{16}$")
_POLICIES = {
    common_pb2.HIGH_RES_POLICY_NATIVE: "native",
    common_pb2.HIGH_RES_POLICY_UPSAMPLE: "upsample",
}
_METHODS = {
    tiling_pb2.STAIN_METHOD_VAHADANE: "vahadane",
    tiling_pb2.STAIN_METHOD_MACENKO: "macenko",
}


class TilingSettings(QcSettings):
    """Settings of the TilingService (environment prefix ``HISTOMARKER_``)."""

    service_name: str = "tiling"
    port: int = DEFAULT_PORTS["tiling"]
    #: The bucket this service serves (refs naming another bucket are refused).
    bucket: str = "histomarker"
    #: Local folder for downloaded slides; a temporary folder when unset.
    slide_cache_dir: Path | None = None


def stain_to_proto(matrix: StainMatrix) -> tiling_pb2.StainMatrix:
    """Our stain matrix as a message."""
    method: Any = {v: k for k, v in _METHODS.items()}.get(matrix.method, 0)
    return tiling_pb2.StainMatrix(
        hematoxylin=[float(v) for v in matrix.matrix[0]],
        eosin=[float(v) for v in matrix.matrix[1]],
        max_concentrations=[float(v) for v in matrix.max_concentrations],
        method=method,
        glass_rgb=[float(v) for v in matrix.glass_rgb],
    )


def stain_from_proto(message: tiling_pb2.StainMatrix, what: str) -> StainMatrix:
    """A stain matrix message as ours (InvalidInput naming ``what`` if malformed)."""
    if len(message.hematoxylin) != 3 or len(message.eosin) != 3:
        raise InvalidInput(f"{what}: hematoxylin and eosin need 3 values each (R, G, B)")
    if len(message.max_concentrations) != 2:
        raise InvalidInput(f"{what}: max_concentrations needs 2 values (H, E)")
    if len(message.glass_rgb) not in (0, 3):
        raise InvalidInput(f"{what}: glass_rgb needs 3 values (R, G, B) or none")
    try:
        return StainMatrix(
            np.array([list(message.hematoxylin), list(message.eosin)], np.float32),
            np.array(list(message.max_concentrations), np.float32),
            glass_rgb=np.array(list(message.glass_rgb) or [255.0] * 3, np.float32),
            method=_METHODS.get(message.method, "vahadane"),
        )
    except InvalidInput as exc:
        raise InvalidInput(f"{what}: {exc}") from exc


def _tissue_params(message: tiling_pb2.TissueParams) -> tuple[TissueParams, float | None]:
    """Our tissue parameters and the mask resolution (µm/px; None for the default)."""
    if message.min_region_um2 < 0:
        raise InvalidInput("params.min_region_um2 must be >= 0 µm²")
    if message.mask_mpp and not 0 < message.mask_mpp <= 64:
        raise InvalidInput("params.mask_mpp must be within 0-64 µm/px")
    tissue = TissueParams(min_object_um2=message.min_region_um2 or 10_000.0)
    return tissue, (float(message.mask_mpp) or None)


def _decode_image(image: common_pb2.Image, index: int, where: str = "") -> np.ndarray:
    name = f"{where}: images[{index}]" if where else f"images[{index}]"
    return decode_rgb(image.data, name, MAX_IMAGE_SIDE_PX)


def _fit_sample(rgb: np.ndarray) -> np.ndarray:
    """An image's pixels for fitting stains, (n, 3): all of a patch up to
    FIT_PIXELS_PER_IMAGE, an even spread of that many from a larger image (the
    stain estimate needs a sample, not every pixel, and memory stays bounded)."""
    pixels = rgb.reshape(-1, 3)
    step = -(-len(pixels) // FIT_PIXELS_PER_IMAGE)
    return pixels[::step] if step > 1 else pixels


def _encode_image(rgb: np.ndarray, image_format: Any) -> common_pb2.Image:
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    if image_format == common_pb2.IMAGE_FORMAT_JPEG:
        ok, data = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 90])
    else:
        image_format = common_pb2.IMAGE_FORMAT_PNG
        ok, data = cv2.imencode(".png", bgr)
    if not ok:
        raise InvalidInput("cannot encode the normalized image")
    return common_pb2.Image(data=data.tobytes(), format=image_format)


class TilingServicer(tiling_pb2_grpc.TilingServiceServicer):
    """Implements ``histomarker.v1.TilingService`` over one object store."""

    def __init__(self, settings: TilingSettings) -> None:
        self.settings = settings
        self.store = settings.open_store()
        self.slides = SlideCache.of(self.store, settings.slide_cache_dir)

    # -- helpers ---------------------------------------------------------------------
    def _key(self, ref: common_pb2.ObjectRef, what: str) -> str:
        return served_key(ref, self.settings.bucket, what)

    def _ref(self, key: str) -> common_pb2.ObjectRef:
        return common_pb2.ObjectRef(bucket=self.settings.bucket, key=key)

    def _slide(self, slide: common_pb2.SlideRef) -> tuple[str, Path]:
        if not slide.HasField("object"):
            raise InvalidInput("slide: the slide's object reference is required")
        key = self._key(slide.object, "slide.object")
        return slide_id_for(slide.slide_id, key), self.slides.local_path(key)

    def _tile_params(
        self, message: tiling_pb2.TilingParams
    ) -> tuple[TileParams, Any, float | None]:
        which = message.WhichOneof("resolution")
        magnification = 20.0
        if which == "magnification":
            magnification = message.magnification
        elif which == "mpp":
            if message.mpp <= 0:
                raise InvalidInput("params.mpp must be positive")
            magnification = 10.0 / message.mpp
        grid = GridParams(
            magnification=magnification,
            patch_px=message.patch_size_px or 512,
            min_tissue=message.min_tissue_fraction
            if message.HasField("min_tissue_fraction")
            else 0.5,
            overlap_px=message.overlap_px,
        )
        method = _METHODS.get(message.stain_method, "vahadane")
        reference: StainMatrix | None = None
        if message.stain_method != tiling_pb2.STAIN_METHOD_NONE:
            if message.HasField("stain_reference"):
                key = self._key(message.stain_reference, "params.stain_reference")
                reference = StainMatrix.from_json(self.store.get_bytes(key).decode())
            else:
                reference = builtin_reference(method)
        if message.max_patches < 0:
            raise InvalidInput("params.max_patches must be >= 0 (0 keeps every patch)")
        ignored = set(message.tissue.ignore_artifacts)
        if tiling_pb2.ARTIFACT_KIND_PEN in ignored:
            raise InvalidInput("params.tissue: pen marks are always excluded (ink is not tissue)")
        tissue, mask_mpp = _tissue_params(message.tissue)
        params = TileParams(
            grid=grid,
            tissue=tissue,
            stain_method=method,
            exclude_blur=tiling_pb2.ARTIFACT_KIND_BLUR not in ignored,
            exclude_fold=tiling_pb2.ARTIFACT_KIND_FOLD not in ignored,
            max_patches=int(message.max_patches),
            seed=int(message.seed),
            qc=QcThresholds.from_settings(self.settings),
        )
        return params, reference, mask_mpp

    def _result(self, result: TileResult, params: TileParams, prefix: str) -> Any:
        def key(name: str) -> str:
            return f"{prefix}/{name}"

        tissue = tiling_pb2.TissueMask(
            mask=self._ref(key("tissue.png")),
            info=self._ref(key("tissue.json")),
            mpp=result.mpp,
            width=result.dimensions[0],
            height=result.dimensions[1],
        )
        message = tiling_pb2.TilingResult(
            slide_id=result.slide_id,
            params_hash=result.params_hash,
            tissue=tissue,
            grid=self._ref(key("grid.parquet")),
            shards=[self._ref(shard) for shard in result.shards],
            patch_count=result.patch_count,
            patch_resolution=common_pb2.Resolution(
                mpp_x=params.grid.target_mpp,
                mpp_y=params.grid.target_mpp,
                magnification=params.grid.magnification,
            ),
            patch_size_px=params.grid.patch_px,
            reused=result.reused,
            qc=qc_to_proto(result.qc),
        )
        if self.store.exists(key("stain.json")):
            message.stain.CopyFrom(self._ref(key("stain.json")))
        return message

    def _run_tiling(self, request: Any, context: grpc.ServicerContext, progress: Any = None) -> Any:
        slide_id, path = self._slide(request.slide)
        params, reference, mask_mpp = self._tile_params(request.params)
        budget = WorkBudget(context.time_remaining(), lambda: not context.is_active())
        with open_slide(path) as reader:
            if mask_mpp is not None:
                params = replace(params, mask_downsample=mask_mpp / float(reader.mpp[0]))
            prefix = f"tiles/{slide_id}/{tiling_digest(params, reference)}"
            if request.force and self.store.exists(f"{prefix}/tile.json"):
                self.store.delete(f"{prefix}/tile.json")
            result = tile_slide(
                reader,
                slide_id,
                self.store,
                prefix,
                params,
                reference,
                progress=progress,
                budget=budget,
            )
        return self._result(result, params, prefix)

    # -- RPCs ------------------------------------------------------------------------
    def GetSlideInfo(self, request: Any, context: grpc.ServicerContext) -> Any:
        slide_id, path = self._slide(request.slide)
        if not 0 <= request.thumbnail_max_px <= 2048:
            raise InvalidInput("thumbnail_max_px must be within 0-2048")
        with open_slide(path) as reader:
            mpp_x, mpp_y = reader.mpp
            power = 10.0 / mpp_x
            levels = [
                tiling_pb2.SlideLevel(
                    index=i,
                    width=w,
                    height=h,
                    downsample=float(reader.level_downsamples[i]),
                    resolution=common_pb2.Resolution(
                        mpp_x=mpp_x * reader.level_downsamples[i],
                        mpp_y=mpp_y * reader.level_downsamples[i],
                        magnification=power / reader.level_downsamples[i],
                    ),
                )
                for i, (w, h) in enumerate(reader.level_dimensions)
            ]
            response = tiling_pb2.GetSlideInfoResponse(
                slide_id=slide_id,
                width=reader.dimensions[0],
                height=reader.dimensions[1],
                resolution=common_pb2.Resolution(mpp_x=mpp_x, mpp_y=mpp_y, magnification=power),
                levels=levels,
                vendor=reader.vendor or "",
                reader=tiling_pb2.SLIDE_READER_TIFFFILE
                if reader.backend == "tifffile"
                else tiling_pb2.SLIDE_READER_OPENSLIDE,
                has_native_40x=mpp_x <= 0.25 * 1.05,
                object=request.slide.object,
            )
            if request.thumbnail_max_px:
                limit = request.thumbnail_max_px
                level = reader.level_count - 1
                for i, (w, h) in enumerate(reader.level_dimensions):
                    if max(w, h) <= 4 * limit:
                        level = i
                        break
                image = reader.read_level(level)
                scale = limit / max(image.shape[:2])
                if scale < 1:
                    size = (
                        max(1, round(image.shape[1] * scale)),
                        max(1, round(image.shape[0] * scale)),
                    )
                    image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
                response.thumbnail.CopyFrom(_encode_image(image, common_pb2.IMAGE_FORMAT_PNG))
        return response

    def SegmentTissue(self, request: Any, context: grpc.ServicerContext) -> Any:
        slide_id, path = self._slide(request.slide)
        tissue, given_mpp = _tissue_params(request.params)
        mask_mpp = given_mpp or 2.0
        digest = params_hash(tissue, {"mask_mpp": mask_mpp, "version": PIPELINE_VERSION})
        prefix = f"tiles/{slide_id}/tissue-{digest}"
        reused = self.store.exists(f"{prefix}/{MASKS_JSON}") and not request.force
        with open_slide(path) as reader:
            if not reused:
                masks = compute_masks(reader, slide_id, tissue, mask_mpp / float(reader.mpp[0]))
                store_masks(self.store, prefix, masks)
            width, height = reader.dimensions
            slide_mm2 = width * height * (float(reader.mpp[0]) * float(reader.mpp[1])) / 1e6
        summary = json.loads(self.store.get_bytes(f"{prefix}/{MASKS_JSON}"))
        message = tiling_pb2.TissueMask(
            mask=self._ref(f"{prefix}/tissue.png"),
            info=self._ref(f"{prefix}/{MASKS_JSON}"),
            downsample=float(summary.get("downsample", 0.0)),
            mpp=float(summary.get("mpp", 0.0)),
            width=width,
            height=height,
            tissue_fraction=summary["area_mm2"]["tissue"] / max(slide_mm2, 1e-12),
        )
        for kind, name in (
            (tiling_pb2.ARTIFACT_KIND_BLUR, "blur"),
            (tiling_pb2.ARTIFACT_KIND_FOLD, "fold"),
        ):
            message.artifacts.append(
                tiling_pb2.ArtifactMask(
                    kind=kind,
                    mask=self._ref(f"{prefix}/{name}.png"),
                    tissue_fraction=summary["fraction_of_tissue"][name],
                )
            )
        for colour in PEN_COLOURS:
            message.artifacts.append(
                tiling_pb2.ArtifactMask(
                    kind=tiling_pb2.ARTIFACT_KIND_PEN, mask=self._ref(f"{prefix}/pen_{colour}.png")
                )
            )
        return tiling_pb2.SegmentTissueResponse(
            slide_id=slide_id, params_hash=digest, tissue=message, reused=reused
        )

    def TileSlide(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        def work(report: Report) -> Any:
            return self._run_tiling(request, context, report)

        last = -1.0
        for kind, event in run_streaming(work, "tile-slide"):
            if kind == "result":
                yield tiling_pb2.TileSlideResponse(result=event)
                continue
            done, total = event
            fraction = done / max(total, 1)
            if fraction - last >= 0.01 or done == total:
                last = fraction
                yield tiling_pb2.TileSlideResponse(
                    progress=common_pb2.Progress(
                        stage="patches", done=done, total=total, fraction=fraction
                    )
                )

    def FitStainReference(self, request: Any, context: grpc.ServicerContext) -> Any:
        if not request.images:
            raise InvalidInput("images: at least one reference image is required")
        if len(request.images) > MAX_IMAGES:
            raise InvalidInput(f"images: at most {MAX_IMAGES} per call")
        method = _METHODS.get(request.method, "vahadane")
        pixels = np.concatenate(
            [_fit_sample(_decode_image(image, i)) for i, image in enumerate(request.images)]
        )
        normalizer = get_normalizer(method)
        name = request.output.key.split("/")[-2] if request.output.key.count("/") >= 2 else ""
        target = normalizer.stain_matrix_of(pixels, name=name)
        response = tiling_pb2.FitStainReferenceResponse(reference=stain_to_proto(target))  # type: ignore[arg-type]
        if request.HasField("output"):
            key = self._key(request.output, "output")
            info = self.store.put_bytes(
                key, target.to_json().encode(), content_type="application/json"
            )
            response.stored.CopyFrom(
                common_pb2.ObjectRef(
                    bucket=self.settings.bucket,
                    key=key,
                    sha256=info.sha256 or "",
                    size_bytes=info.size_bytes,
                )
            )
        return response

    def UpsampleTo40x(self, request: Any, context: grpc.ServicerContext) -> Any:
        slide_id, path = self._slide(request.slide)
        if not _PARAMS_HASH.match(request.params_hash):
            raise InvalidInput("params_hash must be the 16 hex digits TileSlide returned")
        if not request.patches:
            raise InvalidInput("patches: at least one 20x patch is required")
        patches = []
        for i, patch in enumerate(request.patches):
            if patch.width <= 0 or patch.x < 0 or patch.y < 0:
                raise InvalidInput(f"patches[{i}]: needs x, y >= 0 and a positive width")
            patches.append((int(patch.x), int(patch.y), float(patch.width)))
        first = request.patches[0]
        prefix = f"tiles/{slide_id}/{request.params_hash}"
        stain = load_slide_stain(self.store, prefix)
        tissue = load_tissue_rule(self.store, prefix)
        with open_slide(path) as reader:
            result = extract_40x(
                reader,
                self.store,
                prefix,
                patches,
                policy=_POLICIES.get(request.policy, "auto"),
                patch_px=first.size_px or 512,
                low_mpp=first.mpp or 0.5,
                patches_per_shard=request.patches_per_shard or 1000,
                stain=stain,
                tissue=tissue,
            )
        native = result.source is HighResSource.NATIVE
        return tiling_pb2.UpsampleTo40xResponse(
            slide_id=slide_id,
            source=common_pb2.HIGH_RES_SOURCE_NATIVE
            if native
            else common_pb2.HIGH_RES_SOURCE_UPSAMPLED,
            level=result.level,
            resolution=common_pb2.Resolution(
                mpp_x=result.mpp, mpp_y=result.mpp, magnification=10.0 / result.mpp
            ),
            shards=[self._ref(key) for key in result.shards],
            index=self._ref(result.index_key),
            patch_count=result.patch_count,
        )

    def _stain_target(self, request: Any) -> StainMatrix:
        which = request.WhichOneof("reference")
        if which == "reference_object":
            key = self._key(request.reference_object, "reference_object")
            return StainMatrix.from_json(self.store.get_bytes(key).decode())
        if which == "reference_matrix":
            return stain_from_proto(request.reference_matrix, "reference_matrix")
        return builtin_reference(_METHODS.get(request.method, "vahadane"))

    def NormalizePatches(self, requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
        first: Any = None
        normalizer: Any = None
        target: StainMatrix | None = None
        for number, request in enumerate(requests):
            if first is None:
                first = request
                target = self._stain_target(request)
                normalizer = get_normalizer(_METHODS.get(request.method, target.method))
                normalizer.load_target(target)
            else:
                _check_same_settings(first, request, number)
            yield self._normalize_message(request, normalizer, target, number)

    def _normalize_message(
        self, request: Any, normalizer: Any, target: StainMatrix | None, number: int
    ) -> Any:
        where = f"message {number}"
        if not request.images:
            raise InvalidInput(f"{where}: images: at least one image is required")
        if len(request.images) > MAX_IMAGES:
            raise InvalidInput(f"{where}: images: at most {MAX_IMAGES} per message")
        source = None
        if request.HasField("source_matrix"):
            source = stain_from_proto(request.source_matrix, f"{where}: source_matrix")
        response = tiling_pb2.NormalizePatchesResponse()
        if number == 0 and target is not None:
            response.reference.CopyFrom(stain_to_proto(target))
        # One image decoded at a time: a message of many large, well-compressed
        # pictures would otherwise hold them all decoded at once.
        for i, image in enumerate(request.images):
            rgb = _decode_image(image, i, where)
            patch_source = source
            if patch_source is None:
                try:
                    patch_source = normalizer.stain_matrix_of(rgb)
                    response.source_matrices.append(stain_to_proto(patch_source))
                except InvalidInput:
                    response.source_matrices.append(tiling_pb2.StainMatrix())
            normalized = normalizer.transform(rgb, patch_source)
            response.images.append(_encode_image(normalized, request.output_format))
        return response


def _check_same_settings(first: Any, later: Any, number: int) -> None:
    """Later messages of a NormalizePatches stream may repeat, not change, the
    stream's method and reference."""
    if later.method and later.method != first.method:
        raise InvalidInput(f"message {number}: method differs from the first message's")
    which = later.WhichOneof("reference")
    if which is not None and (
        which != first.WhichOneof("reference") or getattr(later, which) != getattr(first, which)
    ):
        raise InvalidInput(f"message {number}: reference differs from the first message's")


def bindings(settings: TilingSettings | None = None) -> list[ServiceBinding]:
    """The service this process hosts."""
    servicer = TilingServicer(settings or TilingSettings())
    return [
        ServiceBinding(SERVICE_NAME, servicer, tiling_pb2_grpc.add_TilingServiceServicer_to_server)
    ]


def create(settings: ServiceSettings | None = None) -> tuple[HistomarkerServer, int]:
    """Build the server (bound, not started) and return it with its port."""
    tiling = TilingSettings(**settings.model_dump()) if settings is not None else TilingSettings()
    return create_server(tiling, bindings(tiling))


def main() -> None:
    """Serve until SIGTERM/SIGINT."""
    settings = TilingSettings()
    serve(settings, bindings(settings))


if __name__ == "__main__":
    main()
