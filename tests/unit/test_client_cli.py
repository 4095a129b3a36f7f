"""Unit tests of the ``keybroker`` CLI against the in-process fake broker over mutual TLS."""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import stat
from pathlib import Path

import grpc
import pytest
from click.testing import CliRunner, Result
from keybroker.v1 import audit_pb2, crypto_pb2, key_admin_pb2, resources_pb2, tokens_pb2
from keybroker_client import cert_thumbprint
from keybroker_client.cli import cli
from keybroker_client.cli.errors import EXIT_CODES
from keybroker_client.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)

from tests.unit.client_fakes import (
    Abort,
    FakeBroker,
    Pki,
    closed_port,
    make_key,
    make_pki,
)

SECRET_KEY = bytes(range(100, 132))
SECRET_B64 = base64.b64encode(SECRET_KEY).decode()


@pytest.fixture
def fake(fake_broker: FakeBroker) -> FakeBroker:
    """The conftest's fake broker, under the short name these tests use."""
    return fake_broker


@pytest.fixture
def home(tmp_path: Path, client_pki: Pki, fake: FakeBroker) -> Path:
    """A broker home as `make run` leaves it: pki/ and listen.addr naming the fake broker."""
    (tmp_path / "pki").symlink_to(client_pki.dir, target_is_directory=True)
    (tmp_path / "listen.addr").write_text(fake.target + "\n")
    return tmp_path


def run(home: Path, *args: str, input: bytes | str | None = None) -> Result:
    """Runs the CLI with --home and checks that it never ends in a traceback."""
    result = CliRunner().invoke(cli, ["--home", str(home), *args], input=input)
    if result.exception is not None:
        assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    return result


# ---------------------------------------------------------------------------------------------
# keys


def test_keys_create_builds_the_policy_from_grants(home: Path, fake: FakeBroker) -> None:
    fake.responses["CreateKey"] = key_admin_pb2.CreateKeyResponse(key=make_key("patients"))
    result = run(
        home,
        "keys",
        "create",
        "patients",
        "--description",
        "patient records",
        "--grant",
        "producer:encrypt+rewrap",
        "--grant",
        "consumer:decrypt:dataset=cohort-42,purpose=study*",
        "--max-token-ttl",
        "15m",
        "--jurisdiction",
        "fr",
        "--jurisdiction",
        "DE",
        "--rotation-period",
        "30d",
        "--hsm",
        "softhsm-fr",
    )
    assert result.exit_code == 0, result.output
    assert "patients" in result.stdout
    (request,) = fake.requests("CreateKey")
    assert request == key_admin_pb2.CreateKeyRequest(
        key_id="patients",
        description="patient records",
        policy=resources_pb2.KeyPolicy(
            grants=[
                resources_pb2.Grant(
                    principal="producer",
                    operations=[resources_pb2.OPERATION_ENCRYPT, resources_pb2.OPERATION_REWRAP],
                ),
                resources_pb2.Grant(
                    principal="consumer",
                    operations=[resources_pb2.OPERATION_DECRYPT],
                    context={"dataset": "cohort-42", "purpose": "study*"},
                    max_token_ttl={"seconds": 900},
                ),
            ],
            allowed_jurisdictions=["FR", "DE"],
        ),
        rotation_period={"seconds": 30 * 86400},
        hsm="softhsm-fr",
    )
    assert fake.calls[0].principal == "admin"


@pytest.mark.parametrize(
    ("grant", "message"),
    [("consumer", "PRINCIPAL:OPS"), ("consumer:read", "unknown operation 'read'")],
)
def test_keys_create_rejects_bad_grants_before_calling(
    home: Path, fake: FakeBroker, grant: str, message: str
) -> None:
    result = run(home, "keys", "create", "k", "--grant", grant)
    assert result.exit_code == 2
    assert message in result.stderr
    assert fake.calls == []


