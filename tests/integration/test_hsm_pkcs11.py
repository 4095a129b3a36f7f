"""The PKCS#11 adapter against a real SoftHSM2 token (DESIGN.md invariants 1, 2, 5;
TEST-CATALOGUE.md C.15, C.17, C.19, C.20)."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import PyKCS11
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature

from broker.adapters.pkcs11_hsm import (
    Pkcs11Hsm,
    Pkcs11Library,
    pack_mechanisms,
    unpack_mechanisms,
)
from broker.config import ConfigError, read_pin_file
from broker.errors import (
    AlreadyExists,
    DecryptionFailed,
    HsmObjectMissing,
    HsmUnavailable,
    InvalidArgument,
)
from hsm_sim.softhsm import (
    FailOnCall,
    SoftHsmToken,
    ensure_token,
    find_softhsm_module,
    write_softhsm_conf,
)
from tests.hsm_fixtures import US_INFO, make_hsm, raw_session, unique_label

Softhsm = tuple[Pkcs11Library, SoftHsmToken]

IV = bytes(range(12))
AAD = b"kb1|key-a|v1|ctx"


# -- helpers ---------------------------------------------------------------------------------


def find_one(session: PyKCS11.Session, label: str, cls: int) -> PyKCS11.CK_OBJECT_HANDLE:
    found = session.findObjects([(PyKCS11.CKA_LABEL, label), (PyKCS11.CKA_CLASS, cls)])
    assert len(found) == 1, f"{len(found)} objects of class {cls} labelled {label}"
    return found[0]


def read_attrs(session: PyKCS11.Session, handle: object, attrs: list[int]) -> dict[int, object]:
    return dict(zip(attrs, session.getAttributeValue(handle, attrs), strict=True))


def ckr(exc_info: pytest.ExceptionInfo[PyKCS11.PyKCS11Error]) -> int:
    return int(exc_info.value.value)


class CallLog:
    """A fault hook that only records the PyKCS11 calls the adapter makes."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def __call__(self, name: str) -> None:
        self.names.append(name)

    def count(self, name: str) -> int:
        return self.names.count(name)


# -- invariant 1: templates ------------------------------------------------------------------


KEK_EXPECTED = {
    PyKCS11.CKA_CLASS: PyKCS11.CKO_SECRET_KEY,
    PyKCS11.CKA_KEY_TYPE: PyKCS11.CKK_AES,
    PyKCS11.CKA_VALUE_LEN: 32,
    PyKCS11.CKA_TOKEN: True,
    PyKCS11.CKA_PRIVATE: True,
    PyKCS11.CKA_SENSITIVE: True,
    PyKCS11.CKA_ALWAYS_SENSITIVE: True,
    PyKCS11.CKA_EXTRACTABLE: False,
    PyKCS11.CKA_NEVER_EXTRACTABLE: True,
    PyKCS11.CKA_LOCAL: True,  # generated inside the token, never imported
    PyKCS11.CKA_MODIFIABLE: False,
    PyKCS11.CKA_COPYABLE: False,
    PyKCS11.CKA_WRAP: False,
    PyKCS11.CKA_UNWRAP: False,
    PyKCS11.CKA_SIGN: False,
    PyKCS11.CKA_VERIFY: False,
    PyKCS11.CKA_DERIVE: False,
    PyKCS11.CKA_ENCRYPT: True,
    PyKCS11.CKA_DECRYPT: True,
}


def test_kek_template_read_back_through_pykcs11(softhsm: Softhsm, hsm: Pkcs11Hsm) -> None:
    library, token = softhsm
    label = unique_label("kek")
    hsm.generate_kek(label)
    with raw_session(library, token) as session:
        key = find_one(session, label, PyKCS11.CKO_SECRET_KEY)
        attrs = read_attrs(
            session,
            key,
            [*KEK_EXPECTED, PyKCS11.CKA_ALLOWED_MECHANISMS, PyKCS11.CKA_LABEL, PyKCS11.CKA_ID],
        )
        for attr, want in KEK_EXPECTED.items():
            assert attrs[attr] == want, PyKCS11.CKA[attr]
        assert unpack_mechanisms(attrs[PyKCS11.CKA_ALLOWED_MECHANISMS]) == [PyKCS11.CKM_AES_GCM]
        assert attrs[PyKCS11.CKA_LABEL] == label
        assert bytes(attrs[PyKCS11.CKA_ID]) == label.encode()
        # The key value never comes back: PyKCS11 answers None for a sensitive attribute.
        assert session.getAttributeValue(key, [PyKCS11.CKA_VALUE]) == [None]
        assert session.getAttributeValue(key, [PyKCS11.CKA_VALUE], True) == [None]


