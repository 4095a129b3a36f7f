"""`keybroker-server` as a process, for faults only a process shows: SIGKILL, syscalls that
fail (strace), a start that must be refused.

Each broker has its home of its own (its own SoftHSM2 token, database and development PKI),
so what its start-up scan reads is its own. Faults are chosen by the configuration file, as
an operator's test environment would: `[[hsm]] fault_injection = "hsm_sim.faulty:from_spec"`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from keybroker.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    crypto_pb2_grpc,
    key_admin_pb2_grpc,
    tokens_pb2_grpc,
)

from broker.config import FAULT_INJECTION_ENV

ROOT = Path(__file__).resolve().parents[3]
SERVER = [sys.executable, "-m", "broker"]
#: Only ends a test whose broker hung; never asserted on.
READY_LIMIT = 90.0


def config_file(home: Path, name: str, fault_spec: str = "") -> Path:
    """HOME/../NAME.toml: the embedded default's HSM (token "keybroker" under HOME, PIN in
    HOME/hsm.pin), wrapped by `hsm_sim.faulty` when `fault_spec` is given."""
    lines = [
        "[[hsm]]",
        'name = "local"',
        'jurisdiction = "FR"',
        'operator = "test SoftHSM2"',
        f"pin_file = {json.dumps(str(home / 'hsm.pin'))}",
        "softhsm_init = true",
    ]
    if fault_spec:
        lines += [
            'fault_injection = "hsm_sim.faulty:from_spec"',
            f"fault_spec = {json.dumps(fault_spec)}",
        ]
    path = home.parent / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def server_env(**extra: str) -> dict[str, str]:
    """The test's environment without its SoftHSM2 configuration (the broker uses its home's),
    with the repository on the path (hsm_sim is not packaged) and fault injection allowed."""
    env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    env[FAULT_INJECTION_ENV] = "1"
    env.update(extra)
    return env


@dataclass
class BrokerProcess:
    """A running `keybroker-server`; its merged output is collected line by line."""

    home: Path
    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    target: str = ""
    _channels: dict[str, grpc.Channel] = field(default_factory=dict)
    _reader: threading.Thread | None = None

    @classmethod
    def start(cls, home: Path, *args: str, env: dict[str, str] | None = None) -> BrokerProcess:
        # Left by a broker that was killed: `wait_ready` must see this one's.
        (home / "listen.addr").unlink(missing_ok=True)
        proc = subprocess.Popen(
            [*SERVER, "--home", str(home), "--listen", "127.0.0.1:0", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env or server_env(),
            cwd=ROOT,
        )
        broker = cls(home, proc)
        broker._reader = threading.Thread(target=broker._read, daemon=True)
        broker._reader.start()
        return broker

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_ready(self) -> BrokerProcess:
        addr = self.home / "listen.addr"
        self.wait_for(lambda: addr.exists() and bool(addr.read_text().strip()), "ready")
        self.target = addr.read_text().strip()
        return self

    def wait_line(self, pattern: str) -> str:
        """The first output line matching `pattern` (a regular expression), once it is out."""
        found: list[str] = []

        def seen() -> bool:
            found[:] = [line for line in list(self.lines) if re.search(pattern, line)]
            return bool(found)

        self.wait_for(seen, f"a line matching {pattern!r}")
        return found[0]

    def wait_for(self, condition: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + READY_LIMIT
        while not condition():
            if self.proc.poll() is not None and not condition():
                time.sleep(0.2)  # the reader may still be catching up with the last lines
                if condition():
                    return
                raise AssertionError(f"broker exited ({self.proc.returncode}):\n{self.output}")
            if time.monotonic() > deadline:
                raise AssertionError(f"broker never got to {what}:\n{self.output}")
            time.sleep(0.05)

    def channel(self, identity: str = "admin") -> grpc.Channel:
        if identity not in self._channels:
            pki = self.home / "pki"
            creds = grpc.ssl_channel_credentials(
                (pki / "ca.pem").read_bytes(),
                (pki / f"{identity}.key").read_bytes(),
                (pki / f"{identity}.pem").read_bytes(),
            )
            self._channels[identity] = grpc.secure_channel(self.target, creds)
        return self._channels[identity]

    # The stubs by the names tests.broker_fixtures.Broker gives them, so that the helpers of
    # tests.integration.flows work on a process too.

    def keys(self, identity: str = "admin") -> key_admin_pb2_grpc.KeyAdminStub:
        return key_admin_pb2_grpc.KeyAdminStub(self.channel(identity))

    def crypto(self, identity: str) -> crypto_pb2_grpc.CryptoStub:
        return crypto_pb2_grpc.CryptoStub(self.channel(identity))

    def tokens(self, identity: str) -> tokens_pb2_grpc.TokensStub:
        return tokens_pb2_grpc.TokensStub(self.channel(identity))

    def audit(self, identity: str = "auditor") -> audit_pb2_grpc.AuditStub:
        return audit_pb2_grpc.AuditStub(self.channel(identity))

    def verify(self) -> audit_pb2.VerifyAuditLogResponse:
        return self.audit().VerifyAuditLog(audit_pb2.VerifyAuditLogRequest(), timeout=60)

    def kill(self) -> None:
        """SIGKILL: no drain, no closing checkpoint, nothing flushed."""
        self.proc.send_signal(signal.SIGKILL)
        self._finish()

    def stop(self) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self._finish()
        return self.proc.returncode

    def _finish(self) -> None:
        for ch in self._channels.values():
            ch.close()
        self._channels.clear()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        if self._reader is not None:
            self._reader.join(timeout=10)


@contextmanager
def running(home: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[BrokerProcess]:
    """A ready broker, stopped (or killed, if the test did not) at the end of the block."""
    broker = BrokerProcess.start(home, *args, env=env)
    try:
        yield broker.wait_ready()
    finally:
        if broker.proc.poll() is None:
            broker.stop()
