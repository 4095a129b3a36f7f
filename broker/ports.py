"""Contracts between the services and the adapters (PKCS#11, SQLite, PostgreSQL).

Each port is a `typing.Protocol`; tests hold fakes of them in `tests/fakes/`. Adapters raise
only the domain exceptions of `broker.errors`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from broker.domain import ApprovalRequest, ApprovalState, AuditEvent, AuditFilter, Key


@dataclass(frozen=True, slots=True)
class HsmInfo:
    """A configured HSM and where it stands.

    Attributes:
        name: the name keys refer to (`Key.hsm`).
        jurisdiction: ISO 3166-1 alpha-2 code of the country whose law governs the HSM.
        operator: who runs the HSM.
    """

    name: str
    jurisdiction: str
    operator: str


class KeyKind(enum.Enum):
    """The two kinds of HSM key the broker makes (DESIGN.md invariant 1)."""

    #: An AES-256 key-encryption key: encrypts and decrypts with AES-GCM only.
    KEK = "kek"
    #: An ECDSA P-256 key pair: the private key signs only, the public key verifies only.
    SIGNING = "signing"


@dataclass(frozen=True, slots=True)
class KeyProperties:
    """What an HSM holds under one label, compared with the template of the expected kind.

    Attributes:
        label: the objects' label.
        kind: the kind of key the label was checked as.
        objects: how many objects carry the label (1 for a KEK, 2 for a signing key pair).
        problems: every way the objects fall short of the template the broker generates
            keys of that kind with, in the HSM's own terms and naming the attribute (for
            PKCS#11: "CKA_EXTRACTABLE=True (want False)"); empty for a key as generated.
    """

    label: str
    kind: KeyKind
    objects: int
    problems: tuple[str, ...] = ()

    @property
    def as_generated(self) -> bool:
        """True when nothing differs from the template."""
        return not self.problems


class Hsm(Protocol):
    """One HSM token reached through PKCS#11.

    Objects are addressed by their `CKA_LABEL`. Every method may raise `HsmUnavailable`
    when the device, the session or the token fails; the adapter then recovers on the next
    call (fresh session, and if need be a re-initialised library).
    """

    info: HsmInfo

    def generate_kek(self, label: str) -> None:
        """Generates an AES-256 key-encryption key inside the token, with the template of
        `KeyKind.KEK`: a private, sensitive, non-extractable, non-modifiable token object
        that encrypts and decrypts with AES-GCM and nothing else (no wrap, unwrap, sign,
        verify or derive).

        Raises:
            AlreadyExists: an object with that label exists.
        """

    def encrypt(self, label: str, iv: bytes, plaintext: bytes, aad: bytes) -> bytes:
        """AES-256-GCM inside the HSM with a 128-bit tag; returns ciphertext || tag.

        Raises:
            HsmObjectMissing: no key with that label.
        """

    def decrypt(self, label: str, iv: bytes, ciphertext: bytes, aad: bytes) -> bytes:
        """Inverse of `encrypt`.

        Raises:
            DecryptionFailed: the tag did not verify (wrong AAD, IV, key or ciphertext).
            HsmObjectMissing: no key with that label.
        """

    def reencrypt(
        self,
        label: str,
        iv: bytes,
        ciphertext: bytes,
        aad: bytes,
        new_label: str,
        new_iv: bytes,
        new_aad: bytes,
    ) -> bytes:
        """`decrypt` under `label`, then `encrypt` of the result under `new_label` (same
        token), returning only the new ciphertext || tag: the plaintext never leaves the
        adapter, which wipes its buffer before returning (or raising).

        Raises:
            As `decrypt` (for the first key) and `encrypt` (for the second).
        """

    def authenticate(self, label: str, iv: bytes, ciphertext: bytes, aad: bytes) -> None:
        """Checks that `ciphertext` decrypts under `label` with `aad` (its tag verifies),
        without returning the plaintext; the adapter wipes its buffer.

        Raises:
            As `decrypt`.
        """

    def generate_signing_key(self, label: str) -> bytes:
        """Generates an ECDSA P-256 key pair inside the token; returns the public point.

        The template of `KeyKind.SIGNING`: the private key is a sensitive, non-extractable
        token object that signs with raw ECDSA only; the public key verifies only.
        Returns the uncompressed SEC1 point (65 bytes).
        """

    def public_point(self, label: str) -> bytes:
        """The uncompressed SEC1 point of the signing key `label` (65 bytes).

        Raises:
            HsmObjectMissing: no such key pair.
        """

    def sign(self, label: str, digest: bytes) -> bytes:
        """Raw ECDSA (CKM_ECDSA) over a SHA-256 digest made on the host; returns r || s."""

    def random(self, length: int) -> bytes:
        """`length` bytes from the token's RNG (C_GenerateRandom)."""

    def destroy(self, label: str) -> None:
        """Destroys every object with that label (no error when there is none)."""

    def key_properties(self, label: str, kind: KeyKind) -> KeyProperties:
        """Reads the object(s) labelled `label` and compares them with the template the
        broker generates keys of `kind` with (the same definition, so the two cannot drift).

        Raises:
            HsmObjectMissing: nothing on the token carries that label.
        """

    def write_anchor(self, label: str, data: bytes) -> None:
        """Stores `data` as the token's one data object labelled `label`, replacing any
        older one: a private token object (`CKO_DATA`, application "keybroker-audit") that
        only a holder of the PIN can read, change or delete. The new object is made before
        the old one goes, so a crash in between leaves both, never neither.
        """

    def read_anchors(self, prefix: str) -> dict[str, list[bytes]]:
        """The values of the anchors whose label starts with `prefix`, by label (normally one
        value each; two after a crash inside `write_anchor`)."""

    def labels(self, prefix: str) -> list[str]:
        """The distinct labels of the token's key objects (secret, private and public keys;
        not the anchors) that start with `prefix`, sorted: what the start-up scan compares
        with the store to report HSM objects no key refers to."""

    def check(self) -> None:
        """Cheap liveness probe; raises HsmUnavailable when the token is unreachable."""

    def close(self) -> None:
        """Closes every session of this token."""


