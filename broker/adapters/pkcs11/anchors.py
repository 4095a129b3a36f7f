"""Audit anchors on a PKCS#11 token: small private data objects (`CKO_DATA`) that hold the
newest signed record of each audit chain, out of reach of anyone without the PIN.

SoftHSM2 (like many tokens) refuses to change `CKA_VALUE` of an existing data object, so an
anchor is replaced by creating the new object first and destroying the old one after: a crash
in between leaves two, which the reader returns both of, never none.
"""

from __future__ import annotations

from typing import Any

import PyKCS11

from broker.adapters.pkcs11.pool import Lease, object_handle

#: CKA_APPLICATION of every anchor.
APPLICATION = "keybroker-audit"
#: Largest anchor value accepted (a signed checkpoint record is well under 1 KiB).
MAX_ANCHOR_BYTES = 16 * 1024


def anchor_template(label: str) -> list[tuple[int, Any]]:
    """The attributes of an anchor, without its value."""
    return [
        (PyKCS11.CKA_CLASS, PyKCS11.CKO_DATA),
        (PyKCS11.CKA_TOKEN, True),
        (PyKCS11.CKA_PRIVATE, True),
        (PyKCS11.CKA_MODIFIABLE, True),
        (PyKCS11.CKA_LABEL, label),
        (PyKCS11.CKA_APPLICATION, APPLICATION),
    ]


def write(lease: Lease, label: str, data: bytes) -> None:
    """Creates the anchor `label` holding `data`, then destroys the older ones."""
    older = lease.find(
        [
            (PyKCS11.CKA_CLASS, PyKCS11.CKO_DATA),
            (PyKCS11.CKA_APPLICATION, APPLICATION),
            (PyKCS11.CKA_LABEL, label),
        ]
    )
    if not older:
        lease.probe_token()  # an empty search on a lost token must not look like a first write
    lease.call("createObject", [*anchor_template(label), (PyKCS11.CKA_VALUE, list(data))])
    for value in older:
        lease.call("destroyObject", object_handle(value))


def read(lease: Lease, prefix: str) -> dict[str, list[bytes]]:
    """Every anchor whose label starts with `prefix`: label -> values."""
    found = lease.find(
        [(PyKCS11.CKA_CLASS, PyKCS11.CKO_DATA), (PyKCS11.CKA_APPLICATION, APPLICATION)]
    )
    if not found:
        lease.probe_token()  # "no anchor" must not be a token that stopped answering
    anchors: dict[str, list[bytes]] = {}
    for value in found:
        handle = object_handle(value)
        (label,) = lease.call("getAttributeValue", handle, [PyKCS11.CKA_LABEL], False)
        label = str(label)
        if not label.startswith(prefix):
            continue
        (data,) = lease.call("getAttributeValue", handle, [PyKCS11.CKA_VALUE], True)
        anchors.setdefault(label, []).append(bytes(data or b""))
    return anchors
