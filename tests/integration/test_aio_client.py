"""The asyncio client against the real broker (grpc.aio over mTLS, SoftHSM2): every RPC, the
same types and errors as the sync client, concurrent calls, and the file recipes."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from keybroker_client import (
    ApprovalPending,
    ApprovalState,
    ClientSettings,
    DataKey,
    FailedPrecondition,
    Key,
    KeybrokerClient,
    KeyState,
    NotFound,
    Outcome,
    PermissionDenied,
    Unauthenticated,
    policy_from_grants,
)
from keybroker_client.aio import AsyncKeybrokerClient
from keybroker_client.evidence import verify_export, verify_receipt

from broker.devpki import issue_dev_identity
from tests.broker_fixtures import Broker, new_key_id, start_broker

CTX = {"dataset": "cohort-42"}
POLICY = policy_from_grants(["producer:encrypt", "consumer:decrypt:dataset=cohort-*"])


def client(broker: Broker, identity: str) -> AsyncKeybrokerClient:
    pki = broker.home / "pki"
    return AsyncKeybrokerClient.from_settings(
        ClientSettings(
            broker.target, pki / "ca.pem", pki / f"{identity}.pem", pki / f"{identity}.key"
        )
    )


def test_key_admin_crypto_tokens_and_audit(broker: Broker) -> None:
    key_id = new_key_id("aio")

    async def run() -> None:
        async with (
            client(broker, "admin") as admin,
            client(broker, "producer") as producer,
            client(broker, "consumer") as consumer,
            client(broker, "auditor") as auditor,
        ):
            key = await admin.create_key(key_id, "async", POLICY, rotation_period="30d")
            assert isinstance(key, Key) and key.state is KeyState.ENABLED
            assert (await admin.get_key(key_id)).description == "async"
            assert key_id in [k.key_id async for k in admin.iter_keys(page_size=2)]
            assert (await admin.rotate_key(key_id)).primary_version == 2
            assert (await admin.disable_key(key_id)).state is KeyState.DISABLED
            with pytest.raises(FailedPrecondition):
                await producer.generate_data_key(key_id, CTX)
            await admin.enable_key(key_id)

            # Concurrent calls on one channel.
            keys = await asyncio.gather(
                *(producer.generate_data_key(key_id, CTX) for _ in range(8))
            )
            assert all(isinstance(k, DataKey) and k.key_version == 2 for k in keys)
            assert len({k.plaintext_key for k in keys}) == 8
            small = await producer.encrypt(key_id, b"NIR 1 84", CTX)

            issued = await consumer.issue_token(key_id, CTX, "async study", ttl="5m")
            opened = await asyncio.gather(
                *(consumer.decrypt(k.wrapped_key, CTX, issued.token) for k in keys)
            )
            assert [o.plaintext for o in opened] == [k.plaintext_key for k in keys]
            assert (await consumer.decrypt(small.ciphertext, CTX, issued.token)).plaintext == (
                b"NIR 1 84"
            )
            rewrapped = await admin.rewrap(keys[0].wrapped_key, CTX)
            assert rewrapped.key_version == 2
            await consumer.revoke_token(issued.token_id)
            with pytest.raises(Unauthenticated):
                await consumer.decrypt(keys[0].wrapped_key, CTX, issued.token)
            with pytest.raises(PermissionDenied):
                await producer.issue_token(key_id, CTX, "not mine")
            with pytest.raises(NotFound):
                await admin.get_key(new_key_id("missing"))
            assert (await consumer.signing_keys())["keys"]

            events = [e async for e in auditor.audit_events(key_id=key_id)]
            assert events[0].operation == "CreateKey"
            assert any(e.operation == "IssueToken" and e.outcome is Outcome.DENIED for e in events)
            first_two = [e.sequence async for e in auditor.audit_events(key_id=key_id, limit=2)]
            assert first_two == [e.sequence for e in events[:2]]
            assert (await auditor.verify_audit_log()).ok

            await admin.update_key_policy(key_id, policy_from_grants(["producer:encrypt"]))
            pending = await admin.schedule_key_destruction(key_id, "8d")
            assert pending.state is KeyState.PENDING_DESTRUCTION
            assert (await admin.cancel_key_destruction(key_id)).state is KeyState.DISABLED

    asyncio.run(run())


def test_async_file_recipes(broker: Broker, tmp_path: Path) -> None:
    key_id = new_key_id("aiof")
    data = os.urandom(300_000)
    (tmp_path / "in.csv").write_bytes(data)

    async def run() -> None:
        async with (
            client(broker, "admin") as admin,
            client(broker, "producer") as producer,
            client(broker, "consumer") as consumer,
        ):
            await admin.create_key(key_id, policy=POLICY)
            seen: list[int] = []
            info = await producer.encrypt_file(
                tmp_path / "in.csv", tmp_path / "in.kbf", key_id, CTX, progress=seen.append
            )
            assert info.plaintext_size == sum(seen) == len(data)
            await consumer.decrypt_file(
                tmp_path / "in.kbf", tmp_path / "out.csv", justification="async study"
            )

    asyncio.run(run())
    assert (tmp_path / "out.csv").read_bytes() == data


# The methods that came to the asyncio client later: the batch path, the re-wrap stream,
# the key lifecycle, approvals and the audit export.

REWRAP_POLICY = policy_from_grants(
    ["producer:encrypt", "producer:rewrap", "consumer:decrypt:dataset=cohort-*"]
)


def test_batch_calls_and_the_rewrap_stream(broker: Broker) -> None:
    key_id = new_key_id("aiob")

    async def blobs_of(blobs: list[bytes]) -> AsyncIterator[bytes]:
        for blob in blobs:
            yield blob

    async def run() -> None:
        async with (
            client(broker, "admin") as admin,
            client(broker, "producer") as producer,
            client(broker, "consumer") as consumer,
        ):
            await admin.create_key(key_id, policy=REWRAP_POLICY)
            keys = await producer.generate_data_keys(key_id, CTX, count=5)
            assert [(k.key_id, k.key_version) for k in keys] == [(key_id, 1)] * 5
            assert len({k.plaintext_key for k in keys}) == 5

            token = (await consumer.issue_token(key_id, CTX, "async batch")).token
            items = [(k.wrapped_key, CTX, token) for k in keys]
            items.append((keys[0].wrapped_key, {"dataset": "cohort-43"}, token))
            results = await consumer.batch_decrypt(items)
            assert [r.plaintext for r in results[:5]] == [k.plaintext_key for k in keys]
            assert all(r.ok and r.key_version == 1 for r in results[:5])
            assert (results[5].ok, results[5].code, results[5].plaintext) == (
                False,
                "PERMISSION_DENIED",
                b"",
            )
            with pytest.raises(PermissionDenied):  # no encrypt grant: the call as a whole
                await consumer.generate_data_keys(key_id, CTX, count=2)

            await admin.rotate_key(key_id)
            damaged = keys[1].wrapped_key[:-1] + bytes([keys[1].wrapped_key[-1] ^ 1])
            moved = [
                r
                async for r in producer.rewrap_stream(
                    [keys[0].wrapped_key, damaged], CTX, batch_size=1, in_flight=1
                )
            ]
            assert [(r.code, r.key_version) for r in moved] == [("OK", 2), ("INVALID_ARGUMENT", 0)]
            # An async iterable of items, some already under the primary version.
            again = [
                r
                async for r in producer.rewrap_stream(
                    blobs_of([*(k.wrapped_key for k in keys), moved[0].ciphertext]), CTX
                )
            ]
            assert all(r.ok and r.key_version == 2 for r in again)
            assert [r.already_current for r in again] == [False] * 5 + [True]
            refused = [r async for r in consumer.rewrap_stream([keys[2].wrapped_key], CTX)]
            assert [r.code for r in refused] == ["PERMISSION_DENIED"]
            opened = await consumer.decrypt(again[2].ciphertext, CTX, token)
            assert opened.plaintext == keys[2].plaintext_key and opened.key_version == 2

    asyncio.run(run())

    # The blocking client's batch methods answer alike.
    pki = broker.home / "pki"
    settings = ClientSettings(
        broker.target, pki / "ca.pem", pki / "producer.pem", pki / "producer.key"
    )
    with KeybrokerClient.from_settings(settings) as producer:
        made = producer.generate_data_keys(key_id, CTX, count=2)
    assert [k.key_version for k in made] == [2, 2]


@pytest.fixture
def lone(hsm_home: Path, tmp_path: Path) -> Iterator[tuple[Broker, str]]:
    """A broker of its own whose key changes need two admins (`admin` and a second one,
    whose name comes with it) and whose scheduler runs only when the test says so."""
    second = f"aio-sec-{uuid.uuid4().hex[:8]}"
    issue_dev_identity(hsm_home / "pki", second)
    b = start_broker(
        hsm_home,
        database=tmp_path / "kb.db",
        admins=("admin", second),
        approvals_required=2,
        keys_min_destruction_window=60.0,
        keys_scheduler_interval=0.0,
    )
    yield b, second
    b.close()


def test_lifecycle_approvals_and_audit_export(lone: tuple[Broker, str]) -> None:
    b, second = lone
    key_id = new_key_id("aiol")

    async def run() -> None:
        async with (
            client(b, "admin") as admin,
            client(b, second) as other_admin,
            client(b, "producer") as producer,
            client(b, "auditor") as auditor,
        ):
            await admin.create_key(key_id, policy=POLICY)
            await producer.generate_data_key(key_id, CTX)
            await admin.rotate_key(key_id)
            await producer.generate_data_key(key_id, CTX)
            assert (await admin.set_min_decryption_version(key_id, 2)).min_decryption_version == 2
            usage = await auditor.key_usage(key_id)
            assert [(v.version, v.data_keys_issued) for v in usage.versions] == [(1, 1), (2, 1)]

            # A change that needs a second admin; one withdrawn, one approved and applied.
            with pytest.raises(ApprovalPending) as widened:
                await admin.update_key_policy(key_id, policy_from_grants(["consumer:encrypt"]))
            withdrawn = await admin.cancel_approval_request(widened.value.request.request_id)
            assert withdrawn.state is ApprovalState.CANCELLED
            with pytest.raises(ApprovalPending) as scheduled:
                await admin.schedule_key_destruction(key_id, "2m")
            request_id = scheduled.value.request.request_id
            assert (await auditor.get_approval_request(request_id)).state is ApprovalState.PENDING
            page = await auditor.list_approval_requests(ApprovalState.PENDING, key_id)
            assert [r.request_id for r in page.requests] == [request_id]
            applied = await other_admin.approve_request(request_id)
            assert applied.state is ApprovalState.APPLIED
            every = [r.request_id async for r in auditor.iter_approval_requests(page_size=1)]
            assert sorted(every) == sorted([withdrawn.request_id, request_id])
            with pytest.raises(FailedPrecondition):  # not destroyed yet
                await auditor.destruction_receipt(key_id)

            b.clock.offset = timedelta(minutes=3)
            assert b.app.scheduler is not None
            assert b.app.scheduler.run_once().destroyed == (key_id,)
            jwks = await auditor.signing_keys()
            receipt = await auditor.destruction_receipt(key_id)
            assert verify_receipt(receipt + "\n", jwks, key_id=key_id).key_id == key_id

            lines = [line async for line in auditor.export_audit_log()]
            assert verify_export(lines, jwks).ok
            with pytest.raises(PermissionDenied):
                [line async for line in producer.export_audit_log()]

    asyncio.run(run())
