"""The development PKI made on first start under HOME/pki (never for production).

A CA, a server certificate for localhost and 127.0.0.1, and one client identity per name in
`DEV_IDENTITIES`; private keys are written with mode 0600 and never overwritten.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = dt.timedelta(days=365)


def _write_private(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _name(cn: str, country: str = "") -> x509.Name:
    attributes = [
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "keybroker development"),
        x509.NameAttribute(NameOID.COMMON_NAME, cn),
    ]
    if country:
        attributes.insert(0, x509.NameAttribute(NameOID.COUNTRY_NAME, country))
    return x509.Name(attributes)


def _issue(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    cn: str,
    server: bool,
    country: str = "",
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn, country))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return key, builder.sign(ca_key, hashes.SHA256())


def ensure_dev_pki(directory: Path, identities: tuple[str, ...]) -> bool:
    """Creates whatever of the development PKI is missing; returns True if it made the CA."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    ca_pem, ca_key_path = directory / "ca.pem", directory / "ca.key"
    made_ca = False
    if ca_pem.exists() and ca_key_path.exists():
        ca_cert = x509.load_pem_x509_certificate(ca_pem.read_bytes())
        loaded = serialization.load_pem_private_key(ca_key_path.read_bytes(), None)
        assert isinstance(loaded, ec.EllipticCurvePrivateKey)
        ca_key = loaded
    else:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(_name("keybroker development CA"))
            .issuer_name(_name("keybroker development CA"))
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                critical=True,
            )
            .sign(ca_key, hashes.SHA256())
        )
        for stale in (ca_key_path, ca_pem):
            stale.unlink(missing_ok=True)
        _write_private(ca_key_path, ca_key)
        ca_pem.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
        made_ca = True
    for name, server in (("server", True), *((i, False) for i in identities)):
        cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
        if cert_path.exists() and key_path.exists() and not made_ca:
            continue
        key, cert = _issue(ca_key, ca_cert, "localhost" if server else name, server)
        key_path.unlink(missing_ok=True)
        _write_private(key_path, key)
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return made_ca


#: A development identity name: it becomes the certificate's CN, the principal policies name.
IDENTITY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


#: A certificate subject's country: an ISO 3166-1 alpha-2 code.
COUNTRY_CODE = re.compile(r"[A-Z]{2}")


def issue_dev_identity(directory: Path, name: str, country: str = "") -> tuple[Path, Path]:
    """Issues NAME.pem/NAME.key for a new client principal from the development CA.

    Args:
        directory: the PKI directory (HOME/pki) holding ca.pem and ca.key.
        name: the principal, the certificate's common name.
        country: the subject's country (C=), an ISO 3166-1 alpha-2 code such as "FR", which
            grants may require (`Grant.countries`); empty for none.

    Returns:
        The certificate and key paths (key mode 0600).

    Raises:
        ValueError: the name is malformed or reserved, the CA is missing, or the identity
            exists already (never overwritten).
    """
    if not IDENTITY_NAME.fullmatch(name) or name in {"ca", "server"}:
        raise ValueError(
            f"bad identity name {name!r}: letters, digits, '.', '_', '-' (not ca or server)"
        )
    if country and not COUNTRY_CODE.fullmatch(country):
        raise ValueError(f"bad country {country!r}: a two-letter ISO 3166-1 code such as FR")
    ca_pem, ca_key_path = directory / "ca.pem", directory / "ca.key"
    if not (ca_pem.is_file() and ca_key_path.is_file()):
        raise ValueError(
            f"no development CA in {directory.absolute()}: start keybroker-server with this "
            "home once to create it"
        )
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    if cert_path.exists() or key_path.exists():
        raise ValueError(f"identity {name!r} exists already: {cert_path.absolute()}")
    ca_cert = x509.load_pem_x509_certificate(ca_pem.read_bytes())
    ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{ca_key_path.absolute()} is not the development CA's EC key")
    key, cert = _issue(ca_key, ca_cert, name, server=False, country=country)
    _write_private(key_path, key)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path
