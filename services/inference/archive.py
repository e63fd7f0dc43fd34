"""Pack a model bundle into a TorchServe ``.mar`` archive with torch-model-archiver.

The archive holds, at its root, ``weights.pt`` (the serialized file), ``model.json``
(preprocessing, temperature, TTA, thresholds), ``metrics.json`` when the bundle has
one, ``handler.py`` (``services/inference/handler.py``) and a copy of the few
``services`` modules the handler imports (``PACKED_MODULES``). TorchServe puts the
unpacked model folder first on its worker's ``PYTHONPATH``, so the archive serves
wherever torch, torchvision, numpy and Pillow are installed, without this repository.
:func:`write_mar` (the archiver's call) also packs the encoder and MIL archives of
:mod:`services.mil.archive`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from services.common.errors import FailedPrecondition, InvalidInput
from services.inference.bundle import CONFIG_FILE, METRICS_FILE, WEIGHTS_FILE, load_config

#: Root of the repository (this file is ``services/inference/archive.py``).
REPO_ROOT = Path(__file__).resolve().parents[2]
#: The handler file; it becomes ``handler.py`` at the archive's root.
HANDLER_FILE = REPO_ROOT / "services" / "inference" / "handler.py"
#: Modules the handler needs, relative to the repository root, packed as they are.
PACKED_MODULES: tuple[str, ...] = (
    "services/__init__.py",
    "services/common/__init__.py",
    "services/common/errors.py",
    "services/inference/__init__.py",
    "services/inference/backbones.py",
    "services/inference/bundle.py",
    "services/inference/preprocess.py",
    "services/inference/serving_io.py",
    "services/inference/tta.py",
)
#: Seconds torch-model-archiver may take (it copies and zips a few files).
ARCHIVER_TIMEOUT_S = 300.0


def mar_members(has_metrics: bool = False) -> list[str]:
    """The files a ``.mar`` built by :func:`build_mar` holds, sorted."""
    members = [WEIGHTS_FILE, CONFIG_FILE, "handler.py", "MAR-INF/MANIFEST.json", *PACKED_MODULES]
    if has_metrics:
        members.append(METRICS_FILE)
    return sorted(members)


def build_mar(
    bundle_folder: Path,
    out_dir: Path,
    *,
    model_name: str | None = None,
    version: str | None = None,
    force: bool = True,
) -> Path:
    """Build ``{model_name}.mar`` from a bundle folder.

    Args:
        bundle_folder: Folder with ``weights.pt`` and ``model.json``.
        out_dir: Folder the archive is written to (created if missing).
        model_name: Name TorchServe registers the model under; the bundle's by default.
        version: Archive version; the bundle's by default.
        force: Replace an existing archive of that name.

    Returns:
        Path of the written ``.mar``.

    Raises:
        NotFound: The folder is not a bundle (no ``model.json``).
        InvalidInput: The bundle has no weights, or the name is not a valid model name.
        FailedPrecondition: torch-model-archiver failed or the archive exists and
            ``force`` is False.
    """
    bundle_folder = Path(bundle_folder)
    config = load_config(bundle_folder)
    name = model_name or config.name
    if model_name is not None:
        replace(config, name=model_name)  # the bundle's checks of a model name
    weights = bundle_folder / WEIGHTS_FILE
    if not weights.is_file():
        raise InvalidInput(f"bundle {bundle_folder} has no {WEIGHTS_FILE}")
    extras = [bundle_folder / CONFIG_FILE]
    if (bundle_folder / METRICS_FILE).is_file():
        extras.append(bundle_folder / METRICS_FILE)
    return write_mar(
        out_dir,
        model_name=name,
        version=version or config.version,
        handler=HANDLER_FILE,
        serialized_file=weights,
        extra_files=extras,
        modules=PACKED_MODULES,
        force=force,
    )


def write_mar(
    out_dir: Path,
    *,
    model_name: str,
    version: str,
    handler: Path,
    serialized_file: Path,
    extra_files: Sequence[Path] = (),
    modules: Sequence[str] = (),
    force: bool = True,
) -> Path:
    """Run torch-model-archiver into ``{out_dir}/{model_name}.mar``, moved into place whole.

    Args:
        out_dir: Folder the archive is written to (created if missing).
        model_name: Name TorchServe registers the model under (checked by the caller).
        version: Archive version.
        handler: The handler file; it becomes ``handler.py`` at the archive's root.
        serialized_file: The weights file, at the archive's root under its own name.
        extra_files: More files for the archive's root.
        modules: Files relative to the repository root, packed at the same relative
            paths (the ``services`` modules the handler imports).
        force: Replace an existing archive of that name.

    Returns:
        Path of the written ``.mar``.

    Raises:
        FailedPrecondition: torch-model-archiver failed or the archive exists and
            ``force`` is False.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{model_name}.mar"
    if target.exists() and not force:
        raise FailedPrecondition(f"{target} exists; pass force=True to replace it")
    with tempfile.TemporaryDirectory(prefix="histomarker-mar-") as scratch:
        staging = Path(scratch)
        code = staging / "code"
        for module in modules:
            (code / module).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / module, code / module)
        extras = [*extra_files, code] if modules else list(extra_files)
        build = staging / "build"
        build.mkdir()
        arguments = [
            "--model-name",
            model_name,
            "--version",
            version,
            "--handler",
            str(handler),
            "--serialized-file",
            str(serialized_file),
            "--export-path",
            str(build),
            "--force",
        ]
        if extras:
            arguments += ["--extra-files", ",".join(str(path) for path in extras)]
        # The archiver stages files in $TMPDIR/<model name>: a private TMPDIR keeps
        # concurrent builds of one model apart.
        _run_archiver(arguments, tmp_dir=staging)
        built = build / f"{model_name}.mar"
        if not built.is_file():
            raise FailedPrecondition(f"torch-model-archiver wrote no {built.name}")
        # Move into place whole: a reader never sees half an archive.
        partial = out_dir / f".{model_name}.mar.partial-{os.getpid()}"
        shutil.copy2(built, partial)
        partial.replace(target)
    return target


def _run_archiver(arguments: list[str], tmp_dir: Path) -> None:
    command = [sys.executable, "-m", "model_archiver.model_packaging", *arguments]
    env = {**os.environ, "TMPDIR": str(tmp_dir), "TEMP": str(tmp_dir), "TMP": str(tmp_dir)}
    try:
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            env=env,
            timeout=ARCHIVER_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FailedPrecondition(f"cannot run torch-model-archiver: {exc}") from exc
    if done.returncode != 0:
        details = (done.stderr or done.stdout).strip() or "no output"
        raise FailedPrecondition(f"torch-model-archiver failed: {details}")
