"""The ``histomarker`` command.

Every subcommand prints a readable summary, or one JSON document with ``--json``.
Bad input exits with status 2 and one readable line on standard error; a subcommand
whose implementation has not landed yet says so the same way.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services import __version__
from services.common.errors import HistomarkerError

if TYPE_CHECKING:
    from services.inference.served_models import ServingSettings

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2

# Errors that mean the request itself cannot be served as given: exit 2. The others
# (a dependency down, a deadline) are failures of the run: exit 1.
_BAD_INPUT_STATUSES = frozenset(
    {
        "INVALID_ARGUMENT",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "FAILED_PRECONDITION",
        "UNIMPLEMENTED",
        "UNAUTHENTICATED",
    }
)

Handler = Callable[[argparse.Namespace], dict[str, Any]]


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line and exit 2."""

    def error(self, message: str) -> Any:
        raise _UsageError(f"{self.prog}: {message}")


class _UsageError(Exception):
    pass


def _add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def _demo(args: argparse.Namespace) -> dict[str, Any]:
    from services.apps.demo import run_demo

    return run_demo(
        out_dir=args.out,
        progress=not args.json,
        scale=args.scale,
        require_targets=args.require_targets,
    )


def _synth(args: argparse.Namespace) -> dict[str, Any]:
    from services.synth.cohort import generate_cohort

    return generate_cohort(
        args.out,
        args.slides,
        args.seed,
        args.preset,
        truth_crops=args.truth_crops,
        progress=not args.json,
        overwrite=args.overwrite,
    )


def _tile(args: argparse.Namespace) -> dict[str, Any]:
    from services.tiling.cli_tile import run_tile

    return run_tile(args)


def _qc(args: argparse.Namespace) -> dict[str, Any]:
    from services.tiling.cli_qc import run_qc_command

    return run_qc_command(args)


def _print_qc(result: dict[str, Any]) -> None:
    from services.tiling.cli_qc import print_qc

    print_qc(result)


def _normalize(args: argparse.Namespace) -> dict[str, Any]:
    from services.slide.images import read_image, write_png
    from services.slide.stain import normalize_image

    image = read_image(args.image)
    reference = read_image(args.reference)
    normalized = normalize_image(image, reference, method=args.method)
    write_png(args.out, normalized)
    return {
        "out": args.out,
        "method": args.method,
        "width": int(normalized.shape[1]),
        "height": int(normalized.shape[0]),
    }


def _nuclei(args: argparse.Namespace) -> dict[str, Any]:
    from services.nuclei.cli_nuclei import run_nuclei

    return run_nuclei(args)


def _evaluate_nuclei(args: argparse.Namespace) -> dict[str, Any]:
    from services.common.progress import ProgressBar
    from services.nuclei.evaluate import evaluate_index

    progress = None if args.json else ProgressBar("evaluate nuclei", "images")
    weights = Path(args.weights) if args.weights else None
    return evaluate_index(args.index, args.method, weights, progress)


def _print_evaluation(result: dict[str, Any]) -> None:
    from services.nuclei.evaluate import format_table

    print(format_table(result))


def _metrics(args: argparse.Namespace) -> dict[str, Any]:
    from services.analysis.cli_metrics import run_metrics

    return run_metrics(args)


def _analysis_compare(args: argparse.Namespace) -> dict[str, Any]:
    from services.analysis.comparison_report import run_compare

    return run_compare(
        args.paper,
        args.mil,
        args.out,
        manifest=args.manifest,
        resamples=args.bootstrap,
        seed=args.seed,
        as_json=args.json,
    )


def _cohort_import(args: argparse.Namespace) -> dict[str, Any]:
    from services.cohort.importer import import_cohort

    return import_cohort(
        args.slides,
        clinical=args.clinical,
        mutations=args.mutations,
        out=args.out,
        immune=args.immune,
        sequenced=args.sequenced,
        overwrite=args.overwrite,
        include_frozen=args.include_frozen,
        strict_her2=args.strict_her2,
        allow_unknown_values=args.allow_unknown_values,
    )


#: Examples shown per list in the readable summary (``--json`` has them all).
_SHOWN = 3


