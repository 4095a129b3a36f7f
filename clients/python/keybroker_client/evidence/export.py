"""Exports read line by line, several consecutive ones as one (docs/audit.md)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from keybroker_client.evidence.records import Record, canonical
from keybroker_client.evidence.verify import Report, TrailVerifier


def verify_export(lines: Iterable[bytes], jwks: Mapping[str, Any]) -> Report:
    """Verifies one export, or several consecutive ones given one after the other.

    Every record must be in canonical form, every chain must link, every checkpoint must
    match, and each export must end with its signed manifest, whose `after_sequence` is the
    previous manifest's `through_sequence` and whose chain heads the events reach.

    Args:
        lines: the export's lines (bytes, with or without the trailing newline).
        jwks: the broker's JWKS.

    Raises:
        EvidenceError: the JWKS holds no usable audit key.
    """
    return _ExportReader(TrailVerifier(jwks, partial_start=True)).read(lines)


class _ExportReader:
    """Splits the input into exports (each ends with its manifest) and feeds the verifier."""

    def __init__(self, verifier: TrailVerifier) -> None:
        self.v = verifier
        self.after: int | None = None  # through_sequence of the previous manifest
        self.segment: dict[str, int] = {}  # chains with events in this export: their count
        self.low = self.high = 0
        self.open = False

    def read(self, lines: Iterable[bytes]) -> Report:
        number = 0
        for number, raw in enumerate(lines, 1):
            if self.v.bad is not None:
                break
            self.line(raw, f"line {number}")
        if self.v.bad is None and (self.open or self.after is None):
            self.v.fail("", 0, "the export ends without its signed manifest (truncated)",
                        f"line {number + 1}" if number else "line 1")  # fmt: skip
        return self.v.finish()

    def line(self, raw: bytes, where: str) -> None:
        data = raw[:-1] if raw.endswith(b"\n") else raw
        try:
            record = json.loads(data.decode("utf-8"))
            exact = isinstance(record, dict) and canonical(record) == data
        except (UnicodeDecodeError, ValueError, TypeError):
            record, exact = None, False
        if not exact:
            self.v.fail("", 0, "not a record in canonical JSON form", where)
            return
        self.open = True
        kind = record.get("type")
        if kind == "chain":
            self.v.chain_record(record, where)
        elif kind == "event":
            self.v.event(record, where)
            if self.v.bad is None:
                chain, sequence = record["chain"], record["sequence"]
                self.segment[chain] = self.segment.get(chain, 0) + 1
                self.low = self.low or sequence
                self.high = sequence
        elif kind == "checkpoint":
            self.v.checkpoint(record, where)
        elif kind == "manifest":
            self.manifest(record, where)
        else:
            self.v.fail("", 0, f"unknown record type {kind!r}", where)

    def manifest(self, record: Record, where: str) -> None:
        v = self.v
        checked = v.signed_record(record, "manifest", where)
        if checked is None:
            return
        after, through = checked["after_sequence"], checked["through_sequence"]
        if self.after is None:
            v.partial_start = after > 0
            for name, state in v.chains.items():
                if state.began and not v.partial_start:
                    v.fail(
                        name,
                        1,
                        "the export starts at sequence 0 but this chain does not "
                        "start at chain_sequence 1: events missing",
                        where,
                    )
                    return
        elif after != self.after:
            v.fail(
                "",
                0,
                f"this export starts after sequence {after} but the previous one "
                f"ended at {self.after}: a gap or overlap between exports",
                where,
            )
            return
        if self.low and not (after < self.low and self.high <= through):
            v.fail(
                "",
                0,
                f"events {self.low}..{self.high} lie outside the signed range ({after}, {through}]",
                where,
            )
            return
        if not checked["verified"]:
            v.fail(
                "", 0, f"the broker found the trail bad when exporting: {checked['error']}", where
            )
            return
        for name in self.segment:
            if name not in checked["chains"]:
                v.fail(name, 0, "events of a chain the signed manifest does not name", where)
                return
        for name, position in checked["chains"].items():
            found = v.chains.get(name)
            have = found.position if found is not None else 0
            if found is None or have != position["chain_sequence"]:
                v.fail(
                    name,
                    min(have, position["chain_sequence"]) + 1,
                    "the signed manifest "
                    f"ends the chain at {position['chain_sequence']} but the export at "
                    f"{have}: events deleted or added",
                    where,
                )
                return
            if found.head != position["head"]:
                v.fail(
                    name,
                    have,
                    "the chain does not reach the head of the signed manifest: events altered",
                    where,
                )
                return
            found.signed = found.position
        self.after, self.segment, self.low, self.high, self.open = through, {}, 0, 0, False
