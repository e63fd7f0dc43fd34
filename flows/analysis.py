"""``analyze_features``: nucleus features of the CD and BD patches, and the report.

The NucleiService computes the 75 features of every 40x CD patch of the biomarker
set, one ``ExtractFeaturesForShards`` call per slide (``{run}/features/``). Per
biomarker the patches are joined with the model's scores: the CD set is every
patch of the labelled slides, the BD set its biomarker-discriminative patches;
patches with fewer than three nuclei are left out (their spatial features are
meaningless). Then the random-forest ablation over the seven feature groups, the
Mann-Whitney U tests of the features between classes (BD patches) and of the immune
score by TP53 status (slides), and the HTML report.

The ablation, statistics and report run here with the analysis logic
(``services.analysis``), the same modules the AnalysisService serves; calling the
service instead is a change of this module only.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from prefect import flow, get_run_logger
from prefect.artifacts import create_link_artifact, create_table_artifact

from flows.clients import nuclei_stub, service_errors
from flows.config import Analysis
from flows.discriminative import read_parquet, write_parquet
from flows.fanout import submit_bounded
from flows.ingest import read_cohort
from flows.policy import pipeline_task
from flows.records import (
    AnalysisResult,
    BiomarkerResult,
    CdSlide,
    CohortRef,
    FeatureTableRef,
    SkippedBiomarker,
)
from flows.settings import FlowSettings
from services.analysis.ablation import run_ablation, table2
from services.analysis.aggregate import aggregate_slides
from services.analysis.figures import CurveSet, ReliabilitySet
from services.analysis.metrics import auprc, auroc, mcc_f1, pr_curve, roc_curve
from services.analysis.report import build_report
from services.analysis.statistics import compare_covariate, compare_groups
from services.common.errors import InvalidInput, Unavailable
from services.common.objectstore import ObjectStore
from services.common.stubs.histomarker.v1 import common_pb2, nuclei_pb2
from services.nuclei.features import FEATURE_NAMES

#: Resolution of the 40x patches, µm/px.
MPP_40X = 0.25
_JOIN = ["shard", "member"]


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
        for response in stub.ExtractFeaturesForShards(request, timeout=settings.rpc_timeout_s):
            if response.HasField("result"):
                table = response.result
                return FeatureTableRef(
                    slide_id=slide.slide_id,
                    table_key=table.table.key,
                    patch_count=int(table.patch_count),
                )
    raise Unavailable(f"ExtractFeaturesForShards of {slide.slide_id} ended without a result")


def patch_sets(scores: pd.DataFrame, features: pd.DataFrame) -> pd.DataFrame:
    """CD and BD rows of one biomarker: features joined with scores, ``patch_set``
    naming the set (a BD patch is in both); patches with few nuclei left out."""
    joined = scores.merge(features.drop(columns=["slide_id", "x", "y"], errors="ignore"), on=_JOIN)
    joined = joined[~joined["few_nuclei"].astype(bool)]
    cd = joined.assign(patch_set="CD")
    bd = joined[joined["bd"].astype(bool)].assign(patch_set="BD")
    return pd.concat([bd, cd], ignore_index=True)


def ablation_of(
    table: pd.DataFrame, biomarker: str, analysis: Analysis
) -> tuple[pd.DataFrame, list[str]]:
    """The ablation of each patch set that has enough patients; notes for the others."""
    results, notes = [], []
    for name in ("BD", "CD"):
        rows = table[table["patch_set"] == name]
        try:
            results.append(
                run_ablation(
                    rows,
                    "label",
                    biomarker=biomarker,
                    folds=analysis.folds,
                    seed=analysis.seed,
                    n_estimators=analysis.n_estimators,
                    bootstrap=analysis.bootstrap,
                )
            )
        except InvalidInput as exc:
            notes.append(f"{biomarker} {name}: {exc}")
    return (pd.concat(results, ignore_index=True) if results else pd.DataFrame()), notes


def statistics_of(table: pd.DataFrame, biomarker: str) -> tuple[pd.DataFrame, list[str]]:
    """Mann-Whitney U of the 75 features between classes on the BD patches (the CD
    patches when the BD set holds one class)."""
    for name in ("BD", "CD"):
        rows = table[table["patch_set"] == name]
        if rows["label"].nunique() == 2:
            result = compare_groups(rows, "label", list(FEATURE_NAMES))
            return result.assign(biomarker=biomarker, patch_set=name), []
    return pd.DataFrame(), [f"{biomarker}: no patch set holds both classes"]


@pipeline_task(task_run_name="analyse-{result.biomarker}")
def analyze_biomarker(
    result: BiomarkerResult, features: list[FeatureTableRef], analysis: Analysis, run_prefix: str
) -> dict[str, Any]:
    """Ablation and statistics of one biomarker's CD and BD patches.

    Returns:
        Keys of the stored patch sets, ablation and statistics tables, and notes on
        what could not be computed.
    """
    folder = f"{run_prefix}/analysis/{result.biomarker}"
    with FlowSettings().open_store() as store:
        scores = read_parquet(store, result.scores_key)
        table = patch_sets(scores, pd.concat([read_parquet(store, f.table_key) for f in features]))
        ablation, notes = ablation_of(table, result.biomarker, analysis)
        statistics, more = statistics_of(table, result.biomarker)
        keys = {
            "patch_sets": write_parquet(store, f"{folder}/patch_sets.parquet", table),
            "ablation": write_parquet(store, f"{folder}/ablation.parquet", ablation),
            "statistics": write_parquet(store, f"{folder}/statistics.parquet", statistics),
        }
    counts = table["patch_set"].value_counts()
    return {
        **keys,
        "biomarker": result.biomarker,
        "bd_patches": int(counts.get("BD", 0)),
        "cd_patches": int(counts.get("CD", 0)),
        "notes": notes + more,
    }


def curves_of(biomarker: str, scores: pd.DataFrame) -> list[CurveSet]:
    """Patch- and slide-level curves of the validation patients' scores."""
    validation = scores[scores["split"] == "validation"]
    out = []
    for level, frame in (("patch", validation), ("slide", aggregate_slides(validation))):
        labels, probabilities = frame["label"].to_numpy(), frame["probability"].to_numpy()
        roc, pr = roc_curve(labels, probabilities), pr_curve(labels, probabilities)
        summary = mcc_f1(labels, probabilities)
        out.append(
            CurveSet(
                name=biomarker.upper(),
                level=level,  # type: ignore[arg-type]
                fpr=roc.fpr,
                tpr=roc.tpr,
                precision=pr.precision,
                recall=pr.recall,
                mcc_f1_points=np.column_stack([summary.curve.f1, summary.curve.normalized_mcc]),
                auroc=auroc(labels, probabilities),
                auprc=auprc(labels, probabilities),
                mcc_f1=summary.metric,
                prevalence=float(labels.mean()),
            )
        )
    return out


