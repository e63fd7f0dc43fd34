"""``histomarker mil train`` and ``histomarker mil predict``: attention MIL on bags.

    histomarker mil train cohort/manifest.csv bags/ runs/mil --head abmil --folds 5
    histomarker mil predict runs/mil/mil_abmil.pt bags/SLIDE.h5 --attention SLIDE.csv

``train`` joins the manifest to the bags (:mod:`services.mil.cohort_bags`), then
cross-validates by patient with folds that keep tissue source sites apart
(:func:`services.mil.folds.site_folds`). In each fold the other folds train the
head, except a validation part made of whole sites of theirs (early stopping and
per-task temperatures); the held-out fold is predicted. The out-of-fold
probabilities, one per patient (the mean over its bags), give per biomarker the
AUROC with its bootstrap 95% interval over patients, and ECE and NLL before and after
temperature scaling, all on patients no model of theirs saw. Then one head is fitted
on every patient (again with a site-aware validation part for calibration) and
saved. OUT receives::

    mil_<head>.pt             the fitted model (FittedMIL.save)
    oof_predictions.csv       per bag: patient, slides, fold, site, label and
                              out-of-fold probability per biomarker
    reliability_<task>.png    out-of-fold reliability before / after temperature
    cv.md                     the cross-validation table in Markdown
    model_card.json           encoder (name, sha256, licence), head, training data,
                              the cross-validation table and the command (written last)

``predict`` scores one bag with a saved model: six calibrated probabilities and
calls at :data:`CALL_THRESHOLD`, and optionally the per-biomarker attention of every
patch as a CSV that ``histomarker export geojson --attention`` reads.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import shlex
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from services.common.errors import InvalidInput
from services.mil.cohort_bags import CohortBags

#: Probability at and above which a biomarker is called positive.
CALL_THRESHOLD = 0.5
#: Share of the training patients held out for validation (whole sites).
VALIDATION_SHARE = 0.2
_AUROC_KEYS = ("auroc", "ci_low", "ci_high")
_CALIBRATION_KEYS = ("ece_before", "ece_after", "nll_before", "nll_after")
#: Probabilities are clipped this far from 0 and 1 before a log.
_EPSILON = 1e-12


# --- cross-validation ------------------------------------------------------------------


@dataclass(frozen=True)
class TrainSettings:
    """What every head of one run is trained with (see :func:`services.mil.train_mil`)."""

    head: str
    epochs: int
    lr: float
    patience: int
    seed: int
    threads: int
    head_options: dict[str, Any]

    def check(self) -> None:
        """InvalidInput naming the first setting out of range."""
        if self.epochs < 1:
            raise InvalidInput(f"--epochs must be >= 1, got {self.epochs}")
        if self.patience < 1:
            raise InvalidInput(f"--patience must be >= 1, got {self.patience}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise InvalidInput(f"--lr must be a positive number, got {self.lr}")
        if self.threads < 0:
            raise InvalidInput(f"--threads must be >= 0 (0: torch's default), got {self.threads}")


@dataclass(frozen=True)
class OutOfFold:
    """Cross-validation results per bag and per fold.

    Attributes:
        fold: (bags,) the fold each bag was held out in.
        logits: (bags, tasks) logits of the fold's model, uncalibrated.
        temperatures: (folds, tasks) each fold model's temperatures.
        folds: Per fold: held-out sites, patients, bags, validation sites, best epoch,
            seconds.
    """

    fold: np.ndarray
    logits: np.ndarray
    temperatures: np.ndarray
    folds: list[dict[str, Any]]

    def probabilities(self, calibrated: bool) -> np.ndarray:
        """(bags, tasks) out-of-fold probabilities, with or without the fold's T."""
        from services.mil.calibration import sigmoid

        scale = self.temperatures[self.fold] if calibrated else 1.0
        return sigmoid(self.logits / scale)


