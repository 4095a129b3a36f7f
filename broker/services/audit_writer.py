"""Group commit of the audit trail: one writer thread per process appends its chain.

Callers hand their event to the writer and wait; the writer takes every event waiting at that
moment, links them into its chain (chain_sequence, prev_hash, hash), and commits them in one
transaction, so one fsync serves many calls. Each caller returns once its own batch is durable,
or gets `AuditUnavailable` when that batch could not be written (fail closed, as before). The
chain head advances only after a successful commit, so a failed batch leaves no gap.

A caller on an event loop must not block on that wait. It opens `deferring(waits)` around the
call instead: the call's appends are then handed to the writer without waiting and counted in
`waits`, and the caller waits for them itself (`AuditWaits.when_settled`) before anything of
the call leaves. Outside such a block nothing changes.
"""

from __future__ import annotations

import contextvars
import logging
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace

from keybroker_client import evidence

from broker.domain import (
    AuditEvent,
    chained_event,
    event_record,  # noqa: F401 - re-exported: the record `link` hashes
    stored_event,
)
from broker.errors import AuditUnavailable
from broker.ports import AuditStore

log = logging.getLogger(__name__)

#: Most events in one transaction: bounds the time a batch holds the database's write lock.
MAX_BATCH = 512
#: Longest a caller waits for its batch before it is refused (a hung database).
WAIT_SECONDS = 30.0
#: What a caller is told when its batch did not become durable within WAIT_SECONDS.
TIMED_OUT = "the audit log did not answer in time; the call was refused"

#: Called by the writer thread with each batch once durable (the secondary sinks). It must
#: not block; what it raises is logged and swallowed.
AfterCommit = Callable[[Sequence[AuditEvent]], None]


def link(event: AuditEvent, chain: str, chain_sequence: int, prev_hash: str) -> AuditEvent:
    """`event` placed in its chain, with its hash (`evidence.event_hash` of its record)."""
    return chained_event(event, chain, chain_sequence, prev_hash)


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


class AuditWaits:
    """The audit appends of one call that were handed to the writer without waiting.

    The writer thread reports each of them done; once the call has made all its appends, its
    owner asks `when_settled` and learns, at once or through the callback, that none is
    outstanding any more; `error` then says whether all of them are durable. Thread-safe.
    """

    __slots__ = ("_callback", "_error", "_lock", "_outstanding")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._outstanding = 0
        self._error: AuditUnavailable | None = None
        self._callback: Callable[[], None] | None = None

    @property
    def error(self) -> AuditUnavailable | None:
        """Why an append failed (the call must then fail closed), or None."""
        with self._lock:
            return self._error

    @property
    def outstanding(self) -> int:
        """Appends handed over and not yet reported done."""
        with self._lock:
            return self._outstanding

    def when_settled(self, callback: Callable[[], None]) -> bool:
        """True when nothing is outstanding now; otherwise `callback()` is called once, from
        the writer thread, when the last outstanding append is done (and False returned).
        The callback must not block."""
        with self._lock:
            if self._outstanding == 0:
                return True
            self._callback = callback
            return False

    def _add(self, count: int) -> None:
        with self._lock:
            self._outstanding += count

    def _finish(self, error: AuditUnavailable | None) -> None:
        with self._lock:
            self._outstanding -= 1
            if error is not None and self._error is None:
                self._error = error
            callback = self._callback if self._outstanding == 0 else None
            if callback is not None:
                self._callback = None
        if callback is not None:
            try:
                callback()
            except Exception:
                log.exception("audit wait callback failed")


_waits: contextvars.ContextVar[AuditWaits | None] = contextvars.ContextVar(
    "keybroker_audit_waits", default=None
)


@contextmanager
def deferring(waits: AuditWaits) -> Iterator[AuditWaits]:
    """Within the block (in this context), the audit appends of a call do not wait: they are
    counted in `waits`, whose owner must wait for them before anything of the call leaves and
    fail the call when `waits.error` is set."""
    token = _waits.set(waits)
    try:
        yield waits
    finally:
        _waits.reset(token)


def current_waits() -> AuditWaits | None:
    """The `AuditWaits` of the enclosing `deferring` block, or None (appends then wait)."""
    return _waits.get()


class _Pending:
    __slots__ = ("done", "error", "event", "result", "waits")

    def __init__(self, event: AuditEvent, waits: AuditWaits | None = None) -> None:
        self.event = event
        # A waiting caller blocks on `done`; a deferred one is told through `waits`.
        self.done = threading.Event() if waits is None else None
        self.waits = waits
        self.result: AuditEvent | None = None
        self.error: AuditUnavailable | None = None

    def finish(self) -> None:
        if self.waits is not None:
            self.waits._finish(self.error)
        else:
            assert self.done is not None
            self.done.set()


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
        self._enqueue(pendings)
        for pending in pendings:
            assert pending.done is not None
            if not pending.done.wait(WAIT_SECONDS):
                raise AuditUnavailable(TIMED_OUT)
            if pending.error is not None:
                raise pending.error
        return [p.result for p in pendings if p.result is not None]

    def submit(self, events: Sequence[AuditEvent], waits: AuditWaits) -> None:
        """Hands `events` to the writer in order without waiting; each is reported to `waits`
        once durable or failed (see `AuditWaits`).

        Raises:
            AuditUnavailable: the writer is stopping (nothing was handed over).
        """
        pendings = [_Pending(event, waits) for event in events]
        self._enqueue(pendings, waits)

    def _enqueue(self, pendings: list[_Pending], waits: AuditWaits | None = None) -> None:
        with self._cv:
            if self._closing:
                raise AuditUnavailable("the audit log is closing; the call was refused")
            if waits is not None:
                waits._add(len(pendings))  # before the writer can report any of them
            self._queue.extend(pendings)
            self._cv.notify()

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
            stored = [stored_event(e, s) for e, s in zip(events, sequences, strict=True)]
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
                pending.finish()
            return
        new_head = Head(stored[-1].chain_sequence, stored[-1].hash)
        with self._cv:
            self._head = new_head
            s = self._stats  # built directly: `replace` costs more than the rest of this
            self._stats = WriterStats(
                s.batches + 1, s.events + len(stored), s.failed_batches,
                max(s.largest_batch, len(stored)),
            )  # fmt: skip
        # The checkpointer learns of the head before any caller goes on, so a checkpoint
        # asked for after a call covers that call's event.
        self._durable(new_head)
        for pending, event in zip(batch, stored, strict=True):
            pending.result = event
            pending.finish()
        self._notify(stored)

    def _durable(self, head: Head) -> None:
        """Runs the checkpoint hook; it may not fail the trail, whose batch is durable."""
        if self._on_durable is not None:
            try:
                self._on_durable(head)
            except Exception:
                log.exception("audit checkpoint hook failed")

    def _notify(self, stored: list[AuditEvent]) -> None:
        """Runs the after-commit hook; it may not fail the trail, whose batch is durable."""
        if self._after_commit is not None:
            try:
                self._after_commit(stored)
            except Exception:
                log.exception("audit after-commit hook failed")
