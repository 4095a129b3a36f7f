"""`keybroker-server --workers N`: N processes on one port, each with its own PKCS#11 sessions."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from keybroker.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    crypto_pb2,
    crypto_pb2_grpc,
    key_admin_pb2,
    key_admin_pb2_grpc,
)

from tests.integration.flows import standard_policy
from tests.integration.test_server_process import SERVER, channel, start, stop, wait_ready


def children(pid: int) -> set[int]:
    """Process ids whose parent is `pid`, from /proc."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: fields start after the last ')'.
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.add(int(entry))
    return found


def wait_for(predicate, timeout: float = 60):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


def many_data_keys(home: Path, target: str, count: int) -> list[bytes]:
    """GenerateDataKey over `count` separate connections (the kernel spreads connections)."""

    def one(_: int) -> bytes:
        with channel(home, target, "producer") as ch:
            reply = crypto_pb2_grpc.CryptoStub(ch).GenerateDataKey(
                crypto_pb2.GenerateDataKeyRequest(key_id="w", context={"dataset": "d"}),
                timeout=30,
            )
            return bytes(reply.wrapped_key)

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, range(count)))


def test_workers_share_one_port_and_stop_together(tmp_path: Path) -> None:
    home = tmp_path / "home"
    proc = start(home, "--workers", "2")
    try:
        target = wait_ready(proc, home)
        workers = wait_for(lambda: children(proc.pid) if len(children(proc.pid)) == 2 else None)
        with channel(home, target) as ch:
            key_admin_pb2_grpc.KeyAdminStub(ch).CreateKey(
                key_admin_pb2.CreateKeyRequest(key_id="w", policy=standard_policy()), timeout=30
            )
        assert len(set(many_data_keys(home, target, 24))) == 24

        # A worker that dies is replaced; the broker keeps serving on the same port.
        victim = sorted(workers)[0]
        os.kill(victim, signal.SIGKILL)
        replaced = wait_for(
            lambda: (
                children(proc.pid)
                if len(children(proc.pid)) == 2 and victim not in children(proc.pid)
                else None
            )
        )
        assert replaced - workers
        wait_for(lambda: len(many_data_keys(home, target, 4)) == 4)

        with channel(home, target, "auditor") as ch:
            report = audit_pb2_grpc.AuditStub(ch).VerifyAuditLog(
                audit_pb2.VerifyAuditLogRequest(), timeout=60
            )
            events = [
                r.event
                for r in audit_pb2_grpc.AuditStub(ch).ListAuditEvents(
                    audit_pb2.ListAuditEventsRequest(operation="GenerateDataKey"), timeout=60
                )
            ]
        assert report.ok, report.error
        # Both workers served (24 connections spread by the kernel), each on its own chain,
        # and one trail verifies across them.
        assert len({e.chain for e in events}) >= 2
        assert report.events_checked >= 29
    finally:
        code, out = stop(proc)
    assert code == 0, out
    assert "2 workers" in out
    assert not children(proc.pid)
    assert not (home / "listen.addr").exists()


def test_workers_on_a_busy_port_is_one_clear_line(tmp_path: Path) -> None:
    import socket
    import subprocess

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    try:
        env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}
        proc = subprocess.run(
            [*SERVER, "--home", str(tmp_path / "h"), "--listen", f"127.0.0.1:{port}",
             "--workers", "2"],
            capture_output=True, text=True, env=env, timeout=120,
        )  # fmt: skip
    finally:
        busy.close()
    assert proc.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr + proc.stdout


@pytest.mark.parametrize("workers", ["0", "65"])
def test_workers_out_of_range_is_refused(tmp_path: Path, workers: str) -> None:
    import subprocess

    proc = subprocess.run(
        [*SERVER, "--home", str(tmp_path / "h"), "--workers", workers],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "--workers" in proc.stderr
