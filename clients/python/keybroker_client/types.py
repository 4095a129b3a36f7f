"""The values the SDK takes and returns: frozen dataclasses and enums, never protobuf messages.

The wire format stays behind :class:`~keybroker_client.KeybrokerClient` (the conversions live in
``keybroker_client._wire``), so code using the SDK does not depend on the generated stubs. Times
are timezone-aware :class:`~datetime.datetime` values in UTC, spans are
:class:`~datetime.timedelta`; a time or span the broker left unset is ``None``. Sequences are
tuples and mappings plain dicts.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta

__all__ = [
    "Approval",
    "ApprovalOperation",
    "ApprovalPage",
    "ApprovalRequest",
    "ApprovalState",
    "AuditEvent",
    "AuditReport",
    "DataKey",
    "Decrypted",
    "Encrypted",
    "Grant",
    "HsmInfo",
    "IssuedToken",
    "Key",
    "KeyPage",
    "KeyPolicy",
    "KeyState",
    "KeyUsage",
    "KeyVersion",
    "KeyVersionUsage",
    "Operation",
    "Outcome",
    "ReWrapResult",
]


class KeyState(enum.Enum):
    """The lifecycle state of a key."""

    #: Not set, or a state this client version does not know.
    UNSPECIFIED = "UNSPECIFIED"
    #: The key encrypts and decrypts.
    ENABLED = "ENABLED"
    #: The key neither encrypts nor decrypts until it is enabled again.
    DISABLED = "DISABLED"
    #: The key is scheduled for destruction at ``destroy_time``.
    PENDING_DESTRUCTION = "PENDING_DESTRUCTION"
    #: The key's HSM objects are destroyed; its metadata remains for the audit trail.
    DESTROYED = "DESTROYED"


class Operation(enum.Enum):
    """An operation a grant may allow on a key; the values are the CLI's grant syntax."""

    #: Not set, or an operation this client version does not know.
    UNSPECIFIED = "unspecified"
    #: ``GenerateDataKey`` and ``Encrypt``.
    ENCRYPT = "encrypt"
    #: ``IssueToken``, then ``Decrypt`` with that token.
    DECRYPT = "decrypt"
    #: ``ReWrap`` a stored blob under the key's primary version.
    REWRAP = "rewrap"


class Outcome(enum.Enum):
    """The outcome of an audited call."""

    #: Not set, or an outcome this client version does not know.
    UNSPECIFIED = "UNSPECIFIED"
    ALLOWED = "ALLOWED"
    DENIED = "DENIED"
    ERROR = "ERROR"


def _freeze(obj: object, **values: object) -> None:
    # Normalises fields of a frozen dataclass (lists to tuples, mappings to dicts) after
    # construction, so that values built from lists compare equal to values from the SDK.
    for name, value in values.items():
        object.__setattr__(obj, name, value)


@dataclass(frozen=True, slots=True)
class Grant:
    """A permission for one principal on one key.

    Attributes:
        principal: the client certificate identity the grant is for.
        operations: what the principal may do.
        context: entries every token issued under the grant must carry with the same value;
            a value ending in ``*`` matches by prefix.
        max_token_ttl: the longest token lifetime the grant allows; ``None`` means the
            broker's maximum (1 hour).
        countries: ISO 3166-1 alpha-2 codes; when any is given, the grant applies only to a
            caller whose client certificate names one of them as its country (``C=``).
    """

    principal: str
    operations: tuple[Operation, ...] = ()
    context: Mapping[str, str] = field(default_factory=dict)
    max_token_ttl: timedelta | None = None
    countries: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _freeze(
            self,
            operations=tuple(self.operations),
            context=dict(self.context),
            countries=tuple(self.countries),
        )


@dataclass(frozen=True, slots=True)
class KeyPolicy:
    """Who may do what with a key, and where the key may live.

    Attributes:
        grants: the grants; build them with :func:`~keybroker_client.policy_from_grants`.
        allowed_jurisdictions: ISO 3166-1 alpha-2 codes of the jurisdictions whose HSMs may
            hold and use the key; empty means the EU/EEA member states.
    """

    grants: tuple[Grant, ...] = ()
    allowed_jurisdictions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _freeze(
            self,
            grants=tuple(self.grants),
            allowed_jurisdictions=tuple(self.allowed_jurisdictions),
        )


