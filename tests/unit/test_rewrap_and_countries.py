"""The blob-file lines of `keybroker rewrap-file`, the `--caller-country` syntax, and the grant
rule on the caller certificate's country (no broker here: see the integration tests)."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.x509.oid import NameOID
from keybroker_client.cli.rewrap import parse_line, rewritten
from keybroker_client.parsing import parse_caller_countries, policy_from_grants
from keybroker_client.types import ReWrapResult

from broker.__main__ import main
from broker.devpki import ensure_dev_pki
from broker.domain import Grant, Key, KeyPolicy, KeyState, KeyVersion, Operation
from broker.errors import PermissionDenied
from broker.services.access import Access

BLOB = b"KB\x01\x01k\x00\x00\x00\x01" + bytes(28)
NEW = b"KB\x01\x01k\x00\x00\x00\x02" + bytes(range(28))


@pytest.mark.parametrize(
    "text",
    [
        base64.b64encode(BLOB).decode(),
        base64.urlsafe_b64encode(BLOB).decode().rstrip("="),
        "  " + base64.b64encode(BLOB).decode() + "  ",
    ],
)
def test_a_base64_line_is_a_blob_under_the_commands_context(text: str) -> None:
    line = parse_line(1, text.encode() + b"\n")
    assert (line.blob, line.context, line.problem) == (BLOB, None, "")


def test_a_json_line_carries_its_own_context_and_keeps_its_other_members() -> None:
    record = {"id": "row-7", "ciphertext": base64.b64encode(BLOB).decode(), "context": {"a": "b"}}
    raw = json.dumps(record).encode() + b"\r\n"
    line = parse_line(3, raw)
    assert (line.blob, line.context) == (BLOB, {"a": "b"})
    out = rewritten(line, ReWrapResult(NEW, "k", 2))
    assert out.endswith(b"\r\n")
    assert json.loads(out) == {**record, "ciphertext": base64.b64encode(NEW).decode()}


def test_a_plain_line_is_replaced_and_keeps_its_ending() -> None:
    line = parse_line(1, base64.b64encode(BLOB))  # the last line, without a newline
    assert rewritten(line, ReWrapResult(NEW, "k", 2)) == base64.b64encode(NEW)


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"not base64!\n", "not base64"),
        (b"\xff\xfe\n", "not base64"),
        (b"{not json\n", "not a JSON object"),
        (b'{"blob": "AAAA"}\n', 'needs a "ciphertext"'),
        (b'{"ciphertext": "AAAA", "context": {"a": 1}}\n', '"context" must be'),
        (b"====\n", "not base64"),
    ],
)
def test_a_bad_line_is_not_sent_and_says_why(raw: bytes, problem: str) -> None:
    line = parse_line(9, raw)
    assert line.blob is None and problem in line.problem


def test_blank_lines_are_neither_sent_nor_failures() -> None:
    for raw in (b"\n", b"   \r\n", b""):
        line = parse_line(2, raw)
        assert (line.blob, line.problem) == (None, "")


def test_caller_countries_syntax() -> None:
    assert parse_caller_countries(["analyst=fr,DE", "analyst=FR", "ops=US"]) == {
        "analyst": ("FR", "DE"),
        "ops": ("US",),
    }
    for bad in ("analyst", "=FR", "analyst=", "analyst=FRA", "analyst=F1"):
        with pytest.raises(ValueError):
            parse_caller_countries([bad])
    policy = policy_from_grants(
        ["analyst:decrypt", "ops:rewrap"], caller_countries={"analyst": ["fr"]}
    )
    assert [g.countries for g in policy.grants] == [("FR",), ()]
    with pytest.raises(ValueError, match="who has no grant"):
        policy_from_grants(["ops:rewrap"], caller_countries={"analyst": ["FR"]})


def _key(*grants: Grant) -> Key:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    return Key(
        "k", "", KeyState.ENABLED, 1, (KeyVersion(1, now, "kek:k:v1"),), 1,
        KeyPolicy(grants), "local", now,
    )  # fmt: skip


def test_a_grant_with_countries_admits_only_a_certificate_from_one_of_them() -> None:
    key = _key(
        Grant("analyst", frozenset({Operation.DECRYPT}), countries=("FR", "DE")),
        Grant("ops", frozenset({Operation.DECRYPT})),
    )
    for country in ("FR", "DE"):
        assert Access.matching_grants(key, "analyst", Operation.DECRYPT, {}, country=country)
    for country, says in (("US", "names country 'US'"), ("", "names no country")):
        with pytest.raises(PermissionDenied, match=says):
            Access.matching_grants(key, "analyst", Operation.DECRYPT, {}, country=country)
    # A grant without countries admits any certificate, with or without one.
    assert Access.matching_grants(key, "ops", Operation.DECRYPT, {}, country="")
    # Where the certificate is not at hand (an admin issuing for another principal), the
    # countries are left to the use of the token.
    assert Access.matching_grants(key, "analyst", Operation.DECRYPT, {}, country=None)


def test_dev_identity_with_a_country(tmp_path: Path) -> None:
    ensure_dev_pki(tmp_path / "pki", ("admin",))
    result = CliRunner().invoke(
        main, ["--home", str(tmp_path), "dev-identity", "analyst", "--country", "fr"]
    )
    assert result.exit_code == 0, result.output
    cert = x509.load_pem_x509_certificate((tmp_path / "pki" / "analyst.pem").read_bytes())
    assert [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COUNTRY_NAME)] == ["FR"]
    result = CliRunner().invoke(
        main, ["--home", str(tmp_path), "dev-identity", "other", "--country", "France"]
    )
    assert result.exit_code == 2 and "bad country 'FRANCE'" in result.output
    assert not (tmp_path / "pki" / "other.pem").exists()
