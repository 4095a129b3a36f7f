"""Requests generated from the protobuf descriptors (hypothesis): every one gets a clear
status code, never UNKNOWN or INTERNAL, and no traceback in the message."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message_factory import GetMessageClass
from hypothesis import given
from hypothesis import strategies as st
from keybroker.v1 import audit_pb2, crypto_pb2, key_admin_pb2, tokens_pb2

from tests.broker_fixtures import Broker
from tests.fuzzing import fuzz_settings

FD = FieldDescriptor
INT_RANGES = {
    FD.TYPE_UINT32: (0, 2**32 - 1),
    FD.TYPE_UINT64: (0, 2**64 - 1),
    FD.TYPE_INT32: (-(2**31), 2**31 - 1),
    FD.TYPE_INT64: (-(2**63), 2**63 - 1),
}
# Mostly plausible values, so that calls get past the first check now and then.
KEY_IDS = st.sampled_from(["", "fuzz-key", "missing", "A", "x" * 70])
TEXT = st.one_of(KEY_IDS, st.text(max_size=40))


def scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    if field.type == FD.TYPE_STRING:
        return TEXT
    if field.type == FD.TYPE_BYTES:
        return st.binary(max_size=120)
    if field.type == FD.TYPE_BOOL:
        return st.booleans()
    if field.type == FD.TYPE_ENUM:
        return st.sampled_from([v.number for v in field.enum_type.values])
    lo, hi = INT_RANGES[field.type]
    return st.one_of(st.integers(lo, hi), st.integers(0, 100))


def message(desc: Descriptor, cls: Any, depth: int = 0) -> st.SearchStrategy[Any]:
    if desc.full_name == "google.protobuf.Duration":
        return st.builds(
            lambda s, n: cls(seconds=s, nanos=n),
            st.one_of(
                st.integers(-(10**12), 10**12),
                st.integers(0, 7200),
                st.sampled_from([315_576_000_000, -315_576_000_000, 10**12]),
            ),
            st.integers(-999_999_999, 999_999_999),
        )
    if desc.full_name == "google.protobuf.Timestamp":
        return st.builds(
            lambda s, n: cls(seconds=s, nanos=n),
            st.one_of(
                st.integers(-(10**13), 10**13),
                st.integers(0, 2 * 10**9),
                st.sampled_from([253_402_300_800, -62_135_596_801, 10**13]),
            ),
            st.integers(0, 999_999_999),
        )
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for field in desc.fields:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            fields[field.name] = st.dictionaries(TEXT, TEXT, max_size=20)
            continue
        if field.message_type is not None:
            if depth > 2:
                continue
            inner_cls = GetMessageClass(field.message_type)
            inner = message(field.message_type, inner_cls, depth + 1)
        else:
            inner = scalar(field)
        fields[field.name] = st.lists(inner, max_size=4) if _repeated(field) else inner
    return st.fixed_dictionaries({}, optional=fields).map(lambda kw: _build(cls, kw))


def _repeated(field: FieldDescriptor) -> bool:
    return bool(field.is_repeated)


def _build(cls: Any, kw: dict[str, Any]) -> Any:
    msg = cls()
    for name, value in kw.items():
        field = msg.DESCRIPTOR.fields_by_name[name]
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            getattr(msg, name).update(value)
        elif _repeated(field):
            if field.message_type is not None:
                for item in value:
                    getattr(msg, name).add().CopyFrom(item)
            else:
                getattr(msg, name).extend(value)
        elif field.message_type is not None:
            getattr(msg, name).CopyFrom(value)
        else:
            setattr(msg, name, value)
    return msg


METHODS = {
    "KeyAdmin": key_admin_pb2,
    "Crypto": crypto_pb2,
    "Tokens": tokens_pb2,
    "Audit": audit_pb2,
}


def rpc_cases() -> list[tuple[str, str, Any, Any]]:
    cases = []
    for service, module in METHODS.items():
        for method in module.DESCRIPTOR.services_by_name[service].methods:
            request_cls = GetMessageClass(method.input_type)
            response_cls = GetMessageClass(method.output_type)
            cases.append((service, method.name, request_cls, response_cls))
    return cases


pytestmark = pytest.mark.fuzz

CASES = rpc_cases()


@pytest.mark.parametrize(
    ("service", "name", "request_cls", "response_cls"), CASES, ids=[f"{c[0]}.{c[1]}" for c in CASES]
)
@fuzz_settings(40)
@given(data=st.data())
def test_generated_requests_get_clear_status_codes(
    broker: Broker,
    service: str,
    name: str,
    request_cls: Any,
    response_cls: Any,
    data: st.DataObject,
) -> None:
    identity = data.draw(st.sampled_from(["admin", "admin", "consumer", "auditor"]))
    request = data.draw(message(request_cls.DESCRIPTOR, request_cls))
    path = f"/keybroker.v1.{service}/{name}"
    channel = broker.channel(identity)
    bidi = name == "ReWrapStream"  # a stream of requests: this one, twice
    streaming = bidi or name in ("ListAuditEvents", "ExportAuditLog")  # streamed answers
    make = channel.unary_stream if streaming else channel.unary_unary
    if bidi:
        make = channel.stream_stream
    call = make(
        path,
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=response_cls.FromString,
    )
    try:
        result = call(iter([request, request]) if bidi else request, timeout=20)
        if streaming:
            for _ in result:
                pass
    except grpc.RpcError as err:
        code = err.code()  # type: ignore[attr-defined]
        details = err.details() or ""  # type: ignore[attr-defined]
        assert code not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), (
            path,
            request,
            details,
        )
        assert "Traceback" not in details
        assert details, (path, code)
