"""Lint of the gRPC contract in ``protos/`` and checks of the generated stubs.

The protos are compiled with ``--include_source_info`` into a ``FileDescriptorSet``,
which keeps every comment and line number, and checked against buf's style guide
(versioned package, ``XxxService``, one ``<Rpc>Request``/``<Rpc>Response`` pair per
RPC, prefixed enum values with ``_UNSPECIFIED = 0``, a comment on every element) and
our own rule that every numeric field's comment names its unit. Each failure names
the file, line and element to fix.
"""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
from google.protobuf import descriptor_pb2

from services.common import protogen

PROTO_ROOT = protogen.PROTO_ROOT
PACKAGE = "histomarker.v1"
PACKAGE_DIR = Path("histomarker", "v1")
EXPECTED_FILES = {"common", "tiling", "nuclei", "analysis", "prediction"}

#: The services and the RPCs each must have at least; the module that declares it.
REQUIRED_RPCS: dict[str, tuple[str, set[str]]] = {
    "TilingService": (
        "tiling",
        {
            "GetSlideInfo",
            "SegmentTissue",
            "TileSlide",
            "NormalizePatches",
            "FitStainReference",
            "UpsampleTo40x",
        },
    ),
    "NucleiService": ("nuclei", {"SegmentNuclei", "ExtractFeatures", "ExtractFeaturesForShards"}),
    "AnalysisService": (
        "analysis",
        {"ComputeMetrics", "AggregateSlides", "RunFeatureAblation", "CompareGroups", "BuildReport"},
    ),
    "PredictionService": (
        "prediction",
        {"PredictSlide", "UploadAndPredict", "PredictSlideStream", "PredictFromBag", "ListModels"},
    ),
}

_F = descriptor_pb2.FieldDescriptorProto
NUMERIC_TYPES = {
    _F.TYPE_DOUBLE,
    _F.TYPE_FLOAT,
    _F.TYPE_INT32,
    _F.TYPE_INT64,
    _F.TYPE_UINT32,
    _F.TYPE_UINT64,
    _F.TYPE_SINT32,
    _F.TYPE_SINT64,
    _F.TYPE_FIXED32,
    _F.TYPE_FIXED64,
    _F.TYPE_SFIXED32,
    _F.TYPE_SFIXED64,
}

#: Words a numeric field's comment may use to state its unit, by kind of quantity.
#: A comment passes if it contains one of them as a whole word (case-insensitive).
UNIT_VOCABULARY: dict[str, tuple[str, ...]] = {
    "length in pixels": ("px", "pixel", "pixels"),
    "length or resolution in microns": ("µm", "um", "micron", "microns", "mpp"),
    "area": ("mm²", "µm²"),
    "data size": ("bytes", "KiB", "MiB", "GiB"),
    "time": ("seconds", "milliseconds", "ms"),
    "angle": ("degrees", "radians"),
    "magnification": ("objective power",),
    "8-bit intensity": ("grey level", "grey levels", "gray level", "gray levels"),
    "how many": ("count", "number of"),
    "dimensionless": ("ratio", "fraction", "probability", "unitless"),
    "identifier": ("index", "id", "seed"),
    "a generic value": ("own unit", "same unit"),
}
_UNIT_WORD = re.compile(
    r"(?<![a-z])(?:"
    + "|".join(re.escape(word) for words in UNIT_VOCABULARY.values() for word in words)
    + r")(?![a-z])",
    re.IGNORECASE,
)

# Field numbers of descriptor.proto, which make up source_code_info paths.
_FILE_MESSAGE, _FILE_ENUM, _FILE_SERVICE = 4, 5, 6
_MESSAGE_FIELD, _MESSAGE_NESTED, _MESSAGE_ENUM, _MESSAGE_ONEOF = 2, 3, 4, 8
_ENUM_VALUE = 2
_SERVICE_METHOD = 2