def test_allowed_mechanisms_encoding_is_the_measured_one() -> None:
    # CK_ULONG is 8 bytes on LP64 Linux: the form the catalogue measured on SoftHSM2.
    import struct

    assert pack_mechanisms(PyKCS11.CKM_AES_GCM) == list(struct.pack("=Q", PyKCS11.CKM_AES_GCM))
    assert unpack_mechanisms(bytes(pack_mechanisms(1, 2))) == [1, 2]


@pytest.mark.parametrize(
    "change",
    [
        (PyKCS11.CKA_EXTRACTABLE, True),
        (PyKCS11.CKA_SENSITIVE, False),
        (PyKCS11.CKA_WRAP, True),
        (PyKCS11.CKA_UNWRAP, True),
        (PyKCS11.CKA_DERIVE, True),
        (PyKCS11.CKA_ALLOWED_MECHANISMS, pack_mechanisms(PyKCS11.CKM_AES_CBC_PAD)),
    ],
    ids=lambda c: str(PyKCS11.CKA[c[0]]),
)
def test_kek_cannot_be_weakened(
    softhsm: Softhsm, hsm: Pkcs11Hsm, change: tuple[int, object]
) -> None:
    library, token = softhsm
    label = unique_label("kek")
    hsm.generate_kek(label)
    with raw_session(library, token) as session:
        key = find_one(session, label, PyKCS11.CKO_SECRET_KEY)
        with pytest.raises(PyKCS11.PyKCS11Error):
            session.setAttributeValue(key, [change])
        after = read_attrs(session, key, [change[0]])
    if change[0] == PyKCS11.CKA_ALLOWED_MECHANISMS:
        assert unpack_mechanisms(after[change[0]]) == [PyKCS11.CKM_AES_GCM]
    else:
        assert after[change[0]] == KEK_EXPECTED[change[0]]


@pytest.mark.parametrize(
    "mechanism",
    [
        PyKCS11.Mechanism(PyKCS11.CKM_AES_CBC_PAD, bytes(16)),
        PyKCS11.Mechanism(PyKCS11.CKM_AES_CBC, bytes(16)),
        PyKCS11.Mechanism(PyKCS11.CKM_AES_ECB, None),
        PyKCS11.AES_CTR_Mechanism(128, bytes(16)),
    ],
    ids=["CBC_PAD", "CBC", "ECB", "CTR"],
)
def test_kek_refuses_every_mode_but_gcm(
    softhsm: Softhsm, hsm: Pkcs11Hsm, mechanism: object
) -> None:
    library, token = softhsm
    label = unique_label("kek")
    hsm.generate_kek(label)
    with raw_session(library, token) as session:
        key = find_one(session, label, PyKCS11.CKO_SECRET_KEY)
        # Control: GCM on the same raw session works, so the refusal below is the template's.
        gcm = PyKCS11.AES_GCM_Mechanism(IV, b"", 128)
        assert len(bytes(session.encrypt(key, b"x" * 16, gcm))) == 32
        with pytest.raises(PyKCS11.PyKCS11Error) as refused:
            session.encrypt(key, b"x" * 16, mechanism)
        assert ckr(refused) == PyKCS11.CKR_MECHANISM_INVALID


