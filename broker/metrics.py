"""Prometheus metrics of one broker process, and the plain-HTTP endpoint that serves them.

Every broker process keeps its own `CollectorRegistry` (not prometheus_client's global one), so
two brokers in one test process, or the workers of `--workers N`, never mix their numbers.
Values that other parts already count (the session pools, the secondary audit sinks) are read
when Prometheus scrapes, by collectors; the rest is recorded through small hooks that the
composition root (`broker.app`) hands to the adapters and services, which never import this
module.

No metric carries a secret or a caller's identity: labels are RPC method names, status codes,
HSM and sink names, operation names and error classes, all from small fixed sets (docs/metrics.md).
"""

from __future__ import annotations

import ipaddress
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from broker.domain import AuditEvent, AuditFilter
from broker.ports import AuditSnapshot, AuditStore, Record

log = logging.getLogger(__name__)

#: Seconds. Most calls take a millisecond or two; a slow HSM or audit fsync shows at the top.
RPC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
#: Seconds. One AES-GCM or ECDSA operation on SoftHSM2 takes tens of microseconds.
HSM_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1, 5)
#: Seconds: one audit transaction, fsync included.
COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
#: Events per audit transaction, up to the writer's 512.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class PoolUse(Protocol):
    """A session pool as the metrics read it (`SessionPool`)."""

    @property
    def size(self) -> int:
        """Most sessions open at once."""

    @property
    def in_use(self) -> int:
        """Sessions leased to an operation now."""


class SinkCounts(Protocol):
    """What became of a secondary sink's events (`SinkStats`)."""

    @property
    def dropped(self) -> int: ...

    @property
    def failed(self) -> int: ...

    @property
    def queued(self) -> int: ...


class _Snapshot(Collector):
    """Builds metric families when scraped, from counters kept elsewhere."""

    def __init__(self, build: Callable[[], Iterable[Metric]]) -> None:
        self._build = build

    def collect(self) -> Iterable[Metric]:
        return list(self._build())


class Metrics:
    """The metrics of one broker process, in a registry of its own (`registry`).

    The hooks (`rpc_finished`, `hsm_operation`, `issued`, `refused`) must be cheap and never
    raise: they run on the request path.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self._rpc_calls = Counter(
            "keybroker_rpc_calls", "RPCs finished, by method and status code",
            ["method", "code"], registry=r,
        )  # fmt: skip
        self._rpc_seconds = Histogram(
            "keybroker_rpc_duration_seconds", "Time from the start of an RPC to its status",
            ["method"], buckets=RPC_BUCKETS, registry=r,
        )  # fmt: skip
        self._hsm_seconds = Histogram(
            "keybroker_hsm_operation_duration_seconds",
            "Time of one HSM operation, waiting for a pooled session included",
            ["hsm", "operation"], buckets=HSM_BUCKETS, registry=r,
        )  # fmt: skip
        self._hsm_errors = Counter(
            "keybroker_hsm_errors", "HSM operations that failed because the HSM failed or "
            "could not be reached (not the caller's doing, such as a bad tag)",
            ["hsm", "operation"], registry=r,
        )  # fmt: skip
        self._commit_seconds = Histogram(
            "keybroker_audit_commit_duration_seconds",
            "Time of one audit transaction (a batch of events made durable)",
            buckets=COMMIT_BUCKETS, registry=r,
        )  # fmt: skip
        self._batch_events = Histogram(
            "keybroker_audit_batch_events", "Events per audit transaction",
            buckets=BATCH_BUCKETS, registry=r,
        )  # fmt: skip
        self._commit_failures = Counter(
            "keybroker_audit_commit_failures",
            "Audit transactions that failed (their calls were refused)", registry=r,
        )  # fmt: skip
        self._tokens_issued = Counter(
            "keybroker_tokens_issued", "Decryption tokens issued", registry=r
        )
        self._tokens_refused = Counter(
            "keybroker_tokens_refused",
            "Token requests (stage=issue) and token uses (stage=use) refused, by error class",
            ["stage", "reason"], registry=r,
        )  # fmt: skip
        self._dependency_up = Gauge(
            "keybroker_dependency_up",
            "1 when the last health probe of the dependency passed, else 0",
            ["dependency"], registry=r,
        )  # fmt: skip
        self._up: dict[str, bool] = {}
        self._up_lock = threading.Lock()
        health = Gauge(
            "keybroker_health_status",
            "1 while the broker reports SERVING (every probed dependency up), 0 for NOT_SERVING",
            registry=r,
        )  # fmt: skip
        health.set_function(lambda: float(self.healthy))

    # -- hooks -----------------------------------------------------------------------------

    def rpc_finished(self, method: str, code: str, seconds: float) -> None:
        """One RPC ended with status `code` (e.g. "OK", "PERMISSION_DENIED")."""
        self._rpc_calls.labels(method, code).inc()
        self._rpc_seconds.labels(method).observe(seconds)

    def hsm_operation(self, hsm: str, operation: str, seconds: float, failed: bool) -> None:
        """One HSM operation ended; `failed` when the HSM failed or was unreachable."""
        self._hsm_seconds.labels(hsm, operation).observe(seconds)
        if failed:
            self._hsm_errors.labels(hsm, operation).inc()

    def issued(self) -> None:
        """A decryption token was issued."""
        self._tokens_issued.inc()

    def refused(self, stage: str, error: Exception) -> None:
        """A token request (stage "issue") or a token presented (stage "use") was refused with
        `error`, counted by its class (`error_class`)."""
        self._tokens_refused.labels(stage, error_class(error)).inc()

    def commit_finished(self, events: int, seconds: float, failed: bool) -> None:
        """One audit transaction of `events` events ended."""
        if failed:
            self._commit_failures.inc()
            return
        self._commit_seconds.observe(seconds)
        self._batch_events.observe(events)

    # -- wiring ----------------------------------------------------------------------------

    def probe(self, dependency: str, check: Callable[[], None]) -> Callable[[], None]:
        """`check`, recording in `keybroker_dependency_up` whether it passed (it still raises
        for the health monitor). The dependency counts as up until its first probe, as the
        broker only starts once its dependencies answered."""
        self._set_up(dependency, True)

        def probed() -> None:
            try:
                check()
            except BaseException:
                self._set_up(dependency, False)
                raise
            self._set_up(dependency, True)

        return probed

    @property
    def healthy(self) -> bool:
        """Whether every probed dependency passed its last probe."""
        with self._up_lock:
            return all(self._up.values())

    def watch_pools(self, pools: Mapping[str, PoolUse]) -> None:
        """Reports each HSM's session pool (size and sessions in use) when scraped."""

        def build() -> Iterator[Metric]:
            size = GaugeMetricFamily(
                "keybroker_hsm_session_pool_size", "Most PKCS#11 sessions open at once",
                labels=["hsm"],
            )  # fmt: skip
            in_use = GaugeMetricFamily(
                "keybroker_hsm_sessions_in_use", "PKCS#11 sessions leased to an operation now",
                labels=["hsm"],
            )  # fmt: skip
            for name, pool in pools.items():
                size.add_metric([name], pool.size)
                in_use.add_metric([name], pool.in_use)
            yield from (size, in_use)

        self.registry.register(_Snapshot(build))

    def watch_sinks(self, sinks: Mapping[str, Callable[[], SinkCounts]]) -> None:
        """Reports each secondary audit sink's own counts when scraped."""

        def build() -> Iterator[Metric]:
            dropped = CounterMetricFamily(
                "keybroker_audit_sink_dropped_events",
                "Events a secondary audit sink dropped (queue full, or left at stop); the "
                "audit trail itself still holds them", labels=["sink"],
            )  # fmt: skip
            failed = CounterMetricFamily(
                "keybroker_audit_sink_failed_events",
                "Events whose write to a secondary audit sink failed", labels=["sink"],
            )  # fmt: skip
            queued = GaugeMetricFamily(
                "keybroker_audit_sink_queued_events",
                "Events waiting for a secondary audit sink", labels=["sink"],
            )  # fmt: skip
            for name, stats in sinks.items():
                counts = stats()
                dropped.add_metric([name], counts.dropped)
                failed.add_metric([name], counts.failed)
                queued.add_metric([name], counts.queued)
            yield from (dropped, failed, queued)

        self.registry.register(_Snapshot(build))

    def timed_audit_store(self, store: AuditStore) -> AuditStore:
        """`store`, with each batch commit timed and counted."""
        return TimedAuditStore(store, self.commit_finished)

    def _set_up(self, dependency: str, up: bool) -> None:
        with self._up_lock:
            self._up[dependency] = up
        self._dependency_up.labels(dependency).set(1 if up else 0)


