"""One slide's biomarker calls by the MIL pipeline: a frozen encoder's bag and one
attention-MIL head for every biomarker.

Stages: ``tissue`` and ``grid`` are the slide preparation the paper's pipeline and
tiling use (:func:`services.slide.prepare.prepare_slide`), with the grid at the
encoder's resolution and input side, and ``stain`` (the slide's own stains, only for
an encoder trained on normalized patches, such as ``biomarker-cnns``); a slide that
fails QC gets ``qc_failed``, one far from the training slides ``out_of_distribution``
(when the caller did not ask for calls anyway and an OOD reference is deployed). Then
``embed`` (every usable patch read as scanned, normalized onto the stain reference
for such an encoder, and embedded by the :class:`~services.mil.scoring.Embedder`,
``encoder_<name>`` on TorchServe in the service, into the slide's bag, which is
stored under ``bags/{encoder}/{slide_id}.h5``) -> ``mil`` (the
:class:`~services.mil.scoring.BagPredictor`, ``mil_<name>``: one calibrated
probability and one attention map per biomarker; the call at the head's threshold;
the top-k patches by attention) -> ``heatmaps`` (attention over the thumbnail, each
map scaled by its largest weight) -> ``geojson`` (when asked for: one QuPath tile per
bag patch with its attention per biomarker, and each call's top patches,
:mod:`services.prediction.qupath`).

:func:`predict_from_bag` does the ``mil`` stage alone on a bag already made (the
PredictFromBag RPC): no pixel is read, so there are no masks or heatmaps.

Outputs go under ``runs/predictions/{slide_id}/{params_hash}/`` as for the paper's
pipeline: the masks (slide only), ``attention.parquet`` (one row per bag patch:
level-0 footprint and one attention column per biomarker), ``heatmap_{b}.png``,
``{slide_id}.geojson`` when asked for, and ``prediction.json`` (last). The hash
covers the slide's digest (or the bag's), the parameters (not ``geojson``, which
changes no other output) and the two models' names, versions and weights.
"""

from __future__ import annotations

import io
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

from services.common.cancellation import WorkBudget
from services.common.errors import FailedPrecondition, InvalidInput
from services.common.objectstore import ObjectStore
from services.common.vocabulary import BIOMARKERS
from services.mil.bags import Bag, read_bag
from services.mil.extract import bag_key, embed_grid, encoder_grid
from services.mil.model import check_bag_fits
from services.mil.scoring import BagPredictor, Embedder
from services.prediction.heatmaps import render_heatmap, slide_thumbnail
from services.prediction.pipeline import RUNS_PREFIX, finish_result
from services.prediction.progress import Reporter
from services.prediction.qupath import store_prediction_geojson
from services.prediction.results import (
    PIPELINE_MIL,
    STATUS_NO_TISSUE,
    STATUS_OK,
    STATUS_OOD,
    STATUS_QC_FAILED,
    BiomarkerResult,
    ProgressFn,
    SlidePredictionResult,
    TopPatch,
    attention_column,
    check_request,
)
from services.slide.grid import GridParams, params_hash, patch_grid
from services.slide.prepare import PrepParams, prepare_slide, store_masks
from services.slide.reader import SlideReader
from services.slide.stain import StainMatrix

#: Bump when outputs or algorithms change (part of the hash).
MIL_PIPELINE_VERSION = 1
ATTENTION_TABLE = "attention.parquet"
#: Progress fractions at which the stages start.
STAGES = {
    "tissue": 0.0,
    "grid": 0.04,
    "stain": 0.06,
    "embed": 0.08,
    "mil": 0.9,
    "heatmaps": 0.93,
    "geojson": 0.99,
}