def test_signing_key_template(softhsm: Softhsm, hsm: Pkcs11Hsm) -> None:
    library, token = softhsm
    label = unique_label("sig")
    hsm.generate_signing_key(label)
    with raw_session(library, token) as session:
        private = find_one(session, label, PyKCS11.CKO_PRIVATE_KEY)
        public = find_one(session, label, PyKCS11.CKO_PUBLIC_KEY)
        priv = read_attrs(
            session,
            private,
            [
                PyKCS11.CKA_TOKEN,
                PyKCS11.CKA_PRIVATE,
                PyKCS11.CKA_SENSITIVE,
                PyKCS11.CKA_EXTRACTABLE,
                PyKCS11.CKA_MODIFIABLE,
                PyKCS11.CKA_SIGN,
                PyKCS11.CKA_SIGN_RECOVER,
                PyKCS11.CKA_DECRYPT,
                PyKCS11.CKA_UNWRAP,
                PyKCS11.CKA_DERIVE,
                PyKCS11.CKA_ALLOWED_MECHANISMS,
                PyKCS11.CKA_VALUE,
            ],
        )
        assert priv[PyKCS11.CKA_TOKEN] is True
        assert priv[PyKCS11.CKA_PRIVATE] is True
        assert priv[PyKCS11.CKA_SENSITIVE] is True
        assert priv[PyKCS11.CKA_EXTRACTABLE] is False
        assert priv[PyKCS11.CKA_MODIFIABLE] is False
        assert priv[PyKCS11.CKA_SIGN] is True
        for flag in (
            PyKCS11.CKA_SIGN_RECOVER,
            PyKCS11.CKA_DECRYPT,
            PyKCS11.CKA_UNWRAP,
            PyKCS11.CKA_DERIVE,
        ):
            assert priv[flag] is False, PyKCS11.CKA[flag]
        assert unpack_mechanisms(priv[PyKCS11.CKA_ALLOWED_MECHANISMS]) == [PyKCS11.CKM_ECDSA]
        assert priv[PyKCS11.CKA_VALUE] is None  # the private scalar never comes back

        pub = read_attrs(
            session,
            public,
            [
                PyKCS11.CKA_TOKEN,
                PyKCS11.CKA_VERIFY,
                PyKCS11.CKA_ENCRYPT,
                PyKCS11.CKA_WRAP,
                PyKCS11.CKA_DERIVE,
                PyKCS11.CKA_ALLOWED_MECHANISMS,
            ],
        )
        assert pub[PyKCS11.CKA_TOKEN] is True
        assert pub[PyKCS11.CKA_VERIFY] is True
        assert pub[PyKCS11.CKA_ENCRYPT] is False
        assert pub[PyKCS11.CKA_WRAP] is False
        assert pub[PyKCS11.CKA_DERIVE] is False
        assert unpack_mechanisms(pub[PyKCS11.CKA_ALLOWED_MECHANISMS]) == [PyKCS11.CKM_ECDSA]

        # It cannot decrypt, and signs with raw ECDSA only.
        with pytest.raises(PyKCS11.PyKCS11Error):
            session.decrypt(private, bytes(64), PyKCS11.Mechanism(PyKCS11.CKM_ECDSA, None))
        with pytest.raises(PyKCS11.PyKCS11Error) as refused:
            session.sign(private, b"m", PyKCS11.Mechanism(PyKCS11.CKM_ECDSA_SHA256, None))
        assert ckr(refused) == PyKCS11.CKR_MECHANISM_INVALID
        with pytest.raises(PyKCS11.PyKCS11Error):
            session.setAttributeValue(private, [(PyKCS11.CKA_EXTRACTABLE, True)])


def test_attributes_report_for_the_start_up_check(hsm: Pkcs11Hsm) -> None:
    kek, sig = unique_label("kek"), unique_label("sig")
    hsm.generate_kek(kek)
    hsm.generate_signing_key(sig)

    attrs = hsm.attributes(kek)
    assert attrs["objects"] == 1
    assert attrs["CKA_CLASS"] == "CKO_SECRET_KEY"
    assert attrs["CKA_KEY_TYPE"] == "CKK_AES"
    assert attrs["CKA_VALUE_LEN"] == 32
    assert attrs["CKA_ALLOWED_MECHANISMS"] == ["CKM_AES_GCM"]
    assert attrs["CKA_KEY_GEN_MECHANISM"] == "CKM_AES_KEY_GEN"
    for name, want in KEK_EXPECTED.items():
        if isinstance(want, bool):
            assert attrs[PyKCS11.CKA[name]] is want, PyKCS11.CKA[name]
    assert "public" not in attrs

    sattrs = hsm.attributes(sig)
    assert sattrs["objects"] == 2
    assert sattrs["CKA_CLASS"] == "CKO_PRIVATE_KEY"
    assert sattrs["CKA_KEY_TYPE"] == "CKK_EC"
    assert sattrs["CKA_SIGN"] is True
    assert sattrs["CKA_DECRYPT"] is False
    assert sattrs["CKA_SENSITIVE"] is True
    assert sattrs["CKA_EXTRACTABLE"] is False
    assert sattrs["CKA_ALLOWED_MECHANISMS"] == ["CKM_ECDSA"]
    assert sattrs["CKA_EC_PARAMS"] == bytes.fromhex("06082a8648ce3d030107")
    public = sattrs["public"]
    assert isinstance(public, dict)
    assert public["CKA_CLASS"] == "CKO_PUBLIC_KEY"
    assert public["CKA_VERIFY"] is True
    assert public["CKA_ALLOWED_MECHANISMS"] == ["CKM_ECDSA"]

    with pytest.raises(HsmObjectMissing):
        hsm.attributes(unique_label("none"))