@dataclass(frozen=True)
class Element:
    """One declaration of a proto file with its leading comment and place.

    Attributes:
        kind: ``message``, ``field``, ``oneof``, ``enum``, ``enum value``, ``service``
            or ``rpc``.
        name: Full dotted name, e.g. ``histomarker.v1.Rect.width``.
        where: ``protos/histomarker/v1/common.proto:74``.
        comment: The leading comment, stripped; empty if none.
        proto: The element's descriptor proto.
    """

    kind: str
    name: str
    where: str
    comment: str
    proto: object

    def __str__(self) -> str:
        return f"{self.where}: {self.kind} {self.name}"


def _compile(out: Path) -> descriptor_pb2.FileDescriptorSet:
    protos = protogen.find_protos(PROTO_ROOT)
    command = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"--proto_path={PROTO_ROOT}",
        f"--proto_path={protogen.well_known_protos_dir()}",
        "--include_source_info",
        f"--descriptor_set_out={out}",
        *(proto.as_posix() for proto in protos),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.fail(f"protoc cannot compile the protos:\n{done.stderr}")
    return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[descriptor_pb2.FileDescriptorProto]:
    """Our proto files as descriptors with source info (imports left out)."""
    out = tmp_path_factory.mktemp("descriptors") / "histomarker.binpb"
    return list(_compile(out).file)


def _walk(file: descriptor_pb2.FileDescriptorProto) -> Iterator[Element]:
    locations = {tuple(loc.path): loc for loc in file.source_code_info.location}

    def element(kind: str, name: str, path: tuple[int, ...], proto: object) -> Element:
        location = locations.get(path)
        line = location.span[0] + 1 if location is not None else 0
        comment = location.leading_comments.strip() if location is not None else ""
        return Element(kind, name, f"protos/{file.name}:{line}", comment, proto)

    def message(
        proto: descriptor_pb2.DescriptorProto, scope: str, path: tuple[int, ...]
    ) -> Iterator[Element]:
        name = f"{scope}.{proto.name}"
        if proto.options.map_entry:  # synthetic; its map field carries the comment
            return
        yield element("message", name, path, proto)
        for index, field in enumerate(proto.field):
            yield element("field", f"{name}.{field.name}", (*path, _MESSAGE_FIELD, index), field)
        for index, oneof in enumerate(proto.oneof_decl):
            synthetic = any(
                f.proto3_optional and f.HasField("oneof_index") and f.oneof_index == index
                for f in proto.field
            )
            if not synthetic:
                yield element(
                    "oneof", f"{name}.{oneof.name}", (*path, _MESSAGE_ONEOF, index), oneof
                )
        for index, nested in enumerate(proto.nested_type):
            yield from message(nested, name, (*path, _MESSAGE_NESTED, index))
        for index, nested_enum in enumerate(proto.enum_type):
            yield from enum(nested_enum, name, (*path, _MESSAGE_ENUM, index))

    def enum(
        proto: descriptor_pb2.EnumDescriptorProto, scope: str, path: tuple[int, ...]
    ) -> Iterator[Element]:
        name = f"{scope}.{proto.name}"
        yield element("enum", name, path, proto)
        for index, value in enumerate(proto.value):
            yield element("enum value", f"{name}.{value.name}", (*path, _ENUM_VALUE, index), value)

    package = file.package
    for index, proto in enumerate(file.message_type):
        yield from message(proto, package, (_FILE_MESSAGE, index))
    for index, proto_enum in enumerate(file.enum_type):
        yield from enum(proto_enum, package, (_FILE_ENUM, index))
    for index, service in enumerate(file.service):
        name = f"{package}.{service.name}"
        yield element("service", name, (_FILE_SERVICE, index), service)
        for method_index, method in enumerate(service.method):
            path = (_FILE_SERVICE, index, _SERVICE_METHOD, method_index)
            yield element("rpc", f"{name}.{method.name}", path, method)


def _elements(files: list[descriptor_pb2.FileDescriptorProto], kind: str) -> list[Element]:
    return [item for file in files for item in _walk(file) if item.kind == kind]


