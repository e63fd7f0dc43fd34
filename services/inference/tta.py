"""Test-time augmentation: the 8 dihedral transforms of a square patch, no randomness.

H&E patches have no preferred orientation, so a patch's rotations and mirror images
are equally valid views; averaging the calibrated probabilities over them steadies
the call.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from services.common.errors import InvalidInput

#: The dihedral group D4 as (quarter turns counter-clockwise, mirror left-right first).
DIHEDRAL: tuple[tuple[int, bool], ...] = tuple(
    (k, flip) for flip in (False, True) for k in range(4)
)
#: Names of the transforms, in DIHEDRAL order, for configuration.
TRANSFORM_NAMES = (
    "rot0",
    "rot90",
    "rot180",
    "rot270",
    "flip",
    "flip_rot90",
    "flip_rot180",
    "flip_rot270",
)


def transforms_by_name(names: Sequence[str] | None) -> tuple[tuple[int, bool], ...]:
    """The configured subset of DIHEDRAL (all 8 when ``names`` is None or empty)."""
    if not names:
        return DIHEDRAL
    unknown = [n for n in names if n not in TRANSFORM_NAMES]
    if unknown:
        raise InvalidInput(
            f"unknown TTA transform {unknown[0]!r}; use {', '.join(TRANSFORM_NAMES)}"
        )
    return tuple(DIHEDRAL[TRANSFORM_NAMES.index(n)] for n in dict.fromkeys(names))


def apply_transform(x: torch.Tensor, quarter_turns: int, mirror: bool) -> torch.Tensor:
    """One dihedral transform of a (N, C, H, W) batch."""
    if mirror:
        x = torch.flip(x, dims=(-1,))
    return torch.rot90(x, quarter_turns, dims=(-2, -1)) if quarter_turns else x


@torch.inference_mode()
def tta_logits(
    model: nn.Module,
    x: torch.Tensor,
    transforms: Sequence[tuple[int, bool]] = DIHEDRAL,
) -> torch.Tensor:
    """Logits of every view: (len(transforms), N, classes). ``model`` in eval mode."""
    return torch.stack([model(apply_transform(x, k, m)) for k, m in transforms])


def tta_probabilities(
    model: nn.Module,
    x: torch.Tensor,
    temperature: float = 1.0,
    transforms: Sequence[tuple[int, bool]] = DIHEDRAL,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Calibrated probabilities averaged over the views, and the mean logits.

    Returns:
        ``(probabilities, logits)``, each (N, classes): the mean of
        ``softmax(logits / T)`` over the views, and the mean of the views' logits.
    """
    views = tta_logits(model, x, transforms)
    probabilities = torch.softmax(views / temperature, dim=-1).mean(0)
    return probabilities, views.mean(0)