def test_attributes_show_a_weak_key_made_outside_the_broker(
    softhsm: Softhsm, hsm: Pkcs11Hsm
) -> None:
    library, token = softhsm
    label = unique_label("weak")
    with raw_session(library, token) as session:
        # SoftHSM2 defaults: no CKA_ALLOWED_MECHANISMS, wrap/unwrap on.
        session.generateKey(
            [
                (PyKCS11.CKA_CLASS, PyKCS11.CKO_SECRET_KEY),
                (PyKCS11.CKA_KEY_TYPE, PyKCS11.CKK_AES),
                (PyKCS11.CKA_VALUE_LEN, 32),
                (PyKCS11.CKA_TOKEN, True),
                (PyKCS11.CKA_LABEL, label),
            ]
        )
    try:
        attrs = hsm.attributes(label)
        assert attrs["CKA_WRAP"] is True
        assert attrs["CKA_UNWRAP"] is True
        assert attrs["CKA_ALLOWED_MECHANISMS"] in (None, [])
    finally:
        hsm.destroy(label)


# -- invariant 2: AES-256-GCM ----------------------------------------------------------------


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


def _flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


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
        aad = _flip(AAD, 3)
    elif tamper == "aad_extended":
        aad = AAD + b"x"
    elif tamper == "aad_empty":
        aad = b""
    elif tamper == "iv_byte":
        iv = _flip(IV, 11)
    elif tamper == "tag_byte":
        blob = _flip(sealed, len(sealed) - 1)
    elif tamper == "ciphertext_first_byte":
        blob = _flip(sealed, 0)
    elif tamper == "ciphertext_last_byte":
        blob = _flip(sealed, len(plaintext) - 1)
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
    hsm.fault_hook = calls
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


# -- signing ---------------------------------------------------------------------------------


def test_signature_verifies_with_the_public_point(hsm: Pkcs11Hsm) -> None:
    label = unique_label("sig")
    point = hsm.generate_signing_key(label)
    assert len(point) == 65
    assert point[0] == 0x04
    assert hsm.public_point(label) == point
    public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)

    digest = hashes.Hash(hashes.SHA256())
    digest.update(b"header.payload")
    message_digest = digest.finalize()
    signature = hsm.sign(label, message_digest)
    assert len(signature) == 64
    der = encode_dss_signature(
        int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
    )
    public.verify(der, message_digest, ec.ECDSA(Prehashed(hashes.SHA256())))
    with pytest.raises(InvalidSignature):
        public.verify(der, _flip(message_digest, 0), ec.ECDSA(Prehashed(hashes.SHA256())))
    # ECDSA is randomised: two signatures of one digest differ, both verify.
    assert hsm.sign(label, message_digest) != signature

    with pytest.raises(InvalidArgument):
        hsm.sign(label, b"not a digest")


def test_generate_refuses_a_taken_label(hsm: Pkcs11Hsm) -> None:
    kek, sig = unique_label("kek"), unique_label("sig")
    hsm.generate_kek(kek)
    hsm.generate_signing_key(sig)
    with pytest.raises(AlreadyExists):
        hsm.generate_kek(kek)
    with pytest.raises(AlreadyExists):
        hsm.generate_kek(sig)
    with pytest.raises(AlreadyExists):
        hsm.generate_signing_key(kek)
    assert hsm.attributes(kek)["objects"] == 1
    assert hsm.attributes(sig)["objects"] == 2


