#!/usr/bin/env bash
# Separate venv with TIAToolbox's TIFF reader for benchmarks/speed/read_speed.py.
#
# TIAToolbox 2.1.3 pins torch<2.13 and ~40 heavy dependencies (jupyterlab,
# transformers, timm, ...), which must not land in the project's venv. Here it is
# installed with --no-deps, plus only what `import tiatoolbox.wsicore.wsireader`
# needs (found by importing until nothing was missing), within TIAToolbox's own
# version bounds where it states them.
#
# torch: tiatoolbox.utils.env_detection does `import torch` at module level (only to
# call torch.cuda.is_available() later), and the reader's import path goes through
# it. The cheapest real torch is the CPU-only wheel already on this machine's disk
# (torch 2.13.0+cpu, ~190 MB, pip's find-links), installed --no-deps with only the
# small packages `import torch` needs: no CUDA libraries. Plain `torch==2.14.1`
# also works (local files too) but brings ~6 GB of nvidia-* wheels; it is the
# fallback. torch is never used by the reader itself.
#
# Usage: bash benchmarks/speed/tiatoolbox_venv.sh [VENV]   (default .venv-tiatoolbox)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
venv="${1:-$root/.venv-tiatoolbox}"
tia_version=2.1.3

python3.11 -m venv "$venv"
pip=("$venv/bin/pip" install --quiet --disable-pip-version-check)

"${pip[@]}" --no-deps "tiatoolbox==$tia_version"
"${pip[@]}" \
    "numpy>=2.0,<2.4.4" \
    "tifffile>=2025.5.21,<2026.3.3" \
    "imagecodecs>=2022.9.26,<2026.3.6" \
    "zarr>=3.0.8,<3.2.0" \
    "opencv-python-headless>=4.6,<5.0" \
    "openslide-python>=1.4.0,<1.4.6" \
    "openslide-bin>=4.0.0.2,<4.0.1.2" \
    "shapely>=2.0,<=2.1.2" \
    "pyyaml>=6.0,<6.0.3" \
    "defusedxml==0.7.1" \
    "pillow>=9.3,<12.2" \
    "matplotlib>=3.10,<3.11.1" \
    "pandas>=2.0,<3.0.3" \
    "SimpleITK>=2.2.1,<2.5.5" \
    "dask>=2026.1.2,<2026.7.1" \
    "joblib>=1.1.1,<1.5.3" \
    "requests>=2.28.1,<2.34.2" \
    "scikit-image>=0.26.0,<0.26.1" \
    "scipy>=1.8,<1.17.1" \
    "tqdm>=4.64.1,<4.69.0" \
    psutil fsspec numcodecs packaging universal-pathlib

if ! "${pip[@]}" --no-deps "torch==2.13.0+cpu" 2>/dev/null; then
    echo "torch 2.13.0+cpu wheel not found; installing torch==2.14.1 (with CUDA libs)" >&2
    "${pip[@]}" "torch==2.14.1"
fi
# What `import torch` itself needs (its wheel's own requirements, minus CUDA).
"${pip[@]}" filelock typing-extensions sympy networkx jinja2 fsspec

"$venv/bin/python" -c "
import tiatoolbox, torch
from tiatoolbox.wsicore.wsireader import TIFFWSIReader
print('tiatoolbox', tiatoolbox.__version__, '| torch', torch.__version__, '| ok')
"
