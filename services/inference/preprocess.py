"""From uint8 RGB patches to the network's input tensor, the same everywhere:
training, the TorchServe handler and in-process inference."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import cv2
import numpy as np
import torch

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


def fit_to_input(patch: np.ndarray, side: int) -> np.ndarray:
    """One uint8 RGB patch (H, W, 3) resized to ``side`` x ``side`` px, still uint8.

    Area interpolation when shrinking (each output pixel the mean of the input pixels
    it covers), bilinear when enlarging; the patch itself when it has that size.
    """
    height, width = patch.shape[:2]
    if (height, width) == (side, side):
        return patch
    shrink = height >= side and width >= side
    return cv2.resize(
        np.ascontiguousarray(patch),
        (side, side),
        interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR,
    )


def shrink_to_input(patches: np.ndarray, side: int) -> np.ndarray:
    """uint8 patches (N, H, W, 3) larger than the input shrunk to ``side`` px, in 8
    bits (:func:`fit_to_input`), for sending to a served model.

    The handler resizes with :func:`fit_to_input` too, and leaves a patch of the
    input size as it is, so the answer is the same; the request is (H / side)² times
    smaller. Patches not larger than the input on both sides go as they are.
    """
    if patches.ndim != 4 or patches.shape[1] <= side or patches.shape[2] <= side:
        return patches
    return np.stack([fit_to_input(p, side) for p in patches])


def to_input(batch: np.ndarray | torch.Tensor, config: PreprocessConfig) -> torch.Tensor:
    """uint8 RGB patches (N, H, W, 3) -> float32 (N, 3, input_px, input_px), normalized.

    Patches of another size are resized first, in 8 bits (:func:`fit_to_input`):
    training resizes before augmenting, and this keeps serving identical to it.

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
    side = config.input_px
    if tuple(tensor.shape[1:3]) != (side, side):
        pixels = tensor.cpu().numpy()
        tensor = torch.from_numpy(np.stack([fit_to_input(p, side) for p in pixels]))
    x = tensor.permute(0, 3, 1, 2).contiguous().float().div_(255.0)
    mean = torch.tensor(config.mean).view(1, 3, 1, 1)
    std = torch.tensor(config.std).view(1, 3, 1, 1)
    return (x - mean) / std