@dataclass(frozen=True)
class MilParams(PrepParams):
    """How the MIL pipeline predicts a slide: the slide preparation (its grid's
    magnification and patch side become the encoder's) and these.

    Attributes:
        biomarkers: Biomarkers to report (names of ``BIOMARKERS``; the head must
            call each).
        top_k: Patches returned per biomarker, by attention (1-64).
        heatmaps: Render an attention heatmap PNG per biomarker.
        answer_out_of_distribution: Make the calls even for a slide beyond the OOD
            threshold.
        geojson: Also store the slide's objects as QuPath GeoJSON when calls are
            made (``{slide_id}.geojson`` in the prefix).
        batch_size: Patches per encoder request.
        grid_overlap: Share (0-0.9) of a patch side neighbours overlap; None takes the
            head's (its card's ``grid_overlap``, measured on its training bags), so a
            slide is tiled as the bags the head learned from.
    """

    biomarkers: tuple[str, ...] = BIOMARKERS
    top_k: int = 8
    heatmaps: bool = True
    answer_out_of_distribution: bool = False
    batch_size: int = 32
    grid_overlap: float | None = None
    geojson: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_request(self.biomarkers, self.top_k)
        if self.grid_overlap is not None and not 0.0 <= self.grid_overlap <= 0.9:
            raise InvalidInput(f"grid_overlap must be within 0-0.9, got {self.grid_overlap}")
        if not 1 <= self.batch_size <= 256:
            raise InvalidInput(f"batch_size must be within 1-256, got {self.batch_size}")


def mil_grid(embedder: Embedder, predictor: BagPredictor, params: MilParams) -> GridParams:
    """The grid at the encoder's resolution and side, overlapping as the head's
    training bags did (or as ``params.grid_overlap`` says)."""
    overlap = params.grid_overlap
    if overlap is None:
        overlap = float(predictor.card.get("grid_overlap") or 0.0)
    grid = encoder_grid(embedder, params.grid)
    return replace(grid, overlap_px=min(round(overlap * grid.patch_px), grid.patch_px - 1))


def check_pair(embedder: Embedder, predictor: BagPredictor) -> None:
    """FailedPrecondition unless the head reads this encoder's embeddings."""
    if predictor.encoder is not None and predictor.encoder != embedder.encoder:
        raise FailedPrecondition(
            f"{predictor.model_name} reads {predictor.encoder} embeddings, but the encoder "
            f"deployed with it is {embedder.encoder} ({embedder.model_name})"
        )
    if predictor.encoder_sha256 and embedder.sha256 and predictor.encoder_sha256 != embedder.sha256:
        raise FailedPrecondition(
            f"{predictor.model_name} was trained on {predictor.encoder} weights "
            f"{predictor.encoder_sha256[:12]}..., but {embedder.model_name} serves weights "
            f"{embedder.sha256[:12]}..."
        )
    if predictor.in_dim != embedder.embed_dim:
        raise FailedPrecondition(
            f"{predictor.model_name} reads {predictor.in_dim}-wide embeddings; "
            f"{embedder.model_name} gives {embedder.embed_dim}"
        )


def check_bag(bag: Bag, predictor: BagPredictor) -> None:
    """InvalidInput unless ``bag`` holds embeddings the head reads."""
    check_bag_fits(
        bag, predictor.encoder, predictor.encoder_sha256, predictor.in_dim, predictor.model_name
    )


def _missing_tasks(predictor: BagPredictor, biomarkers: tuple[str, ...]) -> None:
    missing = [b for b in biomarkers if b not in predictor.tasks]
    if missing:
        raise InvalidInput(f"{predictor.model_name} does not call {', '.join(missing)}")


def _calls(
    bag: Bag,
    predictor: BagPredictor,
    biomarkers: tuple[str, ...],
    top_k: int,
) -> tuple[list[BiomarkerResult], pd.DataFrame]:
    """The head's calls on one bag, and the attention table (level-0 footprints)."""
    prediction = predictor.predict(bag.features)
    side = _footprint(bag)
    table = pd.DataFrame(
        {
            "slide_id": bag.slide_id,
            "x": bag.coords[:, 0].astype(np.int64),
            "y": bag.coords[:, 1].astype(np.int64),
            "width": side,
            "height": side,
        }
    )
    results = []
    for biomarker in biomarkers:
        attention = np.asarray(prediction.attention[biomarker], np.float64)
        table[attention_column(biomarker)] = attention
        probability = float(prediction.probabilities[biomarker])
        threshold = float(predictor.thresholds[biomarker])
        order = np.argsort(-attention, kind="stable")[:top_k]
        top = [
            TopPatch(
                x=int(table["x"].iat[i]),
                y=int(table["y"].iat[i]),
                width=side,
                height=side,
                probability=0.0,
                attention=float(attention[i]),
            )
            for i in order
        ]
        results.append(
            BiomarkerResult(
                biomarker=biomarker,
                model_name=predictor.model_name,
                model_version=predictor.version,
                probability=probability,
                threshold=threshold,
                positive=probability >= threshold,
                patch_count=bag.n_patches,
                top_patches=top,
            )
        )
    return results, table


