"""Secondary audit sinks: copies of the audit trail for a SIEM, which never hold a call up.

The durable store is the audit trail: its failure fails the call (fail closed). A secondary
sink only receives events already durable there, and is best effort: each sink has a bounded
queue and its own thread, so a slow or broken destination costs nothing on the request path.
When the queue is full the event is dropped for that sink and counted; when a write fails the
event is counted as failed and the sink waits (with a growing delay) before it tries again on a
fresh connection or file. The first loss is logged at once, then at most one line per interval
with the counts since the previous line. The sink's health (`healthy`, and `watch` callbacks
on every change) is false while its writes fail or while it has dropped events it has not yet
caught up with, and true again once a write succeeds with nothing left in its queue.

An event lost by a sink is never lost from the trail: its sequence number leaves a visible gap
in the SIEM's copy, and `ListAuditEvents` (or an export) fills it.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from broker.adapters.sink_writers import JsonLinesFile, JsonLinesStream, SyslogWriter
from broker.domain import AuditEvent
from broker.ports import AuditSink
from broker.sink_settings import AuditSinkConfig

log = logging.getLogger(__name__)


class Writer(Protocol):
    """Delivers events to one destination; called from the sink's own thread only."""

    def open(self) -> None:
        """Opens the file or connection; raises OSError when it cannot."""

    def write(self, event: AuditEvent) -> None:
        """Encodes and sends one event; raises OSError (or ValueError) when it fails."""

    def close(self) -> None:
        """Closes the file or connection; never raises. Called from the sink's thread, or,
        to unblock a write that hangs when the broker stops, from the stopping thread."""


@dataclass(frozen=True, slots=True)
class SinkStats:
    """What became of the events given to one sink.

    After `close()`, `submitted == delivered + lost`.

    Attributes:
        submitted: events handed to the sink.
        delivered: events written.
        dropped: events dropped because the queue was full, or still queued at close.
        failed: events whose write failed.
        queued: events waiting in the queue now.
    """

    submitted: int
    delivered: int
    dropped: int
    failed: int
    queued: int

    @property
    def lost(self) -> int:
        """Events this sink will never deliver."""
        return self.dropped + self.failed


