"""The broker under test: started as a user would, set up, and its calls as pre-serialised bytes.

The broker runs on its embedded default (SoftHSM2, SQLite, development PKI) in a throwaway home,
as `python -m broker`, in its own process group (workers included in its CPU). `--workers N`
is passed only when the server's `--help` offers it; the batch path is looked up in the Crypto
service's descriptor.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.protobuf import descriptor, message_factory
from google.protobuf.message import Message
from keybroker.v1 import (
    crypto_pb2,
    crypto_pb2_grpc,
    key_admin_pb2,
    key_admin_pb2_grpc,
    resources_pb2,
    tokens_pb2,
    tokens_pb2_grpc,
)

from tests.bench import procs
from tests.bench.gen import ROOT, Call, Tls

KEY_ID = "bench"
CONTEXT = {"dataset": "bench"}
CRYPTO = crypto_pb2.DESCRIPTOR.services_by_name["Crypto"]
TOKENS = tokens_pb2.DESCRIPTOR.services_by_name["Tokens"]
BATCH_ITEMS = 100


def server_help() -> str:
    out = subprocess.run(
        [sys.executable, "-m", "broker", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return out.stdout


def command(home: Path, port: int, workers: int, with_flag: bool) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "broker",
        "--home",
        str(home),
        "--listen",
        f"127.0.0.1:{port}",
        "--log-level",
        "WARNING",
    ]
    return [*cmd, "--workers", str(workers)] if with_flag else cmd


def _path(service: descriptor.ServiceDescriptor, method: str) -> str:
    return f"/{service.full_name}/{method}"


@dataclass
class Broker:
    """A running broker and the calls the scenarios send to it."""

    workers: int
    proc: subprocess.Popen[bytes]
    home: Path
    target: str
    cmd: list[str]
    log: Path
    calls: dict[str, Call] = field(default_factory=dict)
    batch: dict[str, Call] = field(default_factory=dict)
    batch_note: str = ""

    @property
    def pgid(self) -> int:
        return self.proc.pid

    def tls(self, who: str) -> Tls:
        pki = self.home / "pki"
        return Tls(pki / "ca.pem", pki / f"{who}.pem", pki / f"{who}.key")

    def channel(self, who: str) -> grpc.Channel:
        t = self.tls(who)
        creds = grpc.ssl_channel_credentials(
            t.ca.read_bytes(), t.key.read_bytes(), t.cert.read_bytes()
        )
        return grpc.secure_channel(self.target, creds)

    def stop(self) -> None:
        procs.stop_group(self.proc)
        shutil.rmtree(self.home, ignore_errors=True)
        self.log.unlink(missing_ok=True)


def start(workers: int, with_flag: bool, env: Mapping[str, str] | None = None) -> Broker:
    """Starts a broker with `workers` processes (the flag only if the server has it).

    `env` adds to the environment the broker inherits (a `KEYBROKER_*` override, a preloaded
    library).

    Raises:
        RuntimeError: it did not start or could not be set up; the message ends with the tail
            of its log.
    """
    home = Path(tempfile.mkdtemp(prefix="kb-bench-"))
    port = procs.free_port()
    cmd = command(home, port, workers, with_flag)
    environ = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"} | dict(env or {})
    log = home.parent / f"{home.name}.log"
    with log.open("wb") as err:
        proc = procs.start_group(cmd, cwd=ROOT, env=environ, stdout=subprocess.DEVNULL, stderr=err)
    broker = Broker(workers, proc, home, f"127.0.0.1:{port}", cmd, log)
    addr = home / "listen.addr"

    def listening() -> bool:
        if proc.poll() is not None:
            raise RuntimeError("the broker exited")
        return addr.exists() and bool(addr.read_text().strip())

    try:
        procs.wait_until(listening, 120, "the broker to listen")
        _set_up(broker)
    except (RuntimeError, grpc.RpcError, grpc.FutureTimeoutError) as exc:
        tail = log.read_text(errors="replace")[-1500:]
        broker.stop()
        raise RuntimeError(f"{exc}:\n{tail}") from None
    return broker


def _set_up(broker: Broker) -> None:
    """Creates the key, issues the Decrypt token and serialises every scenario's request."""
    grants = [
        resources_pb2.Grant(principal="producer", operations=[resources_pb2.OPERATION_ENCRYPT]),
        resources_pb2.Grant(principal="consumer", operations=[resources_pb2.OPERATION_DECRYPT]),
    ]
    with broker.channel("admin") as admin:
        grpc.channel_ready_future(admin).result(timeout=60)
        key_admin_pb2_grpc.KeyAdminStub(admin).CreateKey(
            key_admin_pb2.CreateKeyRequest(
                key_id=KEY_ID, policy=resources_pb2.KeyPolicy(grants=grants)
            ),
            timeout=60,
        )
    with broker.channel("producer") as producer:
        gdk = crypto_pb2.GenerateDataKeyRequest(key_id=KEY_ID, context=CONTEXT)
        wrapped = crypto_pb2_grpc.CryptoStub(producer).GenerateDataKey(gdk, timeout=60).wrapped_key
    with broker.channel("consumer") as consumer:
        issue = tokens_pb2.IssueTokenRequest(
            key_id=KEY_ID, context=CONTEXT, justification="benchmark", ttl={"seconds": 3600}
        )
        token = tokens_pb2_grpc.TokensStub(consumer).IssueToken(issue, timeout=60).token
        decrypt = crypto_pb2.DecryptRequest(ciphertext=wrapped, context=CONTEXT, token=token)
        crypto_pb2_grpc.CryptoStub(consumer).Decrypt(decrypt, timeout=60)  # the token works
    short_issue = tokens_pb2.IssueTokenRequest(
        key_id=KEY_ID, context=CONTEXT, justification="benchmark", ttl={"seconds": 300}
    )
    encrypt = crypto_pb2.EncryptRequest(
        key_id=KEY_ID, plaintext=secrets.token_bytes(1024), context=CONTEXT
    )
    producer_tls, consumer_tls = broker.tls("producer"), broker.tls("consumer")
    broker.calls = {
        "GenerateDataKey": Call(
            _path(CRYPTO, "GenerateDataKey"), gdk.SerializeToString(), producer_tls
        ),
        "Decrypt": Call(_path(CRYPTO, "Decrypt"), decrypt.SerializeToString(), consumer_tls),
        "IssueToken": Call(
            _path(TOKENS, "IssueToken"), short_issue.SerializeToString(), consumer_tls
        ),
        "Encrypt 1 KiB": Call(_path(CRYPTO, "Encrypt"), encrypt.SerializeToString(), producer_tls),
    }
    broker.batch, broker.batch_note = _batch_calls(
        {"GenerateDataKey": (gdk, producer_tls), "Decrypt": (decrypt, consumer_tls)}
    )


