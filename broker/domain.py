"""Typed values of the broker's domain: keys, policies, callers, token claims, audit events.

Pure data and pure rules (validation, context matching); no I/O, no grpc, no PyKCS11.
"""

from __future__ import annotations

import enum
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from keybroker_client import evidence

from broker.errors import InvalidArgument, Unauthenticated

KEY_ID_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
MAX_CONTEXT_ENTRIES = 16
MAX_CONTEXT_KEY_BYTES = 64
MAX_CONTEXT_VALUE_BYTES = 256

#: ISO 3166-1 alpha-2 codes of the EU member states and the other EEA states (IS, LI, NO).
EU_EEA = frozenset(
    {
        "AT", "BE", "BG", "HR", "CY", "CZ", "DK", "EE", "FI", "FR", "DE", "GR", "IE", "IT",
        "LV", "LT", "LU", "MT", "NL", "PL", "PT", "RO", "SK", "SI", "ES", "SE", "IS", "LI",
        "NO",
    }
)  # fmt: skip


class Operation(enum.Enum):
    """What a grant allows on a key."""

    ENCRYPT = "encrypt"
    DECRYPT = "decrypt"
    REWRAP = "rewrap"


class KeyState(enum.Enum):
    ENABLED = "enabled"
    DISABLED = "disabled"
    PENDING_DESTRUCTION = "pending_destruction"
    DESTROYED = "destroyed"


class Outcome(enum.Enum):
    ALLOWED = "allowed"
    DENIED = "denied"
    ERROR = "error"


class Role(enum.Enum):
    ADMIN = "admin"
    AUDITOR = "auditor"


class AuditOperation(enum.StrEnum):
    """The operation an audit event records: the RPC's name, as stored and filtered on."""

    CREATE_KEY = "CreateKey"
    GET_KEY = "GetKey"
    LIST_KEYS = "ListKeys"
    ROTATE_KEY = "RotateKey"
    UPDATE_KEY_POLICY = "UpdateKeyPolicy"
    ENABLE_KEY = "EnableKey"
    DISABLE_KEY = "DisableKey"
    GENERATE_DATA_KEY = "GenerateDataKey"
    ENCRYPT = "Encrypt"
    DECRYPT = "Decrypt"
    REWRAP = "ReWrap"
    ISSUE_TOKEN = "IssueToken"
    REVOKE_TOKEN = "RevokeToken"
    LIST_AUDIT_EVENTS = "ListAuditEvents"
    VERIFY_AUDIT_LOG = "VerifyAuditLog"
    EXPORT_AUDIT_LOG = "ExportAuditLog"


@dataclass(frozen=True, slots=True)
class Caller:
    """The authenticated peer of one call.

    Attributes:
        principal: the client certificate's identity (subject common name).
        cert_thumbprint: base64url SHA-256 of the client certificate's DER (RFC 8705 x5t#S256).
        request_id: the id that ties log lines and the audit event of one call together.
    """

    principal: str
    cert_thumbprint: str
    request_id: str

    def require_authenticated(self) -> None:
        """Raises Unauthenticated for a caller without a verified client certificate."""
        if not self.principal or not self.cert_thumbprint:
            raise Unauthenticated(
                "no client certificate: connect with mutual TLS using a certificate issued by "
                "the broker's client CA"
            )


@dataclass(frozen=True, slots=True)
class Grant:
    principal: str
    operations: frozenset[Operation]
    context: Mapping[str, str] = field(default_factory=dict)
    max_token_ttl: timedelta | None = None

    def context_allows(self, context: Mapping[str, str]) -> bool:
        """True when every entry of the grant's context appears in `context`.

        A grant value ending in '*' matches any value with that prefix.
        """
        for name, want in self.context.items():
            have = context.get(name)
            if have is None:
                return False
            if want.endswith("*"):
                if not have.startswith(want[:-1]):
                    return False
            elif have != want:
                return False
        return True


@dataclass(frozen=True, slots=True)
class KeyPolicy:
    grants: tuple[Grant, ...] = ()
    allowed_jurisdictions: tuple[str, ...] = ()

    def jurisdictions(self) -> frozenset[str]:
        """The jurisdictions whose HSMs may hold and use the key (EU/EEA when none is named)."""
        return frozenset(self.allowed_jurisdictions) if self.allowed_jurisdictions else EU_EEA

    def grants_for(self, principal: str, operation: Operation) -> list[Grant]:
        return [g for g in self.grants if g.principal == principal and operation in g.operations]


@dataclass(frozen=True, slots=True)
class KeyVersion:
    version: int
    create_time: datetime
    hsm_label: str


@dataclass(frozen=True, slots=True)
class Key:
    """A key's metadata; its versions' material lives only in the HSM named by `hsm`."""

    key_id: str
    description: str
    state: KeyState
    primary_version: int
    versions: tuple[KeyVersion, ...]
    min_decryption_version: int
    policy: KeyPolicy
    hsm: str
    create_time: datetime
    rotation_period: timedelta | None = None
    next_rotation_time: datetime | None = None
    destroy_time: datetime | None = None
    #: Bumped by every stored update; compare-and-set guard against lost updates.
    revision: int = 1

    def version(self, number: int) -> KeyVersion | None:
        for v in self.versions:
            if v.version == number:
                return v
        return None

    def primary(self) -> KeyVersion:
        found = self.version(self.primary_version)
        if found is None:  # pragma: no cover - the store never saves such a key
            raise ValueError(f"key {self.key_id} has no primary version")
        return found

    def evolve(self, **changes: Any) -> Key:
        return replace(self, **changes)


