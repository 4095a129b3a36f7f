"""Reaching the HSMs at start: a transient failure is tried again, a refused PIN never."""

from __future__ import annotations

import pytest

from broker import app
from broker.errors import HsmPinRefused, HsmUnavailable
from hsm_sim.faulty import FaultyHsm
from tests.fakes.hsm import FakeHsm


@pytest.fixture(autouse=True)
def _no_waiting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(app, "START_RETRY_DELAYS", (0.0, 0.0, 0.0))


def test_a_transient_failure_at_start_is_tried_again() -> None:
    hsm = FaultyHsm(FakeHsm())
    hsm.fail(HsmUnavailable("CKR_GENERAL_ERROR while listing tokens"), times=3, methods={"check"})
    app._first_check(hsm)
    assert hsm.calls == ["check"] * 4


def test_a_lasting_failure_stops_the_start() -> None:
    hsm = FaultyHsm(FakeHsm())
    hsm.fail(HsmUnavailable("gone"), times=10, methods={"check"})
    with pytest.raises(HsmUnavailable, match="gone"):
        app._first_check(hsm)
    assert hsm.calls == ["check"] * 4


def test_a_refused_pin_is_never_tried_again() -> None:
    hsm = FaultyHsm(FakeHsm())
    hsm.fail(HsmPinRefused("refused the user PIN"), times=10, methods={"check"})
    with pytest.raises(HsmPinRefused):
        app._first_check(hsm)
    assert hsm.calls == ["check"]
