"""What the scoring engine does next: the state of one slide's overlapping stages.

The engine (:class:`services.prediction.engine.ScoringEngine`) owns the thread pools
and the slide; this module owns the order. :class:`ScoringSchedule` is told what
finished and answers what to start, in five named steps:

1. :meth:`~ScoringSchedule.reads_to_start`: the 20x batches to read now (at most
   ``read_ahead_batches`` read but not yet scored, and none while the 40x backlog is
   full, so memory stays bounded);
2. :meth:`~ScoringSchedule.requests_to_send`: scoring requests up to
   ``max_in_flight``, biomarker requests before cancer ones (downstream first: bounded
   memory, early results);
3. :meth:`~ScoringSchedule.cancer_scored`: a 20x batch's cancer probabilities; the
   batches are taken in grid order whatever finished first, their cancer patches'
   40x windows claimed (a window shared by overlapping patches goes to the first)
   and handed back as work to make;
4. :meth:`~ScoringSchedule.windows_made`: made 40x patches, queued in grid order
   too, in request-sized batches, one request per biomarker;
5. :meth:`~ScoringSchedule.biomarker_scored`: a request's biomarker probabilities.

Because batches are taken, claimed and queued in grid order, the 40x rows and every
request's patches are the same whichever thread finishes first (a request's answer
may depend on the batch it went in). No threads and no pixels are touched here, so
the order can be tested alone (``tests/unit/prediction/test_schedule.py``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from services.prediction.progress import SCORING_SPAN, STAGE_START

#: 40x work of cancer 20x patches: (20x patch index, its normalized pixels, the level-0
#: origins of its windows still to make).
WindowWork = list[tuple[int, np.ndarray, list[tuple[int, int]]]]


@dataclass
class Scores:
    """What the scoring stages produced."""

    cancer: np.ndarray  # (n20,) calibrated cancer probability per 20x patch
    hi_rows: list[dict[str, int]] = field(default_factory=list)  # one per 40x window
    hi_probs: dict[str, list[np.ndarray]] = field(default_factory=dict)
    hi_batches: list[tuple[int, int]] = field(default_factory=list)  # row ranges


@dataclass(frozen=True)
class Request:
    """One scoring request to send.

    Attributes:
        biomarker: The biomarker whose model scores it; None for the cancer detector.
        number: The 20x batch number (cancer) or the 40x batch number (biomarker).
        patches: (N, H, W, 3) uint8 pixels.
        indices: The grid rows of a 20x batch (cancer requests only).
    """

    biomarker: str | None
    number: int
    patches: np.ndarray
    indices: np.ndarray | None = None


@dataclass(frozen=True)
class Progress:
    """Where scoring stands, as the reporter takes it."""

    stage: str
    done: int
    total: int
    fraction: float
    message: str


class ScoringSchedule:
    """The order of one slide's reads, requests, claims and queues (module docstring).

    Args:
        patch_count: 20x patches in the grid.
        batch_size: Patches per request.
        biomarkers: The biomarkers scored on every 40x patch.
        read_ahead_batches: 20x batches read but not yet scored, at most.
        max_in_flight: Scoring requests in flight, at most.
        threshold: Cancer probability above which a 20x patch's windows are made.
        claim: The unclaimed 40x windows of cancer 20x patches (their grid indices and
            pixels), claimed now; called in grid order.
    """

    def __init__(
        self,
        patch_count: int,
        batch_size: int,
        biomarkers: Sequence[str],
        read_ahead_batches: int,
        max_in_flight: int,
        threshold: float,
        claim: Callable[[np.ndarray, np.ndarray], WindowWork],
    ) -> None:
        self.batches = [
            np.arange(start, min(start + batch_size, patch_count))
            for start in range(0, patch_count, batch_size)
        ]
        self.patch_count = patch_count
        self.batch_size = batch_size
        self.biomarkers = tuple(biomarkers)
        self.read_ahead_batches = read_ahead_batches
        self.max_in_flight = max_in_flight
        self.threshold = threshold
        self.claim = claim
        self.scores = Scores(
            cancer=np.full(patch_count, np.nan), hi_probs={b: [] for b in self.biomarkers}
        )
        self.backlog = read_ahead_batches * len(self.biomarkers) * 4
        self.ready20: deque[tuple[int, np.ndarray, np.ndarray]] = deque()  # read, unsent
        self.jobs40: deque[Request] = deque()  # queued biomarker requests, unsent
        # Scored 20x batches waiting for an earlier one, and made 40x patches waiting
        # for an earlier make: each taken in grid order.
        self.scored20: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self.made40: dict[int, tuple[list[dict[str, int]], np.ndarray]] = {}
        self.next_batch = 0  # the next 20x batch to read
        self.next_taken = 0  # the next scored 20x batch to take
        self.next_make = 0  # the number of the next 40x make handed out
        self.next_queued = 0  # the next made 40x batch to queue
        self.reads_out = 0  # 20x batches read or being read, not yet taken
        self.in_flight = 0
        self.cancer_done = 0
        self.hi_expected = 0
        self.hi_done = 0

    # -- 1. reads ----------------------------------------------------------------------
    def reads_to_start(self) -> list[tuple[int, np.ndarray]]:
        """The 20x batches (number, grid indices) to read now, marked as reading."""
        out = []
        while (
            self.next_batch < len(self.batches)
            and self.reads_out < self.read_ahead_batches
            and len(self.jobs40) < self.backlog
        ):
            out.append((self.next_batch, self.batches[self.next_batch]))
            self.next_batch += 1
            self.reads_out += 1
        return out

    def batch_read(self, number: int, indices: np.ndarray, patches: np.ndarray) -> None:
        """A 20x batch's normalized pixels are in: it waits for the detector."""
        self.ready20.append((number, indices, patches))

    # -- 2. requests -------------------------------------------------------------------
    def requests_to_send(self) -> list[Request]:
        """The requests to send now, marked as in flight: biomarker ones first."""
        out = []
        while self.in_flight < self.max_in_flight and (self.jobs40 or self.ready20):
            if self.jobs40:
                out.append(self.jobs40.popleft())
            else:
                number, indices, patches = self.ready20.popleft()
                out.append(Request(None, number, patches, indices))
            self.in_flight += 1
        return out

    # -- 3. the detector's answers -----------------------------------------------------
    def cancer_scored(
        self, request: Request, probabilities: np.ndarray
    ) -> list[tuple[int, WindowWork]]:
        """A 20x batch's cancer probabilities.

        Returns:
            (make number, work) of each batch now taken in grid order whose cancer
            patches have windows to make.
        """
        assert request.biomarker is None and request.indices is not None
        self.in_flight -= 1
        self.scores.cancer[request.indices] = probabilities
        keep = probabilities > self.threshold
        self.scored20[request.number] = (request.indices, request.patches, keep)
        makes = []
        while self.next_taken in self.scored20:
            indices, patches, keep = self.scored20.pop(self.next_taken)
            self.next_taken += 1
            self.reads_out -= 1
            self.cancer_done += len(indices)
            work = self.claim(indices[keep], patches[keep])
            if work:
                self.hi_expected += sum(len(windows) for _, _, windows in work)
                makes.append((self.next_make, work))
                self.next_make += 1
        return makes

    # -- 4. made windows ---------------------------------------------------------------
    def windows_made(self, make: int, rows: list[dict[str, int]], patches: np.ndarray) -> None:
        """A make's 40x rows and pixels: queued, in grid order, one request per
        biomarker and batch."""
        self.made40[make] = (rows, patches)
        while self.next_queued in self.made40:
            rows, patches = self.made40.pop(self.next_queued)
            self.next_queued += 1
            self._queue(rows, patches)

    def _queue(self, rows: list[dict[str, int]], patches: np.ndarray) -> None:
        scores = self.scores
        for start in range(0, len(rows), self.batch_size):
            number = len(scores.hi_batches)
            first = len(scores.hi_rows)
            chunk = rows[start : start + self.batch_size]
            scores.hi_rows.extend(chunk)
            scores.hi_batches.append((first, first + len(chunk)))
            batch = patches[start : start + self.batch_size]
            for biomarker in self.biomarkers:
                scores.hi_probs[biomarker].append(np.full(len(chunk), np.nan))
                self.jobs40.append(Request(biomarker, number, batch))

    # -- 5. the biomarker models' answers ----------------------------------------------
    def biomarker_scored(self, request: Request, probabilities: np.ndarray) -> None:
        """A 40x batch's probabilities under one biomarker's model."""
        assert request.biomarker is not None
        self.in_flight -= 1
        self.scores.hi_probs[request.biomarker][request.number] = probabilities
        self.hi_done += len(probabilities)

    # -- where it stands ---------------------------------------------------------------
    @property
    def finished(self) -> bool:
        """Every batch read, scored and taken, every window made, queued and scored."""
        return (
            self.next_batch == len(self.batches)
            and self.next_taken == len(self.batches)
            and self.next_queued == self.next_make
            and not self.ready20
            and not self.jobs40
            and self.in_flight == 0
        )

    def progress(self) -> Progress:
        """The stage, counts and overall fraction to report."""
        models = len(self.biomarkers)
        cancer_share = self.cancer_done / max(self.patch_count, 1)
        bio_total = self.hi_expected * models
        # Until the detector finishes, the 40x work is extrapolated from what it kept.
        estimate = bio_total / max(cancer_share, 1e-9) if cancer_share else 0.0
        bio_share = self.hi_done * models / estimate if estimate else 0.0
        fraction = STAGE_START["cancer_detection"] + SCORING_SPAN * (
            0.3 * cancer_share + 0.7 * min(bio_share, 1.0)
        )
        if self.cancer_done < self.patch_count:
            return Progress(
                "cancer_detection",
                self.cancer_done,
                self.patch_count,
                fraction,
                "scoring 20x patches",
            )
        return Progress(
            "biomarkers", self.hi_done, self.hi_expected, fraction, "scoring 40x patches"
        )