def _print_cohort_import(result: dict[str, Any]) -> None:
    """The import's summary in a few short lines; ``--json`` has every detail."""
    slides = result["slides"]
    print(f"manifest: {result['manifest']}")
    print(
        f"slides: {slides['cancer']} cancer, {slides['normal']} normal "
        f"({slides['files']} slide files, {slides['skipped']} skipped)"
    )
    for reason, count in list(result["skipped_by_reason"].items())[:_SHOWN]:
        print(f"  skipped: {count} {reason}")
    print("labels over the cancer slides (positive / negative / unknown):")
    for label, counts in result["labels"].items():
        known = counts["positive"] + counts["negative"]
        share = f"{counts['positive'] / known:.1%} positive" if known else "no known value"
        print(
            f"  {label:<7}{counts['positive']:>6} /{counts['negative']:>6} /"
            f"{counts['unknown']:>6}   {share}"
        )
    patients = result["patients"]
    print(
        f"patients: {patients['with_slides']} with slides, {patients['without_slide']} "
        "named by a table without a slide"
    )
    for report in result["inputs"]:
        labels = ", ".join(report["labels"]) or "ids only"
        print(
            f"  {Path(report['path']).name}: {report['used_rows']} of {report['rows']} rows "
            f"used, {report['patients']} patients ({labels})"
        )
    for line in result["warnings"]:
        print(f"warning: {line}")


def _serve(args: argparse.Namespace) -> dict[str, Any]:
    server_module = importlib.import_module(f"services.{args.service}.server")
    server_module.main()
    return {"service": args.service, "stopped": True}


def _up(args: argparse.Namespace) -> dict[str, Any]:
    from services.apps.local_stack.stack import (
        StackOptions,
        default_directory,
        default_model_store,
        run_up,
    )
    from services.common.settings import ServiceSettings

    directory = Path(args.dir).expanduser().resolve() if args.dir else default_directory()
    store_url = args.store_url or ServiceSettings().store_url
    model_store = Path(args.model_store).resolve() if args.model_store else None
    options = StackOptions(
        directory=directory,
        store_url=store_url,
        model_store=model_store or default_model_store(directory),
        free_ports=args.free_ports,
        skip=frozenset(args.skip),
        ready_timeout_s=args.timeout,
    )

    def report(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    return run_up(options, detach=args.detach, report=report)


def _down(args: argparse.Namespace) -> dict[str, Any]:
    from services.apps.local_stack.stack import default_directory, run_down

    directory = Path(args.dir).expanduser().resolve() if args.dir else default_directory()
    return run_down(directory, stop_timeout_s=args.timeout)


def _restart(args: argparse.Namespace) -> dict[str, Any]:
    from services.apps.local_stack.stack import default_directory, run_restart

    directory = Path(args.dir).expanduser().resolve() if args.dir else default_directory()

    def report(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    return run_restart(
        directory,
        args.component,
        report=report,
        ready_timeout_s=args.timeout,
    )


def _serving_settings(args: argparse.Namespace) -> tuple[ServingSettings, str | None]:
    """The store and TorchServe ``histomarker models`` works on, and where TorchServe's
    address came from (None when nothing named one).

    ``--dir``: the stack running there. Else ``--management-url`` or
    ``HISTOMARKER_TORCHSERVE_MANAGEMENT_URL`` (with the other ``HISTOMARKER_*``
    settings). Else the stack running in the default folder, if one does. Else the
    environment's settings and defaults. ``--store-url``, ``--management-url``,
    ``--key-file`` and ``--model-store`` override each.
    """
    from services.apps.local_stack.stack import default_directory, stack_serving_settings
    from services.common.errors import FailedPrecondition
    from services.inference.served_models import ServingSettings

    source: str | None
    if args.dir:
        directory = Path(args.dir).expanduser().resolve()
        settings = stack_serving_settings(directory)
        source = f"the stack in {directory}"
    elif args.management_url or "HISTOMARKER_TORCHSERVE_MANAGEMENT_URL" in os.environ:
        settings = ServingSettings()
        source = "--management-url" if args.management_url else "the environment"
    else:
        try:
            settings = stack_serving_settings(default_directory())
            source = f"the stack in {default_directory()}"
        except FailedPrecondition:
            settings, source = ServingSettings(), None
    overrides: dict[str, Any] = {}
    if args.store_url:
        overrides["store_url"] = args.store_url
    if args.management_url:
        overrides["torchserve_management_url"] = args.management_url
    if args.key_file:
        overrides["torchserve_key_file"] = Path(args.key_file).expanduser().resolve()
    if args.model_store:
        overrides["torchserve_model_store"] = Path(args.model_store).expanduser().resolve()
    if overrides:
        settings = settings.model_copy(update=overrides)
    return settings, source


def _models(args: argparse.Namespace) -> dict[str, Any]:
    from services.common.errors import Unavailable
    from services.inference import served_models as served

    settings, source = _serving_settings(args)
    action = args.models_command
    origin = f"models {action}"
    with settings.open_store() as store:
        if action == "list":
            summary: dict[str, Any] = {"store_url": store.url, "torchserve": None}
            answer: dict[str, Any] | None = None
            if source is not None:
                summary["torchserve"] = settings.torchserve_management_url
                summary["torchserve_from"] = source
                client = settings.management_client()
                try:
                    answer = served.served_on_torchserve(client)
                except HistomarkerError as exc:
                    summary["torchserve_error"] = " ".join(str(exc).split())
                    summary["ok"] = False
                finally:
                    client.close()
            return {**summary, "models": served.models_overview(store, answer)}
        client = settings.management_client()
        model_store = settings.torchserve_model_store
        try:
            if source is None:  # only the defaults: say where it looked
                try:
                    client.json("GET", "/models?limit=1")
                except Unavailable as exc:
                    raise Unavailable(
                        f"{exc}; no stack runs in the default folder: give --dir, "
                        "--management-url or HISTOMARKER_TORCHSERVE_MANAGEMENT_URL"
                    ) from exc
            if action == "restore":
                report = served.restore_served(
                    client, store, model_store, ready_timeout_s=args.timeout
                )
                for problem in report.problems:
                    print(f"histomarker models restore: warning: {problem}", file=sys.stderr)
                return {"store_url": store.url, **report.to_json()}
            before = served.read_record(store, args.name)
            if action == "deploy":
                record = served.deploy_version(
                    client,
                    store,
                    model_store,
                    args.name,
                    args.version,
                    source=origin,
                    ready_timeout_s=args.timeout,
                )
            else:
                record = served.rollback_model(
                    client,
                    store,
                    model_store,
                    args.name,
                    source=origin,
                    ready_timeout_s=args.timeout,
                )
            served_now = served.registered_versions(client, args.name)
        finally:
            client.close()
    return {
        "model": record.model,
        "version": record.version,
        "previous": before.version if before is not None else None,
        "record_key": record.key,
        "history": [old.version for old in record.history],
        "torchserve_versions": sorted(served_now),
    }


def _print_models(result: dict[str, Any]) -> None:
    """``histomarker models list`` as a table; the other actions as key: value lines."""
    if "models" not in result:
        _print_human(result)
        return
    print(f"store: {result['store_url']}")
    torchserve = result.get("torchserve")
    if torchserve is None:
        print("torchserve: none given (no stack running, no --dir or --management-url)")
    elif "torchserve_error" in result:
        print(f"torchserve: {torchserve}: {result['torchserve_error']}")
    else:
        print(f"torchserve: {torchserve}")
    rows = [("model", "recorded", "served", "in sync", "previous", "stored versions")]
    for model in result["models"]:
        in_sync = model.get("in_sync")
        rows.append(
            (
                model["name"],
                model["recorded"] or "-",
                (model.get("served") or "-") if "served" in model else "?",
                "?" if in_sync is None else ("yes" if in_sync else "NO"),
                ", ".join(model["history"]) or "-",
                ", ".join(model["stored_versions"]) or "-",
            )
        )
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(
                str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)
            ).rstrip()
        )


