"""Scheduled destruction through gRPC on SoftHSM2: crypto-shredding of every version's HSM
object, the signed destruction receipt checked offline, cancellation, and exactly one
destruction among several schedulers sharing one store (one of them crashed mid-task)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from click.testing import CliRunner, Result
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf.duration_pb2 import Duration
from jwt.algorithms import ECAlgorithm
from keybroker.v1 import audit_pb2, key_admin_pb2, resources_pb2, tokens_pb2
from keybroker_client import evidence
from keybroker_client.cli import cli

from broker.domain import LeaseTask
from broker.services.scheduler import DEFAULT_LEASE, SCHEDULER_PRINCIPAL, TickReport
from tests.broker_fixtures import Broker, start_broker
from tests.hsm_fixtures import objects_labelled
from tests.integration.flows import code_of, create_key, datakey, decrypt, issue

WINDOW = 120  # seconds; the brokers below allow 60 at least
Softhsm = Any  # (Pkcs11Library, SoftHsmToken) of tests.hsm_fixtures


@pytest.fixture
def lone(hsm_home: Path, tmp_path: Path) -> Iterator[Broker]:
    """A broker with a database of its own whose scheduler runs only when a test says so."""
    b = start_broker(
        hsm_home,
        database=tmp_path / "kb.db",
        keys_scheduler_interval=0.0,
        keys_min_destruction_window=60.0,
    )
    yield b
    b.close()


def schedule(b: Broker, key_id: str, seconds: int | None = WINDOW) -> resources_pb2.Key:
    request = key_admin_pb2.ScheduleKeyDestructionRequest(key_id=key_id)
    if seconds is not None:
        request.pending_window.CopyFrom(Duration(seconds=seconds))
    return b.keys().ScheduleKeyDestruction(request).key


def get_key(b: Broker, key_id: str) -> resources_pb2.Key:
    return b.keys("auditor").GetKey(key_admin_pb2.GetKeyRequest(key_id=key_id)).key


def labels_of(b: Broker, key_id: str) -> list[str]:
    """The HSM object labels of the key's versions (the broker's own record)."""
    return [v.hsm_label for v in b.app.store.get_key(key_id).versions]


def events(b: Broker, key_id: str, operation: str = "") -> list[resources_pb2.AuditEvent]:
    request = audit_pb2.ListAuditEventsRequest(key_id=key_id, operation=operation)
    return [r.event for r in b.audit().ListAuditEvents(request)]


def jwks_of(b: Broker) -> dict[str, Any]:
    response = b.tokens("auditor").GetSigningKeys(tokens_pb2.GetSigningKeysRequest())
    jwks: dict[str, Any] = json.loads(response.jwks_json)
    return jwks


def receipt_of(b: Broker, key_id: str) -> bytes:
    request = key_admin_pb2.GetDestructionReceiptRequest(key_id=key_id)
    response = b.keys("auditor").GetDestructionReceipt(request)
    assert response.key.state == resources_pb2.KEY_STATE_DESTROYED
    return (response.receipt_json + "\n").encode()


def test_destruction_shreds_every_version_and_signs_a_receipt(
    lone: Broker, softhsm: Softhsm, hsm_home: Path, tmp_path: Path
) -> None:
    library, token = softhsm
    key_id = create_key(lone)
    blobs = [datakey(lone, key_id)]
    for _ in range(2):
        lone.keys().RotateKey(key_admin_pb2.RotateKeyRequest(key_id=key_id))
        blobs.append(datakey(lone, key_id))
    assert [b.key_version for b in blobs] == [1, 2, 3]
    labels = labels_of(lone, key_id)
    assert [objects_labelled(library, token, label) for label in labels] == [1, 1, 1]
    bearer = issue(lone, key_id).token

    code, msg = code_of(lambda: schedule(lone, key_id, 30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "at least" in msg
    pending = schedule(lone, key_id)
    assert pending.state == resources_pb2.KEY_STATE_PENDING_DESTRUCTION
    assert pending.destroy_time.seconds > 0
    code, msg = code_of(lambda: decrypt(lone, blobs[0].wrapped_key, bearer))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "pending destruction" in msg

    # Not due yet: a scheduler pass leaves every object in place.
    assert lone.app.scheduler is not None
    assert lone.app.scheduler.run_once().destroyed == ()
    assert [objects_labelled(library, token, label) for label in labels] == [1, 1, 1]

    lone.clock.offset = timedelta(seconds=WINDOW + 1)
    assert lone.app.scheduler.run_once().destroyed == (key_id,)
    # Crypto-shredded: a search of the token by label finds no object of any version.
    assert [objects_labelled(library, token, label) for label in labels] == [0, 0, 0]
    assert get_key(lone, key_id).state == resources_pb2.KEY_STATE_DESTROYED
    for blob in blobs:
        code, msg = code_of(lambda b=blob: decrypt(lone, b.wrapped_key, bearer))  # type: ignore[misc]
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "destroyed" in msg
    code, _ = code_of(lambda: datakey(lone, key_id))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    code, _ = code_of(
        lambda: lone.keys().CancelKeyDestruction(
            key_admin_pb2.CancelKeyDestructionRequest(key_id=key_id)
        )
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert lone.app.scheduler.run_once().destroyed == ()  # nothing left to do

    # The receipt verifies offline with the JWKS alone and names what was destroyed.
    data = receipt_of(lone, key_id)
    receipt = evidence.verify_receipt(data, jwks_of(lone), key_id=key_id)
    assert [v.label for v in receipt.versions] == labels
    assert [v.version for v in receipt.versions] == [1, 2, 3]
    assert (receipt.hsm_name, receipt.hsm_jurisdiction) == ("local", "FR")
    (destroyed,) = events(lone, key_id, "DestroyKey")
    assert destroyed.principal == SCHEDULER_PRINCIPAL
    assert destroyed.outcome == resources_pb2.OUTCOME_ALLOWED
    assert (receipt.audit_sequence, receipt.audit_hash) == (destroyed.sequence, destroyed.hash)
    assert (receipt.audit_chain, receipt.audit_chain_sequence) == (
        destroyed.chain,
        destroyed.chain_sequence,
    )

    operations = [(e.operation, e.principal, e.outcome) for e in events(lone, key_id)]
    allowed = resources_pb2.OUTCOME_ALLOWED
    assert ("ScheduleKeyDestruction", "admin", allowed) in operations
    assert ("DestroyKey", SCHEDULER_PRINCIPAL, allowed) in operations
    assert ("CancelKeyDestruction", "admin", resources_pb2.OUTCOME_DENIED) in operations
    assert lone.audit().VerifyAuditLog(audit_pb2.VerifyAuditLogRequest()).ok

    # A broker starting on this database does not miss the shredded objects.
    again = start_broker(hsm_home, database=tmp_path / "kb.db", keys_scheduler_interval=0.0)
    again.close()


def test_a_receipt_with_any_byte_changed_does_not_verify(lone: Broker) -> None:
    key_id = create_key(lone)
    schedule(lone, key_id)
    lone.clock.offset = timedelta(seconds=WINDOW + 1)
    assert lone.app.scheduler is not None
    lone.app.scheduler.run_once()
    data = receipt_of(lone, key_id)
    jwks = jwks_of(lone)
    evidence.verify_receipt(data, jwks)
    for i in range(len(data)):
        for flip in (0x01, 0x20):
            changed = bytearray(data)
            changed[i] ^= flip
            with pytest.raises(evidence.ReceiptInvalid):
                evidence.verify_receipt(bytes(changed), jwks)
    with pytest.raises(evidence.ReceiptInvalid, match="not 'other'"):
        evidence.verify_receipt(data, jwks, key_id="other")
    # Another key that claims the audit key's kid does not verify it.
    (audit_jwk,) = [k for k in jwks["keys"] if k["keybroker_purpose"] == "audit"]
    forged = json.loads(ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP256R1()).public_key()))
    forged.update({"kid": audit_jwk["kid"], "keybroker_purpose": "audit"})
    with pytest.raises(evidence.ReceiptInvalid, match="does not verify"):
        evidence.verify_receipt(data, {"keys": [forged]})


def test_cancel_before_due_keeps_the_key(lone: Broker, softhsm: Softhsm) -> None:
    library, token = softhsm
    key_id = create_key(lone)
    dk = datakey(lone, key_id)
    code, msg = code_of(
        lambda: lone.keys("auditor").ScheduleKeyDestruction(
            key_admin_pb2.ScheduleKeyDestructionRequest(key_id=key_id)
        )
    )
    assert code == grpc.StatusCode.PERMISSION_DENIED
    code, msg = code_of(
        lambda: lone.keys().CancelKeyDestruction(
            key_admin_pb2.CancelKeyDestructionRequest(key_id=key_id)
        )
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "nothing to cancel" in msg

    pending = schedule(lone, key_id, None)  # no window: the broker's minimum (60 s here)
    assert pending.destroy_time.seconds - pending.create_time.seconds in range(59, 62)
    code, _ = code_of(lambda: schedule(lone, key_id))
    assert code == grpc.StatusCode.FAILED_PRECONDITION  # already scheduled
    cancelled = (
        lone.keys()
        .CancelKeyDestruction(key_admin_pb2.CancelKeyDestructionRequest(key_id=key_id))
        .key
    )
    assert cancelled.state == resources_pb2.KEY_STATE_DISABLED
    assert not cancelled.HasField("destroy_time")

    lone.clock.offset = timedelta(seconds=WINDOW + 1)
    assert lone.app.scheduler is not None
    assert lone.app.scheduler.run_once().destroyed == ()
    assert [objects_labelled(library, token, label) for label in labels_of(lone, key_id)] == [1]
    lone.keys().EnableKey(key_admin_pb2.EnableKeyRequest(key_id=key_id))
    assert decrypt(lone, dk.wrapped_key, issue(lone, key_id).token).plaintext == dk.plaintext_key

    # Once due, the destruction may have begun: it can no longer be cancelled.
    schedule(lone, key_id)
    lone.clock.offset = timedelta(seconds=2 * WINDOW + 2)
    code, msg = code_of(
        lambda: lone.keys().CancelKeyDestruction(
            key_admin_pb2.CancelKeyDestructionRequest(key_id=key_id)
        )
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "no longer be cancelled" in msg
    ops = [e.operation for e in events(lone, key_id) if e.outcome == resources_pb2.OUTCOME_ALLOWED]
    assert ops.count("ScheduleKeyDestruction") == 2 and ops.count("CancelKeyDestruction") == 1


def test_a_crashed_holder_is_taken_over_and_racing_schedulers_destroy_once(
    hsm_home: Path, tmp_path: Path, softhsm: Softhsm
) -> None:
    library, token = softhsm
    db = tmp_path / "shared.db"
    settings = {"keys_scheduler_interval": 0.0, "keys_min_destruction_window": 60.0}
    a = start_broker(hsm_home, database=db, **settings)
    b = start_broker(hsm_home, database=db, **settings)
    try:
        assert a.app.scheduler is not None and b.app.scheduler is not None
        crashed, raced = create_key(a), create_key(a)
        schedule(a, crashed)
        schedule(a, raced)
        for x in (a, b):
            x.clock.offset = timedelta(seconds=WINDOW + 1)

        # Broker a claims one destruction and dies before doing it.
        claimed = a.app.scheduler.claim(a.app.store.get_key(crashed), LeaseTask.DESTROY)
        assert claimed is not None and claimed.lease is not None
        assert b.app.scheduler.claim(b.app.store.get_key(crashed), LeaseTask.DESTROY) is None
        assert b.app.scheduler.run_once().destroyed == (raced,)  # a's lease keeps b away
        assert objects_labelled(library, token, labels_of(b, crashed)[0]) == 1
        code, _ = code_of(
            lambda: b.keys().CancelKeyDestruction(
                key_admin_pb2.CancelKeyDestructionRequest(key_id=crashed)
            )
        )
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        # Once a's lease has expired, b takes the destruction over.
        b.clock.offset += DEFAULT_LEASE
        assert b.app.scheduler.run_once().destroyed == (crashed,)
        assert objects_labelled(library, token, labels_of(b, crashed)[0]) == 0

        # Two schedulers racing over due destructions: each key is destroyed once. Their clocks
        # agree again (b's ran a lease ahead, so it would take a's fresh leases for expired ones).
        a.clock.offset = b.clock.offset
        keys = [create_key(a) for _ in range(4)]
        for key_id in keys:
            schedule(a, key_id)
        for x in (a, b):
            x.clock.offset += timedelta(seconds=WINDOW + 1)
        start = threading.Barrier(2)
        reports = []

        def run(x: Broker) -> None:
            start.wait()
            assert x.app.scheduler is not None
            reports.append(x.app.scheduler.run_once())

        threads = [threading.Thread(target=run, args=(x,)) for x in (a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        done = sorted(k for r in reports for k in r.destroyed)
        assert done == sorted(keys) and not any(r.failed for r in reports)
        for key_id in [crashed, raced, *keys]:
            allowed = [
                e
                for e in events(a, key_id, "DestroyKey")
                if e.outcome == resources_pb2.OUTCOME_ALLOWED
            ]
            assert len(allowed) == 1, key_id
            receipt = evidence.verify_receipt(receipt_of(b, key_id), jwks_of(b))
            assert receipt.audit_sequence == allowed[0].sequence
        assert a.audit().VerifyAuditLog(audit_pb2.VerifyAuditLogRequest()).ok
    finally:
        a.close()
        b.close()


def test_the_background_scheduler_destroys_a_due_key(
    hsm_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    b = start_broker(
        hsm_home,
        database=tmp_path / "kb.db",
        keys_scheduler_interval=0.05,
        keys_min_destruction_window=60.0,
    )
    try:
        scheduler = b.app.scheduler
        assert scheduler is not None
        key_id = create_key(b)
        destroyed = threading.Event()
        run_once = scheduler.run_once

        def observed() -> TickReport:
            report = run_once()
            if key_id in report.destroyed:
                destroyed.set()
            return report

        monkeypatch.setattr(scheduler, "run_once", observed)
        schedule(b, key_id)
        assert not destroyed.is_set()
        b.clock.offset = timedelta(seconds=WINDOW + 1)
        assert destroyed.wait(60), "the scheduler thread never destroyed the due key"
        assert get_key(b, key_id).state == resources_pb2.KEY_STATE_DESTROYED
        evidence.verify_receipt(receipt_of(b, key_id), jwks_of(b), key_id=key_id)
    finally:
        b.close()


def kb(broker: Broker, identity: str, *args: str) -> Result:
    result = CliRunner().invoke(
        cli, ["--home", str(broker.home), "--target", broker.target, "--as", identity, *args]
    )
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result


def test_cli_schedules_fetches_and_verifies_a_receipt(lone: Broker, tmp_path: Path) -> None:
    key_id = create_key(lone)
    result = kb(lone, "admin", "keys", "schedule-destruction", key_id, "--pending-window", "2m")
    assert result.exit_code == 0, result.output
    assert "pending_destruction" in result.stdout.lower()
    result = kb(lone, "auditor", "keys", "receipt", key_id)
    assert result.exit_code == 9  # FAILED_PRECONDITION: not destroyed yet
    lone.clock.offset = timedelta(seconds=WINDOW + 1)
    assert lone.app.scheduler is not None
    lone.app.scheduler.run_once()

    receipt, jwks = tmp_path / "receipt.json", tmp_path / "jwks.json"
    result = kb(lone, "auditor", "keys", "receipt", key_id, "--out", str(receipt))
    assert result.exit_code == 0, result.output
    assert kb(lone, "auditor", "token", "jwks", "--output", str(jwks)).exit_code == 0
    # Offline: no broker is reached (the target is wrong on purpose).
    offline = ["--target", "127.0.0.1:9", "verify-receipt", str(receipt), "--jwks", str(jwks)]
    result = CliRunner().invoke(cli, [*offline, "--key-id", key_id])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"ok: key {key_id} was destroyed at ")
    as_json = json.loads(CliRunner().invoke(cli, ["--json", *offline]).stdout)
    assert as_json["ok"] and as_json["key_id"] == key_id
    assert as_json["versions"][0]["label"] == labels_of(lone, key_id)[0]

    data = receipt.read_bytes()
    receipt.write_bytes(data.replace(key_id.encode(), key_id[:-1].encode() + b"x", 1))
    result = CliRunner().invoke(cli, offline)
    assert result.exit_code == 1 and result.stdout.startswith("FAILED: ")
