"""`keybroker-server` as a user runs it: first start, banner, restart, SIGTERM, bad PIN."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from keybroker.v1 import key_admin_pb2, key_admin_pb2_grpc

from tests.integration.flows import standard_policy
from tests.store_fixtures import server_env, using_postgres

SERVER = [sys.executable, "-m", "broker"]


def start(home: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    run_env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}
    run_env.update(server_env(home))  # PostgreSQL on a --store=postgres run
    run_env.update(env or {})
    return subprocess.Popen(
        [*SERVER, "--home", str(home), "--listen", "127.0.0.1:0", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=run_env,
    )


def wait_ready(proc: subprocess.Popen[str], home: Path, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    addr = home / "listen.addr"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {proc.stdout.read() if proc.stdout else ''}")
        if addr.exists() and addr.read_text().strip():
            return addr.read_text().strip()
        time.sleep(0.1)
    raise AssertionError("server did not become ready")


def channel(home: Path, target: str, identity: str = "admin") -> grpc.Channel:
    pki = home / "pki"
    return grpc.secure_channel(
        target,
        grpc.ssl_channel_credentials(
            (pki / "ca.pem").read_bytes(),
            (pki / f"{identity}.key").read_bytes(),
            (pki / f"{identity}.pem").read_bytes(),
        ),
    )


def stop(proc: subprocess.Popen[str]) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    return proc.returncode, out


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "home"


def test_first_start_restart_and_graceful_stop(home: Path) -> None:
    proc = start(home)
    try:
        target = wait_ready(proc, home)
        pin_file = home / "hsm.pin"
        assert pin_file.stat().st_mode & 0o777 == 0o600
        for name in ("ca", "server", "admin", "auditor", "producer", "consumer"):
            assert (home / "pki" / f"{name}.pem").exists()
            assert (home / "pki" / f"{name}.key").stat().st_mode & 0o777 == 0o600
        assert (home / "softhsm2.conf").exists()
        assert (home / "keybroker.db").exists() != using_postgres()
        with channel(home, target) as ch:
            health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            key_admin_pb2_grpc.KeyAdminStub(ch).CreateKey(
                key_admin_pb2.CreateKeyRequest(key_id="survives-restart", policy=standard_policy())
            )
    finally:
        code, out = stop(proc)
    assert code == 0, out
    assert "keybroker listening on 127.0.0.1:" in out
    # The line to copy into another shell, with the home made absolute, then what to try.
    assert f"\nexport KEYBROKER_HOME={home.absolute()}\n" in out
    assert "  try       keybroker --as admin keys create demo" in out
    assert (home / "hsm.pin").read_text() not in out
    ca_before = (home / "pki" / "ca.pem").read_bytes()
    pin_before = (home / "hsm.pin").read_bytes()

    proc = start(home)
    try:
        target = wait_ready(proc, home)
        assert (home / "pki" / "ca.pem").read_bytes() == ca_before
        assert (home / "hsm.pin").read_bytes() == pin_before
        with channel(home, target) as ch:
            key = (
                key_admin_pb2_grpc.KeyAdminStub(ch)
                .GetKey(key_admin_pb2.GetKeyRequest(key_id="survives-restart"))
                .key
            )
            assert key.primary_version == 1
    finally:
        code, out = stop(proc)
    assert code == 0, out
    assert not (home / "listen.addr").exists()


def test_wrong_pin_refuses_to_start(home: Path) -> None:
    proc = start(home)
    wait_ready(proc, home)
    stop(proc)
    env = {"KEYBROKER_HSM_PIN": "definitely-wrong"}
    proc = start(home, env=env)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "start-up failed" in out and "PIN" in out.upper()
    assert "definitely-wrong" not in out


def test_bad_config_is_a_clear_error(home: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[[hsm]]\nname = "x"\n')
    proc = start(home, "--config", str(cfg))
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "hsm[0].jurisdiction is required" in out
    assert "Traceback" not in out


def test_port_in_use_is_a_clear_error(home: Path) -> None:
    import socket

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    try:
        run_env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}
        proc = subprocess.run(
            [*SERVER, "--home", str(home), "--listen", f"127.0.0.1:{port}"],
            capture_output=True,
            text=True,
            env=run_env,
            timeout=60,
        )
    finally:
        busy.close()
    assert proc.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr + proc.stdout
