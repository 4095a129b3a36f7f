"""Key versions through gRPC on SoftHSM2: automatic rotation done once by racing schedulers,
retiring old versions (min_decryption_version), and the per-version usage report."""

from __future__ import annotations

import json
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
from click.testing import CliRunner, Result
from google.protobuf.duration_pb2 import Duration
from keybroker.v1 import audit_pb2, crypto_pb2, key_admin_pb2, resources_pb2
from keybroker_client.cli import cli

from broker.services.scheduler import SCHEDULER_PRINCIPAL, TickReport
from tests.broker_fixtures import Broker, new_key_id, start_broker
from tests.hsm_fixtures import objects_labelled
from tests.integration.flows import (
    CTX,
    code_of,
    create_key,
    datakey,
    decrypt,
    issue,
    standard_policy,
)

DAY = timedelta(days=1)
Softhsm = Any  # (Pkcs11Library, SoftHsmToken) of tests.hsm_fixtures


def get_key(b: Broker, key_id: str) -> resources_pb2.Key:
    return b.keys("auditor").GetKey(key_admin_pb2.GetKeyRequest(key_id=key_id)).key


def events(b: Broker, key_id: str, operation: str = "") -> list[resources_pb2.AuditEvent]:
    request = audit_pb2.ListAuditEventsRequest(key_id=key_id, operation=operation)
    return [r.event for r in b.audit().ListAuditEvents(request)]


def retire(b: Broker, key_id: str, version: int, identity: str = "admin") -> resources_pb2.Key:
    request = key_admin_pb2.SetMinDecryptionVersionRequest(
        key_id=key_id, min_decryption_version=version
    )
    return b.keys(identity).SetMinDecryptionVersion(request).key


def usage(b: Broker, key_id: str, identity: str = "auditor") -> key_admin_pb2.GetKeyUsageResponse:
    return b.keys(identity).GetKeyUsage(key_admin_pb2.GetKeyUsageRequest(key_id=key_id))


