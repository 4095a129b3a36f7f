"""Revoked client certificates, over gRPC and mutual TLS against SoftHSM2: a CRL signed by the
client CA (`tls.crl_file`) and a deny list (`tls.deny_list_file`), read again when they change.

The broker checks them every call (`tls.revocation_check_seconds = 0`), so no test waits.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from keybroker.v1 import crypto_pb2, key_admin_pb2, resources_pb2, tokens_pb2
from keybroker_client.certs import cert_thumbprint

from broker.app import load_tls
from broker.config import DEV_IDENTITIES, ConfigError
from broker.devpki import ensure_dev_pki
from tests.broker_fixtures import Broker, broker_settings, start_broker
from tests.integration.flows import CTX, code_of, create_key, datakey, events_for, issue, rid

UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


def _ca(pki: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The development CA (made first when no broker of this home has started yet)."""
    ensure_dev_pki(pki, DEV_IDENTITIES)
    key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key, x509.load_pem_x509_certificate((pki / "ca.pem").read_bytes())


def _serial(pki: Path, identity: str) -> int:
    return x509.load_pem_x509_certificate((pki / f"{identity}.pem").read_bytes()).serial_number


def make_crl(
    signer: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    serials: list[int],
    encoding: serialization.Encoding = serialization.Encoding.PEM,
) -> bytes:
    """A CRL of `issuer` revoking `serials`, signed with `signer`."""
    now = datetime.now(UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer)
        .last_update(now - timedelta(minutes=1))
        .next_update(now + timedelta(days=1))
    )
    for serial in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build()
        )
    return builder.sign(signer, hashes.SHA256()).public_bytes(encoding)


def replace_file(path: Path, data: bytes) -> None:
    """Writes `path` anew in one step (a new inode), as a deployment tool would."""
    staged = path.with_suffix(".new")
    staged.write_bytes(data)
    os.replace(staged, path)


@pytest.fixture
def revoking(hsm_home: Path, tmp_path: Path) -> Iterator[tuple[Broker, Path, Path]]:
    """A broker of the development PKI whose CRL revokes `consumer` and whose deny list is
    empty; yields it with the two files."""
    pki = hsm_home / "pki"
    ca_key, ca = _ca(pki)
    crl = tmp_path / "clients.crl"
    crl.write_bytes(make_crl(ca_key, ca.subject, [_serial(pki, "consumer")]))
    deny = tmp_path / "deny.txt"
    deny.write_text("# revoked client certificates\n")
    b = start_broker(
        hsm_home,
        database=tmp_path / "kb.db",
        tls_crl_file=crl,
        tls_deny_list_file=deny,
        tls_revocation_check_seconds=0.0,
    )
    try:
        yield b, crl, deny
    finally:
        b.close()


def _issue_as_consumer(b: Broker, key_id: str, request_id: str) -> tokens_pb2.IssueTokenResponse:
    return b.tokens("consumer").IssueToken(
        tokens_pb2.IssueTokenRequest(key_id=key_id, context=CTX, justification="study"),
        metadata=(("x-request-id", request_id),),
    )


def test_a_revoked_certificate_is_refused_audited_and_let_in_again(
    revoking: tuple[Broker, Path, Path], hsm_home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    b, crl, _deny = revoking
    pki = hsm_home / "pki"
    ca_key, ca = _ca(pki)
    key_id = create_key(b)

    # The consumer is refused at its first call, and the refusal is audited with its name.
    request_id = rid()
    code, message = code_of(lambda: _issue_as_consumer(b, key_id, request_id))
    assert code == UNAUTHENTICATED and message.startswith("client certificate revoked")
    [event] = events_for(b, request_id)
    assert (event.principal, event.operation, event.outcome) == (
        "consumer",
        "IssueToken",
        resources_pb2.OUTCOME_DENIED,
    )
    assert event.reason.startswith("client certificate revoked")
    code, _ = code_of(
        lambda: b.crypto("consumer").Decrypt(
            crypto_pb2.DecryptRequest(ciphertext=b"x", context=CTX, token="t")
        )
    )
    assert code == UNAUTHENTICATED

    # Everyone else goes on.
    dk = datakey(b, key_id)
    assert b.keys("auditor").GetKey(key_admin_pb2.GetKeyRequest(key_id=key_id)).key.key_id

    # Taken off the CRL (a DER one this time): let in again, without a restart.
    replace_file(crl, make_crl(ca_key, ca.subject, [], serialization.Encoding.DER))
    token = _issue_as_consumer(b, key_id, rid()).token
    opened = b.crypto("consumer").Decrypt(
        crypto_pb2.DecryptRequest(ciphertext=dk.wrapped_key, context=CTX, token=token)
    )
    assert opened.plaintext == dk.plaintext_key

    # A CRL that the client CA did not sign is logged and ignored: the previous one (which
    # revokes nobody) stays in force, so the producer, named by the forgery, goes on.
    forger = ec.generate_private_key(ec.SECP256R1())
    with caplog.at_level(logging.ERROR, logger="broker.transport.revocation"):
        replace_file(crl, make_crl(forger, ca.subject, [_serial(pki, "producer")]))
        assert datakey(b, key_id).key_version == 1
    assert any("not signed by a client CA" in r.getMessage() for r in caplog.records)
    assert issue(b, key_id, identity="consumer").token


def test_the_deny_list_refuses_by_thumbprint_or_serial(
    revoking: tuple[Broker, Path, Path], hsm_home: Path
) -> None:
    b, _crl, deny = revoking
    pki = hsm_home / "pki"
    key_id = create_key(b)
    assert datakey(b, key_id).key_version == 1

    thumbprint = cert_thumbprint((pki / "producer.pem").read_bytes())
    replace_file(deny, f"{thumbprint}  # producer, laptop stolen\n".encode())
    request_id = rid()
    code, message = code_of(
        lambda: b.crypto("producer").GenerateDataKey(
            crypto_pb2.GenerateDataKeyRequest(key_id=key_id, context=CTX),
            metadata=(("x-request-id", request_id),),
        )
    )
    assert code == UNAUTHENTICATED and "deny list" in message
    [event] = events_for(b, request_id)
    assert (event.principal, event.key_id) == ("producer", key_id)
    assert event.reason.startswith("client certificate revoked")

    # By serial number, as `openssl x509 -serial` prints it: the admin now.
    replace_file(deny, f"serial={_serial(pki, 'admin'):X}\n".encode())
    assert datakey(b, key_id).key_version == 1
    code, _ = code_of(lambda: b.keys("admin").GetKey(key_admin_pb2.GetKeyRequest(key_id=key_id)))
    assert code == UNAUTHENTICATED

    # A line that names no certificate: logged, and the previous list stays.
    replace_file(deny, b"not a serial\n")
    code, _ = code_of(lambda: b.keys("admin").GetKey(key_admin_pb2.GetKeyRequest(key_id=key_id)))
    assert code == UNAUTHENTICATED


def test_a_crl_not_signed_by_the_client_ca_refuses_the_start(
    hsm_home: Path, tmp_path: Path
) -> None:
    _ca_key, ca = _ca(hsm_home / "pki")
    crl = tmp_path / "forged.crl"
    crl.write_bytes(make_crl(ec.generate_private_key(ec.SECP256R1()), ca.subject, [1]))
    with pytest.raises(ConfigError, match="not signed by a client CA"):
        load_tls(broker_settings(hsm_home, tls_crl_file=crl))
    crl.write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="not a CRL"):
        load_tls(broker_settings(hsm_home, tls_crl_file=crl))
