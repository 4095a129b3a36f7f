"""Unit tests of the client SDK against an in-process fake broker over mutual TLS.

The fake broker (``FakeBroker``) and the throwaway PKI (``make_pki``) are shared with
test_client_cli.py. The fake serves every RPC of the keybroker.v1 services from the protos'
descriptors, records each request with the caller's certificate CN, and answers with canned
responses or aborts with a chosen status.
"""

from __future__ import annotations

import base64
import datetime as dt
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import given
from hypothesis import strategies as st
from keybroker.v1 import (
    audit_pb2,
    crypto_pb2,
    key_admin_pb2,
    resources_pb2,
    tokens_pb2,
)
from keybroker_client import (
    AuditEvent,
    AuditReport,
    ClientSettings,
    ConfigError,
    DataKey,
    Grant,
    Key,
    KeybrokerClient,
    KeybrokerError,
    KeyPage,
    KeyPolicy,
    KeyState,
    KeyVersion,
    Operation,
    Outcome,
    cert_thumbprint,
    errors,
    format_duration,
    parse_context,
    parse_duration,
    parse_grant,
    policy_from_grants,
    resolve_settings,
)

from tests.unit.client_fakes import (
    Abort,
    FakeBroker,
    Pki,
    closed_port,
    make_key,
    make_pki,
)

# ---------------------------------------------------------------------------------------------
# Fixtures (the PKI, the fake broker and a clean environment come from conftest.py)


@pytest.fixture
def kb(client_pki: Pki, fake_broker: FakeBroker) -> Iterator[KeybrokerClient]:
    settings = client_pki.settings(fake_broker.target)
    with KeybrokerClient.from_settings(settings, timeout=5.0) as client:
        yield client


# ---------------------------------------------------------------------------------------------
# Parsing helpers


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90),
        ("5m", 300),
        ("1h", 3600),
        ("2d", 172800),
        ("1h30m", 5400),
        (" 15M ", 900),
    ],
)
def test_parse_duration(text: str, seconds: int) -> None:
    assert parse_duration(text) == dt.timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "5", "m", "5x", "-5m", "1.5h", "0s", "5m 3s", "h1"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


@given(st.integers(min_value=1, max_value=10**8))
def test_format_duration_round_trips(seconds: int) -> None:
    value = dt.timedelta(seconds=seconds)
    assert parse_duration(format_duration(value)) == value


def test_parse_context_keeps_equals_in_values() -> None:
    assert parse_context(["a=b=c", "empty=", "k=v"]) == {"a": "b=c", "empty": "", "k": "v"}


@pytest.mark.parametrize(
    ("entries", "message"),
    [(["novalue"], "key=value"), (["=v"], "must not be empty"), (["a=1", "a=2"], "twice")],
)
def test_parse_context_rejects(entries: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_context(entries)


@given(
    st.dictionaries(
        st.text(min_size=1).filter(lambda s: "=" not in s),
        st.text(),
        max_size=16,
    )
)
def test_parse_context_round_trips(context: dict[str, str]) -> None:
    assert parse_context(f"{k}={v}" for k, v in context.items()) == context


def test_policy_from_grants_builds_key_policy() -> None:
    policy = policy_from_grants(
        [
            "consumer:decrypt:dataset=cohort-42,purpose=study*",
            "producer:encrypt+rewrap",
            "ops:decrypt,encrypt",
        ],
        ["fr", "DE", "FR"],
        max_token_ttl=dt.timedelta(minutes=15),
    )
    expected = KeyPolicy(
        grants=(
            Grant(
                principal="consumer",
                operations=(Operation.DECRYPT,),
                context={"dataset": "cohort-42", "purpose": "study*"},
                max_token_ttl=dt.timedelta(seconds=900),
            ),
            Grant(
                principal="producer",
                operations=(Operation.ENCRYPT, Operation.REWRAP),
            ),
            Grant(
                principal="ops",
                operations=(Operation.DECRYPT, Operation.ENCRYPT),
                max_token_ttl=dt.timedelta(seconds=900),
            ),
        ),
        allowed_jurisdictions=("FR", "DE"),
    )
    assert policy == expected
    # max_token_ttl only applies to grants that allow decrypt.
    assert policy.grants[1].max_token_ttl is None


def test_parse_grant_context_value_may_contain_colon_and_equals() -> None:
    grant = parse_grant("svc:decrypt:url=https://x/a=b")
    assert dict(grant.context) == {"url": "https://x/a=b"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("consumer", "PRINCIPAL:OPS"),
        (":decrypt", "PRINCIPAL:OPS"),
        ("consumer:", "at least one"),
        ("consumer:read", "unknown operation 'read'"),
        ("consumer:decrypt:dataset", "key=value"),
    ],
)
def test_parse_grant_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_grant(text)