@dataclass(frozen=True, slots=True)
class TokenClaims:
    """The verified content of a decryption token."""

    token_id: str
    subject: str
    key_id: str
    operations: frozenset[Operation]
    context: Mapping[str, str]
    justification: str
    issued_at: datetime
    not_before: datetime
    expires_at: datetime
    cert_thumbprint: str
    #: How many Decrypt calls the token allows; 0 means no limit within its lifetime.
    max_uses: int = 0


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One event of the trail (docs/audit.md). `sequence` is the store's order, for reading;
    `chain` and `chain_sequence` place it in its writer's hash chain."""

    sequence: int
    time: datetime
    principal: str
    operation: str
    key_id: str
    key_version: int
    token_id: str
    context: Mapping[str, str]
    justification: str
    outcome: Outcome
    reason: str
    request_id: str
    prev_hash: str
    hash: str
    chain: str = ""
    chain_sequence: int = 0


@dataclass(frozen=True, slots=True)
class AuditFilter:
    key_id: str = ""
    principal: str = ""
    operation: str = ""
    start_time: datetime | None = None
    end_time: datetime | None = None
    after_sequence: int = 0
    limit: int = 0


def validate_key_id(key_id: str) -> str:
    if not key_id:
        raise InvalidArgument("key_id is required")
    if not KEY_ID_PATTERN.fullmatch(key_id):
        raise InvalidArgument(
            "key_id must match ^[a-z0-9][a-z0-9._-]{0,62}$ "
            "(lower-case letters, digits, '.', '_', '-')"
        )
    return key_id


def validate_context(context: Mapping[str, str]) -> dict[str, str]:
    """Checks an encryption context against the limits and returns a plain copy.

    Raises:
        InvalidArgument: too many entries, an empty or oversize key or value, a NUL byte, or
            a lone surrogate.
    """
    if len(context) > MAX_CONTEXT_ENTRIES:
        raise InvalidArgument(f"context has {len(context)} entries; at most {MAX_CONTEXT_ENTRIES}")
    out: dict[str, str] = {}
    for name, value in context.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise InvalidArgument("context keys and values must be strings")
        try:
            name_bytes = name.encode("utf-8", "strict")
            value_bytes = value.encode("utf-8", "strict")
        except UnicodeEncodeError:
            # A lone surrogate: not text any party could have sent as UTF-8.
            raise InvalidArgument("context keys and values must be valid Unicode text") from None
        if not name_bytes:
            raise InvalidArgument("context keys must not be empty")
        if len(name_bytes) > MAX_CONTEXT_KEY_BYTES:
            raise InvalidArgument(f"a context key is longer than {MAX_CONTEXT_KEY_BYTES} bytes")
        if len(value_bytes) > MAX_CONTEXT_VALUE_BYTES:
            raise InvalidArgument(f"a context value is longer than {MAX_CONTEXT_VALUE_BYTES} bytes")
        if "\x00" in name or "\x00" in value:
            raise InvalidArgument("context keys and values must not contain NUL")
        out[name] = value
    return out


def canonical_context(context: Mapping[str, str]) -> bytes:
    """An injective byte encoding of a validated context.

    Entries sorted by the UTF-8 bytes of their keys; a one-byte count, then for each entry
    a two-byte big-endian length and the key's bytes, a two-byte length and the value's bytes.
    Length prefixes make distinct contexts give distinct bytes.
    """
    items = sorted((k.encode("utf-8"), v.encode("utf-8")) for k, v in context.items())
    parts = [struct.pack(">B", len(items))]
    for k, v in items:
        parts.append(struct.pack(">H", len(k)) + k + struct.pack(">H", len(v)) + v)
    return b"".join(parts)


def format_time(value: datetime) -> str:
    """The one textual form of a time in audit records: UTC, microseconds,
    `YYYY-MM-DDTHH:MM:SS.ffffffZ` (see `keybroker_client.evidence`, which defines the records)."""
    return evidence.format_time(value)


def event_record(event: AuditEvent) -> evidence.Record:
    """The event as a trail record (`keybroker_client.evidence`)."""
    return {
        "type": "event",
        "sequence": event.sequence,
        "chain": event.chain,
        "chain_sequence": event.chain_sequence,
        "time": format_time(event.time),
        "principal": event.principal,
        "operation": event.operation,
        "key_id": event.key_id,
        "key_version": event.key_version,
        "token_id": event.token_id,
        "context": dict(event.context),
        "justification": event.justification,
        "outcome": event.outcome.value,
        "reason": event.reason,
        "request_id": event.request_id,
        "prev_hash": event.prev_hash,
        "hash": event.hash,
    }