def validation_split(
    patients: Sequence[str], sites: Sequence[str], labels: np.ndarray, seed: int
) -> tuple[np.ndarray, bool]:
    """Which training patients validate: about :data:`VALIDATION_SHARE` of them.

    Whole sites (one fold of :func:`~services.mil.folds.site_folds` over the
    patients' sites) when they are at two sites or more; with one site, patients at
    random (said by the second value, False).

    Returns:
        (mask over ``patients``, whether the split keeps sites apart).
    """
    from services.mil.folds import site_folds

    n_sites = len(set(sites))
    if n_sites >= 2:
        k = min(max(2, round(1 / VALIDATION_SHARE)), n_sites)
        return site_folds(patients, sites, labels, k, seed) == 0, True
    if len(patients) < 2:
        raise InvalidInput("one patient to train on: too few to hold some out for validation")
    rng = np.random.default_rng(seed)
    chosen = rng.permutation(len(patients))[: max(1, round(len(patients) * VALIDATION_SHARE))]
    mask = np.zeros(len(patients), bool)
    mask[chosen] = True
    return mask, False


def _train_on(
    cohort: CohortBags,
    patients: Sequence[str],
    settings: TrainSettings,
    data: Any,
    progress: Any,
) -> tuple[Any, dict[str, Any]]:
    """A head trained on the bags of ``patients``, a site-aware part validating it."""
    from services.mil.train import train_mil

    row = {p: i for i, p in enumerate(cohort.patient_ids)}
    rows = [row[p] for p in patients]
    sites = [cohort.patient_site[p] for p in patients]
    validating, site_aware = validation_split(
        patients, sites, cohort.patient_labels[rows], settings.seed
    )
    held = {p for p, v in zip(patients, validating, strict=True) if v}
    mine = set(patients)
    train_idx = [i for i, p in enumerate(cohort.patients) if p in mine and p not in held]
    val_idx = [i for i, p in enumerate(cohort.patients) if p in held]
    model = train_mil(
        [cohort.bags[i] for i in train_idx],
        cohort.labels[train_idx],
        [cohort.bags[i] for i in val_idx],
        cohort.labels[val_idx],
        head=settings.head,
        epochs=settings.epochs,
        lr=settings.lr,
        patience=settings.patience,
        seed=settings.seed,
        threads=settings.threads,
        head_options=settings.head_options,
        progress=progress,
        tasks=cohort.tasks,
        data=data,
    )
    facts = {
        "train_patients": len(mine) - len(held),
        "validation_patients": len(held),
        "validation_sites": sorted({cohort.patient_site[p] for p in held}),
        "validation_by_site": site_aware,
        "best_epoch": model.training["best_epoch"],
        "epochs_run": len(model.training["history"]),
    }
    return model, facts


def cross_validate(cohort: CohortBags, k: int, settings: TrainSettings, quiet: bool) -> OutOfFold:
    """Site-aware k-fold cross-validation by patient (module docstring)."""
    from services.mil.folds import site_folds

    sites = [cohort.patient_site[p] for p in cohort.patient_ids]
    patient_fold = site_folds(cohort.patient_ids, sites, cohort.patient_labels, k, settings.seed)
    fold_of = dict(zip(cohort.patient_ids, patient_fold.tolist(), strict=True))
    bag_fold = np.array([fold_of[p] for p in cohort.patients], np.int64)
    logits = np.full((len(cohort.bags), len(cohort.tasks)), np.nan)
    temperatures = np.ones((k, len(cohort.tasks)))
    folds: list[dict[str, Any]] = []
    for f in range(k):
        began = time.perf_counter()
        training = [p for p in cohort.patient_ids if fold_of[p] != f]
        with _epoch_bar(f"fold {f + 1}/{k}", quiet) as bar:
            model, facts = _train_on(cohort, training, settings, None, bar)
        held_out = np.flatnonzero(bag_fold == f)
        for i in held_out:
            logits[i] = model.logits(cohort.bags[i])
        temperatures[f] = model.temperatures
        facts = {
            "fold": f,
            "sites": sorted({cohort.patient_site[p] for p, g in fold_of.items() if g == f}),
            "patients": sum(1 for g in fold_of.values() if g == f),
            "bags": len(held_out),
            **facts,
            "temperatures": dict(zip(cohort.tasks, model.temperatures, strict=True)),
            "seconds": round(time.perf_counter() - began, 2),
        }
        folds.append(facts)
        if not quiet:
            print(
                f"fold {f + 1}/{k}: held out {facts['patients']} patients at "
                f"{', '.join(facts['sites'])}; trained on {facts['train_patients']}, validated "
                f"on {facts['validation_patients']} at {', '.join(facts['validation_sites'])}; "
                f"best epoch {facts['best_epoch']}, {facts['seconds']} s",
                file=sys.stderr,
                flush=True,
            )
    return OutOfFold(bag_fold, logits, temperatures, folds)


