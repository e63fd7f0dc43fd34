"""``biomarker-cnns``: the paper pipeline's biomarker CNNs as one frozen patch encoder.

Per patch, each biomarker bundle's classifier gives its pooled trunk features (the
input of its final ``fc``) and its logit margin ``logit[1] - logit[0]`` (raw, before
the bundle's temperature); the embedding is their concatenation, biomarker by
biomarker in sorted name order: width ``sum(fc.in_features + 1)``.

The encoder loads from one local weights file, as every encoder does. A trained
pipeline's bundles become that file with :func:`combine_bundles` (``histomarker
encoders combine``), which writes two files side by side:

``<name>.pt``
    One ``state_dict``: key ``<biomarker>.<param>`` for each bundle's ``weights.pt``
    entry (``er.fc.weight``, ``tp53.features.0.weight``...).
``<name>.bundles.json`` (:func:`sidecar_path`)
    ``{"encoder": "biomarker-cnns", "format": 1, "bundles": {<biomarker>:
    <ModelConfig>}}``: each bundle's ``model.json`` as it was (backbone, classes,
    preprocess input_px/mean/std, stain_reference, version, temperature...). It
    sets the encoder's networks, input side, resolution, normalisation and stain
    reference (:func:`spec_with_bundles`); every bundle must share the last three.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from services.common.errors import FailedPrecondition, InvalidInput
from services.common.vocabulary import BIOMARKERS, biomarker_of_model, model_name_of
from services.encoders.registry import EncoderSpec, encoder_spec
from services.inference.backbones import build_backbone
from services.inference.bundle import ModelConfig, load_bundle
from services.inference.preprocess import PreprocessConfig

#: Registry name of the encoder.
BIOMARKER_CNNS = "biomarker-cnns"
#: The sidecar's name: the weights file's stem and this suffix.
SIDECAR_SUFFIX = ".bundles.json"
#: Version of the sidecar's layout.
SIDECAR_FORMAT = 1
#: Suffixes the combined weights file may have (a torch ``state_dict``).
WEIGHTS_SUFFIXES = (".pt", ".pth", ".bin")
#: What the encoder is without a sidecar (meta-device checks, listings): the method's
#: InceptionV3 at 512 px; its tiny variant histomarker's ``tiny`` CNN at 32 px.
_DEFAULT_BACKBONE = "inception_v3"
_TINY_BACKBONE = "tiny"
_TINY_INPUT_PX = 32


class BiomarkerCNNs(nn.ModuleDict):
    """Biomarker classifiers keyed by biomarker; forward gives, for each in sorted
    order, its pooled features and its logit margin, concatenated.

    The features are caught on their way into each classifier's ``fc`` (a forward
    hook), which works for every backbone of :mod:`services.inference.backbones`
    in eval mode (the tiny and small CNNs, torchvision's InceptionV3 and ResNet-18).
    Being a ``ModuleDict`` itself, its ``state_dict`` keys are ``<biomarker>.<param>``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts: list[torch.Tensor] = []
        for name in sorted(self.keys()):
            features, logits = _pooled_and_logits(self[name], x)
            parts += [features, (logits[:, 1] - logits[:, 0]).unsqueeze(1)]
        return torch.cat(parts, dim=1)


def _pooled_and_logits(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A classifier's logits and the flattened input of its ``fc``."""
    caught: list[torch.Tensor] = []
    fc: Any = model.fc
    handle = fc.register_forward_hook(lambda _module, args, _output: caught.append(args[0]))
    try:
        logits = model(x)
    finally:
        handle.remove()
    return torch.flatten(caught[0], 1), logits


def build_biomarker_cnns(bundles: Mapping[str, ModelConfig]) -> BiomarkerCNNs:
    """The encoder's network for these bundle configs, with random weights (on the
    current default device: build under ``torch.device("meta")`` to allocate
    nothing)."""
    return BiomarkerCNNs(
        {
            name: build_backbone(
                config.backbone, config.num_classes, input_px=config.preprocess.input_px
            )
            for name, config in sorted(bundles.items())
        }
    )


def default_bundles(tiny: bool = False) -> dict[str, ModelConfig]:
    """The six biomarker configs the registry's spec describes (no sidecar): the
    method's InceptionV3 at 512 px, or the tiny CNN at 32 px."""
    backbone, side = (_TINY_BACKBONE, _TINY_INPUT_PX) if tiny else (_DEFAULT_BACKBONE, 512)
    return {
        name: ModelConfig(
            name=model_name_of(name),
            version="0",
            backbone=backbone,
            preprocess=PreprocessConfig(side),
        )
        for name in sorted(BIOMARKERS)
    }


@functools.lru_cache(maxsize=32)
def feature_width(backbone: str, num_classes: int, input_px: int) -> int:
    """Width of a backbone's pooled features (its ``fc.in_features``), built on meta."""
    with torch.device("meta"):
        model = build_backbone(backbone, num_classes, input_px=input_px)
    fc: Any = model.fc
    return int(fc.in_features)


def embed_width(bundles: Mapping[str, ModelConfig]) -> int:
    """Width of the encoder's embedding: pooled features plus one margin per bundle."""
    return sum(
        feature_width(c.backbone, c.num_classes, c.preprocess.input_px) + 1
        for c in bundles.values()
    )


def encoder_stain_reference(stain_reference: str) -> str | None:
    """A bundle's ``stain_reference`` as an encoder spec states it: ``none`` (no
    normalization) is None; "" (the built-in reference) and store keys stay."""
    return None if stain_reference.lower() == "none" else stain_reference


def spec_with_bundles(spec: EncoderSpec, bundles: Mapping[str, ModelConfig]) -> EncoderSpec:
    """``spec`` (the registry's or its tiny variant's) as these bundles make it: their
    input side and normalisation, the resolution that side gives the paper's 512 px
    40x patches (128 px: 1 µm/px), their width and their stain reference."""
    first = bundles[min(bundles)]
    pre = first.preprocess
    method = encoder_spec(BIOMARKER_CNNS)  # 512 px at 0.25 µm/px, as the paper tiles
    listed = ", ".join(f"{name} ({c.backbone} v{c.version})" for name, c in sorted(bundles.items()))
    return replace(
        spec,
        embed_dim=embed_width(bundles),
        input_px=pre.input_px,
        mpp=method.mpp * method.input_px / pre.input_px,
        mean=(pre.mean[0], pre.mean[1], pre.mean[2]),
        std=(pre.std[0], pre.std[1], pre.std[2]),
        stain_reference=encoder_stain_reference(first.stain_reference),
        source=f"{spec.source}; bundles: {listed}",
    )


def sidecar_path(weights: Path | str) -> Path:
    """The sidecar of a combined weights file: ``cnns.pt`` -> ``cnns.bundles.json``."""
    weights = Path(weights)
    return weights.with_name(weights.stem + SIDECAR_SUFFIX)


def read_sidecar(weights: Path | str) -> dict[str, ModelConfig]:
    """The bundle configs of a combined weights file, from its sidecar.

    Raises:
        FailedPrecondition: No sidecar beside the weights file.
        InvalidInput: A malformed sidecar, no bundles, an unknown biomarker, or
            bundles that disagree (:func:`check_bundles`).
    """
    path = sidecar_path(weights)
    if not path.is_file():
        raise FailedPrecondition(
            f"{BIOMARKER_CNNS} weights {Path(weights).name} need their sidecar {path} "
            "beside them; write both with `histomarker encoders combine`"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidInput(f"sidecar {path} is not JSON: {exc}") from None
    bundles = data.get("bundles") if isinstance(data, dict) else None
    if not isinstance(bundles, dict) or not bundles:
        raise InvalidInput(f"sidecar {path} lists no bundles (a 'bundles' object)")
    if data.get("format") != SIDECAR_FORMAT:
        raise InvalidInput(f"sidecar {path} has format {data.get('format')!r}, not 1")
    configs = {}
    for name, config in bundles.items():
        try:
            configs[name] = ModelConfig.from_json(json.dumps(config))
        except InvalidInput as exc:
            raise InvalidInput(f"sidecar {path}, bundle {name}: {exc}") from None
    check_bundles(configs, str(path))
    return dict(sorted(configs.items()))


def check_bundles(bundles: Mapping[str, ModelConfig], where: str) -> None:
    """InvalidInput unless ``bundles`` is a non-empty set of biomarkers, each a binary
    ``biomarker_<name>`` model, all with the same preprocessing and stain reference."""
    if not bundles:
        raise InvalidInput(f"{where}: no bundles; give at least one of {', '.join(BIOMARKERS)}")
    for name, config in bundles.items():
        if name not in BIOMARKERS:
            raise InvalidInput(
                f"{where}: unknown biomarker {name!r}; use one of {', '.join(BIOMARKERS)}"
            )
        if config.name != model_name_of(name):
            raise InvalidInput(f"{where}: the {name} bundle is {config.name}, not biomarker_{name}")
        if config.num_classes != 2:
            raise InvalidInput(
                f"{where}: the {name} bundle has {config.num_classes} classes; a logit margin "
                "needs 2"
            )
    first_name = min(bundles)
    first = bundles[first_name]
    for name, config in sorted(bundles.items()):
        for what, mine, theirs in (
            ("preprocess (input_px, mean, std)", config.preprocess, first.preprocess),
            ("stain_reference", config.stain_reference, first.stain_reference),
        ):
            if mine != theirs:
                raise InvalidInput(
                    f"{where}: bundles {first_name} and {name} differ in {what}: "
                    f"{_shown(theirs)} vs {_shown(mine)}; one encoder needs the same for all"
                )


def _shown(value: Any) -> str:
    if isinstance(value, PreprocessConfig):
        return f"{value.input_px} px, mean {list(value.mean)}, std {list(value.std)}"
    return repr(value)


def bundles_by_biomarker(folders: Sequence[Path | str]) -> dict[str, Path]:
    """Bundle folders by the biomarker their ``model.json`` names (``biomarker_er``
    -> ``er``), for :func:`combine_bundles`.

    Raises:
        NotFound: A folder without ``model.json``.
        InvalidInput: A bundle that is no biomarker's model, or two of one biomarker.
    """
    from services.inference.bundle import load_config

    found: dict[str, Path] = {}
    for folder in map(Path, folders):
        config = load_config(folder)
        name = biomarker_of_model(config.name)
        if name is None:
            raise InvalidInput(
                f"bundle {folder} is {config.name}, not a biomarker model (biomarker_<name>)"
            )
        if name in found:
            raise InvalidInput(f"two bundles of {name}: {found[name]} and {folder}")
        found[name] = folder
    return found


def combine_bundles(bundle_folders: Mapping[str, Path | str], out: Path | str) -> Path:
    """Write the ``biomarker-cnns`` weights file of trained biomarker bundles and its
    sidecar beside it (the module docstring), each atomically.

    Args:
        bundle_folders: Biomarker -> bundle folder (``weights.pt`` and
            ``model.json``); any non-empty subset of the biomarkers.
        out: The weights file to write (``.pt``, ``.pth`` or ``.bin``); its sidecar
            is :func:`sidecar_path` of it. Both are replaced if present.

    Returns:
        ``out``.

    Raises:
        NotFound: A folder without ``model.json``.
        InvalidInput: No bundles, an unknown biomarker, a bundle of another model,
            not binary, or whose weights do not fit it; bundles whose preprocessing
            (input_px, mean, std) or stain reference differ; a bad ``out`` suffix.
    """
    out = Path(out)
    if out.suffix.lower() not in WEIGHTS_SUFFIXES:
        raise InvalidInput(
            f"the combined weights file must end in {', '.join(WEIGHTS_SUFFIXES)}, got {out.name}"
        )
    from services.inference.bundle import load_config

    folders = {name: Path(folder) for name, folder in sorted(bundle_folders.items())}
    configs = {name: load_config(folder) for name, folder in folders.items()}
    check_bundles(configs, "combining bundles")
    state: dict[str, torch.Tensor] = {}
    for name, folder in folders.items():
        model, _ = load_bundle(folder)  # InvalidInput when its weights do not fit
        for key, value in model.state_dict().items():
            state[f"{name}.{key}"] = value.detach().cpu().clone()
    sidecar = {
        "encoder": BIOMARKER_CNNS,
        "format": SIDECAR_FORMAT,
        "bundles": {name: asdict(config) for name, config in configs.items()},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(out, lambda handle: torch.save(state, handle))
    text = json.dumps(sidecar, indent=2, sort_keys=True) + "\n"
    _write_atomically(sidecar_path(out), lambda handle: handle.write(text.encode("utf-8")))
    return out


def _write_atomically(path: Path, write: Any) -> None:
    """Write ``path`` through a temporary file in its folder, renamed over it."""
    fd, partial = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        os.replace(partial, path)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
