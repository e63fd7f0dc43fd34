"""The AnalysisService over real gRPC on 127.0.0.1 with a ``file://`` store.

Each RPC runs on small synthetic tables stored by reference; bad inputs are refused
with INVALID_ARGUMENT naming the problem, missing tables with NOT_FOUND, and the
service keeps serving. BuildReport's HTML is checked image by image.
"""

from __future__ import annotations

import base64
import html.parser
import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pandas as pd
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from services.analysis.aggregate import patch_and_slide_metrics
from services.analysis.server import AnalysisSettings, create
from services.common.grpc_client import open_channel
from services.common.objectstore import ObjectStore, open_store
from services.common.stubs.histomarker.v1 import analysis_pb2, analysis_pb2_grpc, common_pb2
from services.nuclei.features import FEATURE_NAMES

pytestmark = pytest.mark.slow

SERVICE = "histomarker.v1.AnalysisService"


def _ref(key: str) -> common_pb2.ObjectRef:
    return common_pb2.ObjectRef(key=key)


def _png(side: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(90, 250, (side, side, 3), np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _patch_table(rng: np.random.Generator, slides: int = 10, per_slide: int = 6) -> pd.DataFrame:
    rows = []
    for s in range(slides):
        label = s % 2
        for _ in range(per_slide):
            probability = float(np.clip(rng.normal(0.35 + 0.3 * label, 0.15), 0, 1))
            rows.append(
                {
                    "biomarker": "tp53",
                    "level": "patch",
                    "slide_id": f"S{s:02d}",
                    "patient_id": f"P{s:02d}",
                    "label": label,
                    "probability": probability,
                }
            )
    return pd.DataFrame(rows)


def _features(rng: np.random.Generator, slides: list[str], labels: dict[str, int]) -> pd.DataFrame:
    rows = []
    for slide in slides:
        for i in range(4):
            values = rng.normal(labels[slide] * 0.8, 1.0, len(FEATURE_NAMES))
            rows.append({"slide_id": slide, "few_nuclei": i == 3 and slide == slides[0]})
            rows[-1].update(dict(zip(FEATURE_NAMES, values, strict=True)))
    return pd.DataFrame(rows)


def _put_table(store: ObjectStore, key: str, table: pd.DataFrame) -> None:
    if key.endswith(".parquet"):
        buffer = io.BytesIO()
        table.to_parquet(buffer, index=False)
        store.put_bytes(key, buffer.getvalue())
    else:
        store.put_bytes(key, table.to_csv(index=False).encode())


def _shard(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _seed_store(store: ObjectStore) -> None:
    rng = np.random.default_rng(7)
    patches = _patch_table(rng)
    _put_table(store, "runs/r1/predictions.csv", patches)
    _put_table(store, "runs/r1/predictions.parquet", patches)
    slides = [f"S{s:02d}" for s in range(12)]
    labels = {slide: i % 2 for i, slide in enumerate(slides)}
    manifest = pd.DataFrame(
        {
            "slide_id": slides,
            "patient_id": [f"P{s:02d}" for s in range(12)],
            "tp53": [labels[s] for s in slides],
        }
    )
    _put_table(store, "cohorts/c1/manifest.csv", manifest)
    _put_table(store, "runs/r1/features/bd.parquet", _features(rng, slides, labels))
    _put_table(store, "runs/r1/features/cd.parquet", _features(rng, slides, labels))
    covariates = pd.DataFrame(
        {
            "tp53": [i % 2 for i in range(30)],
            "immune_score": rng.normal(0, 1, 30) + np.arange(30) % 2,
            "morph.area.mean": rng.normal(50, 5, 30),
        }
    )
    _put_table(store, "runs/r1/covariates.csv", covariates)
    store.put_bytes(
        "tiles/S01/abc/shards/40x-00000.tar",
        _shard({f"x{i}_y0.png": _png(32, i) for i in range(4)}),
    )
    grid = pd.DataFrame(
        {
            "slide_id": ["S01"] * 16,
            "x": [1024 * (i % 4) for i in range(16)],
            "y": [1024 * (i // 4) for i in range(16)],
            "width": [1024] * 16,
            "height": [1024] * 16,
            "probability": np.linspace(0, 1, 16),
        }
    )
    _put_table(store, "tiles/S01/abc/grid.parquet", grid)
    store.put_bytes("tiles/S01/abc/thumbnail.png", _png(64, 99))


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[analysis_pb2_grpc.AnalysisServiceStub, grpc.Channel, ObjectStore]]:
    root = tmp_path_factory.mktemp("analysis-service")
    store = open_store((root / "store").as_uri())
    _seed_store(store)
    server, port = create(AnalysisSettings(port=0, store_url=(root / "store").as_uri()))
    server.start()
    channel = open_channel(f"127.0.0.1:{port}")
    try:
        yield analysis_pb2_grpc.AnalysisServiceStub(channel), channel, store
    finally:
        channel.close()
        server.stop(0).wait()


def _refused(call, request, code=grpc.StatusCode.INVALID_ARGUMENT) -> str:
    with pytest.raises(grpc.RpcError) as info:
        result = call(request, timeout=30)
        if isinstance(result, Iterator):
            list(result)
    assert info.value.code() == code, info.value.details()
    details = info.value.details() or ""
    assert "Traceback" not in details
    return details


def _assert_serving(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    reply = health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_compute_metrics_from_a_table_matches_the_logic_and_is_stored(service) -> None:
    stub, _, store = service
    request = analysis_pb2.ComputeMetricsRequest(
        table=_ref("runs/r1/predictions.parquet"),
        biomarker=common_pb2.BIOMARKER_TP53,
        bootstrap_samples=50,
        seed=3,
        run_id="r1",
    )
    reply = stub.ComputeMetrics(request, timeout=60)
    table = pd.read_parquet(io.BytesIO(store.get_bytes("runs/r1/predictions.parquet")))
    expected = patch_and_slide_metrics(table, resamples=50, seed=3)
    assert reply.patch_level.count == 60 and reply.slide_level.count == 10
    assert reply.patch_level.auroc.value == pytest.approx(expected.patch.auroc.value)
    assert reply.slide_level.auprc.value == pytest.approx(expected.slide.auprc.value)
    assert reply.slide_level.auprc.ci_low == pytest.approx(expected.slide.auprc.ci_low)
    assert reply.patch_level.mcc_f1.best_threshold == pytest.approx(expected.patch.best_threshold)
    assert reply.patient_count == 10
    assert reply.report.key == "runs/r1/analysis/metrics-tp53.json"
    stored = json.loads(store.get_bytes(reply.report.key))
    assert stored["biomarker"] == "tp53"
    assert stored["slide_level"]["count"] == 10


def test_compute_metrics_inline_with_an_explicit_output(service) -> None:
    stub, _, store = service
    scores = analysis_pb2.PatchScores(
        slide_ids=["a", "a", "b", "b", "c", "d"],
        probabilities=[0.9, 0.8, 0.2, 0.3, 0.7, 0.1],
        labels=[True, True, False, False, True, False],
    )
    reply = stub.ComputeMetrics(
        analysis_pb2.ComputeMetricsRequest(
            scores=scores, bootstrap_samples=10, output=_ref("out/inline.json")
        ),
        timeout=60,
    )
    assert reply.patch_level.auroc.value == pytest.approx(1.0)
    assert reply.slide_level.count == 4
    assert store.exists("out/inline.json")


@pytest.mark.parametrize(
    ("scores", "expected"),
    [
        (dict(slide_ids=["a", "b"], probabilities=[0.1], labels=[True, False]), "differ in length"),
        (dict(slide_ids=["a", "b"], probabilities=[0.1, 0.2], labels=[True]), "differ in length"),
        (dict(slide_ids=["a", "b"], probabilities=[0.1, 0.2], labels=[True, True]), "one class"),
        (
            dict(slide_ids=["a", "b"], probabilities=[0.1, float("nan")], labels=[True, False]),
            "NaN",
        ),
        (
            dict(slide_ids=["a", "b"], probabilities=[0.1, 1.5], labels=[True, False]),
            "outside [0, 1]",
        ),
        (dict(slide_ids=["a", "b"], probabilities=[0.1, 0.2]), "labels are required"),
    ],
)
def test_bad_scores_are_invalid_argument_saying_which(service, scores, expected) -> None:
    stub, channel, _ = service
    request = analysis_pb2.ComputeMetricsRequest(
        scores=analysis_pb2.PatchScores(**scores), bootstrap_samples=5
    )
    details = _refused(stub.ComputeMetrics, request)
    assert expected in details, details
    _assert_serving(channel)


def test_bad_tables_and_missing_tables(service) -> None:
    stub, channel, store = service
    bad = pd.DataFrame(
        {"slide_id": ["a", "b", "c"], "label": [1, 0, 1], "probability": [0.2, np.nan, 0.4]}
    )
    _put_table(store, "bad/nan.csv", bad)
    _put_table(store, "bad/single.csv", bad.assign(label=1, probability=0.5))
    _put_table(store, "bad/range.csv", bad.assign(probability=[0.1, -0.2, 0.3]))
    _put_table(store, "bad/nolabel.csv", bad.drop(columns="label"))
    for key, expected in [
        ("bad/nan.csv", "NaN at rows 1"),
        ("bad/single.csv", "only one class"),
        ("bad/range.csv", "outside [0, 1] at rows 1"),
        ("bad/nolabel.csv", "lacks column(s) label"),
    ]:
        request = analysis_pb2.ComputeMetricsRequest(table=_ref(key), bootstrap_samples=5)
        assert expected in _refused(stub.ComputeMetrics, request)
    store.put_bytes("bad/table.xlsx", b"not a table")
    details = _refused(
        stub.ComputeMetrics, analysis_pb2.ComputeMetricsRequest(table=_ref("bad/table.xlsx"))
    )
    assert "bad/table.xlsx" in details
    details = _refused(
        stub.ComputeMetrics,
        analysis_pb2.ComputeMetricsRequest(table=_ref("runs/none/predictions.csv")),
        grpc.StatusCode.NOT_FOUND,
    )
    assert "runs/none/predictions.csv" in details
    details = _refused(
        stub.AggregateSlides,
        analysis_pb2.AggregateSlidesRequest(table=_ref("runs/none/p.parquet")),
        grpc.StatusCode.NOT_FOUND,
    )
    assert "runs/none/p.parquet" in details
    assert "run_id" in _refused(
        stub.ComputeMetrics,
        analysis_pb2.ComputeMetricsRequest(table=_ref("runs/r1/predictions.csv"), run_id="../x"),
    )
    assert "bucket" in _refused(
        stub.ComputeMetrics,
        analysis_pb2.ComputeMetricsRequest(
            table=common_pb2.ObjectRef(bucket="elsewhere", key="runs/r1/predictions.csv")
        ),
    )
    _assert_serving(channel)


def test_aggregate_slides_with_and_without_labels(service) -> None:
    stub, _, store = service
    reply = stub.AggregateSlides(
        analysis_pb2.AggregateSlidesRequest(
            table=_ref("runs/r1/predictions.csv"),
            aggregation=analysis_pb2.AGGREGATION_TOP_K_MEAN,
            top_k=2,
            run_id="r1",
        ),
        timeout=30,
    )
    assert [s.slide_id for s in reply.slides] == [f"S{s:02d}" for s in range(10)]
    assert all(s.patch_count == 6 and s.HasField("label") for s in reply.slides)
    assert reply.table.key == "runs/r1/analysis/slides.parquet"
    stored = pd.read_parquet(io.BytesIO(store.get_bytes(reply.table.key)))
    assert list(stored["slide_id"]) == [s.slide_id for s in reply.slides]
    unlabeled = stub.AggregateSlides(
        analysis_pb2.AggregateSlidesRequest(
            scores=analysis_pb2.PatchScores(
                slide_ids=["b", "a", "b"], probabilities=[0.2, 0.5, 0.4]
            ),
            aggregation=analysis_pb2.AGGREGATION_MEDIAN,
        ),
        timeout=30,
    )
    assert [(s.slide_id, s.patch_count) for s in unlabeled.slides] == [("a", 1), ("b", 2)]
    assert unlabeled.slides[1].score == pytest.approx(0.3)
    assert not unlabeled.slides[0].HasField("label") and not unlabeled.HasField("table")
    details = _refused(
        stub.AggregateSlides,
        analysis_pb2.AggregateSlidesRequest(
            scores=analysis_pb2.PatchScores(slide_ids=["a"], probabilities=[float("nan")])
        ),
    )
    assert "NaN" in details


def _ablation(stub, **fields) -> tuple[list, analysis_pb2.FeatureAblationResult]:
    request = analysis_pb2.RunFeatureAblationRequest(
        biomarker=common_pb2.BIOMARKER_TP53,
        manifest=_ref("cohorts/c1/manifest.csv"),
        groups=[analysis_pb2.FEATURE_GROUP_ALL, analysis_pb2.FEATURE_GROUP_INTENSITY],
        tree_count=10,
        folds=3,
        bootstrap_samples=20,
        **fields,
    )
    messages = list(stub.RunFeatureAblation(request, timeout=120))
    assert messages[-1].WhichOneof("event") == "result"
    progress = [m.progress for m in messages[:-1]]
    return progress, messages[-1].result


def test_run_feature_ablation_streams_progress_and_stores_the_cells(service) -> None:
    stub, _, store = service
    progress, result = _ablation(
        stub,
        bd_features=_ref("runs/r1/features/bd.parquet"),
        cd_features=_ref("runs/r1/features/cd.parquet"),
        run_id="r1",
    )
    assert [p.done for p in progress] == [1, 2, 3, 4]
    assert progress[-1].fraction == 1.0 and progress[-1].stage == "ablation"
    cells = [(c.patch_set, c.group, c.feature_count) for c in result.cells]
    assert cells == [
        (analysis_pb2.PATCH_SET_BIOMARKER_DISCRIMINATIVE, analysis_pb2.FEATURE_GROUP_ALL, 75),
        (analysis_pb2.PATCH_SET_BIOMARKER_DISCRIMINATIVE, analysis_pb2.FEATURE_GROUP_INTENSITY, 15),
        (analysis_pb2.PATCH_SET_CANCER_DISCRIMINATIVE, analysis_pb2.FEATURE_GROUP_ALL, 75),
        (analysis_pb2.PATCH_SET_CANCER_DISCRIMINATIVE, analysis_pb2.FEATURE_GROUP_INTENSITY, 15),
    ]
    bd = result.cells[0]
    assert bd.biomarker == common_pb2.BIOMARKER_TP53
    assert bd.patch_count == 47  # 48 patches, one flagged with few nuclei left out
    assert bd.patient_count == 12 and bd.folds == 3
    assert 0 <= bd.auprc.value <= 1 and bd.auprc.confidence == pytest.approx(0.95)
    assert bd.positive_count == 24
    assert result.table.key == "runs/r1/analysis/ablation-tp53.parquet"
    stored = pd.read_parquet(io.BytesIO(store.get_bytes(result.table.key)))
    assert len(stored) == 4 and set(stored["patch_set"]) == {"BD", "CD"}


def test_run_feature_ablation_refuses_bad_input(service) -> None:
    stub, channel, store = service
    call = stub.RunFeatureAblation
    base = dict(
        biomarker=common_pb2.BIOMARKER_TP53, bd_features=_ref("runs/r1/features/bd.parquet")
    )
    assert "biomarker is required" in _refused(
        call, analysis_pb2.RunFeatureAblationRequest(bd_features=base["bd_features"])
    )
    assert "give bd_features" in _refused(
        call, analysis_pb2.RunFeatureAblationRequest(biomarker=common_pb2.BIOMARKER_TP53)
    )
    # Without a manifest the feature table must carry patient_id and the label.
    assert "patient_id" in _refused(call, analysis_pb2.RunFeatureAblationRequest(**base))
    manifest = pd.DataFrame(
        {"slide_id": [f"S{s:02d}" for s in range(12)], "patient_id": "P", "tp53": 1}
    )
    _put_table(store, "cohorts/single/manifest.csv", manifest)
    details = _refused(
        call,
        analysis_pb2.RunFeatureAblationRequest(
            **base, manifest=_ref("cohorts/single/manifest.csv"), tree_count=5
        ),
    )
    assert "only one class" in details
    assert "folds" in _refused(call, analysis_pb2.RunFeatureAblationRequest(**base, folds=1))
    assert "seed" in _refused(call, analysis_pb2.RunFeatureAblationRequest(**base, seed=-1))
    _refused(
        call,
        analysis_pb2.RunFeatureAblationRequest(
            biomarker=common_pb2.BIOMARKER_TP53, bd_features=_ref("runs/r1/none.parquet")
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    _assert_serving(channel)


def test_compare_groups_from_a_table_and_inline(service) -> None:
    stub, _, store = service
    reply = stub.CompareGroups(
        analysis_pb2.CompareGroupsRequest(
            table=analysis_pb2.GroupTable(
                table=_ref("runs/r1/covariates.csv"), group_column="tp53", group_a="1"
            ),
            run_id="r1",
        ),
        timeout=30,
    )
    assert (reply.group_a, reply.group_b) == ("1", "0")
    assert [c.variable for c in reply.comparisons] == ["immune_score", "morph.area.mean"]
    immune = reply.comparisons[0]
    assert immune.count_a == 15 and immune.count_b == 15
    assert 0 <= immune.p_value <= immune.q_value <= 1
    assert reply.table.key == "runs/r1/analysis/statistics.parquet"
    assert store.exists(reply.table.key)
    inline = stub.CompareGroups(
        analysis_pb2.CompareGroupsRequest(
            variables=analysis_pb2.VariableSet(
                variables=[
                    analysis_pb2.VariableSamples(name="v", group_a=[5, 6, 7, 8], group_b=[1, 2]),
                    analysis_pb2.VariableSamples(name="w", group_a=[1, 2], group_b=[1, 2, 3]),
                ]
            ),
            alternative=analysis_pb2.ALTERNATIVE_GREATER,
        ),
        timeout=30,
    )
    assert (inline.group_a, inline.group_b) == ("A", "B")
    v, w = inline.comparisons
    assert (v.count_a, v.count_b, v.nan_dropped) == (4, 2, 0)
    assert v.effect_size == pytest.approx(1.0) and v.u_statistic == pytest.approx(8.0)
    assert (w.count_a, w.count_b) == (2, 3)
    details = _refused(
        stub.CompareGroups,
        analysis_pb2.CompareGroupsRequest(
            variables=analysis_pb2.VariableSet(
                variables=[
                    analysis_pb2.VariableSamples(name="v", group_a=[1, float("nan")], group_b=[1])
                ]
            )
        ),
    )
    assert "'v' group_a" in details and "NaN" in details
    details = _refused(
        stub.CompareGroups,
        analysis_pb2.CompareGroupsRequest(
            table=analysis_pb2.GroupTable(
                table=_ref("runs/r1/covariates.csv"), group_column="immune_score"
            )
        ),
    )
    assert "exactly two groups" in details


def _patch_sets(rng: np.random.Generator) -> pd.DataFrame:
    """A training flow's patch sets: BD rows of the positive slides only, CD of all."""
    slides = [f"S{s:02d}" for s in range(8)]
    labels = {slide: i % 2 for i, slide in enumerate(slides)}
    cd = _features(rng, slides, labels).assign(
        patient_id=lambda t: t["slide_id"].str.replace("S", "P"),
        label=lambda t: t["slide_id"].map(labels),
    )
    bd = cd[cd["label"] == 1]
    return pd.concat([bd.assign(patch_set="BD"), cd.assign(patch_set="CD")], ignore_index=True)


def test_run_feature_ablation_of_one_patch_sets_table_skips_unusable_sets(service) -> None:
    stub, _, store = service
    _put_table(store, "runs/r4/analysis/tp53/patch_sets.parquet", _patch_sets(_rng(4)))
    _, result = _ablation(
        stub,
        patch_sets=_ref("runs/r4/analysis/tp53/patch_sets.parquet"),
        label_column="label",
        skip_unusable_sets=True,
        output=_ref("runs/r4/analysis/tp53/ablation.parquet"),
    )
    assert list(result.notes) == ["tp53 BD: patch set 'BD': only one class (1) present"]
    assert {c.patch_set for c in result.cells} == {analysis_pb2.PATCH_SET_CANCER_DISCRIMINATIVE}
    assert [c.patch_count for c in result.cells] == [31, 31]  # one with few nuclei left out
    stored = pd.read_parquet(io.BytesIO(store.get_bytes(result.table.key)))
    assert stored["patch_set"].tolist() == ["CD", "CD"]
    # Without skipping, the one-class set refuses the call; both inputs at once too.
    details = _refused(
        stub.RunFeatureAblation,
        analysis_pb2.RunFeatureAblationRequest(
            biomarker=common_pb2.BIOMARKER_TP53,
            patch_sets=_ref("runs/r4/analysis/tp53/patch_sets.parquet"),
            label_column="label",
        ),
    )
    assert "only one class" in details
    details = _refused(
        stub.RunFeatureAblation,
        analysis_pb2.RunFeatureAblationRequest(
            biomarker=common_pb2.BIOMARKER_TP53,
            patch_sets=_ref("runs/r4/analysis/tp53/patch_sets.parquet"),
            bd_features=_ref("runs/r1/features/bd.parquet"),
        ),
    )
    assert "not both" in details


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def test_compare_groups_of_patch_sets_and_a_covariate_joined_into_one_table(service) -> None:
    stub, channel, store = service
    _put_table(store, "runs/r5/analysis/er/patch_sets.parquet", _patch_sets(_rng(5)))
    reply = stub.CompareGroups(
        analysis_pb2.CompareGroupsRequest(
            table=analysis_pb2.GroupTable(
                table=_ref("runs/r5/analysis/er/patch_sets.parquet"),
                group_column="label",
                value_columns=list(FEATURE_NAMES[:3]),
                patch_sets=[
                    analysis_pb2.PATCH_SET_BIOMARKER_DISCRIMINATIVE,
                    analysis_pb2.PATCH_SET_CANCER_DISCRIMINATIVE,
                ],
            ),
            biomarker=common_pb2.BIOMARKER_ER,
            output=_ref("runs/r5/analysis/er/statistics.parquet"),
        ),
        timeout=30,
    )
    assert reply.note == "" and len(reply.comparisons) == 3
    per_biomarker = pd.read_parquet(io.BytesIO(store.get_bytes(reply.table.key)))
    assert set(per_biomarker["patch_set"]) == {"CD"} and set(per_biomarker["biomarker"]) == {"er"}
    header = (
        "slide_id,patient_id,kind,site,split,tp53,pik3ca,er,pr,her2,basal,immune_score,slide_path"
    )
    rows = [
        f"S{i},P{i},cancer,A,,{i % 2},,,,,,{0.5 * i - (i % 2)},slides/S{i}.svs" for i in range(8)
    ]
    store.put_bytes("cohorts/c5/manifest.csv", "\n".join([header, *rows]).encode())
    covariate = analysis_pb2.CompareGroupsRequest(
        covariate=analysis_pb2.CovariateTable(
            manifest=_ref("cohorts/c5/manifest.csv"), slide_ids=[f"S{i}" for i in range(6)]
        ),
        biomarker=common_pb2.BIOMARKER_TP53,
        earlier_results=[reply.table],
        output=_ref("runs/r5/analysis/statistics.parquet"),
    )
    joined = stub.CompareGroups(covariate, timeout=30)
    (immune,) = joined.comparisons
    assert immune.variable == "immune_score" and (immune.count_a, immune.count_b) == (3, 3)
    stored = pd.read_parquet(io.BytesIO(store.get_bytes(joined.table.key)))
    assert stored["biomarker"].tolist() == ["er"] * 3 + ["tp53"]
    assert stored["patch_set"].tolist() == ["CD"] * 3 + ["slides"]
    # One class among the slides: a note, and the earlier tests alone are stored.
    del covariate.covariate.slide_ids[:]
    covariate.covariate.slide_ids.extend(["S1", "S3"])
    alone = stub.CompareGroups(covariate, timeout=30)
    assert alone.note and not alone.comparisons
    stored = pd.read_parquet(io.BytesIO(store.get_bytes(alone.table.key)))
    assert len(stored) == 3
    details = _refused(
        stub.CompareGroups,
        analysis_pb2.CompareGroupsRequest(
            covariate=analysis_pb2.CovariateTable(manifest=_ref("cohorts/c5/manifest.csv"))
        ),
    )
    assert "biomarker is required with covariate" in details
    _assert_serving(channel)


def test_build_report_of_summary_lines_and_biomarker_scores(service) -> None:
    stub, _, store = service
    scores = _patch_table(_rng(6)).drop(columns=["biomarker", "level"])
    scores["split"] = np.where(scores["slide_id"] < "S06", "validation", "train")
    _put_table(store, "runs/r6/biomarkers/tp53/patch_scores.parquet", scores)
    request = analysis_pb2.BuildReportRequest(
        title="histomarker training run r6",
        output_prefix="runs/r6/report",
        summary=[
            analysis_pb2.SummaryItem(name="cohort", value="tiny"),
            analysis_pb2.SummaryItem(name="notes", value="none"),
        ],
        scores=[
            analysis_pb2.ReportScores(
                biomarker=common_pb2.BIOMARKER_TP53,
                table=_ref("runs/r6/biomarkers/tp53/patch_scores.parquet"),
                split="validation",
                probabilities_name="calibrated, TTA",
            )
        ],
    )
    result = list(stub.BuildReport(request, timeout=120))[-1].result
    assert result.report.key == "runs/r6/report/report.html"
    assert sorted(ref.key.rsplit("/", 1)[-1] for ref in result.figures) == [
        "curves-tp53.png",
        "reliability-tp53.png",
    ]
    page = store.get_bytes(result.report.key).decode()
    assert page.index(">cohort<") < page.index(">notes<") < page.index('<section id="curves">')
    assert "TP53: patch AUROC" in page and "reliability diagram of TP53" in page
    # Summary lines alone make a report too.
    summary_only = analysis_pb2.BuildReportRequest(
        output_prefix="runs/r6/summary", summary=request.summary
    )
    assert list(stub.BuildReport(summary_only, timeout=60))[-1].result.report.key


class _Images(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[dict[str, str | None]] = []
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.images.append(dict(attrs))
        if tag == "a" and dict(attrs).get("href", "").startswith("figures/"):
            self.links.append(str(dict(attrs)["href"]))


def test_build_report_writes_html_whose_images_all_exist(service, tmp_path: Path) -> None:
    stub, channel, store = service
    # The ablation and statistics tables the other RPCs store.
    _ablation(
        stub,
        bd_features=_ref("runs/r1/features/bd.parquet"),
        output=_ref("runs/r2/analysis/ablation.csv"),
    )
    stub.CompareGroups(
        analysis_pb2.CompareGroupsRequest(
            table=analysis_pb2.GroupTable(
                table=_ref("runs/r1/covariates.csv"), group_column="tp53"
            ),
            output=_ref("runs/r2/analysis/statistics.parquet"),
        ),
        timeout=30,
    )
    shard = _ref("tiles/S01/abc/shards/40x-00000.tar")
    montage = analysis_pb2.ReportMontage(
        biomarker=common_pb2.BIOMARKER_TP53,
        patches=[
            analysis_pb2.MontagePatch(
                patch=common_pb2.PatchRef(slide_id="S01", shard=shard, member=f"x{i}_y0.png"),
                class_name="mutated" if i < 2 else "wild-type",
                probability=0.95,
            )
            for i in range(4)
        ],
    )
    heatmap = analysis_pb2.ReportHeatmap(
        slide_id="S01",
        biomarker=common_pb2.BIOMARKER_TP53,
        patches=_ref("tiles/S01/abc/grid.parquet"),
        thumbnail=_ref("tiles/S01/abc/thumbnail.png"),
        downsample=64.0,
        label="mutated",
    )
    request = analysis_pb2.BuildReportRequest(
        title="Run r2 <evaluation>",
        description="synthetic & small",
        run_id="r2",
        predictions=_ref("runs/r1/predictions.csv"),
        ablation=_ref("runs/r2/analysis/ablation.csv"),
        statistics=_ref("runs/r2/analysis/statistics.parquet"),
        montages=[montage],
        heatmaps=[heatmap],
        models=[common_pb2.ModelInfo(name="biomarker_tp53", version="1", temperature=1.5)],
        bootstrap_samples=20,
    )
    messages = list(stub.BuildReport(request, timeout=120))
    result = messages[-1].result
    progress = [m.progress for m in messages[:-1]]
    assert progress and progress[-1].done == progress[-1].total == 4  # curves, calib, montage, map
    assert result.report.key == "runs/r2/analysis/report/report.html"
    assert result.report.size_bytes > 0 and len(result.report.sha256) == 64
    page = store.get_bytes(result.report.key).decode()
    assert "Run r2 &lt;evaluation&gt;" in page and "synthetic &amp; small" in page
    for section in ("Discrimination", "Calibration", "Table 2", "Statistics", "Top BD patches"):
        assert section in page
    parser = _Images()
    parser.feed(page)
    figure_keys = {ref.key for ref in result.figures}
    assert len(parser.images) == len(figure_keys) == 4
    for image in parser.images:
        source = str(image["src"])
        assert source.startswith("data:image/png;base64,")
        Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1]))).verify()
        key = f"runs/r2/analysis/report/{image['data-file']}"
        assert key in figure_keys and store.exists(key), key
    assert {f"runs/r2/analysis/report/{link}" for link in parser.links} == figure_keys
    # A second, smaller report in the same place leaves no stale figures behind.
    smaller = analysis_pb2.BuildReportRequest(
        output_prefix="runs/r2/analysis/report", ablation=_ref("runs/r2/analysis/ablation.csv")
    )
    result = list(stub.BuildReport(smaller, timeout=60))[-1].result
    assert not result.figures
    assert not list(store.list("runs/r2/analysis/report/figures/"))
    _assert_serving(channel)


def test_build_report_refuses_bad_input(service) -> None:
    stub, channel, store = service
    call = stub.BuildReport
    assert "output_prefix or run_id" in _refused(call, analysis_pb2.BuildReportRequest())
    assert "nothing to report" in _refused(call, analysis_pb2.BuildReportRequest(run_id="r3"))
    _put_table(
        store,
        "bad/predictions.csv",
        pd.DataFrame({"slide_id": ["a", "b"], "label": [1, 1], "probability": [0.2, 0.3]}),
    )
    details = _refused(
        call,
        analysis_pb2.BuildReportRequest(run_id="r3", predictions=_ref("bad/predictions.csv")),
    )
    assert "only one class" in details and "predictions" in details
    _refused(
        call,
        analysis_pb2.BuildReportRequest(run_id="r3", ablation=_ref("runs/r3/none.parquet")),
        grpc.StatusCode.NOT_FOUND,
    )
    details = _refused(
        call,
        analysis_pb2.BuildReportRequest(
            run_id="r3",
            heatmaps=[
                analysis_pb2.ReportHeatmap(
                    slide_id="S01",
                    biomarker=common_pb2.BIOMARKER_TP53,
                    patches=_ref("tiles/S01/abc/grid.parquet"),
                    thumbnail=_ref("runs/r1/predictions.csv"),
                    downsample=64.0,
                )
            ],
        ),
    )
    assert "thumbnail is not a readable image" in details
    assert not store.exists("runs/r3/analysis/report/report.html")
    _assert_serving(channel)
