"""A cohort manifest from TCGA-BRCA slides and cBioPortal tables: pure logic.

The inputs are a folder of TCGA slide files, whose names carry TCGA barcodes, and
tables as users download them: cBioPortal's TCGA-BRCA studies (PanCancer Atlas,
``brca_tcga_pub2015``, legacy ``brca_tcga``; native files or the study page's
export), GDC BCR Biotab, UCSC Xena subtype tables and MAFs. The rules:

Barcodes
    ``TCGA-TSS-PPPP-SSV-PPA-...``, e.g. ``TCGA-A1-A0SB-01Z-00-DX1``: tissue source site
    ``A1`` (the manifest's ``site``), participant ``A0SB``, sample type ``01``, vial
    ``Z``, portion ``00``, slide section ``DX`` number ``1``. The patient is the first
    twelve characters. Barcodes match case-insensitively and are stored upper case.
    :meth:`TcgaBarcode.parse` takes a whole value (a table cell) and raises
    InvalidInput for anything else; :meth:`TcgaBarcode.find` looks for a barcode inside
    a file name (delimited by non-alphanumeric characters) and returns None if there
    is none. Neither ever raises anything else.

Slides (:func:`select_slides`)
    Files ending in ``.svs``, ``.tif``, ``.tiff``, ``.ndpi``, ``.mrxs``, ``.scn`` or
    ``.dcm`` (any case) are slides; hidden files and folders are not looked at. The
    ``slide_id`` is the file name without its extension. A DICOM slide is a folder of
    ``.dcm`` files: files of one folder that carry the same barcode (or none, in which
    case the folder's name must carry it) are one slide, named by the barcode holder.
    Sample type ``01`` (primary tumour) gives ``kind=cancer``, ``11`` (solid tissue
    normal) ``kind=normal``; other sample types (``06`` metastatic, ...) are skipped.
    Diagnostic sections (``DX``) are used; frozen sections (``TS``, ``BS``, ``MS``)
    are skipped unless ``include_frozen`` is set, and even then a patient's
    diagnostic slide wins over its frozen ones. Each patient keeps at most one slide
    of each kind, the *last* one (the paper keeps "the last biopsy"): the greatest by,
    in turn, diagnostic over frozen, section number (``DX2`` after ``DX1``, ``DX10``
    after ``DX9``), vial letter, portion, file name ignoring case, then full path.
    Every slide file not used is listed as skipped, with the reason. Symbolic links
    to files are followed; links to folders are not.

Clinical tables (:func:`read_clinical`)
    Tab-, comma- or semicolon-separated; leading lines starting with ``#``
    (cBioPortal's four header lines, a MAF's ``#version``) and blank lines are
    skipped; then a header row; rows right after it that are more header (GDC
    Biotab's CDE names and ``CDE_ID:`` rows) are skipped too. Column ids match
    ignoring case, with spaces and hyphens read as ``_`` (so the cBioPortal export's
    ``Patient ID`` is ``PATIENT_ID``). Patients come from ``PATIENT_ID`` (or
    ``BCR_PATIENT_BARCODE``) and/or ``SAMPLE_ID`` (or ``BCR_SAMPLE_BARCODE``); of two
    candidate columns the first whose values are TCGA barcodes is used (Biotab's
    ``patient_id`` holds 4-character codes). A row whose id is not a TCGA barcode, or
    that has none, is skipped and counted (an error only when no row is left); a row
    naming a sample whose type is not ``01`` is ignored (labels describe the primary
    tumour). A table without any label column is read for its ids. Label columns, in
    the order they are tried for each row (the first that holds a label wins):
    ER ``ER_STATUS_BY_IHC``, ``ER_STATUS``, ``BREAST_CARCINOMA_ESTROGEN_RECEPTOR_STATUS``,
    ``ER_STATUS_NATURE2012``; PR likewise (``PR_...``,
    ``BREAST_CARCINOMA_PROGESTERONE_RECEPTOR_STATUS``); HER2 ``HER2_STATUS_BY_IHC``,
    ``IHC_HER2``, ``HER2_STATUS``,
    ``LAB_PROC_HER2_NEU_IMMUNOHISTOCHEMISTRY_RECEPTOR_STATUS``,
    ``HER2_FINAL_STATUS_NATURE2012``, with FISH from ``HER2_FISH_STATUS`` or
    ``LAB_PROCEDURE_HER2_NEU_IN_SITU_HYBRID_OUTCOME_TYPE``; subtype ``SUBTYPE``,
    ``PAM50_SUBTYPE``, ``PAM50``, ``PAM50_MRNA``, ``PAM50CALL_RNASEQ``,
    ``PAM50_MRNA_NATURE2012``, ``BRCA_SUBTYPE_PAM50``, ``PAPER_BRCA_SUBTYPE_PAM50``,
    ``SUBTYPE_MRNA``. Values match ignoring case and surrounding spaces.
    ``Positive`` gives 1 and ``Negative`` 0; ``Indeterminate``, ``Equivocal``,
    empty, ``NA`` and any bracketed TCGA value (``[Not Available]``, ...) are
    unknown. HER2 without a call by IHC (equivocal, indeterminate or missing) is
    settled by FISH when that column holds Positive or Negative
    (``strict_her2``: only an equivocal IHC is). Subtype: compared without a
    ``BRCA_`` prefix, case, spaces, hyphens, underscores and dots
    (:func:`subtype_key`): ``Basal``/``Basal-like`` give basal=1; LumA, LumB, Her2,
    Normal and Claudin-low in the TCGA, Nature 2012/Xena (``Luminal A``,
    ``HER2-enriched``, ``Normal-like``, ``Claudin low``...) and ``PAM50Call_RNAseq``
    spellings give 0; missing values are unknown. A value outside these lists is taken
    as unknown and reported (``unrecognised_values``), never turned into a label; when
    such values are more than :data:`MAX_UNRECOGNISED_SHARE` of a label column's
    rows, the table is refused unless ``allow_unknown_values``. Rows of one patient
    are merged; two known values that disagree are an error naming both lines.

Mutations (:func:`read_mutations`)
    A MAF with ``Hugo_Symbol``, ``Tumor_Sample_Barcode`` and
    ``Variant_Classification``. Rows of samples whose type is not ``01`` are ignored;
    a 12-character patient barcode (as maftools and TCGAmutations write) stands for
    the patient's primary tumour; a row whose sample is not a TCGA barcode is skipped
    and counted, and a MAF none of whose rows can be used is an error.
    Non-silent means any class except :data:`SILENT_CLASSES` (``Silent``, ``Intron``,
    ``3'UTR``, ``5'UTR``, ``3'Flank``, ``5'Flank``, ``IGR``, ``RNA``, ``lincRNA``);
    so ``Splice_Region`` and ``Translation_Start_Site`` count. A patient's TP53 (PIK3CA)
    label is 1 if it has a non-silent TP53 (PIK3CA) row, else 0, but only if it was
    sequenced: without a list of sequenced samples (:func:`read_sequenced`), every
    patient with any row in the MAF (any gene) counts as sequenced and every other
    patient is unknown; with such a list, the listed patients count too.

Immune scores (:func:`read_immune`)
    Optional: a table with a patient or sample id column (``PATIENT_ID``,
    ``SAMPLE_ID``, ``ID``, ...) and a score column (``IMMUNE_SCORE``, ``IMMUNESCORE``,
    ``SCORE``, or the only other column).

Manifest (:func:`build_manifest`)
    One row per selected slide, sorted by patient then kind (cancer first). Cancer
    rows carry the patient's labels and immune score; normal rows carry none (they
    serve cancer-versus-normal training only). ``split`` is empty: the training flow
    decides it. The summary warns of each label no input supplies, each label unknown
    for more than half the cancer slides, and each input left out entirely, used for
    its ids only, or with rows skipped.

Errors in tables raise :class:`~services.common.errors.InvalidInput` naming the file,
the line where there is one, and what is wrong; a missing file raises NotFound.
"""

from __future__ import annotations

import csv
import gzip
import math
import os
import re
from collections import Counter
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pandas as pd

from services.cohort.manifest import MANIFEST_COLUMNS, slide_path_text
from services.common.errors import InvalidInput, NotFound
from services.common.vocabulary import BIOMARKERS

#: File name endings (compared ignoring case) of whole-slide images.
SLIDE_SUFFIXES: tuple[str, ...] = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".dcm")
#: Variant classes that do not count as a mutation (compared ignoring case).
SILENT_CLASSES: frozenset[str] = frozenset(
    {"silent", "intron", "3'utr", "5'utr", "3'flank", "5'flank", "igr", "rna", "lincrna"}
)
#: Manifest label column -> HUGO gene symbol, for the mutation labels.
MUTATION_GENES: Mapping[str, str] = {"tp53": "TP53", "pik3ca": "PIK3CA"}
#: Manifest label columns that come from clinical tables.
CLINICAL_LABELS: tuple[str, ...] = ("er", "pr", "her2", "basal")

