"""CLI edges in what commands accept and print: audit operations, secrets and the terminal,
tokens given whole, header rows and --output, hints as commands, shell completion."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from click.testing import CliRunner
from keybroker_client.cli import cli

from tests.unit.cli_support import make_home, run
from tests.unit.client_fakes import FakeBroker, Pki


@pytest.fixture
def home(tmp_path: Path, client_pki: Pki, fake_broker: FakeBroker) -> Path:
    return make_home(tmp_path, client_pki, fake_broker)


# ---------------------------------------------------------------------------------------------
# audit list --operation


@pytest.mark.parametrize(
    ("given", "sent"),
    [("decrypt", "Decrypt"), ("DECRYPT", "Decrypt"), ("rewrap", "ReWrap"),
     ("issue-token", "IssueToken"), ("create_key", "CreateKey"), ("CreateKey", "CreateKey")],
)  # fmt: skip
def test_audit_operation_matches_case_insensitively(
    home: Path, fake_broker: FakeBroker, given: str, sent: str
) -> None:
    result = run(home, "--as", "auditor", "audit", "list", "--operation", given)
    assert result.exit_code == 0, result.output
    (request,) = fake_broker.requests("ListAuditEvents")
    assert request.operation == sent


def test_audit_unknown_operation_is_refused_with_the_list(
    home: Path, fake_broker: FakeBroker
) -> None:
    result = run(home, "audit", "list", "--operation", "decryt")
    assert result.exit_code == 2
    assert "unknown operation 'decryt'; one of: CreateKey, GetKey," in result.stderr
    assert "Decrypt, ReWrap, IssueToken" in result.stderr
    assert fake_broker.requests("ListAuditEvents") == []


def test_audit_operations_are_the_brokers() -> None:
    from keybroker_client.cli.audit import AUDIT_OPERATIONS

    from broker.domain import AuditOperation

    assert set(AUDIT_OPERATIONS) == {op.value for op in AuditOperation}


# ---------------------------------------------------------------------------------------------
# secrets and the terminal

SECRET = bytes(range(100, 132))


@pytest.fixture
def terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """stdout is a terminal, as when a user runs the command interactively."""
    monkeypatch.setattr("keybroker_client.cli.output.stdout_is_terminal", lambda: True)


def _data_key(fake_broker: FakeBroker) -> None:
    from keybroker.v1 import crypto_pb2

    fake_broker.responses["GenerateDataKey"] = crypto_pb2.GenerateDataKeyResponse(
        key_id="patients", key_version=1, plaintext_key=SECRET, wrapped_key=b"WRAPPED"
    )


@pytest.mark.usefixtures("terminal")
def test_datakey_refuses_the_plaintext_key_on_a_terminal(
    home: Path, fake_broker: FakeBroker
) -> None:
    _data_key(fake_broker)
    result = run(home, "datakey", "patients")
    assert result.exit_code == 2
    assert result.stderr.startswith("keybroker: refusing to print the plaintext key to a terminal")
    assert "--plaintext-to-terminal" in result.stderr
    assert result.stdout == ""
    assert fake_broker.requests("GenerateDataKey") == []  # refused before any call
    result = run(home, "datakey", "patients", "--out", "w.bin", "--show-plaintext")
    assert result.exit_code == 2


@pytest.mark.usefixtures("terminal")
def test_datakey_on_a_terminal_with_files_or_the_flag(
    home: Path, tmp_path: Path, fake_broker: FakeBroker
) -> None:
    import base64
    import json

    _data_key(fake_broker)
    out, plain = tmp_path / "w.bin", tmp_path / "k.bin"
    result = run(home, "datakey", "patients", "--out", str(out), "--plaintext-out", str(plain))
    assert result.exit_code == 0, result.output
    assert plain.read_bytes() == SECRET and base64.b64encode(SECRET).decode() not in result.stdout
    result = run(home, "datakey", "patients", "--plaintext-to-terminal")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["plaintext_key"] == base64.b64encode(SECRET).decode()


def test_datakey_piped_prints_the_plaintext_key(home: Path, fake_broker: FakeBroker) -> None:
    import json

    _data_key(fake_broker)
    result = run(home, "datakey", "patients")  # CliRunner's stdout is not a terminal
    assert result.exit_code == 0, result.output
    assert "plaintext_key" in json.loads(result.stdout)


@pytest.mark.usefixtures("terminal")
@pytest.mark.parametrize("out", [[], ["--out", "-"]])
def test_decrypt_refuses_the_plaintext_on_a_terminal(
    home: Path, fake_broker: FakeBroker, out: list[str]
) -> None:
    args = ["decrypt", "--token", "h.p.s", "--wrapped-b64", "AAAA", *out]
    result = run(home, *args)
    assert result.exit_code == 2
    assert result.stderr.startswith("keybroker: refusing to print the plaintext to a terminal")
    assert fake_broker.requests("Decrypt") == []


@pytest.mark.usefixtures("terminal")
def test_decrypt_on_a_terminal_with_out_file_or_the_flag(
    home: Path, tmp_path: Path, fake_broker: FakeBroker
) -> None:
    from keybroker.v1 import crypto_pb2

    fake_broker.responses["Decrypt"] = crypto_pb2.DecryptResponse(plaintext=SECRET, key_id="k")
    target = tmp_path / "plain.bin"
    args = ["decrypt", "--token", "h.p.s", "--wrapped-b64", "AAAA"]
    assert run(home, *args, "--out", str(target)).exit_code == 0
    assert target.read_bytes() == SECRET
    result = run(home, *args, "--plaintext-to-terminal")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == base64.b64encode(SECRET).decode()


# ---------------------------------------------------------------------------------------------
# token revoke TOKEN and token lookup


def _jwt(claims: dict[str, object]) -> str:
    import base64
    import json

    def part(obj: object) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'ES256', 'typ': 'at+jwt'})}.{part(claims)}.c2lnbmF0dXJl"


CLAIMS: dict[str, object] = {
    "jti": "tok-123",
    "sub": "consumer",
    "iss": "keybroker",
    "aud": "keybroker",
    "iat": 2_000_000_000,
    "exp": 2_000_000_300,
    "scope": {
        "key_id": "patients",
        "operations": ["decrypt"],
        "context": {"dataset": "cohort-42"},
        "justification": "study 7",
        "max_uses": 0,
    },
    "cnf": {"x5t#S256": "abc"},
}


@pytest.mark.parametrize("given", [_jwt(CLAIMS), "tok-123"])
def test_token_revoke_takes_the_token_or_its_id(
    home: Path, fake_broker: FakeBroker, given: str
) -> None:
    result = run(home, "token", "revoke", given)
    assert result.exit_code == 0, result.output
    assert result.stdout == "revoked tok-123\n"
    (request,) = fake_broker.requests("RevokeToken")
    assert request.token_id == "tok-123"


def test_token_revoke_reads_stdin(home: Path, fake_broker: FakeBroker) -> None:
    result = run(home, "token", "revoke", "-", input=_jwt(CLAIMS) + "\n")
    assert result.exit_code == 0, result.output
    assert fake_broker.requests("RevokeToken")[0].token_id == "tok-123"


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("a.b", "not a token (a JWT has three dot-separated parts)"),
        ("a.!!!.c", "not a token: its claims are not base64url JSON"),
        (_jwt({"sub": "x"}), "the token carries no usable id (jti)"),
        (_jwt({"jti": "x" * 65}), "the token carries no usable id (jti)"),
    ],
)
def test_token_revoke_refuses_a_malformed_token_without_echoing_it(
    home: Path, fake_broker: FakeBroker, given: str, message: str
) -> None:
    result = run(home, "token", "revoke", given)
    assert result.exit_code == 2
    assert message in result.stderr
    assert given not in result.stderr
    assert fake_broker.requests("RevokeToken") == []


def test_token_lookup_prints_the_claims_marked_unverified(home: Path) -> None:
    result = run(home, "token", "lookup", _jwt(CLAIMS))
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("UNVERIFIED: ")
    assert "token_id      tok-123" in lines
    assert "context       dataset=cohort-42" in lines
    assert "justification study 7" in lines
    assert "expires       2033-05-18T03:38:20Z (in " in result.stdout


def test_token_lookup_json_and_env(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    monkeypatch.setenv("KEYBROKER_TOKEN", _jwt(CLAIMS))
    result = run(home, "token", "lookup", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"verified": False, "claims": CLAIMS}


# ---------------------------------------------------------------------------------------------
# header rows and --output


def _one_key(fake_broker: FakeBroker) -> None:
    from keybroker.v1 import key_admin_pb2

    from tests.unit.client_fakes import make_key

    fake_broker.responses["ListKeys"] = key_admin_pb2.ListKeysResponse(keys=[make_key("patients")])


@pytest.mark.parametrize("how", [[], ["--output", "table"]])
def test_keys_list_has_a_header_row(home: Path, fake_broker: FakeBroker, how: list[str]) -> None:
    _one_key(fake_broker)
    result = run(home, *how, "keys", "list")
    assert result.exit_code == 0, result.output
    header, row = result.stdout.splitlines()
    assert header.split() == ["KEY_ID", "STATE", "VER", "HSM", "DESCRIPTION"]
    assert row.startswith("patients ")
    assert row.index("v") == header.index("VER")  # the columns line up


@pytest.mark.parametrize("how", [["--output", "json"], ["--output", "JSON"], ["--json"]])
def test_output_json_and_its_alias(home: Path, fake_broker: FakeBroker, how: list[str]) -> None:
    import json

    _one_key(fake_broker)
    result = run(home, *how, "keys", "list")
    assert result.exit_code == 0, result.output
    (line,) = result.stdout.splitlines()  # JSON lines: no header
    assert json.loads(line)["key_id"] == "patients"


def test_output_rejects_other_formats(home: Path) -> None:
    result = run(home, "--output", "yaml", "keys", "list")
    assert result.exit_code == 2
    assert result.stderr.startswith("keybroker: Invalid value for '--output': ")


def test_audit_list_header_even_without_events(home: Path) -> None:
    result = run(home, "--as", "auditor", "audit", "list")
    assert result.exit_code == 0, result.output
    assert result.stdout.split() == [
        "SEQ", "TIME", "PRINCIPAL", "OPERATION", "KEY_ID", "VER", "OUTCOME", "REASON"
    ]  # fmt: skip
    assert run(home, "--output", "json", "audit", "list").stdout == ""


# ---------------------------------------------------------------------------------------------
# hints as CLI commands


@pytest.mark.parametrize(
    ("message", "shown"),
    [
        ("token has expired; get a new one with Tokens.IssueToken",
         "token has expired; get a new one with `keybroker token issue`"),
        ("a token is required: get one with Tokens.IssueToken",
         "a token is required: get one with `keybroker token issue`"),
        ("over 65536 bytes (use GenerateDataKey and encrypt locally)",
         "over 65536 bytes (use `keybroker datakey` and encrypt locally)"),
        ("Decrypt denied for KeyAdmin.Unknown", "Decrypt denied for KeyAdmin.Unknown"),
    ],
)  # fmt: skip
def test_hints_name_cli_commands(
    home: Path, fake_broker: FakeBroker, message: str, shown: str
) -> None:
    import grpc

    from tests.unit.client_fakes import Abort

    fake_broker.responses["Decrypt"] = Abort(grpc.StatusCode.UNAUTHENTICATED, message)
    result = run(home, "decrypt", "--token", "h.p.s", "--wrapped-b64", "AAAA")
    assert result.exit_code == 5
    assert result.stderr == f"keybroker: UNAUTHENTICATED: {shown}\n"


def test_every_rpc_has_a_cli_command() -> None:
    from keybroker.v1 import audit_pb2, crypto_pb2, key_admin_pb2, tokens_pb2
    from keybroker_client.cli.errors import RPC_COMMANDS

    rpcs = {
        method.name
        for module in (audit_pb2, crypto_pb2, key_admin_pb2, tokens_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }
    # The batch calls have no command of their own.
    assert rpcs - set(RPC_COMMANDS) == {"GenerateDataKeys", "BatchDecrypt"}
    for command in RPC_COMMANDS.values():
        result = CliRunner().invoke(cli, [*command.split(), "--help"])
        assert result.exit_code == 0, command


# ---------------------------------------------------------------------------------------------
# shell completion


def _complete(args: list[str], incomplete: str) -> list[str]:
    from click.shell_completion import BashComplete

    completer = BashComplete(cli, {}, "keybroker", "_KEYBROKER_COMPLETE")
    return [item.value for item in completer.get_completions(args, incomplete)]


def test_key_ids_complete_from_the_broker(home: Path, fake_broker: FakeBroker) -> None:
    from keybroker.v1 import key_admin_pb2

    from tests.unit.client_fakes import make_key

    fake_broker.responses["ListKeys"] = key_admin_pb2.ListKeysResponse(
        keys=[make_key("patients"), make_key("payroll"), make_key("other")]
    )
    assert _complete(["--home", str(home), "keys", "show"], "pa") == ["patients", "payroll"]
    assert _complete(["--home", str(home), "datakey"], "o") == ["other"]
    assert _complete(["--home", str(home), "audit", "list", "--key-id"], "") == [
        "patients",
        "payroll",
        "other",
    ]
    assert fake_broker.calls[-1].principal == "admin"


def test_key_id_completion_is_empty_on_any_error(tmp_path: Path, home: Path) -> None:
    assert _complete(["--home", str(tmp_path / "none"), "keys", "show"], "") == []
    unreachable = ["--home", str(home), "--target", "127.0.0.1:1", "keys", "show"]
    assert _complete(unreachable, "") == []


@pytest.mark.parametrize(
    ("shell", "marker"),
    [("bash", "complete -o nosort -F"), ("zsh", "#compdef keybroker"), ("fish", "complete")],
)
def test_completion_prints_the_script(shell: str, marker: str) -> None:
    result = CliRunner().invoke(cli, ["completion", shell])
    assert result.exit_code == 0, result.output
    assert marker in result.stdout and "_KEYBROKER_COMPLETE" in result.stdout
    assert CliRunner().invoke(cli, ["completion", "tcsh"]).exit_code == 2
