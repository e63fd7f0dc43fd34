"""Trained models in the object store: ``models/{model_name}/{version}/``.

A version folder holds the bundle's files (``weights.pt``, ``metrics.json``,
``reliability.png``...), the ``{model_name}.mar`` archive and, written last,
``model.json``: a folder with ``model.json`` is complete. The cancer detector's may
also hold ``ood.json``, the out-of-distribution reference of the slides the models
were trained on (:class:`services.inference.ood.OodDetector`), which training writes
before the version is registered on TorchServe. Kept apart from
:mod:`services.inference.bundle`, which the TorchServe archive packs and which must
not need the object store.
"""

from __future__ import annotations

from pathlib import Path

from services.common.objectstore import ObjectStore

#: Store prefix of trained models.
MODELS_PREFIX = "models"
#: A version folder with this file is complete (``bundle.CONFIG_FILE``; not imported
#: from there, which needs torch, so that reading the registry does not).
COMPLETE_MARKER = "model.json"
#: The out-of-distribution reference beside a model version (the cancer detector's).
OOD_FILE = "ood.json"


def model_prefix(name: str, version: str) -> str:
    """Store prefix of one model version: ``models/{name}/{version}``."""
    return f"{MODELS_PREFIX}/{name}/{version}"


def archive_key(name: str, version: str) -> str:
    """Store key of one model version's TorchServe archive: ``.../{name}.mar``."""
    return f"{model_prefix(name, version)}/{name}.mar"


def ood_key(name: str, version: str) -> str:
    """Store key of one model version's out-of-distribution reference: ``.../ood.json``."""
    return f"{model_prefix(name, version)}/{OOD_FILE}"


def stored_versions(store: ObjectStore, name: str) -> list[str]:
    """The complete stored versions of model ``name`` (with ``model.json``), sorted."""
    prefix = f"{MODELS_PREFIX}/{name}/"
    suffix = f"/{COMPLETE_MARKER}"
    return sorted(
        info.key[len(prefix) : -len(suffix)]
        for info in store.list(prefix)
        if info.key.endswith(suffix) and info.key.count("/") == 3
    )


def stored_models(store: ObjectStore) -> dict[str, list[str]]:
    """Every stored model with its complete versions: ``{name: [version, ...]}``."""
    models: dict[str, list[str]] = {}
    for info in store.list(f"{MODELS_PREFIX}/"):
        parts = info.key.split("/")
        if len(parts) == 4 and parts[3] == COMPLETE_MARKER:
            models.setdefault(parts[1], []).append(parts[2])
    return {name: sorted(versions) for name, versions in sorted(models.items())}


def publish_bundle(store: ObjectStore, bundle_folder: Path, mar: Path | None = None) -> str:
    """Put a trained bundle (and its ``.mar``, as ``{name}.mar``) under
    ``models/{name}/{version}/``; ``model.json`` goes last, so a version folder with
    it is complete.

    Returns:
        The version's prefix.
    """
    from services.inference.bundle import CONFIG_FILE, load_config

    folder = Path(bundle_folder)
    config = load_config(folder)
    prefix = model_prefix(config.name, config.version)
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name != CONFIG_FILE:
            store.put_file(f"{prefix}/{path.name}", path)
    if mar is not None:
        store.put_file(archive_key(config.name, config.version), mar)
    store.put_file(f"{prefix}/{CONFIG_FILE}", folder / CONFIG_FILE)
    return prefix
