"""The broker's background work on keys: destructions and rotations that have come due.

Every broker process runs a `KeyScheduler` (setting `keys.scheduler_interval`); with several
workers and replicas sharing one store, each due task is still done once. A scheduler first
claims the task by writing a `Lease` (its holder id and an expiry) into the key record with
the store's compare-and-set; whoever loses that race leaves the key alone. The holder does the
work and clears the lease in the same compare-and-set that stores the result. A holder that
dies leaves its lease behind, and once the lease has expired another scheduler takes the task
over: destroying an HSM object that is already gone is no error, and a rotation's new version
only counts if the compare-and-set that stores it succeeds.

Destruction is crypto-shredding: the HSM object of every version is destroyed and a search
must then find none of them; a `DestroyKey` audit event is made durable; and a receipt naming
the key, its versions, their HSM objects, the time and that audit event is signed by the HSM
audit key (`keybroker_client.evidence.receipt` verifies it offline). The key record keeps the
receipt and becomes DESTROYED.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from keybroker_client import evidence

from broker.domain import (
    AuditEvent,
    AuditOperation,
    Caller,
    Key,
    KeyState,
    KeyVersion,
    Lease,
    LeaseTask,
    Outcome,
    format_time,
)
from broker.errors import (
    ConcurrentModification,
    HsmObjectMissing,
    HsmUnavailable,
    KeybrokerError,
    NotFound,
    StoreUnavailable,
    Unavailable,
)
from broker.ports import Clock, Hsm, HsmInfo, KeyKind, KeyStore
from broker.services.access import Access
from broker.services.audit import AuditDraft, AuditLog
from broker.services.audit_checkpoints import AuditSigner
from broker.services.keys import CAS_ATTEMPTS, kek_label
from broker.services.signing import AUDIT_PURPOSE

log = logging.getLogger(__name__)

#: The principal of the scheduler's audit events.
SCHEDULER_PRINCIPAL = "keybroker-scheduler"
#: How long a claim keeps other schedulers away; far longer than destroying or generating a
#: few HSM objects takes.
DEFAULT_LEASE = timedelta(minutes=5)
#: Keys read from the store at a time while looking for due work.
PAGE = 500


class LeaseLost(Exception):
    """Another scheduler took the task over (our lease expired) or it is no longer due."""


@dataclass(frozen=True, slots=True)
class TickReport:
    """What one pass did, by key id."""

    destroyed: tuple[str, ...] = ()
    rotated: tuple[str, ...] = ()
    failed: tuple[str, ...] = ()


@dataclass(slots=True)
class _Tally:
    destroyed: list[str] = field(default_factory=list)
    rotated: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


def new_holder_id(broker_id: str) -> str:
    """A holder id unique to one scheduler instance (a restarted process gets a new one)."""
    return f"{broker_id}:{secrets.token_hex(6)}"


def due_task(key: Key, now: datetime) -> LeaseTask | None:
    """The background work `key` is due for at `now`, if any.

    A disabled key is not rotated (it uses no key material); its rotation is done once it is
    enabled again and the scheduler comes by.
    """
    if key.state is KeyState.PENDING_DESTRUCTION:
        due = key.destroy_time
        return LeaseTask.DESTROY if due is not None and due <= now else None
    if key.state is KeyState.ENABLED and key.rotation_period is not None:
        due = key.next_rotation_time
        return LeaseTask.ROTATE if due is not None and due <= now else None
    return None


def destruction_statement(
    *, issuer: str, key: Key, hsm: HsmInfo, event: AuditEvent, destroyed_at: datetime
) -> dict[str, Any]:
    """What the receipt of `key`'s destruction states (the receipt without its `jws`)."""
    assert key.destroy_time is not None
    return {
        "type": evidence.RECEIPT_TYPE,
        "issuer": issuer,
        "key_id": key.key_id,
        "hsm": {"name": hsm.name, "jurisdiction": hsm.jurisdiction, "operator": hsm.operator},
        "versions": [
            {
                "version": v.version,
                "label": v.hsm_label,
                "create_time": format_time(v.create_time),
            }
            for v in key.versions
        ],
        "scheduled_time": format_time(key.destroy_time),
        "destroy_time": format_time(destroyed_at),
        "audit": {
            "chain": event.chain,
            "chain_sequence": event.chain_sequence,
            "sequence": event.sequence,
            "hash": event.hash,
        },
    }


