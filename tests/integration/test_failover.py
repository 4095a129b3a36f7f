"""Two real brokers sharing one database and one SoftHSM2 token, and a client given both:
calls fail over when one broker stops or fails, and calls with effects are never repeated.
Each check reads the shared audit trail, where every try of a call carries the call's id."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import PyKCS11
import pytest
from keybroker_client import (
    AuditEvent,
    ClientSettings,
    KeybrokerClient,
    Outcome,
    ResourceExhausted,
    Unavailable,
    policy_from_grants,
)
from keybroker_client.aio import AsyncKeybrokerClient

from hsm_sim.faults import FailOnCall
from tests.broker_fixtures import Broker, new_key_id, start_broker

CTX = {"dataset": "cohort-42"}
POLICY = policy_from_grants(["producer:encrypt", "consumer:decrypt:dataset=cohort-*"])


@pytest.fixture
def pair(hsm_home: Path, tmp_path: Path) -> Iterator[tuple[Broker, Broker]]:
    db = tmp_path / "shared.db"
    a = start_broker(hsm_home, database=db)
    b = start_broker(hsm_home, database=db)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def settings(first: Broker, second: Broker, identity: str) -> ClientSettings:
    pki = second.home / "pki"
    return ClientSettings(
        f"{first.target},{second.target}",
        pki / "ca.pem",
        pki / f"{identity}.pem",
        pki / f"{identity}.key",
    )


def client(first: Broker, second: Broker, identity: str) -> KeybrokerClient:
    """A client whose first call goes to ``first`` (round robin starts at the first target)."""
    return KeybrokerClient.from_settings(settings(first, second, identity))


def single(broker: Broker, identity: str) -> KeybrokerClient:
    pki = broker.home / "pki"
    return KeybrokerClient.from_settings(
        ClientSettings(
            broker.target, pki / "ca.pem", pki / f"{identity}.pem", pki / f"{identity}.key"
        )
    )


def events(broker: Broker, key_id: str, operation: str) -> list[AuditEvent]:
    """The trail's events of ``operation`` on ``key_id`` (both brokers write one trail)."""
    with single(broker, "auditor") as kb:
        return [e for e in kb.audit_events(key_id=key_id) if e.operation == operation]


def outcomes(broker: Broker, key_id: str, operation: str, request_id: str) -> list[Outcome]:
    """The outcome of every try of one call, in the trail."""
    return [e.outcome for e in events(broker, key_id, operation) if e.request_id == request_id]


def test_calls_fail_over_when_a_broker_stops(pair: tuple[Broker, Broker]) -> None:
    a, b = pair
    key_id = new_key_id("fo")
    with (
        client(a, b, "admin") as admin,
        client(a, b, "producer") as producer,
        client(a, b, "consumer") as consumer,
        client(a, b, "auditor") as auditor,
    ):
        admin.create_key(key_id, "failover", POLICY)
        # Both brokers serve while both run (the trail is shared: either sees the key).
        for _ in range(2):
            assert admin.get_key(key_id).key_id == key_id
        dk = producer.generate_data_key(key_id, CTX)

        a.close()

        # Reads and calls whose repetition has no effect: every call succeeds, four times so
        # that round robin starts at the stopped broker at least twice.
        for _ in range(4):
            assert admin.get_key(key_id).key_id == key_id
            assert key_id in [k.key_id for k in admin.iter_keys()]
            assert admin.signing_keys()["keys"]
            assert producer.generate_data_key(key_id, CTX).key_id == key_id
            assert producer.encrypt(key_id, b"small", CTX).key_id == key_id
            assert auditor.verify_audit_log().ok
            assert [e.operation for e in auditor.audit_events(key_id=key_id, limit=1)]

        # Calls with effects: the stopped broker is never reached, so they go to the other.
        assert admin.rotate_key(key_id).primary_version == 2
        issued = consumer.issue_token(key_id, CTX, "failover study", max_uses=1)
        assert consumer.decrypt(dk.wrapped_key, CTX, issued.token).plaintext == dk.plaintext_key
        other = new_key_id("fo")
        assert admin.create_key(other, "after the stop", POLICY).key_id == other

    # Each call with effects is in the trail once: none was repeated.
    for operation in ("RotateKey", "IssueToken", "Decrypt"):
        assert [e.outcome for e in events(b, key_id, operation)] == [Outcome.ALLOWED]
    assert [e.outcome for e in events(b, other, "CreateKey")] == [Outcome.ALLOWED]
    # The stopped broker wrote nothing after its stop: 1 data key before it, 4 after.
    assert [e.outcome for e in events(b, key_id, "GenerateDataKey")] == [Outcome.ALLOWED] * 5


