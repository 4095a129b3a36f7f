"""Secondary audit sinks (SIEM) through gRPC against real SoftHSM2: a broken sink never
blocks a call nor costs a primary record; its health detail says so; a stdout sink from the
configuration file of a `keybroker-server` process."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import cast

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from keybroker.v1 import audit_pb2, key_admin_pb2, key_admin_pb2_grpc, resources_pb2
from keybroker_client import evidence

from broker.adapters.audit_sinks import QueuedSink
from broker.sink_settings import AuditSinkConfig
from tests.broker_fixtures import Broker, start_broker
from tests.integration.flows import create_key, datakey, standard_policy
from tests.integration.test_server_process import SERVER, channel, wait_ready

WAIT = 60  # seconds: a bound against a hang, never a measurement
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
CALLS, THREADS = 200, 8


def sink_health(name: str) -> str:
    return f"keybroker.audit.sink.{name}"


def wait_health(broker: Broker, service: str, status: int) -> None:
    """Follows the health service's Watch stream until it reports `status`."""
    stub = health_pb2_grpc.HealthStub(broker.channel("auditor"))
    watch = stub.Watch(health_pb2.HealthCheckRequest(service=service), timeout=WAIT)
    try:
        for reply in watch:
            if reply.status == status:
                return
    finally:
        watch.cancel()


def check_health(broker: Broker, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(broker.channel("auditor"))
    return int(stub.Check(health_pb2.HealthCheckRequest(service=service)).status)


def all_events(broker: Broker) -> list[resources_pb2.AuditEvent]:
    stream = broker.audit("auditor").ListAuditEvents(audit_pb2.ListAuditEventsRequest())
    return [r.event for r in stream]


def sinks_of(broker: Broker) -> dict[str, QueuedSink]:
    return {s.name: cast(QueuedSink, s) for s in broker.app.audit_sinks.sinks}


@pytest.fixture
def stalled_peer() -> Iterator[int]:
    """A syslog receiver that accepts connections (kernel backlog) and never reads."""
    with socket.create_server(("127.0.0.1", 0), backlog=64) as server:
        yield int(server.getsockname()[1])


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_broken_sinks_never_block_calls_nor_lose_a_primary_record(
    hsm_home: Path, tmp_path: Path, stalled_peer: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="broker.adapters.audit_sinks")
    copy = tmp_path / "siem" / "audit.jsonl"
    copy.parent.mkdir()
    sinks = (
        AuditSinkConfig("jsonl", name="full", path=Path("/dev/full")),  # every write: ENOSPC
        AuditSinkConfig(
            "syslog", name="stalled", address=f"tcp://127.0.0.1:{stalled_peer}", queue_size=16
        ),
        AuditSinkConfig("jsonl", name="copy", path=copy),
    )
    b = start_broker(hsm_home, database=tmp_path / "sinks.db", audit_sinks=sinks)
    try:
        key_id = create_key(b)
        with ThreadPoolExecutor(THREADS) as pool:
            replies = list(pool.map(lambda _: datakey(b, key_id), range(CALLS)))
        assert len(replies) == CALLS and all(len(r.plaintext_key) == 32 for r in replies)

        wait_health(b, sink_health("full"), NOT_SERVING)
        for service in ("", "keybroker.v1.Crypto", "keybroker.v1.Audit", sink_health("copy")):
            assert check_health(b, service) == SERVING, service

        report = b.audit("auditor").VerifyAuditLog(audit_pb2.VerifyAuditLogRequest())
        assert report.ok, report.error
        assert report.events_checked == 1 + CALLS  # CreateKey, then every GenerateDataKey
        events = all_events(b)
        assert [e.sequence for e in events] == list(range(1, len(events) + 1))
        assert len(events) == 1 + CALLS + 2  # and the VerifyAuditLog and ListAuditEvents
        generated = [e for e in events if e.operation == "GenerateDataKey"]
        assert len(generated) == CALLS
        assert {e.outcome for e in generated} == {resources_pb2.OUTCOME_ALLOWED}
    finally:
        b.close()  # stops the sinks: their counts are final

    stats = {name: sink.stats() for name, sink in sinks_of(b).items()}
    for name, s in stats.items():
        assert s.submitted == len(events) == s.delivered + s.lost, (name, s)
    assert stats["full"].delivered == 0 and stats["full"].failed >= 1
    assert stats["copy"].delivered == len(events) and stats["copy"].lost == 0
    warnings = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("audit sink 'full' is failing (OSError") for m in warnings), warnings

    # The healthy sink's copy is the trail, record for record, in the export's canonical form.
    lines = copy.read_bytes().splitlines()
    records = [json.loads(line) for line in lines]
    assert all(evidence.canonical(r) == line for r, line in zip(records, lines, strict=True))
    assert all(evidence.event_problem(r) == "" for r in records)
    assert [(r["sequence"], r["hash"]) for r in records] == [(e.sequence, e.hash) for e in events]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_sink_health_detail_comes_back_when_the_siem_does(hsm_home: Path, tmp_path: Path) -> None:
    port = free_port()  # the SIEM is down: connections are refused
    sinks = (AuditSinkConfig("syslog", name="siem", address=f"tcp://127.0.0.1:{port}"),)
    b = start_broker(hsm_home, database=tmp_path / "siem.db", audit_sinks=sinks)
    try:
        key_id = create_key(b)
        wait_health(b, sink_health("siem"), NOT_SERVING)
        assert check_health(b, "") == SERVING
        datakey(b, key_id)
        with socket.create_server(("127.0.0.1", port)) as server:
            server.settimeout(WAIT)
            conn, _ = server.accept()
            wait_health(b, sink_health("siem"), SERVING)
            conn.close()
    finally:
        b.close()
    # Events wait in the queue while the SIEM cannot be reached: none were lost.
    siem = sinks_of(b)["siem"].stats()
    assert siem.lost == 0 and siem.delivered == siem.submitted == 2


def test_stdout_sink_of_a_server_process(tmp_path: Path) -> None:
    home = tmp_path / "home"
    config = tmp_path / "kb.toml"
    config.write_text('[[audit.sinks]]\ntype = "stdout"\n')
    env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}
    with (tmp_path / "stderr.log").open("w") as errors:
        proc = subprocess.Popen(
            [*SERVER, "--home", str(home), "--listen", "127.0.0.1:0", "--config", str(config)],
            stdout=subprocess.PIPE,
            stderr=errors,
            env=env,
        )
        try:
            target = wait_ready(proc, home)  # type: ignore[arg-type]
            with channel(home, target) as ch:
                stub = key_admin_pb2_grpc.KeyAdminStub(ch)
                stub.CreateKey(
                    key_admin_pb2.CreateKeyRequest(key_id="siem-demo", policy=standard_policy())
                )
        finally:
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=WAIT)
    assert proc.returncode == 0
    # stdout holds only the events (the banner went to stderr), one canonical record a line.
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["operation"] for r in records] == ["CreateKey"]
    assert records[0]["key_id"] == "siem-demo" and evidence.event_problem(records[0]) == ""
    assert "keybroker listening on" in (tmp_path / "stderr.log").read_text()
