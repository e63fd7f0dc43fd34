"""Pack patch encoders and fitted MIL heads into TorchServe archives and put them in
the object store.

Two kinds of archive, built with torch-model-archiver
(:func:`services.inference.archive.write_mar`):

``encoder_<name>.mar`` (:func:`build_encoder_mar`)
    The weights file under its own name, ``encoder.json``
    (:class:`~services.mil.serving_io.EncoderArchive`: registry name, weights file,
    its SHA-256, the encoder's spec with those weights, tiny flag), a detector's
    bundle ``model.json`` or a ``biomarker-cnns`` file's ``<stem>.bundles.json``
    sidecar, and ``handler.py`` (``services/encoders/handler.py``).
    ``<name>`` is the registry name with ``-`` turned into ``_`` (``uni2-h`` ->
    ``encoder_uni2_h``): TorchServe model names keep to letters, digits and ``_``.
``mil_<name>.mar`` (:func:`build_mil_mar`)
    The fitted head as ``mil.pt`` (``FittedMIL.save``) and ``handler.py``
    (``services/mil/handler.py``).

Each also holds a copy of the ``services`` modules its handler imports, found by
reading the imports (:func:`packed_modules`); TorchServe puts the unpacked model
folder first on its worker's ``PYTHONPATH``, so the archive runs that copy wherever
the project's dependencies are installed.

:func:`publish_encoder` and :func:`publish_mil` put an archive under
``models/{model_name}/{version}/`` as ``publish_bundle`` does: the ``.mar`` at
:func:`~services.inference.registry.archive_key`, then the model card ``model.json``
(``kind`` ``encoder`` or ``mil``), last, so a version folder with a card is complete.
The card is made from what the archive holds, so it describes what is served.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from services.common.errors import InvalidInput
from services.common.objectstore import ObjectStore
from services.encoders.biomarker_cnns import BIOMARKER_CNNS, sidecar_path
from services.encoders.loading import effective_spec
from services.encoders.registry import encoder_spec
from services.encoders.weights_files import file_sha256, require_file
from services.inference.archive import REPO_ROOT, write_mar
from services.inference.bundle import CONFIG_FILE as BUNDLE_CONFIG_FILE
from services.inference.registry import COMPLETE_MARKER, archive_key, model_prefix
from services.mil.serving_io import ENCODER_CONFIG_FILE, MIL_MODEL_FILE, EncoderArchive

#: The handler files; each becomes ``handler.py`` at its archive's root.
ENCODER_HANDLER_FILE = REPO_ROOT / "services" / "encoders" / "handler.py"
MIL_HANDLER_FILE = REPO_ROOT / "services" / "mil" / "handler.py"
#: TorchServe name prefixes of the two kinds.
ENCODER_PREFIX = "encoder_"
MIL_PREFIX = "mil_"
#: ``kind`` of each model card.
ENCODER_KIND = "encoder"
MIL_KIND = "mil"
#: The archive's manifest, written by torch-model-archiver.
MANIFEST_MEMBER = "MAR-INF/MANIFEST.json"

# The bundle's rules (services.inference.bundle): a TorchServe name of lowercase
# letters, digits and "_", at most 64 characters; a version of letters, digits, ".-_".
_MIL_NAME = re.compile(rf"^[a-z][a-z0-9_]{{0,{63 - len(MIL_PREFIX)}}}$")
_VERSION = re.compile(r"^[0-9A-Za-z][0-9A-Za-z._-]{0,63}$")


# --- names ----------------------------------------------------------------------------------


def encoder_model_name(encoder: str) -> str:
    """TorchServe name of an encoder: ``encoder_`` + its registry name, ``-`` -> ``_``.

    Raises:
        InvalidInput: Unknown encoder; the message lists the known ones.
    """
    encoder_spec(encoder)
    return ENCODER_PREFIX + encoder.replace("-", "_")


def mil_model_name(name: str) -> str:
    """TorchServe name of a MIL head: ``mil_<name>``.

    Raises:
        InvalidInput: ``name`` is not lowercase letters, digits and ``_`` starting
            with a letter, or too long.
    """
    if not _MIL_NAME.match(name):
        raise InvalidInput(
            f"MIL model name {name!r} must be lowercase letters, digits and '_', "
            f"starting with a letter, at most {64 - len(MIL_PREFIX)} characters"
        )
    return MIL_PREFIX + name


def _check_version(version: str) -> None:
    if not _VERSION.match(version):
        raise InvalidInput(
            f"version {version!r} must be letters, digits, '.', '-' or '_', "
            "starting with a letter or digit, at most 64 characters"
        )


# --- archives -------------------------------------------------------------------------------


def packed_modules(handler: Path) -> tuple[str, ...]:
    """The ``services`` files a handler imports, directly or through each other (imports
    inside functions included), with the ``__init__.py`` of every package on the way;
    relative to the repository root, sorted."""
    found: set[Path] = set()
    todo = [Path(handler)]
    read: set[Path] = set()
    while todo:
        path = todo.pop()
        if path in read:
            continue
        read.add(path)
        for module in _imported_services(path):
            for file in _module_files(module):
                if file not in found:
                    found.add(file)
                    todo.append(file)
    return tuple(sorted(file.relative_to(REPO_ROOT).as_posix() for file in found))


def _imported_services(path: Path) -> set[str]:
    """Dotted names under ``services`` that a file imports (``from a import b`` gives
    ``a`` and ``a.b``: ``b`` may be a module)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in names if name.split(".")[0] == "services"}


