"""The key templates of DESIGN.md invariant 1: the one definition, used both to generate keys
and to check them at start.

`KEK`, `SIGNING_PUBLIC` and `SIGNING_PRIVATE` map each attribute to the value the broker sets
(every usage flag explicit: SoftHSM2 turns unset wrap, unwrap and verify on). `kek_template`
and `signing_key_templates` add the label for C_GenerateKey / C_GenerateKeyPair;
`template_problems` compares what a token reports (`decode_attributes`) with the same mappings.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

import PyKCS11

from broker.errors import HsmUnavailable
from broker.ports import KeyKind

#: DER of the OID 1.2.840.10045.3.1.7 (prime256v1, NIST P-256), the value of CKA_EC_PARAMS.
P256_EC_PARAMS = bytes.fromhex("06082a8648ce3d030107")
#: Length of an uncompressed SEC1 P-256 point (0x04 || X || Y).
P256_POINT_BYTES = 65

# CKA_ALLOWED_MECHANISMS is an array of CK_MECHANISM_TYPE, i.e. native `unsigned long`s.
# PyKCS11 passes it as raw bytes; "@L" is exactly CK_ULONG on every platform (on LP64 Linux
# it equals the measured `struct.pack("=Q", ...)` form).
_CK_ULONG = struct.Struct("@L")


def pack_mechanisms(*mechanisms: int) -> list[int]:
    """The value of CKA_ALLOWED_MECHANISMS for PyKCS11: the bytes of native CK_ULONGs."""
    return list(b"".join(_CK_ULONG.pack(m) for m in mechanisms))


def unpack_mechanisms(raw: object) -> list[int]:
    """Inverse of `pack_mechanisms` for a value read back with getAttributeValue."""
    data = bytes(raw)  # type: ignore[call-overload]
    if len(data) % _CK_ULONG.size:
        raise ValueError("CKA_ALLOWED_MECHANISMS is not an array of CK_ULONG")
    return [m for (m,) in _CK_ULONG.iter_unpack(data)]


#: An attribute template without the label: CKA_* -> value as PyKCS11 takes it.
Template = Mapping[int, Any]

#: An AES-256 key-encryption key: encrypts and decrypts with CKM_AES_GCM only, never leaves.
KEK: Template = MappingProxyType(
    {
        PyKCS11.CKA_CLASS: PyKCS11.CKO_SECRET_KEY,
        PyKCS11.CKA_KEY_TYPE: PyKCS11.CKK_AES,
        PyKCS11.CKA_VALUE_LEN: 32,
        PyKCS11.CKA_TOKEN: True,
        PyKCS11.CKA_PRIVATE: True,
        PyKCS11.CKA_SENSITIVE: True,
        PyKCS11.CKA_EXTRACTABLE: False,
        PyKCS11.CKA_MODIFIABLE: False,
        PyKCS11.CKA_COPYABLE: False,
        PyKCS11.CKA_WRAP: False,
        PyKCS11.CKA_UNWRAP: False,
        PyKCS11.CKA_SIGN: False,
        PyKCS11.CKA_VERIFY: False,
        PyKCS11.CKA_DERIVE: False,
        PyKCS11.CKA_ENCRYPT: True,
        PyKCS11.CKA_DECRYPT: True,
        PyKCS11.CKA_ALLOWED_MECHANISMS: pack_mechanisms(PyKCS11.CKM_AES_GCM),
    }
)

#: The public half of an ECDSA P-256 signing key: verifies only.
SIGNING_PUBLIC: Template = MappingProxyType(
    {
        PyKCS11.CKA_CLASS: PyKCS11.CKO_PUBLIC_KEY,
        PyKCS11.CKA_KEY_TYPE: PyKCS11.CKK_EC,
        PyKCS11.CKA_EC_PARAMS: P256_EC_PARAMS,
        PyKCS11.CKA_TOKEN: True,
        PyKCS11.CKA_PRIVATE: False,
        PyKCS11.CKA_MODIFIABLE: False,
        PyKCS11.CKA_VERIFY: True,
        PyKCS11.CKA_VERIFY_RECOVER: False,
        PyKCS11.CKA_ENCRYPT: False,
        PyKCS11.CKA_WRAP: False,
        PyKCS11.CKA_DERIVE: False,
        PyKCS11.CKA_ALLOWED_MECHANISMS: pack_mechanisms(PyKCS11.CKM_ECDSA),
    }
)

#: The private half: signs with raw CKM_ECDSA only, never leaves.
SIGNING_PRIVATE: Template = MappingProxyType(
    {
        PyKCS11.CKA_CLASS: PyKCS11.CKO_PRIVATE_KEY,
        PyKCS11.CKA_KEY_TYPE: PyKCS11.CKK_EC,
        PyKCS11.CKA_TOKEN: True,
        PyKCS11.CKA_PRIVATE: True,
        PyKCS11.CKA_SENSITIVE: True,
        PyKCS11.CKA_EXTRACTABLE: False,
        PyKCS11.CKA_MODIFIABLE: False,
        PyKCS11.CKA_COPYABLE: False,
        PyKCS11.CKA_SIGN: True,
        PyKCS11.CKA_SIGN_RECOVER: False,
        PyKCS11.CKA_DECRYPT: False,
        PyKCS11.CKA_UNWRAP: False,
        PyKCS11.CKA_DERIVE: False,
        PyKCS11.CKA_ALLOWED_MECHANISMS: pack_mechanisms(PyKCS11.CKM_ECDSA),
    }
)


def _labelled(template: Template, label: str) -> list[tuple[int, Any]]:
    return [*template.items(), (PyKCS11.CKA_LABEL, label), (PyKCS11.CKA_ID, label.encode())]


def kek_template(label: str) -> list[tuple[int, Any]]:
    """The C_GenerateKey template of a KEK labelled `label` (CKA_LABEL and CKA_ID)."""
    return _labelled(KEK, label)


def signing_key_templates(label: str) -> tuple[list[tuple[int, Any]], list[tuple[int, Any]]]:
    """(public, private) C_GenerateKeyPair templates of an ECDSA P-256 signing key."""
    return _labelled(SIGNING_PUBLIC, label), _labelled(SIGNING_PRIVATE, label)


# -- reading back ------------------------------------------------------------------------------

#: The attributes `Pkcs11Hsm.attributes` reports, in this order.
SECURITY_ATTRIBUTES: tuple[int, ...] = (
    PyKCS11.CKA_CLASS,
    PyKCS11.CKA_KEY_TYPE,
    PyKCS11.CKA_LABEL,
    PyKCS11.CKA_ID,
    PyKCS11.CKA_TOKEN,
    PyKCS11.CKA_PRIVATE,
    PyKCS11.CKA_SENSITIVE,
    PyKCS11.CKA_ALWAYS_SENSITIVE,
    PyKCS11.CKA_EXTRACTABLE,
    PyKCS11.CKA_NEVER_EXTRACTABLE,
    PyKCS11.CKA_MODIFIABLE,
    PyKCS11.CKA_COPYABLE,
    PyKCS11.CKA_DESTROYABLE,
    PyKCS11.CKA_LOCAL,
    PyKCS11.CKA_KEY_GEN_MECHANISM,
    PyKCS11.CKA_ENCRYPT,
    PyKCS11.CKA_DECRYPT,
    PyKCS11.CKA_WRAP,
    PyKCS11.CKA_UNWRAP,
    PyKCS11.CKA_SIGN,
    PyKCS11.CKA_SIGN_RECOVER,
    PyKCS11.CKA_VERIFY,
    PyKCS11.CKA_VERIFY_RECOVER,
    PyKCS11.CKA_DERIVE,
    PyKCS11.CKA_TRUSTED,
    PyKCS11.CKA_WRAP_WITH_TRUSTED,
    PyKCS11.CKA_VALUE_LEN,
    PyKCS11.CKA_EC_PARAMS,
    PyKCS11.CKA_ALLOWED_MECHANISMS,
)

# PyKCS11's reverse tables keep the last of two aliases (CKK_ECDSA, CKA_ECDSA_PARAMS, ...);
# report the current names of PKCS#11 v2.40.
_CURRENT_NAMES = {
    ("CKK", PyKCS11.CKK_EC): "CKK_EC",
    ("CKM", PyKCS11.CKM_EC_KEY_PAIR_GEN): "CKM_EC_KEY_PAIR_GEN",
    ("CKA", PyKCS11.CKA_EC_PARAMS): "CKA_EC_PARAMS",
}


def pkcs11_name(table: Mapping[Any, Any], value: object) -> object:
    """The name of `value` in one of PyKCS11's tables (`PyKCS11.CKO`, ...), else `value`."""
    name = table.get(value)
    if not isinstance(name, str):
        return value
    return _CURRENT_NAMES.get((name.split("_", 1)[0], value), name)


