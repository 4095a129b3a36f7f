"""Objects on the token: taken labels, destruction, random data, label validation."""

from __future__ import annotations

import pytest

from broker.adapters.pkcs11 import Pkcs11Hsm
from broker.errors import AlreadyExists, HsmObjectMissing, InvalidArgument
from broker.ports import KeyKind
from tests.hsm_fixtures import objects_labelled, unique_label
from tests.integration.hsm.common import IV, Softhsm


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


def test_destroy(softhsm: Softhsm, hsm: Pkcs11Hsm) -> None:
    library, token = softhsm
    kek, sig = unique_label("kek"), unique_label("sig")
    hsm.generate_kek(kek)
    hsm.generate_signing_key(sig)
    sealed = hsm.encrypt(kek, IV, b"x", b"")  # caches the handle
    assert objects_labelled(library, token, kek)
    assert objects_labelled(library, token, sig)
    hsm.destroy(kek)
    hsm.destroy(sig)
    assert not objects_labelled(library, token, kek)
    assert not objects_labelled(library, token, sig)
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
        hsm.destroy("x" * 300)
    with pytest.raises(InvalidArgument):
        hsm.key_properties("x" * 300, KeyKind.KEK)