def _footprint(bag: Bag) -> int:
    """Level-0 px of one bag patch's side (the patch side when the bag does not say
    the slide's resolution)."""
    if not np.isfinite(bag.level0_mpp) or bag.level0_mpp <= 0:
        return int(bag.patch_px)
    return round(bag.patch_px * bag.patch_mpp / bag.level0_mpp)


def _put_table(store: ObjectStore, key: str, table: pd.DataFrame) -> None:
    buffer = io.BytesIO()
    table.to_parquet(buffer, index=False)
    store.put_bytes(key, buffer.getvalue())


def _digest(params: MilParams, models: dict[str, Any], source: str) -> str:
    decisive = {k: v for k, v in asdict(params).items() if k not in ("batch_size", "geojson")}
    return params_hash(
        decisive, {"models": models, "source": source, "version": MIL_PIPELINE_VERSION}
    )


def _models(embedder: Embedder | None, predictor: BagPredictor, bag: Bag | None) -> dict[str, Any]:
    encoder = (
        {"name": embedder.model_name, "version": embedder.version, "sha256": embedder.sha256}
        if embedder is not None
        else {"name": bag.encoder if bag else "", "sha256": bag.encoder_sha256 if bag else ""}
    )
    return {"encoder": encoder, "mil": {"name": predictor.model_name, "version": predictor.version}}


def _base(
    slide_id: str,
    prefix: str,
    digest: str,
    predictor: BagPredictor,
    embedder: Embedder | None,
    encoder_name: str,
    encoder_sha256: str,
) -> dict[str, Any]:
    return {
        "slide_id": slide_id,
        "cancer_patch_count": 0,
        "cancer_patch_fraction": 0.0,
        "cancer_confidence": 0.0,
        "high_res_source": "",
        "cancer_model_name": "",
        "cancer_model_version": "",
        "params_hash": digest,
        "prefix": prefix,
        "pipeline": PIPELINE_MIL,
        "encoder_model_name": embedder.model_name if embedder else f"encoder_{encoder_name}",
        "encoder_model_version": embedder.version if embedder else "",
        "encoder_sha256": encoder_sha256,
        "mil_model_name": predictor.model_name,
        "mil_model_version": predictor.version,
        "training_data": dict(predictor.card.get("training_data") or {}),
    }


def _patch_size(bag: Bag) -> dict[str, Any]:
    return {"patch_mpp": float(bag.patch_mpp), "patch_px": int(bag.patch_px)}


