"""``histomarker cohort import``: write a manifest from TCGA-BRCA slides and tables.

The rules for matching slides and reading labels are in :mod:`services.cohort.tcga`;
the manifest format is in :mod:`services.cohort.manifest`. This module reads the
files, builds the manifest and writes it, and returns a JSON-able summary.

The manifest goes to ``manifest.csv`` in the current directory unless ``out`` says
otherwise; an existing file is never replaced unless ``overwrite`` is set. Slide
paths are stored relative to the manifest's folder when the slides lie inside it,
absolute otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from services.cohort.manifest import Manifest
from services.cohort.tcga import (
    ClinicalTable,
    build_manifest,
    merge_clinical,
    read_clinical,
    read_immune,
    read_mutations,
    read_sequenced,
)
from services.common.errors import AlreadyExists, InvalidInput

PathLike = str | os.PathLike[str]

#: Where the manifest goes when no ``out`` is given (in the current directory).
DEFAULT_MANIFEST_NAME = "manifest.csv"


def import_cohort(
    slides_dir: PathLike,
    clinical: PathLike | Sequence[PathLike] | None = None,
    mutations: PathLike | None = None,
    out: PathLike | None = None,
    immune: PathLike | None = None,
    sequenced: PathLike | None = None,
    *,
    overwrite: bool = False,
    include_frozen: bool = False,
    strict_her2: bool = False,
    allow_unknown_values: bool = False,
) -> dict[str, Any]:
    """Build a cohort manifest from TCGA slides and cBioPortal tables, and write it.

    Args:
        slides_dir: Folder of slide files named by TCGA barcodes (searched
            recursively).
        clinical: One or more clinical tables (cBioPortal patient or sample table,
            or a plain CSV/TSV); labels missing in one are filled from another.
            None leaves ER, PR, HER2 and Basal unknown.
        mutations: The MAF (``data_mutations.txt``). None leaves TP53 and PIK3CA
            unknown.
        out: The manifest file; default ``manifest.csv`` in the current directory.
        immune: Optional table of immune scores per patient or sample.
        sequenced: Optional list of sequenced samples (case list, gene panel matrix
            or plain list); needs ``mutations``.
        overwrite: Replace an existing manifest.
        include_frozen: Also use frozen sections (TS/BS/MS) for patients without a
            diagnostic slide (TCGA's normal-tissue slides are frozen sections).
        strict_her2: FISH settles HER2 only where IHC is equivocal (by default also
            where IHC is missing or indeterminate).
        allow_unknown_values: Accept label columns with many values outside the
            vocabulary (taken as unknown).

    Returns:
        The summary (see :meth:`services.cohort.tcga.ImportSummary.to_dict`), with
        ``manifest`` set to the written file's absolute path.

    Raises:
        AlreadyExists: The manifest exists and ``overwrite`` is False.
        NotFound: A named file or folder does not exist.
        InvalidInput: A malformed table, no usable slide, or ``sequenced`` without
            ``mutations``; the message names the file and, where it can, the line.
    """
    destination = Path(out) if out is not None else Path.cwd() / DEFAULT_MANIFEST_NAME
    destination = Path(os.path.abspath(destination))
    # Refuse early: reading a large MAF only to fail at the end helps nobody.
    if destination.is_dir():
        raise InvalidInput(f"{destination} is a folder; give the manifest's file name")
    if destination.exists() and not overwrite:
        raise AlreadyExists(f"{destination} exists already; pass overwrite to replace it")
    if sequenced is not None and mutations is None:
        raise InvalidInput("a list of sequenced samples needs a mutation table (MAF) too")

    clinical_table = _read_clinical_tables(clinical, strict_her2, allow_unknown_values)
    mutation_table = read_mutations(mutations) if mutations is not None else None
    sequenced_patients = read_sequenced(sequenced) if sequenced is not None else frozenset()
    immune_scores = read_immune(immune) if immune is not None else None

    frame, summary = build_manifest(
        slides_dir,
        clinical_table,
        mutation_table,
        sequenced=sequenced_patients,
        immune=immune_scores,
        manifest_dir=destination.parent,
        include_frozen=include_frozen,
    )
    manifest = Manifest.from_frame(frame, root=destination.parent)
    manifest.write(destination, overwrite=overwrite)
    summary.manifest = str(destination)
    return summary.to_dict()


def _read_clinical_tables(
    clinical: PathLike | Sequence[PathLike] | None,
    strict_her2: bool,
    allow_unknown_values: bool,
) -> ClinicalTable | None:
    if clinical is None:
        return None
    paths = [clinical] if isinstance(clinical, str | os.PathLike) else list(clinical)
    if not paths:
        return None
    tables = [
        read_clinical(path, strict_her2=strict_her2, allow_unknown_values=allow_unknown_values)
        for path in paths
    ]
    return tables[0] if len(tables) == 1 else merge_clinical(tables)
