"""IssueToken never hands out a token that Decrypt would refuse for its size: a request whose
token would pass the 8 KiB limit (a large context and justification) is INVALID_ARGUMENT, audited,
and the largest token that fits decrypts."""

from __future__ import annotations

import grpc
from keybroker.v1 import resources_pb2, tokens_pb2

from broker.services.token_format import MAX_TOKEN_BYTES
from tests.broker_fixtures import Broker
from tests.integration.flows import (
    DECRYPT,
    ENCRYPT,
    code_of,
    create_key,
    datakey,
    decrypt,
    events_for,
    grant,
    rid,
)

#: The largest context a request may carry: 16 entries of 64-byte keys and 256-byte values.
BIG = {f"{i:02d}" + "k" * 62: "v" * 256 for i in range(16)}


def open_policy() -> resources_pb2.KeyPolicy:
    return resources_pb2.KeyPolicy(grants=[grant("producer", ENCRYPT), grant("consumer", DECRYPT)])


def test_a_token_too_long_for_decrypt_is_not_issued(broker: Broker) -> None:
    key_id = create_key(broker, policy=open_policy())
    request_id = rid()
    code, message = code_of(
        lambda: broker.tokens("consumer").IssueToken(
            tokens_pb2.IssueTokenRequest(key_id=key_id, context=BIG, justification="j" * 1024),
            metadata=(("x-request-id", request_id),),
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert f"longer than {MAX_TOKEN_BYTES} bytes" in message
    (event,) = events_for(broker, request_id)
    assert event.operation == "IssueToken" and event.outcome == 2  # OUTCOME_DENIED
    assert event.token_id == ""


def test_a_large_token_that_fits_decrypts(broker: Broker) -> None:
    key_id = create_key(broker, policy=open_policy())
    context = dict(list(BIG.items())[:10])
    wrapped = datakey(broker, key_id, context).wrapped_key
    token = (
        broker.tokens("consumer")
        .IssueToken(
            tokens_pb2.IssueTokenRequest(key_id=key_id, context=context, justification="j" * 1024)
        )
        .token
    )
    assert 6000 < len(token) <= MAX_TOKEN_BYTES
    assert len(decrypt(broker, wrapped, token, context=context).plaintext) == 32
