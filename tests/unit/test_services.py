"""Services with a fake HSM and a throwaway SQLite store: the rules that need no device."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from broker.adapters.sqlite_store import SqliteStore
from broker.domain import AuditFilter, Caller, Grant, KeyPolicy, Operation, Outcome, Role
from broker.errors import (
    AuditUnavailable,
    ConcurrentModification,
    FailedPrecondition,
    HsmUnavailable,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
)
from broker.services.access import Access, RateLimiter
from broker.services.audit import AuditLog
from broker.services.crypto import CryptoService
from broker.services.keys import KeyService, validate_policy
from broker.services.signing import AUDIT_PURPOSE, TOKEN_PURPOSE, SigningKeys
from broker.services.tokens import TokenService, TokenSettings
from tests.fakes.hsm import FakeHsm

ADMIN = Caller("admin", "A" * 43, "r1")
PRODUCER = Caller("producer", "P" * 43, "r2")
CONSUMER = Caller("consumer", "C" * 43, "r3")


class FixedClock:
    def __init__(self) -> None:
        self.t = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)

    def now(self) -> datetime:
        return self.t


class World:
    def __init__(self, tmp: Path, rate: float = 0) -> None:
        self.hsm = FakeHsm()
        self.store = SqliteStore(tmp / "kb.db")
        self.clock = FixedClock()
        self.access = Access({"admin": frozenset({Role.ADMIN})}, {"local": self.hsm})
        limiter = RateLimiter(rate, 2)
        self.signing = SigningKeys(self.store, {"local": self.hsm})
        self.signing.ensure(TOKEN_PURPOSE, "local")
        self.signing.ensure(AUDIT_PURPOSE, "local")
        self.audit = AuditLog(self.store, self.clock, self.signing, anchors=self.hsm)
        self.keys = KeyService(self.store, self.access, self.audit, self.clock, "local", limiter)
        self.tokens = TokenService(
            TokenSettings(issuer="urn:i", audience="urn:a"),
            keys=self.store,
            revocations=self.store,
            access=self.access,
            audit=self.audit,
            limiter=limiter,
            clock=self.clock,
            signing=self.signing,
        )
        self.crypto = CryptoService(self.store, self.access, self.audit, self.tokens, limiter)

    def events(self) -> list:  # type: ignore[type-arg]
        return list(self.store.events(AuditFilter()))


POLICY = KeyPolicy(
    (
        Grant("producer", frozenset({Operation.ENCRYPT})),
        Grant("consumer", frozenset({Operation.DECRYPT}), {"d": "x"}),
    )
)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path)
    yield w
    w.audit.close()


def test_rotation_race_gives_one_new_version(world: World, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    world.keys.create(ADMIN, "k", "", POLICY, None, "")
    real_update = world.store.update_key
    raced = {"done": False}

    def racing_update(key, expected):  # type: ignore[no-untyped-def]
        if not raced["done"]:
            raced["done"] = True
            # Another replica rotates first, between our read and our write.
            world.keys.rotate(ADMIN, "k")
        return real_update(key, expected)

    monkeypatch.setattr(world.store, "update_key", racing_update)
    key = world.keys.rotate(ADMIN, "k")
    assert key.primary_version == 2
    assert [v.version for v in world.store.get_key("k").versions] == [1, 2]
    # Our losing HSM object was removed: only the versions on record remain.
    assert len(world.hsm.keks) == 2


def test_failed_store_write_removes_the_new_hsm_object(world: World, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    world.keys.create(ADMIN, "k", "", POLICY, None, "")

    def fail(*_a, **_k):  # type: ignore[no-untyped-def]
        raise ConcurrentModification("x")

    monkeypatch.setattr(world.store, "update_key", fail)
    with pytest.raises(ConcurrentModification):
        world.keys.rotate(ADMIN, "k")
    assert len(world.hsm.keks) == 1


def test_audit_scope_outcomes(world: World) -> None:
    with pytest.raises(PermissionDenied):
        world.keys.create(PRODUCER, "k", "", POLICY, None, "")
    world.keys.create(ADMIN, "k", "", POLICY, None, "")
    world.hsm.down = True
    with pytest.raises(HsmUnavailable):
        world.crypto.generate_data_key(PRODUCER, "k", {})
    outcomes = [(e.operation, e.outcome) for e in world.events()]
    assert outcomes == [
        ("CreateKey", Outcome.DENIED),
        ("CreateKey", Outcome.ALLOWED),
        ("GenerateDataKey", Outcome.ERROR),
    ]
    world.hsm.down = False  # verifying reads the anchors in the HSM
    assert world.audit.verify().ok


def test_audit_failure_replaces_the_result(world: World, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    world.keys.create(ADMIN, "k", "", POLICY, None, "")

    def fail(_events):  # type: ignore[no-untyped-def]
        raise AuditUnavailable("down")

    monkeypatch.setattr(world.store, "append_batch", fail)
    with pytest.raises(AuditUnavailable):
        world.crypto.generate_data_key(PRODUCER, "k", {})
    # A denial that cannot be audited is refused as unavailable too.
    with pytest.raises(AuditUnavailable):
        world.crypto.generate_data_key(CONSUMER, "k", {})


def test_token_round_trip_and_clock(world: World) -> None:
    world.keys.create(ADMIN, "k", "", POLICY, None, "")
    token, claims = world.tokens.issue(CONSUMER, "k", {"d": "x"}, "why", None)
    assert claims.expires_at - claims.issued_at == timedelta(minutes=5)
    assert world.tokens.verify(token, CONSUMER).token_id == claims.token_id
    world.clock.t += timedelta(minutes=5)
    with pytest.raises(Exception, match="expired"):
        world.tokens.verify(token, CONSUMER)


def test_disabled_key_refuses_everything(world: World) -> None:
    world.keys.create(ADMIN, "k", "", POLICY, None, "")
    _, sealed = world.crypto.generate_data_key(PRODUCER, "k", {"d": "x"})
    token, _ = world.tokens.issue(CONSUMER, "k", {"d": "x"}, "why", None)
    world.keys.set_enabled(ADMIN, "k", False)
    for call in (
        lambda: world.crypto.generate_data_key(PRODUCER, "k", {}),
        lambda: world.crypto.decrypt(CONSUMER, sealed.blob, {"d": "x"}, token),
        lambda: world.tokens.issue(CONSUMER, "k", {"d": "x"}, "why", None),
    ):
        with pytest.raises(FailedPrecondition):
            call()


def test_rate_limiter() -> None:
    limiter = RateLimiter(0.0001, 2)
    limiter.check("a")
    limiter.check("a")
    with pytest.raises(ResourceExhausted):
        limiter.check("a")
    limiter.check("b")
    RateLimiter(0, 1).check("a")  # disabled


@pytest.mark.parametrize(
    "policy",
    [
        KeyPolicy((Grant("", frozenset({Operation.ENCRYPT})),)),
        KeyPolicy((Grant("p", frozenset()),)),
        KeyPolicy((Grant("p", frozenset({Operation.DECRYPT}), max_token_ttl=timedelta(hours=2)),)),
        KeyPolicy((), ("fr",)),
        KeyPolicy((), ("FRA",)),
        KeyPolicy((Grant("p", frozenset({Operation.DECRYPT}), {"k": "v" * 300}),)),
    ],
)
def test_policy_validation(policy: KeyPolicy) -> None:
    with pytest.raises(InvalidArgument):
        validate_policy(policy)


def test_audit_records_stay_bounded_for_refused_input(world: World) -> None:
    huge = "k" * 10_000
    with pytest.raises(InvalidArgument):
        world.crypto.generate_data_key(PRODUCER, huge, {f"{i}": "v" for i in range(40)})
    (event,) = world.events()
    assert event.outcome is Outcome.DENIED
    assert len(event.key_id) == 64 and event.context == {}


def test_audit_listing_pages_through_long_trails(world: World, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import broker.adapters.sql_common as sql_common

    monkeypatch.setattr(sql_common, "PAGE", 3)
    for _ in range(10):
        with pytest.raises(PermissionDenied):
            world.keys.create(PRODUCER, "k", "", POLICY, None, "")
    assert [e.sequence for e in world.events()] == list(range(1, 11))
    assert [e.sequence for e in world.store.events(AuditFilter(after_sequence=2, limit=7))] == list(
        range(3, 10)
    )
    assert [e.sequence for e in world.store.events(AuditFilter(after_sequence=8))] == [9, 10]
    assert world.audit.verify().events_checked == 10


def test_a_call_refused_by_the_rate_limit_is_audited(tmp_path: Path) -> None:
    world = World(tmp_path, rate=0.0001)  # a burst of 2, then refused
    world.keys.create(ADMIN, "k", "", POLICY, None, "")
    world.keys.get(ADMIN, "k")
    with pytest.raises(ResourceExhausted):
        world.keys.get(ADMIN, "k")
    event = world.events()[-1]
    assert (event.operation, event.key_id, event.outcome) == ("GetKey", "k", Outcome.DENIED)
    assert type(event.operation) is str


def test_the_context_is_validated_once_per_call(world: World, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import broker.services.audit as audit_module

    world.keys.create(ADMIN, "k", "", POLICY, None, "")
    _, sealed = world.crypto.generate_data_key(PRODUCER, "k", {"d": "x"})
    token, _ = world.tokens.issue(CONSUMER, "k", {"d": "x"}, "why", None)
    calls = []
    real = audit_module.validate_context

    def counting(context):  # type: ignore[no-untyped-def]
        calls.append(dict(context))
        return real(context)

    monkeypatch.setattr(audit_module, "validate_context", counting)
    assert world.crypto.decrypt(CONSUMER, sealed.blob, {"d": "x"}, token).key_id == "k"
    assert calls == [{"d": "x"}]
    calls.clear()
    with pytest.raises(InvalidArgument):
        world.crypto.decrypt(CONSUMER, sealed.blob, {"": "x"}, token)
    assert len(calls) == 1 and world.events()[-1].context == {}


def test_a_refused_decrypt_does_not_use_up_a_token(world: World) -> None:
    world.keys.create(ADMIN, "k", "", POLICY, None, "")
    _, sealed = world.crypto.generate_data_key(PRODUCER, "k", {"d": "x"})
    token, claims = world.tokens.issue(CONSUMER, "k", {"d": "x"}, "why", None, max_uses=1)
    world.keys.set_enabled(ADMIN, "k", False)
    with pytest.raises(FailedPrecondition):
        world.crypto.decrypt(CONSUMER, sealed.blob, {"d": "x"}, token)
    denied = world.events()[-1]
    assert (denied.operation, denied.token_id) == ("Decrypt", claims.token_id)
    world.keys.set_enabled(ADMIN, "k", True)
    world.crypto.decrypt(CONSUMER, sealed.blob, {"d": "x"}, token)
    with pytest.raises(ResourceExhausted):
        world.crypto.decrypt(CONSUMER, sealed.blob, {"d": "x"}, token)


@pytest.mark.parametrize(
    "changes",
    [
        {"issuer": ""},
        {"max_ttl": timedelta(hours=2)},
        {"default_ttl": timedelta(hours=1, seconds=1)},
        {"leeway": timedelta(seconds=6)},
        {"max_uses": 10_001},
    ],
)
def test_token_settings_keep_the_contract_s_bounds(changes: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        TokenSettings(**{"issuer": "urn:i", "audience": "urn:a", **changes})  # type: ignore[arg-type]
