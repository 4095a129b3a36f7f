"""The session pool, concurrency and injected PKCS#11 failures (C.17, invariant 5)."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import PyKCS11
import pytest

from broker.adapters.pkcs11 import Pkcs11Hsm
from broker.devhsm import ensure_token
from broker.errors import DecryptionFailed, HsmPinRefused, HsmUnavailable
from hsm_sim.faults import CallLog, FailOnCall
from tests.hsm_fixtures import US_INFO, make_hsm, unique_label
from tests.integration.hsm.common import AAD, IV, Softhsm


def test_concurrent_calls_share_a_bounded_pool(hsm: Pkcs11Hsm) -> None:
    label = unique_label("kek")
    hsm.generate_kek(label)
    calls = CallLog()
    hsm.gate.fault = calls
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(40):
                iv = n.to_bytes(6, "big") + i.to_bytes(6, "big")
                data = os.urandom(32)
                assert hsm.decrypt(label, iv, hsm.encrypt(label, iv, data, AAD), AAD) == data
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert calls.count("encrypt") == 12 * 40
    assert calls.count("openSession") <= 4  # pool_size of the fixture


def test_exhausted_pool_times_out_with_unavailable(softhsm: Softhsm) -> None:
    library, token = softhsm
    adapter = make_hsm(library, token, pool_size=1, lease_timeout=0.3)
    release = threading.Event()
    entered = threading.Event()

    def block(name: str) -> None:
        if name == "generateRandom" and threading.current_thread().name == "holder":
            entered.set()
            release.wait(10)

    adapter.gate.fault = block
    holder = threading.Thread(target=adapter.random, args=(8,), name="holder")
    holder.start()
    try:
        assert entered.wait(10)
        started = time.monotonic()
        with pytest.raises(HsmUnavailable, match="no session"):
            adapter.random(8)
        assert time.monotonic() - started < 5
    finally:
        release.set()
        holder.join()
    assert len(adapter.random(8)) == 8  # the session came back to the pool
    adapter.close()
    with pytest.raises(HsmUnavailable):
        adapter.random(8)


# -- C.17: injected device and session errors ------------------------------------------------


@pytest.mark.parametrize(
    "code",
    [
        PyKCS11.CKR_DEVICE_ERROR,
        PyKCS11.CKR_SESSION_HANDLE_INVALID,
        PyKCS11.CKR_DEVICE_REMOVED,
        PyKCS11.CKR_SESSION_CLOSED,
        PyKCS11.CKR_TOKEN_NOT_PRESENT,
        PyKCS11.CKR_USER_NOT_LOGGED_IN,
        PyKCS11.CKR_CRYPTOKI_NOT_INITIALIZED,
        PyKCS11.CKR_GENERAL_ERROR,
    ],
    ids=lambda c: PyKCS11.CKR[c],
)
@pytest.mark.parametrize("operation", ["encrypt", "sign"])
def test_failed_call_is_unavailable_and_the_next_uses_a_fresh_session(
    softhsm: Softhsm,
    hsm: Pkcs11Hsm,
    code: int,
    operation: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    kek, sig = unique_label("kek"), unique_label("sig")
    hsm.generate_kek(kek)
    hsm.generate_signing_key(sig)

    def run() -> bytes:
        if operation == "encrypt":
            return hsm.encrypt(kek, IV, b"secret", AAD)
        return hsm.sign(sig, bytes(32))

    run()  # a warm pool and cached handles
    fault = FailOnCall(nth=1, code=code, names=frozenset({operation}))
    hsm.gate.fault = fault
    caplog.set_level(logging.WARNING, logger="broker.adapters.pkcs11")
    with pytest.raises(HsmUnavailable) as failed:
        run()
    assert fault.failed == 1
    name = PyKCS11.CKR[code]
    assert name in failed.value.message
    assert isinstance(failed.value.__cause__, PyKCS11.PyKCS11Error)
    assert any(getattr(r, "ckr", None) == name for r in caplog.records)

    calls = CallLog()
    hsm.gate.fault = calls
    assert run()
    assert calls.count("openSession") == 1  # the failed session was dropped, not reused

    pin = softhsm[1].pin()  # the PIN the adapter was given
    assert pin not in failed.value.message
    for record in caplog.records:
        assert pin not in record.getMessage()
        assert pin not in repr(record.__dict__)


def test_device_error_drops_every_idle_session(hsm: Pkcs11Hsm) -> None:
    release = threading.Event()
    arrived = threading.Barrier(4)

    def hold(name: str) -> None:
        if name == "generateRandom" and threading.current_thread().name.startswith("holder"):
            arrived.wait(10)
            release.wait(10)

    hsm.gate.fault = hold
    holders = [threading.Thread(target=hsm.random, args=(8,), name=f"holder-{i}") for i in range(4)]
    for t in holders:
        t.start()
    release.set()
    for t in holders:
        t.join()
    assert hsm.pool.idle_sessions == 4  # four sessions opened and pooled

    hsm.gate.fault = FailOnCall(nth=1, code=PyKCS11.CKR_DEVICE_ERROR)
    with pytest.raises(HsmUnavailable, match="CKR_DEVICE_ERROR"):
        hsm.random(8)
    assert hsm.pool.idle_sessions == 0
    calls = CallLog()
    hsm.gate.fault = calls
    assert len(hsm.random(8)) == 8
    assert calls.count("openSession") == 1


def test_decrypt_general_error_is_a_bad_tag_and_keeps_the_session(hsm: Pkcs11Hsm) -> None:
    # On SoftHSM2 a GCM tag mismatch is CKR_GENERAL_ERROR; the adapter checks the token still
    # answers, then reports DecryptionFailed and keeps the session.
    label = unique_label("kek")
    hsm.generate_kek(label)
    sealed = hsm.encrypt(label, IV, b"secret", AAD)
    hsm.gate.fault = FailOnCall(nth=1, code=PyKCS11.CKR_GENERAL_ERROR, names=frozenset({"decrypt"}))
    with pytest.raises(DecryptionFailed):
        hsm.decrypt(label, IV, sealed, AAD)
    calls = CallLog()
    hsm.gate.fault = calls
    assert hsm.decrypt(label, IV, sealed, AAD) == b"secret"
    assert calls.count("openSession") == 0


def test_decrypt_device_error_is_unavailable_not_a_bad_tag(hsm: Pkcs11Hsm) -> None:
    label = unique_label("kek")
    hsm.generate_kek(label)
    sealed = hsm.encrypt(label, IV, b"secret", AAD)
    hsm.gate.fault = FailOnCall(nth=1, code=PyKCS11.CKR_DEVICE_ERROR, names=frozenset({"decrypt"}))
    with pytest.raises(HsmUnavailable, match="CKR_DEVICE_ERROR"):
        hsm.decrypt(label, IV, sealed, AAD)
    hsm.gate.fault = None
    assert hsm.decrypt(label, IV, sealed, AAD) == b"secret"


@pytest.mark.parametrize("code", [PyKCS11.CKR_DEVICE_ERROR, PyKCS11.CKR_SESSION_HANDLE_INVALID])
def test_kth_call_fails_for_every_k(softhsm: Softhsm, code: int) -> None:
    """Whatever PKCS#11 call of a fresh adapter's first decrypt fails, that decrypt is
    UNAVAILABLE and the next succeeds."""
    library, token = softhsm
    setup = make_hsm(library, token)
    label = unique_label("kek")
    setup.generate_kek(label)
    sealed = setup.encrypt(label, IV, b"secret", AAD)
    k = 1
    while True:
        adapter = make_hsm(library, token)
        fault = FailOnCall(nth=k, code=code)
        adapter.gate.fault = fault
        try:
            if fault.nth > 50:
                pytest.fail("decrypt never stopped making calls")
            try:
                result = adapter.decrypt(label, IV, sealed, AAD)
            except HsmUnavailable as exc:
                assert fault.failed == 1
                assert PyKCS11.CKR[code] in exc.message
            else:
                assert fault.failed == 0
                assert result == b"secret"
                break
            adapter.gate.fault = None
            assert adapter.decrypt(label, IV, sealed, AAD) == b"secret"
        finally:
            adapter.close()
        k += 1
    assert k > 3  # openSession, session info/login, find and decrypt were all exercised
    setup.close()


def test_stale_object_handle_is_found_again(hsm: Pkcs11Hsm) -> None:
    label = unique_label("kek")
    hsm.generate_kek(label)
    sealed = hsm.encrypt(label, IV, b"x", b"")
    fault = FailOnCall(nth=1, code=PyKCS11.CKR_KEY_HANDLE_INVALID, names=frozenset({"decrypt"}))
    calls = CallLog(then=fault)
    hsm.gate.fault = calls
    assert hsm.decrypt(label, IV, sealed, b"") == b"x"
    assert calls.count("findObjects") == 1  # evicted, found again, retried once
    assert calls.count("openSession") == 0


def test_wrong_pin_is_unavailable_with_a_clear_message(softhsm: Softhsm, tmp_path: Path) -> None:
    library, token = softhsm
    home = token.conf_path.parent
    # A token of its own: login state is per token and process, and no other session of
    # this token may be open for the PIN to be checked at all.
    pin_token = ensure_token(home, "pin-test", home / "hsm-pin-test.pin", library=library)
    wrong = "not-the-pin-" + os.urandom(4).hex()
    adapter = Pkcs11Hsm(library, pin_token.label, wrong, US_INFO)
    try:
        with pytest.raises(HsmUnavailable) as refused:
            adapter.check()
        assert "CKR_PIN_INCORRECT" in refused.value.message
        assert isinstance(refused.value, HsmPinRefused)  # the start never retries it
        assert "PIN" in refused.value.message
        assert wrong not in refused.value.message
        with pytest.raises(HsmUnavailable):  # still refused: no lockout on SoftHSM2
            adapter.random(8)
    finally:
        adapter.close()
    good = Pkcs11Hsm(library, pin_token.label, pin_token.pin(), US_INFO)
    good.check()
    good.close()


def test_unknown_token_label_is_unavailable(softhsm: Softhsm) -> None:
    library, _token = softhsm
    adapter = Pkcs11Hsm(library, "no-such-token", "1234", US_INFO)
    with pytest.raises(HsmUnavailable, match="no initialised PKCS#11 token"):
        adapter.check()
    assert library.initialized  # a configuration error never re-initialises the module


def test_byte_results_come_back_whole_through_the_fast_copy() -> None:
    """The gate copies PyKCS11 byte vectors in one go; the self-check must pass here, and the
    copy must equal the slow element-by-element conversion for every length."""
    import PyKCS11 as P

    from broker.adapters.pkcs11 import gate

    assert gate._storage_layout_ok()
    for length in (0, 1, 15, 16, 17, 48, 255, 4096):
        data = bytes((i * 7 + length) % 256 for i in range(length))
        vector = P.ckbytelist(data)
        assert gate.vector_bytes(vector) == bytes(vector) == data