def test_policy_rejects_bad_jurisdiction() -> None:
    with pytest.raises(ValueError, match="jurisdiction"):
        policy_from_grants(["a:encrypt"], ["France"])


def test_cert_thumbprint_is_base64url_sha256_of_der(client_pki: Pki) -> None:
    pem = client_pki.read("consumer.pem")
    der = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
    import hashlib

    expected = base64.urlsafe_b64encode(hashlib.sha256(der).digest()).decode().rstrip("=")
    thumb = cert_thumbprint(pem)
    assert thumb == expected
    assert len(thumb) == 43
    assert "=" not in thumb
    assert "+" not in thumb
    assert "/" not in thumb
    assert thumb != cert_thumbprint(client_pki.read("admin.pem"))


def test_cert_thumbprint_rejects_non_pem() -> None:
    with pytest.raises(ValueError):
        cert_thumbprint(b"not a certificate")


# ---------------------------------------------------------------------------------------------
# Settings


def _write_listen_addr(home: Path, value: str) -> None:
    (home / "listen.addr").write_text(value + "\n")


def test_resolve_settings_defaults_from_home(client_pki: Pki) -> None:
    _write_listen_addr(client_pki.home, "127.0.0.1:41234")
    try:
        settings = resolve_settings(home=client_pki.home, environ={})
    finally:
        (client_pki.home / "listen.addr").unlink()
    assert settings == ClientSettings(
        target="127.0.0.1:41234",
        ca=client_pki.dir / "ca.pem",
        cert=client_pki.dir / "admin.pem",
        key=client_pki.dir / "admin.key",
    )


def test_resolve_settings_without_listen_addr_uses_default_target(client_pki: Pki) -> None:
    assert resolve_settings(home=client_pki.home, environ={}).target == "127.0.0.1:50051"


def test_resolve_settings_wildcard_listen_addr_becomes_loopback(tmp_path: Path) -> None:
    make_pki(tmp_path, ("admin",))
    _write_listen_addr(tmp_path, "0.0.0.0:5000")
    assert resolve_settings(home=tmp_path, environ={}).target == "127.0.0.1:5000"


def test_resolve_settings_env_home_identity_and_target(client_pki: Pki) -> None:
    env = {
        "KEYBROKER_HOME": str(client_pki.home),
        "KEYBROKER_IDENTITY": "consumer",
        "KEYBROKER_TARGET": "fake_broker.example:443",
    }
    settings = resolve_settings(environ=env)
    assert settings.target == "fake_broker.example:443"
    assert settings.cert == client_pki.dir / "consumer.pem"
    assert settings.key == client_pki.dir / "consumer.key"
    # An explicit identity beats the environment; an explicit target too.
    explicit = resolve_settings(identity="auditor", target="h:1", environ=env)
    assert explicit.cert == client_pki.dir / "auditor.pem"
    assert explicit.target == "h:1"


