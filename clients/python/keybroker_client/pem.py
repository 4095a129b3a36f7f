"""Checks of the TLS files before any connection, so that a wrong file is one clear
``CONFIG`` error instead of a TLS failure reported by gRPC core as ``UNAVAILABLE``."""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from keybroker_client.errors import ConfigError

__all__ = ["check_tls_files"]


def check_tls_files(ca: Path, cert: Path, key: Path) -> None:
    """Checks that the CA and client files are PEM, and that the key is the certificate's.

    Args:
        ca: CA certificate file (one or more PEM certificates).
        cert: client certificate file (PEM; the first certificate is the client's).
        key: client private key file (unencrypted PEM).

    Raises:
        ConfigError: a file cannot be read, is not the PEM it should be, or the key does not
            belong to the certificate. The message names the file by its absolute path.
    """
    _certificates(ca, "CA certificate")
    client_cert = _certificates(cert, "client certificate")[0]
    data = _read(key, "client key")
    try:
        private_key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise ConfigError(
            f"client key {_shown(key)} is encrypted; the client needs an unencrypted PEM key"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(
            f"client key {_shown(key)} is not a PEM private key "
            "(expected -----BEGIN PRIVATE KEY-----)"
        ) from None
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if private_key.public_key().public_bytes(der, public) != client_cert.public_key().public_bytes(
        der, public
    ):
        raise ConfigError(
            f"client key {_shown(key)} does not belong to client certificate {_shown(cert)}"
        )


def _certificates(path: Path, what: str) -> list[x509.Certificate]:
    data = _read(path, what)
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        certificates = []
    if not certificates:
        raise ConfigError(
            f"{what} {_shown(path)} is not a PEM certificate (expected -----BEGIN CERTIFICATE-----)"
        )
    return certificates


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {_shown(path)}: {exc.strerror or exc}") from None


def _shown(path: Path) -> str:
    # Absolute, so that the message still says which file when read from another directory.
    return str(path.absolute())
