"""The encoders' networks, built locally with random weights: never downloaded.

Each builder reproduces a published architecture with timm, open_clip or torchvision,
with the parameter names of the published weights, so that a local weights file loads
strictly (see :mod:`services.encoders.loading`). The returned module's forward takes a
normalised float tensor ``(N, 3, input_px, input_px)`` and returns ``(N, embed_dim)``,
pooled as the spec says.

``tiny=True`` builds the same family (same token layout, register tokens, layer scale,
MLP type and pooling) at toy sizes — depth 2, width 64, 2 heads, 32 px inputs — so that
tests run real forwards in milliseconds. Tiny encoders are for tests only: no
published weights fit them, and their spec (:func:`tiny_spec`) has its own input side
and width.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from services.common.errors import InvalidInput
from services.encoders.registry import EncoderSpec, encoder_spec

if TYPE_CHECKING:
    from services.inference.bundle import ModelConfig

#: Width, depth and heads of every tiny transformer.
_TINY_WIDTH = 64
_TINY_VIT = {"embed_dim": _TINY_WIDTH, "depth": 2, "num_heads": 2}
#: Input side of every tiny encoder and patch side of the tiny transformers, px.
_TINY_INPUT_PX = 32
_TINY_PATCH_PX = 8
#: Width of the tiny CONCH embedding (its attentional pooler's width).
_TINY_CONCH_DIM = 32
#: Channels of histomarker's ``tiny`` backbone after its last block.
_TINY_DETECTOR_DIM = 128


class ClsMeanPool(nn.Module):
    """Class token and mean of the patch tokens, concatenated: (N, T, D) -> (N, 2 D).

    Installed as a timm ViT's ``attn_pool`` (with ``pool_include_prefix``), timm's own
    hook for a pooling module; it has no parameters, so the state dict keeps the
    published names. Register tokens (between the class token and the patch tokens)
    are left out of the mean, as Virchow2's and H0-mini's model cards do.
    """

    def __init__(self, num_prefix_tokens: int) -> None:
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        patches = tokens[:, self.num_prefix_tokens :]
        return torch.cat([tokens[:, 0], patches.mean(dim=1)], dim=-1)


def _timm_vit(arch: str, tiny: bool, pooling: str = "cls", **kwargs: Any) -> nn.Module:
    """A timm ViT by registered name with ``kwargs`` over its defaults, no head.

    Tiny: width 64, depth 2, 2 heads, 32 px inputs in 8 px patches and an MLP ratio of
    4 (the published SwiGLU ratios give an odd hidden width at width 64); everything
    else (registers, position embedding layout, layer scale, MLP type) is kept.
    """
    import timm

    if tiny:
        kwargs.update(_TINY_VIT, img_size=_TINY_INPUT_PX, patch_size=_TINY_PATCH_PX, mlp_ratio=4.0)
    model: Any = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
    if pooling == "cls+mean":
        model.attn_pool = ClsMeanPool(model.num_prefix_tokens)
        model.pool_include_prefix = True
    elif pooling != "cls":
        raise ValueError(f"no timm pooling {pooling!r}")
    return model


def _swiglu() -> dict[str, Any]:
    """timm's packed SwiGLU MLP with SiLU: DINOv2's large models' feed-forward."""
    from timm.layers import SwiGLUPacked

    return {"mlp_layer": SwiGLUPacked, "act_layer": nn.SiLU}


def _uni(tiny: bool) -> nn.Module:
    return _timm_vit(
        "vit_large_patch16_224", tiny, img_size=224, init_values=1e-5, dynamic_img_size=True
    )


def _uni2_h(tiny: bool) -> nn.Module:
    return _timm_vit(
        "vit_giant_patch14_224",
        tiny,
        img_size=224,
        patch_size=14,
        depth=24,
        num_heads=24,
        embed_dim=1536,
        init_values=1e-5,
        mlp_ratio=2.66667 * 2,
        no_embed_class=True,
        reg_tokens=8,
        dynamic_img_size=True,
        **_swiglu(),
    )


def _h_optimus_0(tiny: bool) -> nn.Module:
    # The registered architecture brings SwiGLU, 4 registers and no_embed_class.
    return _timm_vit(
        "vit_giant_patch14_reg4_dinov2",
        tiny,
        img_size=224,
        init_values=1e-5,
        dynamic_img_size=False,
    )