def _batch_calls(singles: dict[str, tuple[Message, Tls]]) -> tuple[dict[str, Call], str]:
    """The batch RPCs of the Crypto service, where the harness knows how to fill them.

    A unary Crypto method named `Batch...` (or `...DataKeys`) whose request has a repeated
    field of a single request's type gets BATCH_ITEMS copies of that request; a scalar field
    `count` gets BATCH_ITEMS; fields named as in the single request are copied over.
    """
    found = [m for m in CRYPTO.methods if "Batch" in m.name or m.name.endswith("DataKeys")]
    if not found:
        return {}, "the Crypto service has no batch RPC yet"
    calls: dict[str, Call] = {}
    skipped: list[str] = []
    for method in found:
        op = "Decrypt" if "Decrypt" in method.name else "GenerateDataKey"
        single, tls = singles[op]
        request = None
        if not (method.client_streaming or method.server_streaming):
            request = _fill_batch(method.input_type, single)
        if request is None:
            skipped.append(method.name)
        else:
            calls[f"{op} batch"] = Call(_path(CRYPTO, method.name), request, tls)
    note = f"batch RPCs the harness cannot fill yet: {', '.join(skipped)}" if skipped else ""
    return calls, note


def _fill_batch(message: descriptor.Descriptor, single: Message) -> bytes | None:
    request = message_factory.GetMessageClass(message)()
    single_fields = single.DESCRIPTOR.fields_by_name
    filled = False
    for fld in message.fields:
        is_map = fld.message_type is not None and fld.message_type.GetOptions().map_entry
        if fld.is_repeated and not is_map and fld.message_type is single.DESCRIPTOR:
            getattr(request, fld.name).extend([single] * BATCH_ITEMS)
            filled = True
        elif fld.name == "count" and not fld.is_repeated and fld.message_type is None:
            setattr(request, fld.name, BATCH_ITEMS)
            filled = True
        elif fld.name in single_fields and is_map:
            getattr(request, fld.name).update(getattr(single, fld.name))
        elif fld.name in single_fields and not fld.is_repeated and fld.message_type is None:
            setattr(request, fld.name, getattr(single, fld.name))
    return request.SerializeToString() if filled else None