def test_resolve_settings_env_cert_and_explicit_files(client_pki: Pki) -> None:
    env = {
        "KEYBROKER_HOME": str(client_pki.home),
        "KEYBROKER_CERT": str(client_pki.dir / "producer.pem"),
        "KEYBROKER_KEY": str(client_pki.dir / "producer.key"),
        "KEYBROKER_CA": str(client_pki.dir / "ca.pem"),
    }
    assert resolve_settings(environ=env).cert == client_pki.dir / "producer.pem"
    # --as beats KEYBROKER_CERT/KEY; explicit --cert/--key beat both.
    assert (
        resolve_settings(identity="consumer", environ=env).cert == client_pki.dir / "consumer.pem"
    )
    explicit = resolve_settings(
        identity="consumer",
        cert=client_pki.dir / "auditor.pem",
        key=client_pki.dir / "auditor.key",
        environ=env,
    )
    assert explicit.key == client_pki.dir / "auditor.key"


def test_resolve_settings_missing_file_names_it_and_suggests_make_run(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        resolve_settings(home=tmp_path, environ={})
    message = str(info.value)
    assert message.startswith("CONFIG: CA certificate not found: ")
    assert str(tmp_path / "pki" / "ca.pem") in message
    assert "make run" in message
    assert "--ca/--cert/--key" in message


def test_resolve_settings_missing_identity_cert(client_pki: Pki) -> None:
    with pytest.raises(ConfigError, match=r"client certificate not found: .*nobody\.pem"):
        resolve_settings(home=client_pki.home, identity="nobody", environ={})


def test_resolve_settings_cert_without_key(client_pki: Pki) -> None:
    with pytest.raises(ConfigError, match="go together"):
        resolve_settings(home=client_pki.home, cert=client_pki.dir / "admin.pem", environ={})


def test_resolve_settings_rejects_path_like_identity(client_pki: Pki) -> None:
    with pytest.raises(ConfigError, match="identity"):
        resolve_settings(home=client_pki.home, identity="../admin", environ={})


def test_from_settings_unreadable_file(client_pki: Pki, tmp_path: Path) -> None:
    settings = ClientSettings(
        "127.0.0.1:1", client_pki.dir / "ca.pem", tmp_path / "gone.pem", tmp_path / "gone.key"
    )
    with pytest.raises(ConfigError, match=r"gone\.pem"):
        KeybrokerClient.from_settings(settings)


# ---------------------------------------------------------------------------------------------
# Transport: mutual TLS, request ids, deadlines


def test_calls_use_mutual_tls_with_the_client_certificate(
    client_pki: Pki, fake_broker: FakeBroker, kb: KeybrokerClient
) -> None:
    fake_broker.responses["GetKey"] = key_admin_pb2.GetKeyResponse(key=make_key("patients"))
    assert kb.get_key("patients").key_id == "patients"
    with KeybrokerClient.from_settings(
        client_pki.settings(fake_broker.target, "consumer")
    ) as consumer:
        consumer.get_key("patients")
    first, second = fake_broker.calls
    assert (first.principal, first.transport) == ("admin", "ssl")
    assert (second.principal, second.transport) == ("consumer", "ssl")
    assert fake_broker.requests("GetKey")[0] == key_admin_pb2.GetKeyRequest(key_id="patients")


def test_certificate_from_another_ca_is_refused(fake_broker: FakeBroker, tmp_path: Path) -> None:
    rogue = make_pki(tmp_path, ("admin",))
    # Trust the real CA, but present a client certificate the broker's CA never signed.
    settings = ClientSettings(
        target=fake_broker.target,
        ca=fake_broker.pki.dir / "ca.pem",
        cert=rogue.dir / "admin.pem",
        key=rogue.dir / "admin.key",
    )
    with KeybrokerClient.from_settings(settings, timeout=5.0) as kb, pytest.raises(KeybrokerError):
        kb.get_key("patients")
    assert fake_broker.calls == []


def test_each_call_sends_a_fresh_request_id_and_a_deadline(
    fake_broker: FakeBroker, kb: KeybrokerClient
) -> None:
    kb.get_key("a")
    kb.get_key("b")
    ids = [c.metadata["x-request-id"] for c in fake_broker.calls]
    assert len(set(ids)) == 2
    for value in ids:
        assert uuid.UUID(value).version == 4
    for call in fake_broker.calls:
        assert call.time_remaining is not None
        # The client's 5 s deadline; gRPC's wire encoding may round it up a little.
        assert 3.0 < call.time_remaining < 6.0


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, errors.InvalidArgument),
        (grpc.StatusCode.UNAUTHENTICATED, errors.Unauthenticated),
        (grpc.StatusCode.PERMISSION_DENIED, errors.PermissionDenied),
        (grpc.StatusCode.NOT_FOUND, errors.NotFound),
        (grpc.StatusCode.ALREADY_EXISTS, errors.AlreadyExists),
        (grpc.StatusCode.FAILED_PRECONDITION, errors.FailedPrecondition),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, errors.ResourceExhausted),
        (grpc.StatusCode.UNAVAILABLE, errors.Unavailable),
        (grpc.StatusCode.INTERNAL, errors.UnexpectedError),
        (grpc.StatusCode.UNIMPLEMENTED, errors.UnexpectedError),
    ],
)
def test_status_codes_map_to_error_classes(
    fake_broker: FakeBroker, kb: KeybrokerClient, code: grpc.StatusCode, cls: type
) -> None:
    fake_broker.responses["RotateKey"] = Abort(code, "the broker says no")
    with pytest.raises(cls) as info:
        kb.rotate_key("patients")
    err = info.value
    assert type(err) is cls
    assert err.code_name == code.name
    assert err.message == "the broker says no"
    assert str(err) == f"{code.name}: the broker says no"
    assert err.request_id == fake_broker.calls[0].metadata["x-request-id"]
    assert not isinstance(err, grpc.RpcError)
    # The hierarchy is flat: every class derives directly from KeybrokerError.
    assert cls.__bases__ == (KeybrokerError,)


