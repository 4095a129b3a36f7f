"""The group-commit writer: batches, fail-closed batches that leave no gap, the after-commit
hook (the secondary sinks' seam), and closing."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from datetime import UTC, datetime

import pytest
from keybroker_client import evidence

from broker.domain import AuditEvent, Outcome
from broker.errors import AuditUnavailable
from broker.services.audit_writer import AuditWriter, Head, event_record


class MemoryStore:
    """Just enough of `AuditStore` for the writer: batches kept in memory; `fail` makes the
    next batch fail, `hold` makes it wait."""

    def __init__(self) -> None:
        self.batches: list[list[AuditEvent]] = []
        self.fail = False
        self.hold = threading.Event()
        self.hold.set()
        self.entered = threading.Event()

    def append_batch(self, events: Sequence[AuditEvent]) -> list[int]:
        self.entered.set()
        self.hold.wait(10)
        if self.fail:
            self.fail = False
            raise AuditUnavailable("the audit log cannot be written")
        start = sum(len(b) for b in self.batches)
        self.batches.append(list(events))
        return list(range(start + 1, start + 1 + len(events)))


def draft(n: int) -> AuditEvent:
    return AuditEvent(0, datetime(2026, 1, 1, tzinfo=UTC), "p", "Decrypt", "k", 1, "", {}, "",
                      Outcome.ALLOWED, "", f"r{n}", "", "")  # fmt: skip


def test_events_are_linked_into_the_chain_and_batched() -> None:
    store, seen, heads = MemoryStore(), [], []
    writer = AuditWriter(store, "c-1", after_commit=seen.append, on_durable=heads.append)
    first = writer.append(draft(0))
    assert (first.sequence, first.chain, first.chain_sequence) == (1, "c-1", 1)
    assert first.prev_hash == evidence.GENESIS_HASH
    assert first.hash == evidence.event_hash(event_record(first))
    store.hold.clear()
    store.entered.clear()
    threads = [threading.Thread(target=writer.append, args=(draft(n),)) for n in range(1, 6)]
    threads[0].start()
    assert store.entered.wait(10)  # the first caller's batch is being written ...
    for t in threads[1:]:
        t.start()
    while writer.pending() < 4:
        threading.Event().wait(0.01)
    store.hold.set()  # ... and the four others wait together for the next one
    for t in threads:
        t.join()
    assert [len(b) for b in store.batches] == [1, 1, 4]
    assert writer.stats.largest_batch == 4 and writer.head.chain_sequence == 6
    assert [len(batch) for batch in seen] == [1, 1, 4]
    assert heads[-1] == Head(6, store.batches[-1][-1].hash)
    writer.close()


def test_a_failed_batch_refuses_every_caller_and_leaves_no_gap() -> None:
    store = MemoryStore()
    writer = AuditWriter(store, "c-1")
    writer.append(draft(0))
    head = writer.head
    store.fail = True
    with pytest.raises(AuditUnavailable):
        writer.append(draft(1))
    assert writer.head == head and writer.stats.failed_batches == 1
    after = writer.append(draft(2))
    assert after.chain_sequence == 2 and after.prev_hash == head.hash
    writer.close()


def test_a_failing_after_commit_hook_is_swallowed() -> None:
    def broken(_events: Sequence[AuditEvent]) -> None:
        raise RuntimeError("SIEM down")

    writer = AuditWriter(MemoryStore(), "c-1", after_commit=broken)
    assert writer.append(draft(0)).chain_sequence == 1
    assert writer.append(draft(1)).chain_sequence == 2
    writer.close()


def test_closing_writes_what_waits_and_refuses_the_rest() -> None:
    store = MemoryStore()
    writer = AuditWriter(store, "c-1")
    writer.append(draft(0))
    writer.close()
    with pytest.raises(AuditUnavailable, match="closing"):
        writer.append(draft(1))
    assert sum(len(b) for b in store.batches) == 1