def test_a_call_with_effects_that_reached_a_failing_broker_is_not_repeated(
    pair: tuple[Broker, Broker],
) -> None:
    a, b = pair
    key_id = new_key_id("fo")
    with single(b, "admin") as admin:
        admin.create_key(key_id, "failover", POLICY)
    hsm = a.app.hsms["local"]
    # Broker a's HSM fails every signature: IssueToken reaches a, is audited there as an
    # error, and answers UNAVAILABLE (fail closed).
    hsm.gate.fault = FailOnCall(1, PyKCS11.CKR_DEVICE_ERROR, frozenset({"sign"}), times=10**6)  # type: ignore[attr-defined]
    try:
        with client(a, b, "consumer") as consumer, pytest.raises(Unavailable) as caught:
            consumer.issue_token(key_id, CTX, "failover study")
    finally:
        hsm.gate.fault = None  # type: ignore[attr-defined]
    # One try, on a (audited there as an error); b never saw the call.
    assert outcomes(b, key_id, "IssueToken", caught.value.request_id) == [Outcome.ERROR]
    assert [e.outcome for e in events(b, key_id, "IssueToken")] == [Outcome.ERROR]


def test_effect_free_calls_go_on_and_use_counted_decrypts_do_not(
    pair: tuple[Broker, Broker],
) -> None:
    a, b = pair
    key_id = new_key_id("fo")
    with single(b, "admin") as admin:
        admin.create_key(key_id, "failover", POLICY)
    with single(b, "producer") as producer:
        dk = producer.generate_data_key(key_id, CTX)
    with single(b, "consumer") as consumer:
        counted = consumer.issue_token(key_id, CTX, "failover study", max_uses=1)
        unlimited = consumer.issue_token(key_id, CTX, "failover study")

    hsm = a.app.hsms["local"]
    fault = FailOnCall(1, PyKCS11.CKR_DEVICE_ERROR, frozenset({"encrypt", "decrypt"}), times=10**6)
    hsm.gate.fault = fault  # type: ignore[attr-defined]
    try:
        with client(a, b, "producer") as producer:
            # Each call's first try goes to a, fails there (audited), and goes on to b.
            fresh = producer.generate_data_key(key_id, CTX)
        with client(a, b, "consumer") as consumer:
            assert consumer.decrypt(dk.wrapped_key, CTX, unlimited.token).plaintext == (
                dk.plaintext_key
            )
        with client(a, b, "consumer") as consumer, pytest.raises(Unavailable) as caught:
            consumer.decrypt(dk.wrapped_key, CTX, counted.token)
    finally:
        hsm.gate.fault = None  # type: ignore[attr-defined]
    assert fault.failed >= 3

    # The data key call: one failed try on a and one allowed on b, under one request id.
    assert fresh.key_id == key_id
    failed = [e for e in events(b, key_id, "GenerateDataKey") if e.outcome is Outcome.ERROR]
    assert len(failed) == 1
    tries = outcomes(b, key_id, "GenerateDataKey", failed[0].request_id)
    assert tries == [Outcome.ERROR, Outcome.ALLOWED]
    # So did the Decrypt with a token without use limit.
    decrypts = [e for e in events(b, key_id, "Decrypt") if e.token_id == unlimited.token_id]
    assert [e.outcome for e in decrypts] == [Outcome.ERROR, Outcome.ALLOWED]
    assert decrypts[0].request_id == decrypts[1].request_id
    # The use-counted Decrypt reached a once (which counted its one use) and was not repeated.
    assert outcomes(b, key_id, "Decrypt", caught.value.request_id) == [Outcome.ERROR]
    with single(b, "consumer") as consumer, pytest.raises(ResourceExhausted):
        consumer.decrypt(dk.wrapped_key, CTX, counted.token)


def test_async_client_fails_over(pair: tuple[Broker, Broker]) -> None:
    a, b = pair
    key_id = new_key_id("fo")
    with single(b, "admin") as admin:
        admin.create_key(key_id, "failover", POLICY)
    a.close()

    async def run() -> None:
        async with (
            AsyncKeybrokerClient.from_settings(settings(a, b, "producer")) as producer,
            AsyncKeybrokerClient.from_settings(settings(a, b, "consumer")) as consumer,
        ):
            for _ in range(2):
                assert (await producer.generate_data_key(key_id, CTX)).key_id == key_id
            issued = await consumer.issue_token(key_id, CTX, "failover study")
            assert issued.token_id

    asyncio.run(run())
    assert [e.outcome for e in events(b, key_id, "IssueToken")] == [Outcome.ALLOWED]
    assert [e.outcome for e in events(b, key_id, "GenerateDataKey")] == [Outcome.ALLOWED] * 2
