"""Three `keybroker-server` processes on their own ports sharing one PostgreSQL database and one
SoftHSM2 token directory, as replicas behind a load balancer are (DESIGN.md, scale-out).

Replica "a" is started first with the embedded default: it initialises the token, the PKI and
the database. "b" and "c" have homes of their own and a configuration file naming a's token
(through SOFTHSM2_CONF), PIN file and certificates. All three share one broker id, so each
accepts the others' tokens and verifies the others' audit chains and anchors.
Runs with --store=postgres.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
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
from keybroker_client import KeybrokerClient

from broker.devhsm import find_softhsm_module
from tests.integration.flows import CTX, create_key, datakey, decrypt, issue, rid
from tests.integration.test_server_process import SERVER, channel, wait_ready
from tests.store_fixtures import store_url

pytestmark = pytest.mark.postgres

BROKER_ID = "kb-replicas"


@dataclass
class Replica:
    """One broker process and stubs on it, shaped like `tests.broker_fixtures.Broker` so the
    helpers of `flows` take it."""

    name: str
    home: Path
    pki_home: Path
    env: dict[str, str]
    extra: tuple[str, ...]
    proc: subprocess.Popen[str] | None = None
    target: str = ""
    log: Path = Path()
    channels: dict[str, grpc.Channel] = field(default_factory=dict)

    def start(self) -> None:
        """Starts the process (its output goes to HOME.log: a pipe nobody reads would fill up
        under load) and waits until it serves.

        Tried twice: SoftHSM2's file store can show a process that starts while another one
        rewrites an anchor a token without some object for a moment (a network HSM has no
        such window); the log keeps both attempts.
        """
        try:
            self._start()
        except AssertionError:
            self._start()

    def _start(self) -> None:
        (self.home / "listen.addr").unlink(missing_ok=True)
        run_env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"} | self.env
        self.log = self.home.with_suffix(".log")
        with self.log.open("a") as out:
            self.proc = subprocess.Popen(
                [*SERVER, "--home", str(self.home), "--listen", "127.0.0.1:0", *self.extra],
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
                env=run_env,
            )
        try:
            self.target = wait_ready(self.proc, self.home)
        except AssertionError as exc:
            raise AssertionError(f"replica {self.name}: {exc}\n{self.log.read_text()}") from None
        self.close_channels()

    def channel(self, identity: str) -> grpc.Channel:
        if identity not in self.channels:
            self.channels[identity] = channel(self.pki_home, self.target, identity)
        return self.channels[identity]

    def keys(self, identity: str = "admin") -> key_admin_pb2_grpc.KeyAdminStub:
        return key_admin_pb2_grpc.KeyAdminStub(self.channel(identity))

    def crypto(self, identity: str) -> crypto_pb2_grpc.CryptoStub:
        return crypto_pb2_grpc.CryptoStub(self.channel(identity))

    def tokens(self, identity: str) -> tokens_pb2_grpc.TokensStub:
        return tokens_pb2_grpc.TokensStub(self.channel(identity))

    def audit(self, identity: str = "auditor") -> audit_pb2_grpc.AuditStub:
        return audit_pb2_grpc.AuditStub(self.channel(identity))

    def close_channels(self) -> None:
        for ch in self.channels.values():
            ch.close()
        self.channels.clear()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)  # its channels stay: calls on them now fail UNAVAILABLE

    def stop(self) -> None:
        self.close_channels()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            assert self.proc.wait(60) == 0, self.log.read_text()


def replica_config(base: Path) -> str:
    """Replicas b and c: a's token (module given, so SOFTHSM2_CONF chooses the token
    directory), PIN file and certificates."""
    return (
        "[tls]\n"
        f'cert = "{base / "pki" / "server.pem"}"\n'
        f'key = "{base / "pki" / "server.key"}"\n'
        f'client_ca = "{base / "pki" / "ca.pem"}"\n'
        "[[hsm]]\n"
        'name = "local"\n'
        'jurisdiction = "FR"\n'
        'operator = "local SoftHSM2 (development)"\n'
        f'module = "{find_softhsm_module()}"\n'
        'token_label = "keybroker"\n'
        f'pin_file = "{base / "hsm.pin"}"\n'
    )


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Replica]]:
    root = tmp_path_factory.mktemp("replicas")
    base = root / "a"
    env = {"KEYBROKER_STORE_URL": store_url(root / "shared.db"), "KEYBROKER_BROKER_ID": BROKER_ID}
    config = root / "replica.toml"
    config.write_text(replica_config(base))
    shared = {**env, "SOFTHSM2_CONF": str(base / "softhsm2.conf")}
    replicas = {"a": Replica("a", base, base, env, ())}
    for name in ("b", "c"):
        replicas[name] = Replica(name, root / name, base, shared, ("--config", str(config)))
    try:
        for replica in replicas.values():  # one after the other: a makes what all share
            replica.start()
        yield replicas
    finally:
        for replica in replicas.values():
            replica.stop()


def test_a_key_created_or_rotated_on_one_is_usable_on_the_others_at_once(
    fleet: dict[str, Replica],
) -> None:
    a, b, c = fleet["a"], fleet["b"], fleet["c"]
    key_id = create_key(a)  # type: ignore[arg-type]
    made_on_c = datakey(c, key_id)  # type: ignore[arg-type]
    assert made_on_c.key_version == 1 and datakey(b, key_id).key_version == 1  # type: ignore[arg-type]
    b.keys().RotateKey(key_admin_pb2.RotateKeyRequest(key_id=key_id))
    assert datakey(a, key_id).key_version == 2  # type: ignore[arg-type]
    assert datakey(c, key_id).key_version == 2  # type: ignore[arg-type]
    # A data key wrapped on c before the rotation unwraps on a with a token issued by b.
    token = issue(b, key_id).token  # type: ignore[arg-type]
    plain = decrypt(a, made_on_c.wrapped_key, token).plaintext  # type: ignore[arg-type]
    assert plain == made_on_c.plaintext_key


def test_a_revoked_token_is_refused_by_the_others_within_a_second(
    fleet: dict[str, Replica],
) -> None:
    a, b, c = fleet["a"], fleet["b"], fleet["c"]
    key_id = create_key(a)  # type: ignore[arg-type]
    dk = datakey(a, key_id)  # type: ignore[arg-type]
    issued = issue(a, key_id)  # type: ignore[arg-type]
    for other in (b, c):
        assert decrypt(other, dk.wrapped_key, issued.token).plaintext == dk.plaintext_key  # type: ignore[arg-type]
    a.tokens("consumer").RevokeToken(tokens_pb2.RevokeTokenRequest(token_id=issued.token_id))
    revoked_at = time.monotonic()
    for other in (b, c):
        while True:
            try:
                decrypt(other, dk.wrapped_key, issued.token)  # type: ignore[arg-type]
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAUTHENTICATED
                assert "revoked" in exc.details()
                break
            assert time.monotonic() - revoked_at < 1.0, f"{other.name} still accepts it"
            time.sleep(0.02)


def test_a_single_use_token_succeeds_once_across_all_three(fleet: dict[str, Replica]) -> None:
    replicas = list(fleet.values())
    key_id = create_key(replicas[0])  # type: ignore[arg-type]
    dk = datakey(replicas[0], key_id)  # type: ignore[arg-type]
    token = issue(replicas[1], key_id, max_uses=1).token  # type: ignore[arg-type]
    ready = threading.Barrier(9)

    def attempt(index: int) -> grpc.StatusCode:
        replica = replicas[index % 3]
        ready.wait(30)
        try:
            decrypt(replica, dk.wrapped_key, token)  # type: ignore[arg-type]
        except grpc.RpcError as exc:
            return exc.code()  # type: ignore[no-any-return]
        return grpc.StatusCode.OK

    with ThreadPoolExecutor(9) as pool:
        codes = list(pool.map(attempt, range(9)))
    assert codes.count(grpc.StatusCode.OK) == 1
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 8


class Load:
    """GenerateDataKey calls on every replica from a few threads each, until stopped; keeps
    the request id of every call that succeeded."""

    def __init__(self, replicas: list[Replica], key_id: str, per_replica: int = 2) -> None:
        self.succeeded: list[str] = []
        self.failed: dict[str, int] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, args=(r, key_id), daemon=True)
            for r in replicas
            for _ in range(per_replica)
        ]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)

    def count(self) -> int:
        with self._lock:
            return len(self.succeeded)

    def _run(self, replica: Replica, key_id: str) -> None:
        stub = replica.crypto("producer")
        while not self._stop.is_set():
            request_id = rid()
            try:
                stub.GenerateDataKey(
                    crypto_pb2.GenerateDataKeyRequest(key_id=key_id, context=CTX),
                    metadata=(("x-request-id", request_id),),
                    timeout=30,
                )
            except grpc.RpcError as exc:
                with self._lock:
                    self.failed[exc.code().name] = self.failed.get(exc.code().name, 0) + 1
                time.sleep(0.05)
                continue
            with self._lock:
                self.succeeded.append(request_id)


def wait_until(condition: Callable[[], bool], what: str, limit: float = 120.0) -> None:
    """Polls `condition` (no timing is asserted: the limit only ends a hung test)."""
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {limit} s")
        time.sleep(0.05)


def exported(replica: Replica) -> list[dict[str, Any]]:
    stream = replica.audit().ExportAuditLog(audit_pb2.ExportAuditLogRequest(), timeout=120)
    return [json.loads(r.line) for r in stream]


def failover_client(replicas: list[Replica]) -> KeybrokerClient:
    pki = replicas[0].pki_home / "pki"
    return KeybrokerClient(
        targets=[r.target for r in replicas],
        root_certificates=(pki / "ca.pem").read_bytes(),
        private_key=(pki / "producer.key").read_bytes(),
        certificate_chain=(pki / "producer.pem").read_bytes(),
    )


def test_a_replica_killed_under_load_loses_no_audit_record_and_the_trail_verifies(
    fleet: dict[str, Replica],
) -> None:
    a, b, c = fleet["a"], fleet["b"], fleet["c"]
    key_id = create_key(a)  # type: ignore[arg-type]
    with Load([a, b, c], key_id) as load:
        wait_until(lambda: load.count() >= 60, "calls succeed on the three")
        c.kill()  # SIGKILL: no closing checkpoint, calls in flight cut off
        after_kill = load.count()
        wait_until(lambda: load.count() >= after_kill + 60, "a and b go on serving")
        # A client given the three addresses carries on past the dead one.
        client = failover_client([c, a, b])
        try:
            assert len(client.generate_data_key(key_id, CTX).plaintext_key) == 32
        finally:
            client.close()
    assert load.failed.get("UNAVAILABLE", 0) >= 1  # c's calls after the kill

    c.start()  # the killed replica comes back (a new chain)
    records = exported(a)
    manifest = records[-1]
    assert manifest["type"] == "manifest" and manifest["verified"] is True, manifest["error"]
    in_trail = {r["request_id"] for r in records if r.get("type") == "event"}
    missing = [i for i in load.succeeded if i not in in_trail]
    assert not missing, f"{len(missing)} successful calls have no audit record"
    chains = {r["chain"] for r in records if r.get("type") == "event"}
    assert len(chains) >= 3 and all(ch.startswith(f"{BROKER_ID}-") for ch in chains)
    for replica in (a, b, c):
        report = replica.audit().VerifyAuditLog(audit_pb2.VerifyAuditLogRequest(), timeout=120)
        assert report.ok, (replica.name, report.error)
        assert report.chains_checked >= 4  # a, b, c before the kill, c after