class KeyStore(Protocol):
    """Key metadata. Updates are compare-and-set on `Key.revision`."""

    def create_key(self, key: Key) -> None:
        """Raises AlreadyExists when the key id is taken."""

    def get_key(self, key_id: str) -> Key:
        """Raises NotFound."""

    def list_keys(self, after: str, limit: int) -> list[Key]:
        """Keys with key_id > after, in key id order, at most `limit`."""

    def update_key(self, key: Key, expected_revision: int) -> Key:
        """Stores `key` with revision expected_revision + 1 if the stored revision is still
        `expected_revision`; returns the stored key.

        Raises:
            ConcurrentModification: another writer got there first.
            NotFound: the key is gone.
        """


class ApprovalStore(Protocol):
    """Approval requests (docs/lifecycle.md, "Approvals"). Updates are compare-and-set on
    `ApprovalRequest.revision`; applying an approved change is one transaction with the key's
    own compare-and-set, so a change applies at most once and never to a key changed since."""

    def create_approval(self, request: ApprovalRequest) -> None:
        """Stores a new request. Raises AlreadyExists when its id is taken."""

    def get_approval(self, request_id: str) -> ApprovalRequest:
        """Raises NotFound."""

    def list_approvals(
        self, after: str, limit: int, states: Sequence[ApprovalState] = (), key_id: str = ""
    ) -> list[ApprovalRequest]:
        """Requests with request_id > after, in request id (creation) order, at most `limit`;
        only those in `states` (any state when empty) and of `key_id` (any key when empty)."""

    def update_approval(self, request: ApprovalRequest, expected_revision: int) -> ApprovalRequest:
        """Stores `request` with revision expected_revision + 1 if the stored revision is
        still `expected_revision`; returns the stored request.

        Raises:
            ConcurrentModification: another writer got there first.
            NotFound: there is no such request.
        """

    def apply_approval(
        self,
        request: ApprovalRequest,
        expected_revision: int,
        key: Key,
        expected_key_revision: int,
    ) -> tuple[ApprovalRequest, Key]:
        """In one transaction: stores `request` (compare-and-set on `expected_revision`, as
        `update_approval`) and `key` (compare-and-set on `expected_key_revision`, as
        `KeyStore.update_key`); both or neither. Returns both as stored.

        Raises:
            ConcurrentModification: the request or the key changed meanwhile; nothing was
                stored.
            NotFound: the request or the key is gone.
        """


