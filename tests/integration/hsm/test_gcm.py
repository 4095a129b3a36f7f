"""Invariant 2: AES-256-GCM inside the HSM, and what a tampered input gets."""

from __future__ import annotations

import os

import pytest

from broker.adapters.pkcs11 import Pkcs11Hsm
from broker.errors import DecryptionFailed, HsmObjectMissing, InvalidArgument
from hsm_sim.faults import CallLog
from tests.hsm_fixtures import unique_label
from tests.integration.hsm.common import AAD, IV, flip


@pytest.mark.parametrize("size", [0, 1, 32, 65536])
def test_gcm_round_trip(hsm: Pkcs11Hsm, size: int) -> None:
    label = unique_label("kek")
    hsm.generate_kek(label)
    plaintext = os.urandom(size)
    sealed = hsm.encrypt(label, IV, plaintext, AAD)
    assert len(sealed) == size + 16
    assert size < 16 or plaintext not in sealed
    assert hsm.decrypt(label, IV, sealed, AAD) == plaintext
    # Empty AAD is a valid, different context.
    sealed2 = hsm.encrypt(label, IV, plaintext, b"")
    assert sealed2 != sealed
    assert hsm.decrypt(label, IV, sealed2, b"") == plaintext


def test_gcm_is_deterministic_per_iv_and_differs_across_keys(hsm: Pkcs11Hsm) -> None:
    a, b = unique_label("kek"), unique_label("kek")
    hsm.generate_kek(a)
    hsm.generate_kek(b)
    assert hsm.encrypt(a, IV, b"data", AAD) == hsm.encrypt(a, IV, b"data", AAD)
    assert hsm.encrypt(a, IV, b"data", AAD) != hsm.encrypt(b, IV, b"data", AAD)
    assert hsm.encrypt(a, IV, b"data", AAD) != hsm.encrypt(a, bytes(12), b"data", AAD)


@pytest.mark.parametrize(
    "tamper",
    [
        "aad_byte",
        "aad_extended",
        "aad_empty",
        "iv_byte",
        "tag_byte",
        "ciphertext_first_byte",
        "ciphertext_last_byte",
        "truncated",
        "extended",
        "tag_only",
        "too_short",
        "empty",
        "other_key",
    ],
)
def test_any_change_fails_decryption_and_keeps_the_session(hsm: Pkcs11Hsm, tamper: str) -> None:
    label, other = unique_label("kek"), unique_label("kek")
    hsm.generate_kek(label)
    hsm.generate_kek(other)
    plaintext = b"a 32-byte data key, for example."
    sealed = hsm.encrypt(label, IV, plaintext, AAD)
    key, iv, blob, aad = label, IV, sealed, AAD
    if tamper == "aad_byte":
        aad = flip(AAD, 3)
    elif tamper == "aad_extended":
        aad = AAD + b"x"
    elif tamper == "aad_empty":
        aad = b""
    elif tamper == "iv_byte":
        iv = flip(IV, 11)
    elif tamper == "tag_byte":
        blob = flip(sealed, len(sealed) - 1)
    elif tamper == "ciphertext_first_byte":
        blob = flip(sealed, 0)
    elif tamper == "ciphertext_last_byte":
        blob = flip(sealed, len(plaintext) - 1)
    elif tamper == "truncated":
        blob = sealed[:-1]
    elif tamper == "extended":
        blob = sealed + b"\x00"
    elif tamper == "tag_only":
        blob = sealed[-16:]
    elif tamper == "too_short":
        blob = sealed[:15]
    elif tamper == "empty":
        blob = b""
    elif tamper == "other_key":
        key = other

    calls = CallLog()
    hsm.gate.fault = calls
    with pytest.raises(DecryptionFailed) as failed:
        hsm.decrypt(key, iv, blob, aad)
    assert failed.value.message == "ciphertext or context does not match"
    # The pool is still usable, on the same session: nothing was dropped or reopened.
    assert hsm.decrypt(label, IV, sealed, AAD) == plaintext
    assert calls.count("openSession") == 0


def test_iv_must_be_12_bytes(hsm: Pkcs11Hsm) -> None:
    label = unique_label("kek")
    hsm.generate_kek(label)
    for bad in (b"", bytes(8), bytes(16)):
        with pytest.raises(InvalidArgument):
            hsm.encrypt(label, bad, b"x", b"")
        with pytest.raises(InvalidArgument):
            hsm.decrypt(label, bad, bytes(32), b"")


def test_missing_key_is_reported(hsm: Pkcs11Hsm) -> None:
    missing = unique_label("none")
    with pytest.raises(HsmObjectMissing):
        hsm.encrypt(missing, IV, b"x", b"")
    with pytest.raises(HsmObjectMissing):
        hsm.decrypt(missing, IV, bytes(32), b"")
    with pytest.raises(HsmObjectMissing):
        hsm.sign(missing, bytes(32))
    with pytest.raises(HsmObjectMissing):
        hsm.public_point(missing)
    # A signing key is not a KEK, and a KEK does not sign.
    sig, kek = unique_label("sig"), unique_label("kek")
    hsm.generate_signing_key(sig)
    hsm.generate_kek(kek)
    with pytest.raises(HsmObjectMissing):
        hsm.encrypt(sig, IV, b"x", b"")
    with pytest.raises(HsmObjectMissing):
        hsm.sign(kek, bytes(32))