def test_has_object_and_destroy(hsm: Pkcs11Hsm) -> None:
    kek, sig = unique_label("kek"), unique_label("sig")
    hsm.generate_kek(kek)
    hsm.generate_signing_key(sig)
    sealed = hsm.encrypt(kek, IV, b"x", b"")  # caches the handle
    assert hsm.has_object(kek)
    assert hsm.has_object(sig)
    hsm.destroy(kek)
    hsm.destroy(sig)
    assert not hsm.has_object(kek)
    assert not hsm.has_object(sig)
    hsm.destroy(kek)  # nothing left: no error
    with pytest.raises(HsmObjectMissing):
        hsm.decrypt(kek, IV, sealed, b"")
    with pytest.raises(HsmObjectMissing):
        hsm.public_point(sig)


def test_random(hsm: Pkcs11Hsm) -> None:
    a, b = hsm.random(32), hsm.random(32)
    assert len(a) == 32
    assert a != b
    assert hsm.random(0) == b""
    assert len(hsm.random(4096)) == 4096
    with pytest.raises(InvalidArgument):
        hsm.random(-1)


def test_labels_are_validated(hsm: Pkcs11Hsm) -> None:
    with pytest.raises(InvalidArgument):
        hsm.generate_kek("")
    with pytest.raises(InvalidArgument):
        hsm.has_object("x" * 300)


# -- C.20: Clulow-style attacks across the broker's keys -------------------------------------


def test_no_broker_key_wraps_or_unwraps_another(softhsm: Softhsm, hsm: Pkcs11Hsm) -> None:
    library, token = softhsm
    kek1, kek2, sig = unique_label("kek"), unique_label("kek"), unique_label("sig")
    hsm.generate_kek(kek1)
    hsm.generate_kek(kek2)
    hsm.generate_signing_key(sig)
    wrap_mechanisms = [
        PyKCS11.Mechanism(PyKCS11.CKM_AES_KEY_WRAP, None),
        PyKCS11.Mechanism(PyKCS11.CKM_AES_KEY_WRAP_PAD, None),
        PyKCS11.AES_GCM_Mechanism(IV, b"", 128),
        PyKCS11.Mechanism(PyKCS11.CKM_AES_CBC_PAD, bytes(16)),
    ]
    with raw_session(library, token) as session:
        keys = {
            "kek1": find_one(session, kek1, PyKCS11.CKO_SECRET_KEY),
            "kek2": find_one(session, kek2, PyKCS11.CKO_SECRET_KEY),
            "sig": find_one(session, sig, PyKCS11.CKO_PRIVATE_KEY),
        }
        attacker = session.generateKey(
            [
                (PyKCS11.CKA_CLASS, PyKCS11.CKO_SECRET_KEY),
                (PyKCS11.CKA_KEY_TYPE, PyKCS11.CKK_AES),
                (PyKCS11.CKA_VALUE_LEN, 32),
                (PyKCS11.CKA_TOKEN, False),
                (PyKCS11.CKA_SENSITIVE, False),
                (PyKCS11.CKA_EXTRACTABLE, True),
                (PyKCS11.CKA_WRAP, True),
                (PyKCS11.CKA_UNWRAP, True),
                (PyKCS11.CKA_ENCRYPT, True),
                (PyKCS11.CKA_DECRYPT, True),
                (PyKCS11.CKA_LABEL, unique_label("attacker")),
            ]
        )
        wrapped_attacker = bytes(
            session.wrapKey(
                attacker, attacker, PyKCS11.Mechanism(PyKCS11.CKM_AES_KEY_WRAP_PAD, None)
            )
        )  # control: wrapping works at all on this token
        assert wrapped_attacker
        wrappers = {**keys, "attacker": attacker}
        attempts = 0
        for wname, wrapping in wrappers.items():
            for tname, target in keys.items():
                for mech in wrap_mechanisms:
                    attempts += 1
                    with pytest.raises(PyKCS11.PyKCS11Error):
                        session.wrapKey(wrapping, target, mech)
                        pytest.fail(f"{wname} wrapped {tname}")
            # Every broker key refuses to unwrap anything into the token, too.
            if wname != "attacker":
                for mech in wrap_mechanisms:
                    with pytest.raises(PyKCS11.PyKCS11Error):
                        session.unwrapKey(
                            wrapping,
                            wrapped_attacker,
                            [
                                (PyKCS11.CKA_CLASS, PyKCS11.CKO_SECRET_KEY),
                                (PyKCS11.CKA_KEY_TYPE, PyKCS11.CKK_AES),
                                (PyKCS11.CKA_TOKEN, False),
                                (PyKCS11.CKA_SENSITIVE, False),
                                (PyKCS11.CKA_EXTRACTABLE, True),
                            ],
                            mech,
                        )
        assert attempts == 4 * 3 * len(wrap_mechanisms)
        # The encrypt-a-key trick: a KEK encrypting another key's value needs that value, which
        # never comes out; and the signing key cannot decrypt what a KEK sealed.
        for name in ("kek1", "kek2", "sig"):
            assert session.getAttributeValue(keys[name], [PyKCS11.CKA_VALUE]) == [None]
        sealed = bytes(
            session.encrypt(keys["kek1"], b"k" * 32, PyKCS11.AES_GCM_Mechanism(IV, b"", 128))
        )
        with pytest.raises(PyKCS11.PyKCS11Error):
            session.decrypt(keys["sig"], sealed, PyKCS11.AES_GCM_Mechanism(IV, b"", 128))
        session.destroyObject(attacker)


