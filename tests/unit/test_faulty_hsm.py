"""`hsm_sim.faulty.FaultyHsm` over the fake HSM: failures on the k-th call, latency, hangs."""

from __future__ import annotations

import threading
import time

import pytest

from broker.errors import HsmUnavailable
from hsm_sim.faulty import FaultyHsm
from tests.fakes.hsm import FakeHsm

IV = bytes(12)


def test_without_rules_it_is_the_wrapped_hsm() -> None:
    faulty = FaultyHsm(FakeHsm())
    faulty.generate_kek("k")
    assert faulty.decrypt("k", IV, faulty.encrypt("k", IV, b"x", b""), b"") == b"x"
    assert faulty.info.name == "local"
    assert faulty.calls == ["generate_kek", "encrypt", "decrypt"]


def test_the_kth_matching_call_fails_times_times() -> None:
    faulty = FaultyHsm(FakeHsm())
    rule = faulty.fail(HsmUnavailable("down"), nth=2, times=2, methods={"random"})
    faulty.check()  # not a matching method
    assert len(faulty.random(4)) == 4
    for _ in range(2):
        with pytest.raises(HsmUnavailable, match="down"):
            faulty.random(4)
    assert len(faulty.random(4)) == 4
    assert (rule.seen, rule.fired) == (4, 2)


def test_delay_and_hang() -> None:
    faulty = FaultyHsm(FakeHsm())
    faulty.delay(0.2, methods={"check"})
    started = time.monotonic()
    faulty.check()
    assert time.monotonic() - started >= 0.2
    faulty.clear()
    release = faulty.hang(methods={"random"})
    done = threading.Event()
    worker = threading.Thread(target=lambda: (faulty.random(1), done.set()))
    worker.start()
    assert not done.wait(0.2)  # hung
    release.set()
    worker.join(5)
    assert done.is_set()
