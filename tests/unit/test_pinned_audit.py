"""The audit log's own rules pinned: how a chain is named, opened, anchored, checkpointed and
closed; what an event keeps of a refused request; deferred appends; outcomes of failures."""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from socket import gethostname
from typing import Any

import pytest

from broker.adapters.sqlite_store import SqliteStore
from broker.domain import AuditEvent, AuditFilter, AuditOperation, Caller, Outcome
from broker.errors import (
    AuditUnavailable,
    DeadlineExceeded,
    FailedPrecondition,
    HsmUnavailable,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    StoreUnavailable,
)
from broker.services.audit import (
    AuditDraft,
    AuditLog,
    AuditSettings,
    failure_outcome,
    new_chain_id,
)
from broker.services.audit_checkpoints import CheckpointPolicy
from broker.services.audit_writer import AuditWaits, deferring
from broker.services.signing import AUDIT_PURPOSE, SigningKeys
from tests.fakes.hsm import FakeHsm
from tests.unit.test_services import CONSUMER, FixedClock


class Trail:
    """An audit log over a fake HSM and a throwaway SQLite store."""

    def __init__(self, tmp: Path, settings: AuditSettings | None = None, **kw: Any) -> None:
        self.hsm = FakeHsm()
        self.store = SqliteStore(tmp / "kb.db")
        self.clock = FixedClock()
        self.signing = SigningKeys(self.store, {"local": self.hsm})
        self.signing.ensure(AUDIT_PURPOSE, "local")
        self.checkpoints: list[dict[str, Any]] = []
        real_add = self.store.add_checkpoint

        def add_checkpoint(record: dict[str, Any]) -> None:
            self.checkpoints.append(record)
            real_add(record)

        self.store.add_checkpoint = add_checkpoint  # type: ignore[method-assign]
        self.log = AuditLog(
            self.store, self.clock, self.signing, anchors=self.hsm, settings=settings, **kw
        )

    def call(self, caller: Caller = CONSUMER, **kw: Any) -> None:
        with self.log.scope(caller, AuditOperation.GET_KEY, **kw):
            pass

    def events(self) -> list[AuditEvent]:
        return list(self.store.events(AuditFilter()))


@pytest.fixture
def trail(tmp_path: Path) -> Iterator[Trail]:
    t = Trail(tmp_path)
    yield t
    t.log.close()


def test_a_chain_is_named_after_the_broker_and_opened_with_its_writer(tmp_path: Path) -> None:
    t = Trail(tmp_path, AuditSettings(broker_id="b-1"))
    try:
        assert re.fullmatch(r"b-1-[0-9a-f]{12}", t.log.chain)
        t.call()
        lines = [json.loads(line) for line in t.log.export(0)]
        (chain,) = [r for r in lines if r["type"] == "chain"]
        assert chain["chain"] == t.log.chain
        assert chain["writer"] == f"b-1 pid {os.getpid()} on {gethostname()}"
        assert chain["time"] == "2026-11-30T12:00:00.000000Z"
        assert lines[-1]["type"] == "manifest" and lines[-1]["time"] == chain["time"]
    finally:
        t.log.close()
    assert re.fullmatch(r"x-[0-9a-f]{12}", new_chain_id("x"))
    assert new_chain_id("x") != new_chain_id("x")


def test_the_default_settings(trail: Trail) -> None:
    assert AuditSettings() == AuditSettings("keybroker-local", 1000, 2.0)
    assert trail.log.chain.startswith("keybroker-local-")


def test_the_checkpoint_policy_comes_from_the_settings(tmp_path: Path) -> None:
    t = Trail(tmp_path, AuditSettings(checkpoint_events=3, checkpoint_seconds=3600.0))
    try:
        assert t.log.checkpoints._policy == CheckpointPolicy(events=3, seconds=3600.0)
    finally:
        t.log.close()


def test_the_chain_is_anchored_in_the_hsm_when_opened(trail: Trail) -> None:
    (label,) = trail.hsm.anchors
    assert label.endswith(trail.log.chain)
    (anchor,) = trail.hsm.anchors[label]
    assert json.loads(anchor)["chain"] == trail.log.chain
    reads: list[str] = []
    real = trail.hsm.read_anchors

    def reading(prefix: str) -> dict[str, list[bytes]]:
        reads.append(prefix)
        return real(prefix)

    trail.hsm.read_anchors = reading  # type: ignore[method-assign]
    assert trail.log.verify().ok
    assert reads, "verification reads the HSM anchors"


def test_a_checkpoint_covers_every_durable_event(trail: Trail) -> None:
    trail.call()
    trail.call()
    # The writer told the checkpointer of the head before the calls returned.
    assert trail.log.checkpoints.checkpoint()
    assert trail.log.checkpoints.signed == 2
    assert trail.checkpoints[-1]["chain_sequence"] == 2


def test_closing_writes_the_closing_checkpoint_at_the_head(tmp_path: Path) -> None:
    seen: list[list[AuditEvent]] = []
    t = Trail(tmp_path, after_commit=seen.append)
    t.call()
    t.call()
    t.log.close()
    last = t.checkpoints[-1]
    assert (last["chain_sequence"], last["closed"]) == (2, True)
    assert last["head"] == t.events()[-1].hash
    # The secondary sinks were handed both events, as stored.
    assert [e.sequence for batch in seen for e in batch] == [1, 2]