CANCER_SAMPLE_TYPE = "01"
NORMAL_SAMPLE_TYPE = "11"
DIAGNOSTIC_SECTION = "DX"
FROZEN_SECTIONS = frozenset({"TS", "BS", "MS"})

_SAMPLE_TYPE_NAMES = {
    "01": "primary solid tumour",
    "02": "recurrent solid tumour",
    "03": "primary blood-derived cancer",
    "05": "additional new primary",
    "06": "metastatic",
    "07": "additional metastatic",
    "10": "blood-derived normal",
    "11": "solid tissue normal",
}

_BARCODE = (
    r"TCGA-(?P<tss>[A-Z0-9]{2})-(?P<participant>[A-Z0-9]{4})"
    r"(?:-(?P<sample_type>[0-9]{2})(?P<vial>[A-Z])?"
    r"(?:-(?P<portion>[0-9]{2})(?P<analyte>[A-Z])?"
    r"(?:-(?P<section>[A-Z]{2})(?P<section_number>[0-9]{1,3})"
    r"|-(?P<plate>[A-Z0-9]{4})-(?P<center>[0-9]{2}))?"
    r")?)?"
)
# ASCII only: "ſ".upper() == "S" must not turn odd text into a barcode.
_FULL_BARCODE = re.compile(_BARCODE, re.IGNORECASE | re.ASCII)
_EMBEDDED_BARCODE = re.compile(rf"(?<![A-Z0-9]){_BARCODE}(?![A-Z0-9])", re.IGNORECASE | re.ASCII)

_PATIENT_COLUMNS = ("PATIENT_ID", "BCR_PATIENT_BARCODE")
_SAMPLE_COLUMNS = ("SAMPLE_ID", "BCR_SAMPLE_BARCODE", "TUMOR_SAMPLE_BARCODE", "SAMPLEID")
_LABEL_SOURCE_COLUMNS: Mapping[str, tuple[str, ...]] = {
    "er": (
        "ER_STATUS_BY_IHC",
        "ER_STATUS",
        "BREAST_CARCINOMA_ESTROGEN_RECEPTOR_STATUS",
        "ER_STATUS_NATURE2012",
    ),
    "pr": (
        "PR_STATUS_BY_IHC",
        "PR_STATUS",
        "BREAST_CARCINOMA_PROGESTERONE_RECEPTOR_STATUS",
        "PR_STATUS_NATURE2012",
    ),
    "her2": (
        "HER2_STATUS_BY_IHC",
        "IHC_HER2",
        "HER2_STATUS",
        "LAB_PROC_HER2_NEU_IMMUNOHISTOCHEMISTRY_RECEPTOR_STATUS",
        "HER2_FINAL_STATUS_NATURE2012",
    ),
    "basal": (
        "SUBTYPE",
        "PAM50_SUBTYPE",
        "PAM50",
        "PAM50_MRNA",
        "PAM50CALL_RNASEQ",
        "PAM50_MRNA_NATURE2012",
        "BRCA_SUBTYPE_PAM50",
        "PAPER_BRCA_SUBTYPE_PAM50",
        "SUBTYPE_MRNA",
    ),
}
_HER2_FISH_COLUMNS = ("HER2_FISH_STATUS", "LAB_PROCEDURE_HER2_NEU_IN_SITU_HYBRID_OUTCOME_TYPE")
_MAF_COLUMNS = ("HUGO_SYMBOL", "TUMOR_SAMPLE_BARCODE", "VARIANT_CLASSIFICATION")
_SCORE_COLUMNS = ("IMMUNE_SCORE", "IMMUNESCORE", "SCORE")
_MISSING_VALUES = frozenset(
    {
        "",
        "na",
        "n/a",
        "nan",
        "null",
        "none",
        "unknown",
        "not available",
        "not evaluated",
        "not performed",
        "performed but not available",
        "indeterminate",
        "equivocal",
    }
)
#: PAM50 classes as written by TCGA PanCan (``BRCA_LumA``), the Nature 2012 paper and
#: UCSC Xena (``Luminal A``, ``HER2-enriched``, ``Basal-like``, ``Claudin low``) and
#: ``PAM50Call_RNAseq`` (``LumA``...), once lower-cased with the ``BRCA_`` prefix and
#: every space, hyphen, underscore and dot taken out (:func:`subtype_key`).
_BASAL_SUBTYPES = frozenset({"basal", "basallike"})
_NON_BASAL_SUBTYPES = frozenset(
    {
        "luma",
        "luminala",
        "lumb",
        "luminalb",
        "her2",
        "her2enriched",
        "her2e",
        "erbb2",
        "erbb2enriched",
        "normal",
        "normallike",
        "normalbreastlike",
        "claudinlow",
        "claudin",
    }
)
#: Largest share of a label column's rows that may hold values outside the vocabulary
#: before an import fails (without ``allow_unknown_values``).
MAX_UNRECOGNISED_SHARE = 0.05


class _Unrecognised:
    """Marker for a value outside the known vocabulary."""


_UNRECOGNISED = _Unrecognised()


# --------------------------------------------------------------------------- barcodes


@dataclass(frozen=True)
class TcgaBarcode:
    """A TCGA barcode, from patient level down to slide or aliquot level.

    Fields are upper case; the optional ones are None when the barcode stops before
    them. ``str(barcode)`` gives the canonical text, which parses back to an equal
    barcode.

    Attributes:
        tss: Tissue source site code, e.g. ``A1``.
        participant: Participant code, e.g. ``A0SB``.
        sample_type: Two digits, e.g. ``01`` (primary tumour), ``11`` (normal).
        vial: Vial letter, e.g. ``A`` or ``Z``.
        portion: Two-digit portion, e.g. ``00``.
        analyte: Analyte letter of an aliquot barcode, e.g. ``D``.
        section: Slide section: ``DX`` (diagnostic), ``TS``/``BS``/``MS`` (frozen).
        section_number: The digits after the section, e.g. ``1`` in ``DX1``.
        plate: Plate of an aliquot barcode.
        center: Sequencing or characterization centre of an aliquot barcode.
    """

    tss: str
    participant: str
    sample_type: str | None = None
    vial: str | None = None
    portion: str | None = None
    analyte: str | None = None
    section: str | None = None
    section_number: str | None = None
    plate: str | None = None
    center: str | None = None

    @classmethod
    def parse(cls, text: str) -> TcgaBarcode:
        """Parse a whole value (surrounding spaces ignored) as a barcode.

        Args:
            text: e.g. ``TCGA-A1-A0SB``, ``tcga-a1-a0sb-01``,
                ``TCGA-A1-A0SB-01Z-00-DX1``, ``TCGA-A1-A0SB-01A-11D-A142-09``.

        Returns:
            The barcode.

        Raises:
            InvalidInput: ``text`` is not (only) a TCGA barcode.
        """
        if not isinstance(text, str):
            raise InvalidInput(f"a TCGA barcode must be text, got {type(text).__name__}")
        match = _FULL_BARCODE.fullmatch(text.strip())
        if match is None:
            shown = text if len(text) <= 60 else text[:57] + "..."
            raise InvalidInput(
                f"{shown!r} is not a TCGA barcode (expected e.g. TCGA-A1-A0SB or "
                "TCGA-A1-A0SB-01Z-00-DX1)"
            )
        return cls._from_match(match)

    @classmethod
    def find(cls, text: str) -> TcgaBarcode | None:
        """The first barcode inside ``text`` (e.g. a file name), or None.

        A barcode inside text must not touch letters or digits on either side, so
        ``x_TCGA-A1-A0SB-01Z-00-DX1.svs`` holds one and ``XTCGA-A1-A0SB`` does not.
        """
        if not isinstance(text, str):
            return None
        match = _EMBEDDED_BARCODE.search(text)
        return None if match is None else cls._from_match(match)

    @classmethod
    def _from_match(cls, match: re.Match[str]) -> TcgaBarcode:
        parts = {
            name: (value.upper() if value is not None else None)
            for name, value in match.groupdict().items()
        }
        return cls(
            tss=parts["tss"] or "",
            participant=parts["participant"] or "",
            sample_type=parts["sample_type"],
            vial=parts["vial"],
            portion=parts["portion"],
            analyte=parts["analyte"],
            section=parts["section"],
            section_number=parts["section_number"],
            plate=parts["plate"],
            center=parts["center"],
        )

    @property
    def patient_id(self) -> str:
        """The patient barcode, e.g. ``TCGA-A1-A0SB``."""
        return f"TCGA-{self.tss}-{self.participant}"

    @property
    def site(self) -> str:
        """The tissue source site code (stands for the lab and scanner)."""
        return self.tss

    @property
    def sample_id(self) -> str | None:
        """The sample barcode without vial, e.g. ``TCGA-A1-A0SB-01``, if present."""
        if self.sample_type is None:
            return None
        return f"{self.patient_id}-{self.sample_type}"

    @property
    def is_slide(self) -> bool:
        """True if the barcode names a slide section."""
        return self.section is not None

    def __str__(self) -> str:
        text = self.patient_id
        if self.sample_type is None:
            return text
        text += f"-{self.sample_type}{self.vial or ''}"
        if self.portion is None:
            return text
        text += f"-{self.portion}{self.analyte or ''}"
        if self.section is not None:
            text += f"-{self.section}{self.section_number or ''}"
        elif self.plate is not None:
            text += f"-{self.plate}-{self.center or ''}"
        return text