# -- pool and concurrency --------------------------------------------------------------------


def test_concurrent_calls_share_a_bounded_pool(hsm: Pkcs11Hsm) -> None:
    label = unique_label("kek")
    hsm.generate_kek(label)
    calls = CallLog()
    hsm.fault_hook = calls
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

    adapter.fault_hook = block
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
    hsm: Pkcs11Hsm, code: int, operation: str, caplog: pytest.LogCaptureFixture
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
    hsm.fault_hook = fault
    caplog.set_level(logging.WARNING, logger="broker.adapters.pkcs11_hsm")
    with pytest.raises(HsmUnavailable) as failed:
        run()
    assert fault.failed == 1
    name = PyKCS11.CKR[code]
    assert name in failed.value.message
    assert isinstance(failed.value.__cause__, PyKCS11.PyKCS11Error)
    assert any(getattr(r, "ckr", None) == name for r in caplog.records)

    calls = CallLog()
    hsm.fault_hook = calls
    assert run()
    assert calls.count("openSession") == 1  # the failed session was dropped, not reused

    pin = hsm._pin
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

    hsm.fault_hook = hold
    holders = [threading.Thread(target=hsm.random, args=(8,), name=f"holder-{i}") for i in range(4)]
    for t in holders:
        t.start()
    release.set()
    for t in holders:
        t.join()
    assert hsm._idle.qsize() == 4  # internal: four sessions opened and pooled

    hsm.fault_hook = FailOnCall(nth=1, code=PyKCS11.CKR_DEVICE_ERROR)
    with pytest.raises(HsmUnavailable, match="CKR_DEVICE_ERROR"):
        hsm.random(8)
    assert hsm._idle.qsize() == 0
    calls = CallLog()
    hsm.fault_hook = calls
    assert len(hsm.random(8)) == 8
    assert calls.count("openSession") == 1


def test_decrypt_general_error_is_a_bad_tag_and_keeps_the_session(hsm: Pkcs11Hsm) -> None:
    # On SoftHSM2 a GCM tag mismatch is CKR_GENERAL_ERROR; the adapter checks the token still
    # answers, then reports DecryptionFailed and keeps the session.
    label = unique_label("kek")
    hsm.generate_kek(label)
    sealed = hsm.encrypt(label, IV, b"secret", AAD)
    hsm.fault_hook = FailOnCall(nth=1, code=PyKCS11.CKR_GENERAL_ERROR, names=frozenset({"decrypt"}))
    with pytest.raises(DecryptionFailed):
        hsm.decrypt(label, IV, sealed, AAD)
    calls = CallLog()
    hsm.fault_hook = calls
    assert hsm.decrypt(label, IV, sealed, AAD) == b"secret"
    assert calls.count("openSession") == 0