def _report(problems: list[str], rule: str) -> None:
    if problems:
        pytest.fail(f"{rule}:\n  " + "\n  ".join(problems), pytrace=False)


def _upper_snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).upper()


def test_the_five_files_exist_in_the_versioned_package(
    files: list[descriptor_pb2.FileDescriptorProto],
) -> None:
    names = {Path(file.name).stem for file in files}
    assert names == EXPECTED_FILES, f"proto files are {sorted(names)}"
    problems = []
    for file in files:
        if file.package != PACKAGE:
            problems.append(f"protos/{file.name}: package is {file.package!r}, not {PACKAGE!r}")
        if Path(file.name).parent != PACKAGE_DIR:
            problems.append(f"protos/{file.name}: must live in protos/{PACKAGE_DIR}/")
        if file.syntax != "proto3":
            problems.append(f"protos/{file.name}: syntax is {file.syntax!r}, not 'proto3'")
    _report(problems, "every file must be proto3 in package histomarker.v1")


def test_names_follow_the_casing_rules(files: list[descriptor_pb2.FileDescriptorProto]) -> None:
    pascal = re.compile(r"^[A-Z][A-Za-z0-9]*$")
    snake = re.compile(r"^[a-z][a-z0-9]*(?:_[a-z0-9]+)*$")
    upper = re.compile(r"^[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)*$")
    rules = {
        "message": pascal,
        "enum": pascal,
        "service": pascal,
        "rpc": pascal,
        "field": snake,
        "oneof": snake,
        "enum value": upper,
    }
    problems = [
        f"{item}: {item.name.rsplit('.', 1)[1]!r} does not match {rules[item.kind].pattern}"
        for file in files
        for item in _walk(file)
        if not rules[item.kind].match(item.name.rsplit(".", 1)[1])
    ]
    _report(problems, "messages, enums, services and RPCs are PascalCase, fields lower_snake")


def test_service_names_end_in_service(files: list[descriptor_pb2.FileDescriptorProto]) -> None:
    problems = [
        f"{item}: name must end in 'Service'"
        for item in _elements(files, "service")
        if not item.name.endswith("Service")
    ]
    _report(problems, "service names end in Service")


def test_the_four_services_have_their_rpcs(
    files: list[descriptor_pb2.FileDescriptorProto],
) -> None:
    declared = {
        service.name: (Path(file.name).stem, {method.name for method in service.method})
        for file in files
        for service in file.service
    }
    problems = []
    for service, (module, rpcs) in REQUIRED_RPCS.items():
        if service not in declared:
            problems.append(f"service {PACKAGE}.{service} is missing (expected in {module}.proto)")
            continue
        where, have = declared[service]
        if where != module:
            problems.append(f"service {service} is in {where}.proto, expected {module}.proto")
        for rpc in sorted(rpcs - have):
            problems.append(f"protos/histomarker/v1/{where}.proto: {service} lacks rpc {rpc}")
    _report(problems, "the contract's services and RPCs")


def test_each_rpc_has_its_own_request_and_response(
    files: list[descriptor_pb2.FileDescriptorProto],
) -> None:
    problems = []
    used_by: dict[str, str] = {}
    for item in _elements(files, "rpc"):
        method = item.proto
        assert isinstance(method, descriptor_pb2.MethodDescriptorProto)
        rpc = method.name
        for role, actual in (("Request", method.input_type), ("Response", method.output_type)):
            expected = f".{PACKAGE}.{rpc}{role}"
            if actual != expected:
                problems.append(f"{item}: {role.lower()} type is {actual[1:]}, not {expected[1:]}")
            if actual in used_by:
                problems.append(f"{item}: {actual[1:]} is already used by rpc {used_by[actual]}")
            used_by.setdefault(actual, rpc)
    _report(problems, "each RPC takes <Rpc>Request and returns <Rpc>Response, used nowhere else")


