"""The gRPC server: mTLS, the four services, health, reflection and a graceful stop.

It is a grpc.aio server on an event loop of its own thread (`aio_runtime.LoopThread`), so the
callers of `create_server` and `RunningServer` stay synchronous. The servicers are the sync
classes of `servicers.py`; `aio_handlers.AioHandlers` serves them: the hot path (`INLINE`) on
the loop without a thread hand-off, everything else in a bounded thread pool (docs/api.md,
"How calls are served").
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

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
from broker.services.approvals import ApprovalService
from broker.services.audit import AuditReader
from broker.services.crypto import CryptoService
from broker.services.keys import KeyService
from broker.services.tokens import TokenService
from broker.transport.aio_handlers import Adder, AioHandlers, Route, RpcObserver
from broker.transport.aio_runtime import LoopThread
from broker.transport.auth import CertificateCheck
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

_CRYPTO = SERVICE_NAMES[1]
_TOKENS = SERVICE_NAMES[2]
#: The methods served on the event loop itself: the HSM-bound hot path and cheap reads. They
#: must not block on I/O other than the HSM (their audit events are awaited, not waited for);
#: every other method, including any added later, runs in the thread pool.
INLINE = frozenset(
    {
        f"/{_CRYPTO}/GenerateDataKey",
        f"/{_CRYPTO}/Encrypt",
        f"/{_CRYPTO}/Decrypt",
        f"/{_CRYPTO}/ReWrap",
        f"/{_TOKENS}/GetSigningKeys",
    }
)


@dataclass(frozen=True, slots=True)
class Services:
    keys: KeyService
    crypto: CryptoService
    tokens: TokenService
    audit: AuditReader
    #: The gated key changes (approvals.required) and the approval requests.
    approvals: ApprovalService
    audit_sinks: tuple[AuditSink, ...] = ()


@dataclass(frozen=True, slots=True)
class TlsMaterial:
    server_cert: bytes
    server_key: bytes
    client_ca: bytes
    #: Revoked client certificates (`tls.crl_file`, `tls.deny_list_file`), refused at their
    #: first call (grpcio checks no CRL during the handshake); None for none.
    revocations: CertificateCheck | None = None


class HealthStatus:
    """The health service's statuses, set from any thread (the aio health servicer lives on
    the server's loop; a call from that loop's own thread is scheduled without waiting)."""

    def __init__(self, servicer: health.aio.HealthServicer, runtime: LoopThread) -> None:
        self.servicer = servicer
        self._runtime = runtime

    def set(self, service: str, status: int) -> None:
        self._apply(self.servicer.set(service, status))

    def set_all(self, services: Sequence[str], status: int) -> None:
        """`set` for each of `services`, handed to the loop as one change (one wait)."""

        async def change() -> None:
            for service in services:
                await self.servicer.set(service, status)

        self._apply(change())

    def enter_graceful_shutdown(self) -> None:
        """Every service NOT_SERVING from now on, whatever is set later."""
        self._apply(self.servicer.enter_graceful_shutdown())

    def _apply(self, coro: Any) -> None:
        if self._runtime.closing:
            coro.close()  # the server is gone; so is its health service
            return
        if self._runtime.in_loop_thread():
            self._runtime.submit(coro)
            return
        try:
            self._runtime.run(coro, timeout=_HEALTH_TIMEOUT)
        except TimeoutError:
            # The loop is held up (a hung HSM call on the hot path): the change stays queued
            # and is applied once the loop runs again; the health monitor must not wait.
            log.warning("health status change queued: the server's loop is busy")
        except RuntimeError:
            # Stopping under our feet (the loop no longer runs it): nothing left to tell.
            log.debug("health status not set: the server is stopping")


#: Longest a health status change waits for the server's loop (seconds).
_HEALTH_TIMEOUT = 1.0


@dataclass(slots=True)
class RunningServer:
    """A started server: its ports, its health statuses, and how to stop it."""

    server: grpc.aio.Server
    port: int
    insecure_port: int
    health: HealthStatus
    _runtime: LoopThread = field(repr=False)
    _executor: ThreadPoolExecutor = field(repr=False)

    def stop(self, grace: float) -> None:
        """Health NOT_SERVING first, so balancers drain us; then finish calls in flight (at
        most `grace` seconds), then the thread pool and the loop."""
        if self._runtime.closing:
            return
        self.health.enter_graceful_shutdown()
        self._runtime.run(self.server.stop(grace))
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._runtime.close()


def keybroker_servicers(services: Services) -> list[tuple[Adder, Any]]:
    """The servicers and the generated functions that register them: every method of these
    services is served (a new service is one more line here)."""
    return [
        (
            key_admin_pb2_grpc.add_KeyAdminServicer_to_server,
            KeyAdminServicer(services.keys, services.approvals),
        ),
        (crypto_pb2_grpc.add_CryptoServicer_to_server, CryptoServicer(services.crypto)),
        (tokens_pb2_grpc.add_TokensServicer_to_server, TokensServicer(services.tokens)),
        (audit_pb2_grpc.add_AuditServicer_to_server, AuditServicer(services.audit)),
    ]


def routes(services: Services) -> dict[str, Route]:
    """Inline methods whose single calls may need the thread pool: a Decrypt with a token
    that counts its uses writes the count (a database commit) before it answers."""
    return {f"/{_CRYPTO}/Decrypt": lambda request: services.tokens.counts_uses(request.token)}


def server_options(reuse_port: bool) -> list[tuple[str, int]]:
    return [
        ("grpc.so_reuseport", 1 if reuse_port else 0),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_metadata_size", 16 * 1024),
        # Abusive clients: bound idle connections and ping floods.
        ("grpc.max_connection_idle_ms", 5 * 60 * 1000),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.http2.min_ping_interval_without_data_ms", 60 * 1000),
    ]


def create_server(
    services: Services,
    tls: TlsMaterial,
    listen: str,
    insecure_listen: str = "",
    max_workers: int = 16,
    max_concurrent_rpcs: int = 256,
    reuse_port: bool = False,
    observer: RpcObserver | None = None,
) -> RunningServer:
    """Builds and starts the server on an event loop thread of its own.

    Args:
        services: what the RPCs call.
        tls: the server's certificate and key, and the CA client certificates must chain to.
        listen: HOST:PORT (port 0 picks a free one).
        insecure_listen: a plaintext HOST:PORT for development, or "" for none.
        max_workers: threads of the pool that runs the methods not served inline.
        max_concurrent_rpcs: calls in flight at most; more are refused RESOURCE_EXHAUSTED.
        reuse_port: bind with SO_REUSEPORT (`--workers`).
        observer: told of every keybroker RPC once it ends (`RpcObserver`); None for none.

    Returns:
        The running server with its bound ports.

    Raises:
        OSError: the address cannot be bound.
    """
    runtime = LoopThread("grpc-aio")
    executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="rpc")
    try:
        server, health_servicer, port, insecure_port = runtime.run(
            _start(
                services,
                tls,
                listen,
                insecure_listen,
                max_concurrent_rpcs,
                reuse_port,
                AioHandlers(
                    runtime.loop,
                    executor,
                    INLINE,
                    routes(services),
                    observer,
                    certificates=tls.revocations,
                ),
            )
        )
    except BaseException:
        executor.shutdown(wait=False)
        runtime.close()
        raise
    status = HealthStatus(health_servicer, runtime)
    for sink in services.audit_sinks:
        sink.watch(_sink_health(status, AUDIT_SINK_HEALTH_PREFIX + sink.name))
    return RunningServer(server, port, insecure_port, status, runtime, executor)


async def _start(
    services: Services,
    tls: TlsMaterial,
    listen: str,
    insecure_listen: str,
    max_concurrent_rpcs: int,
    reuse_port: bool,
    handlers: AioHandlers,
) -> tuple[grpc.aio.Server, health.aio.HealthServicer, int, int]:
    server = grpc.aio.server(
        maximum_concurrent_rpcs=max_concurrent_rpcs, options=server_options(reuse_port)
    )
    handlers.install(server, keybroker_servicers(services))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    credentials = grpc.ssl_server_credentials(
        [(tls.server_key, tls.server_cert)],
        root_certificates=tls.client_ca,
        require_client_auth=True,
    )
    try:
        port = server.add_secure_port(listen, credentials)
    except RuntimeError as exc:  # grpc.aio raises where the sync server answered 0
        raise OSError(f"cannot listen on {listen}: {exc}") from exc
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
    await server.start()
    for name in (*SERVICE_NAMES, ""):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, health_servicer, port, insecure_port


def _sink_health(status: HealthStatus, name: str) -> Callable[[bool], None]:
    def update(healthy: bool) -> None:
        ok = health_pb2.HealthCheckResponse.SERVING
        status.set(name, ok if healthy else health_pb2.HealthCheckResponse.NOT_SERVING)

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
            self._running.health.set_all((*SERVICE_NAMES, ""), status)
            log.warning("health is now %s", "SERVING" if healthy else "NOT_SERVING")
        self.healthy = healthy
        return healthy

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.check_once()
