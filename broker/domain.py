"""Typed values of the broker's domain: keys, policies, callers, token claims, audit events.

Pure data and pure rules (validation, context matching); no I/O, no grpc, no PyKCS11.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import json
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from json.encoder import encode_basestring as _encode_basestring
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
    SCHEDULE_KEY_DESTRUCTION = "ScheduleKeyDestruction"
    CANCEL_KEY_DESTRUCTION = "CancelKeyDestruction"
    #: The scheduler's destruction of a key's HSM objects once its pending window is over.
    DESTROY_KEY = "DestroyKey"
    GET_DESTRUCTION_RECEIPT = "GetDestructionReceipt"
    SET_MIN_DECRYPTION_VERSION = "SetMinDecryptionVersion"
    GET_KEY_USAGE = "GetKeyUsage"
    GENERATE_DATA_KEY = "GenerateDataKey"
    ENCRYPT = "Encrypt"
    DECRYPT = "Decrypt"
    REWRAP = "ReWrap"
    ISSUE_TOKEN = "IssueToken"
    REVOKE_TOKEN = "RevokeToken"
    LIST_AUDIT_EVENTS = "ListAuditEvents"
    VERIFY_AUDIT_LOG = "VerifyAuditLog"
    EXPORT_AUDIT_LOG = "ExportAuditLog"
    #: A change that needs approval (approvals.required > 1) was asked for: UpdateKeyPolicy,
    #: EnableKey of a disabled key or ScheduleKeyDestruction made a pending request.
    REQUEST_APPROVAL = "RequestApproval"
    APPROVE_REQUEST = "ApproveRequest"
    #: The approved change applied to the key (allowed), or refused as stale (denied).
    APPLY_APPROVED_CHANGE = "ApplyApprovedChange"
    #: A pending request found past its expiry time (principal `keybroker-approvals`).
    EXPIRE_APPROVAL_REQUEST = "ExpireApprovalRequest"
    CANCEL_APPROVAL_REQUEST = "CancelApprovalRequest"
    GET_APPROVAL_REQUEST = "GetApprovalRequest"
    LIST_APPROVAL_REQUESTS = "ListApprovalRequests"


#: The reason of an allowed ReWrap event whose blob was already under the primary version: it
#: was checked (decrypted in the HSM), not re-wrapped.
REWRAP_ALREADY_CURRENT = "already under the primary version; checked, left unchanged"


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
    #: ISO 3166-1 alpha-2 code of the certificate subject's country (its one C= attribute),
    #: or "" when it names none (or several).
    country: str = ""
    #: Why the certificate, though verified by TLS, is refused (revoked: a CRL or the deny
    #: list names it); "" when it is not. Refused in the call's audit scope, so the refusal
    #: is audited with the principal.
    certificate_refusal: str = ""

    def require_authenticated(self) -> None:
        """Raises Unauthenticated for a caller without a verified client certificate, or
        whose certificate is revoked."""
        if not self.principal or not self.cert_thumbprint:
            raise Unauthenticated(
                "no client certificate: connect with mutual TLS using a certificate issued by "
                "the broker's client CA"
            )
        if self.certificate_refusal:
            raise Unauthenticated(self.certificate_refusal)


@dataclass(frozen=True, slots=True)
class Grant:
    """What one principal may do with a key.

    Attributes:
        principal: the client certificate identity the grant is for.
        operations: what it allows.
        context: entries a request's (or token's) context must carry, see `context_allows`.
        max_token_ttl: the longest token lifetime it allows.
        countries: when not empty, the grant applies only to a caller whose certificate
            names one of these countries (ISO 3166-1 alpha-2, the subject's C=).
    """

    principal: str
    operations: frozenset[Operation]
    context: Mapping[str, str] = field(default_factory=dict)
    max_token_ttl: timedelta | None = None
    countries: tuple[str, ...] = ()

    def country_allows(self, country: str) -> bool:
        """True when the grant names no country, or names `country` (never an empty one)."""
        return not self.countries or (bool(country) and country in self.countries)

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


class LeaseTask(enum.Enum):
    """Background work on a key that one scheduler at a time may do."""

    DESTROY = "destroy"
    ROTATE = "rotate"


@dataclass(frozen=True, slots=True)
class Lease:
    """A scheduler's claim on a key's background work, written into the key record by
    compare-and-set: among several workers and replicas only the holder does the work.

    A holder that dies leaves its lease behind; once `expire_time` has passed another
    scheduler may take the work over (destroying an object already gone is no error, and a
    rotation is decided by the compare-and-set that stores the new version).

    Attributes:
        holder: the scheduler instance (broker id, host, process and a random part).
        task: the work claimed.
        expire_time: until when the claim holds.
    """

    holder: str
    task: LeaseTask
    expire_time: datetime

    def held(self, now: datetime) -> bool:
        """True while the lease keeps others away."""
        return now < self.expire_time


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
    #: The scheduler's claim on the key's destruction or rotation, if any. A destroy lease
    #: stays (expired) after a failed attempt: the destruction has begun and cannot be
    #: cancelled any more.
    lease: Lease | None = None
    #: Once destroyed: the signed destruction receipt (canonical JSON, see
    #: `keybroker_client.evidence.receipt`). Between the shredding and the signature: the
    #: receipt's unsigned statement, from which a later attempt finishes.
    destruction_receipt: str = ""

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

    def destruction_started(self) -> bool:
        """True once a scheduler has claimed the destruction: some HSM objects may be gone."""
        return self.lease is not None and self.lease.task is LeaseTask.DESTROY


class ApprovalState(enum.Enum):
    """Where an approval request stands; only PENDING ever changes."""

    PENDING = "pending"
    APPLIED = "applied"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLED = "cancelled"


class ApprovalOperation(enum.Enum):
    """The change an approval request holds, by the RPC that asked for it."""

    UPDATE_KEY_POLICY = "UpdateKeyPolicy"
    ENABLE_KEY = "EnableKey"
    SCHEDULE_KEY_DESTRUCTION = "ScheduleKeyDestruction"


@dataclass(frozen=True, slots=True)
class Approval:
    """One admin's approval of a request (the requester's is the first)."""

    principal: str
    time: datetime


@dataclass(frozen=True, slots=True)
class ApprovalRequest:
    """A change to a key that waits until `required` distinct admins, the requester counting
    as the first, have approved it (docs/lifecycle.md, "Approvals").

    Attributes:
        request_id: `apr-YYYYMMDD-HHMMSS-<8 hex>`, so ids sort by creation time.
        operation: what the change is.
        key_id: the key it changes.
        requester: the admin who asked for it.
        create_time: when it was asked for.
        expire_time: after this it can no longer be approved.
        required: distinct admins needed, the requester included.
        key_revision: the key's revision when it was asked for: the change applies only to
            the key at that revision (compare-and-set), never to a key changed since.
        policy: the whole policy requested (UPDATE_KEY_POLICY).
        pending_window: the window requested (SCHEDULE_KEY_DESTRUCTION).
        widening: how the requested policy widens the key's policy, one line each.
        approvals: the approvals so far, the requester's first.
        state: where it stands.
        reason: why it failed, expired or was cancelled.
        close_time: when it left PENDING.
        closed_by: who applied or cancelled it (or the expiry's principal).
        revision: bumped by every stored update; compare-and-set guard.
    """

    request_id: str
    operation: ApprovalOperation
    key_id: str
    requester: str
    create_time: datetime
    expire_time: datetime
    required: int
    key_revision: int
    policy: KeyPolicy | None = None
    pending_window: timedelta | None = None
    widening: tuple[str, ...] = ()
    approvals: tuple[Approval, ...] = ()
    state: ApprovalState = ApprovalState.PENDING
    reason: str = ""
    close_time: datetime | None = None
    closed_by: str = ""
    revision: int = 1

    def approvers(self) -> tuple[str, ...]:
        return tuple(a.principal for a in self.approvals)

    def past_expiry(self, now: datetime) -> bool:
        """True for a request still stored as PENDING whose expiry time has come."""
        return self.state is ApprovalState.PENDING and now >= self.expire_time

    def evolve(self, **changes: Any) -> ApprovalRequest:
        return replace(self, **changes)


@dataclass(frozen=True, slots=True)
class VersionUsage:
    """How one key version has been used, as the audit trail tells (`GetKeyUsage`).

    Attributes:
        version: the key version.
        data_keys_issued: allowed GenerateDataKey events (one per data key of a batch).
        encryptions: allowed Encrypt events.
        rewrapped: allowed ReWrap events whose result is this version.
        decrypts: allowed Decrypt events of blobs of this version.
        decrypts_refused: refused Decrypt events of blobs of this version.
        last_decrypt_time: the time of the last allowed Decrypt.
        last_use_time: the time of the last allowed use of any kind.
    """

    version: int
    data_keys_issued: int = 0
    encryptions: int = 0
    rewrapped: int = 0
    decrypts: int = 0
    decrypts_refused: int = 0
    last_decrypt_time: datetime | None = None
    last_use_time: datetime | None = None


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


@functools.lru_cache(maxsize=4096)
def format_time(value: datetime) -> str:
    """The one textual form of a time in audit records: UTC, microseconds,
    `YYYY-MM-DDTHH:MM:SS.ffffffZ` (see `keybroker_client.evidence`, which defines the records).

    Remembered for the last few thousand times: an event's time is written twice, into its
    hash and into its row, and the cache answers the second in a fraction of the first.
    """
    if value.tzinfo is UTC:
        # The clock's own form (`datetime.now(UTC)`): "+00:00" becomes "Z", nothing to convert.
        return value.isoformat(timespec="microseconds")[:-6] + "Z"
    return evidence.format_time(value)


def context_json(context: Mapping[str, str]) -> str:
    """An event's context as the canonical JSON of `keybroker_client.evidence.canonical`:
    sorted keys, no spaces, UTF-8 without `\\u` escapes. The string form the store keeps and the
    event hash covers, made without the general JSON encoder (same bytes; a unit test holds
    the two together)."""
    if not context:
        return "{}"
    items = sorted(context.items())
    if not all(type(k) is str and type(v) is str for k, v in items):
        return _canonical_json(dict(items))
    return "{" + ",".join([_json_str(k) + ":" + _json_str(v) for k, v in items]) + "}"


#: The canonical JSON of an event's hashed body (`evidence.EVENT_BODY`, in that sorted order).
_EVENT_BODY = (
    '{"chain":%s,"chain_sequence":%s,"context":%s,"justification":%s,"key_id":%s,'
    '"key_version":%s,"operation":%s,"outcome":%s,"prev_hash":%s,"principal":%s,'
    '"reason":%s,"request_id":%s,"time":%s,"token_id":%s}'
)


def chained_event(event: AuditEvent, chain: str, chain_sequence: int, prev_hash: str) -> AuditEvent:
    """`event` placed at `chain_sequence` of `chain` after `prev_hash`, with its hash.

    The hash is `keybroker_client.evidence.event_hash` of the event's record: SHA-256 of the
    previous hash's bytes and the canonical JSON of the hashed body. The body is formatted
    here directly rather than built as a dict and encoded by the general JSON encoder: one
    event is hashed per call on the hot path, and the bytes are the same (the unit tests
    compare the two on generated events, and the offline verifier checks every export).
    """
    body = _EVENT_BODY % (
        _json_str(chain),
        _json_int(chain_sequence),
        context_json(event.context),
        _json_str(event.justification),
        _json_str(event.key_id),
        _json_int(event.key_version),
        _json_str(event.operation),
        _json_str(event.outcome.value),
        _json_str(prev_hash),
        _json_str(event.principal),
        _json_str(event.reason),
        _json_str(event.request_id),
        _json_str(format_time(event.time)),
        _json_str(event.token_id),
    )
    digest = hashlib.sha256(bytes.fromhex(prev_hash) + body.encode("utf-8")).hexdigest()
    return AuditEvent(
        event.sequence, event.time, event.principal, event.operation, event.key_id,
        event.key_version, event.token_id, event.context, event.justification, event.outcome,
        event.reason, event.request_id, prev_hash, digest, chain, chain_sequence,
    )  # fmt: skip


def stored_event(event: AuditEvent, sequence: int) -> AuditEvent:
    """`event` with the `sequence` its store gave it (cheaper than `dataclasses.replace`)."""
    return AuditEvent(
        sequence, event.time, event.principal, event.operation, event.key_id,
        event.key_version, event.token_id, event.context, event.justification, event.outcome,
        event.reason, event.request_id, event.prev_hash, event.hash, event.chain,
        event.chain_sequence,
    )  # fmt: skip


def _json_str(value: str) -> str:
    """A string as JSON exactly as `json.dumps(..., ensure_ascii=False)` writes it."""
    if isinstance(value, str):
        return _encode_basestring(value)
    return _canonical_json(value)  # not a string: as the canonical JSON writes it


def _json_int(value: int) -> str:
    if type(value) is int:
        return int.__repr__(value)
    return _canonical_json(value)


def _canonical_json(value: object) -> str:
    """Any other value exactly as `keybroker_client.evidence.canonical` writes it (no spaces
    in a list or object, UTF-8, no NaN)."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


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
