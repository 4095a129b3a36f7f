"""The records of the audit trail: their canonical bytes, the event hash, their shapes, and
the audit key's signatures on them (docs/audit.md)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

GENESIS_HASH = "0" * 64
#: The `typ` header of every signed audit record.
JWS_TYPE = "keybroker-audit+jws"
#: The `keybroker_purpose` of the JWKS keys that sign audit records.
AUDIT_PURPOSE = "audit"

#: The keys of an event covered by its hash: every key but `type`, `sequence` and `hash`.
EVENT_BODY = (
    "chain", "chain_sequence", "context", "justification", "key_id", "key_version",
    "operation", "outcome", "prev_hash", "principal", "reason", "request_id", "time",
    "token_id",
)  # fmt: skip
_STRINGS = ("chain", "justification", "key_id", "operation", "principal", "reason", "request_id")
_KEYS = {
    "event": frozenset({*EVENT_BODY, "type", "sequence", "hash"}),
    "chain": frozenset({"type", "chain", "writer", "time", "jws"}),
    "checkpoint": frozenset({"type", "chain", "chain_sequence", "head", "time", "closed", "jws"}),
    "manifest": frozenset(
        {"type", "after_sequence", "through_sequence", "chains", "time", "verified", "error", "jws"}
    ),
}
_OUTCOMES = frozenset({"allowed", "denied", "error"})
_HEX64 = re.compile(r"[0-9a-f]{64}")
_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")
_B64URL = re.compile(r"[A-Za-z0-9_-]*")

Record = dict[str, Any]


class EvidenceError(ValueError):
    """A JWKS or an input that cannot be used at all (not a bad record: those are reported)."""


def canonical(record: Mapping[str, Any]) -> bytes:
    """The one byte form of a record: sorted keys, no spaces, UTF-8 without `\\u` escapes
    for non-ASCII (control characters and `"` `\\` escaped as JSON requires).

    Raises:
        ValueError, TypeError: the record holds something JSON cannot carry exactly.
    """
    text = json.dumps(
        record, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )
    return text.encode("utf-8")


def format_time(value: datetime) -> str:
    """`YYYY-MM-DDTHH:MM:SS.ffffffZ` in UTC (a naive time is taken as UTC)."""
    if value.tzinfo is not None:
        value = value.astimezone(UTC).replace(tzinfo=None)
    # isoformat is the C fast path of strftime("%Y-%m-%dT%H:%M:%S.%f") (one call per event).
    return value.isoformat(timespec="microseconds") + "Z"


def parse_time(text: str) -> datetime:
    """Inverse of `format_time`; raises ValueError for another form."""
    if not isinstance(text, str) or not _TIME.fullmatch(text):
        raise ValueError("time is not YYYY-MM-DDTHH:MM:SS.ffffffZ")
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


def event_hash(record: Mapping[str, Any]) -> str:
    """hex(SHA-256(bytes.fromhex(prev_hash) || canonical(body))), body being the event
    without `type`, `sequence` and `hash`. Check `event_problem` first."""
    body = {k: record[k] for k in EVENT_BODY}
    digest = hashlib.sha256(bytes.fromhex(record["prev_hash"]) + canonical(body))
    return digest.hexdigest()


def signing_input(record: Mapping[str, Any]) -> bytes:
    """The payload a signed record's JWS carries: the canonical record without `jws`."""
    return canonical({k: v for k, v in record.items() if k != "jws"})