def predict_slide_mil(
    reader: SlideReader,
    slide_id: str,
    store: ObjectStore,
    embedder: Embedder,
    predictor: BagPredictor,
    params: MilParams = MilParams(),
    *,
    slide_digest: str = "",
    ood: Any = None,
    progress: ProgressFn | None = None,
    budget: WorkBudget | None = None,
    reference: StainMatrix | None = None,
    stain_method: str = "vahadane",
) -> SlidePredictionResult:
    """Predict a slide's biomarkers with an encoder and a MIL head (module doc).

    Args:
        reader: The open slide.
        slide_id: Its id (names the output prefix and the bag).
        store: Where the outputs and the bag go.
        embedder: The patch encoder (``encoder_<name>`` on TorchServe, or in process).
        predictor: The MIL head (``mil_<name>``, or in process).
        params: What to predict and how.
        slide_digest: The slide file's content digest (part of the hash).
        ood: The deployed out-of-distribution reference
            (:class:`~services.inference.ood.OodDetector`), or None to skip the check.
        progress: Called with ProgressEvents as the work advances.
        budget: Deadline and cancellation, checked between batches.
        reference: Target stains for an encoder trained on normalized patches (its
            ``stain_reference`` is not None): each patch goes from the slide's own
            stains onto it before it is embedded, as the paper's pipeline does; None
            embeds the colours as scanned.
        stain_method: The normalization method with a reference.

    Raises:
        FailedPrecondition: The head does not read this encoder's embeddings.
        InvalidInput: Bad parameters, or a biomarker the head does not call.
        DeadlineExceeded, Cancelled: The budget ran out.
        Unavailable: The encoder or the head (TorchServe) failed.
    """
    budget = budget or WorkBudget.unlimited()
    started = time.perf_counter()
    report = Reporter(progress)
    check_pair(embedder, predictor)
    _missing_tasks(predictor, params.biomarkers)
    prep = replace(params, grid=mil_grid(embedder, predictor, params))
    models = _models(embedder, predictor, None)
    if reference is not None:
        models["stain"] = {"method": stain_method, "reference": reference.to_json()}
    digest = _digest(prep, models, slide_digest)
    prefix = f"{RUNS_PREFIX}/{slide_id}/{digest}"
    wall: dict[str, float] = {}

    def on_stage(name: str) -> None:
        budget.check()
        report(name, 0, 1, STAGES[name], name)

    t = time.perf_counter()
    prepared = prepare_slide(
        reader, slide_id, prep, reference=reference, stain_method=stain_method, on_stage=on_stage
    )
    store_masks(store, prefix, prepared.masks)
    wall["prepare"] = time.perf_counter() - t
    grid = prepared.grid
    base = _base(slide_id, prefix, digest, predictor, embedder, embedder.encoder, embedder.sha256)
    base.update(
        tissue_patch_count=len(grid),
        tissue_mask_key=f"{prefix}/tissue.png",
        qc=prepared.qc.as_dict(),
    )
    if grid.empty:
        out = SlidePredictionResult(
            status=STATUS_NO_TISSUE,
            message="no tissue found: no patch has enough tissue",
            biomarkers=[],
            **base,
        )
        return finish_result(store, out, started, wall, {}, {}, report)
    if prepared.qc.verdict == "fail":
        out = SlidePredictionResult(
            status=STATUS_QC_FAILED,
            message="the slide failed QC, no biomarker calls: " + "; ".join(prepared.qc.reasons),
            biomarkers=[],
            **base,
        )
        return finish_result(store, out, started, wall, {}, {}, report)
    if ood is not None:
        from services.prediction.ood_check import check_slide_ood, refusal_message

        t = time.perf_counter()
        # The reference describes 20x patches of the paper's grid: lay that grid on
        # the same usable tissue, whatever the encoder's patches are.
        paper = GridParams()
        ood_grid = patch_grid(
            reader.dimensions,
            float(reader.mpp[0]),
            prepared.usable,
            prepared.masks.downsample,
            paper,
        )
        decision = (
            {}
            if ood_grid.empty  # less tissue than one 20x patch: nothing to compare
            else check_slide_ood(reader, replace(prepared, grid=ood_grid), ood, paper)
        )
        wall["ood"] = time.perf_counter() - t
        base["out_of_distribution"] = decision
        if decision.get("out_of_distribution") and not params.answer_out_of_distribution:
            out = SlidePredictionResult(
                status=STATUS_OOD, message=refusal_message(decision), biomarkers=[], **base
            )
            return finish_result(store, out, started, wall, {}, {}, report)

    t = time.perf_counter()
    total = len(grid)

    def embedded(done: int, of: int) -> None:
        span = STAGES["mil"] - STAGES["embed"]
        report("embed", done, of, STAGES["embed"] + span * done / max(of, 1), "embedding patches")

    with tempfile.TemporaryDirectory(prefix="histomarker-bag-") as folder:
        path = embed_grid(
            reader,
            grid,
            embedder,
            Path(folder) / f"{slide_id}.h5",
            slide_id=slide_id,
            grid_params=prep.grid,
            batch_size=params.batch_size,
            progress=embedded,
            check=budget.check,
            transform=prepared.stains.transform if prepared.stains is not None else None,
        )
        bag = read_bag(path)
        key = bag_key(embedder.encoder, slide_id)
        store.put_file(key, path)
    wall["embed"] = time.perf_counter() - t
    budget.check()

    report("mil", 0, 1, STAGES["mil"], "MIL head")
    t = time.perf_counter()
    results, table = _calls(bag, predictor, params.biomarkers, params.top_k)
    _put_table(store, f"{prefix}/{ATTENTION_TABLE}", table)
    wall["mil"] = time.perf_counter() - t

    if params.heatmaps:
        t = time.perf_counter()
        thumbnail = slide_thumbnail(reader, params.mask_downsample, prepared.masks.tissue.shape)
        for done, item in enumerate(results, start=1):
            budget.check()
            column = attention_column(item.biomarker)
            peak = float(table[column].max()) or 1.0
            scaled = table.assign(**{item.biomarker: table[column] / peak})
            image = render_heatmap(
                thumbnail, scaled, item.biomarker, prepared.masks.downsample, prepared.masks.tissue
            )
            ok, png = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
            if not ok:
                raise InvalidInput(f"cannot encode the {item.biomarker} heatmap")
            item.heatmap_key = f"{prefix}/heatmap_{item.biomarker}.png"
            store.put_bytes(item.heatmap_key, png.tobytes(), content_type="image/png")
            report("heatmaps", done, len(results), STAGES["heatmaps"] + 0.01 * done)
        wall["heatmaps"] = time.perf_counter() - t

    out = SlidePredictionResult(
        status=STATUS_OK,
        message=f"{total} tissue patches embedded by {embedder.encoder}; "
        f"{len(results)} biomarkers called by {predictor.model_name}",
        biomarkers=results,
        patch_table_key=f"{prefix}/{ATTENTION_TABLE}",
        bag_key=key,
        **_patch_size(bag),
        **base,
    )
    if params.geojson:
        budget.check()
        _store_geojson(store, out, table, wall, report)
    return finish_result(store, out, started, wall, {}, {}, report)


