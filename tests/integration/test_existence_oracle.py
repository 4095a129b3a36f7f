"""No key-existence oracle, over gRPC and mutual TLS against SoftHSM2.

A caller without any grant on a key (and neither admin nor auditor) gets one answer whether
the key exists or not, and whatever its state: PERMISSION_DENIED with the same message. The
audit trail records the truth for the auditors. A caller with a grant, an admin or an auditor
still learns NOT_FOUND and FAILED_PRECONDITION.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from keybroker.v1 import crypto_pb2, key_admin_pb2, resources_pb2, tokens_pb2

from broker import blob as blobs
from tests.broker_fixtures import Broker, new_key_id
from tests.integration.flows import (
    CTX,
    DECRYPT,
    ENCRYPT,
    REWRAP,
    code_of,
    create_key,
    datakey,
    events_for,
    grant,
    issue,
    rid,
    standard_policy,
)

DENIED = grpc.StatusCode.PERMISSION_DENIED
#: Stands for the key id in a message, so that answers about different ids compare.
KEY = "<key>"


def _forged_blob(key_id: str) -> bytes:
    """A well-formed blob naming `key_id` (version 1) whose sealed part is noise: enough to
    reach the grant check, which comes before any decryption."""
    return blobs.Blob(key_id, 1, os.urandom(blobs.IV_BYTES), os.urandom(48)).encode()


@pytest.fixture(scope="module")
def keys(broker: Broker) -> dict[str, str]:
    """Key ids: `missing` (never created), `other` (exists; its grants name only a principal
    that is none of the test identities), `disabled` (the same, disabled), `mine` (the
    standard policy: producer encrypts, consumer decrypts)."""
    stranger_only = resources_pb2.KeyPolicy(
        grants=[grant("someone-else", ENCRYPT, DECRYPT, REWRAP)]
    )
    other = create_key(broker, policy=stranger_only)
    disabled = create_key(broker, policy=stranger_only)
    broker.keys().DisableKey(key_admin_pb2.DisableKeyRequest(key_id=disabled))
    return {
        "missing": new_key_id("missing"),
        "other": other,
        "disabled": disabled,
        "mine": create_key(broker),
    }


def _answers(call: Callable[[str], Any], keys: dict[str, str]) -> list[tuple[grpc.StatusCode, str]]:
    """The (code, message with the key id masked) of `call` on the missing, the existing and
    the disabled key."""
    out = []
    for name in ("missing", "other", "disabled"):
        key_id = keys[name]
        code, message = code_of(lambda key_id=key_id: call(key_id))
        out.append((code, message.replace(key_id, KEY)))
    return out


def _one_refusal(answers: list[tuple[grpc.StatusCode, str]]) -> str:
    assert len(set(answers)) == 1, answers
    code, message = answers[0]
    assert code == DENIED, answers
    return message


def test_generate_data_key_and_encrypt_give_one_answer(
    broker: Broker, keys: dict[str, str]
) -> None:
    crypto = broker.crypto("producer")
    calls: list[Callable[[str], Any]] = [
        lambda k: crypto.GenerateDataKey(crypto_pb2.GenerateDataKeyRequest(key_id=k, context=CTX)),
        lambda k: crypto.Encrypt(crypto_pb2.EncryptRequest(key_id=k, plaintext=b"x", context=CTX)),
        lambda k: crypto.GenerateDataKeys(
            crypto_pb2.GenerateDataKeysRequest(key_id=k, context=CTX, count=3)
        ),
    ]
    messages = {_one_refusal(_answers(call, keys)) for call in calls}
    assert messages == {
        f"principal 'producer' has no encrypt grant on key '{KEY}' (or there is no such key); "
        "ask an admin to check the key id and the key's policy"
    }


def test_issue_token_gives_one_answer_and_hides_the_state(
    broker: Broker, keys: dict[str, str]
) -> None:
    tokens = broker.tokens("consumer")

    def call(key_id: str) -> object:
        return tokens.IssueToken(
            tokens_pb2.IssueTokenRequest(key_id=key_id, context=CTX, justification="study")
        )

    assert "no decrypt grant" in _one_refusal(_answers(call, keys))


def test_rewrap_gives_one_answer(broker: Broker, keys: dict[str, str]) -> None:
    crypto = broker.crypto("consumer")

    def call(key_id: str) -> object:
        return crypto.ReWrap(crypto_pb2.ReWrapRequest(ciphertext=_forged_blob(key_id), context=CTX))

    assert "no rewrap grant" in _one_refusal(_answers(call, keys))


def test_decrypt_gives_one_answer(broker: Broker, keys: dict[str, str]) -> None:
    # The consumer's token is for its own key; a blob naming another key is refused alike
    # whether that key exists or not, and so is a call without a token.
    token = issue(broker, keys["mine"]).token
    crypto = broker.crypto("consumer")
    for presented in (token, ""):

        def call(key_id: str, presented: str = presented) -> object:
            return crypto.Decrypt(
                crypto_pb2.DecryptRequest(
                    ciphertext=_forged_blob(key_id), context=CTX, token=presented
                )
            )

        answers = _answers(call, keys)
        assert len(set(answers)) == 1, answers
        expected = DENIED if presented else grpc.StatusCode.UNAUTHENTICATED
        assert answers[0][0] == expected


def test_batch_items_give_one_answer(broker: Broker, keys: dict[str, str]) -> None:
    names = ("missing", "other", "disabled")
    stream = broker.crypto("consumer").ReWrapStream(
        iter(
            [
                crypto_pb2.ReWrapStreamRequest(
                    items=[
                        crypto_pb2.ReWrapRequest(ciphertext=_forged_blob(keys[n]), context=CTX)
                        for n in names
                    ]
                )
            ]
        )
    )
    [response] = list(stream)
    masked = {
        (r.code, r.message.replace(keys[n], KEY))
        for n, r in zip(names, response.results, strict=True)
    }
    assert len(masked) == 1 and next(iter(masked))[0] == DENIED.value[0], masked

    token = issue(broker, keys["mine"]).token
    batch = broker.crypto("consumer").BatchDecrypt(
        crypto_pb2.BatchDecryptRequest(
            items=[
                crypto_pb2.DecryptRequest(
                    ciphertext=_forged_blob(keys[n]), context=CTX, token=token
                )
                for n in names
            ]
        )
    )
    masked = {
        (r.code, r.message.replace(keys[n], KEY)) for n, r in zip(names, batch.results, strict=True)
    }
    assert len(masked) == 1 and next(iter(masked))[0] == DENIED.value[0], masked


def test_the_audit_trail_keeps_the_truth(broker: Broker, keys: dict[str, str]) -> None:
    crypto = broker.crypto("producer")
    found: dict[str, resources_pb2.AuditEvent] = {}
    for name in ("missing", "other"):
        request_id = rid()
        code_of(
            lambda name=name, request_id=request_id: crypto.GenerateDataKey(
                crypto_pb2.GenerateDataKeyRequest(key_id=keys[name], context=CTX),
                metadata=(("x-request-id", request_id),),
            )
        )
        [found[name]] = events_for(broker, request_id)
    missing, other = found["missing"], found["other"]
    # The same shape: who, what, which key id, refused ...
    for event, name in ((missing, "missing"), (other, "other")):
        assert (event.principal, event.operation, event.key_id, event.outcome) == (
            "producer",
            "GenerateDataKey",
            keys[name],
            resources_pb2.OUTCOME_DENIED,
        )
        assert dict(event.context) == CTX
    # ... and the reason an auditor reads tells which it was.
    assert missing.reason == (
        f"no key '{keys['missing']}' exists (the caller was answered as having no grant on it)"
    )
    assert other.reason == f"principal 'producer' has no encrypt grant on key '{keys['other']}'"


def test_a_caller_with_a_grant_still_learns_the_state(broker: Broker) -> None:
    policy = standard_policy()
    policy.grants.append(grant("producer", REWRAP))
    key_id = create_key(broker, policy=policy)
    dk = datakey(broker, key_id)
    token = issue(broker, key_id).token
    broker.keys().DisableKey(key_admin_pb2.DisableKeyRequest(key_id=key_id))
    calls: list[Callable[[], Any]] = [
        lambda: datakey(broker, key_id),
        lambda: broker.crypto("producer").Encrypt(
            crypto_pb2.EncryptRequest(key_id=key_id, plaintext=b"x", context=CTX)
        ),
        lambda: issue(broker, key_id),
        lambda: broker.crypto("producer").ReWrap(
            crypto_pb2.ReWrapRequest(ciphertext=dk.wrapped_key, context=CTX)
        ),
        lambda: broker.crypto("consumer").Decrypt(
            crypto_pb2.DecryptRequest(ciphertext=dk.wrapped_key, context=CTX, token=token)
        ),
    ]
    for call in calls:
        code, message = code_of(call)
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "disabled" in message
    # Without the grant for this operation, the state stays hidden even from a principal
    # with another grant on the key.
    code, message = code_of(lambda: datakey(broker, key_id, identity="consumer"))
    assert code == DENIED and "no encrypt grant" in message


def test_admins_and_auditors_still_get_not_found(broker: Broker, keys: dict[str, str]) -> None:
    missing = keys["missing"]
    calls: list[Callable[[], Any]] = [
        lambda: datakey(broker, missing, identity="admin"),
        lambda: broker.crypto("admin").ReWrap(
            crypto_pb2.ReWrapRequest(ciphertext=_forged_blob(missing), context=CTX)
        ),
        lambda: issue(broker, missing, identity="auditor"),
        lambda: broker.keys("auditor").GetKey(key_admin_pb2.GetKeyRequest(key_id=missing)),
    ]
    for call in calls:
        code, message = code_of(call)
        assert code == grpc.StatusCode.NOT_FOUND and missing in message
