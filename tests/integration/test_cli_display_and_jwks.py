"""The CLI against the real broker: what a caller put into a refused call shows escaped in
`keybroker audit list` (and exact with --json); `keybroker token jwks --output` writes the
JWKS the offline verifier reads."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner, Result
from keybroker_client import evidence
from keybroker_client.cli import cli

from tests.broker_fixtures import Broker
from tests.integration.flows import code_of, datakey

ATTACK = "\x1b[2K\r"  # erase the line and go back to its start: what follows forges a line


def kb(broker: Broker, identity: str, *args: str) -> Result:
    result = CliRunner().invoke(
        cli, ["--home", str(broker.home), "--target", broker.target, "--as", identity, *args]
    )
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result


def test_a_refused_key_id_with_ansi_escapes_is_shown_escaped(broker: Broker) -> None:
    forged = f"{ATTACK}     1  2030-01-01T00:00:00Z  admin  CreateKey  harmless"
    code, _ = code_of(lambda: datakey(broker, forged))
    assert code.name == "INVALID_ARGUMENT"

    text = kb(broker, "auditor", "audit", "list", "--key-id", forged)
    assert text.exit_code == 0, text.output
    header, line = text.stdout.splitlines()
    assert header.split()[0] == "SEQ"
    assert "\x1b" not in text.stdout and "\r" not in text.stdout
    assert "\\x1b[2K\\r     1  2030-01-01T00:00:00Z" in line
    assert "GenerateDataKey" in line and "producer" in line

    exact = kb(broker, "auditor", "--json", "audit", "list", "--key-id", forged)
    (record,) = [json.loads(x) for x in exact.stdout.splitlines()]
    assert record["key_id"] == forged and record["operation"] == "GenerateDataKey"


def test_token_jwks_output_feeds_the_offline_verifier(broker: Broker, tmp_path: Path) -> None:
    out = tmp_path / "jwks.json"
    result = kb(broker, "consumer", "token", "jwks", "--output", str(out))
    assert result.exit_code == 0 and result.stdout == ""
    jwks = json.loads(out.read_text())
    assert {k["keybroker_purpose"] for k in jwks["keys"]} >= {"token", "audit"}
    assert evidence.audit_keys(jwks)  # EC P-256 keys the offline verifier can use
    printed = kb(broker, "consumer", "token", "jwks")
    assert json.loads(printed.stdout) == jwks
