"""Health checking, reflection and the graceful stop."""

from __future__ import annotations

from pathlib import Path

from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from tests.broker_fixtures import Broker, start_broker


def test_reflection_lists_the_services(broker: Broker) -> None:
    db = ProtoReflectionDescriptorDatabase(broker.channel("producer"))
    services = set(db.get_services())
    assert {
        "keybroker.v1.KeyAdmin",
        "keybroker.v1.Crypto",
        "keybroker.v1.Tokens",
        "keybroker.v1.Audit",
        "grpc.health.v1.Health",
    } <= services
    desc = db.FindFileContainingSymbol("keybroker.v1.Crypto")
    assert desc.name == "keybroker/v1/crypto.proto"


def test_health_per_service_and_graceful_stop(hsm_home: Path, tmp_path: Path) -> None:
    b = start_broker(hsm_home, database=tmp_path / "h.db")
    stub = health_pb2_grpc.HealthStub(b.channel("producer"))
    for service in ("", "keybroker.v1.Crypto", "keybroker.v1.Audit"):
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    watch = stub.Watch(health_pb2.HealthCheckRequest(service="keybroker.v1.Crypto"))
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    b.running.health.enter_graceful_shutdown()
    assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
    watch.cancel()
    b.close()


def test_health_follows_the_hsm(hsm_home: Path, tmp_path: Path) -> None:
    import PyKCS11

    from broker.transport.server import HealthMonitor
    from hsm_sim.faults import FailOnCall

    b = start_broker(hsm_home, database=tmp_path / "m.db")
    try:
        stub = health_pb2_grpc.HealthStub(b.channel("producer"))
        hsm = b.app.hsms["local"]
        monitor = HealthMonitor(b.running, [h.check for h in b.app.hsms.values()], interval=60)
        assert monitor.check_once()
        hsm.gate.fault = FailOnCall(1, PyKCS11.CKR_DEVICE_ERROR, times=10_000)  # type: ignore[attr-defined]
        assert not monitor.check_once()
        for service in ("", "keybroker.v1.Crypto"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        hsm.gate.fault = None  # type: ignore[attr-defined]
        assert monitor.check_once()
        reply = stub.Check(health_pb2.HealthCheckRequest(service="keybroker.v1.Crypto"))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        b.close()