def _store_geojson(
    store: ObjectStore,
    out: SlidePredictionResult,
    table: pd.DataFrame,
    wall: dict[str, float],
    report: Reporter,
) -> None:
    """The result's QuPath GeoJSON, its key on the result and its time in ``wall``."""
    report("geojson", 0, 1, STAGES["geojson"], "QuPath GeoJSON")
    t = time.perf_counter()
    out.geojson_key = store_prediction_geojson(store, out, table)
    wall["geojson"] = time.perf_counter() - t


def predict_from_bag(
    bag: Bag,
    store: ObjectStore,
    predictor: BagPredictor,
    params: MilParams = MilParams(),
    *,
    bag_key: str = "",
    bag_digest: str = "",
    progress: ProgressFn | None = None,
) -> SlidePredictionResult:
    """Call a bag's biomarkers with a MIL head, without touching pixels.

    Args:
        bag: The bag (its slide id names the output prefix).
        store: Where the outputs go.
        predictor: The MIL head.
        params: What to report (``biomarkers``, ``top_k``, ``geojson``; the slide
            preparation and heatmaps do not apply).
        bag_key: The bag's key in the store (reported back).
        bag_digest: The bag file's digest (part of the hash).
        progress: Called with ProgressEvents.

    Raises:
        InvalidInput: A bag of another encoder, weights or width; a biomarker the
            head does not call.
    """
    started = time.perf_counter()
    report = Reporter(progress)
    check_bag(bag, predictor)
    _missing_tasks(predictor, params.biomarkers)
    slide_id = bag.slide_id
    digest = _digest(params, _models(None, predictor, bag), bag_digest or bag_key)
    prefix = f"{RUNS_PREFIX}/{slide_id}/{digest}"
    base = _base(slide_id, prefix, digest, predictor, None, bag.encoder, bag.encoder_sha256)
    base.update(tissue_patch_count=bag.n_patches, tissue_mask_key="", bag_key=bag_key)
    if bag.n_patches == 0:
        out = SlidePredictionResult(
            status=STATUS_NO_TISSUE, message=f"bag {slide_id} holds no patch", biomarkers=[], **base
        )
        return finish_result(store, out, started, {}, {}, {}, report)
    report("mil", 0, 1, STAGES["mil"], "MIL head")
    t = time.perf_counter()
    results, table = _calls(bag, predictor, params.biomarkers, params.top_k)
    _put_table(store, f"{prefix}/{ATTENTION_TABLE}", table)
    out = SlidePredictionResult(
        status=STATUS_OK,
        message=f"{bag.n_patches} patches of the {bag.encoder} bag; "
        f"{len(results)} biomarkers called by {predictor.model_name}",
        biomarkers=results,
        patch_table_key=f"{prefix}/{ATTENTION_TABLE}",
        **_patch_size(bag),
        **base,
    )
    wall = {"mil": time.perf_counter() - t}
    if params.geojson:
        _store_geojson(store, out, table, wall, report)
    return finish_result(store, out, started, wall, {}, {}, report)