@dataclass(frozen=True, slots=True)
class KeyVersion:
    """One version of a key's key-encryption key, held in the HSM.

    Attributes:
        version: the version number, from 1.
        create_time: when it was generated.
    """

    version: int
    create_time: datetime | None = None


@dataclass(frozen=True, slots=True)
class HsmInfo:
    """A configured HSM and where it stands, as the broker declares it.

    Attributes:
        name: the name keys refer to (``Key.hsm``).
        jurisdiction: ISO 3166-1 alpha-2 code of the country whose law governs the HSM.
        operator: who runs the HSM.
    """

    name: str
    jurisdiction: str = ""
    operator: str = ""


@dataclass(frozen=True, slots=True)
class Key:
    """A key's metadata; key material never leaves the HSM.

    Attributes:
        key_id: the key's id.
        description: free text.
        state: the lifecycle state.
        primary_version: the version that encrypts.
        versions: every version, oldest first.
        min_decryption_version: blobs of older versions no longer decrypt.
        policy: who may use the key and where it may live.
        hsm: the name of the configured HSM that holds the key.
        create_time: when the key was created.
        rotation_period: the automatic rotation interval, if any.
        next_rotation_time: when the next automatic rotation is due, if any.
        destroy_time: when a scheduled destruction happens (or happened).
        hsm_info: where the key lives: its HSM's name, jurisdiction and operator; ``None``
            when that HSM is not configured on the broker that answered.
    """

    key_id: str
    description: str = ""
    state: KeyState = KeyState.UNSPECIFIED
    primary_version: int = 0
    versions: tuple[KeyVersion, ...] = ()
    min_decryption_version: int = 0
    policy: KeyPolicy = field(default_factory=KeyPolicy)
    hsm: str = ""
    create_time: datetime | None = None
    rotation_period: timedelta | None = None
    next_rotation_time: datetime | None = None
    destroy_time: datetime | None = None
    hsm_info: HsmInfo | None = None

    def __post_init__(self) -> None:
        _freeze(self, versions=tuple(self.versions))