def test_decrypt_device_error_is_unavailable_not_a_bad_tag(hsm: Pkcs11Hsm) -> None:
    label = unique_label("kek")
    hsm.generate_kek(label)
    sealed = hsm.encrypt(label, IV, b"secret", AAD)
    hsm.fault_hook = FailOnCall(nth=1, code=PyKCS11.CKR_DEVICE_ERROR, names=frozenset({"decrypt"}))
    with pytest.raises(HsmUnavailable, match="CKR_DEVICE_ERROR"):
        hsm.decrypt(label, IV, sealed, AAD)
    hsm.fault_hook = None
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
        adapter.fault_hook = fault
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
            adapter.fault_hook = None
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
    calls = CallLog()

    def both(name: str) -> None:
        calls(name)
        fault(name)

    hsm.fault_hook = both
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


# -- C.15: the token directory disappears ----------------------------------------------------


@contextmanager
def library_restored_on_failure(library: Pkcs11Library) -> Iterator[None]:
    """When the test fails half-way, re-initialise the shared module so that later tests
    do not fail in cascade (the adapter's own recovery is what the test checks)."""
    try:
        yield
    except BaseException:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                library.reinitialize()
                break
            except HsmUnavailable:
                time.sleep(library.reinit_min_interval)
        raise


def test_token_directory_renamed_away_fails_closed_and_recovers(
    softhsm: Softhsm, softhsm_second: SoftHsmToken
) -> None:
    library, token = softhsm
    with library_restored_on_failure(library):
        _token_directory_scenario(library, token, softhsm_second)


def _token_directory_scenario(
    library: Pkcs11Library, token: SoftHsmToken, softhsm_second: SoftHsmToken
) -> None:
    tokens = token.conf_path.parent / "tokens"
    away = tokens.with_name("tokens.away")
    adapter = make_hsm(library, token)
    other = make_hsm(library, softhsm_second, info=US_INFO)
    label, fresh = unique_label("kek"), unique_label("kek")
    adapter.generate_kek(label)
    sealed = adapter.encrypt(label, IV, b"secret", AAD)
    other_label = unique_label("kek")
    other.generate_kek(other_label)
    before = sorted(str(p.relative_to(tokens)) for p in tokens.rglob("*.object"))
    probes = [make_hsm(library, token) for _ in range(8)]
    for probe in probes:
        probe.check()  # a warm session: the failure must come from the call itself
    generation = library.generation

    tokens.rename(away)
    try:
        # Observed on SoftHSM2 2.6.1: cached handles turn CKR_OBJECT_HANDLE_INVALID, searches
        # find nothing (no error!) and C_GetTokenInfo answers CKR_GENERAL_ERROR. The adapter
        # never reads "nothing found" as "no such key" without asking the token. Each first
        # call below runs on an adapter that has not seen a failure yet.
        with pytest.raises(HsmUnavailable):
            adapter.encrypt(label, IV, b"secret", AAD)  # cached handle
        first_calls: list[Callable[[Pkcs11Hsm], object]] = [
            lambda h: h.has_object(label),
            lambda h: h.has_object(fresh),
            lambda h: h.encrypt(label, IV, b"secret", AAD),
            lambda h: h.decrypt(label, IV, sealed, AAD),
            lambda h: h.generate_kek(fresh),
            lambda h: h.destroy(label),
            lambda h: h.attributes(label),
            lambda h: h.check(),
        ]
        for call, probe in zip(first_calls, probes, strict=True):
            with pytest.raises(HsmUnavailable):
                call(probe)
        assert library.generation == generation
        # The next call of the adapter that saw the failure re-initialises the module. SoftHSM2
        # keeps the token marked lost even after the directory returns, until the module is
        # finalised and initialised again; C_Initialize itself fails while the directory is
        # missing, so every token of the module is unavailable until then.
        with pytest.raises(HsmUnavailable):
            adapter.check()
        assert library.generation > generation
        assert not library.initialized
        with pytest.raises(HsmUnavailable):
            other.encrypt(other_label, IV, b"x", b"")
        assert not tokens.exists()
    finally:
        away.rename(tokens)

    deadline = time.monotonic() + 15
    while True:  # the module re-initialises at most once a second (reinit_min_interval)
        try:
            adapter.check()
            break
        except HsmUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    assert library.initialized
    assert adapter.decrypt(label, IV, sealed, AAD) == b"secret"  # the same key, not a new one
    assert other.encrypt(other_label, IV, b"x", b"")  # the other token's pool recovered too
    assert not adapter.has_object(fresh)  # nothing was created while the token was away
    assert adapter.attributes(label)["objects"] == 1
    after = sorted(str(p.relative_to(tokens)) for p in tokens.rglob("*.object"))
    assert after == before
    for h in (adapter, other, *probes):
        h.close()