def _module_files(module: str) -> list[Path]:
    """The files of a dotted module and of every package above it."""
    files: list[Path] = []
    parts = module.split(".")
    for depth in range(1, len(parts) + 1):
        base = REPO_ROOT.joinpath(*parts[:depth])
        if (base / "__init__.py").is_file():
            files.append(base / "__init__.py")
        elif base.with_suffix(".py").is_file():
            files.append(base.with_suffix(".py"))
            break
        else:
            break
    return files


def build_encoder_mar(
    encoder: str,
    weights: Path,
    out_dir: Path,
    *,
    version: str,
    tiny: bool = False,
) -> Path:
    """Build ``encoder_<name>.mar`` serving encoder ``encoder`` with a local weights file.

    The weights are hashed, not loaded: a file that does not fit the encoder makes
    the worker fail at registration with :func:`services.encoders.load_encoder`'s
    message in TorchServe's log. A detector's bundle ``model.json`` beside its
    ``weights.pt`` goes into the archive too: it sets the detector encoder's input
    side, resolution and normalisation (:func:`services.encoders.effective_spec`);
    so does a ``biomarker-cnns`` file's sidecar
    (:func:`services.encoders.biomarker_cnns.sidecar_path`), which also names its
    networks and stain reference.

    Args:
        encoder: Registry name (``uni``, ``resnet50-trunc``...).
        weights: The weights file (``.safetensors``, ``.bin``, ``.pth``, ``.pt``).
        out_dir: Folder the archive is written to (created if missing), replacing
            one of that name.
        version: Archive version.
        tiny: The encoder's tiny test variant (tests only).

    Returns:
        Path of the written ``.mar``.

    Raises:
        InvalidInput: Unknown encoder, a bad version, a weights file named as one of
            the archive's own files, a detector bundle of another backbone, or a
            malformed ``biomarker-cnns`` sidecar.
        FailedPrecondition: No such weights file, a ``biomarker-cnns`` file without
            its sidecar, or torch-model-archiver failed.
    """
    name = encoder_model_name(encoder)
    _check_version(version)
    weights = Path(weights)
    require_file(weights)
    if weights.name in (ENCODER_CONFIG_FILE, "handler.py", BUNDLE_CONFIG_FILE):
        raise InvalidInput(f"rename the weights file {weights.name}: the archive has its own")
    spec = effective_spec(encoder, weights, tiny=tiny)
    config = EncoderArchive(encoder, weights.name, file_sha256(weights), spec, tiny)
    # A detector's spec comes from its bundle's model.json beside the weights, a
    # biomarker-cnns' from its sidecar (effective_spec read it): the worker finds
    # them there too.
    bundle_config = weights.parent / BUNDLE_CONFIG_FILE
    extras = [bundle_config] if encoder == "detector" and bundle_config.is_file() else []
    if encoder == BIOMARKER_CNNS:
        extras.append(sidecar_path(weights))
    with tempfile.TemporaryDirectory(prefix="histomarker-encoder-mar-") as scratch:
        config_file = Path(scratch) / ENCODER_CONFIG_FILE
        config_file.write_text(config.to_json(), encoding="utf-8")
        return write_mar(
            out_dir,
            model_name=name,
            version=version,
            handler=ENCODER_HANDLER_FILE,
            serialized_file=weights,
            extra_files=[config_file, *extras],
            modules=packed_modules(ENCODER_HANDLER_FILE),
        )


