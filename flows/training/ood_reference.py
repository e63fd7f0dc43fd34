"""``fit_ood_reference``: the out-of-distribution reference of the served models.

The models only know slides like their training cohort's. The reference says what
those look like, so the PredictionService can refuse a slide unlike any of them
(status OUT_OF_DISTRIBUTION, ``services.prediction.ood_check``) instead of calling
its biomarkers with confidence it has not earned.

How it is fitted, as ``benchmarks/quality/ood_real.py`` measured it:

1. The cohort's tiled slides with patches and a QC verdict other than ``fail`` (a
   failing slide gets no calls at prediction either) are drawn by patient in a
   seeded order, at most ``max_slides`` of them; the first patients, about
   ``calibration_fraction`` of the slides (at least
   :data:`~services.inference.ood.MIN_CALIBRATION_SLIDES`), are held out to set the
   threshold, the rest fit the reference. No patient is on both sides.
2. Each slide is fetched from the store and up to ``max_patches_per_slide`` raw
   patches of its usable grid (TilingService's ``grid.parquet``, the grid the models
   learned from), evenly spread, are described
   (:func:`services.prediction.ood_check.grid_descriptors`, the function prediction
   uses, so training and new slides are sampled alike).
3. :meth:`OodDetector.fit <services.inference.ood.OodDetector.fit>` on the fit
   slides, threshold from the held-out ones; the JSON goes to
   ``models/cancer_detector/{version}/ood.json`` before that version is registered
   on TorchServe, so a served detector has its reference from the start.

A cohort with fewer usable slides than a reference needs
(:data:`~services.inference.ood.MIN_TRAIN_SLIDES` +
:data:`~services.inference.ood.MIN_CALIBRATION_SLIDES`) gets none: the flow says why
and the models serve without the check.
"""

from __future__ import annotations

import io
import math
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
from prefect import get_run_logger

from flows.runtime.policy import pipeline_task
from flows.runtime.records import CohortRef, ModelRef, Record, TiledSlide
from flows.runtime.settings import FlowSettings
from flows.training.config import OodConfig
from flows.training.ingest import read_cohort
from services.common.objectstore import ObjectStore
from services.inference.ood import MIN_CALIBRATION_SLIDES, MIN_TRAIN_SLIDES, OodDetector
from services.inference.registry import ood_key
from services.prediction.ood_check import PATCHES_PER_SLIDE_KEY, grid_descriptors
from services.slide.reader import open_slide


class OodReference(Record):
    """The stored OOD reference, or why there is none.

    Attributes:
        key: Store key of ``ood.json``; "" when none was fitted.
        threshold: Its distance threshold (unitless), None without one.
        fit_slides: Slides it was fitted on.
        calibration_slides: Held-out slides that set the threshold.
        patches: Patches described in all.
        calibration_answered: Share of the held-out slides below the threshold.
        seconds: Time taken to read, describe and fit.
        reason: Why none was fitted ("" when one was).
    """

    key: str = ""
    threshold: float | None = None
    fit_slides: int = 0
    calibration_slides: int = 0
    patches: int = 0
    calibration_answered: float | None = None
    seconds: float = 0.0
    reason: str = ""


def usable_slides(tiled: Sequence[TiledSlide]) -> list[TiledSlide]:
    """The tiled slides a reference may learn from: with patches, QC not failed."""
    return [t for t in tiled if t.patch_count > 0 and t.qc_verdict != "fail"]


def reference_split(
    slide_ids: Sequence[str], patients: Mapping[str, str], config: OodConfig
) -> tuple[list[str], list[str]]:
    """The fit and calibration slides (see the module doc, step 1).

    Args:
        slide_ids: The usable slides.
        patients: Slide id -> patient id.
        config: ``max_slides``, ``calibration_fraction`` and ``seed``.

    Returns:
        (fit, calibration) slide ids, each sorted; whole patients on each side.
    """
    by_patient: dict[str, list[str]] = {}
    for slide_id in sorted(slide_ids):
        by_patient.setdefault(str(patients[slide_id]), []).append(slide_id)
    names = sorted(by_patient)
    order = [names[i] for i in np.random.default_rng(config.seed).permutation(len(names))]
    chosen: list[list[str]] = []
    taken = 0
    for patient in order:
        slides = by_patient[patient]
        if taken + len(slides) > config.max_slides and chosen:
            continue
        chosen.append(slides)
        taken += len(slides)
    wanted = max(MIN_CALIBRATION_SLIDES, math.ceil(config.calibration_fraction * taken))
    calibration: list[str] = []
    fit: list[str] = []
    for slides in chosen:
        (calibration if len(calibration) < wanted else fit).extend(slides)
    return sorted(fit), sorted(calibration)


