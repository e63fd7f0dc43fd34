"""histomarker: genomic biomarkers of breast cancer from H&E whole-slide images."""

from __future__ import annotations

__version__ = "0.1.0"
