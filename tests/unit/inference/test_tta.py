"""The dihedral test-time augmentation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from services.common.errors import InvalidInput
from services.inference.tta import (
    DIHEDRAL,
    apply_transform,
    transforms_by_name,
    tta_probabilities,
)


def test_the_eight_transforms_are_distinct_and_a_group() -> None:
    x = torch.arange(16.0).view(1, 1, 4, 4)
    views = {tuple(apply_transform(x, k, m).flatten().tolist()) for k, m in DIHEDRAL}
    assert len(views) == 8
    # Closed under composition: transforming a view again gives one of the eight.
    for k, m in DIHEDRAL:
        again = apply_transform(apply_transform(x, k, m), 1, True)
        assert tuple(again.flatten().tolist()) in views


def test_invariant_model_gives_the_same_probabilities() -> None:
    model = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2)).eval()
    x = torch.randn(5, 3, 8, 8)
    p, logits = tta_probabilities(model, x, temperature=2.0)
    torch.testing.assert_close(p, torch.softmax(model(x) / 2.0, -1))
    torch.testing.assert_close(logits, model(x))


def test_orientation_dependent_model_is_averaged() -> None:
    class TopRow(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            top = x[:, 0, 0, :].mean(-1)
            return torch.stack([top, -top], dim=-1)

    x = torch.zeros(1, 1, 4, 4)
    x[0, 0, 0, :] = 1.0  # bright top row: only views keeping it on top see it
    p, _ = tta_probabilities(TopRow(), x)
    single = torch.softmax(TopRow()(x), -1)
    assert p[0, 0] < single[0, 0]  # averaging pulls the call towards the other views


def test_subsets_by_name() -> None:
    assert transforms_by_name(None) == DIHEDRAL
    assert transforms_by_name(["rot0", "flip"]) == ((0, False), (0, True))
    with pytest.raises(InvalidInput, match="unknown TTA transform"):
        transforms_by_name(["rot45"])
