"""Overload through gRPC over mTLS on SoftHSM2: a bounded number of calls at once, the excess
refused at once with RESOURCE_EXHAUSTED (never queued without bound, never a timeout), every
call the broker handled audited exactly once, and service again as soon as the flood ends.

The broker runs with `limits.max_concurrent_rpcs` = LIMIT. The first flood meets a broker
whose every slot is held by an open ReWrapStream (each answered once, then left waiting for
its next message), so all of it is refused, whatever the timing; the second meets the broker
free and is only partly refused, if at all. No assertion depends on how long anything takes.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from keybroker.v1 import audit_pb2, crypto_pb2

from tests.broker_fixtures import Broker, start_broker
from tests.integration.flows import CTX, create_key, datakey, issue

LIMIT = 4
FLOOD = 200
#: Generous: a refused call answers in milliseconds; a call that would wait in a queue for
#: this long would fail the test with DEADLINE_EXCEEDED.
CALL_TIMEOUT_S = 30.0
RECOVERY_S = 10.0


@pytest.fixture(scope="module")
def limited(hsm_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    db = tmp_path_factory.mktemp("overload") / "kb.db"
    b = start_broker(hsm_home, database=db, max_concurrent_rpcs=LIMIT)
    yield b
    b.close()


def _rid(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:16]}"


class Holder:
    """An open ReWrapStream holding one of the broker's call slots: its first message is
    answered (so the broker counts it), the next one only comes at `release`."""

    def __init__(self, b: Broker, blob: bytes) -> None:
        self.request_id = _rid("hold")
        self._go = threading.Event()
        first = crypto_pb2.ReWrapStreamRequest(
            items=[crypto_pb2.ReWrapRequest(ciphertext=blob, context=CTX)]
        )

        def requests() -> Iterator[crypto_pb2.ReWrapStreamRequest]:
            yield first
            self._go.wait(CALL_TIMEOUT_S)

        self._responses = b.crypto("admin").ReWrapStream(
            requests(), timeout=CALL_TIMEOUT_S * 2, metadata=(("x-request-id", self.request_id),)
        )
        self.first = next(self._responses)

    def release(self) -> list[object]:
        self._go.set()
        return list(self._responses)


def _flood(b: Broker, key_id: str, blob: bytes, token: str, tag: str) -> dict[str, grpc.StatusCode]:
    """FLOOD calls at once, GenerateDataKey and Decrypt alternately; each call's code by its
    request id."""
    producer, consumer = b.crypto("producer"), b.crypto("consumer")
    gdk = crypto_pb2.GenerateDataKeyRequest(key_id=key_id, context=CTX)
    dec = crypto_pb2.DecryptRequest(ciphertext=blob, context=CTX, token=token)
    futures = {}
    for i in range(FLOOD):
        request_id = _rid(tag)
        md = (("x-request-id", request_id),)
        if i % 2:
            futures[request_id] = consumer.Decrypt.future(dec, timeout=CALL_TIMEOUT_S, metadata=md)
        else:
            futures[request_id] = producer.GenerateDataKey.future(
                gdk, timeout=CALL_TIMEOUT_S, metadata=md
            )
    codes = {}
    for request_id, future in futures.items():
        try:
            future.result()
            codes[request_id] = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            codes[request_id] = exc.code()  # type: ignore[attr-defined]
    return codes


def _audit_counts(b: Broker) -> Counter[str]:
    """Audit events per request id, over the broker's whole trail."""
    stream = b.audit("auditor").ListAuditEvents(audit_pb2.ListAuditEventsRequest())
    return Counter(r.event.request_id for r in stream)


def _recovered(b: Broker, key_id: str) -> bool:
    """A normal call succeeds within RECOVERY_S (polled)."""
    end = time.monotonic() + RECOVERY_S
    while True:
        try:
            datakey(b, key_id)
            return True
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() > end:  # type: ignore[attr-defined]
                raise
            time.sleep(0.1)


def test_a_flood_is_refused_quickly_audited_exactly_and_the_broker_recovers(
    limited: Broker,
) -> None:
    key_id = create_key(limited)
    blob = datakey(limited, key_id).wrapped_key
    token = issue(limited, key_id).token

    # Every slot held: the whole flood is refused at once, none of it waits.
    holders = [Holder(limited, blob) for _ in range(LIMIT)]
    refused = _flood(limited, key_id, blob, token, "full")
    held_results = [h.release() for h in holders]
    assert set(refused.values()) == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert all(len(h.first.results) == 1 and h.first.results[0].code == 0 for h in holders)
    assert held_results == [[]] * LIMIT  # each holder's stream then ended cleanly

    # A free broker under the same flood: each call served or refused, nothing else.
    mixed = _flood(limited, key_id, blob, token, "free")
    tally = Counter(mixed.values())
    assert set(tally) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, tally
    assert tally[grpc.StatusCode.OK] > 0

    assert _recovered(limited, key_id)

    # Exactly one event per call the broker handled; none for a call it refused at the door.
    events = _audit_counts(limited)
    for h in holders:
        assert events[h.request_id] == 1
    for request_id, code in (refused | mixed).items():
        expected = 1 if code == grpc.StatusCode.OK else 0
        assert events[request_id] == expected, (request_id, code)
    handled = sum(events[r] for r in (refused | mixed))
    assert handled == tally[grpc.StatusCode.OK]
    assert limited.audit().VerifyAuditLog(audit_pb2.VerifyAuditLogRequest()).ok