def _predict(args: argparse.Namespace) -> dict[str, Any]:
    from services.prediction.cli_predict import run_predict

    return run_predict(args)


def _add_predict_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stored", action="store_true", help="SLIDE is an object key")
    parser.add_argument("--slide-id", default="", help="id to give the slide")
    parser.add_argument(
        "--biomarker",
        action="append",
        default=[],
        metavar="NAME",
        help="tp53, pik3ca, er, pr, her2 or basal (repeatable; all six by default)",
    )
    parser.add_argument("--top-k", type=int, default=0, help="top patches per biomarker")
    parser.add_argument("--no-heatmaps", action="store_true", help="skip the heatmap PNGs")
    parser.add_argument("--timeout", type=float, default=3600.0, help="deadline, seconds")
    parser.add_argument(
        "--pipeline",
        choices=("paper", "mil"),
        default="",
        help="paper: patch CNNs on the cancer patches; mil: encoder + attention MIL "
        "(default: the service's)",
    )
    parser.add_argument(
        "--mil-model", default="", metavar="NAME", help="the MIL head (mil_<name>) to use"
    )
    parser.add_argument(
        "--bag",
        action="store_true",
        help="SLIDE is a stored bag (bags/<encoder>/<slide>.h5): MIL calls without pixels",
    )
    parser.add_argument(
        "--answer-out-of-distribution",
        action="store_true",
        help="make the calls even for a slide unlike the models' training slides",
    )
    parser.add_argument(
        "--geojson",
        action="store_true",
        help="also store the slide's objects as QuPath GeoJSON (tiles with probabilities "
        "or attention, CD/BD patches) beside the results; prints its key",
    )


def _export(args: argparse.Namespace) -> dict[str, Any]:
    from services.export.cli_export import run_export

    return run_export(args)


def _encoders(args: argparse.Namespace) -> dict[str, Any]:
    from services.mil.cli_embed import run_encoders

    return run_encoders(args)


def _print_encoders(result: dict[str, Any]) -> None:
    from services.mil.cli_embed import print_encoders

    print_encoders(result)