def sample_type_name(code: str | None) -> str:
    """A readable name of a TCGA sample type code, e.g. ``06 (metastatic)``."""
    if code is None:
        return "no sample type"
    name = _SAMPLE_TYPE_NAMES.get(code)
    return f"{code} ({name})" if name else code


# --------------------------------------------------------------------------- slides


@dataclass(frozen=True)
class SlideFile:
    """A slide chosen for the manifest.

    Attributes:
        path: The slide file.
        slide_id: Its file (or DICOM folder) name without the extension.
        barcode: The barcode its name carries.
        kind: ``cancer`` or ``normal``.
    """

    path: Path
    slide_id: str
    barcode: TcgaBarcode
    kind: str


@dataclass(frozen=True)
class SkippedFile:
    """A slide file left out of the manifest.

    Attributes:
        path: The file.
        reason: A short code: ``no_barcode``, ``not_a_slide_barcode``,
            ``sample_type``, ``frozen_section``, ``unknown_section`` or
            ``not_last``.
        detail: One readable sentence.
    """

    path: Path
    reason: str
    detail: str


@dataclass(frozen=True)
class SlideSelection:
    """The outcome of :func:`select_slides`."""

    chosen: tuple[SlideFile, ...]
    skipped: tuple[SkippedFile, ...]


@dataclass(frozen=True)
class SlideScan:
    """The slide files under a folder (see :func:`find_slide_files`).

    Attributes:
        slides: Slide files, sorted; one per DICOM slide.
        other_files: How many files were not slides (wrong extension, or further
            ``.dcm`` files of a DICOM slide).
    """

    slides: tuple[Path, ...]
    other_files: int


def is_slide_file(path: str | os.PathLike[str]) -> bool:
    """True if the file name ends with one of :data:`SLIDE_SUFFIXES` (any case)."""
    return Path(path).name.lower().endswith(SLIDE_SUFFIXES)


def find_slide_files(slides_dir: str | os.PathLike[str]) -> SlideScan:
    """List the slide files under a folder, recursively.

    Hidden files and folders (names starting with ``.``) are not looked at. The
    ``.dcm`` files of one folder that carry the same barcode (or none) form one
    DICOM slide, represented by the first of them by name.

    Args:
        slides_dir: The folder.

    Returns:
        The slides and the count of other files.

    Raises:
        NotFound: No such folder.
        InvalidInput: Not a folder, or holds no slide file at all.
    """
    root = Path(slides_dir)
    if not root.exists():
        raise NotFound(f"slides folder {root} does not exist")
    if not root.is_dir():
        raise InvalidInput(f"{root} is not a folder of slides")
    slides: list[Path] = []
    other = 0

    def _raise(error: OSError) -> None:
        raise InvalidInput(f"cannot read {error.filename}: {error.strerror or error}")

    for folder, subfolders, files in os.walk(root, onerror=_raise):
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        dicom_groups: set[str | None] = set()
        for name in sorted(files):
            if name.startswith(".") or not is_slide_file(name):
                other += not name.startswith(".")
                continue
            if name.lower().endswith(".dcm"):
                barcode = TcgaBarcode.find(name)
                key = str(barcode) if barcode is not None else None
                if key in dicom_groups:
                    other += 1
                    continue
                dicom_groups.add(key)
            slides.append(Path(folder) / name)
    if not slides:
        raise InvalidInput(
            f"no slide files under {root} (looked for {', '.join(SLIDE_SUFFIXES)} files)"
        )
    return SlideScan(tuple(sorted(slides)), other)


def _slide_identity(path: Path) -> tuple[str, TcgaBarcode | None]:
    """The slide id and barcode of a slide file (DICOM: or of its folder)."""
    name = path.name
    stem = name[: name.rfind(".")] if "." in name else name
    barcode = TcgaBarcode.find(name)
    if barcode is None and name.lower().endswith(".dcm"):
        folder_barcode = TcgaBarcode.find(path.parent.name)
        if folder_barcode is not None:
            return path.parent.name, folder_barcode
    return stem, barcode


def select_slides(
    paths: Iterable[str | os.PathLike[str]], *, include_frozen: bool = False
) -> SlideSelection:
    """Choose at most one cancer and one normal slide per patient.

    The rules are in the module docstring: sample type 01 -> cancer, 11 -> normal,
    others skipped; diagnostic sections only unless ``include_frozen``; the last slide
    of each patient and kind by (diagnostic over frozen, section number, vial,
    portion, name, path).

    Args:
        paths: Slide files (e.g. :attr:`SlideScan.slides`).
        include_frozen: Also use frozen sections (TS/BS/MS) when a patient has no
            diagnostic slide of that kind.

    Returns:
        The chosen slides (sorted by patient, cancer first) and the skipped files
        (sorted by path), each skipped file with its reason.
    """
    skipped: list[SkippedFile] = []
    candidates: dict[tuple[str, str], list[SlideFile]] = {}
    for raw in paths:
        path = Path(raw)
        slide_id, barcode = _slide_identity(path)
        if barcode is None:
            skipped.append(SkippedFile(path, "no_barcode", "the file name has no TCGA barcode"))
            continue
        if barcode.section is None:
            skipped.append(
                SkippedFile(
                    path,
                    "not_a_slide_barcode",
                    f"barcode {barcode} does not name a slide section (e.g. -01Z-00-DX1)",
                )
            )
            continue
        if barcode.sample_type == CANCER_SAMPLE_TYPE:
            kind = "cancer"
        elif barcode.sample_type == NORMAL_SAMPLE_TYPE:
            kind = "normal"
        else:
            skipped.append(
                SkippedFile(
                    path,
                    "sample_type",
                    f"sample type {sample_type_name(barcode.sample_type)}; only 01 (primary "
                    "solid tumour) and 11 (solid tissue normal) are used",
                )
            )
            continue
        if barcode.section in FROZEN_SECTIONS:
            if not include_frozen:
                skipped.append(
                    SkippedFile(
                        path,
                        "frozen_section",
                        f"frozen section {barcode.section}{barcode.section_number}; only "
                        "diagnostic (DX) slides are used unless frozen sections are included",
                    )
                )
                continue
        elif barcode.section != DIAGNOSTIC_SECTION:
            skipped.append(
                SkippedFile(
                    path,
                    "unknown_section",
                    f"slide section {barcode.section!r} is neither diagnostic (DX) nor "
                    "frozen (TS/BS/MS)",
                )
            )
            continue
        slide = SlideFile(path, slide_id, barcode, kind)
        candidates.setdefault((barcode.patient_id, kind), []).append(slide)

    chosen: list[SlideFile] = []
    for (patient_id, kind), slides in candidates.items():
        ranked = sorted(slides, key=_slide_rank)
        last = ranked[-1]
        chosen.append(last)
        for other in ranked[:-1]:
            skipped.append(
                SkippedFile(
                    other.path,
                    "not_last",
                    f"patient {patient_id} has a later {kind} slide: {last.path.name}",
                )
            )
    chosen.sort(key=lambda slide: (slide.barcode.patient_id, slide.kind != "cancer"))
    skipped.sort(key=lambda item: str(item.path))
    return SlideSelection(tuple(chosen), tuple(skipped))


def _slide_rank(slide: SlideFile) -> tuple[Any, ...]:
    barcode = slide.barcode
    return (
        barcode.section == DIAGNOSTIC_SECTION,
        int(barcode.section_number or 0),
        barcode.vial or "",
        barcode.portion or "",
        slide.path.name.casefold(),
        str(slide.path),
    )


# --------------------------------------------------------------------------- tables


