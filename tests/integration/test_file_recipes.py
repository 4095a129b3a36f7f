"""The file recipes of the SDK against the real broker (gRPC over mTLS, SoftHSM2): producer
encrypt_file, consumer decrypt_file, the audit trail they leave, and what is refused."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from keybroker_client import (
    ClientSettings,
    Decrypted,
    InvalidArgument,
    InvalidFile,
    KeybrokerClient,
    Outcome,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
)
from keybroker_client.fileformat import read_header

from tests.broker_fixtures import Broker
from tests.integration.flows import CTX, create_key


def settings(broker: Broker, identity: str) -> ClientSettings:
    pki = broker.home / "pki"
    return ClientSettings(
        broker.target, pki / "ca.pem", pki / f"{identity}.pem", pki / f"{identity}.key"
    )


@pytest.fixture
def kb(broker: Broker) -> Iterator[dict[str, KeybrokerClient]]:
    clients = {
        who: KeybrokerClient.from_settings(settings(broker, who))
        for who in ("admin", "producer", "consumer", "auditor")
    }
    yield clients
    for c in clients.values():
        c.close()


@pytest.fixture
def key_id(broker: Broker) -> str:
    return create_key(broker)


def test_producer_encrypts_a_file_consumer_decrypts_it_with_a_justification(
    tmp_path: Path, kb: dict[str, KeybrokerClient], key_id: str
) -> None:
    data = os.urandom(200_000)
    (tmp_path / "cohort.csv").write_bytes(data)
    enc = kb["producer"].encrypt_file(tmp_path / "cohort.csv", tmp_path / "cohort.kbf", key_id, CTX)
    assert (enc.key_id, enc.key_version, enc.plaintext_size) == (key_id, 1, len(data))
    sealed = (tmp_path / "cohort.kbf").read_bytes()
    header = read_header(io.BytesIO(sealed))
    assert sealed[:5] == b"KBFS\x01" and header.context == CTX and header.key_id == key_id

    dec = kb["consumer"].decrypt_file(
        tmp_path / "cohort.kbf", tmp_path / "out.csv", justification="survival study 42"
    )
    assert (tmp_path / "out.csv").read_bytes() == data
    assert (dec.key_id, dec.key_version, dec.context) == (key_id, 1, CTX)

    # The data key itself never reaches the file.
    token = kb["consumer"].issue_token(key_id, CTX, "check").token
    data_key = kb["consumer"].decrypt(header.wrapped_key, CTX, token).plaintext
    assert data_key not in sealed

    events = list(kb["auditor"].audit_events(key_id=key_id))
    ops = [(e.principal, e.operation, e.outcome) for e in events]
    assert ops[:4] == [
        ("admin", "CreateKey", Outcome.ALLOWED),
        ("producer", "GenerateDataKey", Outcome.ALLOWED),
        ("consumer", "IssueToken", Outcome.ALLOWED),
        ("consumer", "Decrypt", Outcome.ALLOWED),
    ]
    assert events[2].justification == "survival study 42" and events[2].context == CTX
    assert events[3].token_id == events[2].token_id


def test_decrypt_with_a_given_token_and_after_rotation(
    broker: Broker, tmp_path: Path, kb: dict[str, KeybrokerClient], key_id: str
) -> None:
    (tmp_path / "a").write_bytes(b"rows")
    kb["producer"].encrypt_file(tmp_path / "a", tmp_path / "a.kbf", key_id, CTX)
    kb["admin"].rotate_key(key_id)
    token = kb["consumer"].issue_token(key_id, CTX, "study").token
    info = kb["consumer"].decrypt_file(tmp_path / "a.kbf", tmp_path / "b", token=token)
    assert (tmp_path / "b").read_bytes() == b"rows" and info.key_version == 1


def test_the_self_issued_token_allows_one_decrypt_only(
    tmp_path: Path, kb: dict[str, KeybrokerClient], key_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "a").write_bytes(b"rows")
    kb["producer"].encrypt_file(tmp_path / "a", tmp_path / "a.kbf", key_id, CTX)
    consumer = kb["consumer"]
    used: list[str] = []
    real_decrypt = consumer.decrypt

    def spy(ciphertext: bytes, context: Any, token: str) -> Decrypted:
        used.append(token)
        return real_decrypt(ciphertext, context, token)

    monkeypatch.setattr(consumer, "decrypt", spy)
    consumer.decrypt_file(tmp_path / "a.kbf", tmp_path / "b", justification="study")
    (token,) = used
    wrapped = read_header(io.BytesIO((tmp_path / "a.kbf").read_bytes())).wrapped_key
    with pytest.raises(ResourceExhausted):
        real_decrypt(wrapped, CTX, token)


def test_a_header_whose_context_was_edited_is_refused_by_the_broker(
    tmp_path: Path, kb: dict[str, KeybrokerClient], key_id: str
) -> None:
    (tmp_path / "a").write_bytes(b"rows")
    kb["producer"].encrypt_file(tmp_path / "a", tmp_path / "a.kbf", key_id, CTX)
    sealed = (tmp_path / "a.kbf").read_bytes()
    # cohort-43 is within the consumer's grant (cohort-*): only the HSM binding refuses it.
    (tmp_path / "a.kbf").write_bytes(sealed.replace(b"cohort-42", b"cohort-43"))
    with pytest.raises(InvalidArgument, match="ciphertext or context does not match"):
        kb["consumer"].decrypt_file(tmp_path / "a.kbf", tmp_path / "b", justification="study")
    assert not (tmp_path / "b").exists()


def test_wrong_context_tampered_chunk_and_foreign_callers(
    tmp_path: Path, kb: dict[str, KeybrokerClient], key_id: str
) -> None:
    (tmp_path / "a").write_bytes(os.urandom(100_000))
    kb["producer"].encrypt_file(tmp_path / "a", tmp_path / "a.kbf", key_id, CTX)
    with pytest.raises(InvalidFile, match="another context"):
        kb["consumer"].decrypt_file(
            tmp_path / "a.kbf", tmp_path / "b", {"dataset": "cohort-7"}, justification="study"
        )
    sealed = bytearray((tmp_path / "a.kbf").read_bytes())
    sealed[-30_000] ^= 1
    (tmp_path / "t.kbf").write_bytes(sealed)
    with pytest.raises(InvalidFile, match="does not authenticate"):
        kb["consumer"].decrypt_file(tmp_path / "t.kbf", tmp_path / "b", justification="study")
    # The producer holds no decrypt grant; a token cannot be lent to it.
    with pytest.raises(PermissionDenied):
        kb["producer"].decrypt_file(tmp_path / "a.kbf", tmp_path / "b", justification="study")
    token = kb["consumer"].issue_token(key_id, CTX, "study").token
    with pytest.raises(Unauthenticated, match="another client certificate"):
        kb["producer"].decrypt_file(tmp_path / "a.kbf", tmp_path / "b", token=token)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "a.kbf", "t.kbf"]
