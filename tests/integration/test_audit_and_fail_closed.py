"""The audit trail over gRPC: one event per call, chained and verified; fail closed (invariants
5, 6, 7)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path

import grpc
import pytest
from keybroker.v1 import audit_pb2, crypto_pb2, key_admin_pb2

from broker.domain import AuditEvent, AuditFilter
from broker.errors import AuditUnavailable
from broker.ports import AuditSnapshot, Record
from tests.broker_fixtures import Broker, start_broker
from tests.integration.audit_helpers import sql
from tests.integration.flows import (
    CTX,
    code_of,
    create_key,
    datakey,
    decrypt,
    events_for,
    issue,
    rid,
)
from tests.store_fixtures import open_store


class SwitchableAuditStore:
    """The real audit tables (SQLite, or PostgreSQL on a --store=postgres run) whose appends
    fail while `failing` is set."""

    def __init__(self, path: Path) -> None:
        self.inner = open_store(path)
        self.failing = False

    def append_batch(self, events: Sequence[AuditEvent]) -> list[int]:
        if self.failing:
            raise AuditUnavailable(
                "the audit log cannot be written; the call was refused (fail closed)"
            )
        return self.inner.append_batch(events)

    def add_chain(self, record: Record) -> None:
        self.inner.add_chain(record)

    def add_checkpoint(self, record: Record) -> None:
        self.inner.add_checkpoint(record)

    def events(self, flt: AuditFilter) -> Iterator[AuditEvent]:
        return self.inner.events(flt)

    def snapshot(self) -> AbstractContextManager[AuditSnapshot]:
        return self.inner.snapshot()


@pytest.fixture
def own_broker(hsm_home: Path, tmp_path: Path) -> Iterator[tuple[Broker, SwitchableAuditStore]]:
    audit = SwitchableAuditStore(tmp_path / "audit.db")
    b = start_broker(hsm_home, audit_store=audit, database=tmp_path / "meta.db")
    yield b, audit
    b.close()
    audit.inner.close()


def test_fail_closed_when_audit_cannot_be_written(own_broker) -> None:  # type: ignore[no-untyped-def]
    b, audit = own_broker
    key_id = create_key(b)
    dk = datakey(b, key_id)
    token = issue(b, key_id).token
    audit.failing = True
    for call in (lambda: datakey(b, key_id), lambda: decrypt(b, dk.wrapped_key, token)):
        with pytest.raises(grpc.RpcError) as info:
            response = call()
            pytest.fail(f"a response left without its audit record: {response!r}")
        err = info.value
        assert err.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
        assert "audit" in err.details()  # type: ignore[attr-defined]
        assert dk.plaintext_key.hex() not in err.details()  # type: ignore[attr-defined]
    audit.failing = False
    # Once the audit log is writable again, the chain goes on without a gap.
    assert decrypt(b, dk.wrapped_key, token).plaintext == dk.plaintext_key
    result = b.audit().VerifyAuditLog(audit_pb2.VerifyAuditLogRequest())
    assert result.ok, result.error


def test_every_call_writes_exactly_one_event(broker: Broker) -> None:
    key_id = create_key(broker)
    calls = {
        "GenerateDataKey": lambda md: broker.crypto("producer").GenerateDataKey(
            __import__("keybroker.v1.crypto_pb2", fromlist=["x"]).GenerateDataKeyRequest(
                key_id=key_id, context={"dataset": "cohort-42"}
            ),
            metadata=md,
        ),
        "GetKey": lambda md: broker.keys("auditor").GetKey(
            key_admin_pb2.GetKeyRequest(key_id=key_id), metadata=md
        ),
        "RotateKey": lambda md: broker.keys("producer").RotateKey(
            key_admin_pb2.RotateKeyRequest(key_id=key_id), metadata=md
        ),
    }
    for operation, call in calls.items():
        request_id = rid()
        try:
            call((("x-request-id", request_id),))
        except grpc.RpcError:
            pass
        events = events_for(broker, request_id)
        assert len(events) == 1, operation
        assert events[0].operation == operation
        assert events[0].key_id == key_id


def test_allowed_and_denied_events_carry_their_fields(broker: Broker) -> None:
    key_id = create_key(broker)
    dk = datakey(broker, key_id)
    issued = issue(broker, key_id, justification="cohort 42 survival study")
    request_id = rid()
    decrypt(broker, dk.wrapped_key, issued.token, request_id=request_id)
    (event,) = events_for(broker, request_id)
    assert event.outcome == 1  # OUTCOME_ALLOWED
    assert event.principal == "consumer" and event.operation == "Decrypt"
    assert event.key_id == key_id and event.key_version == 1
    assert event.token_id == issued.token_id
    assert dict(event.context) == {"dataset": "cohort-42"}
    assert event.justification == "cohort 42 survival study"
    assert len(event.hash) == 64 and len(event.prev_hash) == 64

    request_id = rid()
    with pytest.raises(grpc.RpcError):
        decrypt(broker, dk.wrapped_key, issued.token, identity="producer", request_id=request_id)
    (denied,) = events_for(broker, request_id)
    assert denied.outcome == 2 and denied.principal == "producer"
    assert "another client certificate" in denied.reason


def test_list_filters(broker: Broker) -> None:
    key_id = create_key(broker)
    datakey(broker, key_id)
    datakey(broker, key_id)
    stream = broker.audit().ListAuditEvents(
        audit_pb2.ListAuditEventsRequest(key_id=key_id, operation="GenerateDataKey")
    )
    events = [r.event for r in stream]
    assert len(events) == 2 and all(e.principal == "producer" for e in events)
    first = events[0].sequence
    after = [
        r.event
        for r in broker.audit().ListAuditEvents(
            audit_pb2.ListAuditEventsRequest(key_id=key_id, after_sequence=first)
        )
    ]
    assert [e.sequence for e in after] == [events[1].sequence]
    limited = list(broker.audit().ListAuditEvents(audit_pb2.ListAuditEventsRequest(limit=1)))
    assert len(limited) == 1
    by_principal = [
        r.event
        for r in broker.audit().ListAuditEvents(
            audit_pb2.ListAuditEventsRequest(principal="producer", key_id=key_id)
        )
    ]
    assert len(by_principal) == 2
    window = [
        r.event
        for r in broker.audit().ListAuditEvents(
            audit_pb2.ListAuditEventsRequest(key_id=key_id, start_time=events[1].time)
        )
    ]
    assert events[1].sequence in [e.sequence for e in window]
    assert events[0].sequence not in [e.sequence for e in window]
    code, _ = code_of(
        lambda: list(broker.audit("producer").ListAuditEvents(audit_pb2.ListAuditEventsRequest()))
    )
    assert code == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize(
    "tamper",
    [
        "UPDATE audit_events SET principal = 'someone-else' WHERE sequence = 3",
        "UPDATE audit_events SET outcome = 'denied' WHERE sequence = 3",
        "DELETE FROM audit_events WHERE sequence = 3",
        "UPDATE audit_events SET sequence = sequence + 100 WHERE sequence = 3",
    ],
)
def test_verify_detects_edits_and_deletions(own_broker, tamper: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    b, _ = own_broker
    key_id = create_key(b)
    for _ in range(4):
        datakey(b, key_id)
    ok = b.audit().VerifyAuditLog(audit_pb2.VerifyAuditLogRequest())
    assert ok.ok and ok.events_checked >= 5 and ok.first_bad_sequence == 0
    sql(tmp_path / "audit.db", tamper)
    bad = b.audit().VerifyAuditLog(audit_pb2.VerifyAuditLogRequest())
    assert not bad.ok
    assert bad.first_bad_sequence == 3
    assert bad.error


def test_reordering_is_detected(own_broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    b, _ = own_broker
    key_id = create_key(b)
    for _ in range(3):
        datakey(b, key_id)
    sql(
        tmp_path / "audit.db",
        "UPDATE audit_events SET sequence = -1 WHERE sequence = 2",
        "UPDATE audit_events SET sequence = 2 WHERE sequence = 3",
        "UPDATE audit_events SET sequence = 3 WHERE sequence = -1",
    )
    bad = b.audit().VerifyAuditLog(audit_pb2.VerifyAuditLogRequest())
    assert not bad.ok and bad.first_bad_sequence == 2


def test_the_batch_path_fails_closed_when_audit_cannot_be_written(own_broker) -> None:  # type: ignore[no-untyped-def]
    b, audit = own_broker
    key_id = create_key(b)
    reply = b.crypto("producer").GenerateDataKeys(
        crypto_pb2.GenerateDataKeysRequest(key_id=key_id, context=CTX, count=4)
    )
    token = issue(b, key_id).token
    items = [crypto_pb2.DecryptRequest(ciphertext=dk.wrapped_key, context=CTX, token=token)
             for dk in reply.data_keys]  # fmt: skip
    audit.failing = True
    for call in (
        lambda: b.crypto("producer").GenerateDataKeys(
            crypto_pb2.GenerateDataKeysRequest(key_id=key_id, context=CTX, count=4)
        ),
        lambda: b.crypto("consumer").BatchDecrypt(crypto_pb2.BatchDecryptRequest(items=items)),
    ):
        code, message = code_of(call)
        assert code == grpc.StatusCode.UNAVAILABLE and "audit" in message
        assert all(dk.plaintext_key.hex() not in message for dk in reply.data_keys)
    audit.failing = False
    results = b.crypto("consumer").BatchDecrypt(crypto_pb2.BatchDecryptRequest(items=items))
    assert [r.plaintext for r in results.results] == [dk.plaintext_key for dk in reply.data_keys]
    report = b.audit().VerifyAuditLog(audit_pb2.VerifyAuditLogRequest())
    assert report.ok, report.error