class RevocationStore(Protocol):
    """Issued token ids and their revocations, shared by every replica."""

    def record_issued(self, token_id: str, subject: str, key_id: str, expires_at: datetime) -> None:
        """Remembers who a token was issued to, so its subject may revoke it."""

    def issued_subject(self, token_id: str) -> str | None:
        """The subject a token id was issued to, or None for an unknown id."""

    def revoke(self, token_id: str, subject: str, expires_at: datetime) -> None:
        """Records a revocation; revoking twice is not an error."""

    def is_revoked(self, token_id: str) -> bool: ...

    def revoked_and_key(self, token_id: str, key_id: str) -> tuple[bool, Key | None]:
        """Whether `token_id` is revoked, and the key `key_id` (None when there is none), in
        one read: the two look-ups of every Decrypt, in one round trip to the database.

        Both answers must be as current as `is_revoked` and `KeyStore.get_key` give them (no
        cache that another replica's revocation or policy change would not reach).
        """

    def consume_use(self, token_id: str, max_uses: int) -> bool:
        """Counts one use of a token atomically across replicas.

        Returns:
            True if the use is within `max_uses` (and was counted), False if the token has
            already been used `max_uses` times (nothing is counted then).
        """


#: A record of the trail as `keybroker_client.evidence` defines it: a JSON object (chain
#: record, event or checkpoint). Read back from a store it may be malformed: the verifier says so.
Record = dict[str, Any]


class AuditSnapshot(Protocol):
    """One consistent view of the audit tables (a read transaction), for verifying and export."""

    def chains(self) -> list[Record]:
        """Every chain record (`{"type": "chain", ...}`), in the order they were added."""

    def checkpoints(self) -> list[Record]:
        """Every checkpoint record, in the order they were added."""

    def events(self, after_sequence: int = 0) -> Iterator[Record]:
        """Event records with a greater `sequence`, in `sequence` order, as stored (a damaged
        row comes as a record the verifier reports as malformed, never as an exception)."""

    def event_chains(self, after_sequence: int = 0) -> list[str]:
        """The chains with events after `after_sequence`."""

    def last_sequence(self) -> int:
        """The greatest `sequence` (0 for an empty trail)."""


class AuditStore(Protocol):
    """The append-only audit tables: events, chain records, checkpoints.

    Each writer appends to its own chain (docs/audit.md), so appends need no lock shared
    between writers beyond the database's own write transaction.
    """

    def append_batch(self, events: Sequence[AuditEvent]) -> list[int]:
        """Inserts events (their chain position and hash already set) in one transaction,
        durably, and returns the `sequence` the store gave each (increasing).

        Raises:
            AuditUnavailable: the batch could not be made durable; nothing of it was written.
        """

    def add_chain(self, record: Record) -> None:
        """Stores a signed chain record. Raises AuditUnavailable."""

    def add_checkpoint(self, record: Record) -> None:
        """Stores a signed checkpoint record. Raises AuditUnavailable."""

    def events(self, flt: AuditFilter) -> Iterator[AuditEvent]:
        """Events matching the filter, in sequence order; a damaged row is skipped (logged)."""

    def snapshot(self) -> AbstractContextManager[AuditSnapshot]:
        """A consistent read view of the audit tables, for as long as the context lasts.

        Raises:
            AuditUnavailable: the store cannot be read.
        """


class AuditSink(Protocol):
    """A secondary copy of the audit trail, such as a SIEM feed; best effort.

    It receives events only once the `AuditStore` holds them durably, and the store stays the
    one whose failure fails a call: a sink that is slow or down loses events (counted and
    logged) and reports itself unhealthy, but never blocks or fails a call.
    """

    name: str

    def submit(self, events: Sequence[AuditEvent]) -> None:
        """Takes durable events for delivery; never blocks on the destination, never raises."""

    @property
    def healthy(self) -> bool:
        """False while the sink's writes fail or it has dropped events it has not caught up on."""

    def watch(self, callback: Callable[[bool], None]) -> None:
        """Calls `callback(healthy)` at once and again on every change, from any thread."""

    def close(self) -> None:
        """Delivers what it can of the queued events within a short bound, then stops."""


class SigningKeyStore(Protocol):
    """Which HSM objects are the broker's signing keys."""

    def signing_keys(self, purpose: str) -> list[tuple[str, str, str]]:
        """(kid, hsm name, label) of the signing keys for `purpose`, newest first."""

    def add_signing_key(self, purpose: str, kid: str, hsm: str, label: str) -> None: ...


class Store(KeyStore, RevocationStore, AuditStore, SigningKeyStore, ApprovalStore, Protocol):
    """Everything the broker keeps in its database: the embedded SQLite file or a PostgreSQL
    database that replicas share (docs/storage.md)."""

    def check(self) -> None:
        """Cheap liveness probe for health; raises StoreUnavailable when unreachable."""

    def close(self) -> None:
        """Closes every connection."""


class Clock(Protocol):
    def now(self) -> datetime:
        """The current time, timezone-aware UTC."""
