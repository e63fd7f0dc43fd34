"""From a published weights file's key names to those of the encoder we build.

Most files need nothing. The ones that do:

- ``phikon-v2``: weights published for Hugging Face ``Dinov2Model`` are renamed to
  timm's ViT and the separate query/key/value projections are concatenated into
  timm's ``qkv`` (see :func:`dinov2_hf_to_timm`).
- ``conch``: a whole CoCa checkpoint keeps only its ``visual.`` tower; the captioning
  pooler (``attn_pool_caption``, ``ln_caption``) is dropped.
- ``resnet50-trunc``: a full ResNet-50 ``state_dict`` loses ``layer4`` and ``fc``.
- ``detector``: the cancer detector's ``weights.pt`` loses its classifier (``fc``)
  and InceptionV3's auxiliary classifier (``AuxLogits``).

Keys dropped here are parts the embedding does not use, not errors; everything else
must then match the built encoder exactly (strict loading).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from services.common.errors import InvalidInput

State = dict[str, torch.Tensor]

#: Hugging Face Dinov2 names -> timm ViT names, outside the per-layer attention.
_HF_DINOV2_GLOBAL = {
    "embeddings.cls_token": "cls_token",
    "embeddings.register_tokens": "reg_token",  # Dinov2WithRegisters only
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
#: Per-layer renames: Hugging Face suffix after ``encoder.layer.N.`` -> timm suffix
#: after ``blocks.N.``.
_HF_DINOV2_LAYER = {
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "attention.output.dense.weight": "attn.proj.weight",
    "attention.output.dense.bias": "attn.proj.bias",
    "layer_scale1.lambda1": "ls1.gamma",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "mlp.fc1.weight": "mlp.fc1.weight",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight",
    "mlp.fc2.bias": "mlp.fc2.bias",
    "layer_scale2.lambda1": "ls2.gamma",
}
#: Hugging Face Dinov2 keys with no counterpart in inference: the masked-image
#: modelling token used only in pre-training.
_HF_DINOV2_UNUSED = ("embeddings.mask_token",)
_HF_LAYER_KEY = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
_HF_QKV = re.compile(r"^attention\.attention\.(query|key|value)\.(weight|bias)$")


def looks_like_hf_dinov2(state: State) -> bool:
    """Whether the keys are Hugging Face Dinov2's (``embeddings.*``, ``encoder.layer.*``)."""
    return any(key.startswith(("embeddings.patch_embeddings.", "encoder.layer.")) for key in state)


def dinov2_hf_to_timm(state: State) -> State:
    """A Hugging Face ``Dinov2Model`` state dict under timm ViT names.

    ``encoder.layer.N.attention.attention.{query,key,value}`` become one
    ``blocks.N.attn.qkv`` (rows stacked query, key, value: timm splits its ``qkv``
    output in that order); ``embeddings.mask_token`` is dropped; keys not recognised
    are kept as they are, so that strict loading reports them.

    Raises:
        InvalidInput: A layer has some but not all of query, key and value.
    """
    out: State = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key in _HF_DINOV2_UNUSED:
            continue
        if key in _HF_DINOV2_GLOBAL:
            out[_HF_DINOV2_GLOBAL[key]] = value
            continue
        layer = _HF_LAYER_KEY.match(key)
        if layer is None:
            out[key] = value
            continue
        index, rest = int(layer.group(1)), layer.group(2)
        part = _HF_QKV.match(rest)
        if part is not None:
            qkv.setdefault((index, part.group(2)), {})[part.group(1)] = value
        elif rest in _HF_DINOV2_LAYER:
            out[f"blocks.{index}.{_HF_DINOV2_LAYER[rest]}"] = value
        else:
            out[key] = value
    for (index, kind), parts in sorted(qkv.items()):
        absent = [p for p in ("query", "key", "value") if p not in parts]
        if absent:
            raise InvalidInput(
                f"Dinov2 weights: layer {index} has no attention {'/'.join(absent)} {kind}"
            )
        out[f"blocks.{index}.attn.qkv.{kind}"] = torch.cat(
            [parts["query"], parts["key"], parts["value"]], dim=0
        )
    return out


def _phikon_v2(state: State) -> State:
    return dinov2_hf_to_timm(state) if looks_like_hf_dinov2(state) else state


def _drop(state: State, prefixes: tuple[str, ...]) -> State:
    return {key: value for key, value in state.items() if not key.startswith(prefixes)}


def _conch(state: State) -> State:
    if any(key.startswith("visual.") for key in state):
        state = {k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")}
    return _drop(state, ("attn_pool_caption.", "ln_caption."))


def _resnet50_trunc(state: State) -> State:
    return _drop(state, ("layer4.", "fc."))


def _detector(state: State) -> State:
    return _drop(state, ("fc.", "AuxLogits."))


_ADAPTERS: dict[str, Callable[[State], State]] = {
    "phikon-v2": _phikon_v2,
    "conch": _conch,
    "resnet50-trunc": _resnet50_trunc,
    "detector": _detector,
}


def adapt_state_dict(name: str, state: State) -> State:
    """``state`` under the key names of encoder ``name``, unused parts dropped."""
    adapter = _ADAPTERS.get(name)
    return adapter(state) if adapter is not None else state
