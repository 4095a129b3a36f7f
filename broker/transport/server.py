"""The gRPC server: mTLS, the four services, health, reflection and a graceful stop."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from keybroker.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    crypto_pb2,
    crypto_pb2_grpc,
    key_admin_pb2,
    key_admin_pb2_grpc,
    tokens_pb2,
    tokens_pb2_grpc,
)

from broker.ports import AuditSink
from broker.services.audit import AuditReader
from broker.services.crypto import CryptoService
from broker.services.keys import KeyService
from broker.services.tokens import TokenService
from broker.transport.interceptors import ErrorInterceptor
from broker.transport.servicers import (
    AuditServicer,
    CryptoServicer,
    KeyAdminServicer,
    TokensServicer,
)

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    key_admin_pb2.DESCRIPTOR.services_by_name["KeyAdmin"].full_name,
    crypto_pb2.DESCRIPTOR.services_by_name["Crypto"].full_name,
    tokens_pb2.DESCRIPTOR.services_by_name["Tokens"].full_name,
    audit_pb2.DESCRIPTOR.services_by_name["Audit"].full_name,
)
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
#: Each secondary audit sink reports in health as this prefix and its name: NOT_SERVING while
#: it fails or drops events. A health detail only: the broker itself keeps serving.
AUDIT_SINK_HEALTH_PREFIX = "keybroker.audit.sink."


@dataclass(frozen=True, slots=True)
class Services:
    keys: KeyService
    crypto: CryptoService
    tokens: TokenService
    audit: AuditReader
    audit_sinks: tuple[AuditSink, ...] = ()


@dataclass(frozen=True, slots=True)
class TlsMaterial:
    server_cert: bytes
    server_key: bytes
    client_ca: bytes


@dataclass(slots=True)
class RunningServer:
    server: grpc.Server
    port: int
    insecure_port: int
    health: health.HealthServicer

    def stop(self, grace: float) -> None:
        """Health NOT_SERVING first, so balancers drain us; then finish calls in flight."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()


def create_server(
    services: Services,
    tls: TlsMaterial,
    listen: str,
    insecure_listen: str = "",
    max_workers: int = 16,
    max_concurrent_rpcs: int = 256,
    reuse_port: bool = False,
) -> RunningServer:
    """Builds and starts the server.

    Returns:
        The running server and the bound port (listen on port 0 to pick a free one).
    """
    server = grpc.server(
        ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="rpc"),
        interceptors=[ErrorInterceptor()],
        maximum_concurrent_rpcs=max_concurrent_rpcs,
        options=[
            ("grpc.so_reuseport", 1 if reuse_port else 0),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_metadata_size", 16 * 1024),
            # Abusive clients: bound idle connections and ping floods.
            ("grpc.max_connection_idle_ms", 5 * 60 * 1000),
            ("grpc.http2.max_ping_strikes", 2),
            ("grpc.http2.min_ping_interval_without_data_ms", 60 * 1000),
        ],
    )
    key_admin_pb2_grpc.add_KeyAdminServicer_to_server(KeyAdminServicer(services.keys), server)
    crypto_pb2_grpc.add_CryptoServicer_to_server(CryptoServicer(services.crypto), server)
    tokens_pb2_grpc.add_TokensServicer_to_server(TokensServicer(services.tokens), server)
    audit_pb2_grpc.add_AuditServicer_to_server(AuditServicer(services.audit), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    credentials = grpc.ssl_server_credentials(
        [(tls.server_key, tls.server_cert)],
        root_certificates=tls.client_ca,
        require_client_auth=True,
    )
    port = server.add_secure_port(listen, credentials)
    if port == 0:
        raise OSError(f"cannot listen on {listen}")
    insecure_port = 0
    if insecure_listen:
        # Development only: no client certificate, so every key RPC answers UNAUTHENTICATED.
        insecure_port = server.add_insecure_port(insecure_listen)
        log.warning(
            "PLAINTEXT LISTENER ENABLED on %s: for local development and health probes only; "
            "key operations are refused on it",
            insecure_listen,
        )
    server.start()
    for name in (*SERVICE_NAMES, ""):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    for sink in services.audit_sinks:
        sink.watch(_sink_health(health_servicer, AUDIT_SINK_HEALTH_PREFIX + sink.name))
    return RunningServer(server, port, insecure_port, health_servicer)


def _sink_health(servicer: health.HealthServicer, name: str) -> Callable[[bool], None]:
    def update(healthy: bool) -> None:
        ok = health_pb2.HealthCheckResponse.SERVING
        servicer.set(name, ok if healthy else health_pb2.HealthCheckResponse.NOT_SERVING)

    return update


class HealthMonitor:
    """Probes the dependencies (HSMs) in the background and mirrors them in health.

    While any probe fails, every service reports NOT_SERVING, so a load balancer stops
    sending traffic to a broker that would only answer UNAVAILABLE; the first passing round
    brings SERVING back.

    Args:
        running: the server whose health servicer is updated.
        probes: callables that raise when their dependency is unreachable.
        interval: seconds between rounds.
    """

    def __init__(
        self, running: RunningServer, probes: Sequence[Callable[[], None]], interval: float = 5.0
    ) -> None:
        self._running = running
        self._probes = probes
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="health-monitor", daemon=True)
        self.healthy = True

    def start(self) -> HealthMonitor:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def check_once(self) -> bool:
        healthy = True
        for probe in self._probes:
            try:
                probe()
            except Exception as exc:  # noqa: BLE001 - any failure means not serving
                log.warning("health probe failed: %s", exc)
                healthy = False
        if healthy != self.healthy and not self._stop.is_set():
            status = (
                health_pb2.HealthCheckResponse.SERVING
                if healthy
                else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            for name in (*SERVICE_NAMES, ""):
                self._running.health.set(name, status)
            log.warning("health is now %s", "SERVING" if healthy else "NOT_SERVING")
        self.healthy = healthy
        return healthy

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.check_once()