def test_deferred_appends_are_counted_not_waited_for(trail: Trail) -> None:
    gate = threading.Event()
    real = trail.store.append_batch

    def slow_append(events: Sequence[AuditEvent]) -> list[int]:
        gate.wait(10)
        return real(events)

    trail.store.append_batch = slow_append  # type: ignore[method-assign]
    waits = AuditWaits()
    with deferring(waits):
        trail.call()
    assert waits.outstanding == 1  # the call returned before its event was durable
    settled = threading.Event()
    gate.set()
    if not waits.when_settled(settled.set):
        assert settled.wait(10)
    assert waits.error is None
    assert [e.operation for e in trail.events()] == ["GetKey"]


def test_deferred_record_many_is_counted(trail: Trail) -> None:
    gate = threading.Event()
    real = trail.store.append_batch

    def slow_append(events: Sequence[AuditEvent]) -> list[int]:
        gate.wait(10)
        return real(events)

    trail.store.append_batch = slow_append  # type: ignore[method-assign]
    drafts = [AuditDraft(CONSUMER, AuditOperation.DECRYPT, key_id=k) for k in ("a", "b")]
    waits = AuditWaits()
    with deferring(waits):
        trail.log.record_many([(d, Outcome.ALLOWED, "") for d in drafts])
    assert waits.outstanding == 2
    gate.set()
    settled = threading.Event()
    if not waits.when_settled(settled.set):
        assert settled.wait(10)
    assert [e.key_id for e in trail.events()] == ["a", "b"]


def test_record_and_record_many_wait_until_durable(trail: Trail) -> None:
    draft = AuditDraft(CONSUMER, AuditOperation.DECRYPT, key_id="k", key_version=3)
    stored = trail.log.record(draft, Outcome.DENIED, "no")
    assert (stored.sequence, stored.key_version, stored.outcome, stored.reason) == (
        1,
        3,
        Outcome.DENIED,
        "no",
    )
    trail.log.record_many(
        [
            (draft, Outcome.ALLOWED, ""),
            (AuditDraft(CONSUMER, AuditOperation.ENCRYPT), Outcome.ERROR, "x"),
        ]
    )
    assert [(e.operation, e.outcome) for e in trail.events()] == [
        ("Decrypt", Outcome.DENIED),
        ("Decrypt", Outcome.ALLOWED),
        ("Encrypt", Outcome.ERROR),
    ]
    assert trail.log.events(AuditFilter(after_sequence=2)).__next__().operation == "Encrypt"


def test_an_event_keeps_bounded_storable_text(trail: Trail) -> None:
    nul = Caller("con\x00sumer", "C" * 43, "req\x00id")
    draft = AuditDraft(
        nul,
        AuditOperation.DECRYPT,
        key_id="k" * 65,
        token_id="t\x00" * 40,
        justification="j" * 1025,
    )
    stored = trail.log.record(draft, Outcome.DENIED, "r\x00" * 300)
    assert stored.principal == "con\ufffdsumer" and stored.request_id == "req\ufffdid"
    assert stored.key_id == "k" * 64
    assert stored.token_id == "t\ufffd" * 32
    assert stored.justification == "j" * 1024
    assert stored.reason == "r\ufffd" * 256
    assert (stored.time, stored.chain, stored.chain_sequence) == (
        trail.clock.now(),
        trail.log.chain,
        1,
    )


def test_an_event_keeps_the_context_only_when_it_is_valid(trail: Trail) -> None:
    # Refused before the service looked at the context: it is checked for the record.
    for context in ({"d": "x"}, {"": "x"}):
        scope = trail.log.scope(CONSUMER, AuditOperation.DECRYPT, context=context)
        with pytest.raises(PermissionDenied), scope:
            raise PermissionDenied("no")
    with trail.log.scope(CONSUMER, AuditOperation.DECRYPT, context={"d": "y"}) as draft:
        assert draft.validated_context() == {"d": "y"}
    assert [dict(e.context) for e in trail.events()] == [{"d": "x"}, {}, {"d": "y"}]


def test_a_draft_validates_its_context_once_and_remembers_a_refusal() -> None:
    draft = AuditDraft(CONSUMER, AuditOperation.DECRYPT, context={"": "x"})
    with pytest.raises(InvalidArgument):
        draft.validated_context()
    assert draft.recorded_context() == {}
    ok = AuditDraft(CONSUMER, AuditOperation.DECRYPT, context={"d": "x"})
    assert ok.recorded_context() == {"d": "x"}
    assert ok.validated_context() is ok.validated_context()


@pytest.mark.parametrize(
    ("error", "outcome"),
    [
        (HsmUnavailable("x"), Outcome.ERROR),
        (AuditUnavailable("x"), Outcome.ERROR),
        (StoreUnavailable("x"), Outcome.ERROR),
        (DeadlineExceeded("x"), Outcome.ERROR),
        (PermissionDenied("x"), Outcome.DENIED),
        (NotFound("x"), Outcome.DENIED),
        (FailedPrecondition("x"), Outcome.DENIED),
    ],
)
def test_failure_outcomes(error: Exception, outcome: Outcome) -> None:
    assert failure_outcome(error) is outcome  # type: ignore[arg-type]


def test_an_unexpected_exception_is_an_error_without_its_text(trail: Trail) -> None:
    with pytest.raises(ZeroDivisionError), trail.log.scope(CONSUMER, AuditOperation.GET_KEY):
        raise ZeroDivisionError("secret detail")
    (event,) = trail.events()
    assert (event.outcome, event.reason) == (Outcome.ERROR, "internal error")


def test_an_unauthenticated_caller_is_refused_before_the_block(trail: Trail) -> None:
    ran = []
    scope = trail.log.scope(Caller("", "", "r0"), AuditOperation.GET_KEY)
    with pytest.raises(Exception, match="no client certificate"), scope:
        ran.append(True)
    assert ran == []
    assert [(e.principal, e.outcome) for e in trail.events()] == [("", Outcome.DENIED)]
