"""The scoring engine of one slide: reads, normalizes and scores its 20x patches, turns
the cancer ones into 40x windows and scores those with every biomarker model, with
the stages overlapping (see :mod:`services.prediction.pipeline`); then the patch table
and the mean aggregation per biomarker.

The engine does the work on two thread pools (reads and 40x windows; scoring
requests); what to start next, and in which order results are taken, is the
:class:`~services.prediction.schedule.ScoringSchedule`'s."""

from __future__ import annotations

from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from services.common.cancellation import WorkBudget
from services.prediction.models import DeployedModel, Deployment, PatchScorer
from services.prediction.progress import BusyMeter, Clock, Reporter
from services.prediction.results import BiomarkerResult, TopPatch
from services.prediction.schedule import Scores, ScoringSchedule, WindowWork
from services.slide.grid import TissueRule
from services.slide.highres import HighResSource, WindowClaims, make_windows
from services.slide.reader import SlideReader
from services.slide.stain import SlideStains

if TYPE_CHECKING:
    from services.prediction.pipeline import PredictionParams


class ScoringEngine:
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
        report: Reporter,
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
        self.budget = budget
        self.report = report
        self.meter = BusyMeter()
        self.clock = Clock()
        #: The 40x windows claimed so far (coordinator thread only).
        self.windows = WindowClaims(tissue)
        self.schedule = ScoringSchedule(
            len(grid),
            params.batch_size,
            params.biomarkers,
            params.read_ahead_batches,
            params.max_in_flight,
            threshold,
            self._claim_40x,
        )

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

    def _make_40x(self, work: WindowWork) -> tuple[list[dict[str, int]], np.ndarray]:
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

    def _claim_40x(self, indices: np.ndarray, patches20: np.ndarray) -> WindowWork:
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
    def run(self) -> Scores:
        """Score the slide: the pools do the work, :class:`ScoringSchedule` the order."""
        params = self.params
        plan = self.schedule
        readers = ThreadPoolExecutor(params.reader_threads, thread_name_prefix="predict-read")
        scorers = ThreadPoolExecutor(params.max_in_flight, thread_name_prefix="predict-score")
        pending: dict[Future[Any], tuple[str, Any]] = {}
        failed = True
        try:
            while True:
                self.budget.check()
                for number, indices in plan.reads_to_start():
                    pending[readers.submit(self._read_20x, indices)] = ("read", (number, indices))
                for request in plan.requests_to_send():
                    if request.biomarker is None:
                        model, what = self.deployment.cancer, "cancer_requests"
                    else:
                        model = self.deployment.biomarkers[request.biomarker]
                        what = "biomarker_requests"
                    job = scorers.submit(self._score, model, request.patches, what)
                    pending[job] = ("score", request)
                if not pending:
                    break
                done, _ = wait(list(pending), timeout=0.05, return_when=FIRST_COMPLETED)
                for future in done:
                    kind, payload = pending.pop(future)
                    value = future.result()  # re-raises the task's error
                    if kind == "read":
                        number, indices = payload
                        plan.batch_read(number, indices, value)
                    elif kind == "make":
                        rows, patches = value
                        plan.windows_made(payload, rows, patches)
                    elif payload.biomarker is None:
                        for make, work in plan.cancer_scored(payload, value):
                            pending[readers.submit(self._make_40x, work)] = ("make", make)
                    else:
                        plan.biomarker_scored(payload, value)
                step = plan.progress()
                self.report(step.stage, step.done, step.total, step.fraction, step.message)
            failed = False
        finally:
            for future in pending:
                future.cancel()
            # Readers touch the slide, which the caller closes next: wait for them.
            readers.shutdown(wait=True, cancel_futures=True)
            scorers.shutdown(wait=not failed, cancel_futures=True)
        return plan.scores


def patch_table(slide_id: str, scores: Scores, biomarkers: tuple[str, ...]) -> pd.DataFrame:
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


def aggregate(
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
