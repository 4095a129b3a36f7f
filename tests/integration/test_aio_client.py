"""The asyncio client against the real broker (grpc.aio over mTLS, SoftHSM2): every RPC, the
same types and errors as the sync client, concurrent calls, and the file recipes."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from keybroker_client import (
    ClientSettings,
    DataKey,
    FailedPrecondition,
    Key,
    KeyState,
    NotFound,
    Outcome,
    PermissionDenied,
    Unauthenticated,
    UnexpectedError,
    policy_from_grants,
)
from keybroker_client.aio import AsyncKeybrokerClient

from tests.broker_fixtures import Broker, new_key_id

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
            try:
                pending = await admin.schedule_key_destruction(key_id, "1d")
            except UnexpectedError as exc:  # the broker does not offer destruction yet
                assert exc.code_name == "UNIMPLEMENTED"
            else:
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