def test_unreachable_broker_is_unavailable(client_pki: Pki) -> None:
    settings = client_pki.settings(f"127.0.0.1:{closed_port()}")
    with KeybrokerClient.from_settings(settings, timeout=5.0) as kb:
        start = time.monotonic()
        with pytest.raises(errors.Unavailable):
            kb.get_key("patients")
    assert time.monotonic() - start < 5.0


def test_client_package_never_imports_the_server() -> None:
    code = (
        "import sys, keybroker_client, keybroker_client.cli;"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('broker', 'hsm_sim')];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------------
# RPCs


def test_create_key_sends_policy_rotation_and_hsm(
    fake_broker: FakeBroker, kb: KeybrokerClient
) -> None:
    fake_broker.responses["CreateKey"] = key_admin_pb2.CreateKeyResponse(key=make_key("patients"))
    policy = policy_from_grants(["producer:encrypt"], ["FR"])
    key = kb.create_key(
        "patients", "patient data", policy=policy, rotation_period="30d", hsm="hsm-fr"
    )
    assert key.key_id == "patients"
    (request,) = fake_broker.requests("CreateKey")
    assert request.key_id == "patients"
    assert request.description == "patient data"
    assert request.policy == resources_pb2.KeyPolicy(
        grants=[
            resources_pb2.Grant(principal="producer", operations=[resources_pb2.OPERATION_ENCRYPT])
        ],
        allowed_jurisdictions=["FR"],
    )
    assert request.rotation_period.ToTimedelta() == dt.timedelta(days=30)
    assert request.hsm == "hsm-fr"


def test_create_key_without_options_leaves_fields_unset(
    fake_broker: FakeBroker, kb: KeybrokerClient
) -> None:
    kb.create_key("plain")
    (request,) = fake_broker.requests("CreateKey")
    assert not request.HasField("policy")
    assert not request.HasField("rotation_period")


