"""Deferred audit waits: inside `deferring`, a call's appends are handed over without waiting
and counted; the owner learns when they are all done, and whether any failed."""

from __future__ import annotations

import threading

import pytest

from broker.errors import AuditUnavailable
from broker.services.audit_writer import AuditWaits, AuditWriter, current_waits, deferring
from tests.unit.test_audit_writer import MemoryStore, draft


def settled_event(waits: AuditWaits) -> threading.Event:
    """An event set once `waits` is settled (at once, or by the writer's callback)."""
    done = threading.Event()
    if waits.when_settled(done.set):
        done.set()
    return done


def test_submit_does_not_wait_and_reports_when_durable() -> None:
    store = MemoryStore()
    writer = AuditWriter(store, "c-1")
    store.hold.clear()
    waits = AuditWaits()
    writer.submit([draft(0), draft(1)], waits)  # returns while the store holds the batch
    assert store.entered.wait(10)
    assert waits.outstanding == 2
    done = settled_event(waits)
    assert not done.is_set()
    store.hold.set()
    assert done.wait(10)
    assert waits.outstanding == 0 and waits.error is None
    assert [e.request_id for batch in store.batches for e in batch] == ["r0", "r1"]
    writer.close()


def test_a_failed_batch_is_the_calls_error() -> None:
    store = MemoryStore()
    writer = AuditWriter(store, "c-1")
    store.fail = True
    waits = AuditWaits()
    writer.submit([draft(0)], waits)
    assert settled_event(waits).wait(10)
    assert isinstance(waits.error, AuditUnavailable)
    # The chain goes on without a gap once the store writes again.
    assert writer.append(draft(1)).chain_sequence == 1
    writer.close()


def test_a_closing_writer_refuses_at_once() -> None:
    writer = AuditWriter(MemoryStore(), "c-1")
    writer.close()
    waits = AuditWaits()
    with pytest.raises(AuditUnavailable):
        writer.submit([draft(0)], waits)
    assert waits.outstanding == 0


def test_deferring_is_scoped_to_its_block() -> None:
    assert current_waits() is None
    waits = AuditWaits()
    with deferring(waits):
        assert current_waits() is waits
        seen: list[AuditWaits | None] = []
        other = threading.Thread(target=lambda: seen.append(current_waits()))
        other.start()
        other.join()
        assert seen == [None]  # another thread (a sync caller) still waits as before
    assert current_waits() is None