def _h0_mini(tiny: bool) -> nn.Module:
    # mlp_ratio 5.33334: DINOv2's SwiGLU width for ViT-B (2048 hidden, packed 4096),
    # which H0-mini's hub config sets over the registered ViT-B's 4.
    return _timm_vit(
        "vit_base_patch14_reg4_dinov2",
        tiny,
        "cls+mean",
        img_size=224,
        init_values=1e-5,
        mlp_ratio=5.33334,
        **_swiglu(),
    )


def _virchow2(tiny: bool) -> nn.Module:
    return _timm_vit(
        "vit_huge_patch14_224",
        tiny,
        "cls+mean",
        img_size=224,
        init_values=1e-5,
        mlp_ratio=5.3375,
        reg_tokens=4,
        dynamic_img_size=True,
        **_swiglu(),
    )


def _prov_gigapath(tiny: bool) -> nn.Module:
    # The public config overrides the registered ViT-g/14 with 16 px patches and
    # mlp_ratio 5.33334; SwiGLU comes with the registered architecture.
    return _timm_vit(
        "vit_giant_patch14_dinov2",
        tiny,
        img_size=224,
        patch_size=16,
        init_values=1e-5,
        mlp_ratio=5.33334,
    )


def _phikon_v2(tiny: bool) -> nn.Module:
    # Hugging Face Dinov2 ViT-L/16: class token with its own position, GELU MLP,
    # layer scale, LayerNorm eps 1e-6 (timm's default for ViTs).
    return _timm_vit(
        "vit_large_patch16_224", tiny, img_size=224, init_values=1e-5, dynamic_img_size=True
    )


class ConchVision(nn.Module):
    """CONCH's vision tower: a timm ViT-B/16 trunk and an attentional pooler.

    Parameter names follow CONCH's ``visual`` module (``trunk``,
    ``attn_pool_contrast``, ``ln_contrast``, ``proj_contrast``). The pooler's single
    query attends over all output tokens (class token included); the pooled vector is
    layer-normed. Its forward returns that 512-d vector, what CONCH's
    ``encode_image(proj_contrast=False, normalize=False)`` returns and what its authors
    recommend for downstream features; ``project=True`` multiplies it by the
    contrastive projection as well (the CLIP-space embedding, also 512-d). The
    captioning pooler (256 queries) plays no part in either and is not built.
    """

    def __init__(
        self, trunk: Any, embed_dim: int, pooler_heads: int, project: bool = False
    ) -> None:
        from open_clip.transformer import AttentionalPooler

        super().__init__()
        self.trunk = trunk
        width = int(trunk.num_features)
        self.attn_pool_contrast = AttentionalPooler(
            embed_dim, width, n_head=pooler_heads, n_queries=1
        )
        self.ln_contrast = nn.LayerNorm(embed_dim)
        self.proj_contrast = nn.Parameter(width**-0.5 * torch.randn(embed_dim, embed_dim))
        self.project = project

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.trunk.forward_features(x)
        pooled = self.ln_contrast(self.attn_pool_contrast(tokens)[:, 0])
        return pooled @ self.proj_contrast if self.project else pooled


def _conch(tiny: bool) -> nn.Module:
    trunk = _timm_vit("vit_base_patch16_224", tiny, img_size=448, dynamic_img_size=True)
    if tiny:
        return ConchVision(trunk, _TINY_CONCH_DIM, pooler_heads=2)
    return ConchVision(trunk, 512, pooler_heads=8)


class TruncatedResNet(nn.Module):
    """A torchvision ResNet up to ``layer3``, global average pooled.

    Its children keep torchvision's names (``conv1``, ``bn1``, ``layer1``...), so a
    torchvision ``state_dict`` loads once ``layer4`` and ``fc`` are dropped.
    """

    def __init__(self, resnet: Any) -> None:
        super().__init__()
        self.conv1 = resnet.conv1
        self.bn1 = resnet.bn1
        self.relu = resnet.relu
        self.maxpool = resnet.maxpool
        self.layer1 = resnet.layer1
        self.layer2 = resnet.layer2
        self.layer3 = resnet.layer3
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return torch.flatten(self.pool(x), 1)


def _resnet50_trunc(tiny: bool) -> nn.Module:
    from torchvision.models.resnet import Bottleneck, ResNet, resnet50

    if tiny:
        # One bottleneck a stage, narrow inside; layer3 still ends in 1024 channels.
        return TruncatedResNet(ResNet(Bottleneck, [1, 1, 1, 1], width_per_group=8))
    return TruncatedResNet(resnet50(weights=None))


