"""The scoring schedule alone: the order of reads, requests, claims and queues,
driven by hand with answers in any order (no threads, no slide)."""

from __future__ import annotations

import numpy as np
import pytest

from services.prediction.schedule import Request, ScoringSchedule, WindowWork

BIOMARKERS = ("tp53", "er")


def _pixels(indices: np.ndarray) -> np.ndarray:
    """A batch of tiny 'patches' whose first pixel holds the grid index."""
    out = np.zeros((len(indices), 2, 2, 3), np.uint8)
    out[:, 0, 0, 0] = indices
    return out


class OneWindowEach:
    """Claims one window per cancer patch, at most once per patch, and records the
    order it was asked in."""

    def __init__(self) -> None:
        self.asked: list[int] = []
        self.claimed: set[int] = set()

    def __call__(self, indices: np.ndarray, patches: np.ndarray) -> WindowWork:
        work: WindowWork = []
        for i, patch in zip(indices, patches, strict=True):
            self.asked.append(int(i))
            if int(i) not in self.claimed:
                self.claimed.add(int(i))
                work.append((int(i), patch, [(int(i) * 10, 0)]))
        return work


def _schedule(
    patches: int = 10, batch: int = 3, read_ahead: int = 2, in_flight: int = 2
) -> tuple[ScoringSchedule, OneWindowEach]:
    claim = OneWindowEach()
    plan = ScoringSchedule(patches, batch, BIOMARKERS, read_ahead, in_flight, 0.5, claim)
    return plan, claim


def test_reads_stop_at_the_read_ahead_and_resume_as_batches_are_taken() -> None:
    plan, _ = _schedule(read_ahead=2)
    first = plan.reads_to_start()
    assert [n for n, _ in first] == [0, 1]
    assert [list(i) for _, i in first] == [[0, 1, 2], [3, 4, 5]]
    assert plan.reads_to_start() == []  # two out: no third
    plan.batch_read(0, first[0][1], _pixels(first[0][1]))
    (request,) = plan.requests_to_send()[:1]
    plan.cancer_scored(request, np.zeros(3))  # batch 0 taken
    assert [n for n, _ in plan.reads_to_start()] == [2]


def test_batches_are_taken_in_grid_order_whatever_the_detector_answers_first() -> None:
    plan, claim = _schedule(patches=9, batch=3, read_ahead=3, in_flight=3)
    for number, indices in plan.reads_to_start():
        plan.batch_read(number, indices, _pixels(indices))
    requests = plan.requests_to_send()
    assert [r.number for r in requests] == [0, 1, 2] and all(r.biomarker is None for r in requests)
    every = np.ones(3)
    assert plan.cancer_scored(requests[2], every) == []  # waits for 0 and 1
    assert plan.cancer_scored(requests[1], every) == []
    assert claim.asked == []
    makes = plan.cancer_scored(requests[0], every)
    assert claim.asked == list(range(9))  # claimed in grid order
    assert [m for m, _ in makes] == [0, 1, 2]
    assert [[i for i, _, _ in work] for _, work in makes] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert plan.hi_expected == 9 and plan.cancer_done == 9
    np.testing.assert_array_equal(plan.scores.cancer, np.ones(9))


def test_only_patches_above_the_threshold_get_windows() -> None:
    plan, claim = _schedule(patches=3, batch=3)
    for number, indices in plan.reads_to_start():
        plan.batch_read(number, indices, _pixels(indices))
    (request,) = plan.requests_to_send()
    (make,) = plan.cancer_scored(request, np.array([0.9, 0.2, 0.51]))
    assert [i for i, _, _ in make[1]] == [0, 2]
    assert claim.asked == [0, 2]


def test_made_windows_queue_in_make_order_and_biomarker_requests_go_first() -> None:
    plan, _ = _schedule(patches=6, batch=2, read_ahead=3, in_flight=8)
    for number, indices in plan.reads_to_start():
        plan.batch_read(number, indices, _pixels(indices))
    cancer = plan.requests_to_send()
    makes = [m for r in cancer for m in plan.cancer_scored(r, np.ones(2))]
    assert [m for m, _ in makes] == [0, 1, 2]

    def rows_of(work: WindowWork) -> list[dict[str, int]]:
        return [{"parent": i, "x": x, "y": y} for i, _, windows in work for x, y in windows]

    # Make 2 finishes first, then 0, then 1: rows still come out in grid order.
    for make in (2, 0, 1):
        work = makes[make][1]
        plan.windows_made(make, rows_of(work), np.stack([p for _, p, _ in work]))
        if make == 2:
            assert plan.scores.hi_rows == []
    assert [r["parent"] for r in plan.scores.hi_rows] == [0, 1, 2, 3, 4, 5]
    assert plan.scores.hi_batches == [(0, 2), (2, 4), (4, 6)]

    # A new 20x batch is ready too, but the queued biomarker requests go first.
    plan.ready20.append((9, np.array([0]), _pixels(np.array([0]))))
    sent = plan.requests_to_send()
    assert [(r.biomarker, r.number) for r in sent[:6]] == [
        (b, n) for n in range(3) for b in BIOMARKERS
    ]
    assert sent[6].biomarker is None  # then the detector
    first = sent[0]
    np.testing.assert_array_equal(first.patches[:, 0, 0, 0], [0, 1])


def test_the_schedule_finishes_after_every_answer_and_reports_progress() -> None:
    plan, _ = _schedule(patches=4, batch=2, read_ahead=2, in_flight=1)
    stages = []
    rounds = 0
    while not plan.finished:
        rounds += 1
        assert rounds < 100
        for number, indices in plan.reads_to_start():
            plan.batch_read(number, indices, _pixels(indices))
        for request in plan.requests_to_send():
            assert plan.in_flight <= 1
            if request.biomarker is None:
                for make, work in plan.cancer_scored(request, np.array([0.9, 0.1])):
                    rows = [{"parent": i} for i, _, _ in work]
                    plan.windows_made(make, rows, np.stack([p for _, p, _ in work]))
            else:
                plan.biomarker_scored(request, np.full(len(request.patches), 0.25))
        stages.append(plan.progress())
    assert plan.hi_expected == 2 and plan.hi_done == 2 * len(BIOMARKERS)
    for biomarker in BIOMARKERS:
        assert np.concatenate(plan.scores.hi_probs[biomarker]).tolist() == [0.25, 0.25]
    fractions = [s.fraction for s in stages]
    assert fractions == sorted(fractions)
    assert stages[0].stage == "cancer_detection" and stages[-1].stage == "biomarkers"
    assert stages[-1].fraction == pytest.approx(0.9)


def test_a_slide_without_patches_is_finished_at_once() -> None:
    plan, _ = _schedule(patches=0)
    assert plan.reads_to_start() == [] and plan.requests_to_send() == []
    assert plan.finished


def test_a_biomarker_answer_fills_its_own_slot() -> None:
    plan, _ = _schedule(patches=2, batch=2)
    plan._queue([{"parent": 0}, {"parent": 1}], _pixels(np.array([0, 1])))
    plan.in_flight = 1
    plan.biomarker_scored(Request("er", 0, _pixels(np.array([0, 1]))), np.array([0.1, 0.2]))
    assert plan.scores.hi_probs["er"][0].tolist() == [0.1, 0.2]
    assert np.isnan(plan.scores.hi_probs["tp53"][0]).all()
