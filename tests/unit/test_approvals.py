"""The approval service with fake key and approval stores (tests/fakes/approvals.py): M of N,
no self-approval, apply exactly once, stale and expired requests refused, and every step
audited under its own operation."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from broker.adapters.sqlite_store import SqliteStore
from broker.domain import (
    ApprovalOperation,
    ApprovalState,
    AuditFilter,
    Caller,
    Grant,
    KeyPolicy,
    KeyState,
    Operation,
    Outcome,
    Role,
)
from broker.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from broker.services.access import Access, RateLimiter
from broker.services.approvals import (
    APPROVALS_PRINCIPAL,
    ApprovalService,
    ApprovalSettings,
    new_request_id,
)
from broker.services.audit import AuditLog
from broker.services.keys import KeyService, policy_widening
from broker.services.signing import AUDIT_PURPOSE, SigningKeys
from tests.fakes.approvals import FakeApprovalStore, FakeKeyStore
from tests.fakes.hsm import FakeHsm

ALICE = Caller("alice", "A" * 43, "r-alice")
BOB = Caller("bob", "B" * 43, "r-bob")
CAROL = Caller("carol", "C" * 43, "r-carol")
AUDITOR = Caller("auditor", "D" * 43, "r-auditor")
PRODUCER = Caller("producer", "P" * 43, "r-producer")
EXPIRY = timedelta(hours=24)
POLICY = KeyPolicy((Grant("producer", frozenset({Operation.ENCRYPT}), max_token_ttl=None),))
CAPPED = KeyPolicy(
    (Grant("consumer", frozenset({Operation.DECRYPT}), max_token_ttl=timedelta(minutes=5)),)
)


class Clock:
    def __init__(self) -> None:
        self.t = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)

    def now(self) -> datetime:
        return self.t


class World:
    def __init__(self, tmp: Path, required: int) -> None:
        hsm = FakeHsm()
        self.audit_store = SqliteStore(tmp / "audit.db")
        self.clock = Clock()
        admin = frozenset({Role.ADMIN})
        roles = {"alice": admin, "bob": admin, "carol": admin, "auditor": frozenset({Role.AUDITOR})}
        access = Access(roles, {"local": hsm})
        signing = SigningKeys(self.audit_store, {"local": hsm})
        signing.ensure(AUDIT_PURPOSE, "local")
        self.audit = AuditLog(self.audit_store, self.clock, signing, anchors=hsm)
        self.keys = FakeKeyStore()
        self.store = FakeApprovalStore(self.keys)
        limiter = RateLimiter(0, 1)
        self.key_service = KeyService(self.keys, access, self.audit, self.clock, "local", limiter)
        self.approvals = ApprovalService(
            self.store,
            self.keys,
            self.key_service,
            access,
            self.audit,
            self.clock,
            limiter,
            ApprovalSettings(required, EXPIRY),
        )
        self.key_service.create(ALICE, "k", "", CAPPED, None, "")

    def events(self, operation: str) -> list[tuple[str, Outcome, dict[str, str]]]:
        return [
            (e.principal, e.outcome, dict(e.context))
            for e in self.audit_store.events(AuditFilter(operation=operation))
        ]

    def close(self) -> None:
        self.audit.close()
        self.audit_store.close()


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path, required=2)
    yield w
    w.close()


def test_one_approval_applies_at_once_as_before(tmp_path: Path) -> None:
    w = World(tmp_path, required=1)
    try:
        done = w.approvals.update_policy(ALICE, "k", POLICY)
        assert done.pending is None and done.key.policy == POLICY
        assert w.store.requests == {}
        assert [p for p, o, _ in w.events("UpdateKeyPolicy")] == ["alice"]
        assert w.events("RequestApproval") == []
    finally:
        w.close()


def test_a_policy_change_waits_for_a_second_admin(world: World) -> None:
    before = world.keys.get_key("k")
    done = world.approvals.update_policy(ALICE, "k", POLICY)
    pending = done.pending
    assert pending is not None and pending.state is ApprovalState.PENDING
    assert pending.operation is ApprovalOperation.UPDATE_KEY_POLICY
    assert pending.approvers() == ("alice",) and pending.required == 2
    assert pending.expire_time == world.clock.t + EXPIRY
    assert pending.key_revision == before.revision and pending.policy == POLICY
    assert world.keys.get_key("k") == before  # nothing changed yet
    # The 5-minute cap of consumer is gone from the requested policy: not a widening for a
    # principal it no longer names.
    assert pending.widening == ()
    ((who, outcome, context),) = world.events("RequestApproval")
    assert (who, outcome, context["approval_request"]) == (
        "alice",
        Outcome.ALLOWED,
        pending.request_id,
    )

    approved, key = world.approvals.approve(BOB, pending.request_id)
    assert approved.state is ApprovalState.APPLIED and approved.closed_by == "bob"
    assert approved.approvers() == ("alice", "bob")
    assert key.policy == POLICY and key.revision == before.revision + 1
    assert world.keys.get_key("k").policy == POLICY
    ((who, outcome, context),) = world.events("ApplyApprovedChange")
    assert (who, outcome) == ("bob", Outcome.ALLOWED)
    assert context["approvals"] == "2/2: alice,bob"
    assert [o for _, o, _ in world.events("ApproveRequest")] == [Outcome.ALLOWED]


def test_the_requester_and_non_admins_cannot_approve(world: World) -> None:
    pending = world.approvals.update_policy(ALICE, "k", POLICY).pending
    assert pending is not None
    with pytest.raises(PermissionDenied, match="cannot approve it too"):
        world.approvals.approve(ALICE, pending.request_id)
    for caller in (AUDITOR, PRODUCER):
        with pytest.raises(PermissionDenied, match="admin role"):
            world.approvals.approve(caller, pending.request_id)
    assert world.store.get_approval(pending.request_id).state is ApprovalState.PENDING
    denied = world.events("ApproveRequest")
    assert [(p, o) for p, o, _ in denied] == [
        ("alice", Outcome.DENIED),
        ("auditor", Outcome.DENIED),
        ("producer", Outcome.DENIED),
    ]
    assert world.store.applied == 0


def test_three_of_n_needs_two_distinct_approvers(tmp_path: Path) -> None:
    w = World(tmp_path, required=3)
    try:
        pending = w.approvals.update_policy(ALICE, "k", POLICY).pending
        assert pending is not None
        first, _ = w.approvals.approve(BOB, pending.request_id)
        assert first.state is ApprovalState.PENDING and first.approvers() == ("alice", "bob")
        with pytest.raises(FailedPrecondition, match="already approved"):
            w.approvals.approve(BOB, pending.request_id)
        assert w.keys.get_key("k").policy == CAPPED
        done, key = w.approvals.approve(CAROL, pending.request_id)
        assert done.state is ApprovalState.APPLIED and key.policy == POLICY
        with pytest.raises(FailedPrecondition, match="is applied"):
            w.approvals.approve(CAROL, pending.request_id)
        assert w.store.applied == 1
    finally:
        w.close()


def test_two_racing_approvals_apply_the_change_once(tmp_path: Path) -> None:
    w = World(tmp_path, required=2)
    try:
        pending = w.approvals.update_policy(ALICE, "k", POLICY).pending
        assert pending is not None
        # Both approvers read the pending request before either writes.
        both_read = threading.Barrier(2)
        reads = {"n": 0}
        real_get = w.store.get_approval

        def get_approval(request_id: str):  # type: ignore[no-untyped-def]
            found = real_get(request_id)
            reads["n"] += 1
            if reads["n"] <= 2:
                both_read.wait(timeout=30)
            return found

        w.store.get_approval = get_approval  # type: ignore[method-assign]
        outcomes: dict[str, object] = {}

        def approve(caller: Caller) -> None:
            try:
                outcomes[caller.principal] = w.approvals.approve(caller, pending.request_id)[0]
            except FailedPrecondition as exc:
                outcomes[caller.principal] = exc

        threads = [threading.Thread(target=approve, args=(c,)) for c in (BOB, CAROL)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        applied = [o for o in outcomes.values() if not isinstance(o, Exception)]
        refused = [o for o in outcomes.values() if isinstance(o, FailedPrecondition)]
        assert len(applied) == 1 and len(refused) == 1
        assert "is applied" in str(refused[0])
        assert w.store.applied == 1
        assert w.keys.get_key("k").revision == pending.key_revision + 1
        assert len(w.events("ApplyApprovedChange")) == 1
    finally:
        w.close()


def test_a_request_on_a_key_changed_since_fails_instead_of_applying(world: World) -> None:
    pending = world.approvals.update_policy(ALICE, "k", POLICY).pending
    assert pending is not None
    world.key_service.set_enabled(CAROL, "k", False)  # not gated: changes the revision
    with pytest.raises(FailedPrecondition, match="has changed since the request"):
        world.approvals.approve(BOB, pending.request_id)
    stored = world.store.get_approval(pending.request_id)
    assert stored.state is ApprovalState.FAILED and "changed since" in stored.reason
    key = world.keys.get_key("k")
    assert key.policy == CAPPED and key.state is KeyState.DISABLED
    assert [(p, o) for p, o, _ in world.events("ApplyApprovedChange")] == [("bob", Outcome.DENIED)]
    assert world.store.applied == 0


def test_an_expired_request_cannot_be_approved_and_expires_once(world: World) -> None:
    pending = world.approvals.update_policy(ALICE, "k", POLICY).pending
    assert pending is not None
    world.clock.t += EXPIRY
    with pytest.raises(FailedPrecondition, match="is expired"):
        world.approvals.approve(BOB, pending.request_id)
    assert world.approvals.get(AUDITOR, pending.request_id).state is ApprovalState.EXPIRED
    assert world.approvals.get(BOB, pending.request_id).reason.startswith("expired at")
    assert [(p, o) for p, o, _ in world.events("ExpireApprovalRequest")] == [
        (APPROVALS_PRINCIPAL, Outcome.ALLOWED)
    ]
    assert world.keys.get_key("k").policy == CAPPED


def test_cancel_by_the_requester_or_an_admin_only(world: World) -> None:
    pending = world.approvals.update_policy(ALICE, "k", POLICY).pending
    assert pending is not None
    with pytest.raises(PermissionDenied):
        world.approvals.cancel(PRODUCER, pending.request_id)
    cancelled = world.approvals.cancel(BOB, pending.request_id)
    assert cancelled.state is ApprovalState.CANCELLED and cancelled.closed_by == "bob"
    with pytest.raises(FailedPrecondition, match="is cancelled"):
        world.approvals.cancel(ALICE, pending.request_id)
    with pytest.raises(FailedPrecondition, match="is cancelled"):
        world.approvals.approve(CAROL, pending.request_id)
    outcomes = [(p, o) for p, o, _ in world.events("CancelApprovalRequest")]
    assert outcomes == [
        ("producer", Outcome.DENIED),
        ("bob", Outcome.ALLOWED),
        ("alice", Outcome.DENIED),
    ]


def test_enabling_a_disabled_key_waits_but_an_enabled_key_needs_nothing(world: World) -> None:
    assert world.approvals.enable(ALICE, "k").pending is None  # already enabled
    world.key_service.set_enabled(ALICE, "k", False)
    pending = world.approvals.enable(ALICE, "k").pending
    assert pending is not None and pending.operation is ApprovalOperation.ENABLE_KEY
    assert world.keys.get_key("k").state is KeyState.DISABLED
    _, key = world.approvals.approve(CAROL, pending.request_id)
    assert key.state is KeyState.ENABLED


def test_a_scheduled_destruction_counts_its_window_from_the_approval(world: World) -> None:
    window = timedelta(days=30)
    pending = world.approvals.schedule_destruction(ALICE, "k", window).pending
    assert pending is not None and pending.pending_window == window
    with pytest.raises(InvalidArgument, match="at least"):
        world.approvals.schedule_destruction(ALICE, "k", timedelta(hours=1))
    world.clock.t += timedelta(hours=3)
    _, key = world.approvals.approve(BOB, pending.request_id)
    assert key.state is KeyState.PENDING_DESTRUCTION
    assert key.destroy_time == world.clock.t + window


def test_a_widening_policy_says_how_in_the_request_and_its_events(world: World) -> None:
    widened = KeyPolicy(
        (Grant("consumer", frozenset({Operation.DECRYPT}), max_token_ttl=None),),
        allowed_jurisdictions=("FR", "US"),
    )
    pending = world.approvals.update_policy(ALICE, "k", widened).pending
    assert pending is not None
    assert pending.widening == (
        "jurisdictions widened: +US",
        "token lifetime cap of 'consumer' dropped: 5m -> 1h",
    )
    ((_, _, context),) = world.events("RequestApproval")
    assert context["widening"].startswith("jurisdictions widened: +US")


def test_policy_widening_rules() -> None:
    def capped(ttl: timedelta | None) -> KeyPolicy:
        return KeyPolicy((Grant("c", frozenset({Operation.DECRYPT}), max_token_ttl=ttl),))

    five, ten = timedelta(minutes=5), timedelta(minutes=10)
    assert policy_widening(capped(five), capped(ten)) == (
        "token lifetime cap of 'c' raised: 5m -> 10m",
    )
    assert policy_widening(capped(ten), capped(five)) == ()  # narrowing
    assert policy_widening(capped(None), capped(five)) == ()
    assert policy_widening(KeyPolicy(), KeyPolicy(allowed_jurisdictions=("FR",))) == ()
    assert policy_widening(KeyPolicy(allowed_jurisdictions=("FR",)), KeyPolicy()) == (
        "jurisdictions widened: +" + ", +".join(sorted(KeyPolicy().jurisdictions() - {"FR"})),
    )


def test_listing_filters_by_state_and_key_and_pages(world: World) -> None:
    made = []
    for _ in range(3):
        pending = world.approvals.update_policy(ALICE, "k", POLICY).pending
        assert pending is not None
        made.append(pending.request_id)
        world.clock.t += timedelta(seconds=1)
    world.approvals.cancel(ALICE, made[1])
    page, token = world.approvals.list(AUDITOR, ApprovalState.PENDING, "k", 1, "")
    assert [r.request_id for r in page] == [made[0]] and token
    page, token = world.approvals.list(AUDITOR, ApprovalState.PENDING, "k", 1, token)
    assert [r.request_id for r in page] == [made[2]] and not token
    everything, _ = world.approvals.list(AUDITOR, None, "", 0, "")
    assert [r.request_id for r in everything] == made
    world.clock.t += EXPIRY
    expired, _ = world.approvals.list(AUDITOR, ApprovalState.EXPIRED, "", 0, "")
    assert [r.request_id for r in expired] == [made[0], made[2]]
    with pytest.raises(PermissionDenied):
        world.approvals.list(PRODUCER, None, "", 0, "")
    with pytest.raises(InvalidArgument):
        world.approvals.get(AUDITOR, "not-an-id")


def test_request_ids_sort_by_creation_time() -> None:
    early = new_request_id(datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC))
    late = new_request_id(datetime(2026, 1, 2, 3, 4, 6, tzinfo=UTC))
    assert early.startswith("apr-20260102-030405-") and early < late