@dataclass(frozen=True)
class _Table:
    """The kept columns of a delimited table, with the file line of each row."""

    path: Path
    header_line: int
    header: tuple[str, ...]  # every column id, normalized
    raw_header: tuple[str, ...]  # every column name as written
    kept: tuple[str, ...]  # normalized ids of the kept columns, in row order
    rows: tuple[tuple[int, tuple[str, ...]], ...]

    def has(self, column: str) -> bool:
        return column in self.kept

    def first_present(self, columns: Sequence[str]) -> str | None:
        return next((column for column in columns if column in self.kept), None)

    def cell(self, row: tuple[str, ...], column: str) -> str:
        return row[self.kept.index(column)].strip()

    def name(self, column: str) -> str:
        """A column's name as written in the file."""
        return self.raw_header[self.header.index(column)]

    def describe_columns(self) -> str:
        names = [name for name in self.raw_header if name]
        shown = ", ".join(names[:12])
        return shown + (f", ... ({len(names)} in all)" if len(names) > 12 else "")


def _normalize_column(name: str) -> str:
    return re.sub(r"[\s\-]+", "_", name.strip()).upper()


def _open_text(path: Path) -> IO[str]:
    with open(path, "rb") as probe:
        magic = probe.read(2)
    if magic == b"\x1f\x8b":
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def _read_table(
    path: str | os.PathLike[str],
    *,
    what: str,
    keep: Collection[str] | None,
    allow_one_column: bool = False,
    allow_no_rows: bool = False,
) -> _Table:
    """Read a tab- or comma-separated table, keeping only the ``keep`` columns.

    Args:
        path: The file (plain or gzip-compressed UTF-8 text).
        what: What the table is, for error messages (e.g. ``clinical table``).
        keep: Normalized ids of the columns to keep (absent ones are ignored); None
            keeps every named column.
        allow_one_column: Accept a header without any delimiter (a one-column list).
        allow_no_rows: Accept a header without data rows (a header-less list of one).

    Raises:
        NotFound: No such file.
        InvalidInput: Unreadable, not delimited, empty, a kept column twice, or a row
            with more fields than the header.
    """
    source = Path(path)
    if not source.exists():
        raise NotFound(f"{what} {source} does not exist")
    if source.is_dir():
        raise InvalidInput(f"{what} {source} is a folder, not a table")
    line_no = 0
    try:
        with _open_text(source) as handle:
            lines = _numbered_lines(handle)
            header_line = 0
            header_text = ""
            for line_no, text in lines:
                if text.strip() and not text.startswith("#"):
                    header_line, header_text = line_no, text
                    break
            if not header_line:
                raise InvalidInput(f"{source}: empty {what}: no header row")
            if "\t" in header_text:
                delimiter: str | None = "\t"
            elif "," in header_text:
                delimiter = ","
            elif ";" in header_text:
                delimiter = ";"  # spreadsheets of comma-decimal locales
            elif allow_one_column:
                delimiter = None
            else:
                shown = header_text.strip()[:80]
                raise InvalidInput(
                    f"{source} line {header_line}: the {what} is not tab-, comma- or "
                    f"semicolon-separated (header {shown!r})"
                )
            header = [name.strip() for name in _split(header_text, delimiter, source, header_line)]
            normalized = tuple(_normalize_column(name) for name in header)
            positions: dict[str, int] = {}
            for position, name in enumerate(normalized):
                if not name or (keep is not None and name not in keep):
                    continue
                if name in positions:
                    raise InvalidInput(
                        f"{source} line {header_line}: column {header[position]!r} appears "
                        f"twice (columns {positions[name] + 1} and {position + 1})"
                    )
                positions[name] = position
            kept = tuple(positions)
            indices = [positions[name] for name in kept]
            rows: list[tuple[int, tuple[str, ...]]] = []
            for line_no, text in lines:
                if not text.strip() or text.startswith("#"):
                    continue
                fields = _split(text, delimiter, source, line_no)
                if not rows and _is_header_row(fields):
                    continue  # GDC Biotab: CDE names, then CDE ids
                if len(fields) > len(header) and any(f.strip() for f in fields[len(header) :]):
                    raise InvalidInput(
                        f"{source} line {line_no}: {len(fields)} fields, the header has "
                        f"{len(header)}; is the {what} really "
                        f"{_DELIMITER_NAMES.get(delimiter or '', 'one-column')}-separated?"
                    )
                if len(fields) < len(header):
                    fields = fields + [""] * (len(header) - len(fields))
                rows.append((line_no, tuple(fields[index] for index in indices)))
    except UnicodeDecodeError:
        raise InvalidInput(
            f"{source} line {line_no + 1}: not UTF-8 text; is this really a {what}?"
        ) from None
    except OSError as exc:
        raise InvalidInput(f"{source}: cannot read: {exc.strerror or exc}") from None
    if not rows and not allow_no_rows:
        raise InvalidInput(f"{source}: the {what} has a header but no data rows")
    return _Table(source, header_line, normalized, tuple(header), kept, tuple(rows))


_DELIMITER_NAMES = {"\t": "tab", ",": "comma", ";": "semicolon"}
_IDENTIFIER = re.compile(r"[A-Za-z][A-Za-z0-9_]*", re.ASCII)


def _is_header_row(fields: Sequence[str]) -> bool:
    """Whether a row right after the header is more header: GDC Biotab's second and
    third rows (CDE names such as ``bcr_patient_barcode``, then ``CDE_ID:2673794``).

    Such a row holds no TCGA barcode, and either each of its cells is a ``CDE_ID:``
    entry or nine in ten are names of letters, digits and underscores, at least three
    of them with an underscore.
    """
    cells = [cell.strip() for cell in fields if cell.strip()]
    if len(cells) < 3 or any(TcgaBarcode.find(cell) is not None for cell in cells):
        return False
    if all(cell.upper().startswith("CDE_ID:") for cell in cells):
        return True
    named = sum(1 for cell in cells if _IDENTIFIER.fullmatch(cell))
    return named >= 0.9 * len(cells) and sum("_" in cell for cell in cells) >= 3


def _numbered_lines(handle: IO[str]) -> Iterator[tuple[int, str]]:
    for number, line in enumerate(handle, start=1):
        yield number, line.rstrip("\r\n")


def _split(text: str, delimiter: str | None, source: Path, line_no: int) -> list[str]:
    if "\x00" in text:
        raise InvalidInput(f"{source} line {line_no}: binary data, not a text table")
    if delimiter is None:
        return [text]
    if delimiter == "\t":
        # cBioPortal and MAF files are not quoted; a quote is an ordinary character.
        return text.split("\t")
    try:
        return next(csv.reader([text], delimiter=delimiter))
    except (csv.Error, StopIteration) as exc:
        raise InvalidInput(f"{source} line {line_no}: malformed CSV: {exc}") from None


def _require(table: _Table, columns: Sequence[str], what: str) -> str:
    column = table.first_present(columns)
    if column is None:
        raise InvalidInput(
            f"{table.path}: no {what} column (expected one of {', '.join(columns)}); "
            f"found: {table.describe_columns()}"
        )
    return column


def _parse_id(table: _Table, line_no: int, column: str, text: str) -> TcgaBarcode:
    try:
        return TcgaBarcode.parse(text)
    except InvalidInput as exc:
        raise InvalidInput(f"{table.path} line {line_no}: {table.name(column)}: {exc}") from None


#: Examples of ignored values kept per reason.
_EXAMPLES = 3
#: Rows looked at to tell which candidate column holds the TCGA barcodes.
_ID_PROBE_ROWS = 50