def sign_receipt(signer: AuditSigner, statement: dict[str, Any]) -> str:
    """The receipt's file form: the statement and the audit key's `jws` over it, canonical."""
    jws = signer.sign_jws(
        AUDIT_PURPOSE, evidence.signing_input(statement), {"typ": evidence.RECEIPT_JWS_TYPE}
    )
    return evidence.receipt_text({**statement, "jws": jws})


class KeyScheduler:
    """Destroys keys whose pending window is over and rotates keys whose rotation is due.

    Args:
        store: key metadata (the leases live in the key records).
        hsms: the HSMs configured on this broker; keys on others are left to the brokers
            that have them.
        access: the jurisdiction check of a rotation's new version.
        audit: the audit trail.
        clock: the time source.
        signer: the HSM audit key, which signs destruction receipts.
        issuer: the broker's name in receipts (`urn:keybroker:<broker_id>`).
        holder: this scheduler's id in leases (`new_holder_id`).
        interval: seconds between passes of the background thread; 0 runs none (`run_once`
            is still there).
        lease: how long a claim holds.
    """

    def __init__(
        self,
        store: KeyStore,
        hsms: Mapping[str, Hsm],
        access: Access,
        audit: AuditLog,
        clock: Clock,
        signer: AuditSigner,
        *,
        issuer: str,
        holder: str,
        interval: float,
        lease: timedelta = DEFAULT_LEASE,
    ) -> None:
        self.holder = holder
        self._store = store
        self._hsms = dict(hsms)
        self._access = access
        self._audit = audit
        self._clock = clock
        self._signer = signer
        self._issuer = issuer
        self._interval = interval
        self._lease = lease
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # The background thread ----------------------------------------------------------------

    def start(self) -> KeyScheduler:
        """Starts the background passes (none when the interval is 0)."""
        if self._interval > 0 and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="key-scheduler", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        """Stops the background passes; a pass under way finishes first."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.run_once()
            except Exception:  # the next pass tries again
                log.exception("key scheduler pass failed")

    # One pass -------------------------------------------------------------------------------

    def run_once(self) -> TickReport:
        """Claims and does every task due now. A task that fails is audited, its lease given
        up, and tried again on a later pass; it never stops the others.

        Raises:
            StoreUnavailable: the keys cannot be listed.
        """
        tally = _Tally()
        for key in self._keys():
            if self._stop.is_set():
                break
            now = self._clock.now()
            task = due_task(key, now)
            if task is None or key.hsm not in self._hsms:
                continue
            claimed = self.claim(key, task)
            if claimed is not None:
                self._do(claimed, task, tally)
        return TickReport(tuple(tally.destroyed), tuple(tally.rotated), tuple(tally.failed))

    def _keys(self) -> Iterator[Key]:
        after = ""
        while page := self._store.list_keys(after, PAGE):
            yield from page
            after = page[-1].key_id

    def claim(self, key: Key, task: LeaseTask) -> Key | None:
        """Writes this scheduler's lease into `key` (as read) by compare-and-set.

        Returns:
            The key as stored with the lease; None when another scheduler's lease on it has
            not expired, or another writer changed the key first (whoever won decides; the
            next pass looks again).
        """
        now = self._clock.now()
        if key.lease is not None and key.lease.held(now) and key.lease.holder != self.holder:
            return None
        lease = Lease(self.holder, task, now + self._lease)
        try:
            return self._store.update_key(key.evolve(lease=lease), key.revision)
        except (ConcurrentModification, NotFound):
            return None

    def _do(self, claimed: Key, task: LeaseTask, tally: _Tally) -> None:
        try:
            if task is LeaseTask.DESTROY:
                self.destroy(claimed)
                tally.destroyed.append(claimed.key_id)
            else:
                self.rotate(claimed)
                tally.rotated.append(claimed.key_id)
        except LeaseLost as exc:
            log.info("key task given up", extra={"key_id": claimed.key_id, "why": str(exc)})
            self._release(claimed, task)
        except Exception as exc:  # noqa: BLE001 - one key's failure must not stop the others
            tally.failed.append(claimed.key_id)
            log.warning(
                "scheduled %s of key %s failed; will retry: %s", task.value, claimed.key_id, exc
            )
            self._failed(claimed, task, exc)

    # Destruction ----------------------------------------------------------------------------

    def destroy(self, claimed: Key) -> Key:
        """Destroys every version's HSM object, audits it, signs the receipt and stores the key
        as DESTROYED (with the receipt).

        Once the objects are gone and the `DestroyKey` event is durable, the unsigned
        statement is stored in the key record first (the lease still held), so that an attempt
        that fails after that point (the audit key cannot sign) is finished by a later one
        without a second destruction event.

        Raises:
            HsmUnavailable: the HSM failed, or still holds an object after destroying it.
            AuditUnavailable: the `DestroyKey` event could not be made durable.
            LeaseLost: another scheduler took the task over.
        """
        if claimed.destruction_receipt:
            statement = json.loads(claimed.destruction_receipt)
        else:
            statement = self._shred(claimed)
            text = evidence.receipt_text(statement)
            claimed = self._finish(claimed, lambda key: key.evolve(destruction_receipt=text))
        receipt = sign_receipt(self._signer, statement)
        destroyed_at = evidence.parse_time(statement["destroy_time"])
        log.info("key destroyed", extra={"key_id": claimed.key_id})
        return self._finish(
            claimed,
            lambda key: key.evolve(
                state=KeyState.DESTROYED,
                destroy_time=destroyed_at,
                lease=None,
                destruction_receipt=receipt,
            ),
        )

    def _shred(self, claimed: Key) -> dict[str, Any]:
        """Destroys the objects, checks they are gone, records `DestroyKey`; returns the
        receipt's statement."""
        hsm = self._hsms[claimed.hsm]
        for version in claimed.versions:
            hsm.destroy(version.hsm_label)
        for version in claimed.versions:
            _require_absent(hsm, version.hsm_label)
        destroyed_at = self._clock.now()
        numbers = ", ".join(str(v.version) for v in claimed.versions)
        assert claimed.destroy_time is not None
        event = self._record(
            AuditOperation.DESTROY_KEY,
            claimed,
            claimed.primary_version,
            Outcome.ALLOWED,
            justification=(
                f"scheduled destruction due {format_time(claimed.destroy_time)}: HSM objects "
                f"of versions {numbers} destroyed on HSM {hsm.info.name!r}"
            ),
        )
        return destruction_statement(
            issuer=self._issuer, key=claimed, hsm=hsm.info, event=event, destroyed_at=destroyed_at
        )

    # Rotation -------------------------------------------------------------------------------

    def rotate(self, claimed: Key) -> Key:
        """Generates the next version, stores it as primary by compare-and-set and audits it.

        Raises:
            PermissionDenied: the key's policy no longer allows its HSM's jurisdiction.
            HsmUnavailable, StoreUnavailable, AuditUnavailable: a dependency failed.
            LeaseLost: the key was rotated meanwhile, or another scheduler took over.
        """
        hsm = self._access.hsm_for(claimed)
        number = max(v.version for v in claimed.versions) + 1
        label = kek_label(claimed.key_id, number)
        hsm.generate_kek(label)
        now = self._clock.now()

        def change(key: Key) -> Key:
            if key.primary_version != claimed.primary_version:
                raise LeaseLost(f"key {key.key_id!r} was rotated meanwhile")
            period = key.rotation_period
            return key.evolve(
                versions=(*key.versions, KeyVersion(number, now, label)),
                primary_version=number,
                next_rotation_time=now + period if period else None,
                lease=None,
            )

        try:
            stored = self._finish(claimed, change)
        except BaseException:
            # Nothing refers to the new object: remove it rather than leave an orphan.
            _destroy_quietly(hsm, label)
            raise
        assert claimed.rotation_period is not None
        self._record(
            AuditOperation.ROTATE_KEY,
            stored,
            number,
            Outcome.ALLOWED,
            justification=(
                f"automatic rotation: rotation_period {_span(claimed.rotation_period)} elapsed"
            ),
        )
        log.info("key rotated", extra={"key_id": stored.key_id, "version": number})
        return stored

    # Helpers --------------------------------------------------------------------------------

    def _finish(self, claimed: Key, change: Callable[[Key], Key]) -> Key:
        """Stores `change(key)` by compare-and-set while this scheduler holds the lease,
        re-reading the key when another writer (a policy update) got in between."""
        key = claimed
        for _ in range(CAS_ATTEMPTS):
            try:
                return self._store.update_key(change(key), key.revision)
            except ConcurrentModification:
                key = self._store.get_key(key.key_id)
                if key.lease is None or key.lease.holder != self.holder:
                    raise LeaseLost(f"key {key.key_id!r} is no longer leased to us") from None
        raise StoreUnavailable(f"key {claimed.key_id!r} is being changed by others; retry")

    def _failed(self, claimed: Key, task: LeaseTask, exc: Exception) -> None:
        """Audits the failed attempt and gives the lease up, so that a later pass retries."""
        if isinstance(exc, KeybrokerError):
            outcome = Outcome.ERROR if isinstance(exc, Unavailable) else Outcome.DENIED
            reason = exc.message
        else:
            outcome, reason = Outcome.ERROR, "internal error"
        operation = (
            AuditOperation.DESTROY_KEY if task is LeaseTask.DESTROY else AuditOperation.ROTATE_KEY
        )
        try:
            self._record(operation, claimed, claimed.primary_version, outcome, reason=reason)
        except Exception:  # logged; the retry is audited again
            log.exception("could not audit a failed scheduled %s", task.value)
        self._release(claimed, task)

    def _release(self, claimed: Key, task: LeaseTask) -> None:
        """Gives up this scheduler's lease, if it still holds it.

        A destroy lease is kept, expired: some objects may be gone, so the destruction has
        begun and may no longer be cancelled; any scheduler may claim it again at once.
        """

        def release(key: Key) -> Key:
            if task is LeaseTask.DESTROY:
                return key.evolve(lease=Lease(self.holder, task, self._clock.now()))
            return key.evolve(lease=None)

        try:
            current = self._store.get_key(claimed.key_id)
            if current.lease is not None and current.lease.holder == self.holder:
                self._finish(current, release)
        except Exception:  # noqa: BLE001 - the lease expires on its own
            log.warning("could not give up a lease; it expires", extra={"key": claimed.key_id})

    def _record(
        self,
        operation: AuditOperation,
        key: Key,
        version: int,
        outcome: Outcome,
        *,
        reason: str = "",
        justification: str = "",
    ) -> AuditEvent:
        caller = Caller(SCHEDULER_PRINCIPAL, "", f"scheduler-{secrets.token_hex(8)}")
        draft = AuditDraft(
            caller=caller,
            operation=operation,
            key_id=key.key_id,
            key_version=version,
            justification=justification,
        )
        return self._audit.record(draft, outcome, reason)


def _require_absent(hsm: Hsm, label: str) -> None:
    """Raises HsmUnavailable unless a search of the token finds nothing labelled `label`."""
    try:
        hsm.key_properties(label, KeyKind.KEK)
    except HsmObjectMissing:
        return
    raise HsmUnavailable(f"HSM {hsm.info.name!r} still holds {label!r} after destroying it")


def _destroy_quietly(hsm: Hsm, label: str) -> None:
    try:
        hsm.destroy(label)
    except Exception:  # noqa: BLE001 - the original error matters more than this clean-up
        log.warning("could not remove an unused HSM object", extra={"label": label})


def _span(value: timedelta) -> str:
    days, rest = divmod(int(value.total_seconds()), 86400)
    return f"{days}d" if not rest else str(value)
