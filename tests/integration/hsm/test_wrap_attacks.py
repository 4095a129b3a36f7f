"""C.20: Clulow-style attacks across the broker's keys (invariant 1, key separation)."""

from __future__ import annotations

import PyKCS11
import pytest

from broker.adapters.pkcs11 import Pkcs11Hsm
from tests.hsm_fixtures import find_one, plant_weak_key, raw_session, unique_label
from tests.integration.hsm.common import IV, Softhsm


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
        attacker = plant_weak_key(
            session,
            unique_label("attacker"),
            [
                (PyKCS11.CKA_SENSITIVE, False),
                (PyKCS11.CKA_EXTRACTABLE, True),
                (PyKCS11.CKA_WRAP, True),
                (PyKCS11.CKA_UNWRAP, True),
                (PyKCS11.CKA_ENCRYPT, True),
                (PyKCS11.CKA_DECRYPT, True),
            ],
            token=False,
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
