"""Helpers shared by the gRPC integration tests."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from keybroker.v1 import (
    audit_pb2,
    crypto_pb2,
    key_admin_pb2,
    resources_pb2,
    tokens_pb2,
)

from tests.broker_fixtures import Broker, new_key_id

CTX = {"dataset": "cohort-42"}
ENCRYPT = resources_pb2.OPERATION_ENCRYPT
DECRYPT = resources_pb2.OPERATION_DECRYPT
REWRAP = resources_pb2.OPERATION_REWRAP


def grant(
    principal: str, *ops: int, context: dict[str, str] | None = None, max_ttl: int | None = None
) -> resources_pb2.Grant:
    g = resources_pb2.Grant(principal=principal, operations=list(ops), context=context or {})
    if max_ttl is not None:
        g.max_token_ttl.CopyFrom(Duration(seconds=max_ttl))
    return g


def standard_policy(**kw: Any) -> resources_pb2.KeyPolicy:
    return resources_pb2.KeyPolicy(
        grants=[
            grant("producer", ENCRYPT),
            grant("consumer", DECRYPT, context={"dataset": "cohort-*"}),
        ],
        **kw,
    )


def create_key(broker: Broker, key_id: str | None = None, policy: Any = None, hsm: str = "") -> str:
    key_id = key_id or new_key_id()
    broker.keys("admin").CreateKey(
        key_admin_pb2.CreateKeyRequest(
            key_id=key_id, description="test", policy=policy or standard_policy(), hsm=hsm
        )
    )
    return key_id


def datakey(
    broker: Broker, key_id: str, context: dict[str, str] | None = None, identity: str = "producer"
) -> crypto_pb2.GenerateDataKeyResponse:
    return broker.crypto(identity).GenerateDataKey(
        crypto_pb2.GenerateDataKeyRequest(
            key_id=key_id, context=CTX if context is None else context
        )
    )


def issue(
    broker: Broker,
    key_id: str,
    context: dict[str, str] | None = None,
    identity: str = "consumer",
    **kw: Any,
) -> tokens_pb2.IssueTokenResponse:
    return broker.tokens(identity).IssueToken(
        tokens_pb2.IssueTokenRequest(
            key_id=key_id,
            context=CTX if context is None else context,
            justification=kw.pop("justification", "cohort 42 survival study"),
            **kw,
        )
    )


def decrypt(
    broker: Broker,
    blob: bytes,
    token: str,
    context: dict[str, str] | None = None,
    identity: str = "consumer",
    request_id: str | None = None,
) -> crypto_pb2.DecryptResponse:
    md = (("x-request-id", request_id),) if request_id else None
    return broker.crypto(identity).Decrypt(
        crypto_pb2.DecryptRequest(
            ciphertext=blob, context=CTX if context is None else context, token=token
        ),
        metadata=md,
    )


def code_of(call: Callable[[], Any]) -> tuple[grpc.StatusCode, str]:
    """Runs a call that must fail; returns its status code and message."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    err = info.value
    return err.code(), err.details()  # type: ignore[attr-defined]


def events_for(broker: Broker, request_id: str) -> list[resources_pb2.AuditEvent]:
    stream = broker.audit("auditor").ListAuditEvents(audit_pb2.ListAuditEventsRequest())
    return [r.event for r in stream if r.event.request_id == request_id]


def rid() -> str:
    return f"t-{uuid.uuid4().hex[:16]}"