def build_mil_mar(model_file: Path, out_dir: Path, *, name: str, version: str) -> Path:
    """Build ``mil_<name>.mar`` serving a fitted MIL head.

    Args:
        model_file: A file written by ``FittedMIL.save`` (read here to check it).
        out_dir: Folder the archive is written to (created if missing), replacing
            one of that name.
        name: The model's name without the ``mil_`` prefix (``brca_abmil``).
        version: Archive version.

    Returns:
        Path of the written ``.mar``.

    Raises:
        NotFound: No such model file.
        InvalidInput: Not a MIL model file, a bad name or version.
        FailedPrecondition: torch-model-archiver failed.
    """
    from services.mil.model import FittedMIL

    model_name = mil_model_name(name)
    _check_version(version)
    FittedMIL.load(model_file)
    with tempfile.TemporaryDirectory(prefix="histomarker-mil-mar-") as scratch:
        staged = Path(scratch) / MIL_MODEL_FILE
        shutil.copyfile(model_file, staged)
        return write_mar(
            out_dir,
            model_name=model_name,
            version=version,
            handler=MIL_HANDLER_FILE,
            serialized_file=staged,
            modules=packed_modules(MIL_HANDLER_FILE),
        )


# --- model cards ----------------------------------------------------------------------------


def archive_manifest(mar: Path) -> tuple[str, str]:
    """(model name, version) of a ``.mar``, from its ``MAR-INF/MANIFEST.json``.

    Raises:
        InvalidInput: Not a ``.mar`` archive.
    """
    data = _json_member(mar, MANIFEST_MEMBER)
    try:
        model = data["model"]
        return str(model["modelName"]), str(model["modelVersion"])
    except (KeyError, TypeError) as exc:
        raise InvalidInput(f"{mar}: {MANIFEST_MEMBER} lacks {exc}") from None


def encoder_card(mar: Path) -> dict[str, Any]:
    """The model card of an encoder archive: its name and version, the encoder's
    registry name, the weights' SHA-256, licence, width, input side, resolution,
    normalisation and stain reference (None: colours as scanned).

    Raises:
        InvalidInput: Not an encoder archive built by :func:`build_encoder_mar`.
    """
    model_name, version = archive_manifest(mar)
    archive = EncoderArchive.from_json(_member(mar, ENCODER_CONFIG_FILE))
    expected = encoder_model_name(archive.encoder)
    if model_name != expected:
        raise InvalidInput(f"{mar} serves {archive.encoder} as {model_name}, not {expected}")
    spec = archive.spec
    return {
        "kind": ENCODER_KIND,
        "model_name": model_name,
        "version": version,
        "encoder": spec.name,
        "sha256": archive.sha256,
        "weights_file": archive.weights_file,
        **{k: v for k, v in spec.card().items() if k != "name"},
        "tiny": archive.tiny,
    }


