"""Re-encryption inside the adapter: the plaintext of a re-wrap stays in one PyKCS11 vector that
is wiped, never in a Python `bytes` object (`Hsm.reencrypt`, `Hsm.authenticate`)."""

from __future__ import annotations

import ctypes
import os
from typing import Any

import PyKCS11
import pytest

from broker.adapters.pkcs11 import Pkcs11Hsm
from broker.adapters.pkcs11 import hsm as hsm_module
from broker.adapters.pkcs11.gate import wipe_vector
from broker.errors import DecryptionFailed, HsmObjectMissing
from tests.hsm_fixtures import unique_label
from tests.integration.hsm.common import AAD, IV, flip

NEW_IV = bytes(range(100, 112))
NEW_AAD = b"kb1|key-a|v2|ctx"


def _storage(vector: Any) -> bytes:
    """A vector's bytes up to its capacity (what a wipe must have cleared)."""
    begin = ctypes.c_void_p.from_address(int(vector.this)).value or 0
    return ctypes.string_at(begin, vector.capacity()) if begin else b""


def _two_keks(hsm: Pkcs11Hsm) -> tuple[str, str]:
    old, new = unique_label("kek"), unique_label("kek")
    hsm.generate_kek(old)
    hsm.generate_kek(new)
    return old, new


@pytest.mark.parametrize("size", [0, 32, 65536])
def test_reencrypt_moves_the_plaintext_under_the_new_key(hsm: Pkcs11Hsm, size: int) -> None:
    old, new = _two_keks(hsm)
    plaintext = os.urandom(size)
    sealed = hsm.encrypt(old, IV, plaintext, AAD)
    moved = hsm.reencrypt(old, IV, sealed, AAD, new, NEW_IV, NEW_AAD)
    assert moved == hsm.encrypt(new, NEW_IV, plaintext, NEW_AAD)
    assert hsm.decrypt(new, NEW_IV, moved, NEW_AAD) == plaintext
    hsm.authenticate(new, NEW_IV, moved, NEW_AAD)


def test_a_tampered_blob_fails_and_the_session_stays_usable(hsm: Pkcs11Hsm) -> None:
    old, new = _two_keks(hsm)
    sealed = hsm.encrypt(old, IV, b"k" * 32, AAD)
    for bad in (flip(sealed, 0), flip(sealed, len(sealed) - 1), sealed[:10]):
        with pytest.raises(DecryptionFailed):
            hsm.reencrypt(old, IV, bad, AAD, new, NEW_IV, NEW_AAD)
        with pytest.raises(DecryptionFailed):
            hsm.authenticate(old, IV, bad, AAD)
    with pytest.raises(DecryptionFailed):
        hsm.reencrypt(old, IV, sealed, b"other context", new, NEW_IV, NEW_AAD)
    assert hsm.reencrypt(old, IV, sealed, AAD, new, NEW_IV, NEW_AAD)


def test_a_missing_key_on_either_side_is_reported(hsm: Pkcs11Hsm) -> None:
    old, new = _two_keks(hsm)
    sealed = hsm.encrypt(old, IV, b"k" * 32, AAD)
    with pytest.raises(HsmObjectMissing):
        hsm.reencrypt(unique_label("gone"), IV, sealed, AAD, new, NEW_IV, NEW_AAD)
    with pytest.raises(HsmObjectMissing):
        hsm.reencrypt(old, IV, sealed, AAD, unique_label("gone"), NEW_IV, NEW_AAD)


def test_the_plaintext_never_goes_through_pykcs11s_copying_calls(
    hsm: Pkcs11Hsm, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`Session.decrypt`/`encrypt` hand data back and forth as Python bytes; a re-wrap must
    not use them, and every buffer that held plaintext is wiped, on success and on failure."""
    old, new = _two_keks(hsm)
    secret = os.urandom(32)
    sealed = hsm.encrypt(old, IV, secret, AAD)

    def refuse(*_args: Any) -> None:
        raise AssertionError("the plaintext went through a copying PyKCS11 call")

    monkeypatch.setattr(PyKCS11.Session, "decrypt", refuse)
    monkeypatch.setattr(PyKCS11.Session, "encrypt", refuse)
    wiped: list[bytes] = []

    def wipe_and_look(vector: Any) -> None:
        wipe_vector(vector)
        wiped.append(_storage(vector))

    monkeypatch.setattr(hsm_module, "wipe_vector", wipe_and_look)
    moved = hsm.reencrypt(old, IV, sealed, AAD, new, NEW_IV, NEW_AAD)
    hsm.authenticate(new, NEW_IV, moved, NEW_AAD)
    with pytest.raises(DecryptionFailed):
        hsm.reencrypt(old, IV, flip(sealed, 3), AAD, new, NEW_IV, NEW_AAD)
    assert len(wiped) == 3
    assert all(len(storage) >= 32 and not any(storage) for storage in wiped)
    monkeypatch.undo()
    assert hsm.decrypt(new, NEW_IV, moved, NEW_AAD) == secret


def test_wipe_clears_the_whole_capacity() -> None:
    vector = PyKCS11.LowLevel.ckbytelist(b"A" * 48)
    vector.resize(32)  # a shorter content leaves the old bytes past its end
    assert _storage(vector) == b"A" * 48
    wipe_vector(vector)
    assert _storage(vector) == bytes(48)
