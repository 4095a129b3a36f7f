"""What the SQLite and PostgreSQL stores share: the audit tables' columns and statements, the
conversion between rows and records, the listing filter, and the parsed-key cache.

Statements are written with `?` markers (SQLite's); `postgres()` turns them into psycopg's
`%s`. Both schemas give every column the same name and kind (migrations/), so one statement
serves both.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import suppress
from typing import Any

from keybroker_client import evidence

from broker.adapters.codec import key_from_json
from broker.domain import AuditEvent, AuditFilter, Key, Outcome, context_json, format_time
from broker.ports import Record

log = logging.getLogger(__name__)

#: Rows per page when listing events.
PAGE = 1000
#: Parsed keys kept at most (the cache starts over when full).
MAX_CACHED_KEYS = 10_000

AUDIT_COLUMNS = (
    "sequence", "chain", "chain_sequence", "time", "principal", "operation", "key_id",
    "key_version", "token_id", "context", "justification", "outcome", "reason", "request_id",
    "prev_hash", "hash",
)  # fmt: skip
SELECT_EVENTS = f"SELECT {', '.join(AUDIT_COLUMNS)} FROM audit_events"  # noqa: S608 - constant
INSERT_EVENT = (
    f"INSERT INTO audit_events ({', '.join(AUDIT_COLUMNS[1:])}) "  # noqa: S608 - constant
    f"VALUES ({', '.join('?' * (len(AUDIT_COLUMNS) - 1))})"
)
INSERT_CHAIN = "INSERT INTO audit_chains (chain, writer, time, jws) VALUES (?, ?, ?, ?)"
INSERT_CHECKPOINT = (
    "INSERT INTO audit_checkpoints (chain, chain_sequence, head, time, closed, jws) "
    "VALUES (?, ?, ?, ?, ?, ?)"
)
SELECT_CHECKPOINTS = (
    "SELECT chain, chain_sequence, head, time, closed, jws FROM audit_checkpoints ORDER BY id"
)
SELECT_EVENTS_AFTER = f"{SELECT_EVENTS} WHERE sequence > ? ORDER BY sequence"
SELECT_EVENT_CHAINS = (
    "SELECT chain FROM audit_events WHERE sequence > ? GROUP BY chain ORDER BY MIN(sequence)"
)
SELECT_LAST_SEQUENCE = "SELECT MAX(sequence) FROM audit_events"

AUDIT_UNAVAILABLE = "the audit log cannot be written; the call was refused (fail closed)"
AUDIT_UNREADABLE = "the audit log cannot be read; retry later"
STORE_UNAVAILABLE = "the metadata store is unavailable; retry later"
#: `RevocationStore.revoked_and_key` in one statement: the row exists even when the key does
#: not, so a revoked token is told apart from an unknown key.
REVOKED_AND_KEY = (
    "SELECT EXISTS (SELECT 1 FROM revocations WHERE token_id = ?), k.data, k.revision "
    "FROM (SELECT 1 AS one) AS probe LEFT JOIN keys AS k ON k.key_id = ?"
)


def postgres(statement: str) -> str:
    """A statement with psycopg's parameter markers (no statement here holds a `?` or `%`
    of its own)."""
    return statement.replace("?", "%s")


def without_nul(params: Sequence[Any]) -> list[Any]:
    """Read parameters PostgreSQL can take: its text holds no NUL, so no stored value has one,
    and a NUL in a looked-up value (a hostile key id, token id or filter) becomes U+FFFD, as
    the audit trail records it, instead of failing the read as if the database were down."""
    return [p.replace("\x00", "\ufffd") if isinstance(p, str) else p for p in params]


def event_params(e: AuditEvent) -> tuple[Any, ...]:
    """The column values of an event (without `sequence`, which the store assigns). The
    context is its canonical JSON and the time its record form, both as the event hash
    covers them (`domain.context_json`, `domain.format_time`: the time was just formatted for
    the hash and comes from a cache)."""
    return (
        e.chain, e.chain_sequence, format_time(e.time), e.principal, e.operation,
        e.key_id, e.key_version, e.token_id, context_json(e.context), e.justification,
        e.outcome.value,
        e.reason, e.request_id, e.prev_hash, e.hash,
    )  # fmt: skip


def chain_params(record: Record) -> tuple[Any, ...]:
    return (record["chain"], record["writer"], record["time"], record["jws"])


def checkpoint_params(record: Record) -> tuple[Any, ...]:
    return (
        record["chain"],
        record["chain_sequence"],
        record["head"],
        record["time"],
        int(record["closed"]),
        record["jws"],
    )


def row_record(row: Sequence[Any]) -> Record:
    """An event row as its record (evidence form), as stored: nothing is repaired. A context
    that is not valid JSON stays the stored string, which the verifier reports."""
    record: Record = dict(zip(AUDIT_COLUMNS, row, strict=True))
    record["type"] = "event"
    text = record["context"]
    if isinstance(text, str):
        with suppress(ValueError):  # left as stored: the verifier names it malformed
            record["context"] = json.loads(text)
    return record


def record_event(record: Record) -> AuditEvent:
    """The event of a well-formed record (`evidence.event_problem(record)` is "")."""
    return AuditEvent(
        sequence=record["sequence"],
        time=evidence.parse_time(record["time"]),
        principal=record["principal"],
        operation=record["operation"],
        key_id=record["key_id"],
        key_version=record["key_version"],
        token_id=record["token_id"],
        context=record["context"],
        justification=record["justification"],
        outcome=Outcome(record["outcome"]),
        reason=record["reason"],
        request_id=record["request_id"],
        prev_hash=record["prev_hash"],
        hash=record["hash"],
        chain=record["chain"],
        chain_sequence=record["chain_sequence"],
    )


def chain_record(row: Sequence[Any]) -> Record:
    chain, writer, time, jws = row
    return {"type": "chain", "chain": chain, "writer": writer, "time": time, "jws": jws}


def checkpoint_record(row: Sequence[Any]) -> Record:
    chain, chain_sequence, head, time, closed, jws = row
    if closed in (0, 1) and not isinstance(closed, bool):
        closed = bool(closed)
    return {
        "type": "checkpoint", "chain": chain, "chain_sequence": chain_sequence, "head": head,
        "time": time, "closed": closed, "jws": jws,
    }  # fmt: skip


def event_filter(flt: AuditFilter) -> tuple[list[str], list[object]]:
    """The conditions (with `?` markers) and parameters of a listing, besides the sequence."""
    where: list[str] = []
    params: list[object] = []
    for column, value in (
        ("key_id", flt.key_id),
        ("principal", flt.principal),
        ("operation", flt.operation),
    ):
        if value:
            where.append(f"{column} = ?")
            params.append(value)
    # Stored times have one fixed-width form, so text order is time order.
    if flt.start_time is not None:
        where.append("time >= ?")
        params.append(evidence.format_time(flt.start_time))
    if flt.end_time is not None:
        where.append("time < ?")
        params.append(evidence.format_time(flt.end_time))
    return where, params


def page_query(where: Sequence[str]) -> str:
    """The statement of one page: parameters are (after, *filter, page size)."""
    conditions = " AND ".join(["sequence > ?", *where])
    return f"{SELECT_EVENTS} WHERE {conditions} ORDER BY sequence LIMIT ?"


def paged(
    fetch: Callable[[int, int], Sequence[Sequence[Any]]], after: int, limit: int
) -> Iterator[Record]:
    """Records page by page: `fetch(after, size)` reads up to `size` rows past `after`.

    The caller's `fetch` holds its connection only while it reads one page; the generator
    yields without holding anything, so a slow stream reader never blocks anyone, and memory
    stays bounded however long the trail is.
    """
    remaining = limit or None
    while True:
        size = min(PAGE, remaining) if remaining else PAGE
        rows = fetch(after, size)
        for row in rows:
            yield row_record(row)
        if remaining:
            remaining -= len(rows)
        if len(rows) < size or remaining == 0:
            return
        after = rows[-1][0]


def listed_events(records: Iterator[Record]) -> Iterator[AuditEvent]:
    """The events of well-formed records; a damaged row is skipped and logged (listing goes on
    past it; VerifyAuditLog reports it)."""
    for record in records:
        problem = evidence.event_problem(record)
        if problem:
            log.warning(
                "damaged audit row skipped",
                extra={"sequence": record.get("sequence"), "problem": problem},
            )
            continue
        yield record_event(record)


class KeyCache:
    """Parsed keys by revision: a read fetches the stored revision and text with the row and
    parses the JSON again only when either changed, so a policy change or a disabled key is
    seen by the very next call, in every process; even a row rewritten behind the broker's
    back is never answered from a stale parse."""

    def __init__(self) -> None:
        self._keys: dict[str, tuple[int, str, Key]] = {}

    def parsed(self, key_id: str, data: str, revision: int) -> Key:
        cached = self._keys.get(key_id)
        if cached is not None and cached[0] == revision and cached[1] == data:
            return cached[2]
        key = key_from_json(data, revision)
        if len(self._keys) >= MAX_CACHED_KEYS:
            self._keys.clear()
        self._keys[key_id] = (revision, data, key)
        return key
