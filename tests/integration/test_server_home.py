"""`keybroker-server` and its home, as a user runs it: --version, --check-config, one broker
per home (the lock goes with the process, SIGKILL included), a busy port in one line, and a
home that is the owner's only whatever it was before."""

from __future__ import annotations

import importlib.metadata
import os
import signal
import socket
import stat
import subprocess
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.integration.test_server_process import SERVER, channel, start, stop, wait_ready


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    run_env = {k: v for k, v in os.environ.items() if not k.startswith(("KEYBROKER_", "SOFTHSM"))}
    run_env.update(env or {})
    return subprocess.run(
        [*SERVER, *args], capture_output=True, text=True, env=run_env, timeout=120
    )


def serving(home: Path, target: str) -> bool:
    with channel(home, target) as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def banner_address(proc: subprocess.Popen[str]) -> str:
    """The address of the banner's first line, once the broker serves."""
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("keybroker listening on "):
            return line.split()[3]
    raise AssertionError(f"the broker exited ({proc.wait()}) without serving")


def modes(home: Path) -> dict[str, int]:
    return {
        str(p.relative_to(home)): stat.S_IMODE(p.lstat().st_mode)
        for p in [home, *home.rglob("*")]
        if not p.is_symlink()
    }


def test_version_is_the_installed_packages() -> None:
    result = run("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"keybroker-server {importlib.metadata.version('keybroker-server')}\n"


def test_check_config_exit_codes_and_lines(tmp_path: Path) -> None:
    home = tmp_path / "home"
    ok = run("--check-config", "--home", str(home), env={"KEYBROKER_WORKERS": "3"})
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("ok: the settings are usable\n")
    assert "  listen    127.0.0.1:50051 (mutual TLS), 3 worker(s)\n" in ok.stdout
    assert "  env       KEYBROKER_WORKERS\n" in ok.stdout
    assert not home.exists()  # no HSM, no database, no PKI: nothing was opened or made

    config = tmp_path / "kb.toml"
    config.write_text(
        '[audit]\nchekpoint_events = 5\n[limits]\nmax_workers = "eight"\n'
        '[[hsm]]\nname = "paris"\njurisdiction = "FR"\noperator = "o"\npin = "0000-1111"\n'
    )
    bad = run("--check-config", "--home", str(home), "--config", str(config))
    assert bad.returncode == 2
    assert bad.stdout == ""
    assert bad.stderr.splitlines() == [
        f"keybroker-server: {config}: unknown key 'audit.chekpoint_events'; "
        "did you mean 'audit.checkpoint_events'?",
        f"keybroker-server: {config}: limits.max_workers must be an integer, not a string",
        f"keybroker-server: {config}: 'hsm[0].pin' is a secret and is never read from the "
        "configuration file; use 'hsm[0].pin_file' (a file of mode 0600) or 'hsm[0].pin_env' "
        "(the name of an environment variable) or KEYBROKER_HSM_PIN (the first HSM's PIN)",
    ]
    assert "0000-1111" not in bad.stderr
    assert "Traceback" not in bad.stderr


def test_a_ca_key_as_the_server_key_refuses_the_start(tmp_path: Path) -> None:
    """A non-development configuration that would hand the broker a CA's private key does not
    start (before any HSM is opened); the same files checked ahead say so too."""
    pki = tmp_path / "dev" / "pki"
    assert run("--check-config", "--home", str(tmp_path / "dev")).returncode == 0
    from broker.devpki import ensure_dev_pki

    ensure_dev_pki(pki, ("admin",))
    config = tmp_path / "kb.toml"
    config.write_text(
        f'[tls]\ncert = "{pki / "ca.pem"}"\nkey = "{pki / "ca.key"}"\nclient_ca = "{pki / "ca.pem"}"\n'
    )
    home = tmp_path / "home"
    for args in (["--check-config"], ["--listen", "127.0.0.1:0"]):
        result = run(*args, "--home", str(home), "--config", str(config))
        assert result.returncode == 2, result.stderr
        assert "keybroker-server: tls.key: it is the private key of the client CA" in result.stderr
        assert "Traceback" not in result.stderr
    assert not (home / "keybroker.db").exists()


def test_a_second_broker_on_one_home_is_refused_until_the_first_is_gone(home: Path) -> None:
    first = start(home)
    try:
        target = wait_ready(first, home)
        second = run("--home", str(home), "--listen", "127.0.0.1:0")
        assert second.returncode == 2
        (line,) = second.stderr.splitlines()
        assert line.startswith(
            f"keybroker-server: home {home} is in use by another broker: pid {first.pid} ("
        )
        assert "-m broker --home" in line and line.endswith(
            "; stop it first, or give this one another --home"
        )
        # The refused one touched nothing: the first's address stays, and it still serves.
        assert (home / "listen.addr").read_text().strip() == target
        assert serving(home, target)
        ok = run("--check-config", "--home", str(home))
        assert f"  home      {home} (in use by pid {first.pid})\n" in ok.stdout
        # SIGKILL: no clean-up runs, and the kernel drops the lock all the same.
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        assert (home / "listen.addr").read_text().strip() == target  # stale
        again = start(home)
        try:
            address = banner_address(again)
            assert (home / "listen.addr").read_text().strip() == address
            assert serving(home, address)
        finally:
            code, out = stop(again)
        assert code == 0, out
    finally:
        if first.poll() is None:
            stop(first)


def test_workers_share_the_lock_and_a_second_broker_is_refused(home: Path) -> None:
    supervisor = start(home, "--workers", "2")
    try:
        target = wait_ready(supervisor, home)
        assert serving(home, target)
        second = run("--home", str(home), "--listen", "127.0.0.1:0")
        assert second.returncode == 2
        assert f"is in use by another broker: pid {supervisor.pid} (" in second.stderr
    finally:
        code, out = stop(supervisor)
    assert code == 0, out


def test_a_busy_port_is_one_line(home: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        result = run("--home", str(home), "--listen", f"127.0.0.1:{port}")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == (
        f"keybroker-server: cannot listen on 127.0.0.1:{port}: address already in use\n"
    )
    assert not (home / "keybroker.db").exists()  # refused before anything was opened


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.mark.sqlite("the modes of the SQLite file and its WAL in the home")
def test_the_home_is_the_owners_only_whatever_it_was(home: Path) -> None:
    # A home made by hand with the usual umask: 0755.
    home.mkdir(mode=0o755)
    home.chmod(0o755)
    proc = start(home)
    try:
        wait_ready(proc, home)
        first = modes(home)
    finally:
        code, out = stop(proc)
    assert code == 0, out
    assert "keybroker.db-wal" in first and "keybroker.db-shm" in first
    assert {k: v for k, v in first.items() if v not in (0o600, 0o700)} == {}

    # Loosen everything (a restore, an older version), but the PIN file, which is refused
    # rather than fixed; a file of the user's own is left as it is.
    (home / "notes.txt").write_text("mine")
    for path in [home, *home.rglob("*")]:
        if path.name != "hsm.pin":
            path.chmod(0o755 if path.is_dir() else 0o644)
    proc = start(home)
    try:
        wait_ready(proc, home)
        second = modes(home)
    finally:
        code, out = stop(proc)
    assert code == 0, out
    assert second.pop("notes.txt") == 0o644
    assert second["."] == 0o700
    for name in ("keybroker.db", "keybroker.db-wal", "keybroker.db-shm", "listen.addr",
                 "broker.lock", "pki/ca.key", "pki/server.key", "pki/ca.pem", "softhsm2.conf"):  # fmt: skip
        assert second[name] == 0o600, name
    assert {k: v for k, v in second.items() if v not in (0o600, 0o700)} == {}
    assert "were open to group or others and are now the owner's only" in out
