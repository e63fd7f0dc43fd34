"""``train_pipeline``: the whole training side of the method, flow after flow.

ingest_cohort -> preprocess -> train_cancer_detector (with the OOD reference of the
cohort's slides) -> select_discriminative ->
train_biomarkers -> analyze_features. The run's outputs go to ``runs/{run_id}/``,
where the run id is a digest of the cohort's manifest and the configuration: a rerun
of a run that crashed has the same id, its finished tasks are found in the cache
(see ``flows.runtime.policy``), and it goes on from the first unfinished one.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.runtime.policy import input_digest
from flows.runtime.records import AnalysisResult, CohortRef, Record
from flows.runtime.runners import with_fanout_runner
from flows.training.analysis import analyze_features
from flows.training.biomarkers import BiomarkerRun, train_biomarkers
from flows.training.config import PipelineConfig
from flows.training.detector import DetectorResult, train_cancer_detector
from flows.training.discriminative import select_discriminative
from flows.training.ingest import ingest_cohort
from flows.training.preprocess import preprocess

#: Hex digits of a run id.
RUN_ID_DIGITS = 16


class PipelineResult(Record):
    """What a training run produced."""

    run_id: str
    cohort: CohortRef
    detector: DetectorResult
    biomarkers: BiomarkerRun
    analysis: AnalysisResult


def run_id(cohort: CohortRef, config: PipelineConfig) -> str:
    """The run's id: a digest of the stored manifest and the configuration."""
    return input_digest(cohort.manifest_sha256, config)[:RUN_ID_DIGITS]


@flow(name="train_pipeline", log_prints=True)
def train_pipeline(
    manifest_path: str, cohort_name: str, config: PipelineConfig | None = None
) -> PipelineResult:
    """Train and analyse everything from a local cohort manifest.

    Args:
        manifest_path: The cohort's manifest CSV (its slides beside it or absolute).
        cohort_name: Name of the cohort in the store.
        config: What to compute; the method's defaults when None.

    Returns:
        The run's id, models and where its report is.
    """
    config = config or PipelineConfig()
    cohort = ingest_cohort(manifest_path, cohort_name)
    run = run_id(cohort, config)
    prefix = f"runs/{run}"
    # Threads, or a Dask cluster when the settings ask for one (``flows.runtime.runners``).
    tiled = with_fanout_runner(preprocess)(cohort, config.tiling, config.max_concurrent_slides)
    detector = train_cancer_detector(
        cohort, tiled, config.detector, config.split_seed, config.tiling.overlap_px, config.ood
    )
    cd_slides = select_discriminative(
        tiled,
        detector.split.biomarker,
        detector.model,
        config.selection,
        prefix,
        config.max_concurrent_slides,
    )
    biomarkers = train_biomarkers(
        cohort,
        cd_slides,
        config.biomarkers,
        config.biomarker,
        config.selection,
        config.analysis.bootstrap,
        prefix,
        config.tiling.overlap_px,
        config.biomarker_epochs,
    )
    analysis = analyze_features(
        cohort,
        cd_slides,
        list(biomarkers.results),
        list(biomarkers.skipped),
        config.analysis,
        prefix,
        config.max_concurrent_slides,
    )
    models = [detector.model, *(r.model for r in biomarkers.results)]
    create_markdown_artifact(
        "\n".join(
            [
                f"# Training run `{run}`",
                f"- cohort `{cohort.name}`: `{cohort.manifest_key}`",
                f"- report: `{analysis.report_key}`",
                *(f"- `{m.name}` version `{m.version}` in `{m.prefix}/`" for m in models),
                *(f"- {s.biomarker} skipped: {s.reason}" for s in biomarkers.skipped),
            ]
        ),
        key="training-run",
        description="Where a training run's models and report are.",
    )
    get_run_logger().info("run %s finished: report %s", run, analysis.report_key)
    return PipelineResult(
        run_id=run, cohort=cohort, detector=detector, biomarkers=biomarkers, analysis=analysis
    )