def attribute_name(attr: int) -> str:
    """ "CKA_SENSITIVE", ... for an attribute type."""
    return str(pkcs11_name(PyKCS11.CKA, attr))


def decode_value(attr: int, value: object) -> object:
    """An attribute value in the report form: bool, int, str, bytes, names, or None."""
    if value is None:
        return None
    if attr == PyKCS11.CKA_CLASS:
        return pkcs11_name(PyKCS11.CKO, value)
    if attr == PyKCS11.CKA_KEY_TYPE:
        return pkcs11_name(PyKCS11.CKK, value)
    if attr == PyKCS11.CKA_KEY_GEN_MECHANISM:
        return pkcs11_name(PyKCS11.CKM, value)
    if attr == PyKCS11.CKA_ALLOWED_MECHANISMS:
        return [pkcs11_name(PyKCS11.CKM, m) for m in unpack_mechanisms(value)]
    if isinstance(value, bool | int | str):
        return value
    return bytes(value)  # type: ignore[call-overload]


def decode_attributes(raw: list[object]) -> dict[str, object]:
    """The values of `SECURITY_ATTRIBUTES` (as read, in order) by CKA_* name."""
    return {
        attribute_name(attr): decode_value(attr, value)
        for attr, value in zip(SECURITY_ATTRIBUTES, raw, strict=True)
    }


