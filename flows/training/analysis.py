"""``analyze_features``: nucleus features of the CD and BD patches, and the report.

The NucleiService computes the 75 features of every 40x CD patch of the biomarker
set, one ``ExtractFeaturesForShards`` call per slide (``{run}/features/``). Per
biomarker the patches are joined with the model's scores: the CD set is every
patch of the labelled slides, the BD set its biomarker-discriminative patches;
patches with fewer than three nuclei are left out (their spatial features are
meaningless). The AnalysisService then runs the random-forest ablation over the
seven feature groups (``RunFeatureAblation``), the Mann-Whitney U tests of the
features between classes on the BD patches (``CompareGroups``) and of the immune
score by TP53 status on the slides (``CompareGroups`` of the manifest's covariate,
which also joins the run's tests into one table), and draws the HTML report
(``BuildReport``). Every analysis runs in the service; this module names the keys,
joins the biomarkers' stored ablation tables into the run's, and shows Table 2 as a
Prefect artifact through the report's own ``ablation.table2``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import pandas as pd
from prefect import flow, get_run_logger
from prefect.artifacts import create_link_artifact, create_table_artifact

from flows.runtime.clients import analysis_stub, nuclei_stub, service_errors
from flows.runtime.fanout import submit_bounded
from flows.runtime.policy import pipeline_task
from flows.runtime.records import (
    AnalysisResult,
    BiomarkerResult,
    CdSlide,
    CohortRef,
    FeatureTableRef,
    SkippedBiomarker,
)
from flows.runtime.settings import FlowSettings
from flows.training.config import Analysis
from flows.training.discriminative import read_parquet, write_parquet
from services.analysis.ablation import table2
from services.common.errors import Unavailable
from services.common.stubs.histomarker.v1 import analysis_pb2, common_pb2, nuclei_pb2
from services.common.vocabulary import BIOMARKER_ENUMS
from services.nuclei.features import FEATURE_NAMES

#: Resolution of the 40x patches, µm/px.
MPP_40X = 0.25
_JOIN = ["shard", "member"]
#: The patch sets whose features are tested between classes, in order of preference.
_TESTED_SETS = (
    analysis_pb2.PATCH_SET_BIOMARKER_DISCRIMINATIVE,
    analysis_pb2.PATCH_SET_CANCER_DISCRIMINATIVE,
)
#: Name of the biomarker models' probabilities in the reliability diagrams.
_PROBABILITIES_NAME = "calibrated, TTA"


def _ref(key: str) -> common_pb2.ObjectRef:
    return common_pb2.ObjectRef(key=key)


def _streamed_result(responses: Iterable[Any], what: str) -> Any:
    """The result of a streamed call (its progress messages skipped)."""
    for response in responses:
        if response.HasField("result"):
            return response.result
    raise Unavailable(f"{what} ended without a result")


@pipeline_task(task_run_name="nuclei-{slide.slide_id}")
def extract_slide_features(slide: CdSlide, run_prefix: str) -> FeatureTableRef:
    """The 75 features of every 40x CD patch of one slide, through NucleiService."""
    settings = FlowSettings()
    request = nuclei_pb2.ExtractFeaturesForShardsRequest(
        shards=[common_pb2.ObjectRef(key=key) for key in slide.shards],
        output=common_pb2.ObjectRef(key=f"{run_prefix}/features/{slide.slide_id}.parquet"),
        mpp=MPP_40X,
    )
    with service_errors("NucleiService"), nuclei_stub(settings) as stub:
        table = _streamed_result(
            stub.ExtractFeaturesForShards(request, timeout=settings.rpc_timeout_s),
            f"ExtractFeaturesForShards of {slide.slide_id}",
        )
    return FeatureTableRef(
        slide_id=slide.slide_id, table_key=table.table.key, patch_count=int(table.patch_count)
    )


def patch_sets(scores: pd.DataFrame, features: pd.DataFrame) -> pd.DataFrame:
    """CD and BD rows of one biomarker: features joined with scores, ``patch_set``
    naming the set (a BD patch is in both); patches with few nuclei left out."""
    joined = scores.merge(features.drop(columns=["slide_id", "x", "y"], errors="ignore"), on=_JOIN)
    joined = joined[~joined["few_nuclei"].astype(bool)]
    cd = joined.assign(patch_set="CD")
    bd = joined[joined["bd"].astype(bool)].assign(patch_set="BD")
    return pd.concat([bd, cd], ignore_index=True)


def ablation_of(
    settings: FlowSettings, biomarker: str, patch_sets_key: str, analysis: Analysis, output: str
) -> list[str]:
    """The ablation of each patch set that has enough patients, stored at ``output``
    by the AnalysisService; notes for the sets it skipped."""
    request = analysis_pb2.RunFeatureAblationRequest(
        biomarker=BIOMARKER_ENUMS[biomarker],
        patch_sets=_ref(patch_sets_key),
        label_column="label",
        skip_unusable_sets=True,
        tree_count=analysis.n_estimators,
        folds=analysis.folds,
        bootstrap_samples=analysis.bootstrap,
        seed=analysis.seed,
        output=_ref(output),
    )
    with service_errors("AnalysisService"), analysis_stub(settings) as stub:
        result = _streamed_result(
            stub.RunFeatureAblation(request, timeout=settings.rpc_timeout_s),
            f"RunFeatureAblation of {biomarker}",
        )
    return list(result.notes)


def statistics_of(
    settings: FlowSettings, biomarker: str, patch_sets_key: str, output: str
) -> tuple[int, list[str]]:
    """Mann-Whitney U of the 75 features between classes on the BD patches (the CD
    patches when the BD set holds one class), stored at ``output`` by the
    AnalysisService: the number of tests, and a note when neither set holds both
    classes."""
    request = analysis_pb2.CompareGroupsRequest(
        table=analysis_pb2.GroupTable(
            table=_ref(patch_sets_key),
            group_column="label",
            value_columns=list(FEATURE_NAMES),
            patch_sets=_TESTED_SETS,
        ),
        biomarker=BIOMARKER_ENUMS[biomarker],
        output=_ref(output),
    )
    with service_errors("AnalysisService"), analysis_stub(settings) as stub:
        response = stub.CompareGroups(request, timeout=settings.rpc_timeout_s)
    return len(response.comparisons), [response.note] if response.note else []


@pipeline_task(task_run_name="analyse-{result.biomarker}")
def analyze_biomarker(
    result: BiomarkerResult, features: list[FeatureTableRef], analysis: Analysis, run_prefix: str
) -> dict[str, Any]:
    """Ablation and statistics of one biomarker's CD and BD patches.

    Returns:
        Keys of the stored patch sets, ablation and statistics tables, the number of
        tests stored, and notes on what could not be computed.
    """
    settings = FlowSettings()
    folder = f"{run_prefix}/analysis/{result.biomarker}"
    with settings.open_store() as store:
        scores = read_parquet(store, result.scores_key)
        table = patch_sets(scores, pd.concat([read_parquet(store, f.table_key) for f in features]))
        keys = {"patch_sets": write_parquet(store, f"{folder}/patch_sets.parquet", table)}
    keys["ablation"] = f"{folder}/ablation.parquet"
    notes = ablation_of(settings, result.biomarker, keys["patch_sets"], analysis, keys["ablation"])
    keys["statistics"] = f"{folder}/statistics.parquet"
    tests, more = statistics_of(settings, result.biomarker, keys["patch_sets"], keys["statistics"])
    counts = table["patch_set"].value_counts()
    return {
        **keys,
        "biomarker": result.biomarker,
        "bd_patches": int(counts.get("BD", 0)),
        "cd_patches": int(counts.get("CD", 0)),
        "tests": tests,
        "notes": notes + more,
    }


def immune_statistics(
    settings: FlowSettings,
    cohort: CohortRef,
    slide_ids: list[str],
    earlier_keys: list[str],
    output: str,
) -> int:
    """The paper's covariate test, immune score by TP53 status on these slides, after
    the tests stored at ``earlier_keys``: the AnalysisService stores them all, joined,
    at ``output`` (the earlier ones alone when the slides hold one TP53 class). Returns
    the number of its own tests."""
    request = analysis_pb2.CompareGroupsRequest(
        covariate=analysis_pb2.CovariateTable(
            manifest=_ref(cohort.manifest_key), covariate="immune_score", slide_ids=slide_ids
        ),
        biomarker=BIOMARKER_ENUMS["tp53"],
        earlier_results=[_ref(key) for key in earlier_keys],
        output=_ref(output),
    )
    with service_errors("AnalysisService"), analysis_stub(settings) as stub:
        response = stub.CompareGroups(request, timeout=settings.rpc_timeout_s)
    return len(response.comparisons)


def build_report(
    settings: FlowSettings,
    title: str,
    summary: dict[str, Any],
    results: list[BiomarkerResult],
    ablation_key: str | None,
    statistics_key: str | None,
    output_prefix: str,
) -> str:
    """The run's report drawn by the AnalysisService under ``output_prefix``: patch-
    and slide-level curves and a reliability diagram of each biomarker's validation
    patients, Table 2 and the statistics when there are any. Returns its key."""
    request = analysis_pb2.BuildReportRequest(
        title=title,
        output_prefix=output_prefix,
        summary=[analysis_pb2.SummaryItem(name=k, value=str(v)) for k, v in summary.items()],
        scores=[
            analysis_pb2.ReportScores(
                biomarker=BIOMARKER_ENUMS[r.biomarker],
                table=_ref(r.scores_key),
                split="validation",
                probabilities_name=_PROBABILITIES_NAME,
            )
            for r in results
        ],
    )
    if ablation_key is not None:
        request.ablation.CopyFrom(_ref(ablation_key))
    if statistics_key is not None:
        request.statistics.CopyFrom(_ref(statistics_key))
    with service_errors("AnalysisService"), analysis_stub(settings) as stub:
        built = _streamed_result(
            stub.BuildReport(request, timeout=settings.rpc_timeout_s), "BuildReport"
        )
    return str(built.report.key)


@pipeline_task()
def write_report(
    cohort: CohortRef,
    results: list[BiomarkerResult],
    analyses: list[dict[str, Any]],
    skipped: list[SkippedBiomarker],
    slide_ids: list[str],
    run_prefix: str,
) -> AnalysisResult:
    """Join the biomarkers' tables under ``{run}/analysis/``, have the report drawn
    under ``{run}/report/``, and write ``summary.json`` last."""
    settings = FlowSettings()
    ablation_key = f"{run_prefix}/analysis/ablation.parquet"
    statistics_key = f"{run_prefix}/analysis/statistics.parquet"
    with settings.open_store() as store:
        ablations = [read_parquet(store, a["ablation"]) for a in analyses]
        ablation = pd.concat([a for a in ablations if not a.empty] or [pd.DataFrame()])
        write_parquet(store, ablation_key, ablation)
    immune_tests = immune_statistics(
        settings, cohort, slide_ids, [a["statistics"] for a in analyses], statistics_key
    )
    statistics_empty = immune_tests + sum(a["tests"] for a in analyses) == 0
    notes = [n for a in analyses for n in a["notes"]] + [
        f"{s.biomarker} not trained: {s.reason}" for s in skipped
    ]
    summary = {
        "cohort": cohort.name,
        "biomarker slides": len(slide_ids),
        "models": ", ".join(f"{r.model.name} {r.model.version}" for r in results),
        "BD patches": ", ".join(f"{a['biomarker']} {a['bd_patches']}" for a in analyses),
        "notes": "; ".join(notes) or "none",
    }
    report_key = build_report(
        settings,
        f"histomarker training run {run_prefix.rsplit('/', 1)[-1]}",
        summary,
        results,
        None if ablation.empty else ablation_key,
        None if statistics_empty else statistics_key,
        f"{run_prefix}/report",
    )
    summary_key = f"{run_prefix}/analysis/summary.json"
    with settings.open_store() as store:
        store.put_bytes(summary_key, json.dumps(summary, indent=2).encode())
    return AnalysisResult(
        report_key=report_key,
        ablation_key=ablation_key,
        statistics_key=statistics_key,
        summary_key=summary_key,
        skipped=tuple(skipped),
    )


def table2_records(ablation: pd.DataFrame) -> list[dict[str, Any]]:
    """Table 2 (AUPRC per feature group, biomarker and patch set) as artifact rows."""
    if ablation.empty:
        return []
    wide = table2(ablation)
    return [
        {"features": index, **{f"{b} {s}": row[(b, s)] for b, s in wide.columns}}
        for index, row in wide.iterrows()
    ]


@flow(name="analyze_features", log_prints=True)
def analyze_features(
    cohort: CohortRef,
    cd_slides: list[CdSlide],
    results: list[BiomarkerResult],
    skipped: list[SkippedBiomarker],
    analysis: Analysis,
    run_prefix: str,
    max_concurrent_slides: int = 2,
) -> AnalysisResult:
    """Nuclei features, ablation, statistics and report (see the module docstring)."""
    calls = [{"slide": s, "run_prefix": run_prefix} for s in cd_slides if s.patches_40x > 0]
    features = submit_bounded(extract_slide_features, calls, max_concurrent_slides)
    analyses = [analyze_biomarker(r, features, analysis, run_prefix) for r in results]
    outcome = write_report(
        cohort, results, analyses, skipped, [s.slide_id for s in cd_slides], run_prefix
    )
    with FlowSettings().open_store() as store:
        link = store.presigned_get_url(outcome.report_key)
        ablation = read_parquet(store, outcome.ablation_key)
        statistics = read_parquet(store, outcome.statistics_key)
    create_link_artifact(
        link,
        link_text="report.html",
        key="training-report",
        description=f"The run's report: {outcome.report_key}",
    )
    rows = table2_records(ablation)
    if rows:
        create_table_artifact(rows, key="feature-ablation", description="Table 2: AUPRC [95% CI].")
    if not statistics.empty:
        top = statistics.sort_values("p_value").head(20)
        create_table_artifact(
            json.loads(top.to_json(orient="records")),
            key="feature-statistics",
            description="Mann-Whitney U: the 20 smallest p-values.",
        )
    get_run_logger().info("report: %s", outcome.report_key)
    return outcome
