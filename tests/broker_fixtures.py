"""A real broker for integration tests: SoftHSM2 through PyKCS11, SQLite (or PostgreSQL on a
`--store=postgres` run, see tests/store_fixtures.py), gRPC over mTLS.

One SoftHSM2 configuration serves the whole test process (SoftHSM2 reads SOFTHSM2_CONF once
per process), with two of the simulated HSMs of `hsm_sim.tokens`: "local" (token "keybroker")
declared in FR and "us-east" declared in US.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path

import grpc
import pytest
from keybroker.v1 import audit_pb2_grpc, crypto_pb2_grpc, key_admin_pb2_grpc, tokens_pb2_grpc

from broker.app import App, build_app
from broker.clock import SystemClock
from broker.config import Settings, validate
from broker.ports import AuditStore
from broker.transport.server import RunningServer, create_server
from hsm_sim.tokens import FR, US, hsm_configs
from tests.store_fixtures import store_changes


class ShiftableClock:
    """The real clock plus an offset that tests move (token expiry, not-before)."""

    def __init__(self) -> None:
        self.offset = timedelta(0)
        self.frozen: datetime | None = None
        self._real = SystemClock()

    def now(self) -> datetime:
        return self.frozen if self.frozen is not None else self._real.now() + self.offset


@dataclass
class Broker:
    app: App
    running: RunningServer
    clock: ShiftableClock
    home: Path
    channels: dict[str, grpc.Channel] = field(default_factory=dict)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.running.port}"

    def channel(self, identity: str) -> grpc.Channel:
        if identity not in self.channels:
            pki = self.home / "pki"
            creds = grpc.ssl_channel_credentials(
                root_certificates=(pki / "ca.pem").read_bytes(),
                private_key=(pki / f"{identity}.key").read_bytes(),
                certificate_chain=(pki / f"{identity}.pem").read_bytes(),
            )
            self.channels[identity] = grpc.secure_channel(self.target, creds)
        return self.channels[identity]

    def keys(self, identity: str = "admin") -> key_admin_pb2_grpc.KeyAdminStub:
        return key_admin_pb2_grpc.KeyAdminStub(self.channel(identity))

    def crypto(self, identity: str) -> crypto_pb2_grpc.CryptoStub:
        return crypto_pb2_grpc.CryptoStub(self.channel(identity))

    def tokens(self, identity: str) -> tokens_pb2_grpc.TokensStub:
        return tokens_pb2_grpc.TokensStub(self.channel(identity))

    def audit(self, identity: str = "auditor") -> audit_pb2_grpc.AuditStub:
        return audit_pb2_grpc.AuditStub(self.channel(identity))

    def close(self) -> None:
        for ch in self.channels.values():
            ch.close()
        self.running.stop(0)
        self.app.close()


def broker_settings(home: Path, **changes: object) -> Settings:
    if changes.get("database") is not None and "broker_id" not in changes:
        # Every test broker shares the session's token, where the audit anchors live; the
        # anchors of a broker id must belong to one trail (one database), as in production.
        digest = hashlib.sha256(str(changes["database"]).encode()).hexdigest()[:12]
        changes["broker_id"] = f"test-{digest}"
    # On a PostgreSQL run (--store=postgres), the database standing for that file.
    changes = store_changes(home, changes)
    hsms = hsm_configs(home, (FR, US))
    base = Settings(home=home, listen="127.0.0.1:0", hsms=hsms, default_hsm="local")
    return validate(replace(base, **changes))  # type: ignore[arg-type]


def start_broker(
    home: Path,
    audit_store: AuditStore | None = None,
    **changes: object,
) -> Broker:
    settings = broker_settings(home, **changes)
    clock = ShiftableClock()
    app = build_app(settings, clock=clock, audit_store=audit_store)
    running = create_server(
        app.services,
        app.tls,
        settings.listen,
        settings.insecure_listen,
        max_workers=8,
        max_concurrent_rpcs=settings.max_concurrent_rpcs,
        observer=app.metrics,
    )
    return Broker(app, running, clock, home)


@pytest.fixture(scope="session")
def hsm_home(softhsm_home: Path) -> Path:
    """The one home whose softhsm2.conf and tokens every broker of this process uses
    (the same as the HSM adapter tests', see tests/hsm_fixtures.py)."""
    return softhsm_home


@pytest.fixture(scope="session")
def broker(hsm_home: Path) -> Iterator[Broker]:
    b = start_broker(hsm_home, insecure_listen="127.0.0.1:0")
    yield b
    b.close()


@pytest.fixture(autouse=True)
def _reset_clock(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "broker" in request.fixturenames:
        clock = request.getfixturevalue("broker").clock
        clock.offset, clock.frozen = timedelta(0), None


def new_key_id(prefix: str = "k") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"