def combine_reports(reports: Iterable[dict[str, object]]) -> dict[str, object]:
    """One report for the objects of one label (see `Pkcs11Hsm.attributes`): the secret or
    private key's attributes at the top, the public key's under "public", and "objects"."""
    by_class: dict[object, dict[str, object]] = {}
    count = 0
    for attrs in reports:
        by_class.setdefault(attrs["CKA_CLASS"], attrs)
        count += 1
    main = (
        by_class.get("CKO_SECRET_KEY")
        or by_class.get("CKO_PRIVATE_KEY")
        or next(iter(by_class.values()))
    )
    result = dict(main)
    if "CKO_PUBLIC_KEY" in by_class and main is not by_class["CKO_PUBLIC_KEY"]:
        result["public"] = by_class["CKO_PUBLIC_KEY"]
    result["objects"] = count
    return result


def unwrap_ec_point(raw: object, hsm_name: str) -> bytes:
    """CKA_EC_POINT is a DER OCTET STRING around the SEC1 point (some tokens omit it).

    Raises:
        HsmUnavailable: the value is no uncompressed P-256 point.
    """
    data: bytes = bytes(raw)  # type: ignore[call-overload]
    if len(data) == P256_POINT_BYTES + 2 and data[0] == 0x04 and data[1] == P256_POINT_BYTES:
        data = data[2:]
    if len(data) != P256_POINT_BYTES or data[0] != 0x04:
        raise HsmUnavailable(f"HSM {hsm_name!r} returned a malformed P-256 public point")
    return data


#: Per kind of key: (template of the object holding the secret, template of its public key).
TEMPLATES: dict[KeyKind, tuple[Template, Template | None]] = {
    KeyKind.KEK: (KEK, None),
    KeyKind.SIGNING: (SIGNING_PRIVATE, SIGNING_PUBLIC),
}


def _differences(report: Mapping[str, object], template: Template, prefix: str) -> list[str]:
    problems = []
    for attr, value in template.items():
        name, want = attribute_name(attr), decode_value(attr, value)
        if report.get(name) != want:
            problems.append(f"{prefix}{name}={report.get(name)!r} (want {want!r})")
    return problems


def template_problems(report: Mapping[str, object], kind: KeyKind) -> list[str]:
    """How the objects of one label (as `Pkcs11Hsm.attributes` reports them) fall short of the
    template of `kind`: one entry per differing attribute, naming it ("CKA_EXTRACTABLE=True
    (want False)"), plus a wrong object count (a duplicate label or a missing half)."""
    secret, public = TEMPLATES[kind]
    problems = _differences(report, secret, "")
    if public is not None:
        public_report = report.get("public")
        if isinstance(public_report, Mapping):
            problems += _differences(public_report, public, "public key ")
        else:
            problems.append("no public key with that label (want a key pair)")
    want_objects = 1 if public is None else 2
    if report.get("objects") != want_objects:
        problems.append(f"{report.get('objects')} objects carry the label (want {want_objects})")
    return problems
