"""Hypothesis strategies for arbitrary protobuf messages, and raw calls to any RPC.

Used by the fuzz tests of every gRPC service: a message's strategy is derived from
its descriptor, so new fields are fuzzed without touching the tests. Values lean
towards the troublesome: extreme integers, NaN and infinities, unknown enum
numbers, empty and oversized strings, path-like keys, non-ASCII text and bytes that
are not images.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import strategies as st

#: Strings that reach past the first validation step: object keys in and out of
#: bounds, traversal attempts, ids with odd characters.
NASTY_STRINGS = (
    "",
    ".",
    "..",
    "../../etc/passwd",
    "/etc/passwd",
    "slides/../../x.svs",
    "tiles/ünïcødé/ß.tiff",
    "a" * 1100,
    "slides/\x00.svs",
    "C:\\slides\\x.svs",
    "s3://bucket/key",
    " ",
    "0123456789abcdef",
)

_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


def _integers(low: int, high: int) -> st.SearchStrategy[int]:
    edges = [v for v in (low, high, -1, 0, 1, 2, 3, 16, 512, 4096, 65536) if low <= v <= high]
    return st.one_of(st.sampled_from(edges), st.integers(low, high))


def _scalar(field: FieldDescriptor, strings: Sequence[str], blobs: Sequence[bytes]) -> Any:
    kind = field.type
    if kind in _INT_RANGES:
        return _integers(*_INT_RANGES[kind])
    if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        width = 32 if kind == FieldDescriptor.TYPE_FLOAT else 64
        return st.one_of(
            st.sampled_from([0.0, -1.0, 0.25, 0.5, 1.0, 20.0, 1e308 if width == 64 else 3e38]),
            st.floats(width=width, allow_nan=True, allow_infinity=True),
        )
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind == FieldDescriptor.TYPE_STRING:
        return st.one_of(st.sampled_from([*NASTY_STRINGS, *strings]), st.text(max_size=24))
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.one_of(st.sampled_from([b"", *blobs]), st.binary(max_size=48))
    if kind == FieldDescriptor.TYPE_ENUM:
        numbers = [value.number for value in field.enum_type.values]
        return st.one_of(st.sampled_from(numbers), st.integers(-3, 1000))
    raise TypeError(f"no strategy for field type {kind} of {field.full_name}")


def messages(
    descriptor: Descriptor,
    *,
    strings: Sequence[str] = (),
    blobs: Sequence[bytes] = (),
    max_depth: int = 4,
) -> st.SearchStrategy[Message]:
    """Arbitrary, often invalid, instances of the message ``descriptor`` describes.

    Args:
        descriptor: The message type.
        strings: Extra string values to mix in (e.g. keys that exist in the store).
        blobs: Extra bytes values to mix in (e.g. a valid small PNG).
        max_depth: Nesting below which sub-messages are left unset.
    """

    def value_of(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if field.message_type.GetOptions().map_entry:
                key = _scalar(field.message_type.fields_by_name["key"], strings, blobs)
                value_field = field.message_type.fields_by_name["value"]
                return st.dictionaries(key, value_of(value_field, depth + 1), max_size=3)
            return build(field.message_type, depth + 1)
        return _scalar(field, strings, blobs)

    def build(message_type: Descriptor, depth: int) -> st.SearchStrategy[Message]:
        message_cls = GetMessageClass(message_type)
        if depth > max_depth:
            return st.just(message_cls())
        parts: dict[str, st.SearchStrategy[Any]] = {}
        for field in message_type.fields:
            value = value_of(field, depth)
            if field.is_repeated and not _is_map(field):
                value = st.lists(value, max_size=3)
            parts[field.name] = st.one_of(st.none(), value)
        return st.fixed_dictionaries(parts).map(lambda values: _fill(message_cls, values))

    return build(descriptor, 0)


def _is_map(field: FieldDescriptor) -> bool:
    return field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.GetOptions().map_entry


def _fill(message_cls: type[Message], values: dict[str, Any]) -> Message:
    message = message_cls()
    for name, value in values.items():
        if value is None:
            continue
        field = message.DESCRIPTOR.fields_by_name[name]
        if _is_map(field):
            target = getattr(message, name)
            for key, item in value.items():
                if isinstance(item, Message):
                    target[key].CopyFrom(item)
                else:
                    target[key] = item
        elif field.is_repeated:
            target = getattr(message, name)
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                for item in value:
                    target.add().CopyFrom(item)
            else:
                target.extend(value)
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            getattr(message, name).CopyFrom(value)
        else:
            setattr(message, name, value)
    return message


def raw_call(
    channel: grpc.Channel, method: MethodDescriptor
) -> Callable[[list[bytes], float], list[bytes]]:
    """A callable that sends serialized request messages to ``method`` and returns the
    serialized responses; works for all four streaming shapes. Unary requests take the
    first item of the list."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    client_streams = method.client_streaming
    server_streams = method.server_streaming

    def call(requests: list[bytes], timeout_s: float) -> list[bytes]:
        if client_streams and server_streams:
            rpc: Any = channel.stream_stream(path)
            return list(rpc(iter(requests), timeout=timeout_s))
        if client_streams:
            rpc = channel.stream_unary(path)
            return [rpc(iter(requests), timeout=timeout_s)]
        if server_streams:
            rpc = channel.unary_stream(path)
            return list(rpc(requests[0], timeout=timeout_s))
        rpc = channel.unary_unary(path)
        return [rpc(requests[0], timeout=timeout_s)]

    return call


