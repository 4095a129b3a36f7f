"""`keybroker-server dev-identity NAME`: a client certificate from the development CA."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from broker.__main__ import main
from broker.devpki import ensure_dev_pki


@pytest.fixture
def home(tmp_path: Path) -> Path:
    ensure_dev_pki(tmp_path / "pki", ("admin",))
    return tmp_path


def test_dev_identity_issues_a_client_certificate_from_the_ca(home: Path) -> None:
    result = CliRunner().invoke(main, ["--home", str(home), "dev-identity", "ingest"])
    assert result.exit_code == 0, result.output
    pem, key = home / "pki" / "ingest.pem", home / "pki" / "ingest.key"
    assert f"created {pem.absolute()} and {key.absolute()} (mode 0600)" in result.stdout
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate(pem.read_bytes())
    ca = x509.load_pem_x509_certificate((home / "pki" / "ca.pem").read_bytes())
    cert.verify_directly_issued_by(ca)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "ingest"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("admin", "identity 'admin' exists already"),
        ("server", "bad identity name 'server'"),
        ("../evil", "bad identity name '../evil'"),
    ],
)
def test_dev_identity_refuses(home: Path, name: str, message: str) -> None:
    before = (home / "pki" / "admin.key").read_bytes()
    result = CliRunner().invoke(main, ["--home", str(home), "dev-identity", name])
    assert result.exit_code == 2
    assert result.stderr.startswith(f"keybroker-server: {message}")
    assert (home / "pki" / "admin.key").read_bytes() == before
    assert not (home / "evil.pem").exists()


def test_dev_identity_needs_the_ca(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["--home", str(tmp_path), "dev-identity", "ingest"])
    assert result.exit_code == 2
    assert "no development CA in" in result.stderr
    assert not (tmp_path / "pki" / "ingest.pem").exists()


def test_server_help_lists_the_command_and_keeps_its_options() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    assert "dev-identity" in result.stdout
    assert "--listen" in result.stdout and "--home" in result.stdout