#: Backbone the detector encoder reproduces: the method's, and TrainConfig's default.
DETECTOR_BACKBONE = "inception_v3"
#: The same for tiny detectors: histomarker's ``tiny`` CNN (tests and CPU demos).
TINY_DETECTOR_BACKBONE = "tiny"


def _detector(tiny: bool) -> nn.Module:
    """The detector's classifier without its heads: its output is the pooled trunk."""
    from services.inference.backbones import build_backbone

    name = TINY_DETECTOR_BACKBONE if tiny else DETECTOR_BACKBONE
    side = _TINY_INPUT_PX if tiny else encoder_spec("detector").input_px
    model: Any = build_backbone(name, num_classes=2, input_px=side)
    model.fc = nn.Identity()  # both backbones pool, flatten, then apply ``fc``
    if getattr(model, "AuxLogits", None) is not None:
        model.AuxLogits = None
        model.aux_logits = False
    return model


def _biomarker_cnns(tiny: bool) -> nn.Module:
    """The six biomarker CNNs the registry's spec describes (no sidecar)."""
    from services.encoders.biomarker_cnns import build_biomarker_cnns, default_bundles

    return build_biomarker_cnns(default_bundles(tiny))


_BUILDERS: dict[str, Callable[[bool], nn.Module]] = {
    "uni": _uni,
    "uni2-h": _uni2_h,
    "h-optimus-0": _h_optimus_0,
    "h0-mini": _h0_mini,
    "virchow2": _virchow2,
    "prov-gigapath": _prov_gigapath,
    "phikon-v2": _phikon_v2,
    "conch": _conch,
    "resnet50-trunc": _resnet50_trunc,
    "detector": _detector,
    "biomarker-cnns": _biomarker_cnns,
}


def tiny_spec(name: str) -> EncoderSpec:
    """The spec of an encoder's tiny test variant: its input side and width.

    Raises:
        InvalidInput: Unknown name.
    """
    spec = encoder_spec(name)
    if name == "conch":
        width = _TINY_CONCH_DIM
    elif name == "resnet50-trunc":
        width = spec.embed_dim
    elif name == "detector":
        width = _TINY_DETECTOR_DIM
    elif name == "biomarker-cnns":  # six tiny CNNs: their features and margins
        from services.encoders.biomarker_cnns import default_bundles, embed_width

        width = embed_width(default_bundles(tiny=True))
    else:
        width = _TINY_WIDTH * (2 if spec.pooling == "cls+mean" else 1)
    return replace(
        spec,
        embed_dim=width,
        input_px=_TINY_INPUT_PX,
        source=f"tiny test variant of: {spec.source}",
    )


def build_encoder(
    name: str,
    *,
    device: str | torch.device = "cpu",
    tiny: bool = False,
    bundles: Mapping[str, ModelConfig] | None = None,
) -> nn.Module:
    """An encoder's network with random weights, in eval mode.

    Args:
        name: Registry name (:func:`services.encoders.registry.encoder_names`).
        device: Where its tensors live; ``meta`` allocates nothing (for loading
            weights with ``assign=True``, counting parameters, checking shapes).
        tiny: Build the toy-sized test variant (see the module docstring).
        bundles: ``biomarker-cnns`` only: biomarker -> bundle config, as a combined
            weights file's sidecar gives them
            (:func:`services.encoders.biomarker_cnns.read_sidecar`); they replace
            the registry's six (and ``tiny``). None for every other encoder.

    Returns:
        A module mapping normalised ``(N, 3, input_px, input_px)`` float tensors to
        ``(N, embed_dim)`` embeddings.

    Raises:
        InvalidInput: Unknown name; the message lists the known ones; bundle configs
            for another encoder than ``biomarker-cnns``.
    """
    encoder_spec(name)  # InvalidInput for an unknown name
    if bundles is not None and name != "biomarker-cnns":
        raise InvalidInput(f"bundle configs build biomarker-cnns only, not {name}")
    with torch.device(device):
        if bundles is not None:
            from services.encoders.biomarker_cnns import build_biomarker_cnns

            module: nn.Module = build_biomarker_cnns(bundles)
        else:
            module = _BUILDERS[name](tiny)
    return module.eval()
