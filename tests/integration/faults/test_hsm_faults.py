"""Section C of the test catalogue: the HSM fails under a broker serving gRPC over mTLS.

- C.15 the token directory moved away under load, then back;
- C.16 a wrong PIN at start (and no way to try PINs through the API);
- C.17 CKR_DEVICE_ERROR / CKR_SESSION_HANDLE_INVALID on a call, and every session closed
  from another handle of the same process (C_CloseAllSessions);
- C.18 an HSM call that hangs.

Elsewhere: the adapter-level cases of C.15 and C.17 (tests/integration/hsm/test_recovery.py,
test_pool_and_faults.py), C.19 (tests/integration/test_startup_template_check.py) and C.20
(tests/integration/hsm/test_wrap_attacks.py).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import PyKCS11
import pytest
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from keybroker.v1 import crypto_pb2, key_admin_pb2

import broker.app
from broker.adapters.pkcs11 import Pkcs11Hsm
from broker.config import FAULT_INJECTION_ENV, HsmConfig, Settings
from broker.devhsm import ensure_token
from broker.ports import Hsm
from broker.transport.server import HealthMonitor
from hsm_sim.faults import CallLog, FailOnCall
from hsm_sim.faulty import FaultyHsm, from_spec
from hsm_sim.tokens import DE, FR, US, hsm_configs
from tests.broker_fixtures import Broker, new_key_id, start_broker
from tests.integration.faults.procs import BrokerProcess, server_env
from tests.integration.flows import CTX, code_of, create_key, datakey, decrypt, issue
from tests.integration.hsm.common import Softhsm
from tests.integration.hsm.test_recovery import library_restored_on_failure

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
#: Ends a wait that should never last; no timing is asserted.
LIMIT = 60.0


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + LIMIT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {LIMIT} s")
        time.sleep(0.05)


def health(b: Broker) -> set[int]:
    stub = health_pb2_grpc.HealthStub(b.channel("auditor"))
    services = ("", "keybroker.v1.Crypto", "keybroker.v1.KeyAdmin")
    return {stub.Check(health_pb2.HealthCheckRequest(service=s)).status for s in services}


def health_or_silence(b: Broker) -> object:
    """The overall health status, or DEADLINE_EXCEEDED when the broker does not answer."""
    stub = health_pb2_grpc.HealthStub(b.channel("auditor"))
    try:
        return stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0).status
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[attr-defined]


def no_secret_in(texts: list[str], *secrets: str) -> None:
    for text in texts:
        for secret in secrets:
            assert secret not in text


def kek_label(caplog: pytest.LogCaptureFixture, key_id: str) -> str:
    """The HSM label the adapter logged for the key's first version."""
    (label,) = {
        getattr(r, "label", "")
        for r in caplog.records
        if r.getMessage() == "kek generated" and f"kek:{key_id}:v1:" in getattr(r, "label", "")
    }
    return label


class Load:
    """Threads calling GenerateDataKey and Decrypt in a loop; every status is counted."""

    def __init__(self, b: Broker, key_id: str, blob: bytes, token: str, threads: int = 4):
        self.codes: Counter[grpc.StatusCode] = Counter()
        self.messages: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        calls = [
            lambda: datakey(b, key_id),
            lambda: decrypt(b, blob, token),
        ]
        self._threads = [
            threading.Thread(target=self._run, args=(calls[i % 2],), daemon=True)
            for i in range(threads)
        ]
        for t in self._threads:
            t.start()

    def _run(self, call: Callable[[], object]) -> None:
        while not self._stop.is_set():
            try:
                call()
                code, message = grpc.StatusCode.OK, ""
            except grpc.RpcError as exc:
                code, message = exc.code(), exc.details()  # type: ignore[attr-defined]
            with self._lock:
                self.codes[code] += 1
                if message:
                    self.messages.append(message)

    def count(self, code: grpc.StatusCode) -> int:
        with self._lock:
            return self.codes[code]

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=LIMIT)


# -- C.15 ------------------------------------------------------------------------------------


