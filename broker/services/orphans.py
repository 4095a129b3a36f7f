"""Start-up report of HSM objects that no record of the store refers to.

A key version is made in two steps: the HSM generates the object, then the store records it.
A process killed in between (or a store that refused the record and an HSM that then refused
the clean-up) leaves an object the broker never uses: an orphan. It is harmless for the data,
since nothing was ever encrypted under it, but an operator should know of it.

The scan only reports: it never deletes. An object the store does not know of may also be
another deployment's key on a shared token, or one restored from a backup of the token while
the database was restored from an older one; deciding is the operator's (docs/operations.md).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping

from broker.domain import Key
from broker.errors import HsmUnavailable
from broker.ports import Hsm, KeyStore
from broker.services.signing import SigningKeys

log = logging.getLogger(__name__)

#: Label prefixes of the objects the broker makes: key versions and signing keys.
BROKER_PREFIXES = ("kek:", "sig:")
#: Labels named in the warning line at most (the count is always given).
MAX_LISTED = 20


def known_labels(store: KeyStore, signing: SigningKeys) -> set[str]:
    """Every HSM label the store refers to: each version of each key (destroyed ones too:
    their objects are meant to be gone) and each signing key."""
    labels = {sk.label for sk in signing.all()}
    for key in _every_key(store):
        labels.update(v.hsm_label for v in key.versions)
    return labels


def find_orphans(
    store: KeyStore, hsms: Mapping[str, Hsm], signing: SigningKeys
) -> dict[str, list[str]]:
    """The broker's HSM objects (labels under `BROKER_PREFIXES`) that the store does not
    know of, by HSM name; an HSM without any is left out.

    Raises:
        HsmUnavailable: an HSM could not be read.
    """
    known = known_labels(store, signing)
    found: dict[str, list[str]] = {}
    for name, hsm in hsms.items():
        orphans = [
            label
            for prefix in BROKER_PREFIXES
            for label in hsm.labels(prefix)
            if label not in known
        ]
        if orphans:
            found[name] = sorted(orphans)
    return found


def report_orphans(store: KeyStore, hsms: Mapping[str, Hsm], signing: SigningKeys) -> int:
    """Logs one warning line per HSM holding orphans, naming them; deletes nothing.

    Returns:
        How many orphans were found (0 when an HSM could not be read: the start goes on,
        the scan is a report, not a check).
    """
    try:
        found = find_orphans(store, hsms, signing)
    except HsmUnavailable as exc:
        log.warning("the scan for orphaned HSM objects could not run: %s", exc)
        return 0
    for name, labels in found.items():
        shown = ", ".join(labels[:MAX_LISTED]) + (", ..." if len(labels) > MAX_LISTED else "")
        log.warning(
            "HSM %r holds %d object(s) that no key of the store refers to (left in place; "
            "see docs/operations.md, orphaned HSM objects): %s",
            name,
            len(labels),
            shown,
        )
    return sum(len(labels) for labels in found.values())


def _every_key(store: KeyStore) -> Iterator[Key]:
    after = ""
    while page := store.list_keys(after, 500):
        yield from page
        after = page[-1].key_id
