"""A NUL character in request text (which PostgreSQL's text columns cannot hold) is refused or
kept as U+FFFD the same way on both stores: it never fails the audit batch it lands in, nor
makes a read look like an outage."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
from keybroker.v1 import crypto_pb2, tokens_pb2

from tests.broker_fixtures import Broker
from tests.integration.flows import CTX, code_of, create_key, datakey, events_for, rid


def test_a_nul_in_a_key_id_is_invalid_and_audited_without_it(broker: Broker) -> None:
    key_id = create_key(broker)
    request_id = rid()

    def hostile() -> None:
        broker.crypto("producer").GenerateDataKey(
            crypto_pb2.GenerateDataKeyRequest(key_id="k\x00bad", context=CTX),
            metadata=(("x-request-id", request_id),),
        )

    # Calls beside it, likely in the same group-commit batch, are not harmed.
    with ThreadPoolExecutor(4) as pool:
        fine = [pool.submit(datakey, broker, key_id) for _ in range(8)]
        code, _ = code_of(hostile)
        assert all(len(f.result().plaintext_key) == 32 for f in fine)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    [event] = events_for(broker, request_id)
    assert event.key_id == "k\ufffdbad" and event.outcome == 2  # denied


def test_a_nul_in_a_justification_or_token_id_is_no_outage(broker: Broker) -> None:
    key_id = create_key(broker)
    request_id = rid()
    issued = broker.tokens("consumer").IssueToken(
        tokens_pb2.IssueTokenRequest(key_id=key_id, context=CTX, justification="why\x00not"),
        metadata=(("x-request-id", request_id),),
    )
    assert issued.token
    [event] = events_for(broker, request_id)
    assert event.justification == "why\ufffdnot"
    code, _ = code_of(
        lambda: broker.tokens("consumer").RevokeToken(
            tokens_pb2.RevokeTokenRequest(token_id="no\x00such")
        )
    )
    assert code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL)
