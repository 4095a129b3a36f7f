"""The key scheduler's failure paths with a fake HSM: a destruction that fails is audited,
stays uncancellable and is finished by a later pass; a scheduled rotation that loses to a
manual one leaves no orphan HSM object and no lease behind."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from keybroker_client import evidence

from broker.adapters.codec import key_from_json, key_to_json
from broker.adapters.sqlite_store import SqliteStore
from broker.domain import (
    AuditFilter,
    Caller,
    KeyPolicy,
    KeyState,
    Lease,
    LeaseTask,
    Outcome,
    Role,
)
from broker.errors import FailedPrecondition, HsmUnavailable
from broker.services.access import Access, RateLimiter
from broker.services.audit import AuditLog
from broker.services.keys import KeyService
from broker.services.scheduler import SCHEDULER_PRINCIPAL, KeyScheduler
from broker.services.signing import AUDIT_PURPOSE, SigningKeys
from tests.fakes.hsm import FakeHsm

ADMIN = Caller("admin", "A" * 43, "r1")
WINDOW = timedelta(days=7)


class Clock:
    def __init__(self) -> None:
        self.t = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)

    def now(self) -> datetime:
        return self.t


class World:
    def __init__(self, tmp: Path) -> None:
        self.hsm = FakeHsm()
        self.store = SqliteStore(tmp / "kb.db")
        self.clock = Clock()
        access = Access({"admin": frozenset({Role.ADMIN})}, {"local": self.hsm})
        self.signing = SigningKeys(self.store, {"local": self.hsm})
        self.signing.ensure(AUDIT_PURPOSE, "local")
        self.audit = AuditLog(self.store, self.clock, self.signing, anchors=self.hsm)
        self.keys = KeyService(
            self.store, access, self.audit, self.clock, "local", RateLimiter(0, 1)
        )
        self.scheduler = KeyScheduler(
            self.store,
            {"local": self.hsm},
            access,
            self.audit,
            self.clock,
            self.signing,
            issuer="urn:keybroker:test",
            holder="test-holder",
            interval=0,
        )

    def events(self, operation: str) -> list[tuple[str, Outcome, str]]:
        return [
            (e.principal, e.outcome, e.reason)
            for e in self.store.events(AuditFilter(operation=operation))
        ]


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path)
    yield w
    w.audit.close()
    w.store.close()


def test_a_failed_destruction_is_audited_kept_and_finished_later(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    world.keys.create(ADMIN, "k", "", KeyPolicy(), None, "")
    world.keys.rotate(ADMIN, "k")
    world.keys.schedule_destruction(ADMIN, "k", WINDOW)
    scheduled = world.clock.t
    world.clock.t += WINDOW + timedelta(seconds=1)
    destroy = world.hsm.destroy

    def failing_destroy(label: str) -> None:
        world.hsm._tick()
        destroy(label)

    monkeypatch.setattr(world.hsm, "destroy", failing_destroy)
    world.hsm.down = True
    report = world.scheduler.run_once()
    assert report.failed == ("k",) and report.destroyed == ()
    assert world.events("DestroyKey") == [(SCHEDULER_PRINCIPAL, Outcome.ERROR, "fake HSM is down")]
    assert len(world.hsm.keks) == 2
    key = world.store.get_key("k")
    assert key.state is KeyState.PENDING_DESTRUCTION
    assert key.lease is not None and key.lease.task is LeaseTask.DESTROY
    assert not key.lease.held(world.clock.now())  # given up: any scheduler may retry
    # Even on a clock that runs behind, the destruction has begun: no cancel.
    world.clock.t = scheduled
    with pytest.raises(FailedPrecondition, match="no longer be cancelled"):
        world.keys.cancel_destruction(ADMIN, "k")

    world.clock.t += WINDOW + timedelta(seconds=2)
    world.hsm.down = False
    assert world.scheduler.run_once().destroyed == ("k",)
    assert world.hsm.keks == {}
    key = world.store.get_key("k")
    assert key.state is KeyState.DESTROYED and key.lease is None
    jwks = world.signing.jwks()
    receipt = evidence.verify_receipt(key.destruction_receipt, jwks, key_id="k")
    assert [v.version for v in receipt.versions] == [1, 2]
    outcomes = [outcome for _, outcome, _ in world.events("DestroyKey")]
    assert outcomes == [Outcome.ERROR, Outcome.ALLOWED]


def test_a_receipt_that_could_not_be_signed_is_finished_without_a_second_event(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    world.keys.create(ADMIN, "k", "", KeyPolicy(), None, "")
    world.keys.schedule_destruction(ADMIN, "k", WINDOW)
    world.clock.t += WINDOW + timedelta(seconds=1)
    sign = world.signing.sign_jws
    failures = iter([HsmUnavailable("the audit key's HSM is down")])

    def failing_sign(purpose: str, payload: bytes, headers: dict[str, str]) -> str:
        # Only receipts: the checkpointer's thread signs with the same key.
        if headers.get("typ") == evidence.RECEIPT_JWS_TYPE:
            for exc in failures:
                raise exc
        return sign(purpose, payload, headers)

    monkeypatch.setattr(world.signing, "sign_jws", failing_sign)
    assert world.scheduler.run_once().failed == ("k",)
    assert world.hsm.keks == {}  # shredded; only the receipt is missing
    assert world.store.get_key("k").state is KeyState.PENDING_DESTRUCTION
    assert world.scheduler.run_once().destroyed == ("k",)
    destroyed = [e for e in world.store.events(AuditFilter(operation="DestroyKey"))]
    assert [e.outcome for e in destroyed] == [Outcome.ALLOWED, Outcome.ERROR]
    key = world.store.get_key("k")
    receipt = evidence.verify_receipt(key.destruction_receipt, world.signing.jwks())
    assert receipt.audit_sequence == destroyed[0].sequence


def test_a_scheduled_rotation_that_loses_to_a_manual_one_leaves_nothing(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    world.keys.create(ADMIN, "k", "", KeyPolicy(), timedelta(days=1), "")
    world.clock.t += timedelta(days=1, seconds=1)
    generate = world.hsm.generate_kek
    raced = {"done": False}

    def racing_generate(label: str) -> None:
        generate(label)
        if not raced["done"]:
            raced["done"] = True
            # An admin rotates by hand after the scheduler's claim, before its write.
            world.keys.rotate(ADMIN, "k")

    monkeypatch.setattr(world.hsm, "generate_kek", racing_generate)
    report = world.scheduler.run_once()
    assert report.rotated == () and report.failed == ()
    key = world.store.get_key("k")
    assert [v.version for v in key.versions] == [1, 2]
    assert key.lease is None
    assert sorted(world.hsm.keks) == sorted(v.hsm_label for v in key.versions)
    assert world.events("RotateKey") == [("admin", Outcome.ALLOWED, "")]
    # The manual rotation moved next_rotation_time: nothing is due now.
    assert world.scheduler.run_once().rotated == ()


def test_the_lease_and_receipt_live_in_the_key_record(world: World) -> None:
    world.keys.create(ADMIN, "k", "", KeyPolicy(), None, "")
    key = world.store.get_key("k")
    lease = Lease("holder-1", LeaseTask.DESTROY, world.clock.now())
    changed = key.evolve(lease=lease, destruction_receipt='{"a":1}')
    assert key_from_json(key_to_json(changed), 7) == changed.evolve(revision=7)
    # A record written before leases and receipts existed reads as having neither.
    legacy = json.loads(key_to_json(key))
    del legacy["lease"], legacy["destruction_receipt"]
    old = key_from_json(json.dumps(legacy), key.revision)
    assert old.lease is None and old.destruction_receipt == "" and old == key
