"""The verifier: records fed in trail order, the first bad one remembered (docs/audit.md)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from keybroker_client.evidence.records import (
    GENESIS_HASH,
    Record,
    audit_keys,
    event_hash,
    event_problem,
    is_int,
    record_problem,
    signature_problem,
)


@dataclass(frozen=True, slots=True)
class Report:
    """The outcome of a verification. Check `ok`: a bad trail is reported, not raised.

    Attributes:
        ok: every record verifies and nothing is missing.
        events_checked: events that verified before the first bad record.
        chains_checked: chains whose signed chain record was seen.
        checkpoints_checked: signed checkpoints that verified.
        unsigned_events: events after their chain's last checkpoint (the unsigned tails).
        first_bad_chain: the chain of the first bad record ("" when ok or not known).
        first_bad_sequence: the chain_sequence where the chain goes wrong (0 when ok).
        error: what is wrong.
        location: where the bad record is in the input ("line 17"), when it is a file.
        head_hash: hash of the last event that verified.
    """

    ok: bool
    events_checked: int = 0
    chains_checked: int = 0
    checkpoints_checked: int = 0
    unsigned_events: int = 0
    first_bad_chain: str = ""
    first_bad_sequence: int = 0
    error: str = ""
    location: str = ""
    head_hash: str = ""


@dataclass(slots=True)
class _Chain:
    record: Record | None = None
    position: int = 0
    head: str = GENESIS_HASH
    signed: int = 0
    closed: bool = False
    started: bool = False
    #: The chain_sequence before the first event seen, when the input starts mid-chain.
    began: int = 0
    checkpoints: dict[int, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Bad:
    chain: str
    sequence: int
    error: str
    location: str


class TrailVerifier:
    """Checks records fed in trail order; remembers the first bad one and ignores the rest.

    Feed chain records first, then events in `sequence` order, each checkpoint right after
    the event it covers (`chain_sequence`); then `anchor` for each record kept out of reach
    of the database, and `finish`.

    Args:
        jwks: the broker's JWKS; its `"keybroker_purpose": "audit"` keys verify signatures.
        partial_start: chains may start past chain_sequence 1 (an export of a later range).

    Raises:
        EvidenceError: the JWKS holds no usable audit key.
    """

    def __init__(self, jwks: Mapping[str, Any], *, partial_start: bool = False) -> None:
        self.keys = audit_keys(jwks)
        self.partial_start = partial_start
        self.chains: dict[str, _Chain] = {}
        self.bad: _Bad | None = None
        self.events_checked = 0
        self.checkpoints_checked = 0
        self.last_sequence = 0
        self.head_hash = ""

    def fail(self, chain: str, sequence: int, error: str, location: str = "") -> None:
        """Records a bad record (only the first one counts)."""
        if self.bad is None:
            self.bad = _Bad(chain, sequence, error, location)

    def signed_record(self, record: object, kind: str, location: str) -> Record | None:
        """The record if well-formed and signed by an audit key, else None (and bad)."""
        problem = record_problem(record, kind)
        chain, sequence = _place(record)
        if problem:
            self.fail(chain, sequence, f"malformed {kind} record: {problem}", location)
            return None
        assert isinstance(record, dict)
        problem = signature_problem(record, self.keys)
        if problem:
            self.fail(chain, sequence, f"{kind} record: {problem}", location)
            return None
        return record

    def chain_record(self, record: object, location: str = "") -> None:
        """A signed chain record: the chain exists, opened by `writer` at `time`."""
        if self.bad is not None:
            return
        checked = self.signed_record(record, "chain", location)
        if checked is None:
            return
        state = self.chains.setdefault(checked["chain"], _Chain())
        if state.record is not None and state.record != checked:
            self.fail(checked["chain"], 0, "two different chain records", location)
        state.record = checked

    def event(self, record: object, location: str = "") -> None:
        """One event, in `sequence` order."""
        if self.bad is not None:
            return
        problem = event_problem(record)
        if problem:
            self.fail(*_place(record), f"malformed event: {problem}", location)
            return
        assert isinstance(record, dict)
        chain, seq = record["chain"], record["chain_sequence"]
        state = self.chains.get(chain)
        if state is None or state.record is None:
            self.fail(chain, seq, "event of a chain without a signed chain record", location)
            return
        if state.closed:
            self.fail(chain, seq, f"event after the chain was closed at {state.position}", location)
            return
        if not state.started and seq != 1 and self.partial_start:
            state.position, state.head = seq - 1, record["prev_hash"]
            state.signed = state.began = state.position
        state.started = True
        expected = state.position + 1
        if seq != expected:
            self.fail(
                chain,
                expected,
                f"chain_sequence {seq} where {expected} was expected: events deleted, "
                "inserted, reordered or renumbered",
                location,
            )
            return
        if record["prev_hash"] != state.head:
            self.fail(chain, seq, "prev_hash is not the previous event's hash", location)
            return
        if event_hash(record) != record["hash"]:
            self.fail(chain, seq, "hash does not match the event's content (edited)", location)
            return
        if record["sequence"] <= self.last_sequence:
            self.fail(
                chain,
                seq,
                f"sequence {record['sequence']} is not after "
                f"{self.last_sequence}: records reordered or duplicated",
                location,
            )
            return
        state.position, state.head = seq, record["hash"]
        self.last_sequence = record["sequence"]
        self.events_checked += 1
        self.head_hash = record["hash"]

    def checkpoint(self, record: object, location: str = "") -> None:
        """A signed checkpoint, right after the event it covers."""
        if self.bad is not None:
            return
        checked = self.signed_record(record, "checkpoint", location)
        if checked is None:
            return
        chain, seq = checked["chain"], checked["chain_sequence"]
        state = self.chains.get(chain)
        if state is None or state.record is None:
            self.fail(chain, seq, "checkpoint of a chain without a signed chain record", location)
            return
        if state.closed:
            self.fail(chain, seq, "checkpoint after the chain was closed", location)
            return
        if seq > state.position:
            self.fail(
                chain,
                state.position + 1,
                f"the signed checkpoint covers {seq} events but "
                f"the chain ends at {state.position}: events deleted",
                location,
            )
            return
        if seq < state.position:
            self.fail(chain, seq, "checkpoint out of place (records moved)", location)
            return
        if checked["head"] != state.head:
            self.fail(
                chain,
                seq,
                "the chain does not reach the head of the signed checkpoint: "
                "events up to here were altered",
                location,
            )
            return
        state.signed, state.closed = seq, checked["closed"]
        state.checkpoints[seq] = checked["head"]
        self.checkpoints_checked += 1

    def anchor(self, record: object, location: str) -> None:
        """A signed record kept where the database cannot reach (the HSM anchor of a chain):
        the trail must hold it, and must not stand behind it."""
        if self.bad is not None:
            return
        kind = record.get("type") if isinstance(record, dict) else None
        checked = self.signed_record(record, "chain" if kind == "chain" else "checkpoint", location)
        if checked is None:
            return
        chain = checked["chain"]
        state = self.chains.get(chain)
        if state is None or state.record is None:
            self.fail(
                chain,
                checked.get("chain_sequence", 0),
                "the chain named by its HSM anchor is missing from the trail (deleted)",
                location,
            )
            return
        if kind == "chain":
            if checked != state.record:
                self.fail(chain, 0, "the chain record differs from its HSM anchor", location)
            return
        seq = checked["chain_sequence"]
        newest = max(state.checkpoints, default=0)
        if newest < seq:
            self.fail(
                chain,
                newest + 1,
                f"the HSM anchor holds checkpoint {seq} but the trail's "
                f"newest is {newest}: rolled back or truncated",
                location,
            )
        elif state.checkpoints.get(seq) != checked["head"]:
            self.fail(
                chain, seq, "the checkpoint named by the HSM anchor is missing or differs", location
            )

    def finish(self) -> Report:
        """The report of everything fed so far."""
        unsigned = sum(s.position - s.signed for s in self.chains.values())
        common = {
            "events_checked": self.events_checked,
            "chains_checked": sum(1 for s in self.chains.values() if s.record is not None),
            "checkpoints_checked": self.checkpoints_checked,
            "unsigned_events": unsigned,
            "head_hash": self.head_hash,
        }
        if self.bad is None:
            return Report(True, **common)  # type: ignore[arg-type]
        return Report(
            False,
            first_bad_chain=self.bad.chain,
            first_bad_sequence=self.bad.sequence,
            error=self.bad.error,
            location=self.bad.location,
            **common,  # type: ignore[arg-type]
        )


def _place(record: object) -> tuple[str, int]:
    """The chain and chain_sequence of a record, as far as they are well-formed."""
    chain = record.get("chain") if isinstance(record, dict) else None
    sequence = record.get("chain_sequence") if isinstance(record, dict) else None
    return (
        chain if isinstance(chain, str) else "",
        sequence if isinstance(sequence, int) and is_int(sequence) else 0,
    )