def test_keys_create_json(home: Path, fake: FakeBroker) -> None:
    key = make_key("patients", hsm="softhsm-fr")
    key.policy.grants.add(principal="producer", operations=[resources_pb2.OPERATION_ENCRYPT])
    fake.responses["CreateKey"] = key_admin_pb2.CreateKeyResponse(key=key)
    result = run(home, "--json", "keys", "create", "patients")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["key_id"] == "patients"
    assert data["state"] == "ENABLED"
    assert data["policy"]["grants"][0]["operations"] == ["encrypt"]


def test_keys_list_follows_pages(home: Path, fake: FakeBroker) -> None:
    pages = {
        "": key_admin_pb2.ListKeysResponse(keys=[make_key("a")], next_page_token="n1"),
        "n1": key_admin_pb2.ListKeysResponse(keys=[make_key("b")]),
    }
    fake.responses["ListKeys"] = lambda req: pages[req.page_token]
    result = run(home, "keys", "list", "--json")
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["key_id"] for line in result.stdout.splitlines()] == ["a", "b"]
    assert [r.page_token for r in fake.requests("ListKeys")] == ["", "n1"]


@pytest.mark.parametrize(
    ("command", "method"),
    [
        ("show", "GetKey"),
        ("rotate", "RotateKey"),
        ("enable", "EnableKey"),
        ("disable", "DisableKey"),
        ("cancel-destruction", "CancelKeyDestruction"),
    ],
)
def test_keys_single_key_commands(home: Path, fake: FakeBroker, command: str, method: str) -> None:
    result = run(home, "keys", command, "patients")
    assert result.exit_code == 0, result.output
    assert [c.method for c in fake.calls] == [method]
    assert fake.calls[0].request.key_id == "patients"


def test_keys_set_policy(home: Path, fake: FakeBroker) -> None:
    result = run(home, "keys", "set-policy", "patients", "--grant", "auditor2:decrypt")
    assert result.exit_code == 0, result.output
    (request,) = fake.requests("UpdateKeyPolicy")
    assert [g.principal for g in request.policy.grants] == ["auditor2"]


def test_keys_set_policy_needs_a_grant_or_no_grants(home: Path, fake: FakeBroker) -> None:
    result = run(home, "keys", "set-policy", "patients")
    assert result.exit_code == 2
    assert "--no-grants" in result.stderr
    assert fake.calls == []
    assert run(home, "keys", "set-policy", "patients", "--no-grants").exit_code == 0
    assert len(fake.requests("UpdateKeyPolicy")[0].policy.grants) == 0


# ---------------------------------------------------------------------------------------------
# identities, settings, mTLS


def test_as_picks_the_identity_the_broker_sees(home: Path, fake: FakeBroker) -> None:
    assert run(home, "--as", "consumer", "keys", "show", "k").exit_code == 0
    assert run(home, "--as", "auditor", "keys", "show", "k").exit_code == 0
    assert [(c.principal, c.transport) for c in fake.calls] == [
        ("consumer", "ssl"),
        ("auditor", "ssl"),
    ]


def test_explicit_target_and_files(tmp_path: Path, client_pki: Pki, fake: FakeBroker) -> None:
    # No listen.addr and no pki/ under this home: everything comes from flags.
    result = run(
        tmp_path,
        "--target",
        fake.target,
        "--ca",
        str(client_pki.dir / "ca.pem"),
        "--cert",
        str(client_pki.dir / "producer.pem"),
        "--key",
        str(client_pki.dir / "producer.key"),
        "keys",
        "show",
        "k",
    )
    assert result.exit_code == 0, result.output
    assert fake.calls[0].principal == "producer"


