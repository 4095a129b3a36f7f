"""ReWrapStream over gRPC against SoftHSM2: many blobs of mixed versions re-wrapped to the
primary in one stream, each item authorised and audited; the SDK generator; `rewrap-file`."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from keybroker.v1 import crypto_pb2, key_admin_pb2, resources_pb2
from keybroker_client import ClientSettings, KeybrokerClient

from tests.broker_fixtures import Broker
from tests.integration.flows import (
    CTX,
    DECRYPT,
    ENCRYPT,
    REWRAP,
    code_of,
    create_key,
    events_for,
    grant,
    issue,
    rid,
)
from tests.integration.test_cli_files import kb, run_on_terminal

OK = 0
INVALID = grpc.StatusCode.INVALID_ARGUMENT.value[0]
DENIED = grpc.StatusCode.PERMISSION_DENIED.value[0]


def _policy() -> resources_pb2.KeyPolicy:
    """producer makes and re-wraps cohort data; consumer only decrypts."""
    return resources_pb2.KeyPolicy(
        grants=[
            grant("producer", ENCRYPT),
            grant("producer", REWRAP, context={"dataset": "cohort-*"}),
            grant("consumer", DECRYPT, context={"dataset": "cohort-*"}),
        ]
    )


def _data_keys(broker: Broker, key_id: str, count: int) -> list[crypto_pb2.DataKey]:
    return list(
        broker.crypto("producer")
        .GenerateDataKeys(
            crypto_pb2.GenerateDataKeysRequest(key_id=key_id, context=CTX, count=count)
        )
        .data_keys
    )


def _rotate(broker: Broker, key_id: str) -> None:
    broker.keys().RotateKey(key_admin_pb2.RotateKeyRequest(key_id=key_id))


@pytest.fixture
def versions(broker: Broker) -> tuple[str, dict[int, list[crypto_pb2.DataKey]]]:
    """A key at version 3 with data keys wrapped under v1 (3), v2 (2) and v3 (1)."""
    key_id = create_key(broker, policy=_policy())
    made = {1: _data_keys(broker, key_id, 3)}
    _rotate(broker, key_id)
    made[2] = _data_keys(broker, key_id, 2)
    _rotate(broker, key_id)
    made[3] = _data_keys(broker, key_id, 1)
    return key_id, made


def _stream(
    broker: Broker, who: str, batches: list[list[bytes]], request_id: str, context: dict[str, str]
) -> list[crypto_pb2.ReWrapResult]:
    requests = (
        crypto_pb2.ReWrapStreamRequest(
            items=[crypto_pb2.ReWrapRequest(ciphertext=b, context=context) for b in batch]
        )
        for batch in batches
    )
    stream = broker.crypto(who).ReWrapStream(requests, metadata=(("x-request-id", request_id),))
    replies = list(stream)
    sizes = [len(r.results) for r in replies]
    assert sizes == [len(b) for b in batches]  # one answer per batch, one result per item
    return [result for reply in replies for result in reply.results]


def _tampered(blob: bytes) -> bytes:
    return blob[:-1] + bytes([blob[-1] ^ 1])


def test_mixed_versions_and_a_tampered_blob_each_get_their_own_result(
    broker: Broker, versions: tuple[str, dict[int, list[crypto_pb2.DataKey]]]
) -> None:
    key_id, made = versions
    v1, v2, v3 = made[1], made[2], made[3]
    order = [v1[0], v1[1], v2[0], None, v2[1], v3[0], v1[2]]  # None: the tampered blob
    blobs = [dk.wrapped_key if dk else _tampered(v1[0].wrapped_key) for dk in order]
    request_id = rid()
    results = _stream(broker, "producer", [blobs[:4], blobs[4:]], request_id, CTX)

    assert [r.code for r in results] == [OK, OK, OK, INVALID, OK, OK, OK]
    assert results[3].message == "ciphertext or context does not match"
    assert not results[3].ciphertext
    assert [r.already_current for r in results] == [False] * 5 + [True, False]
    assert {(r.key_id, r.key_version) for r in results if r.code == OK} == {(key_id, 3)}
    # The blob already under v3 comes back as it was; the others are new v3 blobs.
    assert results[5].ciphertext == blobs[5]
    assert all(r.ciphertext != b for r, b in zip(results, blobs, strict=True) if r.code == OK
               and not r.already_current)  # fmt: skip
    # Each new blob opens to the data key it held: no data key was lost or swapped.
    token = issue(broker, key_id).token
    opened = broker.crypto("consumer").BatchDecrypt(
        crypto_pb2.BatchDecryptRequest(
            items=[
                crypto_pb2.DecryptRequest(ciphertext=r.ciphertext, context=CTX, token=token)
                for r in results
                if r.code == OK
            ]
        )
    )
    expected = [dk.plaintext_key for dk in order if dk is not None]
    assert [o.plaintext for o in opened.results] == expected
    assert {o.key_version for o in opened.results} == {3}

    # One ReWrap event per item, in order, durable before the answers left.
    events = events_for(broker, request_id)
    assert [e.operation for e in events] == ["ReWrap"] * 7
    assert [e.outcome for e in events] == [1, 1, 1, 2, 1, 1, 1]
    assert [e.key_version for e in events] == [3, 3, 3, 1, 3, 3, 3]
    assert {e.key_id for e in events} == {key_id}
    assert events[3].reason == "ciphertext or context does not match"
    assert "already under the primary version" in events[5].reason
    assert all(dict(e.context) == CTX for e in events)
    assert {e.principal for e in events} == {"producer"}
    # The key's usage counts the five blobs moved into v3, not the one found there.
    usage = broker.keys("auditor").GetKeyUsage(key_admin_pb2.GetKeyUsageRequest(key_id=key_id))
    assert {v.version: v.rewrapped for v in usage.versions} == {1: 0, 2: 0, 3: 5}


def test_a_caller_without_the_rewrap_grant_is_denied_item_by_item(
    broker: Broker, versions: tuple[str, dict[int, list[crypto_pb2.DataKey]]]
) -> None:
    _key_id, made = versions
    blobs = [dk.wrapped_key for dk in made[1]]
    request_id = rid()
    results = _stream(broker, "consumer", [blobs], request_id, CTX)
    assert [r.code for r in results] == [DENIED] * 3
    assert all("no rewrap grant" in r.message and not r.ciphertext for r in results)
    events = events_for(broker, request_id)
    assert [(e.operation, e.outcome) for e in events] == [("ReWrap", 2)] * 3
    # The grant's context binds too: a blob presented under another dataset is refused
    # before anything is decrypted.
    results = _stream(broker, "producer", [blobs[:1]], rid(), {"dataset": "other"})
    assert [r.code for r in results] == [DENIED]


def test_admin_rewraps_without_a_grant(
    broker: Broker, versions: tuple[str, dict[int, list[crypto_pb2.DataKey]]]
) -> None:
    _key_id, made = versions
    results = _stream(broker, "admin", [[made[2][0].wrapped_key]], rid(), CTX)
    assert [(r.code, r.key_version) for r in results] == [(OK, 3)]


def test_an_empty_or_oversized_batch_ends_the_stream(broker: Broker) -> None:
    request_id = rid()
    code, message = code_of(lambda: _stream(broker, "producer", [[]], request_id, CTX))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "1 to 1000" in message
    assert [e.outcome for e in events_for(broker, request_id)] == [2]


# The SDK -----------------------------------------------------------------------------------


@pytest.fixture
def producer(broker: Broker) -> Iterator[KeybrokerClient]:
    pki = broker.home / "pki"
    settings = ClientSettings(
        broker.target, pki / "ca.pem", pki / "producer.pem", pki / "producer.key"
    )
    with KeybrokerClient.from_settings(settings) as client:
        yield client


def test_sdk_generator_yields_one_result_per_item_in_order(
    producer: KeybrokerClient, versions: tuple[str, dict[int, list[crypto_pb2.DataKey]]]
) -> None:
    _key_id, made = versions
    blobs = [dk.wrapped_key for v in (1, 2, 3) for dk in made[v]]
    items = iter([*blobs[:2], (b"garbage", None), *blobs[2:]])
    results = list(producer.rewrap_stream(items, CTX, batch_size=2, in_flight=1))
    assert [r.code for r in results] == ["OK", "OK", "INVALID_ARGUMENT", "OK", "OK", "OK", "OK"]
    assert [r.already_current for r in results] == [False] * 6 + [True]
    assert {r.key_version for r in results if r.ok} == {3}
    assert "not a keybroker blob" in results[2].message and not results[2].ok
    # A (blob, context) pair carries its own context.
    [own] = producer.rewrap_stream([(blobs[0], {"dataset": "other"})], CTX)
    assert own.code == "PERMISSION_DENIED"


def test_sdk_generator_checks_its_arguments_before_any_call(producer: KeybrokerClient) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        next(producer.rewrap_stream([b"x"], batch_size=1001))
    with pytest.raises(TypeError, match="re-wrap item"):
        list(producer.rewrap_stream(["not bytes"]))  # type: ignore[list-item]


# The CLI -----------------------------------------------------------------------------------


def test_rewrap_file_rewrites_blobs_in_place_and_reports_failures(
    broker: Broker, versions: tuple[str, dict[int, list[crypto_pb2.DataKey]]], tmp_path: Path
) -> None:
    _key_id, made = versions

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    lines = [
        b64(made[1][0].wrapped_key),
        "",
        json.dumps({"id": "row-7", "ciphertext": b64(made[2][0].wrapped_key), "context": CTX}),
        b64(_tampered(made[1][1].wrapped_key)),
        "not base64 at all!",
        base64.urlsafe_b64encode(made[3][0].wrapped_key).decode().rstrip("="),
    ]
    (tmp_path / "blobs.txt").write_text("\n".join(lines) + "\n")
    r = kb(
        broker, "producer", "rewrap-file", "blobs.txt", "new.txt", "--context",
        "dataset=cohort-42", cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 1, r.stderr
    err = r.stderr.decode()
    assert "2 re-wrapped, 1 already current, 2 failed" in err
    assert "line 4: INVALID_ARGUMENT: ciphertext or context does not match" in err
    assert "line 5: INVALID_ARGUMENT: not base64" in err
    out = (tmp_path / "new.txt").read_text().split("\n")
    assert len(out) == len(lines) + 1 and out[-1] == ""
    assert out[1] == "" and out[3:6] == lines[3:6]  # failed and current lines as they were
    new_plain, new_json = base64.b64decode(out[0]), json.loads(out[2])
    assert new_plain != made[1][0].wrapped_key and new_json["id"] == "row-7"
    assert new_json["context"] == CTX
    # Both new blobs are v3 and open to the data keys they held.
    key_id = versions[0]
    token = issue(broker, key_id).token
    for blob, dk in (
        (new_plain, made[1][0]),
        (base64.b64decode(new_json["ciphertext"]), made[2][0]),
    ):
        opened = broker.crypto("consumer").Decrypt(
            crypto_pb2.DecryptRequest(ciphertext=blob, context=CTX, token=token)
        )
        assert (opened.plaintext, opened.key_version) == (dk.plaintext_key, 3)

    # --json: the summary on stdout; a caller without the grant fails every line.
    r = kb(
        broker, "consumer", "rewrap-file", "blobs.txt", "denied.txt", "--context",
        "dataset=cohort-42", "--json", cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 1
    summary = json.loads(r.stdout)
    assert (summary["rewrapped"], summary["already_current"], summary["failed"]) == (0, 0, 5)
    assert {f["code"] for f in summary["failures"]} == {"PERMISSION_DENIED", "INVALID_ARGUMENT"}


def test_rewrap_file_leaves_out_untouched_when_the_stream_fails(
    broker: Broker, tmp_path: Path
) -> None:
    (tmp_path / "blobs.txt").write_text("AAAA\n")
    (tmp_path / "out.txt").write_text("before\n")
    r = kb(
        broker, "producer", "--target", "127.0.0.1:1", "rewrap-file", "blobs.txt", "out.txt",
        cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 11, r.stderr  # UNAVAILABLE
    assert (tmp_path / "out.txt").read_text() == "before\n"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".part")]


def test_rewrap_file_of_only_current_blobs_exits_zero(
    broker: Broker, versions: tuple[str, dict[int, list[crypto_pb2.DataKey]]], tmp_path: Path
) -> None:
    _key_id, made = versions
    text = base64.b64encode(made[3][0].wrapped_key).decode() + "\n"
    (tmp_path / "in.txt").write_text(text)
    r = kb(
        broker, "producer", "rewrap-file", "in.txt", "out.txt", "--context",
        "dataset=cohort-42", cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert b"0 re-wrapped, 1 already current, 0 failed" in r.stderr
    assert (tmp_path / "out.txt").read_text() == text


def test_rewrap_file_shows_a_progress_bar_on_a_terminal(
    broker: Broker, versions: tuple[str, dict[int, list[crypto_pb2.DataKey]]], tmp_path: Path
) -> None:
    _key_id, made = versions
    lines = [base64.b64encode(dk.wrapped_key).decode() for v in (1, 2) for dk in made[v]]
    (tmp_path / "in.txt").write_text("\n".join(lines) + "\n")
    args = ["rewrap-file", "in.txt", "out.txt", "--context", "dataset=cohort-42"]
    code, screen, stdout = run_on_terminal(broker, args, tmp_path, "stderr")
    assert code == 0, screen
    assert "re-wrapping" in screen and "100%" in screen and stdout == b""
    assert "5 re-wrapped, 0 already current, 0 failed" in screen