def _encoders_combine(args: argparse.Namespace) -> dict[str, Any]:
    from services.encoders.biomarker_cnns import (
        BIOMARKER_CNNS,
        bundles_by_biomarker,
        combine_bundles,
        sidecar_path,
    )
    from services.encoders.loading import effective_spec

    out = combine_bundles(bundles_by_biomarker(args.bundles), Path(args.out))
    spec = effective_spec(BIOMARKER_CNNS, out)
    return {
        "weights": str(out),
        "sidecar": str(sidecar_path(out)),
        "encoder": BIOMARKER_CNNS,
        **{k: v for k, v in spec.card().items() if k != "name"},
    }


def _embed(args: argparse.Namespace) -> dict[str, Any]:
    from services.mil.cli_embed import run_embed

    return run_embed(args)


def _add_embed_arguments(embed: argparse.ArgumentParser) -> None:
    embed.add_argument("slide", metavar="SLIDE", help="whole-slide image (or image with --mpp)")
    embed.add_argument("out", metavar="OUT.h5", help="the bag file to write")
    embed.add_argument("--encoder", required=True, help="encoder name (`histomarker encoders`)")
    embed.add_argument(
        "--weights", required=True, metavar="FILE", help="local weights (.safetensors/.bin/.pth)"
    )
    embed.add_argument("--mpp", type=float, help="microns per pixel, if the slide lacks it")
    embed.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    embed.add_argument("--batch", type=int, default=32, help="patches per forward pass")
    embed.add_argument(
        "--max-patches", type=int, default=0, help="sample at most this many patches (0: all)"
    )
    embed.add_argument("--slide-id", default="", help="id stored in the bag (default: file stem)")


def _mil_train(args: argparse.Namespace) -> dict[str, Any]:
    from services.mil.cli_mil import run_train

    return run_train(args)


def _print_mil_train(result: dict[str, Any]) -> None:
    from services.mil.cli_mil import print_train

    print_train(result)


def _mil_predict(args: argparse.Namespace) -> dict[str, Any]:
    from services.mil.cli_mil import run_predict

    return run_predict(args)


def _print_mil_predict(result: dict[str, Any]) -> None:
    from services.mil.cli_mil import print_predict

    print_predict(result)


def _mil_publish(args: argparse.Namespace) -> dict[str, Any]:
    from services.mil.cli_publish import run_publish

    return run_publish(args)


def _print_mil_publish(result: dict[str, Any]) -> None:
    from services.mil.cli_publish import print_publish

    print_publish(result)


def _add_mil_arguments(mil: argparse.ArgumentParser) -> None:
    mil_sub = mil.add_subparsers(dest="mil_command", metavar="ACTION", required=True)
    train = mil_sub.add_parser(
        "train", help="site-aware cross-validation, then a calibrated MIL head on all patients"
    )
    train.add_argument("manifest", metavar="MANIFEST", help="the cohort's manifest.csv")
    train.add_argument(
        "bags", metavar="BAGS", help="folder of <slide_id>.h5 bags, or one with bags/<encoder>/"
    )
    train.add_argument("out", metavar="OUT", help="folder for the model, card, table, figures")
    train.add_argument("--head", choices=["abmil", "transformer"], default="abmil")
    train.add_argument("--encoder", metavar="NAME", help="the encoder every bag must come from")
    train.add_argument("--folds", type=int, default=5, help="site-aware folds (default 5)")
    train.add_argument(
        "--patient-level", action="store_true", help="one bag per patient (its slides merged)"
    )
    train.add_argument("--epochs", type=int, default=40, help="most epochs per model")
    train.add_argument("--patience", type=int, default=8, help="epochs without a better loss")
    train.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate")
    train.add_argument("--hidden-dim", type=int, help="head width (default: the head's, 256)")
    train.add_argument(
        "--max-patches", type=int, default=0, help="patches kept per slide, at random (0: all)"
    )
    train.add_argument("--seed", type=int, default=0, help="seed of folds and training")
    train.add_argument("--threads", type=int, default=0, help="torch threads (0: its default)")
    train.add_argument(
        "--bootstrap", type=int, default=1000, metavar="N", help="resamples of the AUROC CI"
    )
    train.add_argument("--cohort-name", metavar="NAME", help="default: the manifest's folder")
    kind = train.add_mutually_exclusive_group()
    kind.add_argument("--synthetic", action="store_true", help="the slides are synthetic")
    kind.add_argument("--real", action="store_true", help="the slides are real H&E")
    train.set_defaults(handler=_mil_train, human=_print_mil_train)
    predict = mil_sub.add_parser("predict", help="six calibrated calls for one bag")
    predict.add_argument("model", metavar="MODEL", help="a `mil train` model (mil_<head>.pt)")
    predict.add_argument("bag", metavar="BAG.h5", help="the slide's bag (`histomarker embed`)")
    predict.add_argument(
        "--attention",
        metavar="OUT.csv",
        help="write per-patch attention: x, y, width, height and one column per biomarker",
    )
    predict.set_defaults(handler=_mil_predict, human=_print_mil_predict)
    publish = mil_sub.add_parser(
        "publish", help="a head and its encoder into the store, for `models deploy`"
    )
    publish.add_argument("model", metavar="MODEL", help="a `mil train` model (mil_<head>.pt)")
    publish.add_argument(
        "--weights", required=True, metavar="FILE", help="the encoder weights it was trained on"
    )
    publish.add_argument("--name", default="", help="served as mil_<name> (default: the head's)")
    publish.add_argument("--version", default="", help="default: 12 hex digits of each sha256")
    publish.add_argument("--tiny", action="store_true", help="the encoder's tiny test variant")
    publish.add_argument("--store-url", help="object store (default: HISTOMARKER_STORE_URL)")
    publish.set_defaults(handler=_mil_publish, human=_print_mil_publish)
    for action in (train, predict, publish):
        _add_json_flag(action)


