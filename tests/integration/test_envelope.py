"""Envelope encryption end to end over gRPC/mTLS against SoftHSM2 (invariant 2)."""

from __future__ import annotations

import grpc
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from keybroker.v1 import crypto_pb2, key_admin_pb2, resources_pb2

from broker import blob as blobs
from tests.broker_fixtures import Broker
from tests.integration.flows import (
    CTX,
    REWRAP,
    code_of,
    create_key,
    datakey,
    decrypt,
    grant,
    issue,
    standard_policy,
)


def test_producer_to_consumer_flow(broker: Broker) -> None:
    key_id = create_key(broker)
    dk = datakey(broker, key_id)
    assert len(dk.plaintext_key) == 32
    assert dk.key_id == key_id and dk.key_version == 1
    # The producer encrypts locally with the data key.
    nonce = b"\x01" * 12
    record = AESGCM(dk.plaintext_key).encrypt(nonce, b"patient record", None)
    token = issue(broker, key_id).token
    opened = decrypt(broker, dk.wrapped_key, token)
    assert opened.plaintext == dk.plaintext_key
    assert (opened.key_id, opened.key_version) == (key_id, 1)
    assert AESGCM(opened.plaintext).decrypt(nonce, record, None) == b"patient record"


def test_wrapped_key_is_self_describing_and_never_contains_the_key(broker: Broker) -> None:
    key_id = create_key(broker)
    dk = datakey(broker, key_id)
    parsed = blobs.parse(dk.wrapped_key)
    assert (parsed.key_id, parsed.key_version) == (key_id, 1)
    assert dk.wrapped_key[:3] == b"KB\x01"
    assert dk.plaintext_key not in dk.wrapped_key
    assert len(dk.wrapped_key) == 4 + len(key_id) + 4 + 12 + 32 + 16


