"""The scoring engine of one slide: reads, normalizes and scores its 20x patches, turns
the cancer ones into 40x windows and scores those with every biomarker model, with
the stages overlapping (see :mod:`services.prediction.pipeline`); then the patch table
and the mean aggregation per biomarker."""

from __future__ import annotations

from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from services.common.cancellation import WorkBudget
from services.prediction.models import DeployedModel, Deployment, PatchScorer
from services.prediction.progress import SCORING_SPAN, STAGE_START, BusyMeter, Clock, Reporter
from services.prediction.results import BiomarkerResult, TopPatch
from services.slide.grid import TissueRule
from services.slide.highres import HighResSource, WindowClaims, make_windows
from services.slide.prepare import SlideStains
from services.slide.reader import SlideReader

if TYPE_CHECKING:
    from services.prediction.pipeline import PredictionParams


@dataclass
class Scores:
    """What the scoring stages produced."""

    cancer: np.ndarray  # (n20,) calibrated cancer probability per 20x patch
    hi_rows: list[dict[str, int]] = field(default_factory=list)  # one per 40x window
    hi_probs: dict[str, list[np.ndarray]] = field(default_factory=dict)
    hi_batches: list[tuple[int, int]] = field(default_factory=list)  # row ranges


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
        self.threshold = threshold
        self.budget = budget
        self.report = report
        self.meter = BusyMeter()
        self.clock = Clock()
        self.scores = Scores(
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
    def run(self) -> Scores:
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
        fraction = STAGE_START["cancer_detection"] + SCORING_SPAN * (
            0.3 * cancer_share + 0.7 * min(bio_share, 1.0)
        )
        if cancer_done < n20:
            self.report("cancer_detection", cancer_done, n20, fraction, "scoring 20x patches")
        else:
            self.report("biomarkers", hi_done, hi_expected, fraction, "scoring 40x patches")


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