def _add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "result",
        nargs="?",
        metavar="RESULT",
        help="a prediction: its folder (runs/predictions/<slide>/<hash>/ in the store), "
        "its prediction.json, or a saved `histomarker predict --json` answer",
    )
    parser.add_argument("out", metavar="OUT.geojson", help="the GeoJSON file to write")
    parser.add_argument(
        "--what",
        metavar="PARTS",
        help="comma-separated: heatmap, cd-bd, nuclei, attention (default: every part "
        "whose input is given)",
    )
    parser.add_argument(
        "--biomarker",
        metavar="NAME",
        help="only this biomarker's BD patches, and tiles classed by it (tp53, pik3ca...)",
    )
    parser.add_argument(
        "--bd-confidence",
        type=float,
        metavar="P",
        help="calibrated confidence of a BD patch (default 0.9)",
    )
    parser.add_argument(
        "--nuclei", metavar="LABELS.tif", help="a `histomarker nuclei --labels` image"
    )
    parser.add_argument(
        "--features",
        metavar="TABLE",
        help="per-nucleus table with a label column, or the `histomarker nuclei --json` answer",
    )
    parser.add_argument(
        "--nuclei-origin",
        default="0,0",
        metavar="X,Y",
        help="level-0 px of the label image's top-left corner (default 0,0)",
    )
    parser.add_argument(
        "--nuclei-downsample",
        type=float,
        default=1.0,
        metavar="D",
        help="level-0 px per label px (default 1; 0.5 for 40x labels of a 20x slide)",
    )
    parser.add_argument(
        "--attention", metavar="TABLE", help="per-patch values: columns x, y and one per value"
    )
    parser.add_argument(
        "--patch-size", type=float, metavar="PX", help="attention patch side, level-0 px"
    )
    parser.add_argument("--slide-id", default="", help="slide id in the object ids")