class _Ignored:
    """Rows left out of a table, by reason, with the first few examples."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}

    def add(self, reason: str, example: str) -> None:
        self.counts[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < _EXAMPLES and example not in shown:
            shown.append(example)

    def report(
        self,
        table: _Table,
        kind: str,
        patients: int,
        labels: tuple[str, ...],
        notes: tuple[str, ...] = (),
    ) -> InputReport:
        """What ``table`` gave, with these rows left out."""
        return InputReport(
            path=str(table.path),
            kind=kind,
            rows=len(table.rows),
            used_rows=len(table.rows) - sum(self.counts.values()),
            patients=patients,
            labels=labels,
            ignored_rows=dict(self.counts),
            ignored_examples={k: tuple(v) for k, v in self.examples.items()},
            notes=notes,
        )


def _id_column(table: _Table, candidates: Sequence[str]) -> str | None:
    """The first of ``candidates`` whose values are TCGA barcodes (judged on the first
    rows; GDC Biotab's ``patient_id`` holds 4-character codes beside
    ``bcr_patient_barcode``); else the first present, or None."""
    present = [column for column in candidates if table.has(column)]
    for column in present:
        values = [table.cell(row, column) for _line, row in table.rows[:_ID_PROBE_ROWS]]
        values = [value for value in values if value]
        barcodes = sum(1 for value in values if _FULL_BARCODE.fullmatch(value) is not None)
        if values and barcodes * 2 >= len(values):
            return column
    return present[0] if present else None


def _row_patient(
    table: _Table,
    line_no: int,
    row: tuple[str, ...],
    patient_column: str | None,
    sample_column: str | None,
    ignored: _Ignored,
) -> str | None:
    """The row's patient, or None if the row is left out (counted in ``ignored``): it
    names a non-primary sample, has no id, or its id is not a TCGA barcode."""
    barcodes: dict[str, TcgaBarcode] = {}
    for column in (patient_column, sample_column):
        if column is None or not table.cell(row, column):
            continue
        text = table.cell(row, column)
        match = _FULL_BARCODE.fullmatch(text)
        if match is None:
            ignored.add(f"{table.name(column)} not a TCGA barcode", text[:40])
            return None
        barcodes[column] = TcgaBarcode._from_match(match)
    patient = barcodes.get(patient_column) if patient_column is not None else None
    sample = barcodes.get(sample_column) if sample_column is not None else None
    if patient is None and sample is None:
        ignored.add("no patient or sample id", f"line {line_no}")
        return None
    if sample is not None and sample.sample_type not in (None, CANCER_SAMPLE_TYPE):
        ignored.add(f"sample type {sample_type_name(sample.sample_type)}", str(sample))
        return None
    if patient is not None and sample is not None and patient.patient_id != sample.patient_id:
        raise InvalidInput(
            f"{table.path} line {line_no}: patient {patient.patient_id} does not match "
            f"sample {sample}"
        )
    chosen = patient if patient is not None else sample
    assert chosen is not None
    return chosen.patient_id


def _nothing_left(table: _Table, ignored: _Ignored, what: str) -> InvalidInput:
    """The error for a table none of whose rows could be used."""
    reasons = "; ".join(
        f"{count} {reason} (e.g. {', '.join(ignored.examples.get(reason, []))})"
        for reason, count in ignored.counts.most_common(3)
    )
    return InvalidInput(f"{table.path}: no row of the {what} can be used: {reasons}")


# --------------------------------------------------------------------------- clinical


@dataclass(frozen=True)
class Label:
    """A known label and where it came from.

    Attributes:
        value: 1 or 0.
        text: The value as written, e.g. ``Positive``.
        where: ``file line N``.
    """

    value: int
    text: str
    where: str


@dataclass(frozen=True)
class InputReport:
    """What one input file gave, for the import summary.

    Attributes:
        path: The file.
        kind: ``clinical`` or ``mutations``.
        rows: Data rows read.
        used_rows: Rows that gave a patient (the others are in ``ignored_rows``).
        patients: Patients named by the used rows.
        labels: Manifest label columns the file supplies (may be empty: a table of
            ids only, merged with the others).
        ignored_rows: Reason -> rows left out.
        ignored_examples: Reason -> the first few values left out.
        notes: Other remarks, one line each (e.g. patient-level MAF barcodes).
    """

    path: str
    kind: str
    rows: int
    used_rows: int
    patients: int
    labels: tuple[str, ...]
    ignored_rows: Mapping[str, int] = field(default_factory=dict)
    ignored_examples: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-able data."""
        return {
            "path": self.path,
            "kind": self.kind,
            "rows": self.rows,
            "used_rows": self.used_rows,
            "patients": self.patients,
            "labels": list(self.labels),
            "ignored_rows": dict(self.ignored_rows),
            "ignored_examples": {k: list(v) for k, v in self.ignored_examples.items()},
            "notes": list(self.notes),
        }


@dataclass(frozen=True)
class ClinicalTable:
    """Clinical labels per patient (see :func:`read_clinical`).

    Attributes:
        sources: The files read.
        patients: Patient id -> label column (``er``, ``pr``, ``her2``, ``basal``) ->
            known label. Every patient with a usable row is a key, even without any
            known label; an absent label is unknown.
        columns_used: Label column -> the file columns it was read from.
        unrecognised_values: File column -> value -> how many rows held it; taken
            as unknown.
        ignored_rows: Reason -> number of rows ignored.
        inputs: What each file gave (one per file read).
    """

    sources: tuple[Path, ...]
    patients: Mapping[str, Mapping[str, Label]]
    columns_used: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    unrecognised_values: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    ignored_rows: Mapping[str, int] = field(default_factory=dict)
    inputs: tuple[InputReport, ...] = ()


def _status_value(text: str) -> int | _Unrecognised | None:
    value = text.strip().casefold()
    if value == "positive":
        return 1
    if value == "negative":
        return 0
    if value in _MISSING_VALUES or (value.startswith("[") and value.endswith("]")):
        return None
    return _UNRECOGNISED


def subtype_key(text: str) -> str:
    """A PAM50 value reduced for matching: lower case, without the ``BRCA_`` (or
    ``BRCA.``) prefix and without spaces, hyphens, underscores and dots."""
    value = text.strip().casefold()
    for prefix in ("brca_", "brca.", "brca-", "brca "):
        value = value.removeprefix(prefix)
    return re.sub(r"[\s_.\-]+", "", value)


def _subtype_value(text: str) -> int | _Unrecognised | None:
    value = text.strip().casefold()
    if value in _MISSING_VALUES or (value.startswith("[") and value.endswith("]")):
        return None
    key = subtype_key(value)
    if key in _BASAL_SUBTYPES:
        return 1
    if key in _NON_BASAL_SUBTYPES:
        return 0
    return _UNRECOGNISED


def read_clinical(
    path: str | os.PathLike[str],
    *,
    strict_her2: bool = False,
    allow_unknown_values: bool = False,
) -> ClinicalTable:
    """Read ER, PR, HER2 and Basal labels from a clinical patient or sample table.

    Accepts cBioPortal's ``data_clinical_patient.txt`` / ``data_clinical_sample.txt``
    (``#`` lines, then a tab-separated header), cBioPortal's "clinical data" export
    (human-readable headers such as ``Patient ID``), GDC BCR Biotab files (three
    header rows) and plain CSV/TSV/semicolon tables with a header. The column names
    and values it understands are in the module docstring. A table with ids but no
    label column is read for its ids (it is merged with the others).

    Args:
        path: The table.
        strict_her2: FISH settles HER2 only where IHC is equivocal (by default it
            also decides where IHC is missing or indeterminate).
        allow_unknown_values: Take values outside the vocabulary as unknown even when
            they are more than :data:`MAX_UNRECOGNISED_SHARE` of a column's rows.

    Returns:
        The labels per patient.

    Raises:
        NotFound: No such file.
        InvalidInput: Unreadable or malformed table, no id column, no usable row,
            rows of one patient that disagree, or a label column with many values
            outside the vocabulary.
    """
    wanted = {
        *_PATIENT_COLUMNS,
        *_SAMPLE_COLUMNS,
        *_HER2_FISH_COLUMNS,
        *(column for columns in _LABEL_SOURCE_COLUMNS.values() for column in columns),
    }
    table = _read_table(path, what="clinical table", keep=wanted)
    patient_column = _id_column(table, _PATIENT_COLUMNS)
    sample_column = _id_column(table, _SAMPLE_COLUMNS)
    if patient_column is None and sample_column is None:
        _require(table, (*_PATIENT_COLUMNS, *_SAMPLE_COLUMNS), "patient or sample id")
    sources = {
        label: tuple(column for column in columns if table.has(column))
        for label, columns in _LABEL_SOURCE_COLUMNS.items()
    }
    fish_column = table.first_present(_HER2_FISH_COLUMNS)

    patients: dict[str, dict[str, Label]] = {}
    unrecognised: dict[str, Counter[str]] = {}
    ignored = _Ignored()
    used = 0
    for line_no, row in table.rows:
        patient = _row_patient(table, line_no, row, patient_column, sample_column, ignored)
        if patient is None:
            continue
        used += 1
        known = patients.setdefault(patient, {})
        where = f"{table.path} line {line_no}"
        for label, columns in sources.items():
            if not columns and not (label == "her2" and fish_column is not None):
                continue
            found = _row_label(
                table, row, label, columns, fish_column, unrecognised, where, strict_her2
            )
            if found is not None:
                _merge_label(known, label, found, patient)
    if not used and not all(r.startswith("sample type") for r in ignored.counts):
        # Ids that are not TCGA barcodes throughout: the wrong file, not a cohort.
        raise _nothing_left(table, ignored, "clinical table")
    if not allow_unknown_values:
        _check_unrecognised(table, unrecognised, used)
    columns_used = {label: columns for label, columns in sources.items() if columns}
    if fish_column is not None:
        columns_used["her2"] = (*columns_used.get("her2", ()), fish_column)
    labels = tuple(label for label in CLINICAL_LABELS if label in columns_used)
    report = ignored.report(table, "clinical", len(patients), labels)
    return ClinicalTable(
        sources=(table.path,),
        patients=patients,
        columns_used={
            label: tuple(table.name(column) for column in columns)
            for label, columns in columns_used.items()
        },
        unrecognised_values={
            column: dict(sorted(values.items())) for column, values in unrecognised.items()
        },
        ignored_rows=dict(ignored.counts),
        inputs=(report,),
    )


