"""Verifying the whole trail against its signatures and HSM anchors, and exporting it.

Both walk one consistent snapshot of the audit tables through `keybroker_client.evidence`'s
verifier, the same code an auditor runs offline on an export. The anchors are read first: an
anchor is written only after its checkpoint is stored, so every anchor read names a
checkpoint the snapshot taken afterwards holds, unless the database lost it.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass

from keybroker_client import evidence

from broker.domain import format_time
from broker.ports import AuditSnapshot, AuditStore, Clock, Hsm, Record
from broker.services.audit_checkpoints import ANCHOR_PREFIX, AuditSigner, sign_record

log = logging.getLogger(__name__)


def chain_pattern(broker_id: str) -> re.Pattern[str]:
    """The chain ids of this broker's writers: `<broker_id>-<12 hex>`."""
    return re.compile(re.escape(broker_id) + r"-[0-9a-f]{12}")


@dataclass(frozen=True, slots=True)
class _Anchor:
    label: str
    record: object


class TrailChecker:
    """Verifies and exports the trail of one broker (all its writers' chains).

    Args:
        store: the audit tables.
        signer: the audit key (signs export manifests; its JWKS verifies everything).
        anchors: the HSM holding the anchors; None checks none (unit tests).
        clock: the time source of manifests.
        broker_id: whose anchors to check (chains `<broker_id>-<12 hex>`).
    """

    def __init__(
        self,
        store: AuditStore,
        signer: AuditSigner,
        anchors: Hsm | None,
        clock: Clock,
        broker_id: str,
    ) -> None:
        self._store = store
        self._signer = signer
        self._anchors = anchors
        self._clock = clock
        self._prefix = f"{ANCHOR_PREFIX}{broker_id}-"
        self._pattern = chain_pattern(broker_id)

    def verify(self) -> evidence.Report:
        """Walks every chain, checkpoint and anchor; reports the first bad record.

        Raises:
            HsmUnavailable: the anchors cannot be read.
            AuditUnavailable: the database cannot be read.
        """
        verifier, anchors = self._begin()
        with self._store.snapshot() as snap:
            for _ in _walk(snap, verifier, 0):
                pass
        return _finish(verifier, anchors)

    def export(self, after_sequence: int) -> Iterator[bytes]:
        """The export lines (docs/audit.md) of the events after `after_sequence`, ending with
        a signed manifest that says whether the whole trail verified.

        Raises:
            HsmUnavailable: the anchors cannot be read or the manifest cannot be signed.
            AuditUnavailable: the database cannot be read.
        """
        verifier, anchors = self._begin()
        heads: dict[str, dict[str, object]] = {}
        through = after_sequence
        with self._store.snapshot() as snap:
            chains = {c.get("chain"): c for c in snap.chains()}
            for name in snap.event_chains(after_sequence):
                if name in chains:
                    yield _encode(chains[name])
            for record in _walk(snap, verifier, after_sequence):
                if record.get("type") == "event" and not evidence.event_problem(record):
                    heads[record["chain"]] = {
                        "chain_sequence": record["chain_sequence"],
                        "head": record["hash"],
                    }
                    through = max(through, record["sequence"])
                yield _encode(record)
        report = _finish(verifier, anchors)
        manifest = {
            "type": "manifest",
            "after_sequence": after_sequence,
            "through_sequence": through,
            "chains": heads,
            "time": format_time(self._clock.now()),
            "verified": report.ok,
            "error": describe(report),
        }
        yield _encode(sign_record(self._signer, manifest))

    def _begin(self) -> tuple[evidence.TrailVerifier, list[_Anchor]]:
        anchors = self._read_anchors()  # before the snapshot: see the module's docstring
        return evidence.TrailVerifier(self._signer.jwks()), anchors

    def _read_anchors(self) -> list[_Anchor]:
        if self._anchors is None:
            return []
        found: list[_Anchor] = []
        for label, values in sorted(self._anchors.read_anchors(self._prefix).items()):
            if not self._pattern.fullmatch(label[len(ANCHOR_PREFIX) :]):
                continue  # another broker's trail on the same token
            for value in values:
                try:
                    record: object = json.loads(value.decode("utf-8"))
                except (UnicodeDecodeError, ValueError):
                    record = None
                found.append(_Anchor(label, record))
        return found


def describe(report: evidence.Report) -> str:
    """One line naming the first bad record, or "" for a good report."""
    if report.ok:
        return ""
    where = f"chain {report.first_bad_chain} " if report.first_bad_chain else ""
    at = f"at chain_sequence {report.first_bad_sequence}: " if report.first_bad_sequence else ""
    return f"{where}{at}{report.error}"


def _finish(verifier: evidence.TrailVerifier, anchors: list[_Anchor]) -> evidence.Report:
    for anchor in anchors:
        verifier.anchor(anchor.record, f"HSM anchor {anchor.label}")
    return verifier.finish()


def _walk(
    snap: AuditSnapshot, verifier: evidence.TrailVerifier, after_sequence: int
) -> Iterator[Record]:
    """Feeds the verifier the whole trail in order, each checkpoint after the event it covers;
    yields the records of events after `after_sequence` and their checkpoints, then every
    checkpoint that covers no event (evidence of a truncated chain)."""
    for record in snap.chains():
        verifier.chain_record(record)
    waiting: dict[tuple[object, object], list[Record]] = {}
    for record in snap.checkpoints():
        waiting.setdefault((record.get("chain"), record.get("chain_sequence")), []).append(record)
    for key in [k for k in waiting if k[1] == 0]:  # chains closed before their first event
        for record in waiting.pop(key):
            verifier.checkpoint(record)
    for record in snap.events():
        verifier.event(record)
        shown = _sequence(record) > after_sequence
        if shown:
            yield record
        for checkpoint in waiting.pop((record.get("chain"), record.get("chain_sequence")), []):
            verifier.checkpoint(checkpoint)
            if shown:
                yield checkpoint
    for records in waiting.values():
        for checkpoint in records:
            verifier.checkpoint(checkpoint)
            yield checkpoint


def _sequence(record: Record) -> int:
    value = record.get("sequence")
    return value if isinstance(value, int) else 0


def _encode(record: Record) -> bytes:
    try:
        return evidence.canonical(record)
    except (TypeError, ValueError):
        # A value JSON cannot carry (a BLOB put in a text column): the line says so, and
        # the offline verifier reports it as a malformed record.
        log.warning("audit record cannot be encoded", extra={"sequence": record.get("sequence")})
        return evidence.canonical({"type": str(record.get("type")), "damaged": True})
