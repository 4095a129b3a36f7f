"""Prometheus metrics: a real broker (gRPC over mTLS, SoftHSM2) scraped over HTTP."""

from __future__ import annotations

import socket
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from keybroker.v1 import crypto_pb2, crypto_pb2_grpc, key_admin_pb2, key_admin_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from broker.metrics import MetricsEndpoint, serve_metrics
from broker.sink_settings import AuditSinkConfig
from tests.broker_fixtures import Broker, start_broker
from tests.integration.flows import code_of, create_key, datakey, decrypt, issue, standard_policy
from tests.integration.test_server_process import SERVER, channel, start, stop, wait_ready
from tests.integration.test_workers import wait_for


@dataclass
class Scrape:
    """One scrape of /metrics: the text, and each sample's value by name and labels."""

    text: str
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float]

    def value(self, name: str, **labels: str) -> float:
        return self.samples[(name, frozenset(labels.items()))]

    def families(self) -> set[str]:
        return {f.name for f in text_string_to_metric_families(self.text)}


def scrape(port: int) -> Scrape:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("text/plain")
        text = reply.read().decode()
    samples = {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    return Scrape(text, samples)


@pytest.fixture
def metered(hsm_home: Path, tmp_path: Path) -> Iterator[tuple[Broker, MetricsEndpoint]]:
    """A broker with its metrics on a free loopback port, and a SIEM sink that cannot open
    (its socket does not exist), so the sink's queue of one holds one event and drops the rest."""
    siem = AuditSinkConfig(
        "syslog", name="siem", address=f"unix://{tmp_path}/no-such.sock", queue_size=1
    )
    b = start_broker(hsm_home, database=tmp_path / "metrics.db", audit_sinks=(siem,))
    endpoint = serve_metrics(b.app.metrics, "127.0.0.1:0")
    try:
        yield b, endpoint
    finally:
        endpoint.close()
        b.close()


def test_calls_show_in_the_scrape(metered: tuple[Broker, MetricsEndpoint]) -> None:
    b, endpoint = metered
    key_id = create_key(b)
    wrapped = datakey(b, key_id).wrapped_key
    token = issue(b, key_id).token
    assert decrypt(b, wrapped, token).plaintext
    # Refusals: a token for a principal without a decrypt grant, and tokens that do not verify.
    code, _ = code_of(lambda: issue(b, key_id, identity="producer"))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    code, _ = code_of(lambda: decrypt(b, wrapped, "not-a-token"))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    code, _ = code_of(lambda: decrypt(b, wrapped, token, identity="producer"))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    # The writer hands each batch to the sinks just after its callers return.
    stats = b.app.audit.writer.stats  # type: ignore[union-attr]
    (sink,) = b.app.audit_sinks.sinks
    wait_for(lambda: sink.stats().submitted == stats.events)  # type: ignore[attr-defined]

    s = scrape(endpoint.port)
    assert {
        "keybroker_hsm_operation_duration_seconds",
        "keybroker_hsm_errors",
        "keybroker_hsm_session_pool_size",
        "keybroker_hsm_sessions_in_use",
        "keybroker_audit_commit_duration_seconds",
        "keybroker_audit_batch_events",
        "keybroker_audit_commit_failures",
        "keybroker_audit_sink_dropped_events",
        "keybroker_audit_sink_failed_events",
        "keybroker_audit_sink_queued_events",
        "keybroker_tokens_issued",
        "keybroker_tokens_refused",
        "keybroker_health_status",
        "keybroker_dependency_up",
        "keybroker_rpc_calls",
        "keybroker_rpc_duration_seconds",
        "process_cpu_seconds",
    } <= s.families()

    # RPCs: each call by its method and status code, timed.
    calls = "keybroker_rpc_calls_total"
    crypto, tokens = "/keybroker.v1.Crypto/", "/keybroker.v1.Tokens/"
    assert s.value(calls, method="/keybroker.v1.KeyAdmin/CreateKey", code="OK") == 1
    assert s.value(calls, method=crypto + "GenerateDataKey", code="OK") == 1
    assert s.value(calls, method=tokens + "IssueToken", code="OK") == 1
    assert s.value(calls, method=tokens + "IssueToken", code="PERMISSION_DENIED") == 1
    assert s.value(calls, method=crypto + "Decrypt", code="OK") == 1
    assert s.value(calls, method=crypto + "Decrypt", code="UNAUTHENTICATED") == 2
    seconds = "keybroker_rpc_duration_seconds"
    assert s.value(seconds + "_count", method=crypto + "Decrypt") == 3
    assert s.value(seconds + "_bucket", method=crypto + "Decrypt", le="+Inf") == 3
    assert s.value(seconds + "_sum", method=crypto + "Decrypt") > 0

    # Tokens: one issued; one refused at issue, two refused when presented.
    assert s.value("keybroker_tokens_issued_total") == 1
    refused = "keybroker_tokens_refused_total"
    assert s.value(refused, stage="issue", reason="permission_denied") == 1
    assert s.value(refused, stage="use", reason="unauthenticated") == 2

    # HSM: the KEK generated, the data key wrapped and unwrapped, each timed once; no error.
    hsm_count = "keybroker_hsm_operation_duration_seconds_count"
    assert s.value(hsm_count, hsm="local", operation="generate_kek") == 1
    assert s.value(hsm_count, hsm="local", operation="encrypt") == 1
    assert s.value(hsm_count, hsm="local", operation="decrypt") == 1
    assert s.value(hsm_count, hsm="us-east", operation="check") >= 1  # the start's probe
    assert not any(name == "keybroker_hsm_errors_total" for name, _ in s.samples)
    pool_size = b.app.settings.hsms[0].pool_size
    assert s.value("keybroker_hsm_session_pool_size", hsm="local") == pool_size

    # Audit: the histograms count exactly what the writer committed.
    assert stats.events >= 7
    assert s.value("keybroker_audit_commit_duration_seconds_count") == stats.batches
    assert s.value("keybroker_audit_batch_events_count") == stats.batches
    assert s.value("keybroker_audit_batch_events_sum") == stats.events
    assert s.value("keybroker_audit_commit_failures_total") == 0

    # The SIEM sink cannot open: it holds one event and dropped the others, as it counts them.
    sink_stats = sink.stats()  # type: ignore[attr-defined]
    assert sink_stats.dropped == stats.events - 1
    assert s.value("keybroker_audit_sink_dropped_events_total", sink="siem") == sink_stats.dropped
    assert s.value("keybroker_audit_sink_queued_events", sink="siem") == 1

    # Health: nothing probed down.
    assert s.value("keybroker_health_status") == 1

    # No secret and no caller identity in any label or value.
    for secret in (token, wrapped.hex(), "producer", "consumer", key_id):
        assert secret not in s.text


def test_sessions_in_use_are_read_at_scrape_time(
    metered: tuple[Broker, MetricsEndpoint],
) -> None:
    b, endpoint = metered
    hsm = b.app.hsms["us-east"]
    with hsm.pool.lease("test"):  # type: ignore[attr-defined]
        assert scrape(endpoint.port).value("keybroker_hsm_sessions_in_use", hsm="us-east") == 1
    assert scrape(endpoint.port).value("keybroker_hsm_sessions_in_use", hsm="us-east") == 0


def test_an_hsm_failure_counts_as_an_error(metered: tuple[Broker, MetricsEndpoint]) -> None:
    import PyKCS11

    from hsm_sim.faults import FailOnCall

    b, endpoint = metered
    key_id = create_key(b)
    hsm = b.app.hsms["local"]
    fault = FailOnCall(1, PyKCS11.CKR_DEVICE_ERROR, names=frozenset({"generateRandom"}))
    hsm.gate.fault = fault  # type: ignore[attr-defined]
    try:
        code, _ = code_of(lambda: datakey(b, key_id))
    finally:
        hsm.gate.fault = None  # type: ignore[attr-defined]
    assert code == grpc.StatusCode.UNAVAILABLE
    s = scrape(endpoint.port)
    assert s.value("keybroker_hsm_errors_total", hsm="local", operation="random") == 1


def test_a_token_whose_audit_failed_counts_as_refused(hsm_home: Path, tmp_path: Path) -> None:
    from tests.integration.test_audit_and_fail_closed import SwitchableAuditStore

    audit = SwitchableAuditStore(tmp_path / "audit.db")
    b = start_broker(hsm_home, audit_store=audit, database=tmp_path / "meta.db")
    endpoint = serve_metrics(b.app.metrics, "127.0.0.1:0")
    try:
        key_id = create_key(b)
        audit.failing = True
        code, _ = code_of(lambda: issue(b, key_id))
        audit.failing = False
        s = scrape(endpoint.port)
    finally:
        endpoint.close()
        b.close()
    assert code == grpc.StatusCode.UNAVAILABLE
    # Signed, but never handed out: its audit record could not be written.
    assert s.value("keybroker_tokens_issued_total") == 0
    assert s.value("keybroker_tokens_refused_total", stage="issue", reason="audit_unavailable") == 1
    assert s.value("keybroker_audit_commit_failures_total") == 1


def test_two_brokers_in_one_process_keep_their_own_numbers(
    metered: tuple[Broker, MetricsEndpoint], hsm_home: Path, tmp_path: Path
) -> None:
    _, endpoint = metered
    other = start_broker(hsm_home, database=tmp_path / "other.db")
    try:
        create_key(other)
        datakey(other, create_key(other))
    finally:
        other.close()
    s = scrape(endpoint.port)
    count = "keybroker_hsm_operation_duration_seconds_count"
    assert (count, frozenset({("hsm", "local"), ("operation", "encrypt")})) not in s.samples


def free_port_pair() -> int:
    """A port P such that P and P + 1 are free on loopback now."""
    for _ in range(50):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
        return int(port)
    raise AssertionError("no two consecutive free ports")


def test_each_worker_serves_its_metrics_on_its_own_port(tmp_path: Path) -> None:
    home = tmp_path / "home"
    port = free_port_pair()
    config = tmp_path / "kb.toml"
    config.write_text(f'[metrics]\nlisten = "127.0.0.1:{port}"\n')
    proc = start(home, "--workers", "2", "--config", str(config))
    try:
        target = wait_ready(proc, home)
        with channel(home, target) as admin:
            key_admin_pb2_grpc.KeyAdminStub(admin).CreateKey(
                key_admin_pb2.CreateKeyRequest(key_id="m", policy=standard_policy()), timeout=30
            )
        calls = 12
        for _ in range(calls):  # a connection each: the kernel spreads them over the workers
            with channel(home, target, "producer") as ch:
                crypto_pb2_grpc.CryptoStub(ch).GenerateDataKey(
                    crypto_pb2.GenerateDataKeyRequest(key_id="m", context={"dataset": "d"}),
                    timeout=30,
                )
        scrapes = [scrape(port), scrape(port + 1)]
    finally:
        code, out = stop(proc)
    assert code == 0, out
    assert f"http://127.0.0.1:{port}/metrics to :{port + 1}, one port per worker" in out
    count = "keybroker_hsm_operation_duration_seconds_count"
    wraps = [
        s.samples.get((count, frozenset({("hsm", "local"), ("operation", "encrypt")})), 0)
        for s in scrapes
    ]
    # Every GenerateDataKey wrapped its key on one worker or the other, and nowhere twice.
    assert sum(wraps) == calls
    rpc = ("keybroker_rpc_calls_total", "/keybroker.v1.Crypto/GenerateDataKey")
    served = [
        s.samples.get((rpc[0], frozenset({("method", rpc[1]), ("code", "OK")})), 0) for s in scrapes
    ]
    assert served == wraps
    for s in scrapes:
        assert s.value("keybroker_health_status") == 1
        assert s.value("keybroker_dependency_up", dependency="store") == 1
        assert s.value("keybroker_hsm_session_pool_size", hsm="local") == 4


def test_several_workers_need_a_fixed_metrics_port(tmp_path: Path) -> None:
    config = tmp_path / "kb.toml"
    config.write_text('[metrics]\nlisten = "127.0.0.1:0"\n')
    proc = subprocess.run(
        [*SERVER, "--home", str(tmp_path / "h"), "--listen", "127.0.0.1:0", "--workers", "2",
         "--config", str(config)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "metrics.listen: with 2 workers give a fixed port" in proc.stderr
    assert "Traceback" not in proc.stderr