def _check_unrecognised(table: _Table, unrecognised: Mapping[str, Counter[str]], rows: int) -> None:
    """Refuse label columns in which values outside the vocabulary are common enough
    to bias their label (more than :data:`MAX_UNRECOGNISED_SHARE` of the rows read),
    naming every such column and its commonest values in one line."""
    problems = []
    for column, values in unrecognised.items():
        count = sum(values.values())
        if count > MAX_UNRECOGNISED_SHARE * rows:
            shown = ", ".join(f"{value!r} ({n})" for value, n in values.most_common(4))
            problems.append(f"column {column}: {count} of {rows} rows hold {shown}")
    if problems:
        raise InvalidInput(
            f"{table.path}: values histomarker does not know, which would be taken as "
            f"unknown: {'; '.join(problems)} (pass --allow-unknown-values to accept that)"
        )


def _row_label(
    table: _Table,
    row: tuple[str, ...],
    label: str,
    columns: Sequence[str],
    fish_column: str | None,
    unrecognised: dict[str, Counter[str]],
    where: str,
    strict_her2: bool = False,
) -> Label | None:
    """The first known label among ``columns`` of a row, or None.

    HER2: FISH decides where IHC gives no call, equivocal, indeterminate or missing
    (with ``strict_her2``: only where IHC is equivocal).
    """
    equivocal = False
    for column in columns:
        text = table.cell(row, column)
        value = _subtype_value(text) if label == "basal" else _status_value(text)
        if isinstance(value, _Unrecognised):
            unrecognised.setdefault(table.name(column), Counter())[text] += 1
            continue
        if value is not None:
            return Label(value, text, where)
        equivocal = equivocal or text.strip().casefold() == "equivocal"
    if label == "her2" and fish_column is not None and (equivocal or not strict_her2):
        text = table.cell(row, fish_column)
        fish = _status_value(text)
        if isinstance(fish, _Unrecognised):
            unrecognised.setdefault(table.name(fish_column), Counter())[text] += 1
        elif fish is not None:
            ihc = "Equivocal" if equivocal else "no IHC call"
            return Label(fish, f"{ihc}, FISH {text}", where)
    return None


def _merge_label(known: dict[str, Label], label: str, found: Label, patient: str) -> None:
    earlier = known.get(label)
    if earlier is None:
        known[label] = found
    elif earlier.value != found.value:
        raise InvalidInput(
            f"conflicting {label} for patient {patient}: {earlier.where} says "
            f"{earlier.text!r}, {found.where} says {found.text!r}"
        )


def merge_clinical(tables: Sequence[ClinicalTable]) -> ClinicalTable:
    """Combine clinical tables (e.g. subtype from one file, receptors from another).

    A label known in one table fills in for another where it is unknown.

    Raises:
        InvalidInput: Two tables give one patient different known values; the message
            names both files and lines.
    """
    patients: dict[str, dict[str, Label]] = {}
    columns_used: dict[str, tuple[str, ...]] = {}
    unrecognised: dict[str, dict[str, int]] = {}
    ignored: Counter[str] = Counter()
    for table in tables:
        for patient, labels in table.patients.items():
            known = patients.setdefault(patient, {})
            for label, found in labels.items():
                _merge_label(known, label, found, patient)
        for label, columns in table.columns_used.items():
            columns_used[label] = (*columns_used.get(label, ()), *columns)
        for column, values in table.unrecognised_values.items():
            counts = unrecognised.setdefault(column, {})
            for value, count in values.items():
                counts[value] = counts.get(value, 0) + count
        ignored.update(table.ignored_rows)
    return ClinicalTable(
        sources=tuple(source for table in tables for source in table.sources),
        patients=patients,
        columns_used=columns_used,
        unrecognised_values=unrecognised,
        ignored_rows=dict(ignored),
        inputs=tuple(report for table in tables for report in table.inputs),
    )


# --------------------------------------------------------------------------- mutations


@dataclass(frozen=True)
class MutationTable:
    """What a MAF says about the patients (see :func:`read_mutations`).

    Attributes:
        source: The file read.
        sequenced: Patients with any row of a primary-tumour sample.
        mutated: Label column (``tp53``, ``pik3ca``) -> patients with a non-silent
            mutation of that gene.
        rows: Number of data rows read.
        ignored_rows: Reason -> number of rows ignored.
        report: What the file gave, for the import summary.
    """

    source: Path
    sequenced: frozenset[str]
    mutated: Mapping[str, frozenset[str]]
    rows: int
    ignored_rows: Mapping[str, int] = field(default_factory=dict)
    report: InputReport | None = None

    def label(self, gene_label: str, patient: str, sequenced: Collection[str] = ()) -> int | None:
        """A patient's mutation label: 1, 0, or None when it was not sequenced.

        Args:
            gene_label: ``tp53`` or ``pik3ca``.
            patient: Patient barcode.
            sequenced: Further patients known to be sequenced (from a sample list).
        """
        if patient in self.mutated.get(gene_label, frozenset()):
            return 1
        if patient in self.sequenced or patient in sequenced:
            return 0
        return None


def read_mutations(path: str | os.PathLike[str]) -> MutationTable:
    """Read TP53 and PIK3CA mutation calls from a MAF (e.g. ``data_mutations.txt``).

    Args:
        path: The MAF: tab-separated, may start with ``#version`` lines.

    Returns:
        Sequenced and mutated patients.

    Raises:
        NotFound: No such file.
        InvalidInput: Unreadable or malformed table, a missing required column, a
            sample that is not a TCGA barcode, or an empty variant class.
    """
    table = _read_table(path, what="mutation table (MAF)", keep=_MAF_COLUMNS)
    missing = [column for column in _MAF_COLUMNS if not table.has(column)]
    if missing:
        names = {"HUGO_SYMBOL": "Hugo_Symbol", "TUMOR_SAMPLE_BARCODE": "Tumor_Sample_Barcode"}
        wanted = ", ".join(names.get(column, "Variant_Classification") for column in missing)
        raise InvalidInput(
            f"{table.path}: missing MAF column(s) {wanted}; found: {table.describe_columns()}"
        )
    genes = {symbol.upper(): label for label, symbol in MUTATION_GENES.items()}
    sequenced: set[str] = set()
    mutated: dict[str, set[str]] = {label: set() for label in MUTATION_GENES}
    ignored = _Ignored()
    patient_level = 0
    for line_no, row in table.rows:
        sample_text = table.cell(row, "TUMOR_SAMPLE_BARCODE")
        match = _FULL_BARCODE.fullmatch(sample_text)
        if match is None:
            reason = "empty Tumor_Sample_Barcode" if not sample_text else "not a TCGA barcode"
            ignored.add(reason, sample_text[:40] or f"line {line_no}")
            continue
        sample = TcgaBarcode._from_match(match)
        if sample.sample_type is None:
            patient_level += 1  # maftools/TCGAmutations: the patient's primary tumour
        elif sample.sample_type != CANCER_SAMPLE_TYPE:
            ignored.add(f"sample type {sample_type_name(sample.sample_type)}", str(sample))
            continue
        variant = table.cell(row, "VARIANT_CLASSIFICATION")
        if not variant:
            raise InvalidInput(f"{table.path} line {line_no}: empty Variant_Classification")
        sequenced.add(sample.patient_id)
        label = genes.get(table.cell(row, "HUGO_SYMBOL").upper())
        if label is not None and variant.casefold() not in SILENT_CLASSES:
            mutated[label].add(sample.patient_id)
    if not sequenced:
        raise _nothing_left(table, ignored, "mutation table (MAF)")
    notes = []
    if patient_level:
        notes.append(
            f"{patient_level} rows name a patient, not a sample (12-character barcodes, "
            "as maftools writes them): taken as the patient's primary tumour"
        )
    return MutationTable(
        source=table.path,
        sequenced=frozenset(sequenced),
        mutated={label: frozenset(patients) for label, patients in mutated.items()},
        rows=len(table.rows),
        ignored_rows=dict(ignored.counts),
        report=ignored.report(
            table, "mutations", len(sequenced), tuple(MUTATION_GENES), tuple(notes)
        ),
    )