def test_token_directory_gone_under_load_fails_closed_and_recovers_the_same_key(
    hsm_home: Path, tmp_path: Path, softhsm: Softhsm, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    b = start_broker(hsm_home, database=tmp_path / "gone.db", audit_checkpoint_seconds=3600.0)
    monitor = HealthMonitor(b.running, b.app.health_probes(timeout=5.0), interval=3600)
    hsm = b.app.hsms["local"]
    assert isinstance(hsm, Pkcs11Hsm)
    tokens = hsm_home / "tokens"
    away = tokens.with_name("tokens.away")
    try:
        key_id = create_key(b)
        label = kek_label(caplog, key_id)
        kept = datakey(b, key_id)
        token = issue(b, key_id).token
        created_while_away = new_key_id("away")
        load = Load(b, key_id, kept.wrapped_key, token)
        wait_until(lambda: load.count(grpc.StatusCode.OK) >= 8, "calls served before")
        with library_restored_on_failure(softhsm[0]):
            tokens.rename(away)
            try:
                wait_until(lambda: load.count(grpc.StatusCode.UNAVAILABLE) >= 8, "refusals")
                code, message = code_of(
                    lambda: b.keys().CreateKey(
                        key_admin_pb2.CreateKeyRequest(key_id=created_while_away)
                    )
                )
                assert code == grpc.StatusCode.UNAVAILABLE, message
                assert not monitor.check_once()
                assert health(b) == {NOT_SERVING}
            finally:
                away.rename(tokens)
            served = load.count(grpc.StatusCode.OK)
            wait_until(lambda: load.count(grpc.StatusCode.OK) >= served + 8, "recovery")
            load.stop()
        wait_until(monitor.check_once, "health back")
        assert health(b) == {SERVING}
        # Only the two answers of a broker that fails closed; never an error that blames the
        # caller (INVALID_ARGUMENT: "bad ciphertext", NOT_FOUND: "no such key") or INTERNAL.
        assert set(load.codes) == {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, load.codes
        # The same key, not a new one: the old blob opens, one object carries its label, and
        # nothing was created while the token was away.
        assert decrypt(b, kept.wrapped_key, token).plaintext == kept.plaintext_key
        assert hsm.attributes(label)["objects"] == 1
        assert not any(created_while_away in getattr(r, "label", "") for r in caplog.records)
        code, _ = code_of(
            lambda: b.keys().GetKey(key_admin_pb2.GetKeyRequest(key_id=created_while_away))
        )
        assert code == grpc.StatusCode.NOT_FOUND
        texts = load.messages + [r.getMessage() + repr(r.__dict__) for r in caplog.records]
        no_secret_in(texts, kept.plaintext_key.hex(), token, fr_pin(hsm_home))
    finally:
        if away.exists() and not tokens.exists():
            away.rename(tokens)
        b.close()


def fr_pin(home: Path) -> str:
    return (home / FR.pin_file).read_text().strip()


# -- C.16 ------------------------------------------------------------------------------------

#: The factories a test configuration names: each FaultyHsm made is kept here.
MADE: list[FaultyHsm] = []


def recording(inner: Hsm, spec: str) -> FaultyHsm:
    """A `fault_injection` factory that keeps what it makes, for the test to look at."""
    faulty = from_spec(inner, spec)
    MADE.append(faulty)
    return faulty


def test_wrong_pin_is_tried_once_and_refuses_the_start(
    hsm_home: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A token of its own: login state is per token and process, and a token some session of
    # this process is logged in to would never check the PIN.
    ensure_token(hsm_home, "pin-test", hsm_home / "hsm-pin-test.pin")
    wrong = "not-the-pin-" + os.urandom(4).hex()
    monkeypatch.setenv("KB_TEST_WRONG_PIN", wrong)
    monkeypatch.setenv(FAULT_INJECTION_ENV, "1")
    cfg = HsmConfig(
        "pin-test", "FR", "test", token_label="pin-test", pin_env="KB_TEST_WRONG_PIN",
        fault_injection=f"{__name__}:recording",
    )  # fmt: skip
    MADE.clear()
    with pytest.raises(RuntimeError) as refused:
        broker.app.open_hsms(Settings(home=hsm_home, hsms=(cfg,), default_hsm="pin-test"))
    message = str(refused.value)
    assert "refused the user PIN" in message and "CKR_PIN_INCORRECT" in message
    assert wrong not in message
    # Tried once: a real HSM locks the PIN after a few wrong tries, so the start never retries
    # a refused PIN (a transient failure is retried: START_RETRY_DELAYS).
    (faulty,) = MADE
    assert faulty.calls == ["check"]
    no_secret_in([r.getMessage() + repr(r.__dict__) for r in caplog.records], wrong)


def test_no_rpc_takes_a_pin() -> None:
    """No PIN guessing through the API: no request of any keybroker service has a field
    that could carry a PIN or password (the PIN comes from a file or the environment)."""
    pool = descriptor_pool.Default()
    words = ("pin", "password", "passphrase", "so_pin")
    for service_name in ("KeyAdmin", "Crypto", "Tokens", "Audit"):
        service = pool.FindServiceByName(f"keybroker.v1.{service_name}")
        for method in service.methods:
            for field in _fields(method.input_type):
                assert not any(w in field.split(".")[-1].split("_") for w in words), field


def _fields(message: object, prefix: str = "", seen: frozenset[str] = frozenset()) -> Iterator[str]:
    full_name = message.full_name  # type: ignore[attr-defined]
    if full_name in seen:
        return
    for field in message.fields:  # type: ignore[attr-defined]
        yield f"{prefix}{field.name}"
        if field.message_type is not None:
            yield from _fields(field.message_type, f"{prefix}{field.name}.", seen | {full_name})


# -- C.17 ------------------------------------------------------------------------------------


@pytest.fixture
def own_token_broker(hsm_home: Path, tmp_path: Path) -> Iterator[Broker]:
    """A broker whose one HSM is the "de-frankfurt" token, which no session-wide broker of
    the test run uses (closing every session of a token reaches every pool on it)."""
    b = start_broker(
        hsm_home,
        database=tmp_path / "own.db",
        hsms=hsm_configs(hsm_home, (DE,)),
        default_hsm=DE.info.name,
        audit_checkpoint_seconds=3600.0,  # no background HSM call between the test's calls
    )
    yield b
    b.close()


@pytest.mark.parametrize(
    "code", [PyKCS11.CKR_DEVICE_ERROR, PyKCS11.CKR_SESSION_HANDLE_INVALID], ids=PyKCS11.CKR.get
)
@pytest.mark.parametrize("k", [1, 3])
def test_kth_hsm_call_failing_is_unavailable_and_the_next_runs_on_a_fresh_session(
    own_token_broker: Broker, code: int, k: int
) -> None:
    b = own_token_broker
    hsm = b.app.hsms[DE.info.name]
    assert isinstance(hsm, Pkcs11Hsm)
    key_id = create_key(b)
    kept = datakey(b, key_id)
    token = issue(b, key_id).token
    fault = FailOnCall(nth=k, code=code, names=frozenset({"decrypt"}))
    hsm.gate.fault = fault
    try:
        for _ in range(k - 1):
            assert decrypt(b, kept.wrapped_key, token).plaintext == kept.plaintext_key
        failed, message = code_of(lambda: decrypt(b, kept.wrapped_key, token))
    finally:
        calls = CallLog()
        hsm.gate.fault = calls
    assert fault.failed == 1
    assert failed == grpc.StatusCode.UNAVAILABLE
    assert PyKCS11.CKR[code] in message and "retry later" in message
    assert kept.plaintext_key.hex() not in message
    assert decrypt(b, kept.wrapped_key, token).plaintext == kept.plaintext_key
    assert calls.count("openSession") == 1  # the failed session (and its siblings) dropped
    hsm.gate.fault = None


def test_sessions_closed_through_another_handle_cost_one_call(
    own_token_broker: Broker, softhsm: Softhsm
) -> None:
    b = own_token_broker
    hsm = b.app.hsms[DE.info.name]
    assert isinstance(hsm, Pkcs11Hsm)
    key_id = create_key(b)
    kept = datakey(b, key_id)
    token = issue(b, key_id).token
    # Four idle sessions in the pool: four calls held inside the HSM at once open them.
    arrived = threading.Barrier(4, timeout=LIMIT)

    def hold(name: str) -> None:
        if name == "generateRandom" and threading.current_thread().name.startswith("holder"):
            arrived.wait()

    hsm.gate.fault = hold
    holders = [threading.Thread(target=hsm.random, args=(8,), name=f"holder-{i}") for i in range(4)]
    for t in holders:
        t.start()
    for t in holders:
        t.join()
    hsm.gate.fault = None
    assert hsm.pool.idle_sessions == 4
    library = softhsm[0]  # the process's one loaded module, the broker's too
    other = PyKCS11.PyKCS11Lib()
    other.load(library.module_path)  # a second handle on the same, already initialised module
    other.closeAllSessions(library.slot_for_token(DE.label))
    failed, message = code_of(lambda: decrypt(b, kept.wrapped_key, token))
    assert failed == grpc.StatusCode.UNAVAILABLE
    assert "CKR_SESSION_HANDLE_INVALID" in message
    for _ in range(3):  # every other idle session went with the first
        assert decrypt(b, kept.wrapped_key, token).plaintext == kept.plaintext_key
    del other  # its last user unloads nothing: the broker's handle still holds the module


# -- C.18 ------------------------------------------------------------------------------------


@pytest.fixture
def faulty_broker(
    hsm_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Broker]:
    """A broker whose HSMs are wrapped by `hsm_sim.faulty` through the configuration, with
    no rule yet: the test adds them to `broker.app.hsms[name]`."""
    monkeypatch.setenv(FAULT_INJECTION_ENV, "1")
    hsms = tuple(
        replace(c, fault_injection="hsm_sim.faulty:from_spec")
        for c in hsm_configs(hsm_home, (FR, US))
    )
    b = start_broker(hsm_home, database=tmp_path / "hang.db", hsms=hsms)
    yield b
    b.close()


def test_a_hung_hsm_call_is_deadline_exceeded_and_health_goes_not_serving(
    faulty_broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    b = faulty_broker
    faulty = b.app.hsms["local"]
    assert isinstance(faulty, FaultyHsm)
    inner = faulty.inner
    assert isinstance(inner, Pkcs11Hsm)
    monitor = HealthMonitor(b.running, b.app.health_probes(timeout=0.5), interval=3600)
    key_id = create_key(b)
    kept = datakey(b, key_id)
    token = issue(b, key_id).token
    assert monitor.check_once() and health(b) == {SERVING}

    release = faulty.hang()  # every call of this HSM, the health probe's too
    try:
        for call in (
            lambda: b.crypto("consumer").Decrypt(
                crypto_pb2.DecryptRequest(ciphertext=kept.wrapped_key, context=CTX, token=token),
                timeout=0.5,
            ),
            lambda: b.crypto("producer").GenerateDataKey(
                crypto_pb2.GenerateDataKeyRequest(key_id=key_id, context=CTX), timeout=0.5
            ),
        ):
            code, message = code_of(call)
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED, message
        # The monitor's round ends although the probe hangs, and says NOT_SERVING; a second
        # round waits on the same hung probe instead of starting another.
        assert not monitor.check_once()
        assert not monitor.check_once()
        assert [t.name for t in threading.enumerate()].count("probe-hsm:local") == 1
        assert not b.app.metrics.healthy
        # A load balancer never hears SERVING meanwhile: NOT_SERVING, or no answer at all
        # while the hung call holds the event loop that serves the hot path (and Health).
        assert health_or_silence(b) in (NOT_SERVING, grpc.StatusCode.DEADLINE_EXCEEDED)
    finally:
        release.set()
        faulty.clear()

    wait_until(monitor.check_once, "health back once the HSM answers")
    assert health(b) == {SERVING}
    # Nothing held on to: the hung calls ended and gave their sessions back ...
    wait_until(lambda: inner.pool.in_use == 0, "sessions returned")
    # ... and the broker serves as before.
    assert decrypt(b, kept.wrapped_key, token).plaintext == kept.plaintext_key
    assert datakey(b, key_id).key_version == 1
    no_secret_in(
        [r.getMessage() + repr(r.__dict__) for r in caplog.records],
        kept.plaintext_key.hex(),
        token,
    )


def test_wrong_pin_at_start_is_one_line_and_exit_2(broker_home: Path) -> None:
    wrong = "wrong-" + os.urandom(4).hex()
    broker = BrokerProcess.start(broker_home, env=server_env(KEYBROKER_HSM_PIN=wrong))
    assert broker.proc.wait(timeout=LIMIT) == 2
    broker.stop()
    errors = [line for line in broker.lines if " ERROR " in line or "Traceback" in line]
    assert len(errors) == 1, broker.output
    assert "start-up failed" in errors[0] and "refused the user PIN" in errors[0]
    assert wrong not in broker.output
    assert not (broker_home / "listen.addr").exists()  # never ready, never listening
