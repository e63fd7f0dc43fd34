"""The installation `make` performs: pinned releases, headless OpenCV, Java 17."""

from __future__ import annotations

import importlib.metadata as metadata
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def _pins() -> dict[str, str]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    requirements = list(project["dependencies"])
    requirements += project["optional-dependencies"]["test"]
    pins = {}
    for requirement in requirements:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[a-z,]+\])?==([^;\s]+)", requirement)
        assert match, f"dependency {requirement!r} is not pinned with =="
        pins[match.group(1).lower()] = match.group(3)
    return pins


def test_every_dependency_is_pinned_and_installed_at_its_pin() -> None:
    for name, version in _pins().items():
        assert metadata.version(name) == version, name


def test_grpc_packages_share_one_version() -> None:
    names = ["grpcio", "grpcio-tools", "grpcio-health-checking", "grpcio-reflection"]
    names.append("grpcio-status")
    assert len({metadata.version(name) for name in names}) == 1


def test_headless_opencv_replaces_the_gui_build_and_staintools_imports() -> None:
    with pytest.raises(metadata.PackageNotFoundError):
        metadata.version("opencv-python")
    import cv2
    import staintools

    assert cv2.__version__.startswith(metadata.version("opencv-python-headless")[:3])
    assert hasattr(staintools, "StainNormalizer")
    import spams  # from spams-bin

    assert hasattr(spams, "lasso")


def test_openslide_library_loads() -> None:
    import openslide

    assert openslide.__library_version__


def test_java_17_or_newer_for_torchserve() -> None:
    java = shutil.which("java")
    assert java, "java is missing: `make` installs openjdk-17-jre-headless"
    result = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60)
    major = int(re.search(r'version "(\d+)', result.stderr).group(1))
    assert major >= 17
    import ts

    jar = Path(ts.__file__).parent / "frontend" / "model-server.jar"
    assert jar.is_file()
