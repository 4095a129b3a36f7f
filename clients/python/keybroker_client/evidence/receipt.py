"""Destruction receipts: the broker's signed statement that a key's HSM objects are gone.

When a key scheduled for destruction is due, the broker destroys the HSM object of every
version, checks that a search finds none of them any more, records a `DestroyKey` audit event,
and signs a receipt with the HSM audit key (the key that signs the audit checkpoints):

    {"audit": {"chain": ..., "chain_sequence": 7, "hash": "<64 hex>", "sequence": 1234},
     "destroy_time": "2026-12-08T09:00:01.123456Z",
     "hsm": {"jurisdiction": "FR", "name": "local", "operator": "..."},
     "issuer": "urn:keybroker:...", "jws": "<compact JWS>", "key_id": "patients",
     "scheduled_time": "2026-12-08T09:00:00.000000Z", "type": "destruction_receipt",
     "versions": [{"create_time": "...", "label": "kek:patients:v1:0a1b2c3d", "version": 1}]}

The file is that object in canonical form (sorted keys, no spaces, UTF-8; see `canonical`),
optionally followed by one newline. `jws` is a compact ES256 JWS, header
`{"alg": "ES256", "kid": ..., "typ": "keybroker-destruction-receipt+jws"}`, whose payload is the
canonical form of the object without `jws`. `verify_receipt` needs nothing but the file and the
broker's JWKS; it accepts the file only byte for byte as the broker wrote it, so changing any
byte of it makes it fail.

Pure Python (json, cryptography): no gRPC, no protobuf.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from keybroker_client.evidence.records import (
    audit_keys,
    canonical,
    es256_verifies,
    is_int,
    parse_time,
    signing_input,
)

#: The `type` of a receipt record.
RECEIPT_TYPE = "destruction_receipt"
#: The `typ` header of a receipt's JWS (distinct from the audit records', so that neither can
#: stand for the other).
RECEIPT_JWS_TYPE = "keybroker-destruction-receipt+jws"

_FIELDS = frozenset(
    {"type", "issuer", "key_id", "hsm", "versions", "scheduled_time", "destroy_time", "audit",
     "jws"}
)  # fmt: skip
_HSM_FIELDS = frozenset({"name", "jurisdiction", "operator"})
_VERSION_FIELDS = frozenset({"version", "label", "create_time"})
_AUDIT_FIELDS = frozenset({"chain", "chain_sequence", "sequence", "hash"})
_HEX64 = re.compile(r"[0-9a-f]{64}")
_B64URL = re.compile(r"[A-Za-z0-9_-]+")


class ReceiptInvalid(ValueError):
    """The receipt is malformed, altered, or not signed by an audit key of the JWKS."""


@dataclass(frozen=True, slots=True)
class DestroyedVersion:
    """One destroyed key version: its number, HSM object label and creation time."""

    version: int
    label: str
    create_time: datetime


@dataclass(frozen=True, slots=True)
class DestructionReceipt:
    """A receipt that verified.

    Attributes:
        key_id: the destroyed key.
        issuer: the broker (`urn:keybroker:<broker_id>`).
        hsm_name, hsm_jurisdiction, hsm_operator: the HSM that held the key.
        versions: every version whose object was destroyed.
        scheduled_time: when the destruction was due.
        destroy_time: when the objects were destroyed and found absent.
        audit_chain, audit_chain_sequence, audit_sequence, audit_hash: the `DestroyKey`
            event of the audit trail (find it in an export by its hash).
        kid: the audit key that signed the receipt.
    """

    key_id: str
    issuer: str
    hsm_name: str
    hsm_jurisdiction: str
    hsm_operator: str
    versions: tuple[DestroyedVersion, ...]
    scheduled_time: datetime
    destroy_time: datetime
    audit_chain: str
    audit_chain_sequence: int
    audit_sequence: int
    audit_hash: str
    kid: str


def receipt_text(record: Mapping[str, Any]) -> str:
    """The file form of a signed receipt record: its canonical JSON (without newline)."""
    return canonical(record).decode("utf-8")


def verify_receipt(
    data: bytes | str, jwks: Mapping[str, Any], *, key_id: str | None = None
) -> DestructionReceipt:
    """Checks a receipt file against the broker's JWKS.

    Args:
        data: the file's bytes, exactly as written by `keybroker keys receipt`.
        jwks: the broker's JWKS (`keybroker token jwks`); its audit keys verify.
        key_id: when given, the key the receipt must be for.

    Returns:
        What the receipt states.

    Raises:
        ReceiptInvalid: anything is wrong with the receipt (the message says what).
        EvidenceError: the JWKS holds no usable audit key.
    """
    keys = audit_keys(jwks)
    raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    body = raw[:-1] if raw.endswith(b"\n") else raw
    try:
        record = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ReceiptInvalid("not a JSON object in UTF-8") from None
    problem = _shape_problem(record)
    if problem:
        raise ReceiptInvalid(f"malformed receipt: {problem}")
    try:
        canonical_body = canonical(record)
    except (ValueError, TypeError):
        raise ReceiptInvalid("a string of the receipt is not valid Unicode") from None
    if canonical_body != body:
        raise ReceiptInvalid(
            "not in the canonical form the broker writes (was the file edited or reformatted?)"
        )
    kid = _check_signature(record, keys)
    if key_id is not None and record["key_id"] != key_id:
        raise ReceiptInvalid(f"the receipt is for key {record['key_id']!r}, not {key_id!r}")
    return _receipt(record, kid)


def _shape_problem(record: object) -> str:
    if not isinstance(record, dict):
        return "not a JSON object"
    if set(record) != _FIELDS:
        missing, extra = sorted(_FIELDS - set(record)), sorted(set(record) - _FIELDS)
        return f"fields differ (missing {missing}, unexpected {extra})"
    if record["type"] != RECEIPT_TYPE:
        return f"type is {record['type']!r}, not {RECEIPT_TYPE!r}"
    for name in ("issuer", "key_id", "jws"):
        if not isinstance(record[name], str) or not record[name]:
            return f"{name} is not a non-empty string"
    for name in ("scheduled_time", "destroy_time"):
        if not _is_time(record[name]):
            return f"{name} is not YYYY-MM-DDTHH:MM:SS.ffffffZ"
    hsm = record["hsm"]
    if not _is_object_of(hsm, _HSM_FIELDS) or not all(isinstance(v, str) for v in hsm.values()):
        return "hsm is not {name, jurisdiction, operator}"
    versions = record["versions"]
    if not isinstance(versions, list) or not versions:
        return "versions is not a non-empty list"
    for v in versions:
        if (
            not _is_object_of(v, _VERSION_FIELDS)
            or not is_int(v["version"], 1)
            or not isinstance(v["label"], str)
            or not _is_time(v["create_time"])
        ):
            return "a version is not {version, label, create_time}"
    audit = record["audit"]
    if (
        not _is_object_of(audit, _AUDIT_FIELDS)
        or not isinstance(audit["chain"], str)
        or not is_int(audit["chain_sequence"], 1)
        or not is_int(audit["sequence"], 1)
        or not isinstance(audit["hash"], str)
        or not _HEX64.fullmatch(audit["hash"])
    ):
        return "audit is not {chain, chain_sequence, sequence, hash}"
    return ""


def _is_object_of(value: object, fields: frozenset[str]) -> bool:
    return isinstance(value, dict) and set(value) == fields


def _is_time(value: object) -> bool:
    try:
        parse_time(value)  # type: ignore[arg-type]
    except ValueError:
        return False
    return True


def _strict_b64url(text: str) -> bytes:
    """Decodes unpadded base64url, refusing any text that is not the one encoding of its bytes
    (unused low bits of the last character set, for example)."""
    if not _B64URL.fullmatch(text):
        raise ValueError("not base64url")
    decoded = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if base64.urlsafe_b64encode(decoded).decode("ascii").rstrip("=") != text:
        raise ValueError("not the canonical base64url of its bytes")
    return decoded


def _check_signature(record: dict[str, Any], keys: Mapping[str, Any]) -> str:
    """The kid of the audit key whose signature `jws` is over the rest of `record`."""
    parts = record["jws"].split(".")
    if len(parts) != 3:
        raise ReceiptInvalid("jws is not a compact JWS")
    try:
        header = json.loads(_strict_b64url(parts[0]))
        payload, signature = _strict_b64url(parts[1]), _strict_b64url(parts[2])
    except (ValueError, binascii.Error):
        raise ReceiptInvalid("jws is not a compact JWS in canonical base64url") from None
    if (
        not isinstance(header, dict)
        or set(header) != {"alg", "kid", "typ"}
        or header["alg"] != "ES256"
        or header["typ"] != RECEIPT_JWS_TYPE
        or not isinstance(header["kid"], str)
    ):
        raise ReceiptInvalid(
            f'the JWS header is not {{"alg":"ES256","kid":...,"typ":"{RECEIPT_JWS_TYPE}"}}'
        )
    key = keys.get(header["kid"])
    if key is None:
        raise ReceiptInvalid(f"signed by {header['kid']!r}, which is no audit key of the JWKS")
    if payload != signing_input(record):
        raise ReceiptInvalid("the signed payload is not this receipt")
    if not es256_verifies(key, f"{parts[0]}.{parts[1]}".encode("ascii"), signature):
        raise ReceiptInvalid("the signature does not verify (forged or altered)")
    return str(header["kid"])


def _receipt(record: dict[str, Any], kid: str) -> DestructionReceipt:
    hsm, audit = record["hsm"], record["audit"]
    return DestructionReceipt(
        key_id=record["key_id"],
        issuer=record["issuer"],
        hsm_name=hsm["name"],
        hsm_jurisdiction=hsm["jurisdiction"],
        hsm_operator=hsm["operator"],
        versions=tuple(
            DestroyedVersion(v["version"], v["label"], parse_time(v["create_time"]))
            for v in record["versions"]
        ),
        scheduled_time=parse_time(record["scheduled_time"]),
        destroy_time=parse_time(record["destroy_time"]),
        audit_chain=audit["chain"],
        audit_chain_sequence=audit["chain_sequence"],
        audit_sequence=audit["sequence"],
        audit_hash=audit["hash"],
        kid=kid,
    )