def test_env_identity(home: Path, fake: FakeBroker, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEYBROKER_IDENTITY", "producer")
    assert run(home, "keys", "show", "k").exit_code == 0
    assert fake.calls[0].principal == "producer"


def test_missing_cert_file_is_a_clean_error(tmp_path: Path) -> None:
    result = run(tmp_path, "keys", "list")
    assert result.exit_code == 3
    assert result.stdout == ""
    line = result.stderr.strip()
    assert "\n" not in line
    assert line.startswith("keybroker: CONFIG: CA certificate not found: ")
    assert str(tmp_path / "pki" / "ca.pem") in line
    assert "make run" in line


def test_missing_identity_is_a_clean_error(home: Path) -> None:
    result = run(home, "--as", "nobody", "keys", "list")
    assert result.exit_code == 3
    assert "client certificate not found" in result.stderr
    assert "nobody.pem" in result.stderr


def test_help_needs_no_certificates(tmp_path: Path) -> None:
    result = run(tmp_path, "keys", "create", "--help")
    assert result.exit_code == 0
    assert "encrypt+rewrap" in result.stdout


# ---------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, InvalidArgument),
        (grpc.StatusCode.UNAUTHENTICATED, Unauthenticated),
        (grpc.StatusCode.PERMISSION_DENIED, PermissionDenied),
        (grpc.StatusCode.NOT_FOUND, NotFound),
        (grpc.StatusCode.ALREADY_EXISTS, AlreadyExists),
        (grpc.StatusCode.FAILED_PRECONDITION, FailedPrecondition),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, ResourceExhausted),
        (grpc.StatusCode.UNAVAILABLE, Unavailable),
    ],
)
def test_errors_are_one_line_with_a_distinct_exit_code(
    home: Path, fake: FakeBroker, code: grpc.StatusCode, cls: type
) -> None:
    fake.responses["GetKey"] = Abort(code, "not for you: ask the security team")
    result = run(home, "keys", "show", "patients")
    assert result.exit_code == EXIT_CODES[cls]
    assert result.stdout == ""
    assert result.stderr == f"keybroker: {code.name}: not for you: ask the security team\n"


def test_exit_codes_are_distinct_and_clear_of_click_and_verify() -> None:
    codes = list(EXIT_CODES.values())
    assert len(set(codes)) == len(codes)
    assert not {0, 1, 2} & set(codes)


def test_other_status_is_reported_too(home: Path, fake: FakeBroker) -> None:
    fake.responses["GetKey"] = Abort(grpc.StatusCode.INTERNAL, "internal error")
    result = run(home, "keys", "show", "patients")
    assert result.exit_code == 13
    assert result.stderr == "keybroker: INTERNAL: internal error\n"


def test_unreachable_broker_suggests_make_run(tmp_path: Path, client_pki: Pki) -> None:
    (tmp_path / "pki").symlink_to(client_pki.dir, target_is_directory=True)
    target = f"127.0.0.1:{closed_port()}"
    result = run(tmp_path, "--target", target, "--timeout", "5", "keys", "list")
    assert result.exit_code == EXIT_CODES[Unavailable]
    line = result.stderr
    assert line.count("\n") == 1
    assert line.startswith(f"keybroker: UNAVAILABLE: cannot reach the broker at {target}")
    assert "is the broker running? try `make run`" in line


def test_certificate_from_another_ca_is_a_clean_error(
    home: Path, fake: FakeBroker, tmp_path: Path
) -> None:
    rogue = make_pki(tmp_path / "rogue", ("admin",))
    result = run(
        home,
        "--cert",
        str(rogue.dir / "admin.pem"),
        "--key",
        str(rogue.dir / "admin.key"),
        "keys",
        "list",
    )
    assert result.exit_code == EXIT_CODES[Unavailable]
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("keybroker: UNAVAILABLE: cannot reach the broker at ")
    assert "--cert/--key" in result.stderr
    assert fake.calls == []


def test_unavailable_from_a_running_broker_has_no_connect_hint(
    home: Path, fake: FakeBroker
) -> None:
    fake.responses["GenerateDataKey"] = Abort(grpc.StatusCode.UNAVAILABLE, "HSM unreachable")
    result = run(home, "datakey", "k")
    assert result.stderr == "keybroker: UNAVAILABLE: HSM unreachable\n"


# ---------------------------------------------------------------------------------------------
# --context


