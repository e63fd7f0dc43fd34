"""From uint8 RGB patches to the network's input tensor, the same everywhere:
training, the TorchServe handler and in-process inference."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from services.common.errors import InvalidInput


@dataclass(frozen=True)
class PreprocessConfig:
    """How patches become input tensors.

    Attributes:
        input_px: Side of the square network input, px (512 for the method's runs,
            smaller for demos and tests); patches of another size are resized
            (area interpolation down, bilinear up).
        mean: Per-channel mean subtracted after scaling to 0-1 (ImageNet's).
        std: Per-channel standard deviation divided by after that.
    """

    input_px: int = 512
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def __post_init__(self) -> None:
        if not 16 <= self.input_px <= 2048:
            raise InvalidInput(f"input_px must be within 16-2048, got {self.input_px}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise InvalidInput("mean and std need 3 values each, std > 0")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PreprocessConfig:
        data = json.loads(text)
        return cls(
            input_px=int(data["input_px"]),
            mean=tuple(float(v) for v in data["mean"]),  # type: ignore[arg-type]
            std=tuple(float(v) for v in data["std"]),  # type: ignore[arg-type]
        )


def to_input(batch: np.ndarray | torch.Tensor, config: PreprocessConfig) -> torch.Tensor:
    """uint8 RGB patches (N, H, W, 3) -> float32 (N, 3, input_px, input_px), normalized.

    Raises:
        InvalidInput: Not a uint8 batch of RGB images.
    """
    tensor = torch.as_tensor(batch)
    if tensor.ndim == 3:
        tensor = tensor.unsqueeze(0)
    if tensor.ndim != 4 or tensor.shape[-1] != 3 or tensor.dtype != torch.uint8:
        raise InvalidInput(
            f"patches must be uint8 (N, H, W, 3) RGB; got {tuple(tensor.shape)} {tensor.dtype}"
        )
    x = tensor.permute(0, 3, 1, 2).float().div_(255.0)
    height, width = x.shape[-2:]
    side = config.input_px
    if (height, width) != (side, side):
        mode = "area" if height >= side and width >= side else "bilinear"
        x = F.interpolate(x, size=(side, side), mode=mode, **_align(mode))
    mean = torch.tensor(config.mean).view(1, 3, 1, 1)
    std = torch.tensor(config.std).view(1, 3, 1, 1)
    return (x - mean) / std


def _align(mode: str) -> dict:
    return {"align_corners": False} if mode == "bilinear" else {}
