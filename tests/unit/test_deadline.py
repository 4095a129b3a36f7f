"""The caller's deadline in the services: a call past it stops, and its audit event says
whether the key was used."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from broker.domain import Outcome
from broker.errors import DeadlineExceeded
from broker.services import deadline
from broker.transport.status import status_for
from tests.unit.test_services import ADMIN, CONSUMER, POLICY, PRODUCER, World


class Budget:
    """A deadline the test runs out at a chosen moment (no clock involved)."""

    def __init__(self) -> None:
        self.left = 1.0

    def remaining(self) -> float:
        return self.left

    def spend(self) -> None:
        self.left = 0.0


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path)
    w.keys.create(ADMIN, "k", "", POLICY, None, "")
    yield w
    w.audit.close()


def _last(world: World) -> tuple[str, Outcome, str]:
    event = world.events()[-1]
    return event.operation, event.outcome, event.reason


def test_a_call_whose_deadline_had_passed_does_nothing_and_is_audited(world: World) -> None:
    with deadline.bounded_by(lambda: 0.0), pytest.raises(DeadlineExceeded) as info:
        world.crypto.generate_data_key(PRODUCER, "k", {})
    assert info.value.message == deadline.NOT_STARTED
    assert _last(world) == ("GenerateDataKey", Outcome.ERROR, deadline.NOT_STARTED)


def test_deadline_passing_before_the_key_is_used_stops_before_the_hsm_encrypts(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    budget = Budget()
    real_random, encrypted = world.hsm.random, []

    def slow_random(length: int) -> bytes:
        budget.spend()  # the deadline passes while the HSM draws the data key
        return real_random(length)

    monkeypatch.setattr(world.hsm, "random", slow_random)
    monkeypatch.setattr(world.hsm, "encrypt", lambda *a: encrypted.append(a))
    with deadline.bounded_by(budget.remaining), pytest.raises(DeadlineExceeded):
        world.crypto.generate_data_key(PRODUCER, "k", {})
    assert encrypted == []
    assert _last(world) == ("GenerateDataKey", Outcome.ERROR, deadline.BEFORE_KEY_USE)


def test_deadline_passing_while_the_key_is_used_withholds_the_answer(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, sealed = world.crypto.generate_data_key(PRODUCER, "k", {"d": "x"})
    token, _claims = world.tokens.issue(CONSUMER, "k", {"d": "x"}, "study", None)
    budget = Budget()
    real_decrypt = world.hsm.decrypt

    def slow_decrypt(*args: bytes | str) -> bytes:
        budget.spend()  # the deadline passes inside the HSM call
        return real_decrypt(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(world.hsm, "decrypt", slow_decrypt)
    with deadline.bounded_by(budget.remaining), pytest.raises(DeadlineExceeded):
        world.crypto.decrypt(CONSUMER, sealed.blob, {"d": "x"}, token)
    assert _last(world) == ("Decrypt", Outcome.ERROR, deadline.AFTER_KEY_USE)


def test_no_deadline_or_time_left_changes_nothing(world: World) -> None:
    with deadline.bounded_by(None):
        world.crypto.generate_data_key(PRODUCER, "k", {})
    with deadline.bounded_by(lambda: None):
        world.crypto.generate_data_key(PRODUCER, "k", {})
    with deadline.bounded_by(lambda: 5.0):
        world.crypto.generate_data_key(PRODUCER, "k", {})
    assert [e.outcome for e in world.events()[-3:]] == [Outcome.ALLOWED] * 3
    assert not deadline.passed()


def test_deadline_exceeded_answers_its_own_status() -> None:
    assert status_for(DeadlineExceeded("x")) == grpc.StatusCode.DEADLINE_EXCEEDED
