"""Certificate helpers: the RFC 8705 thumbprint that binds a token to a client certificate."""

from __future__ import annotations

import base64
import hashlib

from cryptography import x509
from cryptography.hazmat.primitives import serialization

__all__ = ["cert_thumbprint"]


def cert_thumbprint(pem_bytes: bytes) -> str:
    """Computes the RFC 8705 ``x5t#S256`` thumbprint of a certificate.

    Args:
        pem_bytes: the certificate in PEM form (the first certificate is used).

    Returns:
        base64url without padding of the SHA-256 of the certificate's DER encoding.

    Raises:
        ValueError: the bytes are not a PEM certificate.
    """
    cert = x509.load_pem_x509_certificate(pem_bytes)
    digest = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")
