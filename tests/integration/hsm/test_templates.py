"""Invariant 1: the key templates, as the token stores them and as the adapter reports them."""

from __future__ import annotations

import PyKCS11
import pytest

from broker.adapters.pkcs11 import Pkcs11Hsm, pack_mechanisms, unpack_mechanisms
from broker.errors import HsmObjectMissing
from broker.ports import KeyKind
from tests.hsm_fixtures import find_one, plant_weak_key, raw_session, read_attrs, unique_label
from tests.integration.hsm.common import IV, Softhsm, ckr

# An independent literal copy of the KEK template, on purpose: checking the keys the adapter
# makes against `broker.adapters.pkcs11.templates.KEK` itself would not notice a weakening of
# that one definition. Derived attributes (ALWAYS_SENSITIVE, NEVER_EXTRACTABLE, LOCAL) too.
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
        plant_weak_key(session, label)
    try:
        attrs = hsm.attributes(label)
        assert attrs["CKA_WRAP"] is True
        assert attrs["CKA_UNWRAP"] is True
        assert attrs["CKA_ALLOWED_MECHANISMS"] in (None, [])
    finally:
        hsm.destroy(label)


# -- the start-up check's view: key_properties -----------------------------------------------


def test_keys_as_generated_have_no_problems(hsm: Pkcs11Hsm) -> None:
    kek, sig = unique_label("kek"), unique_label("sig")
    hsm.generate_kek(kek)
    hsm.generate_signing_key(sig)
    kek_props = hsm.key_properties(kek, KeyKind.KEK)
    assert (kek_props.objects, kek_props.problems) == (1, ())
    assert kek_props.as_generated
    sig_props = hsm.key_properties(sig, KeyKind.SIGNING)
    assert (sig_props.objects, sig_props.problems) == (2, ())
    # A key of the other kind is not "as generated".
    assert any("CKA_CLASS" in p for p in hsm.key_properties(kek, KeyKind.SIGNING).problems)
    assert any("CKA_CLASS" in p for p in hsm.key_properties(sig, KeyKind.KEK).problems)
    with pytest.raises(HsmObjectMissing):
        hsm.key_properties(unique_label("none"), KeyKind.KEK)


def test_key_properties_name_every_weak_attribute(softhsm: Softhsm, hsm: Pkcs11Hsm) -> None:
    library, token = softhsm
    label = unique_label("weak")
    with raw_session(library, token) as session:
        plant_weak_key(
            session,
            label,
            [(PyKCS11.CKA_SENSITIVE, False), (PyKCS11.CKA_EXTRACTABLE, True)],
        )
    try:
        problems = " ".join(hsm.key_properties(label, KeyKind.KEK).problems)
    finally:
        hsm.destroy(label)
    for name in (
        "CKA_SENSITIVE",
        "CKA_EXTRACTABLE",
        "CKA_WRAP",
        "CKA_UNWRAP",
        "CKA_ALLOWED_MECHANISMS",
    ):
        assert name in problems
    assert "CKA_EXTRACTABLE=True (want False)" in problems
