"""``train_mil``: a cohort's bags, a calibrated attention-MIL head, both served.

Tasks, in order:

``embed_cohort``
    Every slide of the manifest embedded by one encoder from a local weights file
    (:func:`services.mil.extract.embed_slide`: the QC'd grid at the encoder's
    resolution, stain-normalized when the encoder was trained so), into
    ``{work_dir}/mil/bags/{encoder}/{slide_id}.h5`` and the store's
    ``bags/{encoder}/{slide_id}.h5``. A bag already finished locally is kept, a
    partial one continued: a rerun after a crash picks up where it stopped. A log
    line every tenth of the slides.
``train_head``
    ``histomarker mil train`` on those bags (site-aware cross-validation by patient,
    out-of-fold AUROC with bootstrap CIs, the final model with per-biomarker
    temperatures, model card).
``serve_models``
    The encoder as ``encoder_<name>`` and the head as ``mil_<name>``: archives built,
    published under ``models/`` with their cards, registered on TorchServe (the
    version is the first 12 hex digits of the weights' or model file's sha256) and
    recorded as deployed. The PredictionService then answers ``pipeline: MIL``.

The tasks are not cached: the bags and the registrations live outside Prefect's
results (the embedding resumes by itself).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows.runtime.policy import pipeline_task
from flows.runtime.records import Record, Registration
from flows.runtime.settings import FlowSettings
from flows.training.serving import register_and_record

#: What the serving records name as having deployed a version registered here.
SOURCE = "train_mil"


class EmbeddedCohort(Record):
    """The bags of a cohort's slides.

    Attributes:
        encoder: Registry name of the encoder.
        folder: Local folder of the bags (``.../bags/{encoder}``).
        slides: Slides embedded (bags finished, empty ones included).
        patches: Patches embedded over all slides.
        seconds: Wall time of the task.
    """

    encoder: str
    folder: str
    slides: int
    patches: int
    seconds: float


class TrainedHead(Record):
    """A trained head: its file, card and cross-validated scores."""

    model_path: str
    card_path: str
    cross_validation: list[dict[str, Any]]
    seconds: float


class MilRun(Record):
    """What ``train_mil`` made and serves."""

    bags: EmbeddedCohort
    head: TrainedHead
    encoder_model: Registration
    mil_model: Registration


@pipeline_task(cached=False, retries=0, task_run_name="embed-{encoder}")
def embed_cohort(
    manifest: str,
    encoder: str,
    weights: str,
    folder: str,
    tiny: bool = False,
    overlap: float = 0.0,
) -> EmbeddedCohort:
    """Embed every slide of ``manifest`` (module doc); neighbouring patches overlap
    by ``overlap`` of their side (0-0.9)."""
    from services.cohort.manifest import Manifest
    from services.encoders import load_encoder
    from services.mil.bags import read_bag
    from services.mil.extract import bag_key, embed_slide, encoder_reference
    from services.slide.grid import GridParams
    from services.slide.prepare import PrepParams
    from services.slide.qc import QcSettings, QcThresholds
    from services.slide.reader import open_slide

    log = get_run_logger()
    began = time.perf_counter()
    settings = FlowSettings()
    table = Manifest.read(manifest)
    loaded = load_encoder(encoder, weights, tiny=tiny)
    # An encoder trained on stain-normalized patches (the paper's CNNs) gets them so.
    reference = encoder_reference(loaded.spec.stain_reference)
    side = loaded.spec.input_px
    params = PrepParams(
        grid=GridParams(overlap_px=min(round(overlap * side), side - 1)),
        qc=QcThresholds.from_settings(QcSettings()),
    )
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    rows = list(table.table.itertuples(index=False))
    step = max(1, len(rows) // 10)
    patches = 0
    with settings.open_store() as store:
        for number, row in enumerate(rows, start=1):
            slide_id = str(row.slide_id)
            path = out / f"{slide_id}.h5"
            if not path.exists():
                with open_slide(table.slide_file(str(row.slide_path))) as reader:
                    embed_slide(reader, slide_id, loaded, path, params=params, reference=reference)
            patches += read_bag(path).n_patches
            store.put_file(bag_key(encoder, slide_id), path)
            if number % step == 0 or number == len(rows):
                log.info(
                    "embedded %d of %d slides (%d patches) in %.0f s",
                    number,
                    len(rows),
                    patches,
                    time.perf_counter() - began,
                )
    return EmbeddedCohort(
        encoder=encoder,
        folder=str(out),
        slides=len(rows),
        patches=patches,
        seconds=round(time.perf_counter() - began, 1),
    )


@pipeline_task(cached=False, retries=0, task_run_name="train-{head}")
def train_head(
    manifest: str,
    bags: EmbeddedCohort,
    out: str,
    head: str = "abmil",
    folds: int = 3,
    epochs: int = 40,
    cohort_name: str = "",
    synthetic: bool | None = None,
    seed: int = 0,
) -> TrainedHead:
    """``histomarker mil train MANIFEST BAGS OUT`` on the embedded cohort."""
    from services.cli import build_parser
    from services.mil.cli_mil import run_train

    argv = [
        "mil",
        "train",
        manifest,
        bags.folder,
        out,
        "--head",
        head,
        "--encoder",
        bags.encoder,
        "--folds",
        str(folds),
        "--epochs",
        str(epochs),
        "--seed",
        str(seed),
        "--json",
    ]
    if cohort_name:
        argv += ["--cohort-name", cohort_name]
    if synthetic is not None:
        argv.append("--synthetic" if synthetic else "--real")
    result = run_train(build_parser().parse_args(argv))
    get_run_logger().info("MIL head trained in %.0f s: %s", result["seconds"], result["model"])
    return TrainedHead(
        model_path=str(result["model"]),
        card_path=str(Path(out) / "model_card.json"),
        cross_validation=list(result["cross_validation"]),
        seconds=float(result["seconds"]),
    )


@pipeline_task(cached=False, task_run_name="serve-{name}")
def serve_models(
    encoder: str, weights: str, head: TrainedHead, name: str, tiny: bool = False
) -> tuple[Registration, Registration]:
    """Archive, publish and register ``encoder_<encoder>`` and ``mil_<name>``."""
    from services.inference.registry import archive_key
    from services.mil.archive import publish_head_and_encoder

    settings = FlowSettings()
    with settings.open_store() as store:
        published = publish_head_and_encoder(
            store, Path(head.model_path), encoder, Path(weights), name=name, tiny=tiny
        )
    served = []
    for model, version, _ in published:
        served.append(register_and_record(model, version, archive_key(model, version), SOURCE))
    return served[0], served[1]


@flow(name="train_mil", log_prints=True)
def train_mil(
    manifest: str,
    encoder: str,
    weights: str,
    *,
    name: str = "",
    head: str = "abmil",
    folds: int = 3,
    epochs: int = 40,
    tiny: bool = False,
    cohort_name: str = "",
    synthetic: bool | None = None,
    seed: int = 0,
    overlap: float = 0.0,
) -> MilRun:
    """Embed the cohort, train and serve a MIL head (module doc).

    Args:
        manifest: The cohort manifest (CSV; slide paths relative to it).
        encoder: Registry name of the encoder (``histomarker encoders``).
        weights: Its local weights file (for ``detector``, the detector bundle's
            ``weights.pt`` beside its ``model.json``).
        name: The head's name (served as ``mil_<name>``); the head kind by default.
        head: ``abmil`` or ``transformer``.
        folds: Site-aware cross-validation folds.
        epochs: Most epochs per fit.
        tiny: The encoder's tiny variant (tests and CPU demos).
        cohort_name: Cohort name for the model card (the manifest's folder by default).
        synthetic: Whether the cohort is synthetic (None: decided from its ids).
        seed: Seed of the folds and the fits.
        overlap: Share of a patch side neighbouring patches overlap (the head's card
            records it, and the PredictionService tiles new slides the same way).
    """
    settings = FlowSettings()
    work = Path(settings.work_dir) / "mil"
    bags = embed_cohort(manifest, encoder, weights, str(work / "bags" / encoder), tiny, overlap)
    trained = train_head(
        manifest,
        bags,
        str(work / f"head-{name or head}"),
        head,
        folds,
        epochs,
        cohort_name,
        synthetic,
        seed,
    )
    encoder_model, mil_model = serve_models(encoder, weights, trained, name or head, tiny)
    return MilRun(bags=bags, head=trained, encoder_model=encoder_model, mil_model=mil_model)
