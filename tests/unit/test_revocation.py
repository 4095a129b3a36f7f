"""Parsing of the revocation files: deny list entries and CRLs (the integration tests run them
through a broker)."""

from __future__ import annotations

import base64
import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from broker.transport.revocation import (
    CRL_REVOKED,
    DENIED,
    ClientCertificateRevocations,
    RevocationFileError,
    load_crls,
    load_deny_list,
)


def _ca(name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _leaf(ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate, serial: int) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "svc")]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def _crl(key: ec.EllipticCurvePrivateKey, issuer: x509.Name, serials: list[int]) -> bytes:
    now = datetime.now(UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer)
        .last_update(now)
        .next_update(now + timedelta(days=1))
    )
    for serial in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build()
        )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def test_deny_list_entries() -> None:
    digest = hashlib.sha256(b"a certificate").digest()
    thumbprint = base64.urlsafe_b64encode(digest).decode().rstrip("=")
    fingerprint = ":".join(f"{b:02X}" for b in digest)
    text = (
        f"# comment\n\n{thumbprint}\nsha256 Fingerprint={fingerprint}  # from openssl\n"
        f"{fingerprint.lower()}\nserial=0A:1B\n7f\n"
    )
    deny = load_deny_list(text.encode(), "deny.txt")
    assert deny.digests == {digest}
    assert deny.serials == {0x0A1B, 0x7F}
    for bad in (
        "zz",
        "serial=" + "ab" * 32,
        "1" * 41,
        "md5=0a",
        f"serial={thumbprint}",
        "SHA1 Fingerprint=" + "AB:" * 19 + "CD",
    ):
        with pytest.raises(RevocationFileError, match=r"deny\.txt:1"):
            load_deny_list(bad.encode(), "deny.txt")


def test_each_crl_revokes_only_its_own_cas_certificates() -> None:
    a_key, a = _ca("CA A")
    b_key, b = _ca("CA B")
    cas = a.public_bytes(serialization.Encoding.PEM) + b.public_bytes(serialization.Encoding.PEM)
    both = _crl(a_key, a.subject, [7]) + _crl(b_key, b.subject, [9])
    revoked = load_crls(both, cas, "crl.pem")
    assert revoked == {(a.subject.public_bytes(), 7), (b.subject.public_bytes(), 9)}
    # A CRL naming CA A but signed by CA B's key is refused.
    with pytest.raises(RevocationFileError, match="not signed by a client CA"):
        load_crls(_crl(b_key, a.subject, [7]), cas, "crl.pem")


def test_refusal_reads_changed_files(tmp_path: Path) -> None:
    folder = tmp_path
    ca_key, ca = _ca("CA")
    ca_pem = ca.public_bytes(serialization.Encoding.PEM)
    leaf = _leaf(ca_key, ca, 42)
    crl, deny = folder / "c.crl", folder / "deny.txt"
    crl.write_bytes(_crl(ca_key, ca.subject, [42]))
    deny.write_text("")
    clock = [0.0]
    check = ClientCertificateRevocations(ca_pem, crl, deny, 10.0, lambda: clock[0])
    assert check.refusal(leaf) == CRL_REVOKED
    crl.write_bytes(_crl(ca_key, ca.subject, []))
    deny.write_text("2a\n")
    assert check.refusal(leaf) == CRL_REVOKED  # not looked at again before 10 s
    clock[0] = 10.0
    assert check.refusal(leaf) == DENIED