def test_iter_keys_follows_next_page_token(fake_broker: FakeBroker, kb: KeybrokerClient) -> None:
    pages = {
        "": key_admin_pb2.ListKeysResponse(
            keys=[make_key("a"), make_key("b")], next_page_token="p2"
        ),
        "p2": key_admin_pb2.ListKeysResponse(keys=[make_key("c")], next_page_token="p3"),
        "p3": key_admin_pb2.ListKeysResponse(keys=[make_key("d")]),
    }
    fake_broker.responses["ListKeys"] = lambda req: pages[req.page_token]
    assert [k.key_id for k in kb.iter_keys(page_size=2)] == ["a", "b", "c", "d"]
    requests = fake_broker.requests("ListKeys")
    assert [r.page_token for r in requests] == ["", "p2", "p3"]
    assert {r.page_size for r in requests} == {2}


def test_key_lifecycle_calls(fake_broker: FakeBroker, kb: KeybrokerClient) -> None:
    kb.rotate_key("k")
    kb.enable_key("k")
    kb.disable_key("k")
    kb.update_key_policy("k", policy_from_grants(["c:decrypt"]))
    kb.schedule_key_destruction("k", "7d")
    kb.cancel_key_destruction("k")
    assert [c.method for c in fake_broker.calls] == [
        "RotateKey",
        "EnableKey",
        "DisableKey",
        "UpdateKeyPolicy",
        "ScheduleKeyDestruction",
        "CancelKeyDestruction",
    ]
    assert all(c.request.key_id == "k" for c in fake_broker.calls)
    assert fake_broker.requests("ScheduleKeyDestruction")[0].pending_window.seconds == 7 * 86400


def test_generate_data_key(fake_broker: FakeBroker, kb: KeybrokerClient) -> None:
    secret = bytes(range(32))
    fake_broker.responses["GenerateDataKey"] = crypto_pb2.GenerateDataKeyResponse(
        plaintext_key=secret, wrapped_key=b"WRAPPED", key_id="patients", key_version=3
    )
    dk = kb.generate_data_key("patients", {"dataset": "cohort-42"})
    assert dk == DataKey(secret, b"WRAPPED", "patients", 3)
    assert secret.hex() not in repr(dk)
    assert repr(secret) not in repr(dk)
    (request,) = fake_broker.requests("GenerateDataKey")
    assert dict(request.context) == {"dataset": "cohort-42"}


def test_encrypt_decrypt_rewrap(fake_broker: FakeBroker, kb: KeybrokerClient) -> None:
    fake_broker.responses["Encrypt"] = crypto_pb2.EncryptResponse(
        ciphertext=b"CT", key_id="k", key_version=1
    )
    fake_broker.responses["Decrypt"] = crypto_pb2.DecryptResponse(
        plaintext=b"hello", key_id="k", key_version=1
    )
    fake_broker.responses["ReWrap"] = crypto_pb2.ReWrapResponse(
        ciphertext=b"CT2", key_id="k", key_version=2
    )
    assert kb.encrypt("k", b"hello", {"a": "1"}).ciphertext == b"CT"
    decrypted = kb.decrypt(b"CT", {"a": "1"}, "tok.en.jwt")
    assert decrypted.plaintext == b"hello"
    assert "hello" not in repr(decrypted)
    rewrapped = kb.rewrap(b"CT", {"a": "1"})
    assert (rewrapped.ciphertext, rewrapped.key_version) == (b"CT2", 2)
    assert fake_broker.requests("Encrypt")[0] == crypto_pb2.EncryptRequest(
        key_id="k", plaintext=b"hello", context={"a": "1"}
    )
    assert fake_broker.requests("Decrypt")[0] == crypto_pb2.DecryptRequest(
        ciphertext=b"CT", context={"a": "1"}, token="tok.en.jwt"
    )
    assert fake_broker.requests("ReWrap")[0] == crypto_pb2.ReWrapRequest(
        ciphertext=b"CT", context={"a": "1"}
    )


