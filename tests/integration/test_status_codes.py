"""Every row of DESIGN.md's status-code table, provoked for real over gRPC/mTLS."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from grpc_health.v1 import health_pb2, health_pb2_grpc
from keybroker.v1 import (
    crypto_pb2,
    crypto_pb2_grpc,
    key_admin_pb2,
    key_admin_pb2_grpc,
    resources_pb2,
    tokens_pb2,
    tokens_pb2_grpc,
)

from tests.broker_fixtures import Broker, new_key_id, start_broker
from tests.integration.flows import (
    CTX,
    code_of,
    create_key,
    datakey,
    decrypt,
    events_for,
    issue,
    rid,
    standard_policy,
)

IA = grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("key_id", ["", "UPPER", "-lead", "a" * 64, "spa ce", "sl/ash", "ünï"])
def test_bad_key_id_is_invalid_argument(broker: Broker, key_id: str) -> None:
    code, msg = code_of(
        lambda: broker.keys().CreateKey(
            key_admin_pb2.CreateKeyRequest(key_id=key_id, policy=standard_policy())
        )
    )
    assert code == IA and "key_id" in msg


@pytest.mark.parametrize(
    "context",
    [
        {f"k{i}": "v" for i in range(17)},
        {"k" * 65: "v"},
        {"k": "v" * 257},
        {"": "v"},
        {"k": "a\x00b"},
    ],
)
def test_bad_context_is_invalid_argument(broker: Broker, context: dict[str, str]) -> None:
    key_id = create_key(broker)
    code, msg = code_of(lambda: datakey(broker, key_id, context))
    assert code == IA and "context" in msg


def test_context_limits_are_inclusive(broker: Broker) -> None:
    key_id = create_key(broker)
    ctx = {f"{i:02d}" + "k" * 62: "v" * 256 for i in range(16)}
    assert datakey(broker, key_id, ctx).key_version == 1


def test_invalid_utf8_in_context_is_invalid_argument(broker: Broker) -> None:
    """A hand-made message whose map value is not UTF-8 never reaches the service."""
    key_id = create_key(broker)
    good = crypto_pb2.GenerateDataKeyRequest(key_id=key_id, context={"k": "vv"}).SerializeToString()
    bad = good.replace(b"vv", b"\xff\xfe")
    call = broker.channel("producer").unary_unary(
        "/keybroker.v1.Crypto/GenerateDataKey",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    code, msg = code_of(lambda: call(bad))
    assert code == IA and "decoded" in msg


def test_undecryptable_blob_is_invalid_argument(broker: Broker) -> None:
    key_id = create_key(broker)
    token = issue(broker, key_id).token
    code, _ = code_of(lambda: decrypt(broker, b"not a blob at all", token))
    assert code == IA


def test_no_client_certificate_is_unauthenticated(broker: Broker) -> None:
    """The development plaintext listener carries no certificate: every key RPC is refused."""
    with grpc.insecure_channel(f"127.0.0.1:{broker.running.insecure_port}") as ch:
        code, msg = code_of(
            lambda: key_admin_pb2_grpc.KeyAdminStub(ch).GetKey(
                key_admin_pb2.GetKeyRequest(key_id="anything")
            )
        )
        assert code == grpc.StatusCode.UNAUTHENTICATED and "client certificate" in msg
        # The refusal is audited, with no principal.
        request_id = rid()
        code, _ = code_of(
            lambda: crypto_pb2_grpc.CryptoStub(ch).GenerateDataKey(
                crypto_pb2.GenerateDataKeyRequest(key_id="anything"),
                metadata=(("x-request-id", request_id),),
            )
        )
        assert code == grpc.StatusCode.UNAUTHENTICATED
        (event,) = events_for(broker, request_id)
        assert (event.principal, event.operation, event.outcome) == ("", "GenerateDataKey", 2)
        for call in (
            lambda: tokens_pb2_grpc.TokensStub(ch).GetSigningKeys(
                tokens_pb2.GetSigningKeysRequest()
            ),
            lambda: key_admin_pb2_grpc.KeyAdminStub(ch).ScheduleKeyDestruction(
                key_admin_pb2.ScheduleKeyDestructionRequest(key_id="x")
            ),
        ):
            assert code_of(call)[0] == grpc.StatusCode.UNAUTHENTICATED
        # Health is still served there, for probes.
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_tls_without_client_certificate_is_refused_at_handshake(broker: Broker) -> None:
    ca = (broker.home / "pki" / "ca.pem").read_bytes()
    creds = grpc.ssl_channel_credentials(root_certificates=ca)
    with grpc.secure_channel(broker.target, creds) as ch:
        code, _ = code_of(
            lambda: key_admin_pb2_grpc.KeyAdminStub(ch).GetKey(
                key_admin_pb2.GetKeyRequest(key_id="anything"), timeout=5
            )
        )
        assert code == grpc.StatusCode.UNAVAILABLE


def test_bad_token_is_unauthenticated(broker: Broker) -> None:
    key_id = create_key(broker)
    dk = datakey(broker, key_id)
    code, _ = code_of(lambda: decrypt(broker, dk.wrapped_key, "garbage"))
    assert code == grpc.StatusCode.UNAUTHENTICATED


def test_role_is_permission_denied(broker: Broker) -> None:
    code, msg = code_of(
        lambda: broker.keys("producer").CreateKey(
            key_admin_pb2.CreateKeyRequest(key_id=new_key_id(), policy=standard_policy())
        )
    )
    assert code == grpc.StatusCode.PERMISSION_DENIED and "admin" in msg
    code, _ = code_of(lambda: broker.keys("consumer").ListKeys(key_admin_pb2.ListKeysRequest()))
    assert code == grpc.StatusCode.PERMISSION_DENIED


def test_missing_grant_is_permission_denied(broker: Broker) -> None:
    key_id = create_key(broker)
    code, _ = code_of(lambda: datakey(broker, key_id, identity="consumer"))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    code, _ = code_of(lambda: issue(broker, key_id, identity="producer"))
    assert code == grpc.StatusCode.PERMISSION_DENIED


def test_grant_context_is_permission_denied(broker: Broker) -> None:
    key_id = create_key(broker)
    code, msg = code_of(lambda: issue(broker, key_id, {"dataset": "other-1"}))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "context" in msg
    # Prefix match: "cohort-*" admits any cohort.
    assert issue(broker, key_id, {"dataset": "cohort-7"}).token


def test_jurisdiction_is_permission_denied(broker: Broker) -> None:
    code, msg = code_of(lambda: create_key(broker, hsm="us-east"))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "jurisdiction" in msg
    # A policy that allows the US may use that HSM.
    key_id = create_key(broker, policy=standard_policy(allowed_jurisdictions=["US"]), hsm="us-east")
    assert datakey(broker, key_id).key_version == 1
    # Narrowing a key's policy so its HSM's jurisdiction is no longer allowed is refused.
    local = create_key(broker)
    code, _ = code_of(
        lambda: broker.keys().UpdateKeyPolicy(
            key_admin_pb2.UpdateKeyPolicyRequest(
                key_id=local, policy=standard_policy(allowed_jurisdictions=["DE"])
            )
        )
    )
    assert code == grpc.StatusCode.PERMISSION_DENIED


def test_unknown_key_and_version_are_not_found(broker: Broker) -> None:
    code, _ = code_of(lambda: broker.keys().GetKey(key_admin_pb2.GetKeyRequest(key_id="nope")))
    assert code == grpc.StatusCode.NOT_FOUND
    # An admin learns that the key does not exist; a service without a grant learns only
    # that it may not use it (tests/integration/test_existence_oracle.py).
    code, _ = code_of(lambda: datakey(broker, "nope", identity="admin"))
    assert code == grpc.StatusCode.NOT_FOUND
    code, _ = code_of(lambda: datakey(broker, "nope"))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    from broker import blob as blobs

    key_id = create_key(broker)
    dk = datakey(broker, key_id)
    parsed = blobs.parse(dk.wrapped_key)
    future = blobs.Blob(key_id, 9, parsed.iv, parsed.sealed).encode()
    token = issue(broker, key_id).token
    code, msg = code_of(lambda: decrypt(broker, future, token))
    assert code == grpc.StatusCode.NOT_FOUND and "version 9" in msg


def test_existing_key_is_already_exists(broker: Broker) -> None:
    key_id = create_key(broker)
    code, _ = code_of(lambda: create_key(broker, key_id))
    assert code == grpc.StatusCode.ALREADY_EXISTS


def test_disabled_key_is_failed_precondition(broker: Broker) -> None:
    key_id = create_key(broker)
    dk = datakey(broker, key_id)
    token = issue(broker, key_id).token
    disabled = broker.keys().DisableKey(key_admin_pb2.DisableKeyRequest(key_id=key_id)).key
    assert disabled.state == resources_pb2.KEY_STATE_DISABLED
    for call in (
        lambda: datakey(broker, key_id),
        lambda: decrypt(broker, dk.wrapped_key, token),
        lambda: issue(broker, key_id),
    ):
        code, msg = code_of(call)
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "disabled" in msg
    broker.keys().EnableKey(key_admin_pb2.EnableKeyRequest(key_id=key_id))
    assert decrypt(broker, dk.wrapped_key, token).plaintext == dk.plaintext_key


def test_destruction_status_codes(broker: Broker) -> None:
    def schedule(key_id: str, seconds: int) -> object:
        return broker.keys().ScheduleKeyDestruction(
            key_admin_pb2.ScheduleKeyDestructionRequest(
                key_id=key_id, pending_window=Duration(seconds=seconds)
            )
        )

    key_id = create_key(broker)
    code, msg = code_of(lambda: schedule(key_id, 86400))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "at least 7 days" in msg
    code, _ = code_of(lambda: schedule(new_key_id("missing"), 8 * 86400))
    assert code == grpc.StatusCode.NOT_FOUND
    schedule(key_id, 8 * 86400)
    code, _ = code_of(lambda: schedule(key_id, 8 * 86400))
    assert code == grpc.StatusCode.FAILED_PRECONDITION


def test_rate_limit_is_resource_exhausted(hsm_home, tmp_path) -> None:  # type: ignore[no-untyped-def]
    b = start_broker(
        hsm_home, database=tmp_path / "rl.db", rate_limit_per_second=0.001, rate_limit_burst=3
    )
    try:
        key_id = create_key(b)  # 1 call for admin
        for _ in range(3):
            datakey(b, key_id)
        code, msg = code_of(lambda: datakey(b, key_id))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "rate limit" in msg
        # Another principal has its own bucket.
        assert b.keys("auditor").GetKey(key_admin_pb2.GetKeyRequest(key_id=key_id)).key
    finally:
        b.close()


def test_oversize_message_is_refused(broker: Broker) -> None:
    key_id = create_key(broker)
    code, _ = code_of(
        lambda: broker.crypto("producer").Encrypt(
            crypto_pb2.EncryptRequest(
                key_id=key_id, plaintext=b"x" * (5 * 1024 * 1024), context=CTX
            )
        )
    )
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.parametrize("ckr", ["CKR_DEVICE_ERROR", "CKR_SESSION_HANDLE_INVALID"])
def test_hsm_fault_is_unavailable_then_recovers(broker: Broker, ckr: str) -> None:
    import PyKCS11

    from hsm_sim.faults import FailOnCall

    key_id = create_key(broker)
    dk = datakey(broker, key_id)
    token = issue(broker, key_id).token
    hsm = broker.app.hsms["local"]
    for call in (lambda: datakey(broker, key_id), lambda: decrypt(broker, dk.wrapped_key, token)):
        hsm.gate.fault = FailOnCall(1, getattr(PyKCS11, ckr))  # type: ignore[attr-defined]
        try:
            code, msg = code_of(call)
        finally:
            hsm.gate.fault = None  # type: ignore[attr-defined]
        assert code == grpc.StatusCode.UNAVAILABLE, msg
        assert dk.plaintext_key.hex() not in msg
        # The next call succeeds on a fresh session.
        assert call()


def test_plaintext_listener_only_when_configured_and_loudly(
    hsm_home, tmp_path, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    """Invariant 3: no plaintext port by default; configuring one logs a warning."""
    from broker.config import Settings

    assert Settings(home=tmp_path).insecure_listen == ""
    b = start_broker(hsm_home, database=tmp_path / "a.db")
    try:
        assert b.running.insecure_port == 0
    finally:
        b.close()
    assert "PLAINTEXT" not in caplog.text
    b = start_broker(hsm_home, database=tmp_path / "b.db", insecure_listen="127.0.0.1:0")
    try:
        assert b.running.insecure_port > 0
    finally:
        b.close()
    warnings = [r for r in caplog.records if "PLAINTEXT LISTENER" in r.getMessage()]
    assert warnings and warnings[0].levelname == "WARNING"
