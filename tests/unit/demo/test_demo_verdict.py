"""What the demo says about its held-out targets: met and missed are reported, and
only ``--require-targets`` turns a miss into a failed run."""

from __future__ import annotations

import math

from services.apps.demo import SCALES, target_verdict
from services.apps.demo_heldout.scores import TaskResult


def _results(*aurocs: float) -> list[TaskResult]:
    names = ("cancer", "tp53", "pik3ca")
    return [
        TaskResult(name, value, 70, 20, 0.95 if name == "cancer" else 0.75, "")
        for name, value in zip(names, aurocs, strict=False)
    ]


def test_all_met_says_so() -> None:
    line = target_verdict(_results(0.99, 0.80, 0.76), [], SCALES["full"])
    assert line == "Every task met its target (3 of 3)."


def test_a_miss_is_named_with_its_figure() -> None:
    line = target_verdict(_results(0.99, 0.80, 0.709), [], SCALES["full"])
    assert line == "Targets met: 2 of 3; missed: pik3ca (0.709 < 0.75)."


def test_untrained_and_undefined_tasks_count_as_missed() -> None:
    line = target_verdict(_results(0.99, math.nan), ["her2"], SCALES["full"])
    assert line == "Targets met: 1 of 3; missed: tp53, her2 (not trained)."


def test_quick_scale_has_no_verdict() -> None:
    line = target_verdict(_results(0.5, 0.4), [], SCALES["quick"])
    assert "no AUROC targets" in line


def test_a_missed_target_fails_the_run_only_when_required() -> None:
    from services.apps.demo import run_ok

    assert run_ok(answered=True, targets_met=False, require_targets=False)
    assert not run_ok(answered=True, targets_met=False, require_targets=True)
    assert run_ok(answered=True, targets_met=True, require_targets=True)
    assert run_ok(answered=True, targets_met=None, require_targets=True)  # quick scale
    assert not run_ok(answered=False, targets_met=True, require_targets=False)
