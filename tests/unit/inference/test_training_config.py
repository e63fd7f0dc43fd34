"""Training configuration checks that need no data."""

from __future__ import annotations

import pytest
import torch

from services.common.errors import InvalidInput
from services.inference.training import TrainConfig, build_schedule, use_autocast


def test_autocast_modes() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert use_autocast("on", cpu) and not use_autocast("off", cpu)
    assert use_autocast("auto", cuda) and not use_autocast("off", cuda)
    amx = getattr(torch._C._cpu, "_is_amx_tile_supported", lambda: False)()
    assert use_autocast("auto", cpu) == bool(amx)


def test_bad_precision_is_refused() -> None:
    with pytest.raises(InvalidInput, match="mixed_precision"):
        TrainConfig(backbone="tiny", input_px=32, mixed_precision="yes")


@pytest.mark.parametrize("total_steps", [1, 2, 3, 10, 40])
@pytest.mark.parametrize("warmup", [0.0, 0.1, 0.5])
def test_schedule_runs_every_step_of_short_runs(total_steps: int, warmup: float) -> None:
    """One-cycle divides by each phase's length: 10 steps at a tenth of warm-up made
    a phase of zero steps (ZeroDivisionError). Every schedule must run to its end
    with finite, non-negative learning rates that peak at most at ``lr``."""
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([weight], lr=0.01)
    config = TrainConfig(lr=0.01, warmup_fraction=warmup)
    schedule = build_schedule(optimizer, config, total_steps)
    rates = []
    for _ in range(total_steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert all(0.0 <= rate <= 0.01 + 1e-12 for rate in rates), rates


def test_the_bundle_keeps_the_chosen_test_time_views() -> None:
    rotations = ("rot0", "rot90", "rot180", "rot270")
    config = TrainConfig(backbone="small", input_px=128, tta=rotations)
    assert config.model_config(temperature=1.5).tta == rotations
    assert len(TrainConfig(backbone="tiny", input_px=32).model_config().tta) == 8
    with pytest.raises(InvalidInput, match="unknown TTA transform 'spin'"):
        TrainConfig(backbone="tiny", input_px=32, tta=("rot0", "spin"))


def test_the_bundle_records_the_grid_the_patches_came_from() -> None:
    config = TrainConfig(backbone="tiny", input_px=32, grid_overlap_px=256)
    assert config.model_config(temperature=1.2).grid_overlap_px == 256
    assert TrainConfig(backbone="tiny", input_px=32).model_config().grid_overlap_px == 0
    # A record, not a setting of the training: a checkpoint resumes across it.
    assert "grid_overlap_px" not in config.fingerprint()
    with pytest.raises(InvalidInput, match="grid_overlap_px"):
        TrainConfig(backbone="tiny", input_px=32, grid_overlap_px=-256)
