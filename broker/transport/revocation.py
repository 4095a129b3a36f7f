"""Revoked client certificates: a CRL signed by the client CA and a deny list, both files
that are read again when they change, without a restart.

grpcio's Python server credentials take no CRL (only the C++ TLS credentials of gRPC core
check one during the handshake), so the check runs at each call instead: `caller_of` asks
`ClientCertificateRevocations.refusal` about the peer's certificate, and a revoked one makes
the caller fail `require_authenticated` inside the call's audit scope: the call answers
UNAUTHENTICATED and its audit event names the principal and the reason.

A file that changes is read again at the first call after `check_seconds`; a change that
cannot be used (a CRL that is unsigned, signed by another CA, or not a CRL; a deny list with
a line that is neither a serial number nor a thumbprint; a file gone) is logged as an error
and the previous contents stay in force, so a bad copy never un-revokes anything. At start the
same problems refuse the start (`RevocationFileError`).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Generic, TypeVar, cast

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPublicKeyTypes
from cryptography.hazmat.primitives.serialization import Encoding

log = logging.getLogger(__name__)

#: The refusal of a certificate on the CRL or the deny list; the audit event's reason.
CRL_REVOKED = (
    "client certificate revoked: the certificate revocation list of its CA names it; "
    "connect with a newly issued certificate"
)
DENIED = (
    "client certificate revoked: the broker's deny list names it; connect with a newly "
    "issued certificate"
)
_CRL_BLOCK = re.compile(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", re.DOTALL)
_THUMBPRINT = re.compile(r"[A-Za-z0-9_-]{43}")
_HEX = re.compile(r"[0-9A-Fa-f]+")

T = TypeVar("T")


class RevocationFileError(ValueError):
    """A CRL or deny list that cannot be used (the message names the file and why)."""


@dataclass(frozen=True, slots=True)
class DenyList:
    """What a deny list names: SHA-256 digests of certificates (DER) and serial numbers."""

    digests: frozenset[bytes] = frozenset()
    serials: frozenset[int] = frozenset()


#: (issuer name DER, serial number) of each certificate the CRLs revoke.
Revoked = frozenset[tuple[bytes, int]]


@functools.lru_cache(maxsize=1024)
def certificate_facts(pem: bytes) -> tuple[bytes, int, bytes]:
    """(issuer name DER, serial number, SHA-256 of the DER) of a PEM certificate."""
    cert = x509.load_pem_x509_certificate(pem)
    digest = hashlib.sha256(cert.public_bytes(Encoding.DER)).digest()
    return cert.issuer.public_bytes(), cert.serial_number, digest


def load_crls(data: bytes, client_ca: bytes, where: str) -> Revoked:
    """The certificates that the CRLs in `data` (PEM, one or more; or one DER) revoke.

    Each CRL must be signed by one of the client CAs (`client_ca`, PEM), the CA whose
    certificates it revokes; an entry applies to that CA's certificates only.

    Raises:
        RevocationFileError: not a CRL, or a CRL no client CA signed.
    """
    blocks = _CRL_BLOCK.findall(data)
    try:
        if blocks:
            crls = [x509.load_pem_x509_crl(block) for block in blocks]
        elif data.lstrip().startswith(b"-----BEGIN"):
            raise ValueError("no X509 CRL block")
        else:
            crls = [x509.load_der_x509_crl(data)]
    except ValueError as exc:
        raise RevocationFileError(f"{where}: not a CRL in PEM or DER form ({exc})") from None
    cas = x509.load_pem_x509_certificates(client_ca)
    revoked: set[tuple[bytes, int]] = set()
    for crl in crls:
        signer = next((ca for ca in cas if _signed_by(crl, ca)), None)
        if signer is None:
            raise RevocationFileError(
                f"{where}: the CRL of {crl.issuer.rfc4514_string()!r} is not signed by a "
                "client CA (tls.client_ca); refusing it"
            )
        next_update = crl.next_update_utc
        if next_update is not None and next_update < datetime.now(UTC):
            log.warning(
                "%s: the CRL of %s is past its next update (%s); still applied, publish a "
                "fresh one",
                where,
                crl.issuer.rfc4514_string(),
                next_update.isoformat(),
            )
        issuer = crl.issuer.public_bytes()
        revoked.update((issuer, entry.serial_number) for entry in crl)
    return frozenset(revoked)


def _signed_by(crl: x509.CertificateRevocationList, ca: x509.Certificate) -> bool:
    if crl.issuer != ca.subject:
        return False
    # A CA's key is of a type that can sign (a key that cannot raises TypeError).
    public_key = cast(CertificateIssuerPublicKeyTypes, ca.public_key())
    try:
        return crl.is_signature_valid(public_key)
    except (TypeError, ValueError):
        return False


def load_deny_list(data: bytes, where: str) -> DenyList:
    """Parses a deny list: one entry a line, `#` starts a comment. An entry is the
    certificate's `x5t#S256` thumbprint (43 base64url characters, what audit records and
    tokens carry), its SHA-256 fingerprint (64 hex digits, colons allowed, as
    `openssl x509 -noout -fingerprint -sha256` prints it, `sha256 Fingerprint=` included), or
    its serial number (hex, colons allowed, as `openssl x509 -noout -serial` prints it,
    `serial=` included).

    Raises:
        RevocationFileError: a line is none of these (its number is named).
    """
    digests: set[bytes] = set()
    serials: set[int] = set()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise RevocationFileError(f"{where}: not UTF-8 text") from None
    for number, line in enumerate(text.splitlines(), 1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        if _THUMBPRINT.fullmatch(entry):
            digests.add(base64.urlsafe_b64decode(entry + "="))
            continue
        label, _, value = entry.rpartition("=")
        label = label.strip().lower()
        bare = value.replace(":", "")
        digits = len(bare) if _HEX.fullmatch(bare) else 0
        if digits == 64 and label in ("", "sha256 fingerprint"):
            digests.add(bytes.fromhex(bare))
        elif 0 < digits <= 40 and label in ("", "serial"):
            serials.add(int(bare, 16))
        else:
            # A SHA-1 fingerprint (openssl's default) among them: it would match nothing.
            raise RevocationFileError(
                f"{where}:{number}: neither an x5t#S256 thumbprint, a SHA-256 fingerprint nor "
                "a serial number (hex)"
            )
    return DenyList(frozenset(digests), frozenset(serials))


class _WatchedFile(Generic[T]):
    """A file's parsed contents, read again when the file changes; a change that cannot be
    parsed is logged and the previous contents kept."""

    def __init__(self, path: Path, parse: Callable[[bytes, str], T]) -> None:
        self._path = path
        self._parse = parse
        self._stamp = self._stat()
        self.value = parse(self._read(), str(path))

    def _stat(self) -> tuple[int, ...] | None:
        try:
            st = os.stat(self._path)
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def _read(self) -> bytes:
        try:
            return self._path.read_bytes()
        except OSError as exc:
            raise RevocationFileError(
                f"{self._path}: cannot be read ({exc.strerror or exc})"
            ) from None

    def refresh(self) -> None:
        stamp = self._stat()
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            self.value = self._parse(self._read(), str(self._path))
        except RevocationFileError as exc:
            log.error("%s; the previous contents stay in force", exc)
            return
        log.info("%s changed: read again", self._path)


class ClientCertificateRevocations:
    """Says whether a client certificate is revoked, by a CRL file and/or a deny list file.

    Args:
        client_ca: the client CAs (PEM); a CRL must be signed by one of them.
        crl_file: CRLs in PEM (one or more) or DER; None for none.
        deny_list_file: a deny list (`load_deny_list`); None for none.
        check_seconds: the files are looked at again at most this often (0: at every call).
        monotonic: the time source of `check_seconds`.

    Raises:
        RevocationFileError: a file cannot be read or used (refuse the start).
    """

    def __init__(
        self,
        client_ca: bytes,
        crl_file: Path | None = None,
        deny_list_file: Path | None = None,
        check_seconds: float = 5.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._crl = (
            _WatchedFile(crl_file, lambda data, where: load_crls(data, client_ca, where))
            if crl_file is not None
            else None
        )
        self._deny = _WatchedFile(deny_list_file, load_deny_list) if deny_list_file else None
        self._check_seconds = check_seconds
        self._monotonic = monotonic
        self._next_check = monotonic() + check_seconds
        self._lock = threading.Lock()

    def refusal(self, pem: bytes) -> str:
        """Why the certificate `pem` (verified by TLS) is refused: "" when it is not
        revoked, else the reason the caller is told and the audit event records."""
        self._refresh()
        issuer, serial, digest = certificate_facts(pem)
        if self._crl is not None and (issuer, serial) in self._crl.value:
            return CRL_REVOKED
        if self._deny is not None:
            deny = self._deny.value
            if digest in deny.digests or serial in deny.serials:
                return DENIED
        return ""

    def _refresh(self) -> None:
        """Looks at the files when `check_seconds` have passed; one thread at a time, the
        others go on with what is loaded."""
        now = self._monotonic()
        if now < self._next_check or not self._lock.acquire(blocking=False):
            return
        try:
            self._next_check = now + self._check_seconds
            for watched in (self._crl, self._deny):
                if watched is not None:
                    watched.refresh()
        finally:
            self._lock.release()