def test_racing_schedulers_rotate_a_due_key_once(
    hsm_home: Path, tmp_path: Path, softhsm: Softhsm
) -> None:
    library, token = softhsm
    db = tmp_path / "shared.db"
    a = start_broker(hsm_home, database=db, keys_scheduler_interval=0.0)
    b = start_broker(hsm_home, database=db, keys_scheduler_interval=0.0)
    try:
        assert a.app.scheduler is not None and b.app.scheduler is not None
        key_id = new_key_id("rot")
        created = (
            a.keys()
            .CreateKey(
                key_admin_pb2.CreateKeyRequest(
                    key_id=key_id, policy=standard_policy(), rotation_period=Duration(seconds=86400)
                )
            )
            .key
        )
        assert created.next_rotation_time.seconds - created.create_time.seconds == 86400
        idle = create_key(a)  # no rotation_period: never rotated
        old = datakey(a, key_id)
        assert a.app.scheduler.run_once().rotated == ()  # not due yet

        for round_ in range(1, 4):
            for x in (a, b):
                x.clock.offset = DAY * round_ + timedelta(seconds=1)
            start = threading.Barrier(2)
            reports: list[TickReport] = []

            def run(
                x: Broker, start: threading.Barrier = start, reports: list[TickReport] = reports
            ) -> None:
                start.wait()
                assert x.app.scheduler is not None
                reports.append(x.app.scheduler.run_once())

            threads = [threading.Thread(target=run, args=(x,)) for x in (a, b)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert sorted(k for r in reports for k in r.rotated) == [key_id]
            key = get_key(a, key_id)
            assert key.primary_version == round_ + 1
            assert [v.version for v in key.versions] == list(range(1, round_ + 2))
            assert key.next_rotation_time.seconds > key.versions[-1].create_time.seconds

        # Exactly one HSM object per version: the loser of each race generated nothing.
        labels = [v.hsm_label for v in a.app.store.get_key(key_id).versions]
        assert [objects_labelled(library, token, label) for label in labels] == [1] * 4
        assert get_key(a, idle).primary_version == 1
        # Old data still decrypts; new data keys use the newest version.
        fresh = issue(b, key_id).token
        assert decrypt(b, old.wrapped_key, fresh).plaintext == old.plaintext_key
        assert datakey(b, key_id).key_version == 4

        rotations = events(a, key_id, "RotateKey")
        assert [(e.principal, e.key_version, e.outcome) for e in rotations] == [
            (SCHEDULER_PRINCIPAL, v, resources_pb2.OUTCOME_ALLOWED) for v in (2, 3, 4)
        ]
        assert "rotation_period 1d elapsed" in rotations[0].justification
        assert a.audit().VerifyAuditLog(audit_pb2.VerifyAuditLogRequest()).ok
    finally:
        a.close()
        b.close()


def test_a_disabled_key_is_rotated_once_enabled_again(hsm_home: Path, tmp_path: Path) -> None:
    b = start_broker(hsm_home, database=tmp_path / "kb.db", keys_scheduler_interval=0.0)
    try:
        assert b.app.scheduler is not None
        key_id = new_key_id("rot")
        b.keys().CreateKey(
            key_admin_pb2.CreateKeyRequest(
                key_id=key_id, policy=standard_policy(), rotation_period=Duration(seconds=86400)
            )
        )
        b.keys().DisableKey(key_admin_pb2.DisableKeyRequest(key_id=key_id))
        b.clock.offset = DAY + timedelta(seconds=1)
        assert b.app.scheduler.run_once().rotated == ()
        b.keys().EnableKey(key_admin_pb2.EnableKeyRequest(key_id=key_id))
        assert b.app.scheduler.run_once().rotated == (key_id,)
        assert get_key(b, key_id).primary_version == 2
    finally:
        b.close()


def test_retired_versions_no_longer_decrypt(broker: Broker) -> None:
    key_id = create_key(broker)
    v1 = datakey(broker, key_id)
    broker.keys().RotateKey(key_admin_pb2.RotateKeyRequest(key_id=key_id))
    v2 = datakey(broker, key_id)
    bearer = issue(broker, key_id).token

    for version, code, words in [
        (3, grpc.StatusCode.FAILED_PRECONDITION, "cannot retire the primary version 2"),
        (0, grpc.StatusCode.INVALID_ARGUMENT, "at least 1"),
    ]:
        got, msg = code_of(lambda v=version: retire(broker, key_id, v))  # type: ignore[misc]
        assert got == code and words in msg
    code, _ = code_of(lambda: retire(broker, key_id, 2, identity="auditor"))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    code, _ = code_of(lambda: retire(broker, new_key_id("missing"), 1))
    assert code == grpc.StatusCode.NOT_FOUND

    assert retire(broker, key_id, 2).min_decryption_version == 2
    code, msg = code_of(lambda: decrypt(broker, v1.wrapped_key, bearer))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "version 1" in msg and "retired" in msg and "min_decryption_version 2" in msg
    code, _ = code_of(
        lambda: broker.crypto("admin").ReWrap(
            crypto_pb2.ReWrapRequest(ciphertext=v1.wrapped_key, context=CTX)
        )
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert decrypt(broker, v2.wrapped_key, bearer).plaintext == v2.plaintext_key

    # The primary may be the minimum; lowering it brings version 1 back.
    assert retire(broker, key_id, 1).min_decryption_version == 1
    assert decrypt(broker, v1.wrapped_key, bearer).plaintext == v1.plaintext_key
    changes = [
        (e.key_version, e.outcome) for e in events(broker, key_id, "SetMinDecryptionVersion")
    ]
    allowed, denied = resources_pb2.OUTCOME_ALLOWED, resources_pb2.OUTCOME_DENIED
    assert changes == [(3, denied), (0, denied), (2, denied), (2, allowed), (1, allowed)]


def test_usage_report_counts_each_version_from_the_audit_trail(broker: Broker) -> None:
    key_id = create_key(broker)
    producer = broker.crypto("producer")
    producer.GenerateDataKeys(
        crypto_pb2.GenerateDataKeysRequest(key_id=key_id, context=CTX, count=2)
    )
    v1 = datakey(broker, key_id)
    producer.Encrypt(crypto_pb2.EncryptRequest(key_id=key_id, plaintext=b"x", context=CTX))
    bearer = issue(broker, key_id).token
    for _ in range(2):
        decrypt(broker, v1.wrapped_key, bearer)
    broker.keys().RotateKey(key_admin_pb2.RotateKeyRequest(key_id=key_id))
    broker.crypto("admin").ReWrap(crypto_pb2.ReWrapRequest(ciphertext=v1.wrapped_key, context=CTX))
    v2 = datakey(broker, key_id)
    decrypt(broker, v2.wrapped_key, bearer)
    retire(broker, key_id, 2)
    code_of(lambda: decrypt(broker, v1.wrapped_key, bearer))

    report = usage(broker, key_id)
    assert report.key.key_id == key_id and report.events_counted >= 12
    first, second = report.versions
    assert (first.version, second.version) == (1, 2)
    assert (
        first.data_keys_issued,
        first.encryptions,
        first.rewrapped,
        first.decrypts,
        first.decrypts_refused,
    ) == (3, 1, 0, 2, 1)
    assert (second.data_keys_issued, second.rewrapped, second.decrypts) == (1, 1, 1)
    assert first.HasField("last_decrypt_time") and second.HasField("last_use_time")
    assert first.last_decrypt_time.ToDatetime() <= second.last_decrypt_time.ToDatetime()
    assert usage(broker, key_id, identity="admin").versions == report.versions

    code, _ = code_of(lambda: usage(broker, key_id, identity="producer"))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    code, _ = code_of(lambda: usage(broker, new_key_id("missing")))
    assert code == grpc.StatusCode.NOT_FOUND
    (audited, *_) = [e for e in events(broker, key_id, "GetKeyUsage")]
    assert audited.principal == "auditor" and audited.outcome == resources_pb2.OUTCOME_ALLOWED


def kb(broker: Broker, identity: str, *args: str) -> Result:
    result = CliRunner().invoke(
        cli, ["--home", str(broker.home), "--target", broker.target, "--as", identity, *args]
    )
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result


def test_cli_retire_and_usage(broker: Broker) -> None:
    key_id = create_key(broker)
    v1 = datakey(broker, key_id)
    broker.keys().RotateKey(key_admin_pb2.RotateKeyRequest(key_id=key_id))
    decrypt(broker, v1.wrapped_key, issue(broker, key_id).token)

    result = kb(broker, "admin", "keys", "retire", key_id, "--below", "3")
    assert result.exit_code == 9 and "primary version 2" in result.stderr
    result = kb(broker, "admin", "--json", "keys", "retire", key_id, "--below", "2")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["min_decryption_version"] == 2

    result = kb(broker, "auditor", "keys", "usage", key_id)
    assert result.exit_code == 0, result.output
    header, first, second = result.stdout.splitlines()
    assert header.split()[:3] == ["VERSION", "STATUS", "DATA_KEYS"]
    assert first.split()[:7] == ["1", "retired", "1", "0", "0", "1", "0"]
    assert second.split()[:2] == ["2", "primary"] and second.split()[-1] == "-"
    result = kb(broker, "auditor", "keys", "usage", key_id, "--json")
    data = json.loads(result.stdout)
    assert data["min_decryption_version"] == 2
    assert [(v["version"], v["status"], v["decrypts"]) for v in data["versions"]] == [
        (1, "retired", 1),
        (2, "primary", 0),
    ]
    assert data["versions"][0]["last_decrypt_time"].endswith("Z")
