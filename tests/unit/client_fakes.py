"""Test doubles for the client SDK and CLI tests: a throwaway PKI and an in-process fake
broker over mutual TLS that records requests and answers canned responses."""

from __future__ import annotations

import datetime as dt
import ipaddress
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from google.protobuf import message as pb_message
from google.protobuf import message_factory
from keybroker.v1 import (
    audit_pb2,
    crypto_pb2,
    key_admin_pb2,
    resources_pb2,
    tokens_pb2,
)
from keybroker_client import (
    ClientSettings,
)

IDENTITIES = ("admin", "auditor", "producer", "consumer")
KEYBROKER_ENV = (
    "KEYBROKER_HOME",
    "KEYBROKER_TARGET",
    "KEYBROKER_CA",
    "KEYBROKER_CERT",
    "KEYBROKER_KEY",
    "KEYBROKER_IDENTITY",
    "KEYBROKER_TOKEN",
    "KEYBROKER_CONFIG",
)

# ---------------------------------------------------------------------------------------------
# Throwaway PKI


@dataclass(frozen=True)
class Pki:
    """A CA, a server certificate for localhost/127.0.0.1 and client identities, as files.

    ``home`` mirrors the broker's development layout: ``home/pki/ca.pem``, ``NAME.pem``/``.key``.
    """

    home: Path

    @property
    def dir(self) -> Path:
        return self.home / "pki"

    def read(self, name: str) -> bytes:
        return (self.dir / name).read_bytes()

    def settings(self, target: str, identity: str = "admin") -> ClientSettings:
        return ClientSettings(
            target=target,
            ca=self.dir / "ca.pem",
            cert=self.dir / f"{identity}.pem",
            key=self.dir / f"{identity}.key",
        )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _issue(
    subject_cn: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    server: bool = False,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    elif server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    else:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


def make_pki(home: Path, identities: tuple[str, ...] = IDENTITIES) -> Pki:
    """Writes a fresh CA, server certificate and client identities under ``home/pki``."""
    pki_dir = home / "pki"
    pki_dir.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _issue("keybroker test CA", ca_key, None, ca_key, ca=True)
    (pki_dir / "ca.pem").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    entries: list[tuple[str, bool]] = [("server", True)] + [(n, False) for n in identities]
    for name, is_server in entries:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _issue(name, key, ca_cert.subject, ca_key, server=is_server)
        (pki_dir / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (pki_dir / f"{name}.key").write_bytes(_key_pem(key))
    return Pki(home)


# ---------------------------------------------------------------------------------------------
# Fake broker


@dataclass(frozen=True)
class Abort:
    """A canned failure: the fake aborts the call with this status."""

    code: grpc.StatusCode
    details: str


@dataclass
class RecordedCall:
    """One call the fake broker received."""

    method: str
    request: Any
    principal: str
    transport: str
    metadata: dict[str, str]
    time_remaining: float | None


_SERVICES = [
    key_admin_pb2.DESCRIPTOR.services_by_name["KeyAdmin"],
    crypto_pb2.DESCRIPTOR.services_by_name["Crypto"],
    tokens_pb2.DESCRIPTOR.services_by_name["Tokens"],
    audit_pb2.DESCRIPTOR.services_by_name["Audit"],
]

Responder = pb_message.Message | list[Any] | Abort | Callable[[Any], Any]


@dataclass
class FakeBroker:
    """An in-process gRPC server speaking every keybroker.v1 RPC over mutual TLS.

    Set ``responses[method]`` to a response proto, a list of protos (streaming RPCs), an
    ``Abort``, or a callable taking the request and returning one of those. An RPC without a
    canned response returns its empty response message.
    """

    pki: Pki
    responses: dict[str, Responder] = field(default_factory=dict)
    calls: list[RecordedCall] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        handlers = []
        for service in _SERVICES:
            methods = {}
            for method in service.methods:
                request_cls = message_factory.GetMessageClass(method.input_type)
                response_cls = message_factory.GetMessageClass(method.output_type)
                behaviour = self._make_handler(method.name, response_cls, method.server_streaming)
                make = (
                    grpc.unary_stream_rpc_method_handler
                    if method.server_streaming
                    else grpc.unary_unary_rpc_method_handler
                )
                methods[method.name] = make(
                    behaviour,
                    request_deserializer=request_cls.FromString,
                    response_serializer=response_cls.SerializeToString,
                )
            handlers.append(grpc.method_handlers_generic_handler(service.full_name, methods))
        self._server.add_generic_rpc_handlers(handlers)
        credentials = grpc.ssl_server_credentials(
            [(self.pki.read("server.key"), self.pki.read("server.pem"))],
            root_certificates=self.pki.read("ca.pem"),
            require_client_auth=True,
        )
        self.port = self._server.add_secure_port("127.0.0.1:0", credentials)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> FakeBroker:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(None).wait(5)

    def requests(self, method: str) -> list[Any]:
        with self._lock:
            return [c.request for c in self.calls if c.method == method]

    def _make_handler(self, name: str, response_cls: type, streaming: bool) -> Callable[..., Any]:
        def handle(request: Any, context: grpc.ServicerContext) -> Any:
            auth = context.auth_context()
            cn = auth.get("x509_common_name", [b""])[0].decode()
            transport = auth.get("transport_security_type", [b""])[0].decode()
            with self._lock:
                self.calls.append(
                    RecordedCall(
                        method=name,
                        request=request,
                        principal=cn,
                        transport=transport,
                        metadata=dict(context.invocation_metadata()),
                        time_remaining=context.time_remaining(),
                    )
                )
            answer = self.responses.get(name)
            if callable(answer) and not isinstance(answer, pb_message.Message):
                answer = answer(request)
            if isinstance(answer, Abort):
                context.abort(answer.code, answer.details)
            if streaming:
                return iter(answer or [])
            return answer if answer is not None else response_cls()

        return handle


def serve_fake_broker(pki: Pki) -> Iterator[FakeBroker]:
    """Starts a fake broker, yields it and stops it: the body of the fake-broker fixtures."""
    broker = FakeBroker(pki).start()
    try:
        yield broker
    finally:
        broker.stop()


def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_key(key_id: str, **kwargs: Any) -> resources_pb2.Key:
    return resources_pb2.Key(
        key_id=key_id, state=resources_pb2.KEY_STATE_ENABLED, primary_version=1, **kwargs
    )
