"""Group commit of the audit trail: one writer thread per process appends its chain.

Callers hand their event to the writer and wait; the writer takes every event waiting at that
moment, links them into its chain (chain_sequence, prev_hash, hash), and commits them in one
transaction, so one fsync serves many calls. Each caller returns once its own batch is durable,
or gets `AuditUnavailable` when that batch could not be written (fail closed, as before). The
chain head advances only after a successful commit, so a failed batch leaves no gap.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from keybroker_client import evidence

from broker.domain import AuditEvent, event_record
from broker.errors import AuditUnavailable
from broker.ports import AuditStore

log = logging.getLogger(__name__)

#: Most events in one transaction: bounds the time a batch holds the database's write lock.
MAX_BATCH = 512
#: Longest a caller waits for its batch before it is refused (a hung database).
WAIT_SECONDS = 30.0

#: Called by the writer thread with each batch once durable (the secondary sinks). It must
#: not block; what it raises is logged and swallowed.
AfterCommit = Callable[[Sequence[AuditEvent]], None]


def link(event: AuditEvent, chain: str, chain_sequence: int, prev_hash: str) -> AuditEvent:
    """`event` placed in its chain, with its hash."""
    placed = replace(event, chain=chain, chain_sequence=chain_sequence, prev_hash=prev_hash)
    return replace(placed, hash=evidence.event_hash(event_record(placed)))


@dataclass(frozen=True, slots=True)
class Head:
    """Where a chain stands: its last durable event."""

    chain_sequence: int = 0
    hash: str = evidence.GENESIS_HASH


@dataclass(frozen=True, slots=True)
class WriterStats:
    """Counts since start (for tests and the bench: how well batching works)."""

    batches: int = 0
    events: int = 0
    failed_batches: int = 0
    largest_batch: int = 0


class _Pending:
    __slots__ = ("done", "error", "event", "result")

    def __init__(self, event: AuditEvent) -> None:
        self.event = event
        self.done = threading.Event()
        self.result: AuditEvent | None = None
        self.error: AuditUnavailable | None = None


class AuditWriter:
    """The one appender of this process's chain.

    Args:
        store: the audit tables.
        chain: this writer's chain id.
        after_commit: see `AfterCommit`.
        on_durable: called by the writer thread with the new head after each commit (the
            checkpointer); must not block.
        max_batch: most events per transaction.
    """

    def __init__(
        self,
        store: AuditStore,
        chain: str,
        *,
        after_commit: AfterCommit | None = None,
        on_durable: Callable[[Head], None] | None = None,
        max_batch: int = MAX_BATCH,
    ) -> None:
        self.chain = chain
        self._store = store
        self._after_commit = after_commit
        self._on_durable = on_durable
        self._max_batch = max_batch
        self._queue: deque[_Pending] = deque()
        self._cv = threading.Condition()
        self._head = Head()
        self._stats = WriterStats()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._thread.start()

    @property
    def head(self) -> Head:
        """The last durable event of the chain."""
        with self._cv:
            return self._head

    @property
    def stats(self) -> WriterStats:
        with self._cv:
            return self._stats

    def pending(self) -> int:
        """Events waiting for the next batch."""
        with self._cv:
            return len(self._queue)

    def append(self, event: AuditEvent) -> AuditEvent:
        """Appends `event` (its chain fields and hash are set here) and waits until durable.

        Returns:
            The event as stored: sequence, chain position and hash filled in.

        Raises:
            AuditUnavailable: it could not be made durable (nothing of its batch was written),
                or the writer is stopping.
        """
        return self.append_many([event])[0]

    def append_many(self, events: Sequence[AuditEvent]) -> list[AuditEvent]:
        """Appends `events` in order, handing them to the writer at once, and waits until all
        are durable (one batch call costs one commit, not one per event).

        Raises:
            AuditUnavailable: one of them could not be made durable, or the writer is stopping.
                Events of an earlier, successful commit stay in the trail.
        """
        pendings = [_Pending(event) for event in events]
        with self._cv:
            if self._closing:
                raise AuditUnavailable("the audit log is closing; the call was refused")
            self._queue.extend(pendings)
            self._cv.notify()
        for pending in pendings:
            if not pending.done.wait(WAIT_SECONDS):
                raise AuditUnavailable("the audit log did not answer in time; the call was refused")
            if pending.error is not None:
                raise pending.error
        return [p.result for p in pendings if p.result is not None]

    def close(self) -> None:
        """Refuses new events, writes those waiting, and stops the thread."""
        with self._cv:
            self._closing = True
            self._cv.notify()
        self._thread.join()

    def _take(self) -> list[_Pending] | None:
        with self._cv:
            while not self._queue and not self._closing:
                self._cv.wait()
            if not self._queue:
                return None
            count = min(len(self._queue), self._max_batch)
            return [self._queue.popleft() for _ in range(count)]

    def _run(self) -> None:
        while (batch := self._take()) is not None:
            self._commit(batch)

    def _commit(self, batch: list[_Pending]) -> None:
        head = self._head  # only this thread changes it
        events: list[AuditEvent] = []
        prev = head.hash
        for offset, pending in enumerate(batch, 1):
            event = link(pending.event, self.chain, head.chain_sequence + offset, prev)
            events.append(event)
            prev = event.hash
        try:
            sequences = self._store.append_batch(events)
            stored = [replace(e, sequence=s) for e, s in zip(events, sequences, strict=True)]
        except Exception as exc:
            error = (
                exc
                if isinstance(exc, AuditUnavailable)
                else AuditUnavailable(
                    "the audit log cannot be written; the call was refused (fail closed)"
                )
            )
            if not isinstance(exc, AuditUnavailable):
                log.error("audit batch failed", exc_info=True)
            with self._cv:
                s = self._stats
                self._stats = replace(s, failed_batches=s.failed_batches + 1)
            for pending in batch:
                pending.error = error
                pending.done.set()
            return
        new_head = Head(stored[-1].chain_sequence, stored[-1].hash)
        with self._cv:
            self._head = new_head
            s = self._stats
            self._stats = replace(
                s,
                batches=s.batches + 1,
                events=s.events + len(stored),
                largest_batch=max(s.largest_batch, len(stored)),
            )
        for pending, event in zip(batch, stored, strict=True):
            pending.result = event
            pending.done.set()
        self._notify(new_head, stored)

    def _notify(self, head: Head, stored: list[AuditEvent]) -> None:
        """Runs the hooks; neither may fail the trail, whose batch is already durable."""
        if self._on_durable is not None:
            try:
                self._on_durable(head)
            except Exception:
                log.exception("audit checkpoint hook failed")
        if self._after_commit is not None:
            try:
                self._after_commit(stored)
            except Exception:
                log.exception("audit after-commit hook failed")