def mutations(
    valid: Message,
    *,
    strings: Sequence[str] = (),
    blobs: Sequence[bytes] = (),
) -> st.SearchStrategy[Message]:
    """Copies of a valid request with one or more fields replaced by arbitrary values
    (or cleared), one level deep into sub-messages: these get past the first checks
    and reach the logic behind them."""
    descriptor = valid.DESCRIPTOR
    random_message = messages(descriptor, strings=strings, blobs=blobs)
    paths = [(field.name, None) for field in descriptor.fields]
    for field in descriptor.fields:
        if field.type == FieldDescriptor.TYPE_MESSAGE and not field.is_repeated:
            paths += [(field.name, sub.name) for sub in field.message_type.fields]

    def mutate(original: Message, noise: Message, chosen: list[tuple[str, str | None]]) -> Message:
        message = type(original)()
        message.CopyFrom(original)
        for name, sub in chosen:
            source, target = noise, message
            if sub is not None:
                source, target = getattr(noise, name), getattr(message, name)
                name = sub
            target.ClearField(name)
            field = target.DESCRIPTOR.fields_by_name[name]
            if field.is_repeated:
                getattr(target, name).MergeFrom(getattr(source, name))
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                if source.HasField(name):
                    getattr(target, name).CopyFrom(getattr(source, name))
            elif field.containing_oneof is None or source.HasField(name):
                setattr(target, name, getattr(source, name))
        return message

    return st.builds(
        mutate,
        st.just(valid),
        random_message,
        st.lists(st.sampled_from(paths), min_size=1, max_size=3, unique=True),
    )


#: Statuses a fuzzed request may get: each names the caller's mistake, or says the
#: (valid) request asked for more work than its deadline allows.
CLIENT_STATUSES = frozenset(
    {
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
)


def fuzz_settings(max_examples: int) -> Any:
    """Hypothesis settings for fuzzing a running service: repeatable, no deadline."""
    from hypothesis import HealthCheck, settings

    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


def status_of(
    call: Callable[[list[bytes], float], list[bytes]], payloads: list[bytes], timeout_s: float
) -> tuple[grpc.StatusCode, str]:
    """The status (and details) a raw call ends with."""
    try:
        call(payloads, timeout_s)
    except grpc.RpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


def assert_serving(channel: grpc.Channel, service: str) -> None:
    """The service still answers its health check with SERVING."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    reply = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=10
    )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def check_arbitrary_requests(
    channel: grpc.Channel,
    method: MethodDescriptor,
    requests: st.SearchStrategy[list[Message]],
    max_examples: int,
    timeout_s: float = 10.0,
) -> None:
    """Every drawn request list gets OK or a client status with a readable reason
    (no traceback), and the service keeps serving."""
    from hypothesis import given

    call = raw_call(channel, method)

    @fuzz_settings(max_examples)
    @given(requests)
    def check(batch: list[Message]) -> None:
        code, details = status_of(call, [m.SerializeToString() for m in batch], timeout_s)
        assert code in CLIENT_STATUSES, (code, details, batch)
        if code != grpc.StatusCode.OK:
            assert details and "Traceback" not in details and len(details) < 2000

    check()
    assert_serving(channel, method.containing_service.full_name)


def check_unparsable_bytes(
    channel: grpc.Channel, method: MethodDescriptor, max_examples: int
) -> None:
    """Bytes that are no request message get INVALID_ARGUMENT saying so."""
    from google.protobuf.message import DecodeError
    from hypothesis import given

    call = raw_call(channel, method)
    parse = GetMessageClass(method.input_type).FromString

    @fuzz_settings(max_examples)
    @given(st.binary(min_size=1, max_size=64))
    def check(data: bytes) -> None:
        try:
            parse(data)
        except DecodeError:
            code, details = status_of(call, [data], 10.0)
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
            assert "malformed request" in details

    check()
    assert_serving(channel, method.containing_service.full_name)