def test_enum_values_are_prefixed_and_zero_is_unspecified(
    files: list[descriptor_pb2.FileDescriptorProto],
) -> None:
    problems = []
    for item in _elements(files, "enum"):
        enum = item.proto
        assert isinstance(enum, descriptor_pb2.EnumDescriptorProto)
        prefix = _upper_snake(enum.name) + "_"
        zero = [value.name for value in enum.value if value.number == 0]
        if zero != [f"{prefix}UNSPECIFIED"]:
            problems.append(f"{item}: the zero value must be {prefix}UNSPECIFIED, is {zero}")
        problems.extend(
            f"{item}: value {value.name} lacks the prefix {prefix}"
            for value in enum.value
            if not value.name.startswith(prefix)
        )
    _report(problems, "enum values carry the enum's prefix and 0 is _UNSPECIFIED")


def test_every_element_has_a_leading_comment(
    files: list[descriptor_pb2.FileDescriptorProto],
) -> None:
    problems = [
        f"{item}: needs a leading // comment"
        for file in files
        for item in _walk(file)
        if not item.comment
    ]
    _report(problems, "every message, field, oneof, enum, value, service and rpc is commented")


def test_every_numeric_field_names_its_unit(
    files: list[descriptor_pb2.FileDescriptorProto],
) -> None:
    vocabulary = "; ".join(f"{kind}: {', '.join(words)}" for kind, words in UNIT_VOCABULARY.items())
    problems = []
    for item in _elements(files, "field"):
        field = item.proto
        assert isinstance(field, descriptor_pb2.FieldDescriptorProto)
        if field.type in NUMERIC_TYPES and not _UNIT_WORD.search(item.comment):
            problems.append(f"{item}: comment {item.comment!r} names no unit")
    _report(problems, f"numeric fields state their unit (use one of: {vocabulary})")


def test_the_unit_vocabulary_matches_whole_words() -> None:
    assert _UNIT_WORD.search("Area of the nucleus, in px².")
    assert _UNIT_WORD.search("Resolution, in µm per px (mpp).")
    assert _UNIT_WORD.search("Patches kept (a count).")
    assert not _UNIT_WORD.search("Expressed in pixies and identities.")
    assert not _UNIT_WORD.search("The width.")


# The generated stubs.

STUB_MODULE = "services.common.stubs.histomarker.v1"


def _import_stub(name: str) -> ModuleType:
    try:
        return importlib.import_module(f"{STUB_MODULE}.{name}")
    except ModuleNotFoundError as exc:
        pytest.fail(
            f"cannot import {STUB_MODULE}.{name} ({exc}); "
            "generate the stubs: python -m services.common.protogen",
            pytrace=False,
        )


def test_the_stubs_are_generated_from_the_current_protos() -> None:
    if not protogen.is_up_to_date(protogen.PROTO_ROOT, protogen.STUBS_DIR):
        pytest.fail(
            "services/common/stubs is missing or older than protos/: "
            "run python -m services.common.protogen",
            pytrace=False,
        )


@pytest.mark.parametrize("service", sorted(REQUIRED_RPCS))
def test_the_stubs_import_and_expose_the_service(service: str) -> None:
    module, rpcs = REQUIRED_RPCS[service]
    messages = _import_stub(f"{module}_pb2")
    grpc_module = _import_stub(f"{module}_pb2_grpc")
    descriptor = messages.DESCRIPTOR.services_by_name.get(service)
    assert descriptor is not None, f"{module}_pb2 has no service {service}"
    assert descriptor.full_name == f"{PACKAGE}.{service}"
    assert rpcs <= set(descriptor.methods_by_name)
    for attribute in (f"{service}Stub", f"{service}Servicer", f"add_{service}Servicer_to_server"):
        assert hasattr(grpc_module, attribute), f"{module}_pb2_grpc lacks {attribute}"


