"""Reading a local weights file into a flat ``state_dict``: safetensors or torch pickles.

Nothing is downloaded. A torch file may hold the state dict itself or wrap it under
``state_dict`` or ``model`` (training checkpoints); a prefix that every key shares
(``module.`` from DataParallel/DDP, ``model.`` from Lightning-style wrappers) is
stripped.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from services.common.errors import FailedPrecondition, InvalidInput

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".bin", ".pth", ".pt")
#: Entries a checkpoint may keep its state dict under, tried in this order.
_WRAPPER_KEYS = ("state_dict", "model")
#: Prefixes stripped when every key has one.
_SHARED_PREFIXES = ("module.", "model.")


def _first_line(exc: BaseException, limit: int = 200) -> str:
    """An exception as one short line (torch's unpickling errors run to pages)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def require_file(path: Path) -> None:
    """FailedPrecondition unless ``path`` is an existing file."""
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise FailedPrecondition(f"weights file {path} {what}; give the local weights file")


def read_state_dict(path: Path | str) -> dict[str, torch.Tensor]:
    """The tensors of a weights file by name, on the CPU.

    Args:
        path: A ``.safetensors`` file, or a ``.bin`` / ``.pth`` / ``.pt`` torch file
            (loaded with ``weights_only=True``: no code runs).

    Raises:
        FailedPrecondition: The file does not exist.
        InvalidInput: Another suffix, a file that cannot be read as its suffix says,
            or one that holds no state dict.
    """
    path = Path(path)
    require_file(path)
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        from safetensors.torch import load_file

        try:
            state: object = load_file(str(path), device="cpu")
        except Exception as exc:
            raise InvalidInput(
                f"weights file {path} is not a readable safetensors file: {_first_line(exc)}"
            ) from exc
    elif suffix in TORCH_SUFFIXES:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise InvalidInput(
                f"weights file {path} is not a readable torch file: {_first_line(exc)}"
            ) from exc
    else:
        known = ", ".join(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES)
        raise InvalidInput(f"weights file {path}: unknown type {suffix or '(none)'}; use {known}")
    return strip_shared_prefix(_unwrap(state, path))


def _unwrap(state: object, path: Path) -> dict[str, torch.Tensor]:
    """The state dict inside a checkpoint (at most two wrappers deep)."""
    for _ in range(2):
        if not isinstance(state, dict):
            break
        inner = next((state[k] for k in _WRAPPER_KEYS if isinstance(state.get(k), dict)), None)
        if inner is None:
            break
        state = inner
    if not isinstance(state, dict) or not state:
        raise InvalidInput(f"weights file {path} holds no state dict")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise InvalidInput(
                f"weights file {path} is not a state dict: entry {key!r} is "
                f"{type(value).__name__}, not a tensor"
            )
    return state


def strip_shared_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` without a ``module.`` / ``model.`` prefix that every key has."""
    while True:
        prefix = next((p for p in _SHARED_PREFIXES if all(k.startswith(p) for k in state)), None)
        if prefix is None:
            return state
        state = {key[len(prefix) :]: value for key, value in state.items()}


def file_sha256(path: Path | str, chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks (weights files run to gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()