class QueuedSink(AuditSink):
    """A bounded queue and a thread in front of a `Writer`.

    Args:
        name: the sink's name in logs and in its health service name.
        writer: the destination.
        capacity: events the queue holds; beyond it, events are dropped.
        log_interval: seconds between two log lines about losses (the first is immediate).
        retry_delay: seconds to wait after a failure before the next attempt; doubles after
            each further failure, up to `retry_max`.
        retry_max: the longest wait between attempts.
        monotonic: the clock of the log interval (tests inject one).
    """

    def __init__(
        self,
        name: str,
        writer: Writer,
        capacity: int = 10_000,
        log_interval: float = 60.0,
        retry_delay: float = 0.5,
        retry_max: float = 30.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if capacity < 1:
            raise ValueError("a sink's queue holds at least one event")
        self.name = name
        self._writer = writer
        self._capacity = capacity
        self._retry_delay = retry_delay
        self._retry_max = retry_max
        self._items: deque[AuditEvent] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._stopped = threading.Event()  # wakes the thread from a retry wait at close
        self._submitted = self._delivered = self._dropped = self._failed = 0
        self._failing = False
        self._behind = False  # dropped events since the queue last drained
        self._report = _LossReport(name, log_interval, monotonic)
        self._watchers: list[Callable[[bool], None]] = []
        self._published = True
        self._publish_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"audit-sink-{name}", daemon=True)
        self._thread.start()

    @property
    def healthy(self) -> bool:
        with self._cond:
            return not (self._failing or self._behind)

    def watch(self, callback: Callable[[bool], None]) -> None:
        """Calls `callback(healthy)` now and on every change of health (from any thread)."""
        with self._publish_lock:
            self._watchers.append(callback)
            callback(self._published)

    def stats(self) -> SinkStats:
        with self._cond:
            return SinkStats(
                self._submitted, self._delivered, self._dropped, self._failed, len(self._items)
            )

    def submit(self, events: Sequence[AuditEvent]) -> None:
        """Queues durable events; never blocks on the destination and never raises."""
        dropped = 0
        with self._cond:
            self._submitted += len(events)
            room = 0 if self._closing else self._capacity - len(self._items)
            self._items.extend(events[:room])
            dropped = len(events) - min(room, len(events))
            if dropped:
                self._dropped += dropped
                self._behind = True
            self._cond.notify()
        if dropped:
            self._report.dropped(dropped)
            self._publish()

    def close(self, timeout: float = 2.0) -> None:
        """Writes what is queued (for at most `timeout` seconds, and not while the sink is
        failing), then stops the thread; events left behind count as dropped."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._stopped.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            # A write hangs (a peer that stopped reading): closing the socket or file ends it.
            self._writer.close()
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("audit sink %r did not stop; abandoning its thread", self.name)
        with self._cond:
            left = len(self._items)
            self._items.clear()
            self._dropped += left
        self._writer.close()
        self._report.flush()

    def _run(self) -> None:
        delay = self._retry_delay
        opened = False
        while True:
            if not opened:
                try:
                    self._writer.open()
                    opened = True
                except Exception as exc:  # noqa: BLE001 - any failure is the sink's problem
                    self._fail(exc, events=0)
                    if self._wait(delay):
                        return
                    delay = min(delay * 2, self._retry_max)
                    continue
            with self._cond:
                while not self._items and not self._closing:
                    self._cond.wait()
                if not self._items:
                    return
                event = self._items.popleft()
            try:
                self._writer.write(event)
            except Exception as exc:  # noqa: BLE001
                self._writer.close()
                opened = False
                self._fail(exc, events=1)
                if self._wait(delay):
                    return
                delay = min(delay * 2, self._retry_max)
                continue
            delay = self._retry_delay
            self._succeed()

    def _wait(self, delay: float) -> bool:
        """Waits before the next attempt; True when the sink is closing (stop trying)."""
        return self._stopped.wait(delay) or self._closing

    def _fail(self, exc: Exception, events: int) -> None:
        with self._cond:
            self._failed += events
            self._failing = True
        self._report.failed(events, exc)
        self._publish()

    def _succeed(self) -> None:
        with self._cond:
            self._delivered += 1
            recovered = self._failing
            self._failing = False
            if not self._items:
                self._behind = False
        if recovered:
            log.info("audit sink %r writes again", self.name)
        self._publish()

    def _publish(self) -> None:
        """Tells the watchers the current health if it changed; the lock keeps the calls in
        the order of the changes, whichever threads make them."""
        with self._publish_lock:
            healthy = self.healthy
            if healthy == self._published:
                return
            self._published = healthy
            for callback in self._watchers:
                callback(healthy)


class _LossReport:
    """Rate-limited warnings about lost events: the first at once, then one per interval."""

    def __init__(self, name: str, interval: float, monotonic: Callable[[], float]) -> None:
        self._name = name
        self._interval = interval
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._last: float | None = None
        self._dropped = self._failed = 0
        self._error = ""

    def dropped(self, count: int) -> None:
        with self._lock:
            self._dropped += count
        self._maybe_log()

    def failed(self, count: int, exc: Exception) -> None:
        with self._lock:
            self._failed += count
            self._error = f"{type(exc).__name__}: {exc}"
        self._maybe_log()

    def flush(self) -> None:
        """Logs what is pending whatever the interval (at close)."""
        self._maybe_log(force=True)

    def _maybe_log(self, force: bool = False) -> None:
        with self._lock:
            now = self._monotonic()
            due = self._last is None or now - self._last >= self._interval
            if not (self._dropped or self._failed or self._error) or not (due or force):
                return
            self._last = now
            dropped, failed, error = self._dropped, self._failed, self._error
            self._dropped = self._failed = 0
            self._error = ""
        lost = [f"{failed} events not written"] if failed else []
        if dropped:
            lost.append(f"{dropped} dropped (queue full)")
        log.warning(
            "audit sink %r %s%s; the audit trail itself is complete",
            self._name,
            f"is failing ({error})" if error else "is behind",
            f": {', '.join(lost)}" if lost else "",
        )


class SinkFanout:
    """Hands each batch of durable events to every sink (the audit writer's after-commit hook).

    Args:
        sinks: the secondary sinks.
    """

    def __init__(self, sinks: Sequence[AuditSink]) -> None:
        self.sinks = tuple(sinks)

    def __call__(self, events: Sequence[AuditEvent]) -> None:
        for sink in self.sinks:
            try:
                sink.submit(events)
            except Exception:  # a sink must never fail the audit writer
                log.exception("audit sink %r refused a batch", sink.name)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def open_sinks(configs: Sequence[AuditSinkConfig]) -> SinkFanout:
    """The configured sinks, each with its thread started (connections open in the thread,
    so a SIEM that is down does not stop the broker from starting)."""
    sinks: list[AuditSink] = []
    for cfg in configs:
        writer: Writer
        if cfg.kind == "jsonl":
            assert cfg.path is not None
            writer = JsonLinesFile(cfg.path)
        elif cfg.kind == "stdout":
            writer = JsonLinesStream(sys.stdout.buffer)
        else:
            writer = SyslogWriter(cfg.address, cfg.facility, cfg.app_name)
        sinks.append(QueuedSink(cfg.sink_name, writer, capacity=cfg.queue_size))
    return SinkFanout(sinks)
