"""Start-up check of every HSM object the broker uses (DESIGN.md invariant 1).

The broker refuses to start when a key-encryption key or signing key on the token does not
carry the template it was generated with: a key that became extractable, or that allows
wrapping or another mechanism, is never used. The HSM compares its objects with the one
definition of the templates (`Hsm.key_properties`); this module only walks the keys the
broker knows and refuses to start on the first that falls short.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import TypeVar

from broker.domain import KeyState
from broker.errors import HsmObjectMissing
from broker.ports import Hsm, KeyKind, KeyStore
from broker.services.signing import SigningKeys

log = logging.getLogger(__name__)

_T = TypeVar("_T")

#: Pauses before looking again for an HSM object that seemed missing at start (seconds).
#: SoftHSM2's file backend can miss an object for a moment while another process (a sibling
#: worker writing its audit anchor, say) rewrites the token's files; a real HSM answers at once.
SETTLE_DELAYS = (0.5, 1.0, 2.0)


def settled(look: Callable[[], _T], refresh: Callable[[], None] | None = None) -> _T:
    """`look()`, asked again after short pauses while it raises `HsmObjectMissing`.

    A missing object still stops the start, a few seconds later: it is never re-created.
    `refresh` (when given) runs before each new look: SoftHSM2 may need to re-read its files.
    """
    for delay in (*SETTLE_DELAYS, None):
        try:
            return look()
        except HsmObjectMissing as exc:
            if delay is None:
                raise
            log.warning("HSM object not found at start (%s); looking again", exc)
            time.sleep(delay)
            if refresh is not None:
                refresh()
    raise AssertionError("unreachable")


class WeakKeyError(RuntimeError):
    """An HSM object does not carry the template the broker requires."""


def check_templates(
    store: KeyStore,
    hsms: Mapping[str, Hsm],
    signing: SigningKeys,
    refresh: Callable[[], None] | None = None,
) -> int:
    """Checks every key version and signing key; returns how many objects were checked.

    Raises:
        WeakKeyError: an object differs from its template, or it is missing.
    """
    checked = 0
    after = ""
    while True:
        page = store.list_keys(after, 500)
        if not page:
            break
        for key in page:
            if key.state is KeyState.DESTROYED or key.destruction_started():
                # Crypto-shredded, or being so: its objects are meant to be gone.
                continue
            hsm = hsms.get(key.hsm)
            if hsm is None:
                log.warning(
                    "key on an unconfigured HSM is not checked", extra={"key_id": key.key_id}
                )
                continue
            for version in key.versions:
                what = f"{key.key_id} v{version.version}"
                _check(hsm, version.hsm_label, KeyKind.KEK, what, refresh)
                checked += 1
        after = page[-1].key_id
    for sk in signing.all():
        _check(sk.hsm, sk.label, KeyKind.SIGNING, f"signing key {sk.kid}", refresh)
        checked += 1
    return checked


def _check(
    hsm: Hsm, label: str, kind: KeyKind, what: str, refresh: Callable[[], None] | None
) -> None:
    try:
        properties = settled(lambda: hsm.key_properties(label, kind), refresh)
    except HsmObjectMissing as exc:
        raise WeakKeyError(
            f"{what}: HSM object {label!r} is missing from HSM {hsm.info.name!r}"
        ) from exc
    if not properties.as_generated:
        raise WeakKeyError(
            f"{what} ({label}) is weaker than required: {', '.join(properties.problems)}"
        )