class TimedAuditStore(AuditStore):
    """An `AuditStore` whose `append_batch` (the group commit's transaction and fsync) reports
    its time and size; the rest passes through.

    Args:
        store: the audit tables.
        finished: called with (events, seconds, failed) after each `append_batch`.
    """

    def __init__(self, store: AuditStore, finished: Callable[[int, float, bool], None]) -> None:
        self._store = store
        self._finished = finished

    def append_batch(self, events: Sequence[AuditEvent]) -> list[int]:
        started = time.perf_counter()
        try:
            sequences = self._store.append_batch(events)
        except BaseException:
            self._finished(len(events), time.perf_counter() - started, True)
            raise
        self._finished(len(events), time.perf_counter() - started, False)
        return sequences

    def add_chain(self, record: Record) -> None:
        self._store.add_chain(record)

    def add_checkpoint(self, record: Record) -> None:
        self._store.add_checkpoint(record)

    def events(self, flt: AuditFilter) -> Iterator[AuditEvent]:
        return self._store.events(flt)

    def snapshot(self) -> AbstractContextManager[AuditSnapshot]:
        return self._store.snapshot()


_SNAKE = re.compile(r"(?<!^)(?=[A-Z])")


def error_class(exc: BaseException) -> str:
    """A bounded label for an error: its class in snake case ("PermissionDenied" ->
    "permission_denied"), never its message."""
    return _SNAKE.sub("_", type(exc).__name__).lower()


@dataclass(slots=True)
class MetricsEndpoint:
    """The running HTTP endpoint (`serve_metrics`)."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def address(self) -> str:
        host: str = self.server.socket.getsockname()[0]
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    @property
    def port(self) -> int:
        return int(self.server.socket.getsockname()[1])

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


def serve_metrics(metrics: Metrics, listen: str) -> MetricsEndpoint:
    """Serves `metrics` at http://LISTEN/metrics (prometheus_client's own HTTP server, plain
    HTTP, in a daemon thread); port 0 picks a free one.

    Raises:
        OSError: the address cannot be bound.
    """
    host, _, port = listen.rpartition(":")
    bare = host.strip("[]")
    server, thread = start_http_server(int(port), addr=bare, registry=metrics.registry)
    endpoint = MetricsEndpoint(server, thread)
    if not _is_loopback(bare):
        log.warning(
            "metrics served over plain HTTP on %s, beyond loopback: anyone who can reach it "
            "reads the broker's call counts (no secrets); restrict it with a firewall",
            endpoint.address,
        )
    log.info("metrics on http://%s/metrics", endpoint.address)
    return endpoint


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
