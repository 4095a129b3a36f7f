"""Invariant 6: no data key, plaintext, token or PIN in any log line, audit record or error;
denials are audited."""

from __future__ import annotations

import base64
import logging

import grpc
import pytest
from keybroker.v1 import audit_pb2, crypto_pb2

from tests.broker_fixtures import Broker
from tests.integration.flows import CTX, code_of, create_key, datakey, decrypt, issue, rid


def forms(secret: bytes) -> list[str]:
    """Every way a secret could be rendered into text."""
    return [
        secret.hex(),
        secret.hex().upper(),
        base64.b64encode(secret).decode(),
        base64.urlsafe_b64encode(secret).decode().rstrip("="),
        repr(secret)[2:-1],
    ]


def test_full_flow_leaks_nothing(broker: Broker, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    pin = (broker.home / "hsm.pin").read_text().strip()
    key_id = create_key(broker)
    dk = datakey(broker, key_id)
    secret_payload = b"patient 1234567 has condition Z"
    ct = broker.crypto("producer").Encrypt(
        crypto_pb2.EncryptRequest(key_id=key_id, plaintext=secret_payload, context=CTX)
    )
    issued = issue(broker, key_id)
    assert decrypt(broker, dk.wrapped_key, issued.token).plaintext == dk.plaintext_key
    assert decrypt(broker, ct.ciphertext, issued.token).plaintext == secret_payload
    errors = []
    denied_ids = []
    for identity, blob, ctx in (
        ("producer", dk.wrapped_key, CTX),  # token bound to another certificate
        ("consumer", dk.wrapped_key[:-1] + b"\x00", CTX),  # tampered tag
        ("consumer", dk.wrapped_key, {"dataset": "cohort-43"}),  # wrong context
    ):
        request_id = rid()
        denied_ids.append(request_id)
        errors.append(
            code_of(
                lambda i=identity, b=blob, c=ctx, r=request_id: decrypt(
                    broker, b, issued.token, c, identity=i, request_id=r
                )
            )[1]
        )
    # A handler that crashes is logged with its traceback but answers a generic message.
    events = [r.event for r in broker.audit().ListAuditEvents(audit_pb2.ListAuditEventsRequest())]
    audit_text = "\n".join(str(e) for e in events)
    haystacks = {"logs": caplog.text, "audit": audit_text, "errors": "\n".join(errors)}
    needles = {
        "data key": forms(dk.plaintext_key),
        "plaintext": [secret_payload.decode(), *forms(secret_payload)],
        "token": [issued.token, issued.token.split(".")[2]],
        "pin": [pin],
    }
    for where, text in haystacks.items():
        for what, variants in needles.items():
            for variant in variants:
                assert variant not in text, f"{what} found in {where}"
    # The denials are in the trail, each once, as DENIED.
    by_request = {e.request_id: e for e in events}
    for request_id in denied_ids:
        assert by_request[request_id].outcome == 2
        assert by_request[request_id].operation == "Decrypt"


def test_internal_errors_are_generic(
    broker: Broker, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    key_id = create_key(broker)

    def boom(*_a: object, **_k: object) -> None:
        raise RuntimeError("secret-internal-detail")

    monkeypatch.setattr(broker.app.store, "get_key", boom)
    code, msg = code_of(lambda: datakey(broker, key_id))
    assert code == grpc.StatusCode.INTERNAL
    assert "secret-internal-detail" not in msg and "Traceback" not in msg
    assert "request id" in msg
    assert "secret-internal-detail" in caplog.text  # logged for the operator
