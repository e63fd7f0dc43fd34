"""Patch classifiers by name: InceptionV3 (the method's), ResNet-18 and two small CNNs.

Nothing is downloaded: a backbone starts from random weights unless the caller gives
a local file of ImageNet weights (a torchvision ``state_dict``); its classification
head is then replaced by a fresh one with ``num_classes`` outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from services.common.errors import InvalidInput


@dataclass(frozen=True)
class BackboneSpec:
    """What a backbone needs around it.

    Attributes:
        name: Name as given to ``build_backbone``.
        min_input_px: Smallest input side the network accepts, px.
        aux_min_input_px: Smallest input side at which training mode also returns
            auxiliary logits, px; 0 when the network has none.
    """

    name: str
    min_input_px: int
    aux_min_input_px: int = 0


def _conv_block(inputs: int, outputs: int, stride: int) -> list[nn.Module]:
    """3x3 convolution, batch norm, ReLU."""
    return [
        nn.Conv2d(inputs, outputs, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(outputs),
        nn.ReLU(inplace=True),
    ]


class _PooledCNN(nn.Module):
    """Convolutional features, global average pooling and a linear head."""

    def __init__(self, layers: list[nn.Module], channels: int, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class TinyCNN(_PooledCNN):
    """Four conv blocks and global average pooling: for tests and CPU demos."""

    def __init__(self, num_classes: int = 2, width: int = 16) -> None:
        layers: list[nn.Module] = []
        channels = 3
        for i in range(4):
            out = width * 2**i
            layers += _conv_block(channels, out, 2)
            channels = out
        super().__init__(layers, channels, num_classes)


class SmallCNN(_PooledCNN):
    """A CPU-sized classifier that still sees nuclear detail: a strided stem, then
    three stages of two 3x3 convolutions (the second strided), global average pooling.

    Compared with :class:`TinyCNN` each stage after the stem looks once more at full
    stage resolution before halving it, which is what counting small dark fragments
    or comparing nucleus sizes needs; at 128 px it costs about four times as much.
    """

    def __init__(self, num_classes: int = 2, width: int = 16) -> None:
        layers = _conv_block(3, width, 2)
        channels = width
        for i in range(1, 4):
            out = width * 2**i
            layers += _conv_block(channels, out, 1) + _conv_block(out, out, 2)
            channels = out
        super().__init__(layers, channels, num_classes)


def _inception_v3(num_classes: int, weights: dict | None, input_px: int) -> nn.Module:
    from torchvision.models import inception_v3

    # init_weights=False: torchvision's truncated-normal init is slow and only matters
    # for reproducing its ImageNet training; default PyTorch init trains fine.
    model = inception_v3(weights=None, aux_logits=True, init_weights=False)
    if weights is not None:
        _load_imagenet(model, weights)
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    assert model.AuxLogits is not None
    if input_px >= INCEPTION_AUX_MIN_PX:
        model.AuxLogits.fc = nn.Linear(model.AuxLogits.fc.in_features, num_classes)
    else:
        # The auxiliary head's 5x5 convolution needs the 17x17 map of a >= 299 px
        # input; smaller inputs train on the main head alone.
        model.aux_logits = False
        model.AuxLogits = None
    return model


def _resnet18(num_classes: int, weights: dict | None, input_px: int) -> nn.Module:
    from torchvision.models import resnet18

    model = resnet18(weights=None)
    if weights is not None:
        _load_imagenet(model, weights)
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model


def _tiny(num_classes: int, weights: dict | None, input_px: int) -> nn.Module:
    if weights is not None:
        raise InvalidInput("the tiny backbone has no pretrained weights")
    return TinyCNN(num_classes)


def _small(num_classes: int, weights: dict | None, input_px: int) -> nn.Module:
    if weights is not None:
        raise InvalidInput("the small backbone has no pretrained weights")
    return SmallCNN(num_classes)


#: Input side from which InceptionV3 keeps its auxiliary classifier, px.
INCEPTION_AUX_MIN_PX = 299

_BUILDERS: dict[str, tuple[BackboneSpec, Callable[[int, dict | None, int], nn.Module]]] = {
    "inception_v3": (BackboneSpec("inception_v3", 75, INCEPTION_AUX_MIN_PX), _inception_v3),
    "resnet18": (BackboneSpec("resnet18", 32), _resnet18),
    "tiny": (BackboneSpec("tiny", 16), _tiny),
    "small": (BackboneSpec("small", 16), _small),
}
BACKBONES = tuple(_BUILDERS)


def backbone_spec(name: str) -> BackboneSpec:
    """The spec of a backbone; InvalidInput for an unknown name."""
    if name not in _BUILDERS:
        raise InvalidInput(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    return _BUILDERS[name][0]


def build_backbone(
    name: str,
    num_classes: int = 2,
    weights_path: Path | str | None = None,
    input_px: int = 512,
) -> nn.Module:
    """A classifier with ``num_classes`` logits.

    Args:
        name: ``inception_v3`` (default of the method), ``resnet18``, ``tiny`` or
            ``small``.
        num_classes: Outputs of the new head.
        input_px: Side of the input it will see, px (InceptionV3 drops its auxiliary
            head below 299 px).
        weights_path: Local file with ImageNet weights for the body (torchvision
            ``state_dict``, optionally under a ``state_dict`` key); never downloaded.

    Raises:
        InvalidInput: Unknown name, unreadable or mismatching weights file.
    """
    spec = backbone_spec(name)
    if num_classes < 2:
        raise InvalidInput(f"num_classes must be >= 2, got {num_classes}")
    if input_px < spec.min_input_px:
        raise InvalidInput(f"{name} needs inputs of at least {spec.min_input_px} px")
    weights = _read_weights(Path(weights_path)) if weights_path is not None else None
    return _BUILDERS[spec.name][1](num_classes, weights, input_px)


def _read_weights(path: Path) -> dict:
    if not path.is_file():
        raise InvalidInput(f"weights file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InvalidInput(f"weights file {path} is not a torch state_dict: {exc}") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise InvalidInput(f"weights file {path} holds no state_dict")
    return state


def _load_imagenet(model: nn.Module, state: dict) -> None:
    """Load a body's weights; the classification heads are replaced afterwards."""
    own = model.state_dict()
    # The auxiliary classifier is optional: load it when both have it.
    body = {k: v for k, v in state.items() if k in own and not _is_head(k)}
    shapes = [k for k, v in body.items() if tuple(v.shape) != tuple(own[k].shape)]
    missing = [k for k in own if not _is_head(k) and k not in body]
    if shapes or missing:
        raise InvalidInput(
            f"weights do not fit this backbone: {len(missing)} missing, "
            f"{len(shapes)} of another shape (e.g. {(missing or shapes)[0]})"
        )
    model.load_state_dict(body, strict=False)


def _is_head(key: str) -> bool:
    return key.startswith("fc.") or key.startswith("AuxLogits.fc.")


def split_outputs(output: object) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(main logits, auxiliary logits or None) of any backbone's forward output."""
    if isinstance(output, torch.Tensor):
        return output, None
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits, getattr(output, "aux_logits", None)
    raise TypeError(f"unexpected model output {type(output).__name__}")