def test_issue_token(client_pki: Pki, fake_broker: FakeBroker, kb: KeybrokerClient) -> None:
    response = tokens_pb2.IssueTokenResponse(token="a.b.c", token_id="tid-1")
    response.expire_time.FromDatetime(dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.UTC))
    fake_broker.responses["IssueToken"] = response
    thumb = cert_thumbprint(client_pki.read("consumer.pem"))
    issued = kb.issue_token(
        "patients",
        {"dataset": "cohort-42"},
        "study 7",
        ttl=dt.timedelta(minutes=5),
        subject="consumer",
        subject_cert_thumbprint=thumb,
    )
    assert (issued.token, issued.token_id) == ("a.b.c", "tid-1")
    assert issued.expire_time == dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    assert "a.b.c" not in repr(issued)
    (request,) = fake_broker.requests("IssueToken")
    assert request.ttl.seconds == 300
    assert (request.subject, request.subject_cert_thumbprint) == ("consumer", thumb)
    assert request.justification == "study 7"


def test_issue_token_without_ttl_leaves_it_unset(
    fake_broker: FakeBroker, kb: KeybrokerClient
) -> None:
    kb.issue_token("k", {}, "why")
    assert not fake_broker.requests("IssueToken")[0].HasField("ttl")


def test_revoke_token_and_signing_keys(fake_broker: FakeBroker, kb: KeybrokerClient) -> None:
    fake_broker.responses["GetSigningKeys"] = tokens_pb2.GetSigningKeysResponse(
        jwks_json='{"keys": [{"kty": "EC", "kid": "t1"}]}'
    )
    kb.revoke_token("tid-1")
    assert fake_broker.requests("RevokeToken")[0].token_id == "tid-1"
    assert kb.signing_keys() == {"keys": [{"kty": "EC", "kid": "t1"}]}


def _event(seq: int, **kwargs: Any) -> audit_pb2.ListAuditEventsResponse:
    return audit_pb2.ListAuditEventsResponse(
        event=resources_pb2.AuditEvent(sequence=seq, operation="Decrypt", **kwargs)
    )


def test_audit_events_streams_and_sends_filters(
    fake_broker: FakeBroker, kb: KeybrokerClient
) -> None:
    fake_broker.responses["ListAuditEvents"] = [_event(1), _event(2), _event(3)]
    start = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    events = list(
        kb.audit_events(
            key_id="k",
            principal="consumer",
            operation="Decrypt",
            start_time=start,
            end_time=dt.datetime(2030, 1, 2),  # naive: taken as UTC
            after_sequence=5,
            limit=10,
        )
    )
    assert [e.sequence for e in events] == [1, 2, 3]
    (request,) = fake_broker.requests("ListAuditEvents")
    assert (request.key_id, request.principal, request.operation) == ("k", "consumer", "Decrypt")
    assert (request.after_sequence, request.limit) == (5, 10)
    assert request.start_time.ToDatetime(tzinfo=dt.UTC) == start
    assert request.end_time.ToDatetime(tzinfo=dt.UTC) == dt.datetime(2030, 1, 2, tzinfo=dt.UTC)
    assert "x-request-id" in fake_broker.calls[0].metadata


def test_audit_events_maps_stream_errors(fake_broker: FakeBroker, kb: KeybrokerClient) -> None:
    fake_broker.responses["ListAuditEvents"] = Abort(
        grpc.StatusCode.PERMISSION_DENIED, "auditors only"
    )
    with pytest.raises(errors.PermissionDenied, match="auditors only"):
        list(kb.audit_events())


def test_verify_audit_log(fake_broker: FakeBroker, kb: KeybrokerClient) -> None:
    fake_broker.responses["VerifyAuditLog"] = audit_pb2.VerifyAuditLogResponse(
        ok=False, events_checked=9, first_bad_sequence=7, error="hash mismatch"
    )
    report = kb.verify_audit_log()
    assert (report.ok, report.first_bad_sequence) == (False, 7)


