"""Trained models in the object store: ``models/{model_name}/{version}/``.

A version folder holds the bundle's files (``weights.pt``, ``metrics.json``,
``reliability.png``...), the ``{model_name}.mar`` archive and, written last,
``model.json``: a folder with ``model.json`` is complete. Kept apart from
:mod:`services.inference.bundle`, which the TorchServe archive packs and which must
not need the object store.
"""

from __future__ import annotations

from pathlib import Path

from services.common.objectstore import ObjectStore
from services.inference.bundle import CONFIG_FILE, load_config

#: Store prefix of trained models.
MODELS_PREFIX = "models"


def model_prefix(name: str, version: str) -> str:
    """Store prefix of one model version: ``models/{name}/{version}``."""
    return f"{MODELS_PREFIX}/{name}/{version}"


def publish_bundle(store: ObjectStore, bundle_folder: Path, mar: Path | None = None) -> str:
    """Put a trained bundle (and its ``.mar``, as ``{name}.mar``) under
    ``models/{name}/{version}/``; ``model.json`` goes last, so a version folder with
    it is complete.

    Returns:
        The version's prefix.
    """
    folder = Path(bundle_folder)
    config = load_config(folder)
    prefix = model_prefix(config.name, config.version)
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name != CONFIG_FILE:
            store.put_file(f"{prefix}/{path.name}", path)
    if mar is not None:
        store.put_file(f"{prefix}/{config.name}.mar", mar)
    store.put_file(f"{prefix}/{CONFIG_FILE}", folder / CONFIG_FILE)
    return prefix
