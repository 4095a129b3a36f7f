"""Tiny deadlines through gRPC over mTLS on SoftHSM2: DEADLINE_EXCEEDED, and the one audit
event of the call says whether the key was used.

The broker's HSMs are wrapped in `hsm_sim.faulty.FaultyHsm`, so a test slows one HSM call
well past the caller's deadline (a delay four times the deadline: no race to win).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from keybroker.v1 import crypto_pb2, resources_pb2

import broker.app
from broker.ports import Hsm
from broker.services import deadline
from hsm_sim.faulty import FaultyHsm
from tests.broker_fixtures import Broker, start_broker
from tests.integration.flows import CTX, create_key, datakey, events_for, issue, rid

DEADLINE_S = 0.25
SLOW_S = 4 * DEADLINE_S
#: How long a test waits for an audit event to show (it is durable before any answer; a
#: call that timed out on the client side may still be finishing on the server).
POLL_S = 10.0


@pytest.fixture(scope="module")
def slowed(hsm_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """A broker of its own (own database) whose HSMs are FaultyHsm wrappers."""
    real_open = broker.app.open_hsms

    def faulty_open(*args: object, **kwargs: object) -> dict[str, Hsm]:
        return {name: FaultyHsm(h) for name, h in real_open(*args, **kwargs).items()}  # type: ignore[arg-type]

    mp = pytest.MonkeyPatch()
    mp.setattr(broker.app, "open_hsms", faulty_open)
    try:
        b = start_broker(hsm_home, database=tmp_path_factory.mktemp("deadlines") / "kb.db")
    finally:
        mp.undo()
    yield b
    b.close()


def _faulty(b: Broker) -> FaultyHsm:
    hsm = b.app.hsms["local"]
    assert isinstance(hsm, FaultyHsm)
    return hsm


def _one_event(b: Broker, request_id: str) -> resources_pb2.AuditEvent:
    """The call's audit events once there are any (polled); exactly one is expected."""
    end = time.monotonic() + POLL_S
    while not (found := events_for(b, request_id)) and time.monotonic() < end:
        time.sleep(0.1)
    assert len(found) == 1, found
    return found[0]


def test_deadline_passing_before_the_key_is_used(slowed: Broker) -> None:
    key_id = create_key(slowed)
    hsm = _faulty(slowed)
    request_id = rid()
    before = len(hsm.calls)
    hsm.delay(SLOW_S, methods={"random"}, times=1)  # drawing the data key outlasts the deadline
    try:
        with pytest.raises(grpc.RpcError) as info:
            slowed.crypto("producer").GenerateDataKey(
                crypto_pb2.GenerateDataKeyRequest(key_id=key_id, context=CTX),
                timeout=DEADLINE_S,
                metadata=(("x-request-id", request_id),),
            )
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
        event = _one_event(slowed, request_id)
    finally:
        hsm.clear()
    assert event.operation == "GenerateDataKey"
    assert event.key_id == key_id
    assert event.outcome == resources_pb2.OUTCOME_ERROR
    assert event.reason == deadline.BEFORE_KEY_USE
    # The broker drew the data key, then stopped before wrapping it with the key.
    assert "random" in hsm.calls[before:]
    assert "encrypt" not in hsm.calls[before:]
    datakey(slowed, key_id)  # the next call with time to spare goes through


def test_deadline_passing_while_the_key_is_used(slowed: Broker) -> None:
    key_id = create_key(slowed)
    blob = datakey(slowed, key_id).wrapped_key
    token = issue(slowed, key_id).token
    hsm = _faulty(slowed)
    request_id = rid()
    hsm.delay(SLOW_S, methods={"decrypt"}, times=1)  # the key is used after the deadline
    try:
        with pytest.raises(grpc.RpcError) as info:
            slowed.crypto("consumer").Decrypt(
                crypto_pb2.DecryptRequest(ciphertext=blob, context=CTX, token=token),
                timeout=DEADLINE_S,
                metadata=(("x-request-id", request_id),),
            )
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
        event = _one_event(slowed, request_id)
    finally:
        hsm.clear()
    assert event.operation == "Decrypt"
    assert (event.key_id, event.key_version) == (key_id, 1)
    assert event.outcome == resources_pb2.OUTCOME_ERROR
    assert event.reason == deadline.AFTER_KEY_USE
    # The same token still opens the blob when the caller gives the broker time.
    response = slowed.crypto("consumer").Decrypt(
        crypto_pb2.DecryptRequest(ciphertext=blob, context=CTX, token=token), timeout=30
    )
    assert response.key_id == key_id
