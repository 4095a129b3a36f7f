"""Secondary audit sinks: the bounded queue and its thread, drops, health and the loss log."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from broker.adapters.audit_sinks import QueuedSink, SinkFanout
from broker.domain import AuditEvent, Outcome

WAIT = 30  # seconds: a bound against a hang, never a measurement


def event(sequence: int, **changes: object) -> AuditEvent:
    fields: dict[str, object] = {
        "sequence": sequence,
        "time": datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=UTC),
        "principal": "producer",
        "operation": "GenerateDataKey",
        "key_id": "patients",
        "key_version": 1,
        "token_id": "",
        "context": {"dataset": "cohort-42"},
        "justification": "",
        "outcome": Outcome.ALLOWED,
        "reason": "",
        "request_id": f"req-{sequence}",
        "prev_hash": "0" * 64,
        "hash": f"{sequence:064x}",
        "chain": "kb-local-1",
        "chain_sequence": sequence,
    }
    fields.update(changes)
    return AuditEvent(**fields)  # type: ignore[arg-type]


class Recorder:
    """A writer that records, and that tests can hold up (`gate`) or make fail (`failures`)."""

    def __init__(self, failures: int = 0, open_failures: int = 0) -> None:
        self.written: list[int] = []
        self.failures = failures
        self.open_failures = open_failures
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.opened = self.closed = 0
        self._cond = threading.Condition()

    def open(self) -> None:
        if self.open_failures:
            self.open_failures -= 1
            raise ConnectionRefusedError(111, "Connection refused")
        self.opened += 1

    def write(self, ev: AuditEvent) -> None:
        self.entered.set()
        if not self.gate.wait(WAIT):
            raise TimeoutError("test gate never opened")
        if self.failures:
            self.failures -= 1
            raise OSError(28, "No space left on device")
        with self._cond:
            self.written.append(ev.sequence)
            self._cond.notify_all()

    def wait_written(self, count: int) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.written) >= count, WAIT), self.written

    def close(self) -> None:
        self.closed += 1
        self.gate.set()


class HealthLog:
    """Collects a sink's health changes; `wait_for` blocks until the given state is reported."""

    def __init__(self) -> None:
        self.states: list[bool] = []
        self._cond = threading.Condition()

    def __call__(self, healthy: bool) -> None:
        with self._cond:
            self.states.append(healthy)
            self._cond.notify_all()

    def wait_for(self, healthy: bool) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: self.states[-1] is healthy, WAIT), self.states


@pytest.fixture
def sinks() -> Iterator[list[QueuedSink]]:
    made: list[QueuedSink] = []
    yield made
    for sink in made:
        sink.close()


def test_events_are_delivered_in_order_and_close_flushes(sinks: list[QueuedSink]) -> None:
    writer = Recorder()
    sink = QueuedSink("siem", writer)
    sinks.append(sink)
    for n in range(1, 51, 10):
        sink.submit([event(s) for s in range(n, n + 10)])
    sink.close()
    assert writer.written == list(range(1, 51))
    stats = sink.stats()
    assert (stats.submitted, stats.delivered, stats.lost, stats.queued) == (50, 50, 0, 0)
    assert sink.healthy and writer.closed >= 1


def test_a_full_queue_drops_counts_and_turns_unhealthy_until_it_catches_up(
    sinks: list[QueuedSink],
) -> None:
    writer = Recorder()
    writer.gate.clear()
    sink = QueuedSink("slow", writer, capacity=4)
    sinks.append(sink)
    health = HealthLog()
    sink.watch(health)
    sink.submit([event(1)])
    assert writer.entered.wait(WAIT)  # the thread holds event 1 and is stuck writing it
    sink.submit([event(s) for s in range(2, 12)])  # 4 fit in the queue, 6 are dropped
    stats = sink.stats()
    assert (stats.submitted, stats.dropped, stats.queued) == (11, 6, 4)
    assert not sink.healthy and health.states == [True, False]
    writer.gate.set()
    writer.wait_written(5)
    health.wait_for(True)
    sink.close()
    assert writer.written == [1, 2, 3, 4, 5]
    stats = sink.stats()
    assert (stats.delivered, stats.dropped, stats.failed) == (5, 6, 0)
    assert stats.submitted == stats.delivered + stats.lost


def test_failed_writes_are_counted_and_the_sink_recovers(sinks: list[QueuedSink]) -> None:
    writer = Recorder(failures=3)
    writer.gate.clear()
    sink = QueuedSink("flaky", writer, retry_delay=0.0)
    sinks.append(sink)
    health = HealthLog()
    sink.watch(health)
    sink.submit([event(s) for s in range(1, 11)])
    writer.gate.set()
    writer.wait_written(7)
    health.wait_for(True)
    sink.close()
    stats = sink.stats()
    # Each failure costs the event being written and a fresh open before the next one.
    assert (stats.delivered, stats.failed, stats.dropped) == (7, 3, 0)
    assert writer.written == list(range(4, 11)) and writer.opened == 4
    assert False in health.states and health.states[-1] is True


def test_a_destination_that_cannot_be_opened_keeps_events_queued(
    sinks: list[QueuedSink],
) -> None:
    writer = Recorder(open_failures=2)
    sink = QueuedSink("down", writer, retry_delay=0.0)
    sinks.append(sink)
    health = HealthLog()
    sink.watch(health)
    sink.submit([event(1), event(2)])
    writer.wait_written(2)
    health.wait_for(True)
    sink.close()
    assert writer.written == [1, 2]
    assert sink.stats().lost == 0


def test_close_unblocks_a_hung_write_and_counts_what_is_left(sinks: list[QueuedSink]) -> None:
    writer = Recorder()
    writer.gate.clear()  # stays shut until close() closes the writer
    sink = QueuedSink("stuck", writer, capacity=8)
    sink.submit([event(s) for s in range(1, 6)])
    assert writer.entered.wait(WAIT)
    sink.close(timeout=0.05)
    stats = sink.stats()
    assert stats.submitted == stats.delivered + stats.lost == 5
    sink.submit([event(6)])  # after close: dropped, never queued
    assert sink.stats().dropped == stats.dropped + 1


def test_losses_are_logged_first_then_once_per_interval(
    sinks: list[QueuedSink], caplog: pytest.LogCaptureFixture
) -> None:
    now = [100.0]
    writer = Recorder()
    writer.gate.clear()
    sink = QueuedSink("siem", writer, capacity=1, log_interval=60.0, monotonic=lambda: now[0])
    sinks.append(sink)
    sink.submit([event(1)])
    assert writer.entered.wait(WAIT)
    sink.submit([event(2)])  # queued
    caplog.set_level(logging.WARNING, logger="broker.adapters.audit_sinks")
    sink.submit([event(3)])
    for s in range(4, 40):
        sink.submit([event(s)])
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "audit sink 'siem' is behind: 1 dropped (queue full); the audit trail itself is complete"
    ]
    now[0] += 60.0
    sink.submit([event(40)])
    assert caplog.records[-1].getMessage() == (
        "audit sink 'siem' is behind: 37 dropped (queue full); the audit trail itself is complete"
    )
    assert len(caplog.records) == 2
    writer.gate.set()


def test_the_fanout_survives_a_sink_that_raises(sinks: list[QueuedSink]) -> None:
    class Broken:
        name = "broken"

        def submit(self, events: object) -> None:
            raise RuntimeError("bug")

    writer = Recorder()
    good = QueuedSink("good", writer)
    sinks.append(good)
    fanout = SinkFanout([Broken(), good])  # type: ignore[list-item]
    fanout([event(1), event(2)])
    good.close()
    assert writer.written == [1, 2]