def test_encrypt_small_payload_and_limit(broker: Broker) -> None:
    key_id = create_key(broker)
    producer = broker.crypto("producer")
    ct = producer.Encrypt(
        crypto_pb2.EncryptRequest(key_id=key_id, plaintext=b"x" * 65536, context=CTX)
    )
    token = issue(broker, key_id).token
    assert decrypt(broker, ct.ciphertext, token).plaintext == b"x" * 65536
    code, msg = code_of(
        lambda: producer.Encrypt(
            crypto_pb2.EncryptRequest(key_id=key_id, plaintext=b"x" * 65537, context=CTX)
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "65536" in msg


def test_every_flipped_byte_fails_decryption(broker: Broker) -> None:
    key_id = create_key(broker)
    dk = datakey(broker, key_id)
    token = issue(broker, key_id).token
    for i in range(len(dk.wrapped_key)):
        for bit in (0x01, 0x80):
            tampered = bytearray(dk.wrapped_key)
            tampered[i] ^= bit
            code, msg = code_of(lambda t=bytes(tampered): decrypt(broker, t, token))
            # Header bytes name another key or version (or no valid blob at all); the rest
            # is the IV, ciphertext or tag and fails authentication with one generic message.
            assert code in (
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.PERMISSION_DENIED,
                grpc.StatusCode.NOT_FOUND,
            ), (i, code)
            if i >= 4 + len(key_id) + 4:
                assert code == grpc.StatusCode.INVALID_ARGUMENT
                assert msg == "ciphertext or context does not match"


def test_truncated_and_extended_blobs_fail(broker: Broker) -> None:
    key_id = create_key(broker)
    dk = datakey(broker, key_id)
    token = issue(broker, key_id).token
    for bad in (dk.wrapped_key[:-1], dk.wrapped_key + b"\x00", dk.wrapped_key[:10], b""):
        code, _ = code_of(lambda b=bad: decrypt(broker, b, token))
        assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_context_is_bound(broker: Broker) -> None:
    key_id = create_key(broker)
    ctx = {"dataset": "cohort-42", "file": "visits.parquet"}
    dk = datakey(broker, key_id, ctx)
    token = issue(broker, key_id, {"dataset": "cohort-42"}).token
    assert decrypt(broker, dk.wrapped_key, token, ctx).plaintext == dk.plaintext_key
    variants = [
        {"dataset": "cohort-42", "file": "Visits.parquet"},  # case change
        {"dataset": "cohort-42", "file": "visits.parquet", "extra": "1"},  # added entry
        {"dataset": "cohort-42"},  # removed entry
        {"dataset": "cohort-42", "file": "visits.parquеt"},  # Cyrillic look-alike
        {"dataset": "cohort-42", "FILE": "visits.parquet"},  # key case change
    ]
    for variant in variants:
        code, msg = code_of(lambda v=variant: decrypt(broker, dk.wrapped_key, token, v))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, variant
        assert msg == "ciphertext or context does not match"


def test_blob_presented_as_another_keys(broker: Broker) -> None:
    key_a = create_key(broker)
    key_b = create_key(broker)
    dk = datakey(broker, key_a)
    parsed = blobs.parse(dk.wrapped_key)
    forged = blobs.Blob(key_b, 1, parsed.iv, parsed.sealed).encode()
    token_b = issue(broker, key_b).token
    code, msg = code_of(lambda: decrypt(broker, forged, token_b))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert msg == "ciphertext or context does not match"


def test_rotation_keeps_old_versions_and_rewrap_moves_to_primary(broker: Broker) -> None:
    policy = standard_policy()
    policy.grants.append(grant("producer", REWRAP))
    key_id = create_key(broker, policy=policy)
    old = datakey(broker, key_id)
    rotated = broker.keys().RotateKey(key_admin_pb2.RotateKeyRequest(key_id=key_id)).key
    assert rotated.primary_version == 2
    assert [v.version for v in rotated.versions] == [1, 2]
    new = datakey(broker, key_id)
    assert new.key_version == 2
    token = issue(broker, key_id).token
    assert decrypt(broker, old.wrapped_key, token).plaintext == old.plaintext_key
    assert decrypt(broker, new.wrapped_key, token).plaintext == new.plaintext_key
    rewrapped = broker.crypto("producer").ReWrap(
        crypto_pb2.ReWrapRequest(ciphertext=old.wrapped_key, context=CTX)
    )
    assert rewrapped.key_version == 2
    assert not hasattr(rewrapped, "plaintext")
    assert decrypt(broker, rewrapped.ciphertext, token).plaintext == old.plaintext_key
    # The consumer has no rewrap grant.
    code, _ = code_of(
        lambda: broker.crypto("consumer").ReWrap(
            crypto_pb2.ReWrapRequest(ciphertext=old.wrapped_key, context=CTX)
        )
    )
    assert code == grpc.StatusCode.PERMISSION_DENIED


def test_kek_attributes_in_the_hsm(broker: Broker) -> None:
    """Invariant 1 on a key made through the API: the template as stored on the token."""
    key_id = create_key(broker)
    broker.keys().RotateKey(key_admin_pb2.RotateKeyRequest(key_id=key_id))
    key = broker.app.store.get_key(key_id)
    for version in key.versions:
        attrs = broker.app.hsms["local"].attributes(version.hsm_label)
        for name, want in {
            "CKA_TOKEN": True,
            "CKA_PRIVATE": True,
            "CKA_SENSITIVE": True,
            "CKA_EXTRACTABLE": False,
            "CKA_MODIFIABLE": False,
            "CKA_WRAP": False,
            "CKA_UNWRAP": False,
            "CKA_SIGN": False,
            "CKA_VERIFY": False,
            "CKA_ENCRYPT": True,
            "CKA_DECRYPT": True,
            "CKA_ALLOWED_MECHANISMS": ["CKM_AES_GCM"],
        }.items():
            assert attrs[name] == want, (name, attrs.get(name))


def test_key_metadata_and_pagination(broker: Broker) -> None:
    ids = sorted(create_key(broker) for _ in range(5))
    seen: list[str] = []
    token = ""
    while True:
        page = broker.keys("auditor").ListKeys(
            key_admin_pb2.ListKeysRequest(page_size=2, page_token=token)
        )
        assert len(page.keys) <= 2
        seen += [k.key_id for k in page.keys]
        token = page.next_page_token
        if not token:
            break
    assert set(ids) <= set(seen)
    assert seen == sorted(seen)
    key = broker.keys("auditor").GetKey(key_admin_pb2.GetKeyRequest(key_id=ids[0])).key
    assert key.state == resources_pb2.KEY_STATE_ENABLED
    assert key.hsm == "local" and key.primary_version == 1
    assert key.create_time.seconds > 0
    assert {g.principal for g in key.policy.grants} == {"producer", "consumer"}
