"""The named patch encoders: what each returns, what it expects and under which licence.

A spec describes the contract around an encoder (input side, resolution, colour
normalisation, pooling, width of the embedding); the architecture itself is built by
:func:`services.encoders.architectures.build_encoder`. Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from services.common.errors import InvalidInput

#: How an encoder turns its output tokens or feature map into one vector per patch.
#: ``cls``: the class token; ``cls+mean``: the class token and the mean of the patch
#: tokens (register tokens excluded), concatenated; ``mean``: the mean of the patch
#: tokens; ``pooled``: the network's own pooling (global average pooling of a CNN,
#: an attentional pooler).
POOLINGS = ("cls", "cls+mean", "mean", "pooled")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Bioptimus' H&E statistics (H-optimus-0, H0-mini).
BIOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
BIOPTIMUS_STD = (0.211883, 0.230117, 0.177517)
#: OpenAI CLIP's statistics (CONCH).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class EncoderSpec:
    """What an encoder needs around it and what it gives back.

    Attributes:
        name: Registry name (``uni``, ``virchow2``, ...).
        embed_dim: Width of the embedding one patch gives, after pooling.
        input_px: Side of the square network input, px; patches of another size are
            resized to it.
        mpp: Resolution the patches should be read at, µm/px (0.5 = 20x).
        mean: Per-channel RGB mean subtracted after scaling to 0-1.
        std: Per-channel RGB standard deviation divided by after that.
        licence: Licence of the published weights, SPDX identifier where there is
            one (``other: ...`` otherwise).
        pooling: One of :data:`POOLINGS`.
        source: One line: which public model the architecture reproduces.
        stain_reference: The stain normalization the encoder's patches need, as a
            bundle's ``ModelConfig.stain_reference`` states it: a store key of a
            ``stain.json``, ``""`` for the service's built-in reference; None for
            colours as scanned (every encoder but ``biomarker-cnns``, and that one when
            its bundles were trained without normalization).
    """

    name: str
    embed_dim: int
    input_px: int
    mpp: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    licence: str
    pooling: str
    source: str
    stain_reference: str | None = None

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise InvalidInput(
                f"pooling must be one of {', '.join(POOLINGS)}; got {self.pooling!r}"
            )
        if self.embed_dim < 1 or self.input_px < 1 or not self.mpp > 0:
            raise InvalidInput("embed_dim, input_px and mpp must be positive")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise InvalidInput("mean and std need 3 values each, std > 0")
        if self.stain_reference is not None and not isinstance(self.stain_reference, str):
            raise InvalidInput(
                f"stain_reference must be text or None, got {self.stain_reference!r}"
            )

    def card(self) -> dict[str, Any]:
        """What a model card states about the encoder (JSON-ready)."""
        return {
            "name": self.name,
            "source": self.source,
            "licence": self.licence,
            "embed_dim": self.embed_dim,
            "input_px": self.input_px,
            "mpp": self.mpp,
            "mean": list(self.mean),
            "std": list(self.std),
            "pooling": self.pooling,
            "stain_reference": self.stain_reference,
        }


def _spec(
    name: str,
    embed_dim: int,
    licence: str,
    pooling: str,
    source: str,
    *,
    input_px: int = 224,
    mpp: float = 0.5,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
    stain_reference: str | None = None,
) -> EncoderSpec:
    return EncoderSpec(
        name, embed_dim, input_px, mpp, mean, std, licence, pooling, source, stain_reference
    )


_NON_COMMERCIAL = "CC-BY-NC-ND-4.0"

#: Every encoder by name, in the order they are listed to users.
ENCODERS: dict[str, EncoderSpec] = {
    spec.name: spec
    for spec in (
        _spec(
            "uni",
            1024,
            _NON_COMMERCIAL,
            "cls",
            "UNI (MahmoodLab/UNI): ViT-L/16, DINOv2-trained on Mass-100K",
        ),
        _spec(
            "uni2-h",
            1536,
            _NON_COMMERCIAL,
            "cls",
            "UNI2-h (MahmoodLab/UNI2-h): ViT-H/14 with SwiGLU and 8 register tokens",
        ),
        _spec(
            "h-optimus-0",
            1536,
            "Apache-2.0",
            "cls",
            "H-optimus-0 (bioptimus/H-optimus-0): ViT-g/14 with 4 register tokens",
            mean=BIOPTIMUS_MEAN,
            std=BIOPTIMUS_STD,
        ),
        _spec(
            "h0-mini",
            1536,
            _NON_COMMERCIAL,
            "cls+mean",
            "H0-mini (bioptimus/H0-mini): ViT-B/14 with SwiGLU and 4 registers, "
            "distilled from H-optimus-0",
            mean=BIOPTIMUS_MEAN,
            std=BIOPTIMUS_STD,
        ),
        _spec(
            "virchow2",
            2560,
            _NON_COMMERCIAL,
            "cls+mean",
            "Virchow2 (paige-ai/Virchow2): ViT-H/14 with SwiGLU and 4 register tokens",
        ),
        _spec(
            "prov-gigapath",
            1536,
            "Apache-2.0",
            "cls",
            "Prov-GigaPath tile encoder (prov-gigapath/prov-gigapath): ViT-g/16, SwiGLU",
        ),
        _spec(
            "phikon-v2",
            1024,
            "other: Owkin non-commercial",
            "cls",
            "Phikon-v2 (owkin/phikon-v2): ViT-L/16 DINOv2, Hugging Face Dinov2Model weights",
        ),
        _spec(
            "conch",
            512,
            _NON_COMMERCIAL,
            "pooled",
            "CONCH vision tower (MahmoodLab/CONCH): ViT-B/16 at 448 px with an "
            "attentional pooler, 512-d embedding before the contrastive projection",
            input_px=448,
            mean=CLIP_MEAN,
            std=CLIP_STD,
        ),
        _spec(
            "resnet50-trunc",
            1024,
            "BSD-3-Clause",
            "pooled",
            "torchvision ResNet-50 truncated after layer3, global average pooled (CLAM's)",
        ),
        _spec(
            "detector",
            2048,
            "Apache-2.0",
            "pooled",
            "histomarker's cancer_detector: its InceptionV3 trunk without the classifier, "
            "global average pooled",
            input_px=512,
        ),
        # Without its sidecar (services.encoders.biomarker_cnns), the method's six:
        # InceptionV3 at 512 px on 40x patches, 2048 features and a margin each. A
        # combined file's sidecar gives its own backbones, side, normalisation and
        # stain reference (services.encoders.effective_spec).
        _spec(
            "biomarker-cnns",
            6 * (2048 + 1),
            "Apache-2.0",
            "pooled",
            "histomarker's six biomarker CNNs of the paper's pipeline: each one's pooled "
            "trunk features and its logit margin, concatenated",
            input_px=512,
            mpp=0.25,
            stain_reference="",  # the paper's pipeline normalizes to the built-in reference
        ),
    )
}


def encoder_names() -> tuple[str, ...]:
    """The registered encoder names, in listing order."""
    return tuple(ENCODERS)


def encoder_spec(name: str) -> EncoderSpec:
    """The spec of an encoder.

    Raises:
        InvalidInput: Unknown name; the message lists the known ones.
    """
    if name not in ENCODERS:
        raise InvalidInput(f"unknown encoder {name!r}; choose one of {', '.join(ENCODERS)}")
    return ENCODERS[name]