@dataclass(frozen=True, slots=True)
class KeyVersionUsage:
    """How one key version has been used, counted from the audit trail.

    Attributes:
        version: the key version.
        data_keys_issued: data keys wrapped under it.
        encryptions: ``Encrypt`` calls under it.
        rewrapped: blobs re-wrapped into it.
        decrypts: blobs of it decrypted.
        decrypts_refused: refused decrypts of its blobs (for a retired version: who still
            needs it).
        last_decrypt_time: the last decrypt of one of its blobs, if any.
        last_use_time: its last use of any kind, if any.
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
class KeyUsage:
    """The result of ``GetKeyUsage``.

    Attributes:
        key: the key.
        versions: the use of each of its versions, oldest first.
        events_counted: how many of the key's audit events were read.
    """

    key: Key
    versions: tuple[KeyVersionUsage, ...] = ()
    events_counted: int = 0

    def __post_init__(self) -> None:
        _freeze(self, versions=tuple(self.versions))


@dataclass(frozen=True, slots=True)
class KeyPage:
    """One page of ``ListKeys``.

    Attributes:
        keys: the keys of this page, in key id order.
        next_page_token: pass it to get the next page; empty on the last page.
    """

    keys: tuple[Key, ...] = ()
    next_page_token: str = ""

    def __post_init__(self) -> None:
        _freeze(self, keys=tuple(self.keys))


class ApprovalState(enum.Enum):
    """Where an approval request stands."""

    #: Not set, or a state this client version does not know.
    UNSPECIFIED = "UNSPECIFIED"
    #: Waiting for approvals until ``expire_time``.
    PENDING = "PENDING"
    #: Approved by enough admins and applied to the key.
    APPLIED = "APPLIED"
    #: Approved but not applied: the key changed since the request (``reason`` says how).
    FAILED = "FAILED"
    #: Not approved by enough admins in time.
    EXPIRED = "EXPIRED"
    #: Withdrawn by its requester or an admin.
    CANCELLED = "CANCELLED"


class ApprovalOperation(enum.Enum):
    """The change an approval request holds, by the RPC that asked for it."""

    #: Not set, or a change this client version does not know.
    UNSPECIFIED = "UNSPECIFIED"
    UPDATE_KEY_POLICY = "UpdateKeyPolicy"
    ENABLE_KEY = "EnableKey"
    SCHEDULE_KEY_DESTRUCTION = "ScheduleKeyDestruction"


@dataclass(frozen=True, slots=True)
class Approval:
    """One admin's approval of a request (the requester's comes first)."""

    principal: str
    approve_time: datetime | None = None


@dataclass(frozen=True, slots=True)
class ApprovalRequest:
    """A change to a key waiting for (or done with) the approval of several admins
    (``approvals.required`` on the broker; docs/lifecycle.md, "Approvals").

    Attributes:
        request_id: ``apr-YYYYMMDD-HHMMSS-`` and 8 hex digits.
        operation: what the change is.
        key_id: the key it changes.
        requester: the admin who asked; their request is the first approval.
        create_time: when it was asked for.
        expire_time: after this it can no longer be approved.
        state: where it stands.
        required_approvals: distinct admins needed, the requester included.
        approvals: the approvals so far, the requester's first.
        policy: the whole policy requested (``UPDATE_KEY_POLICY``).
        pending_window: the window requested (``SCHEDULE_KEY_DESTRUCTION``).
        widening: the policy requested widens the key's (more jurisdictions, a longer
            token lifetime cap); ``widening_summary`` says how.
        widening_summary: one line per widening.
        reason: why it failed, expired or was cancelled.
        close_time: when it left ``PENDING``.
        closed_by: who applied or cancelled it.
    """

    request_id: str
    operation: ApprovalOperation = ApprovalOperation.UNSPECIFIED
    key_id: str = ""
    requester: str = ""
    create_time: datetime | None = None
    expire_time: datetime | None = None
    state: ApprovalState = ApprovalState.UNSPECIFIED
    required_approvals: int = 0
    approvals: tuple[Approval, ...] = ()
    policy: KeyPolicy | None = None
    pending_window: timedelta | None = None
    widening: bool = False
    widening_summary: tuple[str, ...] = ()
    reason: str = ""
    close_time: datetime | None = None
    closed_by: str = ""

    def __post_init__(self) -> None:
        _freeze(
            self,
            approvals=tuple(self.approvals),
            widening_summary=tuple(self.widening_summary),
        )


@dataclass(frozen=True, slots=True)
class ApprovalPage:
    """One page of ``ListApprovalRequests``.

    Attributes:
        requests: the requests of this page, oldest first.
        next_page_token: pass it to get the next page; empty on the last page.
    """

    requests: tuple[ApprovalRequest, ...] = ()
    next_page_token: str = ""

    def __post_init__(self) -> None:
        _freeze(self, requests=tuple(self.requests))


@dataclass(frozen=True, slots=True)
class DataKey:
    """A fresh data key from ``GenerateDataKey``.

    Attributes:
        plaintext_key: the 32-byte key to encrypt with locally; a secret, kept out of ``repr``.
            Drop it as soon as the data is encrypted.
        wrapped_key: the key wrapped by the broker; store it next to the ciphertext.
        key_id: the broker key that wrapped it.
        key_version: the version of that key.
    """

    plaintext_key: bytes = field(repr=False)
    wrapped_key: bytes
    key_id: str
    key_version: int


@dataclass(frozen=True, slots=True)
class Encrypted:
    """A blob made by ``Encrypt`` or ``ReWrap``.

    Attributes:
        ciphertext: the self-describing blob (it names key and version).
        key_id: the key it is encrypted under.
        key_version: the key version it is encrypted under.
    """

    ciphertext: bytes
    key_id: str
    key_version: int


@dataclass(frozen=True, slots=True)
class ReWrapResult:
    """The outcome of one item of :meth:`KeybrokerClient.rewrap_stream`.

    Attributes:
        ciphertext: the blob under the key's primary version (the item's own, unchanged,
            when ``already_current``); empty when the item failed.
        key_id: the key of ``ciphertext``.
        key_version: its key version.
        already_current: the blob was already under the primary version: checked, unchanged.
        code: ``"OK"``, or the status name a ``ReWrap`` of this item alone would have raised
            (``"INVALID_ARGUMENT"`` for a damaged blob or a wrong context, ...).
        message: why the item failed; empty when it did not.
    """

    ciphertext: bytes
    key_id: str = ""
    key_version: int = 0
    already_current: bool = False
    code: str = "OK"
    message: str = ""

    @property
    def ok(self) -> bool:
        """True when the item is under the primary version now (re-wrapped or already)."""
        return self.code == "OK"


@dataclass(frozen=True, slots=True)
class DecryptResult:
    """The outcome of one item of :meth:`KeybrokerClient.batch_decrypt`.

    Attributes:
        plaintext: the decrypted bytes; empty when the item failed. Kept out of ``repr``.
        key_id: the key the blob was encrypted under (empty when the item failed).
        key_version: its key version.
        code: ``"OK"``, or the status name a ``Decrypt`` of this item alone would have raised.
        message: why the item failed; empty when it did not.
    """

    plaintext: bytes = field(repr=False)
    key_id: str = ""
    key_version: int = 0
    code: str = "OK"
    message: str = ""

    @property
    def ok(self) -> bool:
        """True when the item was decrypted."""
        return self.code == "OK"


@dataclass(frozen=True, slots=True)
class Decrypted:
    """The result of ``Decrypt``.

    Attributes:
        plaintext: the decrypted bytes (a data key or a small payload); kept out of ``repr``.
        key_id: the key the blob was encrypted under.
        key_version: the key version the blob was encrypted under.
    """

    plaintext: bytes = field(repr=False)
    key_id: str
    key_version: int


@dataclass(frozen=True, slots=True)
class IssuedToken:
    """A decryption token from ``IssueToken``.

    Attributes:
        token: the signed JWT to pass to :meth:`KeybrokerClient.decrypt`; kept out of ``repr``.
        token_id: the token's ``jti``, for :meth:`KeybrokerClient.revoke_token`.
        expire_time: when the token stops being accepted (UTC).
        max_uses: how many ``Decrypt`` calls the token allows; 0 means no limit.
    """

    token: str = field(repr=False)
    token_id: str
    expire_time: datetime | None
    max_uses: int = 0


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One record of the audit trail.

    Attributes:
        sequence: the record's position in the store, increasing (for reading and paging).
        time: when the call happened.
        principal: who made the call.
        operation: the RPC name, for example ``"Decrypt"`` or ``"CreateKey"``.
        key_id: the key the call was about, if any.
        key_version: the key version, if any (0 when none).
        token_id: the token used or issued, if any.
        context: the encryption context of the call.
        justification: the justification given with a token.
        outcome: allowed, denied or error.
        reason: why it was denied or failed.
        request_id: the caller's ``x-request-id``.
        prev_hash: hex SHA-256 of the previous event of its chain (64 zeros for the first).
        hash: hex SHA-256 over ``prev_hash`` and this record's canonical form.
        chain: the chain of the event: one per broker process (``<broker_id>-<12 hex>``).
        chain_sequence: 1, 2, 3, ... within the chain, without gaps.
    """

    sequence: int
    time: datetime | None = None
    principal: str = ""
    operation: str = ""
    key_id: str = ""
    key_version: int = 0
    token_id: str = ""
    context: Mapping[str, str] = field(default_factory=dict)
    justification: str = ""
    outcome: Outcome = Outcome.UNSPECIFIED
    reason: str = ""
    request_id: str = ""
    prev_hash: str = ""
    hash: str = ""
    chain: str = ""
    chain_sequence: int = 0

    def __post_init__(self) -> None:
        _freeze(self, context=dict(self.context))


@dataclass(frozen=True, slots=True)
class AuditReport:
    """The result of ``VerifyAuditLog``. Check ``ok``: a broken log is not raised as an error.

    Attributes:
        ok: every chain, signed checkpoint and HSM anchor verifies.
        events_checked: how many events verified.
        first_bad_sequence: the ``chain_sequence`` where the first bad chain goes wrong
            (0 when ``ok``).
        error: what is wrong with it (empty when ``ok``).
        head_hash: the hash of the last event checked.
        first_bad_chain: the chain of the first bad record (empty when ``ok``).
        unsigned_events: events after their chain's last signed checkpoint.
        chains_checked: chains whose signed chain record verified.
        checkpoints_checked: signed checkpoints that verified.
    """

    ok: bool
    events_checked: int = 0
    first_bad_sequence: int = 0
    error: str = ""
    head_hash: str = ""
    first_bad_chain: str = ""
    unsigned_events: int = 0
    chains_checked: int = 0
    checkpoints_checked: int = 0