def is_int(value: object, minimum: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def record_problem(record: object, kind: str) -> str:
    """What is malformed in a record of type `kind`, or ""."""
    if not isinstance(record, dict):
        return "not a JSON object"
    if record.get("type") != kind:
        return f"type is {record.get('type')!r}, not {kind!r}"
    keys = set(record)
    if keys != _KEYS[kind]:
        missing, extra = sorted(_KEYS[kind] - keys), sorted(keys - _KEYS[kind])
        return f"fields differ from a {kind} record (missing {missing}, unexpected {extra})"
    if kind != "manifest" and not (isinstance(record["chain"], str) and record["chain"]):
        return "chain is not a non-empty string"
    if not isinstance(record["time"], str) or not _TIME.fullmatch(record["time"]):
        return "time is not YYYY-MM-DDTHH:MM:SS.ffffffZ"
    if "jws" in record and not isinstance(record["jws"], str):
        return "jws is not a string"
    if kind == "chain" and not isinstance(record["writer"], str):
        return "writer is not a string"
    if kind == "checkpoint":
        if not is_int(record["chain_sequence"]):
            return "chain_sequence is not a non-negative integer"
        if not isinstance(record["head"], str) or not _HEX64.fullmatch(record["head"]):
            return "head is not 64 lower-case hex digits"
        if not isinstance(record["closed"], bool):
            return "closed is not a boolean"
    if kind == "manifest":
        return _manifest_shape(record)
    return ""


def _manifest_shape(record: Record) -> str:
    if not is_int(record["after_sequence"]) or not is_int(record["through_sequence"]):
        return "after_sequence and through_sequence must be non-negative integers"
    if record["through_sequence"] < record["after_sequence"]:
        return "through_sequence is below after_sequence"
    if not isinstance(record["verified"], bool) or not isinstance(record["error"], str):
        return "verified must be a boolean and error a string"
    chains = record["chains"]
    if not isinstance(chains, dict):
        return "chains is not an object"
    for position in chains.values():
        if (
            not isinstance(position, dict)
            or set(position) != {"chain_sequence", "head"}
            or not is_int(position["chain_sequence"], 1)
            or not isinstance(position["head"], str)
            or not _HEX64.fullmatch(position["head"])
        ):
            return "a chain of the manifest is not {chain_sequence, head}"
    return ""


def event_problem(record: object) -> str:
    """What is malformed in an event record (with `type` and `sequence`), or "" if nothing."""
    problem = record_problem(record, "event")
    if problem:
        return problem
    assert isinstance(record, dict)
    for name in (*_STRINGS, "token_id"):
        if not isinstance(record[name], str):
            return f"{name} is not a string"
    if not is_int(record["sequence"], 1) or not is_int(record["chain_sequence"], 1):
        return "sequence and chain_sequence must be positive integers"
    if not is_int(record["key_version"]):
        return "key_version is not a non-negative integer"
    context = record["context"]
    if not isinstance(context, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in context.items()
    ):
        return "context is not an object of strings"
    if record["outcome"] not in _OUTCOMES:
        return "outcome is not allowed, denied or error"
    for name in ("prev_hash", "hash"):
        if not isinstance(record[name], str) or not _HEX64.fullmatch(record[name]):
            return f"{name} is not 64 lower-case hex digits"
    try:
        canonical(record)
    except (ValueError, TypeError):
        return "a string is not valid Unicode"
    return ""


def _b64url(text: str) -> bytes:
    if not _B64URL.fullmatch(text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def audit_keys(jwks: Mapping[str, Any]) -> dict[str, ec.EllipticCurvePublicKey]:
    """The audit keys of a JWKS (`"keybroker_purpose": "audit"`, EC P-256), by kid.

    Raises:
        EvidenceError: the JWKS is not {"keys": [...]} or an audit key in it is unusable.
    """
    entries = jwks.get("keys") if isinstance(jwks, Mapping) else None
    if not isinstance(entries, list):
        raise EvidenceError('a JWKS is a JSON object {"keys": [...]}')
    keys: dict[str, ec.EllipticCurvePublicKey] = {}
    for jwk in entries:
        if not isinstance(jwk, dict) or jwk.get("keybroker_purpose") != AUDIT_PURPOSE:
            continue
        kid = jwk.get("kid")
        if jwk.get("kty") != "EC" or jwk.get("crv") != "P-256" or not isinstance(kid, str):
            raise EvidenceError(f"audit key {kid!r} of the JWKS is not an EC P-256 key with a kid")
        try:
            x, y = (int.from_bytes(_b64url(str(jwk[c])), "big") for c in ("x", "y"))
            keys[kid] = ec.EllipticCurvePublicNumbers(x, y, ec.SECP256R1()).public_key()
        except (KeyError, ValueError, binascii.Error) as exc:
            raise EvidenceError(f"audit key {kid!r} of the JWKS is unusable: {exc}") from None
    if not keys:
        raise EvidenceError('the JWKS holds no key with "keybroker_purpose": "audit"')
    return keys


def signature_problem(record: Record, keys: Mapping[str, ec.EllipticCurvePublicKey]) -> str:
    """What is wrong with a signed record's `jws`, or "" when it is the audit key's signature
    over exactly the rest of the record."""
    parts = record["jws"].split(".")
    if len(parts) != 3:
        return "jws is not a compact JWS"
    try:
        header = json.loads(_b64url(parts[0]))
        payload, signature = _b64url(parts[1]), _b64url(parts[2])
    except (ValueError, binascii.Error):
        return "jws is not a compact JWS"
    if (
        not isinstance(header, dict)
        or set(header) != {"alg", "kid", "typ"}
        or header["alg"] != "ES256"
        or header["typ"] != JWS_TYPE
    ):
        return f'the JWS header is not {{"alg":"ES256","kid":...,"typ":"{JWS_TYPE}"}}'
    key = keys.get(header["kid"]) if isinstance(header["kid"], str) else None
    if key is None:
        return f"signed by {header['kid']!r}, which is no audit key of the JWKS"
    if payload != signing_input(record):
        return "the signed payload is not this record"
    if len(signature) != 64:
        return "the signature is not 64 bytes (ES256 r || s)"
    if not es256_verifies(key, f"{parts[0]}.{parts[1]}".encode("ascii"), signature):
        return "the signature does not verify (forged or altered)"
    return ""


def es256_verifies(key: ec.EllipticCurvePublicKey, message: bytes, signature: bytes) -> bool:
    """True when `signature` (IEEE P1363 r || s, 64 bytes) is an ECDSA P-256 / SHA-256
    signature of `message` by `key`. Checked against the Wycheproof vectors."""
    if len(signature) != 64:
        return False
    der = encode_dss_signature(
        int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
    )
    try:
        key.verify(der, message, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True
