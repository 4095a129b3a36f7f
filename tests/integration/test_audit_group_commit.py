"""Group commit and the HSM side of the trail, over gRPC against real SoftHSM2: concurrent
calls share transactions and each still gets its durable event; the anchors are private
token objects; an HSM that fails while signing checkpoints never fails a call."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from pathlib import Path

import PyKCS11
from keybroker.v1 import audit_pb2
from keybroker_client import evidence

from broker.domain import AuditEvent, AuditFilter
from broker.ports import AuditSnapshot, Record
from hsm_sim.faults import FailOnCall
from tests.broker_fixtures import Broker, start_broker
from tests.hsm_fixtures import find_one, raw_session, read_attrs
from tests.integration.audit_helpers import chain_of, checkpoint, fill, own_trail, verify
from tests.integration.flows import create_key, datakey, events_for, rid
from tests.store_fixtures import open_store


def wait_until(condition: Callable[[], bool], what: str, limit: float = 30.0) -> None:
    """Polls `condition` (no timing is asserted: the limit only ends a hung test)."""
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.02)


class GatedStore:
    """The real audit tables; while `armed`, the next batch waits for `release` (as a slow
    fsync would), so that the calls arriving meanwhile queue up for one batch."""

    def __init__(self, path: Path) -> None:
        self.inner = open_store(path)
        self.armed = False
        self.entered = threading.Event()
        self.release = threading.Event()
        self.held = 0  # events in the batch made to wait

    def append_batch(self, events: Sequence[AuditEvent]) -> list[int]:
        if self.armed:
            self.armed = False
            self.held = len(events)
            self.entered.set()
            self.release.wait(30)
        return self.inner.append_batch(events)

    def add_chain(self, record: Record) -> None:
        self.inner.add_chain(record)

    def add_checkpoint(self, record: Record) -> None:
        self.inner.add_checkpoint(record)

    def events(self, flt: AuditFilter) -> Iterator[AuditEvent]:
        return self.inner.events(flt)

    def snapshot(self) -> AbstractContextManager[AuditSnapshot]:
        return self.inner.snapshot()


def test_concurrent_calls_share_batches_and_each_gets_its_event(
    hsm_home: Path, tmp_path: Path
) -> None:
    store = GatedStore(tmp_path / "audit.db")
    b = start_broker(hsm_home, audit_store=store, database=tmp_path / "meta.db")
    try:
        key_id = create_key(b)
        assert b.app.audit is not None
        writer = b.app.audit.writer
        ids = [rid() for _ in range(8)]  # the server runs 8 handler threads
        store.armed = True
        with ThreadPoolExecutor(8) as pool:
            calls = [
                pool.submit(
                    lambda i: b.crypto("producer").GenerateDataKey(
                        __import__(
                            "keybroker.v1.crypto_pb2", fromlist=["x"]
                        ).GenerateDataKeyRequest(key_id=key_id, context={"dataset": "cohort-42"}),
                        metadata=(("x-request-id", i),),
                    ),
                    i,
                )
                for i in ids
            ]
            store.entered.wait(30)  # the first batch is in its transaction ...
            wait_until(lambda: store.held + writer.pending() == 8, "every call handed over")
            store.release.set()  # ... and the calls that came meanwhile go in one batch after it
            results = [c.result(timeout=30) for c in calls]
        assert all(len(r.plaintext_key) == 32 for r in results)
        stats = writer.stats
        assert stats.largest_batch == max(store.held, 8 - store.held) >= 4
        assert stats.failed_batches == 0
        assert stats.batches < stats.events
        for i in ids:
            (event,) = events_for(b, i)
            assert event.operation == "GenerateDataKey" and event.chain == chain_of(b)
        report = verify(b)
        # The key, the 8 calls and the 8 listings of events_for.
        assert report.ok and report.events_checked == 17, report.error
    finally:
        b.close()
        store.inner.close()


def test_many_concurrent_calls_all_land_in_one_verifying_chain(
    hsm_home: Path, tmp_path: Path
) -> None:
    b = own_trail(hsm_home, tmp_path / "keybroker.db", audit_checkpoint_events=16)
    try:
        key_id = create_key(b)
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda _: datakey(b, key_id), range(96)))
        listed = list(b.audit().ListAuditEvents(audit_pb2.ListAuditEventsRequest()))
        # The key, 96 calls and the listing itself (audited before it streams).
        assert [r.event.chain_sequence for r in listed] == list(range(1, 99))
        wait_until(lambda: verify(b).unsigned_events < 16, "a checkpoint every 16 events")
        report = verify(b)
        assert report.ok and report.checkpoints_checked >= 1, report
    finally:
        b.close()


def test_anchors_are_private_token_objects_holding_the_newest_checkpoint(
    hsm_home: Path, tmp_path: Path, softhsm
) -> None:  # type: ignore[no-untyped-def]
    b = own_trail(hsm_home, tmp_path / "keybroker.db")
    try:
        fill(b, 2)
        checkpoint(b)
        fill(b, 2)
        newest = checkpoint(b)
        label = f"kb-audit-anchor:{chain_of(b)}"
        library, token = softhsm
        with raw_session(library, token) as session:
            handle = find_one(session, label, PyKCS11.CKO_DATA)
            attrs = read_attrs(
                session,
                handle,
                [
                    PyKCS11.CKA_TOKEN,
                    PyKCS11.CKA_PRIVATE,
                    PyKCS11.CKA_APPLICATION,
                    PyKCS11.CKA_VALUE,
                ],
            )
        assert attrs[PyKCS11.CKA_TOKEN] is True and attrs[PyKCS11.CKA_PRIVATE] is True
        assert attrs[PyKCS11.CKA_APPLICATION] == "keybroker-audit"
        record = bytes(attrs[PyKCS11.CKA_VALUE])  # type: ignore[call-overload]
        anchored = json.loads(record)
        assert anchored["type"] == "checkpoint" and anchored["chain_sequence"] == newest
        assert record == evidence.canonical(anchored)
    finally:
        b.close()


def anchored(b: Broker) -> int:
    """chain_sequence of the checkpoint in the broker's HSM anchor (0 for the chain record).
    While the anchor is being replaced, the old and the new object are both there."""
    label = f"kb-audit-anchor:{chain_of(b)}"
    values = b.app.hsms["local"].read_anchors(label)[label]
    return max(int(json.loads(v).get("chain_sequence", 0)) for v in values)


def test_a_failing_hsm_never_fails_a_call_and_checkpoints_catch_up(
    hsm_home: Path, tmp_path: Path
) -> None:
    b = own_trail(hsm_home, tmp_path / "keybroker.db", audit_checkpoint_seconds=0.05)
    assert b.app.audit is not None
    checkpoints = b.app.audit.checkpoints
    hsm = b.app.hsms["local"]
    try:
        key_id = create_key(b)
        for name in ("sign", "createObject"):
            fault = FailOnCall(1, PyKCS11.CKR_DEVICE_ERROR, frozenset({name}), times=10**6)
            hsm.gate.fault = fault  # type: ignore[attr-defined]
            before = checkpoints.signed
            for _ in range(3):
                assert len(datakey(b, key_id).plaintext_key) == 32
            wait_until(lambda f=fault: f.failed >= 2, f"{name} failing, retried")
            hsm.gate.fault = None  # type: ignore[attr-defined]
            position = b.app.audit.writer.head.chain_sequence
            wait_until(lambda p=position: checkpoints.signed >= p, "a checkpoint after recovery")
            assert checkpoints.signed > before
            wait_until(lambda: anchored(b) == checkpoints.signed, "the anchor catching up")
        report = verify(b)
        assert report.ok, report.error
    finally:
        hsm.gate.fault = None  # type: ignore[attr-defined]
        b.close()
