"""An encoder with its weights from a local file, ready to embed uint8 patches.

The network is built on the ``meta`` device (no memory), the file's tensors are
checked against it (names and shapes, strictly) and then become its parameters
(``load_state_dict(assign=True)``), so a 1B-parameter model is never allocated twice.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from services.common.errors import InvalidInput
from services.encoders.architectures import (
    DETECTOR_BACKBONE,
    TINY_DETECTOR_BACKBONE,
    build_encoder,
    tiny_spec,
)
from services.encoders.biomarker_cnns import BIOMARKER_CNNS, read_sidecar, spec_with_bundles
from services.encoders.key_maps import adapt_state_dict
from services.encoders.registry import EncoderSpec, encoder_spec
from services.encoders.weights_files import file_sha256, read_state_dict, require_file

#: Keys listed in a mismatch message, of each kind.
_SHOWN_KEYS = 5


@dataclass(frozen=True)
class LoadedEncoder:
    """An encoder in eval mode with the weights of one file.

    Attributes:
        spec: What it expects and returns (the tiny variant's for tiny encoders).
        module: The network, in eval mode, on its device; no gradients.
        sha256: Hex SHA-256 of the weights file.
        path: The weights file.
    """

    spec: EncoderSpec
    module: nn.Module
    sha256: str
    path: Path

    @property
    def device(self) -> torch.device:
        """Where the module's parameters live."""
        return next(self.module.parameters()).device

    def embed(self, patches: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """Embeddings of RGB patches.

        Patches of another size are resized to ``spec.input_px`` in 8 bits (area
        interpolation when shrinking, bilinear when enlarging: the detector's own
        preprocessing), scaled to 0-1 and normalised by the spec's mean and std.

        Args:
            patches: uint8 ``(N, H, W, 3)`` RGB, read at ``spec.mpp`` µm/px.
            batch_size: Patches per forward pass.

        Returns:
            float32 ``(N, spec.embed_dim)``.

        Raises:
            InvalidInput: Not a uint8 ``(N, H, W, 3)`` array, or batch_size < 1.
        """
        from services.inference.preprocess import PreprocessConfig, to_input

        require_rgb_patches(patches)
        if batch_size < 1:
            raise InvalidInput(f"batch_size must be at least 1, got {batch_size}")
        spec = self.spec
        config = PreprocessConfig(spec.input_px, spec.mean, spec.std)
        out = np.empty((len(patches), spec.embed_dim), dtype=np.float32)
        device = self.device
        with torch.inference_mode():
            for start in range(0, len(patches), batch_size):
                batch = to_input(patches[start : start + batch_size], config).to(device)
                embedding = self.module(batch).float()
                out[start : start + len(batch)] = embedding.cpu().numpy()
        return out

    def model_card_entry(self) -> dict[str, Any]:
        """What a model card records about the encoder and its weights (JSON-ready)."""
        return {**self.spec.card(), "sha256": self.sha256, "weights_file": self.path.name}


def require_rgb_patches(patches: Any) -> None:
    """InvalidInput unless ``patches`` is a uint8 (N, H, W, 3) RGB array."""
    if (
        not isinstance(patches, np.ndarray)
        or patches.dtype != np.uint8
        or patches.ndim != 4
        or patches.shape[-1] != 3
    ):
        shape = getattr(patches, "shape", None)
        raise InvalidInput(
            f"patches must be a uint8 (N, H, W, 3) RGB array; got {shape} "
            f"{getattr(patches, 'dtype', type(patches).__name__)}"
        )


def load_encoder(
    name: str,
    weights_path: Path | str,
    *,
    device: str | torch.device = "cpu",
    tiny: bool = False,
) -> LoadedEncoder:
    """Encoder ``name`` with the weights of a local file.

    Args:
        name: Registry name (:func:`services.encoders.registry.encoder_names`).
        weights_path: ``.safetensors``, ``.bin``, ``.pth`` or ``.pt``; published key
            names are mapped where needed (:mod:`services.encoders.key_maps`). For
            ``detector``, the detector bundle's ``weights.pt``; when its
            ``model.json`` sits beside it, its backbone and input side are checked.
            For ``biomarker-cnns``, a file of
            :func:`services.encoders.biomarker_cnns.combine_bundles` with its
            ``<stem>.bundles.json`` sidecar beside it, which names the networks.
        device: Where the encoder runs (``cpu``, ``cuda``, ``cuda:N``).
        tiny: Load the tiny test variant (tests only).

    Raises:
        InvalidInput: Unknown name; an unreadable file; keys missing or unexpected
            (the first few of each are listed, with counts); a tensor of another
            shape (named, with both shapes); a detector bundle of another backbone;
            a malformed ``biomarker-cnns`` sidecar.
        FailedPrecondition: The file, or a ``biomarker-cnns`` file's sidecar, does
            not exist.
    """
    path = Path(weights_path)
    spec = effective_spec(name, path, tiny=tiny)  # an unknown name first
    require_file(path)
    state = adapt_state_dict(name, read_state_dict(path))
    bundles = read_sidecar(path) if name == BIOMARKER_CNNS else None
    module = build_encoder(name, device="meta", tiny=tiny, bundles=bundles)
    _check_fit(module, state, name, path)
    for key, value in state.items():  # in place: one tensor's copy at a time
        if value.is_floating_point() and value.dtype != torch.float32:
            state[key] = value.float()
    module.load_state_dict(state, strict=True, assign=True)
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:  # a non-persistent buffer the file cannot fill: a builder bug
        raise RuntimeError(f"{name}: tensors not in the state dict stayed on meta: {left[:3]}")
    module = module.to(device).eval().requires_grad_(False)
    return LoadedEncoder(spec, module, file_sha256(path), path)


def _check_fit(module: nn.Module, state: dict[str, torch.Tensor], name: str, path: Path) -> None:
    """InvalidInput unless ``state`` has exactly the module's keys, each its shape."""
    expected = {key: tuple(t.shape) for key, t in module.state_dict().items()}
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    if missing or unexpected:
        raise InvalidInput(
            f"weights file {path} does not fit encoder {name}: "
            f"{_listing(missing, 'missing')}; {_listing(unexpected, 'unexpected')}"
        )
    wrong = [key for key, shape in expected.items() if tuple(state[key].shape) != shape]
    if wrong:
        key = wrong[0]
        more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        raise InvalidInput(
            f"weights file {path} does not fit encoder {name}: {key} has shape "
            f"{tuple(state[key].shape)} in the file but {expected[key]} in the encoder{more}"
        )


def _listing(keys: list[str], what: str) -> str:
    if not keys:
        return f"0 {what}"
    shown = ", ".join(keys[:_SHOWN_KEYS])
    more = ", ..." if len(keys) > _SHOWN_KEYS else ""
    return f"{len(keys)} {what} ({shown}{more})"


def effective_spec(name: str, weights_path: Path | str, *, tiny: bool = False) -> EncoderSpec:
    """What encoder ``name`` expects and gives with this weights file: the registry's
    spec (its tiny variant's with ``tiny``), except for ``detector``, which is the
    detector as its bundle was trained (:func:`_detector_spec`), and
    ``biomarker-cnns``, which is what its sidecar's bundles make it
    (:func:`services.encoders.biomarker_cnns.spec_with_bundles`: their input side,
    normalisation and stain reference, 0.25 µm/px x 512 / input side, their width).

    Raises:
        InvalidInput: Unknown name; a detector bundle of another backbone; a
            malformed ``biomarker-cnns`` sidecar.
        FailedPrecondition: A ``biomarker-cnns`` weights file or its sidecar does
            not exist.
    """
    spec = tiny_spec(name) if tiny else encoder_spec(name)
    if name == "detector":
        spec = _detector_spec(Path(weights_path), spec, tiny)
    elif name == BIOMARKER_CNNS:
        require_file(Path(weights_path))  # the weights before their sidecar
        spec = spec_with_bundles(spec, read_sidecar(weights_path))
    return spec


def _detector_spec(path: Path, spec: EncoderSpec, tiny: bool) -> EncoderSpec:
    """The detector encoder as the bundle beside ``path`` was trained: its input side
    and normalisation (a CPU demo's detector sees 64 px, the method's 512 px), and
    the resolution that side gives its 512 px 20x training patches (64 px: 4 µm/px);
    the registry's spec when no ``model.json`` is there.

    Raises:
        InvalidInput: The bundle's backbone is not the one the encoder reproduces.
    """
    from services.inference.bundle import CONFIG_FILE, load_config

    if not (path.parent / CONFIG_FILE).is_file():
        return spec
    config = load_config(path.parent)
    backbone = TINY_DETECTOR_BACKBONE if tiny else DETECTOR_BACKBONE
    if config.backbone != backbone:
        raise InvalidInput(
            f"detector bundle {path.parent} was trained as {config.backbone}; the detector "
            f"encoder{' (tiny)' if tiny else ''} is {backbone}"
            + ("" if tiny else "; a tiny backbone loads with the tiny variant")
        )
    pre = config.preprocess
    method = encoder_spec("detector")  # 512 px at 20x, as the method tiles
    return replace(
        spec,
        input_px=pre.input_px,
        mpp=method.mpp * method.input_px / pre.input_px,
        mean=(pre.mean[0], pre.mean[1], pre.mean[2]),
        std=(pre.std[0], pre.std[1], pre.std[2]),
    )