def describe_slide(store: ObjectStore, slide: TiledSlide, max_patches: int) -> np.ndarray:
    """Descriptors of up to ``max_patches`` raw patches of a tiled slide's grid (the
    slide is fetched into a temporary folder and removed after)."""
    grid = pd.read_parquet(io.BytesIO(store.get_bytes(slide.grid_key)), columns=["x", "y"])
    with tempfile.TemporaryDirectory(prefix="histomarker-ood-") as scratch:
        local = Path(scratch) / PurePosixPath(slide.slide_key).name
        store.get_file(slide.slide_key, local)
        with open_slide(local) as reader:
            return grid_descriptors(reader, grid, slide.patch_px * slide.patch_mpp, max_patches)


def fit_reference(
    fit: Sequence[np.ndarray],
    calibration: Sequence[np.ndarray],
    config: OodConfig,
    description: str,
) -> OodDetector:
    """The reference fitted on ``fit`` slides' descriptors, its threshold on
    ``calibration``'s; it records the patches per slide it was fitted with."""
    detector = OodDetector(seed=config.seed).fit(
        fit, calibration, config.answer_rate, description=description
    )
    detector.training[PATCHES_PER_SLIDE_KEY] = config.max_patches_per_slide
    return detector


def build_reference(
    store: ObjectStore,
    table: pd.DataFrame,
    tiled: Sequence[TiledSlide],
    config: OodConfig,
    key: str,
    cohort_name: str = "",
) -> OodReference:
    """Fit the reference on a cohort's tiled slides and put its JSON at ``key`` (the
    module doc's steps); a cohort with too few usable slides gets none.

    Args:
        store: Where the slides, their grids and the reference are.
        table: The cohort's manifest (``slide_id``, ``patient_id``).
        tiled: The cohort's slides as TilingService tiled them.
        config: How to fit.
        key: Where ``ood.json`` goes.
        cohort_name: Named in the reference's description.

    Returns:
        What was stored, or why nothing was.
    """
    started = time.perf_counter()
    usable = {t.slide_id: t for t in usable_slides(tiled)}
    patients = dict(
        zip(table["slide_id"].astype(str), table["patient_id"].astype(str), strict=True)
    )
    fit_ids, calibration_ids = reference_split(list(usable), patients, config)
    if len(fit_ids) < MIN_TRAIN_SLIDES or len(calibration_ids) < MIN_CALIBRATION_SLIDES:
        reason = (
            f"{len(usable)} usable slides: an OOD reference needs at least "
            f"{MIN_TRAIN_SLIDES + MIN_CALIBRATION_SLIDES} ({MIN_TRAIN_SLIDES} to fit, "
            f"{MIN_CALIBRATION_SLIDES} held out for the threshold); the models serve "
            "without one (no slide is refused as out of distribution)"
        )
        return OodReference(reason=reason, seconds=round(time.perf_counter() - started, 2))
    per_slide = config.max_patches_per_slide
    fit = [describe_slide(store, usable[s], per_slide) for s in fit_ids]
    calibration = [describe_slide(store, usable[s], per_slide) for s in calibration_ids]
    description = (
        f"cohort {cohort_name}: {len(fit)} slides fit, {len(calibration)} held out "
        f"(by patient, seed {config.seed}), up to {per_slide} raw patches each"
    )
    detector = fit_reference(fit, calibration, config, description)
    store.put_bytes(key, detector.to_json().encode(), content_type="application/json")
    return OodReference(
        key=key,
        threshold=detector.threshold,
        fit_slides=len(fit),
        calibration_slides=len(calibration),
        patches=int(sum(len(d) for d in (*fit, *calibration))),
        calibration_answered=detector.training["calibration_answered"],
        seconds=round(time.perf_counter() - started, 2),
    )


@pipeline_task(task_run_name="fit-ood-reference")
def fit_ood_reference(
    cohort: CohortRef, tiled: list[TiledSlide], config: OodConfig, model: ModelRef
) -> OodReference:
    """Fit the reference on the cohort's slides and store it beside ``model`` (the
    cancer detector) as ``ood.json`` (:func:`build_reference`)."""
    logger = get_run_logger()
    with FlowSettings().open_store() as store:
        reference = build_reference(
            store,
            read_cohort(cohort),
            tiled,
            config,
            ood_key(model.name, model.version),
            cohort.name,
        )
    if not reference.key:
        logger.warning("no OOD reference: %s", reference.reason)
    else:
        logger.info(
            "OOD reference %s: threshold %.2f, %d fit + %d held-out slides, %.1f s",
            reference.key,
            reference.threshold,
            reference.fit_slides,
            reference.calibration_slides,
            reference.seconds,
        )
    return reference