# ---------------------------------------------------------------------------------------------
# The SDK's own types: no protobuf message leaves the client


def test_get_key_returns_a_key_with_enums_times_and_durations(
    fake_broker: FakeBroker, kb: KeybrokerClient
) -> None:
    created = dt.datetime(2030, 1, 1, 12, 0, tzinfo=dt.UTC)
    key = make_key("patients", description="cohort data", hsm="hsm-fr", min_decryption_version=1)
    key.state = resources_pb2.KEY_STATE_DISABLED
    key.versions.add(version=1).create_time.FromDatetime(created)
    key.create_time.FromDatetime(created)
    key.rotation_period.FromTimedelta(dt.timedelta(days=30))
    grant = key.policy.grants.add(
        principal="consumer", operations=[resources_pb2.OPERATION_DECRYPT], context={"a": "1"}
    )
    grant.max_token_ttl.FromTimedelta(dt.timedelta(minutes=15))
    key.policy.allowed_jurisdictions.append("FR")
    fake_broker.responses["GetKey"] = key_admin_pb2.GetKeyResponse(key=key)
    assert kb.get_key("patients") == Key(
        key_id="patients",
        description="cohort data",
        state=KeyState.DISABLED,
        primary_version=1,
        versions=(KeyVersion(1, created),),
        min_decryption_version=1,
        policy=KeyPolicy(
            grants=(Grant("consumer", (Operation.DECRYPT,), {"a": "1"}, dt.timedelta(minutes=15)),),
            allowed_jurisdictions=("FR",),
        ),
        hsm="hsm-fr",
        create_time=created,
        rotation_period=dt.timedelta(days=30),
    )


def test_list_keys_returns_a_key_page(fake_broker: FakeBroker, kb: KeybrokerClient) -> None:
    fake_broker.responses["ListKeys"] = key_admin_pb2.ListKeysResponse(
        keys=[make_key("a")], next_page_token="n"
    )
    page = kb.list_keys(page_size=1)
    assert page == KeyPage(
        keys=(Key("a", state=KeyState.ENABLED, primary_version=1),), next_page_token="n"
    )


def test_update_key_policy_sends_the_policy(fake_broker: FakeBroker, kb: KeybrokerClient) -> None:
    policy = KeyPolicy(grants=[Grant("ops", [Operation.REWRAP])], allowed_jurisdictions=["DE"])
    kb.update_key_policy("k", policy)
    (request,) = fake_broker.requests("UpdateKeyPolicy")
    assert request.policy == resources_pb2.KeyPolicy(
        grants=[resources_pb2.Grant(principal="ops", operations=[resources_pb2.OPERATION_REWRAP])],
        allowed_jurisdictions=["DE"],
    )


def test_audit_events_and_report_are_sdk_types(
    fake_broker: FakeBroker, kb: KeybrokerClient
) -> None:
    when = dt.datetime(2030, 1, 1, 12, 0, 5, tzinfo=dt.UTC)
    response = _event(4, outcome=resources_pb2.OUTCOME_DENIED, context={"k": "v"}, hash="ab")
    response.event.time.FromDatetime(when)
    fake_broker.responses["ListAuditEvents"] = [response]
    fake_broker.responses["VerifyAuditLog"] = audit_pb2.VerifyAuditLogResponse(
        ok=True, events_checked=4, head_hash="ab"
    )
    (event,) = kb.audit_events()
    assert event == AuditEvent(
        sequence=4,
        time=when,
        operation="Decrypt",
        context={"k": "v"},
        outcome=Outcome.DENIED,
        hash="ab",
    )
    assert kb.verify_audit_log() == AuditReport(ok=True, events_checked=4, head_hash="ab")


def test_importing_the_cli_leaves_the_environment_alone() -> None:
    code = (
        "import os; os.environ.pop('GRPC_VERBOSITY', None);"
        "import keybroker_client, keybroker_client.cli;"
        "assert 'GRPC_VERBOSITY' not in os.environ"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