# --- scores ----------------------------------------------------------------------------


def per_patient(cohort: CohortBags, values: np.ndarray) -> np.ndarray:
    """(patients, tasks): the mean of each patient's bags' rows of ``values``."""
    row = {p: i for i, p in enumerate(cohort.patient_ids)}
    index = np.array([row[p] for p in cohort.patients])
    sums = np.zeros((len(cohort.patient_ids), values.shape[1]))
    np.add.at(sums, index, values)
    return sums / np.bincount(index, minlength=len(cohort.patient_ids))[:, None]


def _calibration_scores(p: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(ECE, NLL) of binary probabilities ``p`` against 0/1 labels ``y``."""
    from services.inference.calibration import scores

    q = np.clip(p, _EPSILON, 1 - _EPSILON)
    found = scores(np.log(np.stack([1 - q, q], axis=1)), y.astype(np.int64))
    return found.ece, found.nll


def cv_table(
    tasks: Sequence[str],
    labels: np.ndarray,
    raw: np.ndarray,
    calibrated: np.ndarray,
    resamples: int,
    seed: int,
) -> list[dict[str, Any]]:
    """Per task: n, positives, AUROC with its bootstrap interval, ECE and NLL before
    and after temperature scaling; arrays are (patients, tasks), labels NaN = unknown."""
    from services.mil.folds import bootstrap_ci

    rows = []
    for t, task in enumerate(tasks):
        known = ~np.isnan(labels[:, t])
        y = labels[known, t]
        n, positives = int(known.sum()), int((y == 1).sum())
        row: dict[str, Any] = {"biomarker": task, "n": n, "positives": positives}
        row.update(dict.fromkeys((*_AUROC_KEYS, *_CALIBRATION_KEYS), math.nan))
        if 0 < positives < n:
            row["auroc"], row["ci_low"], row["ci_high"] = bootstrap_ci(
                y, calibrated[known, t], n=resamples, seed=seed
            )
        if n:
            row["ece_before"], row["nll_before"] = _calibration_scores(raw[known, t], y)
            row["ece_after"], row["nll_after"] = _calibration_scores(calibrated[known, t], y)
        rows.append(row)
    return rows


def _number(value: float, digits: int = 3) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def cv_markdown(table: list[dict[str, Any]], folds: list[dict[str, Any]], header: str) -> str:
    """The cross-validation table and the folds as Markdown."""
    lines = [
        header,
        "",
        "| biomarker | n | positives | AUROC | 95% CI | ECE before | ECE after "
        "| NLL before | NLL after |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in table:
        ci = (
            f"{_number(r['ci_low'])}-{_number(r['ci_high'])}" if math.isfinite(r["ci_low"]) else "-"
        )
        lines.append(
            f"| {r['biomarker']} | {r['n']} | {r['positives']} | {_number(r['auroc'])} | {ci} "
            f"| {_number(r['ece_before'])} | {_number(r['ece_after'])} "
            f"| {_number(r['nll_before'])} | {_number(r['nll_after'])} |"
        )
    lines += [
        "",
        "| fold | held-out sites | patients | validation sites | best epoch | seconds |",
        "|---:|---|---:|---|---:|---:|",
    ]
    for f in folds:
        lines.append(
            f"| {f['fold']} | {', '.join(f['sites'])} | {f['patients']} "
            f"| {', '.join(f['validation_sites'])} | {f['best_epoch']} | {f['seconds']} |"
        )
    return "\n".join(lines) + "\n"


# --- mil train -------------------------------------------------------------------------


def _settings(args: argparse.Namespace) -> TrainSettings:
    options: dict[str, Any] = {}
    if args.hidden_dim is not None:
        options["hidden_dim"] = args.hidden_dim
    settings = TrainSettings(
        head=args.head,
        epochs=args.epochs,
        lr=args.lr,
        patience=args.patience,
        seed=args.seed,
        threads=args.threads,
        head_options=options,
    )
    settings.check()
    return settings


def _synthetic(args: argparse.Namespace, patients: Sequence[str]) -> bool | None:
    """Synthetic or real slides: the flags, else the ids (``SYN-`` or ``TCGA-``)."""
    if args.synthetic:
        return True
    if args.real:
        return False
    if patients and all(p.upper().startswith("SYN-") for p in patients):
        return True
    if patients and all(p.upper().startswith("TCGA-") for p in patients):
        return False
    return None


def _command(args: argparse.Namespace) -> str:
    """The ``histomarker mil train`` line that reproduces this run."""
    words = ["histomarker", "mil", "train", args.manifest, args.bags, args.out]
    words += ["--head", args.head, "--folds", str(args.folds), "--epochs", str(args.epochs)]
    words += ["--lr", repr(args.lr), "--patience", str(args.patience), "--seed", str(args.seed)]
    words += ["--bootstrap", str(args.bootstrap)]
    for flag, value in (
        ("--encoder", args.encoder),
        ("--hidden-dim", args.hidden_dim),
        ("--max-patches", args.max_patches or None),
        ("--threads", args.threads or None),
        ("--cohort-name", args.cohort_name),
    ):
        if value is not None:
            words += [flag, str(value)]
    for flag, on in (
        ("--patient-level", args.patient_level),
        ("--synthetic", args.synthetic),
        ("--real", args.real),
    ):
        if on:
            words.append(flag)
    return shlex.join(words)


def _encoder_entry(cohort: CohortBags) -> dict[str, Any]:
    """The encoder as a model card states it; licence and source from the registry."""
    from services.encoders.registry import ENCODERS

    spec = ENCODERS.get(cohort.encoder)
    return {
        "name": cohort.encoder,
        "sha256": cohort.encoder_sha256,
        "licence": spec.licence if spec else "unknown: not a registered encoder",
        "source": spec.source if spec else "",
        "embed_dim": cohort.feature_dim,
        "weights": "random" if not cohort.encoder_sha256 else "local file (sha256 above)",
    }


def run_train(args: argparse.Namespace) -> dict[str, Any]:
    """``histomarker mil train``: cross-validate, fit, and write OUT (module docstring)."""
    from services.cohort.manifest import Manifest
    from services.common.progress import ProgressBar
    from services.mil.cohort_bags import load_cohort_bags
    from services.mil.model import TrainingData

    began = time.perf_counter()
    settings = _settings(args)
    if args.folds < 2:
        raise InvalidInput(f"--folds must be >= 2, got {args.folds}")
    if args.bootstrap < 0:
        raise InvalidInput(f"--bootstrap must be >= 0, got {args.bootstrap}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InvalidInput(f"OUT {out} is a file; give a folder")
    quiet = bool(args.json)
    manifest = Manifest.read(args.manifest)
    _check_sites(manifest.table, args.folds)
    cohort = load_cohort_bags(
        manifest,
        args.bags,
        encoder=args.encoder,
        patient_level=args.patient_level,
        max_patches=args.max_patches,
        seed=args.seed,
        progress=None if quiet else ProgressBar("read bags", "bags"),
    )
    skipped = cohort.skipped_summary()
    if not quiet:
        for reason, what in skipped.items():
            print(
                f"skipped {what['count']} slide(s), {reason}: {', '.join(what['first'])}"
                + (" ..." if int(what["count"]) > len(what["first"]) else ""),
                file=sys.stderr,
            )
    sites = sorted(set(cohort.patient_site.values()))
    cohort_name = args.cohort_name or Path(args.manifest).resolve().parent.name
    synthetic = _synthetic(args, cohort.patient_ids)
    oof = cross_validate(cohort, args.folds, settings, quiet)

    raw = per_patient(cohort, oof.probabilities(calibrated=False))
    calibrated = per_patient(cohort, oof.probabilities(calibrated=True))
    table = cv_table(
        cohort.tasks, cohort.patient_labels, raw, calibrated, args.bootstrap, args.seed
    )

    data = TrainingData(
        cohort=cohort_name,
        synthetic=synthetic,
        sites=tuple(sites),
        n_slides=cohort.n_slides,
        n_patients=len(cohort.patient_ids),
    )
    with _epoch_bar("final model", quiet) as bar:
        model, final = _train_on(cohort, cohort.patient_ids, settings, data, bar)

    model.grid_overlap = _grid_overlap(cohort.bags)
    out.mkdir(parents=True, exist_ok=True)
    model_path = model.save(out / f"mil_{args.head}.pt")
    _write_oof(out / "oof_predictions.csv", cohort, oof)
    figures = _reliability(out, cohort, raw, calibrated)
    level = "patient" if args.patient_level else "slide"
    header = (
        f"# Out-of-fold MIL: {args.head} on {cohort.encoder} embeddings\n\n"
        f"Cohort {cohort_name} ({_kind(synthetic)}): {len(cohort.patient_ids)} patients, "
        f"{cohort.n_slides} slides, {len(sites)} sites; one bag per {level}; "
        f"{args.folds} site-aware folds by patient (seed {args.seed}). AUROC of the "
        f"calibrated out-of-fold probability per patient, percentile bootstrap over "
        f"patients ({args.bootstrap} resamples); ECE and NLL before and after each fold's "
        "temperatures, on its held-out patients."
    )
    markdown = cv_markdown(table, oof.folds, header)
    _write_text(out / "cv.md", markdown)
    command = _command(args)
    card = model.model_card()
    card["file"] = model_path.name
    card["encoder"] = _encoder_entry(cohort)
    card["training_data"].update(
        manifest=str(Path(args.manifest).resolve()),
        bags=str(cohort.folder.resolve()),
        bag_level=level,
        skipped=skipped,
        final_split=final,
    )
    card["cross_validation"] = {
        "folds": args.folds,
        "seed": args.seed,
        "unit": "patient",
        "bootstrap_resamples": args.bootstrap,
        "table": table,
        "per_fold": oof.folds,
    }
    card["intended_use"] = (
        "research: biomarker status from H&E bags of this encoder; not for diagnosis"
        + (
            "; trained on synthetic slides, so it checks wiring and says nothing about real H&E"
            if synthetic
            else ""
        )
    )
    card["command"] = command
    # The card is written last: a run that stops earlier leaves no card to trust.
    _write_text(out / "model_card.json", json.dumps(_finite(card), indent=2, default=str) + "\n")
    return _finite(
        {
            "out": str(out),
            "model": str(model_path),
            "head": args.head,
            "encoder": card["encoder"],
            "cohort": {
                "name": cohort_name,
                "synthetic": synthetic,
                "patients": len(cohort.patient_ids),
                "slides": cohort.n_slides,
                "bags": len(cohort.bags),
                "sites": sites,
            },
            "skipped": skipped,
            "cross_validation": table,
            "folds": oof.folds,
            "final_model": {
                **final,
                "temperatures": dict(zip(model.tasks, model.temperatures, strict=True)),
            },
            "files": sorted(
                str(p)
                for p in (
                    model_path,
                    out / "oof_predictions.csv",
                    out / "cv.md",
                    out / "model_card.json",
                    *figures.values(),
                )
            ),
            "markdown": markdown,
            "command": command,
            "seconds": round(time.perf_counter() - began, 1),
        }
    )


def _grid_overlap(bags: Sequence[Any]) -> float:
    """The median grid overlap of the training bags (0 when none says): prediction
    tiles a new slide the same way."""
    from services.mil.bags import grid_overlap

    found = [o for o in (grid_overlap(b) for b in bags) if o is not None]
    return round(float(np.median(found)), 2) if found else 0.0


def _check_sites(table: Any, folds: int) -> None:
    """InvalidInput before any bag is read when the cancer slides span too few sites."""
    from services.mil.folds import patient_sites

    cancer = table[table["kind"] == "cancer"]
    n_sites = len(set(patient_sites(cancer).values())) if len(cancer) else 0
    if n_sites < folds:
        raise InvalidInput(
            f"the manifest's cancer slides come from {n_sites} site(s), fewer than "
            f"--folds {folds}: site-aware folds need a site per fold; lower --folds"
        )


def print_train(result: dict[str, Any]) -> None:
    """The cross-validation table and where the files went."""
    print(result["markdown"])
    print(f"model: {result['model']}")
    print(f"files: {len(result['files'])} in {result['out']} ({result['seconds']} s)")


def _kind(synthetic: bool | None) -> str:
    return {True: "synthetic", False: "real H&E", None: "not stated"}[synthetic]


def _write_oof(path: Path, cohort: CohortBags, oof: OutOfFold) -> None:
    raw = oof.probabilities(calibrated=False)
    calibrated = oof.probabilities(calibrated=True)
    header = ["bag_id", "patient_id", "slide_ids", "fold", "site"]
    for task in cohort.tasks:
        header += [f"{task}_label", f"{task}_probability", f"{task}_uncalibrated"]
    rows = []
    for i, bag_id in enumerate(cohort.ids):
        patient = cohort.patients[i]
        row: list[Any] = [
            bag_id,
            patient,
            ";".join(cohort.slides[i]),
            int(oof.fold[i]),
            cohort.patient_site[patient],
        ]
        for t in range(len(cohort.tasks)):
            label = cohort.labels[i, t]
            row += ["" if np.isnan(label) else int(label), f"{calibrated[i, t]:.6g}"]
            row.append(f"{raw[i, t]:.6g}")
        rows.append(row)
    with _atomic(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def _reliability(
    out: Path, cohort: CohortBags, raw: np.ndarray, calibrated: np.ndarray
) -> dict[str, Path]:
    """``reliability_<task>.png``: out-of-fold reliability before and after T."""
    from services.inference.calibration import reliability_diagram

    figures = {}
    for t, task in enumerate(cohort.tasks):
        known = ~np.isnan(cohort.patient_labels[:, t])
        if not known.any():
            continue
        figures[task] = reliability_diagram(
            {
                "before temperature scaling": raw[known, t],
                "after (each fold's T)": calibrated[known, t],
            },
            cohort.patient_labels[known, t].astype(np.int64),
            out / f"reliability_{task}.png",
            title=f"{task}: out-of-fold, {int(known.sum())} patients",
        )
    return figures


# --- mil predict -----------------------------------------------------------------------


def run_predict(args: argparse.Namespace) -> dict[str, Any]:
    """``histomarker mil predict``: six calibrated calls for one bag, and attention."""
    from services.mil.bags import read_bag
    from services.mil.model import FittedMIL

    attention_path = Path(args.attention) if args.attention else None
    if attention_path is not None and attention_path.suffix.lower() != ".csv":
        raise InvalidInput(f"--attention writes a .csv table, got {attention_path.name}")
    began = time.perf_counter()
    model = FittedMIL.load(args.model)
    loaded = time.perf_counter()
    bag = read_bag(args.bag)
    try:
        model.check_bag(bag)
    except InvalidInput as exc:
        raise InvalidInput(f"{args.bag} does not fit model {args.model}: {exc}") from None
    prediction = model.predict_bag(bag)
    seconds = time.perf_counter() - loaded
    calls = {
        task: {
            "probability": round(p, 6),
            "call": "positive" if p >= CALL_THRESHOLD else "negative",
            "logit": round(prediction.logits[task], 6),
        }
        for task, p in prediction.probabilities.items()
    }
    result: dict[str, Any] = {
        "slide_id": bag.slide_id,
        "patches": bag.n_patches,
        "encoder": {"name": bag.encoder, "sha256": bag.encoder_sha256},
        "model": {
            "file": str(args.model),
            "head": model.head_name,
            "cohort": model.training_data.get("cohort"),
            "synthetic": model.training_data.get("synthetic"),
        },
        "threshold": CALL_THRESHOLD,
        "calls": calls,
        "seconds": round(seconds, 4),
        "load_seconds": round(loaded - began, 4),
    }
    if attention_path is not None:
        result["attention"] = str(write_attention(attention_path, bag, prediction.attention))
    return result


def write_attention(path: Path, bag: Any, attention: dict[str, np.ndarray]) -> Path:
    """The CSV of ``export geojson --attention``: x, y, width, height (level-0 px) and
    one attention column per biomarker, one row per patch."""
    side_px = bag.patch_px * bag.patch_mpp / bag.level0_mpp
    if not (math.isfinite(side_px) and side_px > 0):
        raise InvalidInput(f"bag {bag.slide_id}: no level-0 resolution to place its patches")
    tasks = list(attention)
    with _atomic(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["x", "y", "width", "height", *tasks])
        side = f"{side_px:.6g}"
        columns = [attention[t] for t in tasks]
        for i, (x, y) in enumerate(bag.coords.tolist()):
            writer.writerow([x, y, side, side, *(f"{c[i]:.6g}" for c in columns)])
    return path


def print_predict(result: dict[str, Any]) -> None:
    """The six calls as a small table."""
    print(
        f"slide {result['slide_id']}: {result['patches']} patches of "
        f"{result['encoder']['name']} embeddings, {result['model']['head']} head, "
        f"{result['seconds']:.3f} s"
    )
    print(f"{'biomarker':<10}{'probability':>12}  call (>= {result['threshold']})")
    for task, call in result["calls"].items():
        print(f"{task:<10}{call['probability']:>12.3f}  {call['call']}")
    if result["model"].get("synthetic"):
        print("note: the model was trained on synthetic slides")
    if "attention" in result:
        print(f"attention: {result['attention']}")


# --- helpers ---------------------------------------------------------------------------


@contextlib.contextmanager
def _epoch_bar(label: str, quiet: bool) -> Iterator[Any]:
    """A progress bar over epochs that ends its line even when training stops early."""
    if quiet:
        yield None
        return
    from services.common.progress import ProgressBar

    bar = ProgressBar(label, "epochs")
    seen = [0, 0]

    def report(done: int, total: int) -> None:
        seen[:] = [done, total]
        bar(done, total)

    yield report
    done, total = seen
    if 0 < done < total:  # stopped early: the bar's line is still open
        bar(done, done)


@contextlib.contextmanager
def _atomic(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path``, renamed onto it when the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_text(path: Path, text: str) -> None:
    with _atomic(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _finite(value: Any) -> Any:
    """``value`` with NaN and infinities as None (JSON has no NaN), numpy as Python."""
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