# -- token set-up (hsm_sim.softhsm) ----------------------------------------------------------


def test_ensure_token_is_idempotent(softhsm: Softhsm) -> None:
    library, token = softhsm
    home = token.conf_path.parent
    pin = token.pin()
    slot = library.slot_for_token(token.label)
    again = ensure_token(home, token.label, token.pin_file, library=library)
    assert again.pin() == pin
    assert library.slot_for_token(token.label) == slot
    assert list(library.tokens()).count(token.label) == 1
    # Without a library argument the one already loaded in this process is reused.
    third = ensure_token(home, token.label, token.pin_file)
    assert third.library is library
    assert (token.pin_file.stat().st_mode & 0o777) == 0o600
    assert token.conf_path == write_softhsm_conf(home)
    assert (home / "tokens").stat().st_mode & 0o777 == 0o700
    conf = token.conf_path.read_text()
    assert f"directories.tokendir = {home / 'tokens'}" in conf
    assert "objectstore.backend = file" in conf
    assert os.environ["SOFTHSM2_CONF"] == str(token.conf_path)


def test_second_token_shares_the_conf(softhsm: Softhsm, softhsm_second: SoftHsmToken) -> None:
    library, token = softhsm
    assert softhsm_second.conf_path == token.conf_path
    assert softhsm_second.library is library
    assert softhsm_second.pin() != token.pin()
    assert library.slot_for_token("us-east") != library.slot_for_token("keybroker")
    assert (softhsm_second.pin_file.stat().st_mode & 0o777) == 0o600
    # No SO PIN, nor anything else, is left beside the PIN files.
    leftovers = [p.name for p in token.conf_path.parent.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def test_pin_never_on_a_command_line() -> None:
    import hsm_sim.softhsm as module

    source = Path(module.__file__).read_text()
    for spawn in ("subprocess", "os.system", "os.spawn", "os.exec", "Popen"):
        assert spawn not in source


def test_read_pin_refuses_unsafe_files(tmp_path: Path) -> None:
    pin_file = tmp_path / "pin"
    pin_file.write_text("1234\n")
    pin_file.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        read_pin_file(pin_file)
    pin_file.chmod(0o640)
    with pytest.raises(ConfigError, match="group or others"):
        read_pin_file(pin_file)
    pin_file.chmod(0o600)
    assert read_pin_file(pin_file) == "1234"
    pin_file.write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        read_pin_file(pin_file)
    with pytest.raises(ConfigError, match="does not exist"):
        read_pin_file(tmp_path / "missing")


def test_existing_token_without_its_pin_file_is_refused(softhsm: Softhsm, tmp_path: Path) -> None:
    library, token = softhsm
    with pytest.raises(RuntimeError, match="does not exist"):
        ensure_token(token.conf_path.parent, token.label, tmp_path / "no-such.pin", library=library)


def test_one_conf_and_one_load_per_process(softhsm: Softhsm, tmp_path: Path) -> None:
    library, _token = softhsm
    with pytest.raises(RuntimeError, match=r"only one softhsm2\.conf"):
        ensure_token(tmp_path / "other-home", "keybroker", tmp_path / "pin", library=library)
    with pytest.raises(RuntimeError, match="already loaded"):
        Pkcs11Library(library.module_path)
    assert Pkcs11Library.shared(library.module_path) is library
    assert find_softhsm_module()


def test_library_refuses_a_forked_child(softhsm: Softhsm) -> None:
    library, _token = softhsm
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            library.tokens()
        except RuntimeError:
            os._exit(0)
        except BaseException:
            os._exit(2)
        os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