def read_sequenced(path: str | os.PathLike[str]) -> frozenset[str]:
    """Read which patients were sequenced, so that unmutated ones get label 0.

    Accepts a cBioPortal case list (a ``case_list_ids:`` line), a table with a
    ``SAMPLE_ID`` (or ``PATIENT_ID``, ``Tumor_Sample_Barcode``) column such as
    ``data_gene_panel_matrix.txt`` (rows whose ``mutations`` panel is empty or ``NA``
    do not count), or a plain list of barcodes, one a line, without a header.
    Samples whose type is not ``01`` do not count.

    Args:
        path: The file.

    Returns:
        Patient barcodes.

    Raises:
        NotFound: No such file.
        InvalidInput: Unreadable, empty, or holding something that is not a barcode.
    """
    source = Path(path)
    ids = _read_case_list(source)
    if ids is None:
        what = "list of sequenced samples"
        table = _read_table(source, what=what, keep=None, allow_one_column=True, allow_no_rows=True)
        id_columns = (*_SAMPLE_COLUMNS, *_PATIENT_COLUMNS)
        column = table.first_present(id_columns)
        if column is not None:
            ids = [
                (line_no, table.cell(row, column))
                for line_no, row in table.rows
                if not table.has("MUTATIONS")
                or table.cell(row, "MUTATIONS").casefold() not in ("", "na", "nan")
            ]
        elif len(table.header) == 1 and TcgaBarcode.find(table.raw_header[0]) is not None:
            # No header: the first line is already a barcode.
            ids = [(table.header_line, table.raw_header[0])]
            ids += [(line_no, row[0].strip()) for line_no, row in table.rows]
        else:
            _require(table, id_columns, "sample id")
    assert ids is not None
    patients: set[str] = set()
    for line_no, text in ids:
        if not text:
            continue
        try:
            barcode = TcgaBarcode.parse(text)
        except InvalidInput as exc:
            raise InvalidInput(f"{source} line {line_no}: {exc}") from None
        if barcode.sample_type in (None, CANCER_SAMPLE_TYPE):
            patients.add(barcode.patient_id)
    if not patients:
        raise InvalidInput(f"{source}: no primary-tumour (01) samples listed")
    return frozenset(patients)


def _read_case_list(source: Path) -> list[tuple[int, str]] | None:
    """The ids of a cBioPortal case list file, or None if it is not one."""
    if not source.is_file():
        return None
    try:
        with _open_text(source) as handle:
            for number, text in _numbered_lines(handle):
                key, _, value = text.partition(":")
                if key.strip().casefold() == "case_list_ids":
                    return [(number, item) for item in re.split(r"[\t ,]+", value.strip())]
    except (UnicodeDecodeError, OSError):
        return None  # _read_table reports it properly.
    return None


# --------------------------------------------------------------------------- immune


def read_immune(path: str | os.PathLike[str]) -> dict[str, float]:
    """Read an immune score per patient.

    Args:
        path: A table with a patient/sample id column and a score column.

    Returns:
        Patient barcode -> score. Rows of non-primary samples and rows with an empty
        or missing score are left out.

    Raises:
        NotFound: No such file.
        InvalidInput: Malformed table, no id or score column, a score that is not a
            finite number, or rows of one patient with different scores.
    """
    id_columns = (*_PATIENT_COLUMNS, *_SAMPLE_COLUMNS, "ID")
    table = _read_table(path, what="immune score table", keep=None)
    id_column = _require(table, id_columns, "patient or sample id")
    score_column = table.first_present(_SCORE_COLUMNS)
    if score_column is None:
        others = [name for name in table.kept if name not in id_columns]
        if len(others) != 1:
            raise InvalidInput(
                f"{table.path}: no immune score column (expected one of "
                f"{', '.join(_SCORE_COLUMNS)}, or a single column beside the id); "
                f"found: {table.describe_columns()}"
            )
        score_column = others[0]
    patient_column = id_column if id_column in _PATIENT_COLUMNS else None
    sample_column = None if patient_column else id_column
    scores: dict[str, tuple[float, int]] = {}
    ignored = _Ignored()
    for line_no, row in table.rows:
        patient = _row_patient(table, line_no, row, patient_column, sample_column, ignored)
        if patient is None:
            continue
        text = table.cell(row, score_column)
        if text.casefold() in _MISSING_VALUES or text.startswith("["):
            continue
        try:
            score = float(text)
        except ValueError:
            score = math.nan
        if not math.isfinite(score):
            raise InvalidInput(
                f"{table.path} line {line_no}: immune score {text!r} is not a finite number"
            )
        earlier = scores.get(patient)
        if earlier is not None and earlier[0] != score:
            raise InvalidInput(
                f"{table.path}: conflicting immune scores for patient {patient}: line "
                f"{earlier[1]} says {earlier[0]}, line {line_no} says {score}"
            )
        scores[patient] = (score, line_no)
    return {patient: score for patient, (score, _line) in scores.items()}


# --------------------------------------------------------------------------- manifest


