"""The batch path over gRPC against SoftHSM2: GenerateDataKeys and BatchDecrypt."""

from __future__ import annotations

import grpc
from keybroker.v1 import audit_pb2, crypto_pb2

from tests.broker_fixtures import Broker
from tests.integration.flows import CTX, code_of, create_key, decrypt, issue, rid


def _many(
    broker: Broker, key_id: str, count: int, request_id: str = ""
) -> crypto_pb2.GenerateDataKeysResponse:
    md = (("x-request-id", request_id),) if request_id else None
    return broker.crypto("producer").GenerateDataKeys(
        crypto_pb2.GenerateDataKeysRequest(key_id=key_id, context=CTX, count=count), metadata=md
    )


def _events(broker: Broker, request_id: str) -> list:  # type: ignore[type-arg]
    stream = broker.audit("auditor").ListAuditEvents(audit_pb2.ListAuditEventsRequest())
    return [r.event for r in stream if r.event.request_id == request_id]


def test_generate_data_keys_makes_distinct_keys_each_audited(broker: Broker) -> None:
    key_id = create_key(broker)
    request_id = rid()
    reply = _many(broker, key_id, 50, request_id)
    assert len(reply.data_keys) == 50 and reply.key_version == 1
    assert len({dk.plaintext_key for dk in reply.data_keys}) == 50
    assert all(len(dk.plaintext_key) == 32 for dk in reply.data_keys)
    events = _events(broker, request_id)
    assert len(events) == 50
    assert {(e.operation, e.key_id, e.key_version, e.outcome) for e in events} == {
        ("GenerateDataKey", key_id, 1, 1)
    }
    # Each wrapped key opens to its own plaintext, bound to the context.
    token = issue(broker, key_id).token
    for dk in reply.data_keys[:5]:
        assert decrypt(broker, dk.wrapped_key, token).plaintext == dk.plaintext_key


def test_generate_data_keys_is_refused_as_a_whole_and_audited_once(broker: Broker) -> None:
    key_id = create_key(broker)
    request_id = rid()
    md = (("x-request-id", request_id),)
    code, _ = code_of(
        lambda: broker.crypto("consumer").GenerateDataKeys(
            crypto_pb2.GenerateDataKeysRequest(key_id=key_id, context=CTX, count=10), metadata=md
        )
    )
    assert code == grpc.StatusCode.PERMISSION_DENIED
    events = _events(broker, request_id)
    assert len(events) == 1 and events[0].outcome == 2  # OUTCOME_DENIED
    for count in (0, 1001):
        code, message = code_of(lambda count=count: _many(broker, key_id, count))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "1000" in message


def test_batch_decrypt_answers_each_item_and_audits_each(broker: Broker) -> None:
    key_id = create_key(broker)
    reply = _many(broker, key_id, 3)
    token = issue(broker, key_id).token
    good = [crypto_pb2.DecryptRequest(ciphertext=dk.wrapped_key, context=CTX, token=token)
            for dk in reply.data_keys]  # fmt: skip
    tampered = bytearray(reply.data_keys[0].wrapped_key)
    tampered[-1] ^= 1
    items = [
        *good,
        crypto_pb2.DecryptRequest(ciphertext=bytes(tampered), context=CTX, token=token),
        crypto_pb2.DecryptRequest(ciphertext=reply.data_keys[1].wrapped_key,
                                  context={"dataset": "cohort-43"}, token=token),
        crypto_pb2.DecryptRequest(ciphertext=reply.data_keys[2].wrapped_key, context=CTX,
                                  token="not-a-token"),
    ]  # fmt: skip
    request_id = rid()
    results = (
        broker.crypto("consumer")
        .BatchDecrypt(
            crypto_pb2.BatchDecryptRequest(items=items), metadata=(("x-request-id", request_id),)
        )
        .results
    )
    assert [r.code for r in results] == [
        0, 0, 0,
        grpc.StatusCode.INVALID_ARGUMENT.value[0],
        grpc.StatusCode.PERMISSION_DENIED.value[0],
        grpc.StatusCode.UNAUTHENTICATED.value[0],
    ]  # fmt: skip
    assert [r.plaintext for r in results[:3]] == [dk.plaintext_key for dk in reply.data_keys]
    assert all(not r.plaintext for r in results[3:])
    assert results[3].message == "ciphertext or context does not match"
    events = _events(broker, request_id)
    assert [e.outcome for e in events] == [1, 1, 1, 2, 2, 2]
    assert all(e.operation == "Decrypt" for e in events)


def test_batch_decrypt_with_a_token_of_another_certificate_leaks_nothing(broker: Broker) -> None:
    key_id = create_key(broker)
    reply = _many(broker, key_id, 2)
    token = issue(broker, key_id).token
    items = [crypto_pb2.DecryptRequest(ciphertext=dk.wrapped_key, context=CTX, token=token)
             for dk in reply.data_keys]  # fmt: skip
    results = broker.crypto("producer").BatchDecrypt(crypto_pb2.BatchDecryptRequest(items=items))
    assert [r.code for r in results.results] == [grpc.StatusCode.UNAUTHENTICATED.value[0]] * 2
    assert all(not r.plaintext for r in results.results)


def test_batch_decrypt_counts_each_item_against_the_token(broker: Broker) -> None:
    key_id = create_key(broker)
    reply = _many(broker, key_id, 3)
    token = issue(broker, key_id, max_uses=2).token
    items = [crypto_pb2.DecryptRequest(ciphertext=dk.wrapped_key, context=CTX, token=token)
             for dk in reply.data_keys]  # fmt: skip
    results = broker.crypto("consumer").BatchDecrypt(crypto_pb2.BatchDecryptRequest(items=items))
    assert [r.code for r in results.results] == [
        0, 0, grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    ]  # fmt: skip


def test_batch_decrypt_refuses_an_empty_or_oversized_batch(broker: Broker) -> None:
    code, _ = code_of(
        lambda: broker.crypto("consumer").BatchDecrypt(crypto_pb2.BatchDecryptRequest())
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
