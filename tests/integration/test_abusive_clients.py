"""Abusive clients against `keybroker-server` as a process: many idle mTLS connections and
ping floods leave its memory bounded and its file descriptors coming back down.

The server's own /proc entries are read (it runs in a process of its own, so the test's
client sockets do not count). What bounds it is in `transport.server.server_options`:
idle connections are closed after `grpc.max_connection_idle_ms`, and a client pinging more
often than `grpc.http2.min_ping_interval_without_data_ms` is sent GOAWAY (too_many_pings)
after `grpc.http2.max_ping_strikes` strikes. Waits are polls with generous bounds.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from subprocess import Popen

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from keybroker.v1 import key_admin_pb2, key_admin_pb2_grpc

from tests.integration.test_server_process import start, stop, wait_ready

IDLE_CONNECTIONS = 200
PINGERS = 10
POLL_S = 30.0
#: Memory one idle mTLS connection may cost the server, at most (measured: about 70 KiB).
MAX_RSS_PER_CONNECTION = 512 * 1024
#: Descriptors the server may open or close on its own meanwhile (database, logs).
SLACK_FDS = 5


@dataclass
class Server:
    proc: Popen[str]
    home: Path
    target: str

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def rss(self) -> int:
        """Resident memory in bytes (VmRSS)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def channel(self, identity: str, *options: tuple[str, int]) -> grpc.Channel:
        """A channel with a connection of its own (no subchannel shared with another)."""
        pki = self.home / "pki"
        creds = grpc.ssl_channel_credentials(
            (pki / "ca.pem").read_bytes(),
            (pki / f"{identity}.key").read_bytes(),
            (pki / f"{identity}.pem").read_bytes(),
        )
        opts = [("grpc.use_local_subchannel_pool", 1), *options]
        return grpc.secure_channel(self.target, creds, options=opts)

    def serves(self) -> bool:
        """A health check and a key-admin call over a fresh connection."""
        with self.channel("admin") as ch:
            health = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(), timeout=30
            )
            key_admin_pb2_grpc.KeyAdminStub(ch).ListKeys(
                key_admin_pb2.ListKeysRequest(), timeout=30
            )
        return bool(health.status == health_pb2.HealthCheckResponse.SERVING)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("abusive") / "home"
    proc = start(home, "--log-level", "WARNING")
    try:
        s = Server(proc, home, wait_ready(proc, home))
        assert s.serves()  # warm: the first calls open what the server keeps open
        yield s
    finally:
        stop(proc)


def _poll(check: Callable[[], bool]) -> bool:
    end = time.monotonic() + POLL_S
    while not check():
        if time.monotonic() > end:
            return False
        time.sleep(0.2)
    return True


def test_many_idle_connections_cost_bounded_memory_and_are_given_back(server: Server) -> None:
    fds, rss = server.fds(), server.rss()
    channels = [server.channel("producer") for _ in range(IDLE_CONNECTIONS)]
    try:
        for ch in channels:
            grpc.channel_ready_future(ch).result(timeout=30)  # connected: TLS done, then idle
        # One socket each, all open at once.
        assert server.fds() >= fds + IDLE_CONNECTIONS - SLACK_FDS
        assert server.rss() - rss < IDLE_CONNECTIONS * MAX_RSS_PER_CONNECTION
        assert server.serves()  # the others are still served meanwhile
    finally:
        for ch in channels:
            ch.close()
    assert _poll(lambda: server.fds() <= fds + SLACK_FDS), (fds, server.fds())
    assert server.serves()


def test_a_ping_flood_is_cut_off_and_the_broker_still_serves(server: Server) -> None:
    fds = server.fds()
    flood = (
        ("grpc.keepalive_time_ms", 50),
        ("grpc.keepalive_timeout_ms", 1000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    )
    channels = [server.channel("producer", *flood) for _ in range(PINGERS)]
    try:
        for ch in channels:
            grpc.channel_ready_future(ch).result(timeout=30)
        # The server sends each pinger GOAWAY (too_many_pings) and drops its connection,
        # while the clients still hold their channels open.
        assert _poll(lambda: server.fds() <= fds + SLACK_FDS), (fds, server.fds())
        assert server.serves()
    finally:
        for ch in channels:
            ch.close()
