"""Safe to display: the CLI's text for people never carries a control character that a caller
put into a field; --json stays exact. Also `token jwks --output`."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import grpc
from hypothesis import given
from hypothesis import strategies as st
from keybroker.v1 import key_admin_pb2, resources_pb2, tokens_pb2
from keybroker_client.cli.render import terminal_safe

from tests.unit.client_fakes import Abort, FakeBroker, make_key
from tests.unit.test_client_cli import _audit_event, fake, home, run

__all__ = ["fake", "home"]  # fixtures, used by name

#: The bidirectional formatting characters (marks, embeddings, overrides, isolates).
BIDI = {0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A)}
ATTACK = "\x1b[2K\r"  # erase the line, back to its start: a forged line could follow


def unsafe(char: str) -> bool:
    return unicodedata.category(char) in ("Cc", "Cs", "Zl", "Zp") or ord(char) in BIDI


@given(st.text(alphabet=st.characters(codec=None)))
def test_no_control_character_survives(text: str) -> None:
    shown = terminal_safe(text)
    assert not any(unsafe(c) for c in shown)
    # Character by character: an unsafe one becomes a printable ASCII escape, the rest stays.
    assert shown == "".join(terminal_safe(c) for c in text)
    for c in set(text):
        escaped = terminal_safe(c)
        if unsafe(c):
            assert escaped.startswith("\\") and escaped.isascii() and escaped.isprintable()
        else:
            assert escaped == c


@given(st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp"))))
def test_printable_text_is_unchanged(text: str) -> None:
    text = "".join(c for c in text if ord(c) not in BIDI)
    assert terminal_safe(text) == text


def test_escapes_are_the_python_ones() -> None:
    assert terminal_safe(ATTACK + "patients") == "\\x1b[2K\\rpatients"
    assert terminal_safe("a\tb\nc\x00d\x7fe\x9bf") == "a\\tb\\nc\\x00d\\x7fe\\x9bf"
    assert terminal_safe("abc\u202edcba\u2066x\u2069") == "abc\\u202edcba\\u2066x\\u2069"
    assert terminal_safe("Île-de-France, 東京, \\x1b") == "Île-de-France, 東京, \\x1b"


def test_audit_list_escapes_what_a_caller_sent_and_json_stays_exact(
    home: Path, fake: FakeBroker
) -> None:
    response = _audit_event(1, justification="study\x1b]0;pwned\x07", context={"k\x1b": "v\r"})
    response.event.key_id = ATTACK + "patients"
    response.event.principal = "svc\u202eevil"
    fake.responses["ListAuditEvents"] = lambda _req: [response]
    text = run(home, "--as", "auditor", "audit", "list")
    assert text.exit_code == 0, text.output
    header, line = text.stdout.rstrip("\n").split("\n")
    assert header.split()[:3] == ["SEQ", "TIME", "PRINCIPAL"]
    assert not any(unsafe(c) for c in line)
    assert "\\x1b[2K\\rpatients" in line and "svc\\u202eevil" in line
    as_json = run(home, "--as", "auditor", "audit", "list", "--json")
    data = json.loads(as_json.stdout)
    assert data["key_id"] == ATTACK + "patients" and data["principal"] == "svc\u202eevil"
    assert data["justification"] == "study\x1b]0;pwned\x07"
    assert data["context"] == {"k\x1b": "v\r"}


def test_keys_show_and_list_escape_every_caller_field(home: Path, fake: FakeBroker) -> None:
    key = make_key(
        "patients",
        description="ok\x1b[31m red \r\nkey_id: forged",
        hsm="local\x07",
        policy=resources_pb2.KeyPolicy(
            grants=[
                resources_pb2.Grant(
                    principal="consumer\x1b[8m",
                    operations=[resources_pb2.OPERATION_DECRYPT],
                    context={"dataset\x1b": "cohort\u202e-42"},
                )
            ],
            allowed_jurisdictions=["FR\r"],
        ),
    )
    fake.responses["GetKey"] = key_admin_pb2.GetKeyResponse(key=key)
    fake.responses["ListKeys"] = key_admin_pb2.ListKeysResponse(keys=[key])
    for args in (("keys", "show", "patients"), ("keys", "list")):
        result = run(home, *args)
        assert result.exit_code == 0, result.output
        for line in result.stdout.splitlines():
            assert not any(unsafe(c) for c in line), line
        assert "ok\\x1b[31m red \\r\\nkey_id: forged" in result.stdout
    shown = run(home, "keys", "show", "patients").stdout
    assert "consumer\\x1b[8m" in shown and "dataset\\x1b=cohort\\u202e-42" in shown
    exact = json.loads(run(home, "keys", "show", "patients", "--json").stdout)
    assert exact["description"] == "ok\x1b[31m red \r\nkey_id: forged"
    assert exact["policy"]["grants"][0]["principal"] == "consumer\x1b[8m"


def test_error_messages_and_token_ids_are_escaped(home: Path, fake: FakeBroker) -> None:
    fake.responses["GetKey"] = Abort(grpc.StatusCode.NOT_FOUND, f"no key {ATTACK}x")
    result = run(home, "keys", "show", "x")
    # Whitespace (CR included) folds into one space, so the error stays one line.
    assert result.stderr == "keybroker: NOT_FOUND: no key \\x1b[2K x\n"
    fake.responses["RevokeToken"] = tokens_pb2.RevokeTokenResponse()
    assert run(home, "token", "revoke", f"t{ATTACK}").stdout == "revoked t\\x1b[2K\\r\n"


def test_token_jwks_to_stdout_or_a_file(home: Path, fake: FakeBroker, tmp_path: Path) -> None:
    jwks = {"keys": [{"kid": "aud-1", "kty": "EC", "keybroker_purpose": "audit"}]}
    fake.responses["GetSigningKeys"] = tokens_pb2.GetSigningKeysResponse(jwks_json=json.dumps(jwks))
    assert json.loads(run(home, "token", "jwks").stdout) == jwks
    out = tmp_path / "jwks.json"
    result = run(home, "token", "jwks", "--output", str(out))
    assert result.exit_code == 0 and result.stdout == ""
    assert json.loads(out.read_text()) == jwks


def test_offline_verify_report_of_a_forged_export_is_escaped(tmp_path: Path) -> None:
    """An export is evidence from elsewhere: a chain name in it may carry terminal escapes."""
    from click.testing import CliRunner
    from cryptography.hazmat.primitives.asymmetric import ec
    from jwt.algorithms import ECAlgorithm
    from keybroker_client.cli import cli

    jwk = json.loads(ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP256R1()).public_key()))
    jwk.update(kid="k1", alg="ES256", use="sig", keybroker_purpose="audit")
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
    record = {"type": "chain", "chain": "\x1b[2K\revil", "writer": "w", "jws": "x",
              "time": "2026-01-01T00:00:00.000000Z"}  # fmt: skip
    line = json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    (tmp_path / "forged.jsonl").write_text(line + "\n")
    result = CliRunner().invoke(
        cli,
        ["audit", "verify", str(tmp_path / "forged.jsonl"), "--jwks", str(tmp_path / "jwks.json")],
    )
    assert result.exit_code == 1
    assert "\\x1b[2K\\revil" in result.stdout
    assert not any(unsafe(c) for c in result.stdout.replace("\n", ""))
