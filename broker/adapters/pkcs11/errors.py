"""PKCS#11 return codes: their names, what they mean, and the domain errors they become.

`ERROR_TABLE` is the one table (per operation, CKR code -> `Kind`); `domain_error` turns a kind
into the exception of `broker.errors` the caller sees. Every failure is logged with the CKR name
as a structured field (`log_ckr`); never a PIN, a key or plaintext.
"""

from __future__ import annotations

import enum
import logging

import PyKCS11

from broker.errors import DecryptionFailed, FailedPrecondition, HsmUnavailable

log = logging.getLogger(__name__)


def ckr_name(code: int) -> str:
    """The `CKR_*` name of a PKCS#11 return value (or its hex form when unknown)."""
    name = PyKCS11.CKR.get(code)
    return name if isinstance(name, str) else f"CKR_0x{code & 0xFFFFFFFF:08X}"


class Kind(enum.Enum):
    """What a CKR code means for the session, the cache and the caller."""

    DEVICE = "device"  # drop the session; probe the token (maybe re-initialise) next time
    SESSION = "session"  # drop the session; the next call opens a fresh one
    HANDLE = "handle"  # stale object handle: evict the cache, find again, retry once
    REFUSED = "refused"  # the key's template or the mechanism forbids it; session is fine
    BAD_TAG = "bad_tag"  # GCM tag did not verify; session is fine


_DEFAULT_TABLE: dict[int, Kind] = {
    PyKCS11.CKR_GENERAL_ERROR: Kind.DEVICE,
    PyKCS11.CKR_FUNCTION_FAILED: Kind.DEVICE,
    PyKCS11.CKR_HOST_MEMORY: Kind.DEVICE,
    PyKCS11.CKR_DEVICE_ERROR: Kind.DEVICE,
    PyKCS11.CKR_DEVICE_MEMORY: Kind.DEVICE,
    PyKCS11.CKR_DEVICE_REMOVED: Kind.DEVICE,
    PyKCS11.CKR_TOKEN_NOT_PRESENT: Kind.DEVICE,
    PyKCS11.CKR_TOKEN_NOT_RECOGNIZED: Kind.DEVICE,
    PyKCS11.CKR_CRYPTOKI_NOT_INITIALIZED: Kind.DEVICE,
    PyKCS11.CKR_SESSION_HANDLE_INVALID: Kind.SESSION,
    PyKCS11.CKR_SESSION_CLOSED: Kind.SESSION,
    PyKCS11.CKR_USER_NOT_LOGGED_IN: Kind.SESSION,
    PyKCS11.CKR_OPERATION_ACTIVE: Kind.SESSION,
    PyKCS11.CKR_OPERATION_NOT_INITIALIZED: Kind.SESSION,
    PyKCS11.CKR_OBJECT_HANDLE_INVALID: Kind.HANDLE,
    PyKCS11.CKR_KEY_HANDLE_INVALID: Kind.HANDLE,
    PyKCS11.CKR_MECHANISM_INVALID: Kind.REFUSED,
    PyKCS11.CKR_MECHANISM_PARAM_INVALID: Kind.REFUSED,
    PyKCS11.CKR_KEY_FUNCTION_NOT_PERMITTED: Kind.REFUSED,
    PyKCS11.CKR_KEY_TYPE_INCONSISTENT: Kind.REFUSED,
    PyKCS11.CKR_KEY_SIZE_RANGE: Kind.REFUSED,
    PyKCS11.CKR_ACTION_PROHIBITED: Kind.REFUSED,
}

#: The one table: per operation, CKR code -> what it means. Codes not listed are treated as
#: DEVICE (fail closed, drop the session): after an unexpected error a session may be left
#: with an operation active (SoftHSM2 does so after CKR_ARGUMENTS_BAD).
ERROR_TABLE: dict[str, dict[int, Kind]] = {
    "default": _DEFAULT_TABLE,
    # SoftHSM2 answers a GCM tag mismatch (wrong key, IV, AAD, tag or ciphertext) with
    # CKR_GENERAL_ERROR; other tokens use the codes the standard names.
    "decrypt": {
        **_DEFAULT_TABLE,
        PyKCS11.CKR_GENERAL_ERROR: Kind.BAD_TAG,
        PyKCS11.CKR_ENCRYPTED_DATA_INVALID: Kind.BAD_TAG,
        PyKCS11.CKR_ENCRYPTED_DATA_LEN_RANGE: Kind.BAD_TAG,
    },
}

#: C_Login codes that mean "wrong or unusable PIN" rather than "broken device".
AUTH_FAILURES = frozenset(
    {
        PyKCS11.CKR_PIN_INCORRECT,
        PyKCS11.CKR_PIN_INVALID,
        PyKCS11.CKR_PIN_LEN_RANGE,
        PyKCS11.CKR_PIN_EXPIRED,
        PyKCS11.CKR_PIN_LOCKED,
    }
)
# Not CKR_USER_PIN_NOT_INITIALIZED: no PIN was tried against a PIN, so asking again guesses
# nothing, and SoftHSM2 answers it for a moment while another process rewrites the token's
# files (sibling workers starting together). It is an HsmUnavailable, retried at start.


def classify(operation: str, code: int) -> Kind:
    """What `code` means when `operation` (a port method name) fails with it."""
    table = ERROR_TABLE.get(operation, _DEFAULT_TABLE)
    return table.get(code, Kind.DEVICE)


def domain_error(hsm: str, operation: str, kind: Kind, code: int) -> Exception:
    """The exception the caller sees when `operation` failed with `code` of class `kind`.

    A BAD_TAG is a `DecryptionFailed` only once the token is known to answer: the adapter
    probes it first and passes DEVICE when it does not.
    """
    name = ckr_name(code)
    if kind is Kind.BAD_TAG:
        return DecryptionFailed()
    if kind is Kind.REFUSED:
        return FailedPrecondition(
            f"HSM {hsm!r} refused {operation} with this key ({name}); "
            "the key's template does not allow it"
        )
    return HsmUnavailable(
        f"HSM {hsm!r} failed during {operation} ({name}); nothing was done, retry later"
    )


def log_ckr(operation: str, code: int, level: int = logging.WARNING, **fields: object) -> None:
    """Logs a failed PKCS#11 call with its CKR name in the `ckr` field."""
    log.log(
        level,
        "pkcs11 call failed",
        extra={"hsm_operation": operation, "ckr": ckr_name(code), **fields},
    )


class TokenLost(Exception):
    """Internal: a search found nothing and the token itself no longer answers."""

    def __init__(self, code: int) -> None:
        super().__init__(ckr_name(code))
        self.code = code
