"""Signed checkpoints of this process's chain, and its anchor in the HSM.

A checkpoint states "chain C had N events and its head was H at time T", signed by the audit
key inside the HSM. The checkpointer thread writes one when `checkpoint_events` events are
unsigned, and at least every `checkpoint_seconds` while any are; `AuditLog` asks for one at
every export and a closing one at clean shutdown. After storing a checkpoint it writes it to
the chain's anchor, a private data object on the HSM token that someone holding only the
database can neither change nor delete. A failed signature, store write or anchor write never
fails a call (the events themselves are durable): it is logged and tried again on the next tick.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Protocol

from keybroker_client import evidence

from broker.domain import format_time
from broker.ports import AuditStore, Clock, Hsm, Record
from broker.services.audit_writer import Head
from broker.services.signing import AUDIT_PURPOSE

log = logging.getLogger(__name__)

#: Label prefix of the anchors: `kb-audit-anchor:<chain>`.
ANCHOR_PREFIX = "kb-audit-anchor:"


class AuditSigner(Protocol):
    """Signs with the HSM audit key and publishes its public half (`SigningKeys`)."""

    def sign_jws(self, purpose: str, payload: bytes, headers: dict[str, str]) -> str: ...

    def jwks(self) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True)
class CheckpointPolicy:
    """When the checkpointer signs (settings `audit.checkpoint_events` and `_seconds`)."""

    events: int = 1000
    seconds: float = 2.0


def sign_record(signer: AuditSigner, record: Record) -> Record:
    """`record` with its `jws`: the audit key's signature over its canonical encoding."""
    payload = evidence.signing_input(record)
    jws = signer.sign_jws(AUDIT_PURPOSE, payload, {"typ": evidence.JWS_TYPE})
    return {**record, "jws": jws}


class Checkpointer:
    """Signs the head of one chain and keeps its newest signed record in the HSM.

    Args:
        store: the audit tables.
        signer: the audit key.
        anchors: the HSM holding the anchors (the audit key's); None keeps none (unit tests).
        clock: the time source of the records.
        chain: the chain id.
        policy: when to sign.
        head: the chain's last durable event (the writer's).
    """

    def __init__(
        self,
        store: AuditStore,
        signer: AuditSigner,
        anchors: Hsm | None,
        clock: Clock,
        chain: str,
        policy: CheckpointPolicy,
        head: Head | None = None,
    ) -> None:
        self.chain = chain
        self._store = store
        self._signer = signer
        self._anchors = anchors
        self._clock = clock
        self._policy = policy
        self._lock = threading.Lock()  # one checkpoint at a time; never held by a call's append
        self._wake = threading.Event()
        self._stopping = False
        self._closed = False
        self._durable = head or Head()
        self._signed = 0
        self._latest: Record | None = None  # the newest signed record, for the anchor
        self._anchored = True
        self._thread = threading.Thread(target=self._run, name="audit-checkpoints", daemon=True)

    @property
    def signed(self) -> int:
        """chain_sequence of the newest checkpoint stored."""
        return self._signed

    def open_chain(self, writer: str) -> None:
        """Signs and stores the chain record, and writes the first anchor.

        Raises:
            AuditUnavailable, HsmUnavailable: the chain cannot be opened (the broker does not
                start without its chain).
        """
        record = sign_record(
            self._signer,
            {"type": "chain", "chain": self.chain, "writer": writer, "time": self._now()},
        )
        self._store.add_chain(record)
        self._latest = record
        self._anchored = False
        self._write_anchor()

    def start(self) -> None:
        self._thread.start()

    def on_durable(self, head: Head) -> None:
        """The writer's news of a commit: wakes the thread once enough events are unsigned."""
        self._durable = head
        if head.chain_sequence - self._signed >= self._policy.events:
            self._wake.set()

    def checkpoint(self, closed: bool = False) -> bool:
        """Signs the durable head now if any event is unsigned (always when `closed`).

        Returns:
            True if a checkpoint was stored.

        Raises:
            AuditUnavailable, HsmUnavailable, ...: signing or storing failed.
        """
        with self._lock:
            head = self._durable
            if self._closed or (head.chain_sequence == self._signed and not closed):
                return False
            record = sign_record(
                self._signer,
                {
                    "type": "checkpoint",
                    "chain": self.chain,
                    "chain_sequence": head.chain_sequence,
                    "head": head.hash,
                    "time": self._now(),
                    "closed": closed,
                },
            )
            self._store.add_checkpoint(record)
            self._signed, self._latest, self._anchored = head.chain_sequence, record, False
            self._closed = closed
        self._write_anchor()
        return True

    def close(self, head: Head) -> None:
        """Stops the thread and writes the closing checkpoint at `head` (the writer's last).

        Never raises: a chain that cannot be closed keeps its unsigned tail, which
        `VerifyAuditLog` counts.
        """
        self._durable = head
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join()
        try:
            self.checkpoint(closed=True)
        except Exception:
            log.exception("the closing audit checkpoint could not be written")

    def _run(self) -> None:
        while not self._stopping:
            self._wake.wait(self._policy.seconds)
            self._wake.clear()
            if self._stopping:
                return
            try:
                if not self.checkpoint():
                    self._write_anchor()
            except Exception as exc:  # noqa: BLE001 - retried on the next tick
                log.warning("audit checkpoint failed; will retry: %s", exc)

    def _write_anchor(self) -> None:
        with self._lock:
            record, due = self._latest, not self._anchored
        if self._anchors is None or record is None or not due:
            return
        try:
            self._anchors.write_anchor(ANCHOR_PREFIX + self.chain, evidence.canonical(record))
        except Exception as exc:  # noqa: BLE001 - retried on the next tick
            log.warning("audit anchor write failed; will retry: %s", exc)
            return
        with self._lock:
            if self._latest is record:
                self._anchored = True

    def _now(self) -> str:
        return format_time(self._clock.now())
