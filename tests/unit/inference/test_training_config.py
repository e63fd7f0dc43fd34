"""Training configuration checks that need no data."""

from __future__ import annotations

import pytest
import torch

from services.common.errors import InvalidInput
from services.inference.training import TrainConfig, use_autocast


def test_autocast_modes() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert use_autocast("on", cpu) and not use_autocast("off", cpu)
    assert use_autocast("auto", cuda) and not use_autocast("off", cuda)
    amx = getattr(torch._C._cpu, "_is_amx_tile_supported", lambda: False)()
    assert use_autocast("auto", cpu) == bool(amx)


def test_bad_precision_is_refused() -> None:
    with pytest.raises(InvalidInput, match="mixed_precision"):
        TrainConfig(backbone="tiny", input_px=32, mixed_precision="yes")
