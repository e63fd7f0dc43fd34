"""gRPC adapter of the AnalysisService: `histomarker serve analysis`.

The logic lives beside this file without any gRPC import: the pure ``metrics``,
``aggregate``, ``ablation``, ``statistics``, ``figures`` and ``report``, and what
each RPC makes of the caller's data in ``tables`` (store keys, reading, writing,
checks), ``curves`` (metrics, slide scores, curve sets), ``feature_ablation``,
``group_tests`` and ``report_assembly``. This module converts messages and binds it
to ``histomarker.v1.AnalysisService``. References in, references out: tables are read
from the object store and results are written back to it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pandas as pd

from services.analysis import curves, feature_ablation, group_tests, report_assembly, tables
from services.analysis.aggregate import TOP_K, LevelMetrics
from services.analysis.metrics import BOOTSTRAP_RESAMPLES, CONFIDENCE, MetricReport
from services.common.cancellation import WorkBudget
from services.common.errors import InvalidInput
from services.common.grpc_server import HistomarkerServer, ServiceBinding, create_server, serve
from services.common.objectstore import ObjectInfo
from services.common.refs import served_key
from services.common.settings import DEFAULT_PORTS, ServiceSettings
from services.common.streaming import run_streaming
from services.common.stubs.histomarker.v1 import analysis_pb2, analysis_pb2_grpc, common_pb2
from services.common.vocabulary import BIOMARKER_ENUMS, biomarker_name

SERVICE_NAME = "histomarker.v1.AnalysisService"

_AGGREGATIONS = {
    analysis_pb2.AGGREGATION_UNSPECIFIED: "mean",
    analysis_pb2.AGGREGATION_MEAN: "mean",
    analysis_pb2.AGGREGATION_MEDIAN: "median",
    analysis_pb2.AGGREGATION_TOP_K_MEAN: "topk",
}
_ALTERNATIVES = {
    analysis_pb2.ALTERNATIVE_UNSPECIFIED: "two-sided",
    analysis_pb2.ALTERNATIVE_TWO_SIDED: "two-sided",
    analysis_pb2.ALTERNATIVE_LESS: "less",
    analysis_pb2.ALTERNATIVE_GREATER: "greater",
}
_GROUPS = {
    analysis_pb2.FEATURE_GROUP_ALL: "all",
    analysis_pb2.FEATURE_GROUP_INTENSITY: "intensity",
    analysis_pb2.FEATURE_GROUP_SPATIAL: "spatial",
    analysis_pb2.FEATURE_GROUP_MORPHOLOGY: "morphology",
    analysis_pb2.FEATURE_GROUP_MORPHOLOGY_SPATIAL: "morphology+spatial",
    analysis_pb2.FEATURE_GROUP_SPATIAL_INTENSITY: "spatial+intensity",
    analysis_pb2.FEATURE_GROUP_MORPHOLOGY_INTENSITY: "morphology+intensity",
}
_GROUP_ENUMS = {name: number for number, name in _GROUPS.items()}
_PATCH_SETS = {
    "BD": analysis_pb2.PATCH_SET_BIOMARKER_DISCRIMINATIVE,
    "CD": analysis_pb2.PATCH_SET_CANCER_DISCRIMINATIVE,
}
_PATCH_SET_NAMES = {number: name for name, number in _PATCH_SETS.items()}


class AnalysisSettings(ServiceSettings):
    """Settings of the AnalysisService (environment prefix ``HISTOMARKER_``)."""

    service_name: str = "analysis"
    port: int = DEFAULT_PORTS["analysis"]
    #: The bucket this service serves (refs naming another bucket are refused).
    bucket: str = "histomarker"


def _choice(table: dict[Any, str], value: int, what: str) -> str:
    if value not in table:
        raise InvalidInput(f"{what}: unknown value {value}")
    return table[value]


def _confidence(value: float) -> float:
    return CONFIDENCE if value == 0 else value


def estimate_to_proto(value: float, low: float, high: float, confidence: float) -> Any:
    """An Estimate message; a missing interval has confidence 0 and bounds = value."""
    if confidence == 0 or math.isnan(low) or math.isnan(high):
        return common_pb2.Estimate(value=value, ci_low=value, ci_high=value, confidence=0.0)
    return common_pb2.Estimate(value=value, ci_low=low, ci_high=high, confidence=confidence)


def metric_set(report: MetricReport) -> analysis_pb2.MetricSet:
    """Our metric report as a MetricSet message."""

    def estimate(e: Any) -> Any:
        # Every resample single-class: NaN bounds, sent as such with their level.
        return common_pb2.Estimate(
            value=e.value, ci_low=e.ci_low, ci_high=e.ci_high, confidence=e.confidence
        )

    return analysis_pb2.MetricSet(
        count=report.count,
        positive_count=report.positive_count,
        auroc=estimate(report.auroc),
        auprc=estimate(report.auprc),
        mcc_f1=analysis_pb2.MccF1(
            metric=estimate(report.mcc_f1),
            best_threshold=report.best_threshold,
            best_mcc=report.best_mcc,
            best_f1=report.best_f1,
        ),
        ece=report.ece,
        bootstrap_used=report.bootstrap.used,
    )


def _progress(stage: str, done: int, total: int, unit: str) -> common_pb2.Progress:
    return common_pb2.Progress(
        stage=stage,
        done=done,
        total=total,
        fraction=done / max(total, 1),
        message=f"{stage}: {done}/{total} {unit}",
    )


class AnalysisServicer(analysis_pb2_grpc.AnalysisServiceServicer):
    """Implements ``histomarker.v1.AnalysisService`` over one object store."""

    def __init__(self, settings: AnalysisSettings) -> None:
        self.settings = settings
        self.store = settings.open_store()

    # -- helpers ---------------------------------------------------------------------
    def _key(self, ref: common_pb2.ObjectRef, what: str) -> str:
        return served_key(ref, self.settings.bucket, what)

    def _ref(self, info: ObjectInfo) -> common_pb2.ObjectRef:
        return common_pb2.ObjectRef(
            bucket=self.settings.bucket,
            key=info.key,
            sha256=info.sha256 or "",
            size_bytes=info.size_bytes,
        )

    def _table(self, ref: common_pb2.ObjectRef, what: str) -> pd.DataFrame:
        return tables.load_table(self.store, self._key(ref, what), what)

    def _output(self, request: Any, name: str) -> str | None:
        given = self._key(request.output, "output") if request.HasField("output") else ""
        return tables.output_key(given, request.run_id, name)

    def _patches(self, request: Any) -> pd.DataFrame:
        which = request.WhichOneof("input")
        if which == "table":
            return self._table(request.table, "table")
        if which == "scores":
            scores = request.scores
            return curves.inline_patches(
                list(scores.slide_ids),
                list(scores.probabilities),
                list(scores.labels),
                list(scores.patient_ids),
            )
        raise InvalidInput("input: give a table or inline scores")

    @staticmethod
    def _budget(context: grpc.ServicerContext) -> WorkBudget:
        return WorkBudget(context.time_remaining(), lambda: not context.is_active())

    # -- RPCs ------------------------------------------------------------------------
    def ComputeMetrics(self, request: Any, context: grpc.ServicerContext) -> Any:
        biomarker = biomarker_name(request.biomarker, required=False)
        method = _choice(_AGGREGATIONS, request.aggregation, "aggregation")
        top_k = tables.check_count(request.top_k, "top_k", TOP_K, 2**31 - 1, low=1)
        resamples = tables.check_count(
            request.bootstrap_samples,
            "bootstrap_samples",
            BOOTSTRAP_RESAMPLES,
            tables.MAX_BOOTSTRAP,
        )
        seed = tables.check_seed(request.seed)
        output = self._output(request, f"metrics-{biomarker or 'scores'}.json")
        if request.WhichOneof("input") == "scores" and not request.scores.labels:
            raise InvalidInput("scores: labels are required to compute metrics")
        table = curves.select_biomarker(self._patches(request), biomarker, "table")
        budget = self._budget(context)
        budget.check()
        result: LevelMetrics = curves.level_metrics(
            table,
            method,
            top_k,
            resamples=resamples,
            confidence=_confidence(request.confidence),
            seed=seed,
        )
        budget.check()
        response = analysis_pb2.ComputeMetricsResponse(
            patch_level=metric_set(result.patch),
            slide_level=metric_set(result.slide),
            patient_count=result.patient_count,
        )
        if output is not None:
            info = tables.store_json(self.store, output, curves.metrics_json(result, biomarker))
            response.report.CopyFrom(self._ref(info))
        return response

    def AggregateSlides(self, request: Any, context: grpc.ServicerContext) -> Any:
        method = _choice(_AGGREGATIONS, request.aggregation, "aggregation")
        top_k = tables.check_count(request.top_k, "top_k", TOP_K, 2**31 - 1, low=1)
        output = self._output(request, "slides.parquet")
        if output is not None:
            tables.table_format(output)
        slides = curves.slide_scores(self._patches(request), method, top_k)
        response = analysis_pb2.AggregateSlidesResponse()
        for row in slides.to_dict("records"):
            score = analysis_pb2.SlideScore(
                slide_id=row["slide_id"],
                score=float(row["probability"]),
                patch_count=int(row["patch_count"]),
                patient_id=str(row["patient_id"]),
            )
            if "label" in row:
                score.label = bool(row["label"])
            response.slides.append(score)
        if output is not None:
            response.table.CopyFrom(self._ref(tables.store_table(self.store, output, slides)))
        return response

    def RunFeatureAblation(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        biomarker = biomarker_name(request.biomarker)
        assert biomarker is not None
        groups = [_choice(_GROUPS, value, "groups") for value in request.groups]
        trees = tables.check_count(request.tree_count, "tree_count", 200, tables.MAX_TREES)
        folds = tables.check_count(
            request.folds, "folds", 5, tables.MAX_FOLDS, low=tables.MIN_FOLDS
        )
        bootstrap = tables.check_count(
            request.bootstrap_samples, "bootstrap_samples", 0, tables.MAX_BOOTSTRAP
        )
        seed = tables.check_seed(request.seed)
        output = self._output(request, f"ablation-{biomarker}.parquet")
        if output is not None:
            tables.table_format(output)
        confidence = _confidence(request.confidence)
        if not 0 < confidence < 1:
            raise InvalidInput(f"confidence must be strictly between 0 and 1, got {confidence}")
        manifest = (
            self._table(request.manifest, "manifest") if request.HasField("manifest") else None
        )
        prepared = feature_ablation.ablation_sets(
            self._ablation_inputs(request),
            manifest,
            biomarker,
            include_few_nuclei=request.include_few_nuclei,
            allow_empty=request.skip_unusable_sets,
        )
        budget = self._budget(context)

        def work(progress: Callable[[int, int], None]) -> tuple[pd.DataFrame, list[str]]:
            return feature_ablation.ablation(
                prepared,
                biomarker,
                groups,
                label_column=request.label_column,
                folds=folds,
                trees=trees,
                bootstrap=bootstrap,
                confidence=confidence,
                seed=seed,
                skip_unusable=request.skip_unusable_sets,
                progress=progress,
                budget=budget,
            )

        for kind, value in run_streaming(
            lambda report: work(lambda d, t: report((d, t))), "feature-ablation"
        ):
            if kind == "progress":
                yield analysis_pb2.RunFeatureAblationResponse(
                    progress=_progress("ablation", value[0], value[1], "cells")
                )
                continue
            table, notes = value
            cells = [self._cell(row, confidence) for row in table.to_dict("records")]
            result = analysis_pb2.FeatureAblationResult(cells=cells, notes=notes)
            if output is not None:
                result.table.CopyFrom(self._ref(tables.store_table(self.store, output, table)))
            yield analysis_pb2.RunFeatureAblationResponse(result=result)

    def _ablation_inputs(self, request: Any) -> dict[str, pd.DataFrame]:
        """The patch sets' feature tables: BD and CD given apart, or one table of both."""
        if request.HasField("patch_sets"):
            if request.HasField("bd_features") or request.HasField("cd_features"):
                raise InvalidInput("give patch_sets or bd_features/cd_features, not both")
            return feature_ablation.split_patch_sets(
                self._table(request.patch_sets, "patch_sets"), "patch_sets"
            )
        return {
            name: self._table(getattr(request, field), field)
            for name, field in (("BD", "bd_features"), ("CD", "cd_features"))
            if request.HasField(field)
        }

    @staticmethod
    def _cell(row: dict[str, Any], confidence: float) -> analysis_pb2.AblationCell:
        patches = int(row["n_patches"])
        return analysis_pb2.AblationCell(
            biomarker=BIOMARKER_ENUMS.get(str(row["biomarker"]), common_pb2.BIOMARKER_UNSPECIFIED),
            patch_set=_PATCH_SETS.get(str(row["patch_set"]), analysis_pb2.PATCH_SET_UNSPECIFIED),
            group=_GROUP_ENUMS.get(str(row["group"]), analysis_pb2.FEATURE_GROUP_UNSPECIFIED),
            feature_count=int(row["n_features"]),
            auprc=estimate_to_proto(
                float(row["auprc"]),
                float(row["ci_low"]),
                float(row["ci_high"]),
                confidence,
            ),
            patch_count=patches,
            positive_count=round(float(row["prevalence"]) * patches),
            patient_count=int(row["n_patients"]),
            prevalence=float(row["prevalence"]),
            folds=int(row["folds"]),
            dropped_rows=int(row["dropped_rows"]),
            note=str(row["note"]),
        )

    def CompareGroups(self, request: Any, context: grpc.ServicerContext) -> Any:
        alternative = _choice(_ALTERNATIVES, request.alternative, "alternative")
        fdr = 0.05 if request.fdr == 0 else request.fdr
        output = self._output(request, "statistics.parquet")
        if output is not None:
            tables.table_format(output)
        biomarker = biomarker_name(request.biomarker, required=False) or ""
        earlier = [
            self._table(ref, f"earlier_results[{i}]")
            for i, ref in enumerate(request.earlier_results)
        ]
        comparison = self._comparison(request, biomarker, alternative=alternative, fdr=fdr)
        result = comparison.table
        response = analysis_pb2.CompareGroupsResponse(
            group_a=str(result.attrs.get("group_a", "")),
            group_b=str(result.attrs.get("group_b", "")),
            note=comparison.note,
        )
        for row in result.to_dict("records"):
            response.comparisons.append(
                analysis_pb2.GroupComparison(
                    variable=str(row["variable"]),
                    count_a=int(row["count_a"]),
                    count_b=int(row["count_b"]),
                    median_a=float(row["median_a"]),
                    median_b=float(row["median_b"]),
                    u_statistic=float(row["u_statistic"]),
                    p_value=float(row["p_value"]),
                    q_value=float(row["q_value"]),
                    significant=bool(row["significant"]),
                    effect_size=float(row["rank_biserial"]),
                    nan_dropped=int(row["nan_dropped"]),
                )
            )
        if output is not None:
            stored = tables.joined(earlier, result)
            response.table.CopyFrom(self._ref(tables.store_table(self.store, output, stored)))
        return response

    def _comparison(
        self, request: Any, biomarker: str, *, alternative: str, fdr: float
    ) -> group_tests.Comparison:
        """The tests of CompareGroups' input: a table, inline variables or a covariate."""
        which = request.WhichOneof("input")
        if which == "table":
            spec = request.table
            if not spec.HasField("table"):
                raise InvalidInput("table.table: the table's object reference is required")
            return group_tests.compare_table(
                self._table(spec.table, "table.table"),
                spec.group_column,
                spec.group_a,
                list(spec.value_columns),
                alternative=alternative,
                fdr=fdr,
                patch_sets=[
                    _choice(_PATCH_SET_NAMES, value, "table.patch_sets")
                    for value in spec.patch_sets
                ],
                biomarker=biomarker,
            )
        if which == "variables":
            return group_tests.compare_inline(
                [(v.name, list(v.group_a), list(v.group_b)) for v in request.variables.variables],
                alternative=alternative,
                fdr=fdr,
                biomarker=biomarker,
            )
        if which == "covariate":
            spec = request.covariate
            if not biomarker:
                raise InvalidInput(
                    "biomarker is required with covariate: its classes are the groups"
                )
            if not spec.HasField("manifest"):
                raise InvalidInput(
                    "covariate.manifest: the manifest's object reference is required"
                )
            manifest = tables.load_manifest(
                self.store, self._key(spec.manifest, "covariate.manifest"), "covariate.manifest"
            )
            return group_tests.compare_slide_covariate(
                manifest,
                biomarker,
                spec.covariate,
                list(spec.slide_ids),
                alternative=alternative,
                fdr=fdr,
            )
        raise InvalidInput("input: give a table, inline variables or a covariate")

    def BuildReport(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        prefix = report_assembly.report_prefix(request.output_prefix, request.run_id)
        resamples = tables.check_count(
            request.bootstrap_samples, "bootstrap_samples", 0, tables.MAX_BOOTSTRAP
        )
        seed = tables.check_seed(request.seed)
        if len(request.heatmaps) > report_assembly.MAX_HEATMAPS:
            raise InvalidInput(f"heatmaps: at most {report_assembly.MAX_HEATMAPS} per report")
        if sum(len(m.patches) for m in request.montages) > report_assembly.MAX_MONTAGE_PATCHES:
            raise InvalidInput(
                f"montages: at most {report_assembly.MAX_MONTAGE_PATCHES} patches in all"
            )
        budget = self._budget(context)
        inputs = self._report_inputs(request, resamples, seed)

        def work(progress: Callable[[int, int], None]) -> Any:
            return report_assembly.write_report(
                self.store, prefix, inputs, progress=progress, budget=budget
            )

        for kind, value in run_streaming(
            lambda report: work(lambda d, t: report((d, t))), "build-report"
        ):
            if kind == "progress":
                yield analysis_pb2.BuildReportResponse(
                    progress=_progress("figures", value[0], value[1], "figures")
                )
                continue
            html, figures = value
            yield analysis_pb2.BuildReportResponse(
                result=analysis_pb2.BuiltReport(
                    report=self._ref(html), figures=[self._ref(f) for f in figures]
                )
            )

    def _report_inputs(
        self, request: Any, resamples: int, seed: int
    ) -> report_assembly.ReportInputs:
        title = request.title.strip() or (
            f"histomarker run {request.run_id}" if request.run_id else "histomarker report"
        )
        inputs = report_assembly.ReportInputs(
            title=title[: report_assembly.MAX_TITLE_CHARS],
            summary=report_assembly.summary_lines([(i.name, i.value) for i in request.summary]),
        )
        if request.description:
            inputs.summary["description"] = request.description[
                : report_assembly.MAX_DESCRIPTION_CHARS
            ]
        for i, model in enumerate(request.models):
            inputs.summary[f"model {i + 1}"] = (
                f"{model.name} {model.version} ({model.architecture or '?'}, "
                f"T={model.temperature:.3g}, threshold {model.threshold:.3g})"
            )
        if request.HasField("predictions"):
            key = self._key(request.predictions, "predictions")
            inputs.summary["predictions"] = key
            inputs.curves, inputs.reliability = curves.prediction_curves(
                tables.load_table(self.store, key, "predictions"), resamples=resamples, seed=seed
            )
        for i, item in enumerate(request.scores):
            what = f"scores[{i}]"
            name = biomarker_name(item.biomarker, f"{what}.biomarker")
            assert name is not None
            sets, reliability = curves.biomarker_curves(
                name,
                self._table(item.table, f"{what}.table"),
                split=item.split,
                probabilities_name=item.probabilities_name,
                resamples=resamples,
                seed=seed,
            )
            inputs.curves += sets
            inputs.reliability.append(reliability)
        if request.HasField("ablation"):
            inputs.ablation = report_assembly.ablation_for_report(
                self._table(request.ablation, "ablation")
            )
        if request.HasField("statistics"):
            inputs.statistics = self._table(request.statistics, "statistics")
        shards: dict[str, bytes] = {}
        for i, montage in enumerate(request.montages):
            what = f"montages[{i}]"
            name = biomarker_name(montage.biomarker, f"{what}.biomarker")
            patches = []
            for j, item in enumerate(montage.patches):
                where = f"{what}.patches[{j}]"
                shard = self._key(item.patch.shard, f"{where}.patch.shard")
                if not item.patch.member:
                    raise InvalidInput(f"{where}.patch.member is required")
                if shard not in shards:
                    shards[shard] = self.store.get_bytes(shard)
                data = report_assembly.shard_member(shards[shard], item.patch.member, shard)
                image = report_assembly.decode_checked_image(
                    data, f"{where} ({item.patch.member[:80]})"
                )
                caption = f"{item.patch.slide_id} p={item.probability:.2f}".strip()
                patches.append((item.class_name, image, caption))
            if patches:
                inputs.montages.append(report_assembly.montage(str(name).upper(), patches))
        patch_tables: dict[str, pd.DataFrame] = {}
        for i, item in enumerate(request.heatmaps):
            what = f"heatmaps[{i}]"
            name = biomarker_name(item.biomarker, f"{what}.biomarker")
            assert name is not None
            patches_key = self._key(item.patches, f"{what}.patches")
            if patches_key not in patch_tables:
                patch_tables[patches_key] = tables.load_table(
                    self.store, patches_key, f"{what}.patches"
                )
            rows = report_assembly.heatmap_patches(
                patch_tables[patches_key], item.slide_id, name, item.downsample, what
            )
            thumbnail = report_assembly.decode_checked_image(
                self.store.get_bytes(self._key(item.thumbnail, f"{what}.thumbnail")),
                f"{what}.thumbnail",
            )
            inputs.heatmaps.append(
                report_assembly.heatmap(
                    item.slide_id, name.upper(), thumbnail, item.downsample, rows, item.label
                )
            )
        if inputs.is_empty() and not request.summary:
            raise InvalidInput(
                "nothing to report: give predictions, scores, ablation, statistics, montages, "
                "heatmaps or summary lines"
            )
        return inputs


def bindings(settings: AnalysisSettings | None = None) -> list[ServiceBinding]:
    """The service this process hosts."""
    servicer = AnalysisServicer(settings or AnalysisSettings())
    return [
        ServiceBinding(
            SERVICE_NAME, servicer, analysis_pb2_grpc.add_AnalysisServiceServicer_to_server
        )
    ]


def create(settings: ServiceSettings | None = None) -> tuple[HistomarkerServer, int]:
    """Build the server (bound, not started) and return it with its port."""
    analysis = (
        AnalysisSettings(**settings.model_dump()) if settings is not None else AnalysisSettings()
    )
    return create_server(analysis, bindings(analysis))


def main() -> None:
    """Serve until SIGTERM/SIGINT."""
    settings = AnalysisSettings()
    serve(settings, bindings(settings))


if __name__ == "__main__":
    main()
