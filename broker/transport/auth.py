"""The caller of a call: identity from the verified client certificate, and a request id."""

from __future__ import annotations

import base64
import contextvars
import functools
import hashlib
import re
import uuid
from typing import Protocol

import grpc
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from broker.domain import Caller
from broker.errors import Unauthenticated

#: The request id of the call this thread serves, for log records.
request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


class CertificateCheck(Protocol):
    """Says whether a client certificate that TLS verified is refused all the same
    (`revocation.ClientCertificateRevocations`)."""

    def refusal(self, pem: bytes) -> str:
        """Why the PEM certificate is refused; "" when it is not."""


#: The revocation check of the server serving this call (set per call by the handlers);
#: None where none is configured.
certificate_check_var: contextvars.ContextVar[CertificateCheck | None] = contextvars.ContextVar(
    "certificate_check", default=None
)

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_COUNTRY = re.compile(r"[A-Z]{2}")


def request_id_from(metadata: tuple[tuple[str, str | bytes], ...] | None) -> str:
    """The client's `x-request-id` when it is well-formed, else a fresh UUID."""
    for name, value in metadata or ():
        if name == "x-request-id" and isinstance(value, str) and _REQUEST_ID.fullmatch(value):
            return value
    return str(uuid.uuid4())


@functools.lru_cache(maxsize=1024)
def identity_of(pem: bytes) -> tuple[str, str, str]:
    """(principal, x5t#S256, country) of a PEM certificate that the TLS layer has already
    verified. The country is the subject's one C= attribute, upper-cased, or "" when the
    subject names none, several, or something that is not a two-letter code: a grant that
    requires a country then refuses the caller (fail closed)."""
    cert = x509.load_pem_x509_certificate(pem)
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1 or not str(names[0].value):
        raise Unauthenticated("the client certificate must carry exactly one subject common name")
    digest = hashlib.sha256(cert.public_bytes(Encoding.DER)).digest()
    countries = cert.subject.get_attributes_for_oid(NameOID.COUNTRY_NAME)
    country = str(countries[0].value).upper() if len(countries) == 1 else ""
    if not _COUNTRY.fullmatch(country):
        country = ""
    thumbprint = base64.urlsafe_b64encode(digest).decode().rstrip("=")
    return str(names[0].value), thumbprint, country


def caller_of(context: grpc.ServicerContext) -> Caller:
    """The caller of this call; anonymous (empty principal) without a client certificate.

    gRPC puts the peer certificate in the auth context only after it verified the chain to
    the configured client CA, so its presence is the proof of authentication. An anonymous
    caller (the development plaintext listener) is refused by the services, inside their
    audit scope, so the refusal is audited like any other; so is a caller whose certificate
    the server's revocation check (`certificate_check_var`) refuses.

    Raises:
        Unauthenticated: the certificate names no identity.
    """
    pems = context.auth_context().get("x509_pem_cert")
    if not pems:
        return Caller("", "", request_id_var.get())
    pem = bytes(pems[0])
    principal, thumbprint, country = identity_of(pem)
    check = certificate_check_var.get()
    refusal = check.refusal(pem) if check is not None else ""
    return Caller(principal, thumbprint, request_id_var.get(), country, refusal)