def immune_statistics(store: ObjectStore, cohort: CohortRef, slide_ids: list[str]) -> pd.DataFrame:
    """The paper's covariate test: immune score by TP53 status on these slides."""
    table = read_cohort(cohort)
    rows = table[table["slide_id"].isin(slide_ids) & table["tp53"].notna()]
    rows = rows[rows["immune_score"].notna()]
    if rows["tp53"].nunique() < 2:
        return pd.DataFrame()
    frame = pd.DataFrame(
        {"tp53": rows["tp53"].astype(int), "immune_score": rows["immune_score"].astype(float)}
    )
    return compare_covariate(frame).assign(biomarker="tp53", patch_set="slides")


@pipeline_task()
def write_report(
    cohort: CohortRef,
    results: list[BiomarkerResult],
    analyses: list[dict[str, Any]],
    skipped: list[SkippedBiomarker],
    slide_ids: list[str],
    run_prefix: str,
) -> AnalysisResult:
    """Build ``report.html`` with its figures and store them under ``{run}/report/``."""
    with FlowSettings().open_store() as store:
        curves, reliability = [], []
        for result in results:
            scores = read_parquet(store, result.scores_key)
            curves += curves_of(result.biomarker, scores)
            validation = scores[scores["split"] == "validation"]
            p = validation["probability"].to_numpy()
            reliability.append(
                ReliabilitySet(
                    name=result.biomarker.upper(),
                    probabilities_by_name={"calibrated, TTA": np.column_stack([1 - p, p])},
                    labels=validation["label"].to_numpy(),
                )
            )
        ablations = [read_parquet(store, a["ablation"]) for a in analyses]
        ablation = pd.concat([a for a in ablations if not a.empty] or [pd.DataFrame()])
        statistics = pd.concat(
            [read_parquet(store, a["statistics"]) for a in analyses]
            + [immune_statistics(store, cohort, slide_ids)],
            ignore_index=True,
        )
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
        with tempfile.TemporaryDirectory(prefix="histomarker-report-") as scratch:
            out = Path(scratch)
            path = build_report(
                out,
                f"histomarker training run {run_prefix.rsplit('/', 1)[-1]}",
                summary=summary,
                curves=curves,
                reliability=reliability,
                ablation=ablation if not ablation.empty else None,
                statistics=statistics if not statistics.empty else None,
            )
            folder = f"{run_prefix}/report"
            for figure in sorted((out / "figures").glob("*.png")):
                store.put_file(f"{folder}/figures/{figure.name}", figure, content_type="image/png")
            report_key = f"{folder}/report.html"
            store.put_file(report_key, path, content_type="text/html")
        ablation_key = write_parquet(store, f"{run_prefix}/analysis/ablation.parquet", ablation)
        statistics_key = write_parquet(
            store, f"{run_prefix}/analysis/statistics.parquet", statistics
        )
        summary_key = f"{run_prefix}/analysis/summary.json"
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