def test_context_values_may_contain_equals(home: Path, fake: FakeBroker) -> None:
    result = run(home, "datakey", "k", "--context", "a=b=c", "--context", "empty=")
    assert result.exit_code == 0, result.output
    assert dict(fake.requests("GenerateDataKey")[0].context) == {"a": "b=c", "empty": ""}


@pytest.mark.parametrize("entry", ["=value", "novalue"])
def test_bad_context_is_a_usage_error(home: Path, fake: FakeBroker, entry: str) -> None:
    result = run(home, "datakey", "k", "--context", entry)
    assert result.exit_code == 2
    assert "Invalid value for '--context'" in result.stderr
    assert fake.calls == []


# ---------------------------------------------------------------------------------------------
# datakey, encrypt, decrypt, rewrap


def _canned_data_key(fake: FakeBroker) -> None:
    fake.responses["GenerateDataKey"] = crypto_pb2.GenerateDataKeyResponse(
        plaintext_key=SECRET_KEY, wrapped_key=b"\x01WRAPPED\xff", key_id="patients", key_version=2
    )


def test_datakey_prints_both_keys(home: Path, fake: FakeBroker) -> None:
    _canned_data_key(fake)
    result = run(home, "--as", "producer", "datakey", "patients", "--context", "dataset=c42")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {
        "key_id": "patients",
        "key_version": 2,
        "plaintext_key": SECRET_B64,
        "wrapped_key": base64.b64encode(b"\x01WRAPPED\xff").decode(),
    }
    (request,) = fake.requests("GenerateDataKey")
    assert (request.key_id, dict(request.context)) == ("patients", {"dataset": "c42"})


