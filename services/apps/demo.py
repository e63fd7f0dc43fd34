"""``histomarker demo``: the whole method on one machine, from nothing to a table.

1. A synthetic cohort (``services.synth``) with ground truth; a seeded share of its
   patients, cancer and normal, is held out of everything that follows
   (``services.apps.demo_heldout.split``).
2. The local stack (``services.apps.local_stack``, what ``histomarker up`` runs): the
   Prefect server, TorchServe and the four gRPC services on free ports of 127.0.0.1,
   a ``file://`` object store in the output folder.
3. ``train_pipeline`` (``flows.training.pipeline``) on the other patients against that stack:
   tiling, the cancer detector, CD patches, the six biomarker models (registered on
   TorchServe), nuclei features, the analysis report. Its runs are recorded by the
   stack's Prefect server.
4. Every held-out slide uploaded to the PredictionService with its Python client;
   the calibrated answers are scored against the truth
   (``services.apps.demo_heldout.scores``).
5. The stack is stopped (also on Ctrl-C, SIGTERM or a failure), and the demo says
   where its outputs are.

Outputs under the output folder (default ``demo-out``): ``results.md`` and
``results.json`` (the held-out AUROC table), ``predictions.csv`` (one row per
held-out slide), ``report.html`` (the training run's analysis report), ``cohort/``
(kept and reused by the next run when its settings and the generator's
``RULES_VERSION`` are the same), ``store/`` (the
object store: models, tiles, runs) and ``stack/logs/``. A rerun replaces everything
but a matching cohort.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd

from flows.training.config import Analysis, ModelTraining, PipelineConfig, Selection, TilingConfig
from services.common.errors import InvalidInput
from services.common.processes import environment, interruptible
from services.common.vocabulary import BIOMARKERS
from services.synth.labels import RULES_VERSION
from services.synth.slide import QC_MIN_USABLE_MM2

#: Files of the output folder the demo writes (a rerun replaces them).
RESULTS_MD = "results.md"
RESULTS_JSON = "results.json"
PREDICTIONS_CSV = "predictions.csv"
PREDICTIONS_MIL_CSV = "predictions_mil.csv"
REPORT_HTML = "report.html"
#: Beside the cohort: the settings it was generated with (a rerun reuses a match).
COHORT_STAMP = "demo-cohort.json"
TRAIN_MANIFEST = "train.csv"
COHORT_NAME = "demo"
#: Cancer confidence of a second prediction for slides where no 20x patch passed the
#: detector's own threshold (0.9): biomarker probabilities need cancer patches.
FALLBACK_CANCER_CONFIDENCE = 0.5


@dataclass(frozen=True)
class DemoScale:
    """How big the demo is.

    Attributes:
        name: ``full`` (``make demo``) or ``quick`` (the wiring test).
        slides: Slides (= patients) generated.
        preset: Synthetic slide size (``services.synth.slide.PRESETS``).
        normal_fraction: Share of normal slides.
        heldout_fraction: Share of each kind's patients held out of training.
        cohort_seed: Seed of the cohort.
        split_seed: Seed of the held-out draw.
        workers: Processes rendering slides at once.
        pipeline: The training pipeline's configuration.
        cancer_target: Held-out slide AUROC aimed at for cancer vs normal.
        biomarker_target: Held-out slide AUROC aimed at for each biomarker.
        check_targets: Whether the scale has AUROC targets at all (a quick run is
            too small to learn anything: its table shows the figures, not a verdict).
        mil_head: The MIL head of the second pipeline (``abmil`` or ``transmil``).
        mil_folds: Its site-aware cross-validation folds.
        mil_epochs: Most epochs per fit of it.
        mil_overlap: Share of a patch side its neighbouring patches overlap (the
            encoder's 40x patches give a tiny slide 10-40 on the plain grid).
    """

    name: str
    slides: int
    preset: str
    normal_fraction: float
    heldout_fraction: float
    cohort_seed: int
    split_seed: int
    workers: int
    pipeline: PipelineConfig
    cancer_target: float = 0.95
    biomarker_target: float = 0.75
    check_targets: bool = True
    mil_head: str = "abmil"
    mil_folds: int = 5
    mil_epochs: int = 40
    mil_overlap: float = 0.0

    def cohort_settings(self) -> dict[str, Any]:
        """What decides the cohort's files (a rerun reuses a cohort with the same)."""
        return {
            "slides": self.slides,
            "preset": self.preset,
            "normal_fraction": self.normal_fraction,
            "seed": self.cohort_seed,
            "rules": RULES_VERSION,
        }


#: CPU threads the demo's models train with, whatever the machine's core count: the
#: weights depend on it, so a 4- or 16-core machine trains the same models as the
#: 2-core one the README's table came from (on the same kind of CPU).
TRAIN_THREADS = 2

# Patches are 512 px at 20x in training too: the PredictionService reads that grid.
SCALES: dict[str, DemoScale] = {
    "full": DemoScale(
        name="full",
        slides=240,
        preset="tiny",
        normal_fraction=0.15,
        heldout_fraction=0.35,
        cohort_seed=0,
        split_seed=0,
        workers=2,
        pipeline=PipelineConfig(
            # Half-overlapping 20x patches: a tiny slide has about four 512 px ones
            # on the plain grid, too few for the detector and the CD patches.
            tiling=TilingConfig(patch_px=512, overlap_px=256),
            detector=ModelTraining(
                backbone="tiny",
                input_px=64,
                epochs=14,
                batch_size=32,
                lr=3e-3,
                max_patches_per_epoch=1000,
                mixed_precision="off",
                threads=TRAIN_THREADS,
            ),
            # The biomarker cues are nuclear detail (fragments of 1-2 µm, the spread of
            # nucleus sizes): 128 px (1 µm/px) and the small backbone, which looks twice
            # at every scale. An epoch is twice the minority class's patches (at most
            # 1000). A tenth of the patients validate (the temperature and the
            # validation curve), their patches sampled down to 300: a fifth left the
            # faint biomarkers fewer slides to learn from. A peak rate of 1e-3: at 2e-3
            # and 3e-3 the validation AUROC swung from epoch to epoch and ended short.
            # The faint cues keep gaining with epochs (benchmarks/README.md): PR trains
            # 32, PIK3CA 24, HER2 20, ER 16, while TP53 and Basal, whose cues are
            # plain, are done in 8 and 12. Two test-time views (a half turn apart)
            # instead of eight quarter serving.
            biomarker=ModelTraining(
                backbone="small",
                input_px=128,
                epochs=16,
                batch_size=32,
                lr=1e-3,
                val_fraction=0.1,
                max_patches_per_epoch=1000,
                max_val_patches=300,
                mixed_precision="off",
                tta=("rot0", "rot180"),
                threads=TRAIN_THREADS,
            ),
            biomarker_epochs={"tp53": 8, "basal": 12, "pik3ca": 24, "pr": 32, "her2": 20},
            # Slides whose detector is rarely above 0.9 still give the biomarker models
            # their eight most confident 20x patches (half-overlapping: about 20
            # distinct 40x patches).
            selection=Selection(threshold=0.9, min_patches_per_slide=8, max_patches_per_slide=8),
            analysis=Analysis(folds=3, n_estimators=30, bootstrap=100),
        ),
    ),
    "quick": DemoScale(
        name="quick",
        slides=16,
        preset="tiny",
        normal_fraction=0.25,
        heldout_fraction=0.3,
        cohort_seed=0,
        split_seed=0,
        workers=2,
        pipeline=PipelineConfig(
            tiling=TilingConfig(patch_px=512),
            detector=ModelTraining(
                backbone="tiny", input_px=32, epochs=1, batch_size=4, lr=3e-3, val_fraction=0.34
            ),
            biomarker=ModelTraining(
                backbone="tiny", input_px=32, epochs=1, batch_size=4, lr=3e-3, val_fraction=0.34
            ),
            selection=Selection(threshold=0.9, min_patches_per_slide=2, max_patches_per_slide=2),
            analysis=Analysis(folds=2, n_estimators=10, bootstrap=20),
        ),
        check_targets=False,
        mil_folds=2,
        mil_epochs=2,
    ),
}


def scale_named(name: str) -> DemoScale:
    """The scale of that name; InvalidInput naming the scales otherwise."""
    try:
        return SCALES[name]
    except KeyError:
        raise InvalidInput(
            f"unknown demo scale {name!r}; use one of: {', '.join(SCALES)}"
        ) from None


@dataclass
class _Stages:
    """Prints a line as each stage starts and ends; keeps the seconds per stage."""

    progress: bool
    seconds: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    def say(self, text: str) -> None:
        if self.progress:
            print(text, file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.say(f"\n== {name} (at {time.perf_counter() - self.started:.0f} s)")
        began = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(time.perf_counter() - began, 1)
            self.say(f"== {name}: {self.seconds[name]:.0f} s")


def _prepare_output(out: Path, scale: DemoScale) -> bool:
    """Clear the last run's outputs; returns whether its cohort can be reused.

    A stack left running by a demo that was killed outright (SIGKILL gives it no
    chance to stop its stack) is stopped first, exactly its recorded processes.
    """
    from services.apps.local_stack.stack import run_down

    out.mkdir(parents=True, exist_ok=True)
    if (out / "stack").is_dir():
        run_down(out / "stack")
    for name in (RESULTS_MD, RESULTS_JSON, PREDICTIONS_CSV, PREDICTIONS_MIL_CSV, REPORT_HTML):
        (out / name).unlink(missing_ok=True)
    for name in ("stack", "store"):
        shutil.rmtree(out / name, ignore_errors=True)
    stamp = out / "cohort" / COHORT_STAMP
    try:
        reusable = json.loads(stamp.read_text()) == scale.cohort_settings()
    except (OSError, ValueError):
        reusable = False
    reusable = reusable and (out / "cohort" / "manifest.csv").is_file()
    if not reusable:
        shutil.rmtree(out / "cohort", ignore_errors=True)
    return reusable


def _cohort(out: Path, scale: DemoScale, reuse: bool, progress: bool) -> dict[str, Any]:
    from services.synth.cohort import generate_cohort

    folder = out / "cohort"
    if reuse:
        return {"manifest": str(folder / "manifest.csv"), "reused": True}
    summary = generate_cohort(
        folder,
        scale.slides,
        scale.cohort_seed,
        scale.preset,
        truth_crops=0,
        progress=progress,
        normal_fraction=scale.normal_fraction,
        workers=scale.workers,
    )
    (folder / COHORT_STAMP).write_text(json.dumps(scale.cohort_settings()))
    return {**summary, "reused": False}


def _split(out: Path, scale: DemoScale) -> tuple[Path, pd.DataFrame]:
    """Write the training manifest beside the cohort's; return it and the held-out rows."""
    from services.apps.demo_heldout.split import split_by_patient
    from services.cohort.manifest import Manifest

    folder = out / "cohort"
    manifest = Manifest.read(folder / "manifest.csv")
    train, heldout = split_by_patient(manifest.table, scale.heldout_fraction, scale.split_seed)
    train_path = folder / TRAIN_MANIFEST
    Manifest.from_frame(train, root=folder).write(train_path, overwrite=True)
    heldout = heldout.assign(slide_path=[str(folder / p) for p in heldout["slide_path"]])
    return train_path, heldout


def _flow_environment(stack: Any, out: Path) -> dict[str, str]:
    """The settings ``flows.runtime.settings.FlowSettings`` reads, pointing at the stack."""
    from services.inference.torchserve import read_key_file

    ports = stack.ports
    keys = read_key_file(stack.torchserve_key_file)
    return {
        "HISTOMARKER_STORE_URL": stack.options.store_url,
        "HISTOMARKER_TILING_TARGET": f"127.0.0.1:{ports.services['tiling']}",
        "HISTOMARKER_NUCLEI_TARGET": f"127.0.0.1:{ports.services['nuclei']}",
        "HISTOMARKER_ANALYSIS_TARGET": f"127.0.0.1:{ports.services['analysis']}",
        "HISTOMARKER_PREDICTION_TARGET": f"127.0.0.1:{ports.services['prediction']}",
        "HISTOMARKER_TORCHSERVE_GRPC_TARGET": (
            f"127.0.0.1:{ports.torchserve['grpc_inference_port']}"
        ),
        "HISTOMARKER_TORCHSERVE_MANAGEMENT_URL": (
            f"http://127.0.0.1:{ports.torchserve['management_port']}"
        ),
        "HISTOMARKER_TORCHSERVE_MODEL_STORE": str(stack.options.model_store),
        "HISTOMARKER_TORCHSERVE_INFERENCE_TOKEN": keys.inference,
        "HISTOMARKER_TORCHSERVE_MANAGEMENT_TOKEN": keys.management,
        "HISTOMARKER_WORK_DIR": str(out / "stack" / "flows"),
        "DO_NOT_TRACK": "1",
    }


@contextlib.contextmanager
def _flows(stack: Any, out: Path) -> Iterator[None]:
    """Flows run in this process against the stack, recorded by its Prefect server."""
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_HOME,
        PREFECT_SERVER_ANALYTICS_ENABLED,
        temporary_settings,
    )

    updates: dict[Any, Any] = {
        PREFECT_API_URL: stack.prefect_api_url,
        PREFECT_HOME: out / "stack" / "prefect",
        PREFECT_SERVER_ANALYTICS_ENABLED: False,
    }
    with environment(_flow_environment(stack, out)), temporary_settings(updates=updates):
        yield


def _train(stack: Any, out: Path, train_manifest: Path, scale: DemoScale) -> Any:
    """``train_pipeline`` in this process, recorded by the stack's Prefect server."""
    from flows.training.pipeline import train_pipeline

    with _flows(stack, out):
        return train_pipeline(str(train_manifest), COHORT_NAME, scale.pipeline)


def _train_mil(stack: Any, out: Path, train_manifest: Path, run: Any, scale: DemoScale) -> Any:
    """``train_mil`` on the trained biomarker CNNs (see :mod:`services.apps.demo_mil`)."""
    from flows.mil.pipeline import train_mil
    from services.apps.demo_mil import DEMO_ENCODER, DEMO_HEAD_NAME, biomarker_cnn_weights

    weights = biomarker_cnn_weights(
        stack.options.store_url, run.biomarkers.results, out / "stack" / "biomarker-cnns"
    )
    with _flows(stack, out):
        return train_mil(
            str(train_manifest),
            DEMO_ENCODER,
            str(weights),
            name=DEMO_HEAD_NAME,
            head=scale.mil_head,
            folds=scale.mil_folds,
            epochs=scale.mil_epochs,
            cohort_name=COHORT_NAME,
            synthetic=True,
            seed=scale.split_seed,
            overlap=scale.mil_overlap,
        )


def _predict(
    target: str, heldout: pd.DataFrame, biomarkers: tuple[str, ...], say: Callable[[str], None]
) -> dict[str, dict[str, Any]]:
    """Every held-out slide through the PredictionService (upload, then predict)."""
    from services.prediction.client import PredictionClient, options_of, to_dict

    answers: dict[str, dict[str, Any]] = {}
    with PredictionClient(target) as client:
        for number, row in enumerate(heldout.itertuples(index=False), start=1):
            began = time.perf_counter()
            answer = client.predict_file(
                row.slide_path, slide_id=str(row.slide_id), options=options_of(biomarkers)
            )
            prediction = to_dict(answer.prediction)
            note = ""
            if not prediction.get("biomarkers"):
                # No patch above 0.9: ask again at a lower cancer confidence for the
                # biomarker probabilities; the cancer score stays the first answer's.
                again = client.predict_file(
                    row.slide_path,
                    slide_id=str(row.slide_id),
                    options=options_of(biomarkers, cancer_confidence=FALLBACK_CANCER_CONFIDENCE),
                )
                prediction["biomarkers"] = to_dict(again.prediction).get("biomarkers", [])
                prediction["biomarker_cancer_confidence"] = FALLBACK_CANCER_CONFIDENCE
                note = f" (biomarkers at cancer confidence {FALLBACK_CANCER_CONFIDENCE})"
            answers[str(row.slide_id)] = prediction
            say(
                f"[{number}/{len(heldout)}] {row.slide_id} ({row.kind}): "
                f"{prediction.get('status', '')}, cancer patches "
                f"{float(prediction.get('cancer_patch_fraction', 0.0)):.2f} of tissue"
                f"{note}, {time.perf_counter() - began:.1f} s"
            )
    return answers


def _copy_report(store_url: str, key: str, out: Path) -> Path:
    """The training run's HTML report, copied out of the store (self-contained)."""
    from services.common.objectstore import open_store

    path = out / REPORT_HTML
    path.write_bytes(open_store(store_url).get_bytes(key))
    return path


def target_verdict(results: list[Any], not_trained: list[str], scale: DemoScale) -> str:
    """One line saying which AUROC targets were met and which were missed."""
    if not scale.check_targets:
        return f"The {scale.name} scale has no AUROC targets: the figures check the wiring."
    missed = [
        f"{r.task} ({r.auroc:.3f} < {r.target:.2f})" if math.isfinite(r.auroc) else r.task
        for r in results
        if not r.met
    ]
    missed += [f"{name} (not trained)" for name in not_trained]
    if not missed:
        return f"Every task met its target ({len(results)} of {len(results)})."
    return (
        f"Targets met: {len(results) - len(missed) + len(not_trained)} of "
        f"{len(results) + len(not_trained)}; missed: {', '.join(missed)}."
    )


def _write_results(
    out: Path,
    table: pd.DataFrame,
    results: list[Any],
    scale: DemoScale,
    run: Any,
    stages: dict[str, float],
    cohort: pd.DataFrame,
    not_trained: list[str],
    mil: dict[str, Any] | None = None,
) -> dict[str, Any]:
    from services.apps.demo_heldout.scores import markdown_table

    table.to_csv(out / PREDICTIONS_CSV, index=False)
    both = (
        []
        if mil is None
        else [
            "## Both pipelines on the same held-out cancer slides",
            "",
            "The paper's pipeline above; encoder + MIL: the paper's six trained biomarker "
            "CNNs embed every usable 40x patch (stain-normalized as they were trained; "
            "pooled features and logit margin of each), one gated-attention MIL head calls "
            "the six biomarkers (served as encoder_biomarker-cnns and mil_demo, asked with "
            "pipeline MIL).",
            "",
            mil["markdown"],
            "",
        ]
    )
    verdict = target_verdict(results, not_trained, scale)
    markdown = "\n".join(
        [
            f"# histomarker demo ({scale.name}): held-out slide-level AUROC",
            "",
            f"Held-out patients: {len(table)} slides "
            f"({int((table['kind'] == 'cancer').sum())} cancer, "
            f"{int((table['kind'] == 'normal').sum())} normal) of a {len(cohort)}-slide "
            f"synthetic cohort (seed {scale.cohort_seed}, preset {scale.preset}); none of "
            "them trained, calibrated or set a threshold of any model.",
            f"Training run `{run.run_id}`; backbone `{scale.pipeline.biomarker.backbone}`, "
            f"random init.",
            "",
            markdown_table(results),
            "",
            verdict,
            "",
            "Slide score: cancer vs normal, the share of tissue patches called cancer; "
            "biomarkers, the mean calibrated probability of the 40x cancer patches "
            "(cancer slides only).",
            "",
            *both,
        ]
    )
    (out / RESULTS_MD).write_text(markdown)
    document = {
        "scale": scale.name,
        "run_id": run.run_id,
        "results": [r.as_dict() for r in results],
        "targets_met": _targets_met(results, not_trained, scale),
        "missed_targets": [r.task for r in results if not r.met] if scale.check_targets else [],
        "not_trained": not_trained,
        "verdict": verdict,
        "heldout_slides": len(table),
        "cohort_slides": len(cohort),
        "stage_seconds": stages,
        "mil": None if mil is None else {k: v for k, v in mil.items() if k != "markdown"},
        "config": {
            **{k: v for k, v in asdict(scale).items() if k != "pipeline"},
            "pipeline": scale.pipeline.model_dump(mode="json"),
        },
    }
    (out / RESULTS_JSON).write_text(json.dumps(document, indent=1))
    return document


def _targets_met(results: list[Any], not_trained: list[str], scale: DemoScale) -> bool | None:
    """Whether every task met its target (None at a scale without targets)."""
    if not scale.check_targets:
        return None
    return all(r.met for r in results) and not not_trained


def run_ok(answered: bool, targets_met: bool | None, require_targets: bool) -> bool:
    """Whether the demo succeeded: every held-out slide answered, and, only when
    targets are required, every target met (a scale without targets passes)."""
    return answered and (targets_met is not False or not require_targets)


def run_demo(
    out_dir: str | Path = "demo-out",
    progress: bool = True,
    scale: str = "full",
    require_targets: bool = False,
    cohort_seed: int | None = None,
) -> dict[str, Any]:
    """Run the demo (see the module doc) and return where its outputs are.

    Args:
        out_dir: Output folder (created; the last run's outputs are replaced).
        progress: Print each stage, the pipeline's log and a line per prediction on
            standard error.
        scale: ``full`` (``make demo``) or ``quick`` (a small run for tests).
        require_targets: Make a missed AUROC target a failure (``ok`` false, so the
            command exits 1): a gate for those who want one. Without it a missed
            target is reported in the table, ``results.md`` and ``results.json``,
            and the run is still ``ok``.
        cohort_seed: Another seed for the synthetic cohort than the scale's (the
            spread of the table over cohorts: ``benchmarks/recipes/demo_seeds.py``).

    Returns:
        ``ok`` (the pipeline ran to the end and every held-out slide was answered;
        with ``require_targets`` also every target met), ``targets_met`` (None at
        a scale without targets), the table, the paths and the seconds per stage.
    """
    from services.apps import demo_mil
    from services.apps.demo_heldout.scores import heldout_results, markdown_table, slide_table
    from services.apps.local_stack.stack import LocalStack, StackOptions

    chosen = scale_named(scale)
    if cohort_seed is not None:
        chosen = replace(chosen, cohort_seed=cohort_seed)
    out = Path(out_dir).resolve()
    stages = _Stages(progress)
    reuse = _prepare_output(out, chosen)
    with stages.stage("synthetic cohort"):
        cohort = _cohort(out, chosen, reuse, progress)
        stages.say(f"cohort: {cohort['manifest']}{' (reused)' if reuse else ''}")
    train_manifest, heldout = _split(out, chosen)
    full = pd.read_csv(out / "cohort" / "manifest.csv")
    stages.say(
        f"held out {len(heldout)} of {len(full)} slides by patient "
        f"({int((heldout['kind'] == 'cancer').sum())} cancer); training on the rest"
    )
    (out / "store").mkdir(parents=True, exist_ok=True)
    model_store = out / "stack" / "model-store"
    model_store.mkdir(parents=True, exist_ok=True)
    options = StackOptions(
        directory=out / "stack",
        store_url=(out / "store").as_uri(),
        model_store=model_store,
        free_ports=True,
        skip=frozenset({"flows"}),  # the demo runs the flow itself, once
    )
    stack = LocalStack(options, report=stages.say)
    # The synthetic slides are small (the tiny preset is 1.0 x 0.77 mm), under the
    # usable tissue QC asks of a real slide: the demo's services take a floor for them.
    qc_floor = {"HISTOMARKER_QC_MIN_USABLE_MM2": str(QC_MIN_USABLE_MM2)}
    with interruptible(), environment(qc_floor):
        try:
            with stages.stage("local stack up"):
                stack.start()
            with stages.stage("train_pipeline"):
                run = _train(stack, out, train_manifest, chosen)
            trained = tuple(r.biomarker for r in run.biomarkers.results)
            for skipped in run.biomarkers.skipped:
                stages.say(f"{skipped.biomarker} was not trained: {skipped.reason}")
            with stages.stage("held-out predictions (PredictionService)"):
                target = f"127.0.0.1:{stack.ports.services['prediction']}"
                answers = _predict(target, heldout, trained, stages.say)
            with stages.stage("train_mil (biomarker CNNs + attention MIL)"):
                mil_run = _train_mil(stack, out, train_manifest, run, chosen)
            with stages.stage("held-out predictions, MIL pipeline (PredictionService)"):
                mil_answers = demo_mil.predict_heldout(
                    target, heldout, trained, mil_run.mil_model.name, stages.say
                )
            report = _copy_report(options.store_url, run.analysis.report_key, out)
        finally:
            with stages.stage("local stack down"):
                stopped = stack.stop()
            stages.say(f"stopped: {', '.join(stopped) or 'nothing'}")
    table = slide_table(heldout, answers)
    results = heldout_results(table, trained, chosen.cancer_target, chosen.biomarker_target)
    skipped_rows = [name for name in BIOMARKERS if name not in trained]
    mil_table = slide_table(heldout[heldout["kind"] == "cancer"], mil_answers)
    mil_table.to_csv(out / PREDICTIONS_MIL_CSV, index=False)
    mil_results = heldout_results(mil_table, trained, chosen.cancer_target, chosen.biomarker_target)
    mil = demo_mil.comparison(
        results,
        mil_results[1:],
        demo_mil.calibration(mil_table, demo_mil.temperatures(mil_run.head.card_path), trained),
    )
    mil.update(
        encoder_model=mil_run.encoder_model.model_dump(),
        mil_model=mil_run.mil_model.model_dump(),
        bags={"slides": mil_run.bags.slides, "patches": mil_run.bags.patches},
        cross_validation=mil_run.head.cross_validation,
    )
    try:
        comparison_html: Path | None = demo_mil.side_by_side(out, table, mil_table, heldout)
    except InvalidInput as exc:
        # Too few answered slides for a comparison (a quick run): said, not fatal.
        stages.say(f"no side-by-side comparison: {exc}")
        comparison_html = None
    if comparison_html is not None:
        mil["comparison_html"] = str(comparison_html)
        mil["markdown"] += (
            "\n\nBoth pipelines on the same held-out patients, with paired 95% CIs from a "
            "bootstrap over patients, ROC curves and reliability diagrams: "
            f"`{comparison_html.name}`."
        )
    document = _write_results(
        out, table, results, chosen, run, stages.seconds, full, skipped_rows, mil
    )
    targets_met = document["targets_met"]
    answered = bool((table["status"] != "missing").all())
    ok = run_ok(answered, targets_met, require_targets)
    wall_s = round(time.perf_counter() - stages.started, 1)
    stages.say("\n" + markdown_table(results) + "\n\n" + mil["markdown"])
    stages.say(
        "\nwhere to look:\n"
        f"  held-out table     {out / RESULTS_MD} (and {RESULTS_JSON})\n"
        f"  predictions        {out / PREDICTIONS_CSV} (one row per held-out slide)\n"
        f"  analysis report    {report}\n"
        f"  side by side       {comparison_html or 'none'} (paper vs MIL, patient-bootstrap CIs)\n"
        f"  models, tiles, heatmaps  {out / 'store'}\n"
        f"  service logs       {out / 'stack' / 'logs'}\n"
        f"  Prefect runs       PREFECT_HOME={out / 'stack' / 'prefect'} prefect server start\n"
        f"wall time {wall_s:.0f} s\n{document['verdict']}"
    )
    return {
        "ok": ok,
        "targets_met": targets_met,
        "cohort_reused": reuse,
        "out_dir": str(out),
        "results": document["results"],
        "mil": document["mil"],
        "not_trained": skipped_rows,
        "run_id": run.run_id,
        "results_md": str(out / RESULTS_MD),
        "results_json": str(out / RESULTS_JSON),
        "predictions": str(out / PREDICTIONS_CSV),
        "report": str(report),
        "comparison": str(comparison_html) if comparison_html else None,
        "stage_seconds": stages.seconds,
        "wall_s": wall_s,
    }