def test_the_stubs_import_each_other_inside_our_package() -> None:
    tiling = _import_stub("tiling_pb2")
    tiling_grpc = _import_stub("tiling_pb2_grpc")
    common = _import_stub("common_pb2")
    assert tiling.histomarker_dot_v1_dot_common__pb2 is common
    assert tiling_grpc.histomarker_dot_v1_dot_tiling__pb2 is tiling
    assert "histomarker" not in sys.modules, "a stub imported the top-level 'histomarker'"
    rect = common.Rect(x=1, y=2, width=512, height=512)
    assert common.Rect.FromString(rect.SerializeToString()) == rect


# The generator.


def test_rewrite_imports_moves_our_imports_into_the_stubs_package() -> None:
    source = (
        "from google.protobuf import timestamp_pb2 as _timestamp_pb2\n"
        "from histomarker.v1 import common_pb2 as histomarker_dot_v1_dot_common__pb2\n"
        "    from histomarker.v1 import tiling_pb2 as _tiling_pb2\n"
        "import grpc\n"
    )
    rewritten = protogen.rewrite_imports(source, ["histomarker"], "services.common.stubs")
    assert rewritten == (
        "from google.protobuf import timestamp_pb2 as _timestamp_pb2\n"
        "from services.common.stubs.histomarker.v1 import common_pb2 as "
        "histomarker_dot_v1_dot_common__pb2\n"
        "    from services.common.stubs.histomarker.v1 import tiling_pb2 as _tiling_pb2\n"
        "import grpc\n"
    )


def test_rewrite_imports_refuses_a_form_it_does_not_know() -> None:
    with pytest.raises(protogen.ProtogenError, match=re.escape("import histomarker.v1.common_pb2")):
        protogen.rewrite_imports(
            "import histomarker.v1.common_pb2\n", ["histomarker"], "services.common.stubs"
        )


@pytest.fixture
def proto_copy(tmp_path: Path) -> Path:
    """A copy of ``protos/`` that a test may edit."""
    root = tmp_path / "protos"
    shutil.copytree(PROTO_ROOT, root)
    return root


def test_generate_writes_rewritten_stubs_then_skips_when_up_to_date(
    proto_copy: Path, tmp_path: Path
) -> None:
    out = tmp_path / "stubs"
    first = protogen.generate(proto_copy, out)
    assert first.generated
    for name in ("__init__.py", "histomarker/__init__.py", "histomarker/v1/__init__.py"):
        assert (out / name).is_file(), name
    for stem in EXPECTED_FILES:
        for suffix in protogen.GENERATED_SUFFIXES:
            assert (out / "histomarker" / "v1" / f"{stem}{suffix}").is_file()
    stub = (out / "histomarker" / "v1" / "tiling_pb2.py").read_text(encoding="utf-8")
    assert "from services.common.stubs.histomarker.v1 import common_pb2" in stub
    typing_stub = (out / "histomarker" / "v1" / "tiling_pb2.pyi").read_text(encoding="utf-8")
    assert "from services.common.stubs.histomarker.v1 import common_pb2" in typing_stub
    for path in out.rglob("*.py*"):
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"^\s*(from|import) histomarker\b", text, re.M), path
    assert not list(tmp_path.glob(".stubs-*")), "a staging folder was left behind"

    second = protogen.generate(proto_copy, out)
    assert not second.generated

    common = proto_copy / "histomarker" / "v1" / "common.proto"
    common.write_text(common.read_text(encoding="utf-8") + "\n", encoding="utf-8")
    assert protogen.generate(proto_copy, out).generated


def test_a_failed_generation_keeps_the_previous_stubs(
    proto_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "stubs"
    protogen.generate(proto_copy, out)
    before = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    broken = proto_copy / "histomarker" / "v1" / "tiling.proto"
    broken.write_text(
        broken.read_text(encoding="utf-8") + "\nmessage Broken { NoSuchType x = 1; }\n",
        encoding="utf-8",
    )

    code = protogen.main(["--protos", str(proto_copy), "--out", str(out)])

    assert code == 1
    error = capsys.readouterr().err
    assert "protoc failed" in error and "NoSuchType" in error and "tiling.proto" in error
    after = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    assert after == before
    assert not list(tmp_path.glob(".stubs-*")), "a staging folder was left behind"
