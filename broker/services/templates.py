"""Start-up check of every HSM object the broker uses (DESIGN.md invariant 1).

The broker refuses to start when a key-encryption key or signing key on the token does not
carry the attribute template it was generated with: a key that became extractable, or that
allows wrapping or another mechanism, is never used.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from broker.errors import HsmObjectMissing
from broker.ports import Hsm, KeyStore
from broker.services.signing import SigningKeys

log = logging.getLogger(__name__)

KEK_TEMPLATE: Mapping[str, object] = {
    "CKA_TOKEN": True,
    "CKA_PRIVATE": True,
    "CKA_SENSITIVE": True,
    "CKA_EXTRACTABLE": False,
    "CKA_MODIFIABLE": False,
    "CKA_WRAP": False,
    "CKA_UNWRAP": False,
    "CKA_SIGN": False,
    "CKA_VERIFY": False,
    "CKA_DERIVE": False,
    "CKA_ENCRYPT": True,
    "CKA_DECRYPT": True,
    "CKA_ALLOWED_MECHANISMS": ["CKM_AES_GCM"],
}

SIGNING_TEMPLATE: Mapping[str, object] = {
    "CKA_TOKEN": True,
    "CKA_PRIVATE": True,
    "CKA_SENSITIVE": True,
    "CKA_EXTRACTABLE": False,
    "CKA_MODIFIABLE": False,
    "CKA_SIGN": True,
    "CKA_DECRYPT": False,
    "CKA_UNWRAP": False,
    "CKA_DERIVE": False,
    "CKA_ALLOWED_MECHANISMS": ["CKM_ECDSA"],
}


class WeakKeyError(RuntimeError):
    """An HSM object does not carry the template the broker requires."""


def template_problems(
    attributes: Mapping[str, object], template: Mapping[str, object]
) -> list[str]:
    """Names of the attributes of `attributes` that differ from `template`."""
    return [
        f"{name}={attributes.get(name)!r} (want {want!r})"
        for name, want in template.items()
        if attributes.get(name) != want
    ]


def check_templates(store: KeyStore, hsms: Mapping[str, Hsm], signing: SigningKeys) -> int:
    """Checks every key version and signing key; returns how many objects were checked.

    Raises:
        WeakKeyError: an object's attributes differ from its template, or it is missing.
    """
    checked = 0
    after = ""
    while True:
        page = store.list_keys(after, 500)
        if not page:
            break
        for key in page:
            hsm = hsms.get(key.hsm)
            if hsm is None:
                log.warning(
                    "key on an unconfigured HSM is not checked", extra={"key_id": key.key_id}
                )
                continue
            for version in key.versions:
                _check(hsm, version.hsm_label, KEK_TEMPLATE, f"{key.key_id} v{version.version}")
                checked += 1
        after = page[-1].key_id
    for sk in signing.all():
        _check(sk.hsm, sk.label, SIGNING_TEMPLATE, f"signing key {sk.kid}")
        checked += 1
    return checked


def _check(hsm: Hsm, label: str, template: Mapping[str, object], what: str) -> None:
    try:
        attributes = hsm.attributes(label)
    except HsmObjectMissing as exc:
        raise WeakKeyError(
            f"{what}: HSM object {label!r} is missing from HSM {hsm.info.name!r}"
        ) from exc
    problems = template_problems(attributes, template)
    if problems:
        raise WeakKeyError(f"{what} ({label}) is weaker than required: {', '.join(problems)}")
