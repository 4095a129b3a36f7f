"""The grpc.aio server: hot-path calls answer only once their audit event is durable (and fail
closed when it is not), denials likewise; where each method runs; methods added to a servicer,
streaming in every direction, unknown methods; the RPC observer. Real SoftHSM2, mTLS."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from keybroker.v1 import crypto_pb2, key_admin_pb2

from broker.app import build_app
from broker.domain import AuditEvent
from broker.errors import AuditUnavailable, PermissionDenied
from broker.transport import server as server_module
from broker.transport.auth import caller_of
from tests.broker_fixtures import Broker, ShiftableClock, broker_settings, start_broker
from tests.integration.flows import CTX, code_of, create_key, datakey, events_for, issue, rid
from tests.integration.test_audit_and_fail_closed import SwitchableAuditStore

LOOP_THREAD = "grpc-aio"


class HeldAuditStore(SwitchableAuditStore):
    """The real audit tables; once `hold()` is called, the next batch waits in `append_batch`
    until `release(fail)`, then is written, or refused as an unwritable audit log is."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._holding = False
        self._fail = False
        self.entered = threading.Event()
        self._released = threading.Event()
        self.held: list[AuditEvent] = []

    def hold(self) -> None:
        self.entered.clear()
        self._released.clear()
        self._holding = True

    def release(self, fail: bool) -> None:
        self._fail = fail
        self._holding = False
        self._released.set()

    def append_batch(self, events: Sequence[AuditEvent]) -> list[int]:
        if self._holding:
            self.held = list(events)
            self.entered.set()
            assert self._released.wait(60)
            if self._fail:
                raise AuditUnavailable(
                    "the audit log cannot be written; the call was refused (fail closed)"
                )
        return super().append_batch(events)


@pytest.fixture
def held(hsm_home: Path, tmp_path: Path) -> Iterator[tuple[Broker, HeldAuditStore]]:
    store = HeldAuditStore(tmp_path / "audit.db")
    b = start_broker(hsm_home, audit_store=store, database=tmp_path / "meta.db")
    yield b, store
    store.release(fail=False)
    b.close()


def _request_ids(events: Sequence[AuditEvent]) -> set[str]:
    return {e.request_id for e in events}


def test_no_response_before_its_event_is_durable(held: tuple[Broker, HeldAuditStore]) -> None:
    b, store = held
    key_id = create_key(b)
    dk = datakey(b, key_id)
    token = issue(b, key_id).token
    request = crypto_pb2.DecryptRequest(ciphertext=dk.wrapped_key, context=CTX, token=token)

    store.hold()
    request_id = rid()
    future = b.crypto("consumer").Decrypt.future(request, metadata=(("x-request-id", request_id),))
    assert store.entered.wait(30)
    assert request_id in _request_ids(store.held)  # the call's own event is the one held
    assert not future.done()
    store.release(fail=True)
    err = future.exception()
    assert isinstance(err, grpc.RpcError)
    assert err.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    assert "audit" in err.details()  # type: ignore[attr-defined]
    assert dk.plaintext_key.hex() not in err.details()  # type: ignore[attr-defined]

    # Held, then written: the response comes, and its event is in the trail.
    store.hold()
    request_id = rid()
    future = b.crypto("producer").GenerateDataKey.future(
        crypto_pb2.GenerateDataKeyRequest(key_id=key_id, context=CTX),
        metadata=(("x-request-id", request_id),),
    )
    assert store.entered.wait(30)
    assert request_id in _request_ids(store.held)
    assert not future.done()
    store.release(fail=False)
    assert len(future.result(timeout=30).plaintext_key) == 32
    (event,) = events_for(b, request_id)
    assert event.outcome == 1 and event.operation == "GenerateDataKey"


def test_a_denial_leaves_only_once_its_event_is_durable(
    held: tuple[Broker, HeldAuditStore],
) -> None:
    b, store = held
    key_id = create_key(b)
    dk = datakey(b, key_id)
    token = issue(b, key_id).token  # bound to the consumer's certificate
    request = crypto_pb2.DecryptRequest(ciphertext=dk.wrapped_key, context=CTX, token=token)

    for fail, expected in ((False, grpc.StatusCode.UNAUTHENTICATED), (True, None)):
        store.hold()
        request_id = rid()
        future = b.crypto("producer").Decrypt.future(
            request, metadata=(("x-request-id", request_id),)
        )
        assert store.entered.wait(30)
        assert request_id in _request_ids(store.held)
        assert not future.done()
        store.release(fail=fail)
        err = future.exception()
        assert isinstance(err, grpc.RpcError)
        if fail:
            # The denial's event could not be written: the audit failure is the answer.
            assert err.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
            assert events_for(b, request_id) == []
        else:
            assert err.code() == expected  # type: ignore[attr-defined]
            (event,) = events_for(b, request_id)
            assert event.outcome == 2 and "another client certificate" in event.reason