def test_datakey_out_writes_the_wrapped_key_and_hides_the_plaintext(
    home: Path, fake: FakeBroker, tmp_path: Path
) -> None:
    _canned_data_key(fake)
    out = tmp_path / "wrapped.bin"
    result = run(home, "datakey", "patients", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert out.read_bytes() == b"\x01WRAPPED\xff"
    assert SECRET_B64 not in result.output
    data = json.loads(result.stdout)
    assert "plaintext_key" not in data
    assert data == {"key_id": "patients", "key_version": 2, "wrapped_key_file": str(out)}


def test_datakey_out_with_show_plaintext(home: Path, fake: FakeBroker, tmp_path: Path) -> None:
    _canned_data_key(fake)
    result = run(home, "datakey", "patients", "--out", str(tmp_path / "w"), "--show-plaintext")
    assert json.loads(result.stdout)["plaintext_key"] == SECRET_B64


def test_datakey_plaintext_out_is_private(home: Path, fake: FakeBroker, tmp_path: Path) -> None:
    _canned_data_key(fake)
    secret_file = tmp_path / "dek.bin"
    result = run(
        home,
        "datakey",
        "patients",
        "--out",
        str(tmp_path / "w"),
        "--plaintext-out",
        str(secret_file),
    )
    assert result.exit_code == 0, result.output
    assert secret_file.read_bytes() == SECRET_KEY
    assert stat.S_IMODE(os.stat(secret_file).st_mode) == 0o600
    assert SECRET_B64 not in result.output


def test_encrypt_reads_stdin_and_prints_base64(home: Path, fake: FakeBroker) -> None:
    fake.responses["Encrypt"] = crypto_pb2.EncryptResponse(
        ciphertext=b"CIPHER", key_id="k", key_version=1
    )
    result = run(home, "encrypt", "k", "--context", "a=1", input=b"small secret")
    assert result.exit_code == 0, result.output
    assert result.stdout == base64.b64encode(b"CIPHER").decode() + "\n"
    assert fake.requests("Encrypt")[0] == crypto_pb2.EncryptRequest(
        key_id="k", plaintext=b"small secret", context={"a": "1"}
    )


def test_encrypt_refuses_oversize_input(home: Path, fake: FakeBroker) -> None:
    result = run(home, "encrypt", "k", input=b"x" * (64 * 1024 + 1))
    assert result.exit_code == 2
    assert "datakey" in result.stderr
    assert fake.calls == []


def test_encrypt_out_file(home: Path, fake: FakeBroker, tmp_path: Path) -> None:
    fake.responses["Encrypt"] = crypto_pb2.EncryptResponse(ciphertext=b"\x00CT", key_id="k")
    plain = tmp_path / "plain.txt"
    plain.write_bytes(b"hello")
    out = tmp_path / "ct.bin"
    result = run(home, "encrypt", "k", "--in", str(plain), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert out.read_bytes() == b"\x00CT"
    assert result.stdout == ""
    raw = run(home, "encrypt", "k", "--in", str(plain), "--out", "-")
    assert raw.stdout_bytes == b"\x00CT"


def test_decrypt_wrapped_b64_prints_plaintext_base64(home: Path, fake: FakeBroker) -> None:
    fake.responses["Decrypt"] = crypto_pb2.DecryptResponse(
        plaintext=SECRET_KEY, key_id="patients", key_version=2
    )
    blob = base64.b64encode(b"\x01WRAPPED\xff").decode()
    result = run(
        home,
        "--as",
        "consumer",
        "decrypt",
        "--token",
        "h.p.s",
        "--context",
        "dataset=c42",
        "--wrapped-b64",
        blob,
    )
    assert result.exit_code == 0, result.output
    assert result.stdout == SECRET_B64 + "\n"
    assert fake.requests("Decrypt")[0] == crypto_pb2.DecryptRequest(
        ciphertext=b"\x01WRAPPED\xff", context={"dataset": "c42"}, token="h.p.s"
    )
    assert fake.calls[0].principal == "consumer"


def test_decrypt_file_to_private_file_with_token_file(
    home: Path, fake: FakeBroker, tmp_path: Path
) -> None:
    fake.responses["Decrypt"] = crypto_pb2.DecryptResponse(plaintext=b"plain", key_id="k")
    (tmp_path / "blob").write_bytes(b"BLOB")
    (tmp_path / "token").write_text("h.p.s\n")
    out = tmp_path / "plain.out"
    result = run(
        home,
        "decrypt",
        "--token-file",
        str(tmp_path / "token"),
        "--in",
        str(tmp_path / "blob"),
        "--out",
        str(out),
    )
    assert result.exit_code == 0, result.output
    assert out.read_bytes() == b"plain"
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    assert result.stdout == ""
    request = fake.requests("Decrypt")[0]
    assert (request.ciphertext, request.token) == (b"BLOB", "h.p.s")


def test_decrypt_token_from_env(
    home: Path, fake: FakeBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KEYBROKER_TOKEN", "env.tok.en")
    result = run(home, "decrypt", "--wrapped-b64", "QkxPQg==")
    assert result.exit_code == 0, result.output
    assert fake.requests("Decrypt")[0].token == "env.tok.en"


@pytest.mark.parametrize(
    "args",
    [
        ["--wrapped-b64", "QkxPQg=="],  # no token
        ["--token", "t"],  # no blob
        ["--token", "t", "--wrapped-b64", "QkxPQg==", "--in", "-"],  # two blobs
    ],
)
def test_decrypt_usage_errors(home: Path, fake: FakeBroker, args: list[str]) -> None:
    result = run(home, "decrypt", *args, input=b"")
    assert result.exit_code == 2
    assert fake.calls == []


def test_rewrap(home: Path, fake: FakeBroker) -> None:
    fake.responses["ReWrap"] = crypto_pb2.ReWrapResponse(
        ciphertext=b"NEW", key_id="k", key_version=3
    )
    result = run(home, "--json", "rewrap", "--in", "-", "--context", "a=1", input=b"OLD")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {
        "ciphertext": base64.b64encode(b"NEW").decode(),
        "key_id": "k",
        "key_version": 3,
    }
    assert fake.requests("ReWrap")[0].ciphertext == b"OLD"


# ---------------------------------------------------------------------------------------------
# tokens


def _canned_token(fake: FakeBroker) -> None:
    response = tokens_pb2.IssueTokenResponse(token="eyJ.eyJ.sig", token_id="tid-7")
    response.expire_time.FromDatetime(dt.datetime(2030, 5, 6, 7, 8, 9, tzinfo=dt.UTC))
    fake.responses["IssueToken"] = response


def test_token_issue_prints_only_the_token(home: Path, fake: FakeBroker) -> None:
    _canned_token(fake)
    result = run(
        home,
        "--as",
        "consumer",
        "token",
        "issue",
        "patients",
        "--context",
        "dataset=cohort-42",
        "--justification",
        "study 7 cohort extraction",
        "--ttl",
        "5m",
    )
    assert result.exit_code == 0, result.output
    assert result.stdout == "eyJ.eyJ.sig\n"
    assert result.stderr == ""
    (request,) = fake.requests("IssueToken")
    assert request.key_id == "patients"
    assert dict(request.context) == {"dataset": "cohort-42"}
    assert request.justification == "study 7 cohort extraction"
    assert request.ttl.seconds == 300
    assert (request.subject, request.subject_cert_thumbprint) == ("", "")


def test_token_issue_json(home: Path, fake: FakeBroker) -> None:
    _canned_token(fake)
    result = run(home, "token", "issue", "k", "--justification", "why", "--json")
    assert json.loads(result.stdout) == {
        "token": "eyJ.eyJ.sig",
        "token_id": "tid-7",
        "expire_time": "2030-05-06T07:08:09Z",
        "max_uses": 0,
    }


def test_token_issue_for_a_subject_sends_its_thumbprint(
    home: Path, fake: FakeBroker, client_pki: Pki
) -> None:
    _canned_token(fake)
    cert = client_pki.dir / "consumer.pem"
    result = run(
        home,
        "token",
        "issue",
        "k",
        "--justification",
        "on behalf",
        "--subject",
        "consumer",
        "--subject-cert",
        str(cert),
    )
    assert result.exit_code == 0, result.output
    request = fake.requests("IssueToken")[0]
    assert request.subject == "consumer"
    assert request.subject_cert_thumbprint == cert_thumbprint(cert.read_bytes())


def test_token_issue_needs_justification_and_paired_subject(home: Path, fake: FakeBroker) -> None:
    assert run(home, "token", "issue", "k").exit_code == 2
    result = run(home, "token", "issue", "k", "--justification", "x", "--subject", "consumer")
    assert result.exit_code == 2
    assert "--subject-cert" in result.stderr
    assert fake.calls == []


def test_token_revoke_and_jwks(home: Path, fake: FakeBroker) -> None:
    fake.responses["GetSigningKeys"] = tokens_pb2.GetSigningKeysResponse(
        jwks_json='{"keys":[{"kid":"tok-1","kty":"EC"}]}'
    )
    assert run(home, "token", "revoke", "tid-7").stdout == "revoked tid-7\n"
    assert fake.requests("RevokeToken")[0].token_id == "tid-7"
    jwks = json.loads(run(home, "token", "jwks").stdout)
    assert jwks["keys"][0]["kid"] == "tok-1"


# ---------------------------------------------------------------------------------------------
# audit


def _audit_event(seq: int, **kwargs: object) -> audit_pb2.ListAuditEventsResponse:
    event = resources_pb2.AuditEvent(
        sequence=seq,
        principal="consumer",
        operation="Decrypt",
        key_id="patients",
        key_version=2,
        outcome=resources_pb2.OUTCOME_DENIED,
        reason="token expired",
        **kwargs,
    )
    event.time.FromDatetime(dt.datetime(2030, 1, 1, 12, 0, seq, tzinfo=dt.UTC))
    return audit_pb2.ListAuditEventsResponse(event=event)


def test_audit_list_one_line_per_event(home: Path, fake: FakeBroker) -> None:
    fake.responses["ListAuditEvents"] = [_audit_event(1), _audit_event(2)]
    result = run(
        home,
        "--as",
        "auditor",
        "audit",
        "list",
        "--key-id",
        "patients",
        "--principal",
        "consumer",
        "--operation",
        "Decrypt",
        "--after",
        "0",
        "--limit",
        "50",
        "--since",
        "2030-01-01T00:00:00Z",
        "--until",
        "2030-01-02",
    )
    assert result.exit_code == 0, result.output
    header, *lines = result.stdout.splitlines()
    assert header.split() == [
        "SEQ", "TIME", "PRINCIPAL", "OPERATION", "KEY_ID", "VER", "OUTCOME", "REASON"
    ]  # fmt: skip
    assert len(lines) == 2
    assert lines[0].split() == [
        "1",
        "2030-01-01T12:00:01Z",
        "consumer",
        "Decrypt",
        "patients",
        "v2",
        "DENIED",
        "token",
        "expired",
    ]
    (request,) = fake.requests("ListAuditEvents")
    assert (request.key_id, request.principal, request.operation) == (
        "patients",
        "consumer",
        "Decrypt",
    )
    assert request.limit == 50
    assert request.start_time.ToDatetime(tzinfo=dt.UTC) == dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    assert request.end_time.ToDatetime(tzinfo=dt.UTC) == dt.datetime(2030, 1, 2, tzinfo=dt.UTC)


def test_audit_list_json_lines(home: Path, fake: FakeBroker) -> None:
    fake.responses["ListAuditEvents"] = [_audit_event(5, justification="study", token_id="t")]
    result = run(home, "audit", "list", "--json")
    (line,) = result.stdout.splitlines()
    data = json.loads(line)
    assert data["sequence"] == 5
    assert data["outcome"] == "DENIED"
    assert data["justification"] == "study"


def test_audit_list_bad_since(home: Path, fake: FakeBroker) -> None:
    result = run(home, "audit", "list", "--since", "yesterday-ish")
    assert result.exit_code == 2
    assert "Invalid value for '--since'" in result.stderr


def test_audit_verify_ok_and_broken(home: Path, fake: FakeBroker) -> None:
    fake.responses["VerifyAuditLog"] = audit_pb2.VerifyAuditLogResponse(
        ok=True, events_checked=12, head_hash="ab" * 32
    )
    ok = run(home, "audit", "verify")
    assert ok.exit_code == 0
    assert ok.stdout.startswith("ok: 12 events in 0 chains")
    fake.responses["VerifyAuditLog"] = audit_pb2.VerifyAuditLogResponse(
        ok=False,
        events_checked=7,
        first_bad_chain="kb-1",
        first_bad_sequence=7,
        error="hash mismatch",
    )
    broken = run(home, "audit", "verify")
    assert broken.exit_code == 1
    assert "chain kb-1, chain_sequence 7" in broken.stdout
    assert "hash mismatch" in broken.stdout
    as_json = run(home, "--json", "audit", "verify")
    assert as_json.exit_code == 1
    assert json.loads(as_json.stdout)["first_bad_sequence"] == 7


def test_console_script_keeps_grpc_core_quiet(fake: FakeBroker, tmp_path: Path) -> None:
    """The installed `keybroker` script: a TLS failure is one line, with no gRPC core log lines
    (gRPC reads GRPC_VERBOSITY when first imported, so the script sets it before that)."""
    import shutil
    import subprocess
    import sys

    rogue = make_pki(tmp_path / "rogue", ("admin",))
    script = shutil.which("keybroker", path=str(Path(sys.executable).parent))
    assert script is not None
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KEYBROKER_", "GRPC_"))}
    proc = subprocess.run(
        [
            script,
            "--target",
            fake.target,
            "--ca",
            str(rogue.dir / "ca.pem"),
            "--cert",
            str(rogue.dir / "admin.pem"),
            "--key",
            str(rogue.dir / "admin.key"),
            "keys",
            "list",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == EXIT_CODES[Unavailable]
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("keybroker: UNAVAILABLE: ")