def mil_card(mar: Path, thresholds: Mapping[str, float] | None = None) -> dict[str, Any]:
    """The model card of a MIL archive: ``FittedMIL.model_card()`` with its name,
    version and, when given, the decision threshold of each task.

    Args:
        mar: An archive built by :func:`build_mil_mar`.
        thresholds: Task -> threshold on the calibrated probability, each in [0, 1];
            tasks left out take 0.5 (``scoring.card_thresholds``).

    Raises:
        InvalidInput: Not a MIL archive, or thresholds of unknown tasks or out of
            [0, 1].
    """
    from services.mil.model import FittedMIL

    model_name, version = archive_manifest(mar)
    with tempfile.TemporaryDirectory(prefix="histomarker-mil-card-") as scratch:
        model_file = Path(scratch) / MIL_MODEL_FILE
        model_file.write_bytes(_member(mar, MIL_MODEL_FILE))
        model = FittedMIL.load(model_file)
    card: dict[str, Any] = {
        "kind": MIL_KIND,
        "model_name": model_name,
        "version": version,
        **model.model_card(),
    }
    if thresholds is not None:
        unknown = sorted(set(thresholds) - set(model.tasks))
        if unknown:
            raise InvalidInput(
                f"thresholds of unknown tasks {unknown}; the head calls {model.tasks}"
            )
        values = {task: float(value) for task, value in thresholds.items()}
        bad = {task: value for task, value in values.items() if not 0.0 <= value <= 1.0}
        if bad:
            raise InvalidInput(f"thresholds must lie in [0, 1], got {bad}")
        card["thresholds"] = {task: values[task] for task in model.tasks if task in values}
    return card


def _member(mar: Path, member: str) -> bytes:
    try:
        with zipfile.ZipFile(mar) as archive:
            return archive.read(member)
    except FileNotFoundError:
        raise InvalidInput(f"archive {mar} does not exist") from None
    except KeyError:
        raise InvalidInput(f"{mar} holds no {member}") from None
    except (zipfile.BadZipFile, OSError) as exc:
        raise InvalidInput(f"{mar} is not a .mar archive: {exc}") from None


def _json_member(mar: Path, member: str) -> Any:
    try:
        return json.loads(_member(mar, member))
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidInput(f"{mar}: {member} is not JSON: {exc}") from None


# --- the store ------------------------------------------------------------------------------


def publish_encoder(store: ObjectStore, mar: Path) -> str:
    """Put an encoder archive and its card (:func:`encoder_card`) under
    ``models/{model_name}/{version}/``; the card goes last.

    Returns:
        The version's prefix.

    Raises:
        InvalidInput: Not an encoder archive.
    """
    return _publish(store, mar, encoder_card(mar))


def publish_mil(
    store: ObjectStore, mar: Path, *, thresholds: Mapping[str, float] | None = None
) -> str:
    """Put a MIL archive and its card (:func:`mil_card`, with ``thresholds``) under
    ``models/{model_name}/{version}/``; the card goes last.

    Returns:
        The version's prefix.

    Raises:
        InvalidInput: Not a MIL archive, or bad thresholds.
    """
    return _publish(store, mar, mil_card(mar, thresholds))


def _publish(store: ObjectStore, mar: Path, card: dict[str, Any]) -> str:
    name, version = card["model_name"], card["version"]
    _check_version(version)
    prefix = model_prefix(name, version)
    store.put_file(archive_key(name, version), mar)
    text = json.dumps(card, indent=2, sort_keys=True) + "\n"
    store.put_bytes(
        f"{prefix}/{COMPLETE_MARKER}", text.encode("utf-8"), content_type="application/json"
    )
    return prefix


def publish_head_and_encoder(
    store: ObjectStore,
    model_file: Path,
    encoder: str,
    weights: Path,
    *,
    name: str,
    tiny: bool = False,
    version: str = "",
) -> tuple[tuple[str, str, str], tuple[str, str, str]]:
    """Build and publish ``encoder_<encoder>`` with ``weights`` and ``mil_<name>`` with
    the head in ``model_file``. The versions are ``version``, or else the first 12 hex
    digits of the weights' and of the model file's sha256.

    Returns:
        (model name, version, prefix) of the encoder, then of the head.
    """
    encoder_version = version or file_sha256(weights)[:12]
    mil_version = version or file_sha256(model_file)[:12]
    with tempfile.TemporaryDirectory(prefix="mil-publish-") as folder:
        encoder_mar = build_encoder_mar(
            encoder, weights, Path(folder), version=encoder_version, tiny=tiny
        )
        mil_mar = build_mil_mar(model_file, Path(folder), name=name, version=mil_version)
        encoder_prefix = publish_encoder(store, encoder_mar)
        mil_prefix = publish_mil(store, mil_mar)
    return (
        (encoder_model_name(encoder), encoder_version, encoder_prefix),
        (mil_model_name(name), mil_version, mil_prefix),
    )