@dataclass
class ImportSummary:
    """What an import found, for people: counts, skipped files and their reasons.

    Attributes:
        slides_dir: The folder scanned.
        slide_files: Slide files found (DICOM: one per slide).
        other_files: Other files found (not slides).
        cancer_slides: Rows of kind cancer in the manifest.
        normal_slides: Rows of kind normal in the manifest.
        skipped: Slide files left out, each with its reason.
        labels: Label column -> ``positive``/``negative``/``unknown`` counts over
            the cancer slides.
        patients_with_slides: Patients with at least one manifest row.
        patients_without_slide: Patients named by a clinical or mutation table who
            have no slide in the manifest.
        slide_patients_not_in_clinical: Patients with a slide but no clinical row
            (None when no clinical table was given).
        slide_patients_not_sequenced: Patients with a cancer slide who were not
            sequenced (None when no mutation table was given).
        columns_used: Label column -> clinical table columns it was read from.
        unrecognised_values: Clinical column -> value -> count, taken as unknown.
        ignored_rows: Table -> reason -> rows ignored.
        inputs: What each input file gave.
        labels_not_supplied: Label columns no input supplies (unknown for every slide).
        labels_mostly_unknown: Label -> share of the cancer slides it is unknown for,
            for those unknown for more than half (and supplied by some input).
        warnings: One readable line for each of the above, each input whose rows were
            all left out, and each column with values outside the vocabulary.
        manifest: Where the manifest was written, once it is.
    """

    slides_dir: str
    slide_files: int = 0
    other_files: int = 0
    cancer_slides: int = 0
    normal_slides: int = 0
    skipped: list[SkippedFile] = field(default_factory=list)
    labels: dict[str, dict[str, int]] = field(default_factory=dict)
    patients_with_slides: int = 0
    patients_without_slide: list[str] = field(default_factory=list)
    slide_patients_not_in_clinical: int | None = None
    slide_patients_not_sequenced: int | None = None
    columns_used: dict[str, list[str]] = field(default_factory=dict)
    unrecognised_values: dict[str, dict[str, int]] = field(default_factory=dict)
    ignored_rows: dict[str, dict[str, int]] = field(default_factory=dict)
    inputs: list[InputReport] = field(default_factory=list)
    labels_not_supplied: list[str] = field(default_factory=list)
    labels_mostly_unknown: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    manifest: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The summary as JSON-able data; skipped paths relative to the slides folder."""
        root = Path(self.slides_dir)
        skipped_by_reason = Counter(item.reason for item in self.skipped)
        return {
            "manifest": self.manifest,
            "slides_dir": self.slides_dir,
            "slides": {
                "files": self.slide_files,
                "cancer": self.cancer_slides,
                "normal": self.normal_slides,
                "skipped": len(self.skipped),
                "other_files": self.other_files,
            },
            "skipped_by_reason": dict(sorted(skipped_by_reason.items())),
            "skipped": [
                {
                    "path": _display_path(item.path, root),
                    "reason": item.reason,
                    "detail": item.detail,
                }
                for item in self.skipped
            ],
            "labels": self.labels,
            "patients": {
                "with_slides": self.patients_with_slides,
                "without_slide": len(self.patients_without_slide),
                "without_slide_ids": self.patients_without_slide,
                "with_slide_not_in_clinical": self.slide_patients_not_in_clinical,
                "with_cancer_slide_not_sequenced": self.slide_patients_not_sequenced,
            },
            "clinical_columns_used": self.columns_used,
            "unrecognised_values": self.unrecognised_values,
            "ignored_rows": self.ignored_rows,
            "inputs": [report.to_dict() for report in self.inputs],
            "labels_not_supplied": self.labels_not_supplied,
            "labels_mostly_unknown": self.labels_mostly_unknown,
            "warnings": self.warnings,
        }


def _display_path(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)


def build_manifest(
    slides_dir: str | os.PathLike[str],
    clinical: ClinicalTable | None,
    mutations: MutationTable | None,
    *,
    sequenced: Collection[str] = (),
    immune: Mapping[str, float] | None = None,
    manifest_dir: str | os.PathLike[str] | None = None,
    include_frozen: bool = False,
) -> tuple[pd.DataFrame, ImportSummary]:
    """Match the slides under a folder with the patients' labels.

    Args:
        slides_dir: Folder of TCGA slide files (searched recursively).
        clinical: ER/PR/HER2/Basal labels, or None (all unknown).
        mutations: TP53/PIK3CA calls, or None (all unknown).
        sequenced: Further patients known to be sequenced (see :func:`read_sequenced`).
        immune: Patient -> immune score, or None.
        manifest_dir: Folder the manifest will be written to, so that slide paths
            inside it are stored relative to it; None stores absolute paths.
        include_frozen: Also use frozen sections (see :func:`select_slides`).

    Returns:
        The manifest rows (columns :data:`MANIFEST_COLUMNS`, labels as nullable
        ``Int8``) and the summary.

    Raises:
        NotFound: No such folder.
        InvalidInput: No slide files, or none usable (the reasons are in the message).
    """
    root = Path(os.path.abspath(slides_dir))
    scan = find_slide_files(root)
    selection = select_slides(scan.slides, include_frozen=include_frozen)
    summary = ImportSummary(
        slides_dir=str(root),
        slide_files=len(scan.slides),
        other_files=scan.other_files,
        skipped=list(selection.skipped),
    )
    if not selection.chosen:
        reasons = Counter(item.reason for item in selection.skipped)
        listed = ", ".join(f"{count} {reason}" for reason, count in sorted(reasons.items()))
        raise InvalidInput(
            f"none of the {len(scan.slides)} slide files under {root} can be used ({listed})"
        )

    clinical_patients = clinical.patients if clinical is not None else {}
    rows: list[dict[str, Any]] = []
    for slide in selection.chosen:
        patient = slide.barcode.patient_id
        row: dict[str, Any] = {
            "slide_id": slide.slide_id,
            "patient_id": patient,
            "kind": slide.kind,
            "site": slide.barcode.site,
            "split": "",
            "immune_score": None,
            "slide_path": (
                slide_path_text(slide.path, manifest_dir)
                if manifest_dir is not None
                else os.path.abspath(slide.path)
            ),
        }
        for label in BIOMARKERS:
            row[label] = None
        if slide.kind == "cancer":
            known = clinical_patients.get(patient, {})
            for label in CLINICAL_LABELS:
                found = known.get(label)
                row[label] = found.value if found is not None else None
            if mutations is not None:
                for label in MUTATION_GENES:
                    row[label] = mutations.label(label, patient, sequenced)
            if immune is not None:
                row["immune_score"] = immune.get(patient)
        rows.append(row)

    frame = pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS))
    for label in BIOMARKERS:
        frame[label] = pd.array(list(frame[label]), dtype="Int8")
    frame["immune_score"] = pd.array(list(frame["immune_score"]), dtype="Float64")
    for column in ("slide_id", "patient_id", "kind", "site", "split", "slide_path"):
        frame[column] = frame[column].astype("str")

    _summarize(summary, frame, clinical, mutations, sequenced)
    return frame, summary


def _summarize(
    summary: ImportSummary,
    frame: pd.DataFrame,
    clinical: ClinicalTable | None,
    mutations: MutationTable | None,
    sequenced: Collection[str],
) -> None:
    cancer = frame[frame["kind"] == "cancer"]
    summary.cancer_slides = len(cancer)
    summary.normal_slides = len(frame) - len(cancer)
    for label in BIOMARKERS:
        values = cancer[label]
        summary.labels[label] = {
            "positive": int((values == 1).sum()),
            "negative": int((values == 0).sum()),
            "unknown": int(values.isna().sum()),
        }
    with_slides = set(frame["patient_id"])
    summary.patients_with_slides = len(with_slides)
    named: set[str] = set()
    if clinical is not None:
        named.update(clinical.patients)
        summary.slide_patients_not_in_clinical = len(with_slides - set(clinical.patients))
        summary.columns_used = {
            label: list(columns) for label, columns in clinical.columns_used.items()
        }
        summary.unrecognised_values = {
            column: dict(values) for column, values in clinical.unrecognised_values.items()
        }
        if clinical.ignored_rows:
            summary.ignored_rows["clinical"] = dict(clinical.ignored_rows)
    if mutations is not None:
        named.update(mutations.sequenced)
        named.update(sequenced)
        cancer_patients = set(cancer["patient_id"])
        all_sequenced = mutations.sequenced | set(sequenced)
        summary.slide_patients_not_sequenced = len(cancer_patients - all_sequenced)
        if mutations.ignored_rows:
            summary.ignored_rows["mutations"] = dict(mutations.ignored_rows)
    summary.patients_without_slide = sorted(named - with_slides)
    _warn(summary, clinical, mutations)


#: Where each label can come from, for the warning when no input supplies it.
_LABEL_SOURCES_HINT = {
    "er": "a receptor-status table",
    "pr": "a receptor-status table",
    "her2": "a receptor-status table",
    "basal": "a PAM50 subtype table",
    "tp53": "a mutation table (MAF)",
    "pik3ca": "a mutation table (MAF)",
}
_RECEPTOR_HINT = (
    "the PanCancer Atlas study has no ER, PR or HER2: add the sample file of "
    "brca_tcga_pub2015, the patient file of the legacy brca_tcga, or the GDC Biotab "
    "clinical_patient_brca file"
)


def _warn(
    summary: ImportSummary, clinical: ClinicalTable | None, mutations: MutationTable | None
) -> None:
    """The lines that keep an import from being silently empty or lopsided."""
    if clinical is not None:
        summary.inputs.extend(clinical.inputs)
    if mutations is not None and mutations.report is not None:
        summary.inputs.append(mutations.report)
    supplied = {label for report in summary.inputs for label in report.labels}
    summary.labels_not_supplied = [label for label in BIOMARKERS if label not in supplied]
    missing = summary.labels_not_supplied
    if missing:
        hints = sorted({_LABEL_SOURCES_HINT[label] for label in missing})
        line = f"no input supplies {', '.join(missing)}: unknown for every slide (needs "
        line += " and ".join(hints) + ")"
        if {"er", "pr", "her2"} & set(missing) and clinical is not None:
            line += f"; {_RECEPTOR_HINT}"
        summary.warnings.append(line)
    frozen_normals = sum(
        1
        for item in summary.skipped
        if item.reason == "frozen_section"
        and (found := TcgaBarcode.find(item.path.name)) is not None
        and found.sample_type == NORMAL_SAMPLE_TYPE
    )
    if frozen_normals and not summary.normal_slides:
        summary.warnings.append(
            f"no normal slide: {frozen_normals} normal-tissue slides are frozen sections, as "
            "TCGA's are; pass --include-frozen to use them"
        )
    cancer = summary.cancer_slides
    for label, counts in summary.labels.items():
        if label in missing or not cancer:
            continue
        share = counts["unknown"] / cancer
        if share > 0.5:
            summary.labels_mostly_unknown[label] = round(share, 4)
            summary.warnings.append(
                f"{label} is unknown for {counts['unknown']} of {cancer} cancer slides "
                f"({share:.0%})"
            )
    for report in summary.inputs:
        name = Path(report.path).name
        if not report.labels:
            summary.warnings.append(f"{name}: no label column; read for its patient ids only")
        if report.used_rows == 0:
            summary.warnings.append(f"{name}: every row was left out")
        for reason, count in report.ignored_rows.items():
            if reason.endswith("not a TCGA barcode") or reason.startswith("no patient"):
                examples = ", ".join(report.ignored_examples.get(reason, ()))
                summary.warnings.append(f"{name}: {count} rows skipped, {reason} (e.g. {examples})")
        summary.warnings.extend(f"{name}: {note}" for note in report.notes)
    for column, values in summary.unrecognised_values.items():
        shown = ", ".join(f"{value!r} ({n})" for value, n in list(values.items())[:3])
        summary.warnings.append(
            f"column {column}: {sum(values.values())} values taken as unknown: {shown}"
        )
