"""Honest health: the gRPC health service follows the HSMs and the database, both ways."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from broker.transport.server import HealthMonitor
from tests.broker_fixtures import Broker, start_broker
from tests.store_fixtures import using_postgres

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
def monitored(hsm_home: Path, tmp_path: Path) -> Iterator[tuple[Broker, HealthMonitor, Path]]:
    """A broker, and a health monitor over the probes the server process uses (rounds run by
    the test, not by the monitor's thread)."""
    db = tmp_path / "health.db"
    b = start_broker(hsm_home, database=db)
    monitor = HealthMonitor(b.running, b.app.health_probes(), interval=3600)
    try:
        yield b, monitor, db
    finally:
        b.close()


def statuses(b: Broker) -> set[int]:
    stub = health_pb2_grpc.HealthStub(b.channel("producer"))
    return {
        stub.Check(health_pb2.HealthCheckRequest(service=service)).status
        for service in ("", "keybroker.v1.Crypto", "keybroker.v1.KeyAdmin")
    }


@pytest.mark.skipif(using_postgres(), reason="moves the SQLite database file away")
def test_health_follows_the_database(monitored: tuple[Broker, HealthMonitor, Path]) -> None:
    b, monitor, db = monitored
    metrics = b.app.metrics
    assert monitor.check_once()
    assert statuses(b) == {SERVING}

    # The database file moved away: the open connections would still work, a new one cannot.
    aside = db.with_name("aside.db")
    db.rename(aside)
    try:
        assert not monitor.check_once()
        assert statuses(b) == {NOT_SERVING}
        assert not metrics.healthy
    finally:
        aside.rename(db)

    assert monitor.check_once()
    assert statuses(b) == {SERVING}
    assert metrics.healthy


def test_health_follows_the_hsm_through_the_same_probes(
    monitored: tuple[Broker, HealthMonitor, Path],
) -> None:
    import PyKCS11

    from hsm_sim.faults import FailOnCall

    b, monitor, _ = monitored
    hsm = b.app.hsms["us-east"]
    hsm.gate.fault = FailOnCall(1, PyKCS11.CKR_DEVICE_ERROR, times=10_000)  # type: ignore[attr-defined]
    try:
        assert not monitor.check_once()
        assert statuses(b) == {NOT_SERVING}
    finally:
        hsm.gate.fault = None  # type: ignore[attr-defined]
    assert monitor.check_once()
    assert statuses(b) == {SERVING}
