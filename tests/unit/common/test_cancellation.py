from __future__ import annotations

import pytest

from services.common.cancellation import WorkBudget
from services.common.errors import Cancelled, DeadlineExceeded


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_budget_runs_out_at_the_deadline() -> None:
    clock = FakeClock()
    budget = WorkBudget(timeout_s=2.0, clock=clock)
    budget.check()
    assert budget.remaining_s() == pytest.approx(2.0)
    clock.now += 1.5
    budget.check()
    assert budget.remaining_s() == pytest.approx(0.5)
    clock.now += 0.5
    with pytest.raises(DeadlineExceeded):
        budget.check()
    assert budget.remaining_s() == 0.0


def test_cancellation_wins_over_time_left() -> None:
    cancelled = {"flag": False}
    budget = WorkBudget(timeout_s=60.0, is_cancelled=lambda: cancelled["flag"])
    budget.check()
    cancelled["flag"] = True
    with pytest.raises(Cancelled, match="cancelled"):
        budget.check()


def test_unlimited_budget_never_runs_out() -> None:
    budget = WorkBudget.unlimited()
    assert budget.remaining_s() is None
    budget.check()
