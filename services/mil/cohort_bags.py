"""A cohort's bags as MIL training units: one per slide or one per patient.

:func:`load_cohort_bags` joins a cohort manifest (:mod:`services.cohort.manifest`)
to a folder of bag files (:mod:`services.mil.bags`) and returns the bags to train
on with their labels, patients and sites:

- Only cancer slides: normal slides carry no biomarker label. A patient whose six
  labels are all unknown is left out too (nothing to learn from).
- Labels belong to patients: every slide of a patient must agree on each known
  label, and a slide's bag takes its patient's labels (a label unknown on one slide
  and known on another is known).
- Sites come from the manifest's ``site`` column, else the TCGA or synthetic id
  (:func:`services.mil.folds.patient_sites`).
- Bags are found as ``<folder>/<slide_id>.h5``, where the folder is the one given or,
  in the object store's layout, its ``bags/<encoder>/`` (:func:`bag_folder`).
  Slides without a bag, and empty bags (no usable tissue), are counted and skipped.
- Every bag must come from one encoder and one weights file (and be the named
  encoder's when one is given) and have one width; the first bag that does not
  stops the load with an InvalidInput naming the slide.
- With ``patient_level``, a patient's slide bags are merged into one
  (:func:`services.mil.bags.merge_bags`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from services.cohort.manifest import Manifest
from services.common.errors import InvalidInput, NotFound
from services.common.vocabulary import BIOMARKERS
from services.mil.bags import Bag, merge_bags, read_bag
from services.mil.folds import patient_sites

#: Suffix of a bag file.
BAG_SUFFIX = ".h5"
#: Examples named per skipped reason in a summary.
SHOWN = 5


@dataclass(frozen=True, eq=False)
class CohortBags:
    """The training units of a cohort and what was left out.

    Attributes:
        bags: One bag per unit (a slide, or a patient with ``patient_level``).
        ids: The unit ids: slide ids, or patient ids.
        patients: The patient of each unit.
        slides: The slides behind each unit.
        labels: (units, tasks) float: 1, 0 or NaN (unknown), the patient's labels.
        tasks: The label columns, in order.
        patient_ids: The patients, each once, in order of first appearance.
        patient_labels: (patients, tasks) their labels.
        patient_site: Patient -> site code.
        encoder: The bags' encoder name.
        encoder_sha256: SHA-256 of its weights file ("" for random weights).
        feature_dim: D, the embedding width.
        folder: Where the bag files were found.
        skipped: Reason -> the slide ids left out for it.
    """

    bags: list[Bag]
    ids: list[str]
    patients: list[str]
    slides: list[tuple[str, ...]]
    labels: np.ndarray
    tasks: tuple[str, ...]
    patient_ids: list[str]
    patient_labels: np.ndarray
    patient_site: dict[str, str]
    encoder: str
    encoder_sha256: str
    feature_dim: int
    folder: Path
    skipped: dict[str, list[str]] = field(default_factory=dict)

    @property
    def sites(self) -> list[str]:
        """The site of each unit."""
        return [self.patient_site[p] for p in self.patients]

    @property
    def n_slides(self) -> int:
        """Slides behind the units."""
        return sum(len(s) for s in self.slides)

    def skipped_summary(self) -> dict[str, dict[str, Any]]:
        """Reason -> {"count", "first"}: how many slides, and the first few ids."""
        return {
            reason: {"count": len(ids), "first": ids[:SHOWN]}
            for reason, ids in self.skipped.items()
            if ids
        }


def bag_folder(root: str | Path, encoder: str | None = None) -> Path:
    """The folder holding ``<slide_id>.h5`` bag files under ``root``.

    ``root`` itself, unless it holds the object store's layout ``bags/<encoder>/``
    (or is the ``bags`` folder, holding ``<encoder>/``): then that encoder's folder,
    the named one, or the only one there is.

    Raises:
        NotFound: ``root`` is not a folder.
        InvalidInput: The layout holds several encoders' bags and none is named.
    """
    top = Path(root)
    if not top.is_dir():
        raise NotFound(f"bags folder {top} does not exist")
    for layout in (top / "bags", top):
        if encoder and (layout / encoder).is_dir():
            return layout / encoder
    if any(top.glob(f"*{BAG_SUFFIX}")):
        return top
    for layout in (top / "bags", top):
        encoders = _encoder_folders(layout)
        if encoder and encoders:
            raise InvalidInput(
                f"{layout} has no {encoder}/ folder of bags (it has {', '.join(encoders)})"
            )
        if len(encoders) == 1:
            return layout / encoders[0]
        if len(encoders) > 1:
            raise InvalidInput(
                f"{layout} holds bags of several encoders ({', '.join(encoders)}); "
                "name one with --encoder"
            )
    return top


def _encoder_folders(layout: Path) -> list[str]:
    """Names of the subfolders of ``layout`` that hold bag files."""
    if not layout.is_dir():
        return []
    return sorted(p.name for p in layout.iterdir() if p.is_dir() and any(p.glob(f"*{BAG_SUFFIX}")))


def patient_labels(
    rows: pd.DataFrame, tasks: tuple[str, ...] = BIOMARKERS
) -> tuple[list[str], np.ndarray]:
    """Each patient's labels from its slides' rows; InvalidInput where slides disagree.

    Returns:
        The patients in order of first appearance, and their (patients, tasks) labels
        (1, 0 or NaN).
    """
    patients = list(dict.fromkeys(rows["patient_id"].astype(str)))
    position = {p: i for i, p in enumerate(patients)}
    labels = np.full((len(patients), len(tasks)), np.nan)
    source: dict[tuple[int, int], str] = {}
    for _, row in rows.iterrows():
        i = position[str(row["patient_id"])]
        for t, task in enumerate(tasks):
            value = row[task]
            if pd.isna(value):
                continue
            if np.isnan(labels[i, t]):
                labels[i, t] = float(value)
                source[i, t] = str(row["slide_id"])
            elif labels[i, t] != float(value):
                raise InvalidInput(
                    f"patient {patients[i]}: slides {source[i, t]} and {row['slide_id']} "
                    f"disagree on {task} ({int(labels[i, t])} vs {int(value)}); fix the manifest"
                )
    return patients, labels


def load_cohort_bags(
    manifest: Manifest,
    bags_root: str | Path,
    *,
    encoder: str | None = None,
    patient_level: bool = False,
    max_patches: int = 0,
    seed: int = 0,
    tasks: tuple[str, ...] = BIOMARKERS,
    progress: Callable[[int, int], None] | None = None,
) -> CohortBags:
    """The cohort's training units (module docstring).

    Args:
        manifest: The cohort.
        bags_root: Folder of ``<slide_id>.h5`` bags, or one holding ``bags/<encoder>/``.
        encoder: The encoder every bag must come from (default: whichever the first
            bag names).
        patient_level: One merged bag per patient instead of one per slide.
        max_patches: Keep at most this many patches per slide, a seeded random
            subset (0: all); bounds the memory of very large cohorts.
        seed: Seed of that subset.
        tasks: Label columns.
        progress: Called with (bags read, bags to read).

    Raises:
        NotFound: No bags folder.
        InvalidInput: Disagreeing labels, mixed encoders, weights or widths, a bag
            holding another slide, or nothing left to train on.
    """
    if max_patches < 0:
        raise InvalidInput(f"max_patches must be >= 0, got {max_patches}")
    folder = bag_folder(bags_root, encoder)
    table = manifest.table
    skipped: dict[str, list[str]] = {
        "normal slide (no biomarker labels)": list(table.loc[table["kind"] != "cancer", "slide_id"])
    }
    cancer = table[table["kind"] == "cancer"]
    if cancer.empty:
        raise InvalidInput("the manifest has no cancer slide: nothing to train on")
    patients, labels = patient_labels(cancer, tasks)
    unlabelled = {p for p, y in zip(patients, labels, strict=True) if np.isnan(y).all()}
    skipped["no known biomarker label"] = list(
        cancer.loc[cancer["patient_id"].isin(unlabelled), "slide_id"]
    )
    cancer = cancer[~cancer["patient_id"].isin(unlabelled)]
    paths = {sid: folder / f"{sid}{BAG_SUFFIX}" for sid in cancer["slide_id"]}
    skipped["no bag"] = [sid for sid, path in paths.items() if not path.is_file()]
    cancer = cancer[cancer["slide_id"].isin([s for s, p in paths.items() if p.is_file()])]
    if cancer.empty:
        raise InvalidInput(
            f"no bag in {folder} for any labelled cancer slide of the manifest "
            f"(expected files like {folder / (str(table['slide_id'].iloc[0]) + BAG_SUFFIX)})"
        )

    by_slide: dict[str, Bag] = {}
    first: Bag | None = None
    skipped["empty bag (no usable tissue)"] = []
    rng = np.random.default_rng(seed)
    for done, sid in enumerate(cancer["slide_id"], start=1):
        bag = read_bag(paths[sid])
        first = first or bag
        _check_bag(sid, paths[sid], bag, first, encoder)
        if bag.n_patches == 0:
            skipped["empty bag (no usable tissue)"].append(sid)
        else:
            by_slide[sid] = _subsample(bag, max_patches, rng)
        if progress is not None:
            progress(done, len(cancer))
    if not by_slide or first is None:
        raise InvalidInput(f"every bag in {folder} is empty: nothing to train on")
    cancer = cancer[cancer["slide_id"].isin(by_slide)]
    patient_ids, per_patient = patient_labels(cancer, tasks)
    sites = patient_sites(cancer)
    row_of = {p: i for i, p in enumerate(patient_ids)}

    units: list[Bag] = []
    ids: list[str] = []
    owners: list[str] = []
    slides: list[tuple[str, ...]] = []
    if patient_level:
        for patient, group in cancer.groupby("patient_id", sort=False):
            members = [str(s) for s in group["slide_id"]]
            units.append(merge_bags([by_slide[s] for s in members], bag_id=str(patient)))
            ids.append(str(patient))
            owners.append(str(patient))
            slides.append(tuple(members))
    else:
        for sid, patient in zip(cancer["slide_id"], cancer["patient_id"], strict=True):
            units.append(by_slide[str(sid)])
            ids.append(str(sid))
            owners.append(str(patient))
            slides.append((str(sid),))
    return CohortBags(
        bags=units,
        ids=ids,
        patients=owners,
        slides=slides,
        labels=np.stack([per_patient[row_of[p]] for p in owners]),
        tasks=tuple(tasks),
        patient_ids=patient_ids,
        patient_labels=per_patient,
        patient_site={p: sites[p] for p in patient_ids},
        encoder=first.encoder,
        encoder_sha256=first.encoder_sha256,
        feature_dim=first.feature_dim,
        folder=folder,
        skipped=skipped,
    )


def _check_bag(slide_id: str, path: Path, bag: Bag, first: Bag, encoder: str | None) -> None:
    """InvalidInput naming the slide when its bag cannot be pooled with the first."""
    if bag.slide_id != slide_id:
        raise InvalidInput(
            f"slide {slide_id}: {path} holds the patches of slide {bag.slide_id}; "
            "bags are named <slide_id>.h5"
        )
    if encoder and bag.encoder != encoder:
        raise InvalidInput(
            f"slide {slide_id}: bag {path} holds {bag.encoder} embeddings, not {encoder}"
        )
    if bag.encoder != first.encoder:
        raise InvalidInput(
            f"slide {slide_id}: bag {path} holds {bag.encoder} embeddings, slide "
            f"{first.slide_id}'s {first.encoder}; use one encoder's bags"
        )
    if bag.encoder_sha256 != first.encoder_sha256:
        raise InvalidInput(
            f"slide {slide_id}: bag {path} was embedded with other {bag.encoder} weights "
            f"(sha256 {bag.encoder_sha256[:12] or 'random'}, slide {first.slide_id}'s "
            f"{first.encoder_sha256[:12] or 'random'}); embed every slide with one file"
        )
    if bag.feature_dim != first.feature_dim:
        raise InvalidInput(
            f"slide {slide_id}: bag {path} has width {bag.feature_dim}, slide "
            f"{first.slide_id}'s {first.feature_dim}"
        )


def _subsample(bag: Bag, max_patches: int, rng: np.random.Generator) -> Bag:
    """``bag`` with at most ``max_patches`` of its patches (0: all), in file order."""
    if not max_patches or bag.n_patches <= max_patches:
        return bag
    rows = np.sort(rng.permutation(bag.n_patches)[:max_patches])
    return dataclasses.replace(
        bag,
        features=bag.features[rows],
        coords=bag.coords[rows],
        slide_index=bag.slide_index[rows],
    )