def _spy(target: object, name: str, seen: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    original = getattr(target, name)

    def spied(*args: Any, **kwargs: Any) -> Any:
        seen.append(threading.current_thread().name)
        return original(*args, **kwargs)

    monkeypatch.setattr(target, name, spied)


def test_where_methods_run(broker: Broker, monkeypatch: pytest.MonkeyPatch) -> None:
    key_id = create_key(broker)
    dk = datakey(broker, key_id)
    plain = issue(broker, key_id).token
    counted = issue(broker, key_id, max_uses=5).token
    services = broker.app.services
    crypto_threads: list[str] = []
    key_threads: list[str] = []
    _spy(services.crypto, "generate_data_key", crypto_threads, monkeypatch)
    _spy(services.crypto, "decrypt", crypto_threads, monkeypatch)
    _spy(services.keys, "get", key_threads, monkeypatch)

    datakey(broker, key_id)
    for token in (plain, counted):
        reply = broker.crypto("consumer").Decrypt(
            crypto_pb2.DecryptRequest(ciphertext=dk.wrapped_key, context=CTX, token=token)
        )
        assert reply.plaintext == dk.plaintext_key
    broker.keys("auditor").GetKey(key_admin_pb2.GetKeyRequest(key_id=key_id))

    generate, decrypt_plain, decrypt_counted = crypto_threads
    assert generate == LOOP_THREAD and decrypt_plain == LOOP_THREAD  # the hot path, inline
    # A token that counts its uses writes the count: that call goes to the thread pool.
    assert decrypt_counted.startswith("rpc")
    (get_key,) = key_threads
    assert get_key.startswith("rpc")  # KeyAdmin: in the thread pool


# -- a service added to the broker: every kind of method, served without being listed -------

PROBE = "keybroker.test.Probe"
HAND_WRITTEN = "keybroker.test.HandWritten"


class ProbeServicer:
    """Raw bytes in and out; each method says where it ran or what it was given."""

    def Echo(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        return f"{threading.current_thread().name}|{caller_of(context).principal}|".encode() + (
            request
        )

    def Count(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        for i in range(int(request)):
            if not context.is_active():
                return
            yield str(i).encode()

    def Sum(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        return str(sum(int(r) for r in requests)).encode()

    def Upper(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        for request in requests:
            yield request.upper()

    def Refuse(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        raise PermissionDenied("the probe refuses")

    def Boom(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        raise RuntimeError("secret-internal-detail")

    def Abort(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        context.abort(grpc.StatusCode.NOT_FOUND, "nothing here")
        raise AssertionError("unreachable")


def add_probe(servicer: ProbeServicer, server: Any) -> None:
    """Registers the probe as generated `add_*Servicer_to_server` code does."""
    handlers = {
        "Echo": grpc.unary_unary_rpc_method_handler(servicer.Echo),
        "Count": grpc.unary_stream_rpc_method_handler(servicer.Count),
        "Sum": grpc.stream_unary_rpc_method_handler(servicer.Sum),
        "Upper": grpc.stream_stream_rpc_method_handler(servicer.Upper),
        "Refuse": grpc.unary_unary_rpc_method_handler(servicer.Refuse),
        "Boom": grpc.unary_unary_rpc_method_handler(servicer.Boom),
        "Abort": grpc.unary_unary_rpc_method_handler(servicer.Abort),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(PROBE, handlers),))
    server.add_registered_method_handlers(PROBE, handlers)


def add_hand_written(servicer: ProbeServicer, server: Any) -> None:
    """A registration without a method table: only a generic handler."""
    handlers = {"Echo": grpc.unary_unary_rpc_method_handler(servicer.Echo)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(HAND_WRITTEN, handlers),))


@pytest.fixture
def probed(
    hsm_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Broker, grpc.Channel]]:
    listed = server_module.keybroker_servicers

    def with_probe(services: server_module.Services) -> list[tuple[Callable[..., None], Any]]:
        probe = ProbeServicer()
        return [*listed(services), (add_probe, probe), (add_hand_written, probe)]

    monkeypatch.setattr(server_module, "keybroker_servicers", with_probe)
    b = start_broker(hsm_home, database=tmp_path / "probe.db")
    try:
        yield b, b.channel("producer")
    finally:
        b.close()


def test_an_added_method_runs_in_the_thread_pool(probed: tuple[Broker, grpc.Channel]) -> None:
    _, channel = probed
    for service in (PROBE, HAND_WRITTEN):
        reply, call = channel.unary_unary(f"/{service}/Echo").with_call(
            b"hi", metadata=(("x-request-id", "probe-1"),)
        )
        thread, principal, body = reply.split(b"|")
        assert thread.startswith(b"rpc") and principal == b"producer" and body == b"hi"
        assert ("x-request-id", "probe-1") in tuple(call.trailing_metadata())


def test_streams_in_every_direction(probed: tuple[Broker, grpc.Channel]) -> None:
    _, channel = probed
    assert list(channel.unary_stream(f"/{PROBE}/Count")(b"200")) == [
        str(i).encode() for i in range(200)
    ]
    assert channel.stream_unary(f"/{PROBE}/Sum")(iter([b"1", b"2", b"39"])) == b"42"

    # Bidi, one message at a time: the next request is sent only once the previous one is
    # answered, so nothing may wait for more requests before answering.
    requests: queue.Queue[bytes | None] = queue.Queue()

    def sent() -> Iterator[bytes]:
        while (item := requests.get()) is not None:
            yield item

    replies = channel.stream_stream(f"/{PROBE}/Upper")(sent())
    for word in (b"alpha", b"beta", b"gamma"):
        requests.put(word)
        assert next(replies) == word.upper()
    requests.put(None)
    assert list(replies) == []


def test_errors_of_added_methods_and_unknown_methods(
    probed: tuple[Broker, grpc.Channel], caplog: pytest.LogCaptureFixture
) -> None:
    _, channel = probed
    code, msg = code_of(lambda: channel.unary_unary(f"/{PROBE}/Refuse")(b""))
    assert code == grpc.StatusCode.PERMISSION_DENIED and msg == "the probe refuses"
    code, msg = code_of(
        lambda: channel.unary_unary(f"/{PROBE}/Boom")(b"", metadata=(("x-request-id", "b-1"),))
    )
    assert code == grpc.StatusCode.INTERNAL and "secret-internal-detail" not in msg
    assert "b-1" in msg and "secret-internal-detail" in caplog.text
    assert code_of(lambda: channel.unary_unary(f"/{PROBE}/Abort")(b"")) == (
        grpc.StatusCode.NOT_FOUND,
        "nothing here",
    )
    for unknown in (f"/{PROBE}/Nope", "/keybroker.v1.Crypto/Nope", "/nowhere.Service/Call"):
        code, _ = code_of(lambda unknown=unknown: channel.unary_unary(unknown)(b""))
        assert code == grpc.StatusCode.UNIMPLEMENTED


def test_a_stream_cancelled_by_its_client_stops(probed: tuple[Broker, grpc.Channel]) -> None:
    b, channel = probed
    stream = channel.unary_stream(f"/{PROBE}/Count")(b"100000000")
    assert [next(stream) for _ in range(3)] == [b"0", b"1", b"2"]
    stream.cancel()
    # The producing thread stops: the server's stop (which waits for its pool) returns.
    b.close()


# -- the observer -------------------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, float]] = []

    def rpc_finished(self, method: str, code: str, seconds: float) -> None:
        self.calls.append((method, code, seconds))


def test_the_observer_hears_of_every_rpc(hsm_home: Path, tmp_path: Path) -> None:
    settings = broker_settings(hsm_home, database=tmp_path / "observed.db")
    clock = ShiftableClock()
    app = build_app(settings, clock=clock)
    recorder = Recorder()
    running = server_module.create_server(app.services, app.tls, settings.listen, observer=recorder)
    b = Broker(app, running, clock, hsm_home)
    try:
        key_id = create_key(b)
        datakey(b, key_id)
        code_of(lambda: datakey(b, key_id, identity="consumer"))  # no encrypt grant
        code_of(lambda: b.channel("producer").unary_unary("/keybroker.v1.Crypto/Encrypt")(b"\xff"))
    finally:
        b.close()
    crypto = "/keybroker.v1.Crypto"
    assert [(m, c) for m, c, _ in recorder.calls] == [
        ("/keybroker.v1.KeyAdmin/CreateKey", "OK"),
        (f"{crypto}/GenerateDataKey", "OK"),
        (f"{crypto}/GenerateDataKey", "PERMISSION_DENIED"),
        (f"{crypto}/Encrypt", "INVALID_ARGUMENT"),
    ]
    assert all(seconds >= 0 for _, _, seconds in recorder.calls)