def _flows_serve(args: argparse.Namespace) -> dict[str, Any]:
    from flows.runtime.deployments import serve, serve_options

    options = serve_options(
        cron=args.cron,
        interval_s=args.interval_s,
        manifest_path=args.manifest,
        cohort_name=args.cohort,
        task_runner=args.task_runner,
        dask_address=args.dask_address,
    )
    return serve(options, report=lambda line: print(line, file=sys.stderr, flush=True))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``histomarker`` command with every subcommand."""
    parser = _Parser(
        prog="histomarker",
        description=(
            "Predict TP53, PIK3CA, ER, PR, HER2 and Basal status from breast-cancer H&E "
            "whole-slide images, and explain the calls with nucleus features."
        ),
    )
    parser.add_argument("--version", action="version", version=f"histomarker {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    synth = sub.add_parser("synth", help="make a synthetic cohort with ground truth")
    synth.add_argument("out", metavar="OUT", help="output folder")
    synth.add_argument("--slides", type=int, default=8, help="number of slides")
    synth.add_argument("--seed", type=int, default=0, help="random seed")
    synth.add_argument("--preset", choices=["tiny", "demo", "small", "standard"], default="tiny")
    synth.add_argument("--truth-crops", type=int, default=4, help="40x crops with nucleus truth")
    synth.add_argument("--overwrite", action="store_true", help="replace an existing cohort")
    synth.set_defaults(handler=_synth)

    tile = sub.add_parser("tile", help="tissue mask, patch grid and normalized patches")
    tile.add_argument("slide", metavar="SLIDE", help="whole-slide image file")
    tile.add_argument("out", metavar="OUT", help="output folder")
    tile.add_argument("--mpp", type=float, help="microns per pixel, if the slide lacks it")
    tile.add_argument("--magnification", type=float, default=20.0, help="patch magnification")
    tile.add_argument("--patch-size", type=int, default=512, help="patch side, px")
    tile.add_argument("--min-tissue", type=float, default=0.5, help="least tissue share")
    tile.add_argument("--overlap", type=int, default=0, help="patch overlap, px")
    tile.add_argument(
        "--reference",
        default="none",
        metavar="NAME|IMAGE|none",
        help="stain reference: a stored name, an image file, or none (no normalization)",
    )
    tile.add_argument("--method", default="vahadane", choices=["vahadane", "macenko", "reinhard"])
    tile.add_argument("--format", default="jpeg", choices=["jpeg", "png"], dest="image_format")
    tile.set_defaults(handler=_tile)

    qc = sub.add_parser("qc", help="tissue, ink, blur, fold and edge masks with a verdict")
    qc.add_argument("slide", metavar="SLIDE", help="slide or image file, or a folder of them")
    qc.add_argument("out", metavar="OUT", help="output folder")
    qc.add_argument(
        "--mpp", type=float, help="microns per pixel of the file (needed when it has none)"
    )
    qc.set_defaults(handler=_qc, human=_print_qc)

    normalize = sub.add_parser("normalize", help="Vahadane stain normalization of an image")
    normalize.add_argument("image", metavar="IMAGE")
    normalize.add_argument("--reference", required=True, metavar="REF")
    normalize.add_argument("--out", required=True, metavar="OUT.png")
    normalize.add_argument(
        "--method", default="vahadane", choices=["vahadane", "macenko", "reinhard"]
    )
    normalize.set_defaults(handler=_normalize)

    nuclei = sub.add_parser("nuclei", help="nuclei segmentation and the 75 patch features")
    nuclei.add_argument("image", metavar="IMAGE", help="RGB patch: PNG, JPEG or TIFF")
    nuclei.add_argument(
        "--mpp", type=float, default=0.25, help="microns per pixel (default 0.25, i.e. 40x)"
    )
    nuclei.add_argument(
        "--labels", metavar="OUT.tif", help="write the instance labels here (uint16/uint32 TIFF)"
    )
    nuclei.add_argument(
        "--method",
        default="unet",
        choices=["unet", "phoulady", "otsu"],
        help="unet (default, trained on real H&E), phoulady (the paper's) or otsu (baseline)",
    )
    nuclei.set_defaults(handler=_nuclei)

    evaluate = sub.add_parser("evaluate", help="score a method on your own annotated tiles")
    evaluate_sub = evaluate.add_subparsers(dest="evaluate_command", metavar="WHAT", required=True)
    evaluate_nuclei = evaluate_sub.add_parser(
        "nuclei", help="nuclei segmentation against annotated nuclei: F1, AJI, Dice, PQ"
    )
    evaluate_nuclei.add_argument(
        "index",
        metavar="INDEX.csv",
        help="columns name, organ, image, instances, binary, mpp (paths relative to it)",
    )
    evaluate_nuclei.add_argument(
        "--method", default="unet", choices=["unet", "phoulady", "otsu"], help="default: unet"
    )
    evaluate_nuclei.add_argument("--weights", help="another U-Net weights file (unet only)")
    evaluate_nuclei.set_defaults(handler=_evaluate_nuclei, human=_print_evaluation)
    _add_json_flag(evaluate_nuclei)

    metrics = sub.add_parser("metrics", help="AUROC, AUPRC and MCC-F1, patch and slide level")
    metrics.add_argument("table", metavar="TABLE.csv", help="patch table: CSV, TSV or parquet")
    metrics.add_argument(
        "--aggregate", choices=["mean", "median", "topk"], default="mean", help="slide score"
    )
    metrics.add_argument("--top-k", type=int, default=10, help="patches averaged by topk")
    metrics.add_argument("--bootstrap", type=int, default=1000, metavar="N", help="resamples")
    metrics.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    metrics.set_defaults(handler=_metrics)

    analysis = sub.add_parser("analysis", help="analyses of held-out predictions")
    analysis_sub = analysis.add_subparsers(dest="analysis_command", metavar="ACTION", required=True)
    compare = analysis_sub.add_parser(
        "compare", help="the paper's pipeline and MIL on the same held-out patients, with CIs"
    )
    compare.add_argument("paper", metavar="PAPER.csv", help="the paper pipeline's predictions")
    compare.add_argument("mil", metavar="MIL.csv", help="the MIL pipeline's predictions")
    compare.add_argument("--out", required=True, metavar="DIR", help="for comparison.html/.json")
    compare.add_argument("--manifest", help="cohort manifest giving each slide's site")
    compare.add_argument("--bootstrap", type=int, default=2000, metavar="N", help="resamples")
    compare.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    compare.set_defaults(handler=_analysis_compare)
    _add_json_flag(compare)

    cohort = sub.add_parser("cohort", help="cohort manifests")
    cohort_sub = cohort.add_subparsers(dest="cohort_command", metavar="ACTION", required=True)
    cohort_import = cohort_sub.add_parser("import", help="a manifest from TCGA-BRCA tables")
    cohort_import.add_argument("slides", metavar="SLIDES_DIR", help="folder of TCGA slides")
    cohort_import.add_argument(
        "--clinical",
        metavar="TABLE",
        action="append",
        help="cBioPortal clinical patient/sample table (repeat for several)",
    )
    cohort_import.add_argument("--mutations", metavar="TABLE", help="mutations MAF")
    cohort_import.add_argument("--immune", metavar="TABLE", help="patient id + immune score")
    cohort_import.add_argument("--sequenced", metavar="TABLE", help="sequenced sample list")
    cohort_import.add_argument("--out", metavar="MANIFEST.csv", help="default ./manifest.csv")
    cohort_import.add_argument("--overwrite", action="store_true", help="replace --out")
    cohort_import.add_argument(
        "--include-frozen",
        action="store_true",
        help="also use frozen (TS/BS) sections: TCGA's normal slides (-11A) are frozen",
    )
    cohort_import.add_argument(
        "--strict-her2",
        action="store_true",
        help="FISH settles HER2 only where IHC is equivocal (default: also where IHC is "
        "missing or indeterminate)",
    )
    cohort_import.add_argument(
        "--allow-unknown-values",
        action="store_true",
        help="take label values outside the vocabulary as unknown even when they are "
        "more than 5%% of a column",
    )
    cohort_import.set_defaults(handler=_cohort_import, human=_print_cohort_import)
    _add_json_flag(cohort_import)

    predict = sub.add_parser("predict", help="calibrated biomarker calls for a slide")
    predict.add_argument("slide", metavar="SLIDE")
    predict.add_argument("--target", default="127.0.0.1:50050", metavar="HOST:PORT")
    _add_predict_arguments(predict)
    predict.set_defaults(handler=_predict)

    export = sub.add_parser("export", help="results as files other tools open")
    export_sub = export.add_subparsers(dest="export_command", metavar="FORMAT", required=True)
    export_geojson = export_sub.add_parser(
        "geojson", help="predictions, nuclei or attention as QuPath GeoJSON (level-0 px)"
    )
    _add_export_arguments(export_geojson)
    export_geojson.set_defaults(handler=_export)
    _add_json_flag(export_geojson)

    encoders = sub.add_parser("encoders", help="the patch encoders `embed` can load")
    encoders.set_defaults(handler=_encoders, human=_print_encoders)
    encoders_sub = encoders.add_subparsers(dest="encoders_command", metavar="ACTION")
    combine = encoders_sub.add_parser(
        "combine",
        help="trained biomarker bundles as one biomarker-cnns weights file (and its sidecar)",
    )
    combine.add_argument(
        "bundles", nargs="+", metavar="BUNDLE_DIR", help="bundle folders (weights.pt, model.json)"
    )
    combine.add_argument(
        "--out", required=True, metavar="FILE.pt", help="the weights file; FILE.bundles.json too"
    )
    combine.set_defaults(handler=_encoders_combine, human=None)
    _add_json_flag(combine)

    embed = sub.add_parser("embed", help="a slide's bag of patch embeddings from local weights")
    _add_embed_arguments(embed)
    embed.set_defaults(handler=_embed)

    mil = sub.add_parser("mil", help="attention MIL on bags: cross-validated training, calls")
    _add_mil_arguments(mil)

    flows = sub.add_parser("flows", help="Prefect flows and deployments")
    flows_sub = flows.add_subparsers(dest="flows_command", metavar="ACTION", required=True)
    flows_serve = flows_sub.add_parser("serve", help="serve the scheduled deployments")
    flows_serve.add_argument("--cron", help='training schedule (default "0 3 * * 0")')
    flows_serve.add_argument(
        "--interval-s", type=float, help="seconds between batch predictions (default 600)"
    )
    flows_serve.add_argument("--manifest", metavar="PATH", help="cohort manifest to train on")
    flows_serve.add_argument("--cohort", metavar="NAME", help="its cohort name in the store")
    flows_serve.add_argument(
        "--task-runner", choices=["thread", "dask"], help="per-slide fan-out (default thread)"
    )
    flows_serve.add_argument(
        "--dask-address", metavar="ADDR", help="Dask scheduler (default: a local cluster)"
    )
    flows_serve.set_defaults(handler=_flows_serve)
    _add_json_flag(flows_serve)

    up = sub.add_parser("up", help="start the whole stack as local processes on 127.0.0.1")
    up.add_argument("--dir", help="state, logs and working folders (~/.histomarker/stack)")
    up.add_argument("--detach", action="store_true", help="return once every part is ready")
    up.add_argument("--free-ports", action="store_true", help="free ports, not the defaults")
    up.add_argument("--store-url", help="object store (default: HISTOMARKER_STORE_URL or file)")
    up.add_argument("--model-store", help="TorchServe model store (./model-store if present)")
    up.add_argument(
        "--skip",
        action="append",
        default=[],
        choices=["prefect", "torchserve", "flows"],
        help="leave this part out (repeatable)",
    )
    up.add_argument("--timeout", type=float, default=180.0, help="readiness wait per part, s")
    up.set_defaults(handler=_up)
    down = sub.add_parser("down", help="stop the stack started by `histomarker up`")
    down.add_argument("--dir", help="the folder given to `up` (~/.histomarker/stack)")
    down.add_argument("--timeout", type=float, default=30.0, help="SIGTERM to SIGKILL, s")
    down.set_defaults(handler=_down)

    restart = sub.add_parser(
        "restart", help="restart one part of a detached `histomarker up` stack, the rest running"
    )
    restart.add_argument("component", choices=["torchserve"], help="the part to restart")
    restart.add_argument("--dir", help="the folder given to `up` (~/.histomarker/stack)")
    restart.add_argument("--timeout", type=float, default=180.0, help="readiness wait, s")
    restart.set_defaults(handler=_restart)

    models = sub.add_parser("models", help="served model versions: list, deploy, rollback")
    models_sub = models.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    models_list = models_sub.add_parser(
        "list", help="recorded, served and stored versions of each model"
    )
    models_deploy = models_sub.add_parser("deploy", help="serve a stored version and record it")
    models_deploy.add_argument("name", metavar="NAME", help="model, e.g. biomarker_er")
    models_deploy.add_argument("version", metavar="VERSION", help="a stored version of it")
    models_rollback = models_sub.add_parser(
        "rollback", help="serve the version recorded before the current one"
    )
    models_rollback.add_argument("name", metavar="NAME", help="model, e.g. biomarker_er")
    models_restore = models_sub.add_parser(
        "restore", help="register every recorded version (after TorchServe started)"
    )
    for action in (models_list, models_deploy, models_rollback, models_restore):
        action.add_argument(
            "--dir", help="a running stack's folder (default: ~/.histomarker/stack)"
        )
        action.add_argument("--store-url", help="object store (default: the stack's, or env)")
        action.add_argument("--management-url", metavar="URL", help="TorchServe management API")
        action.add_argument("--key-file", help="TorchServe key_file.json (its management key)")
        action.add_argument("--model-store", help="TorchServe's model store folder")
        action.add_argument("--timeout", type=float, default=300.0, help="READY wait, seconds")
        action.set_defaults(handler=_models, human=_print_models)
        _add_json_flag(action)

    serve = sub.add_parser("serve", help="run one gRPC service in the foreground")
    serve.add_argument("service", choices=["tiling", "nuclei", "analysis", "prediction"])
    serve.set_defaults(handler=_serve)

    demo = sub.add_parser("demo", help="synth -> train -> serve -> predict -> report")
    demo.add_argument("--out", default="demo-out", help="output folder")
    demo.add_argument(
        "--scale",
        choices=["full", "quick"],
        default="full",
        help="full: the held-out AUROC demo (~25 min on 2 cores); quick: a small wiring run",
    )
    demo.add_argument(
        "--require-targets",
        action="store_true",
        help="exit 1 when a held-out AUROC target is missed (by default a missed target "
        "is reported in the table and the run exits 0)",
    )
    demo.set_defaults(handler=_demo)

    for name, action in sub.choices.items():
        if name not in {"analysis", "cohort", "export", "flows", "mil", "models"}:
            _add_json_flag(action)
    return parser


def _print_human(result: dict[str, Any]) -> None:
    for key, value in result.items():
        if isinstance(value, (dict, list)):
            value = json.dumps(value, ensure_ascii=False)
        print(f"{key}: {value}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_BAD_INPUT
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return EXIT_BAD_INPUT
    try:
        result = args.handler(args)
    except HistomarkerError as exc:
        line = " ".join(str(exc).split())  # one line, whatever the message held
        print(f"histomarker {args.command}: {line}", file=sys.stderr)
        return EXIT_BAD_INPUT if exc.status_name in _BAD_INPUT_STATUSES else EXIT_FAILED
    except KeyboardInterrupt:
        print(f"histomarker {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not bad input: one line, details on request
        if os.environ.get("HISTOMARKER_DEBUG"):
            raise
        line = " ".join(f"{type(exc).__name__}: {exc}".split())
        print(
            f"histomarker {args.command}: internal error ({line}); "
            "set HISTOMARKER_DEBUG=1 for the traceback",
            file=sys.stderr,
        )
        return EXIT_FAILED
    if getattr(args, "json", False):
        print(json.dumps(result, ensure_ascii=False, default=str))
    else:
        printer: Callable[[dict[str, Any]], None] = getattr(args, "human", None) or _print_human
        printer(result)
    return EXIT_OK if result.get("ok", True) else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
