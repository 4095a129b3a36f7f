"""The audit tables on SQLite: events, chain records, checkpoints (the `AuditStore` port).

Connections: appends go through a writer connection of their own, chain records and
checkpoints through another, listings through a reader connection and every verification or
export through a fresh connection holding one read transaction (WAL: readers never wait for
the writer, and see one consistent state). The only lock an append holds across its fsync is
the database's write transaction (`BEGIN IMMEDIATE`), shared with other processes.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from keybroker_client import evidence

from broker.domain import AuditEvent, AuditFilter, Outcome
from broker.errors import AuditUnavailable
from broker.ports import Record

log = logging.getLogger(__name__)

PAGE = 1000

AUDIT_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit_events (
    sequence INTEGER PRIMARY KEY AUTOINCREMENT,
    chain TEXT NOT NULL,
    chain_sequence INTEGER NOT NULL,
    time TEXT NOT NULL,
    principal TEXT NOT NULL,
    operation TEXT NOT NULL,
    key_id TEXT NOT NULL,
    key_version INTEGER NOT NULL,
    token_id TEXT NOT NULL,
    context TEXT NOT NULL,
    justification TEXT NOT NULL,
    outcome TEXT NOT NULL,
    reason TEXT NOT NULL,
    request_id TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS audit_events_by_chain ON audit_events (chain, chain_sequence);
CREATE INDEX IF NOT EXISTS audit_events_by_key ON audit_events (key_id, sequence);
CREATE INDEX IF NOT EXISTS audit_events_by_principal ON audit_events (principal, sequence);
CREATE TABLE IF NOT EXISTS audit_chains (
    chain TEXT PRIMARY KEY,
    writer TEXT NOT NULL,
    time TEXT NOT NULL,
    jws TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_checkpoints (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    chain TEXT NOT NULL,
    chain_sequence INTEGER NOT NULL,
    head TEXT NOT NULL,
    time TEXT NOT NULL,
    closed INTEGER NOT NULL,
    jws TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_checkpoints_by_chain ON audit_checkpoints (chain, chain_sequence);
"""

_COLUMNS = (
    "sequence", "chain", "chain_sequence", "time", "principal", "operation", "key_id",
    "key_version", "token_id", "context", "justification", "outcome", "reason", "request_id",
    "prev_hash", "hash",
)  # fmt: skip
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM audit_events"  # noqa: S608 - constant
_INSERT = (
    f"INSERT INTO audit_events ({', '.join(_COLUMNS[1:])}) "  # noqa: S608 - constant
    f"VALUES ({', '.join('?' * (len(_COLUMNS) - 1))})"
)
_UNAVAILABLE = "the audit log cannot be written; the call was refused (fail closed)"


def connect(path: Path, busy_timeout_ms: int) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), WAL, synchronous=FULL."""
    db = sqlite3.connect(
        str(path), isolation_level=None, check_same_thread=False, timeout=busy_timeout_ms / 1000
    )
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
    return db


def reading(db: sqlite3.Connection) -> sqlite3.Connection:
    """`db` set to read text as stored: bytes that are not UTF-8 (an insider's doing) become
    a string the verifier reports as malformed, instead of an error that stops the read."""
    db.text_factory = lambda raw: raw.decode("utf-8", "surrogateescape")
    return db


def create_audit_tables(db: sqlite3.Connection) -> None:
    """Creates the audit tables; an audit table of the format before chains and checkpoints
    is kept, renamed `audit_events_v0` (its events cannot be verified under the new rule)."""
    columns = [row[1] for row in db.execute("PRAGMA table_info(audit_events)")]
    if columns and "chain" not in columns:
        db.execute("ALTER TABLE audit_events RENAME TO audit_events_v0")
        log.warning(
            "the audit table had the format before chains and signed checkpoints: kept as "
            "audit_events_v0, not verified; the trail starts anew"
        )
    db.executescript(AUDIT_SCHEMA)


def event_params(e: AuditEvent) -> tuple[Any, ...]:
    """The column values of an event (without `sequence`, which the store assigns)."""
    context = json.dumps(dict(e.context), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return (
        e.chain, e.chain_sequence, evidence.format_time(e.time), e.principal, e.operation,
        e.key_id, e.key_version, e.token_id, context, e.justification, e.outcome.value,
        e.reason, e.request_id, e.prev_hash, e.hash,
    )  # fmt: skip


def row_record(row: Sequence[Any]) -> Record:
    """An event row as its record (evidence form), as stored: nothing is repaired. A context
    that is not valid JSON stays the stored string, which the verifier reports."""
    record: Record = dict(zip(_COLUMNS, row, strict=True))
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


def _checkpoint_record(row: Sequence[Any]) -> Record:
    chain, chain_sequence, head, time, closed, jws = row
    if closed in (0, 1) and not isinstance(closed, bool):
        closed = bool(closed)
    return {
        "type": "checkpoint", "chain": chain, "chain_sequence": chain_sequence, "head": head,
        "time": time, "closed": closed, "jws": jws,
    }  # fmt: skip


class SqliteSnapshot:
    """`AuditSnapshot` on one connection inside one read transaction."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def chains(self) -> list[Record]:
        rows = self._db.execute("SELECT chain, writer, time, jws FROM audit_chains ORDER BY rowid")
        return [
            {"type": "chain", "chain": c, "writer": w, "time": t, "jws": j} for c, w, t, j in rows
        ]

    def checkpoints(self) -> list[Record]:
        rows = self._db.execute(
            "SELECT chain, chain_sequence, head, time, closed, jws FROM audit_checkpoints "
            "ORDER BY id"
        )
        return [_checkpoint_record(row) for row in rows]

    def events(self, after_sequence: int = 0) -> Iterator[Record]:
        try:
            cursor = self._db.execute(
                f"{_SELECT} WHERE sequence > ? ORDER BY sequence", (after_sequence,)
            )
            for row in cursor:
                yield row_record(row)
        except sqlite3.Error as exc:
            raise AuditUnavailable("the audit log cannot be read; retry later") from exc

    def event_chains(self, after_sequence: int = 0) -> list[str]:
        rows = self._db.execute(
            "SELECT chain FROM audit_events WHERE sequence > ? GROUP BY chain "
            "ORDER BY MIN(sequence)",
            (after_sequence,),
        )
        return [str(r[0]) for r in rows]

    def last_sequence(self) -> int:
        row = self._db.execute("SELECT MAX(sequence) FROM audit_events").fetchone()
        return int(row[0] or 0)


class SqliteAudit:
    """The audit half of `SqliteStore` (a mixin: the store opens the file first).

    Args:
        path: the database file.
        busy_timeout_ms: how long a write waits for another writer's transaction.
    """

    def __init__(self, path: Path, busy_timeout_ms: int) -> None:
        self._audit_path = path
        self._busy_ms = busy_timeout_ms
        self._writer = connect(path, busy_timeout_ms)
        self._side = connect(path, busy_timeout_ms)
        self._reader = reading(connect(path, busy_timeout_ms))
        # Each guards one connection (a sqlite3 connection serves one thread at a time).
        self._write_lock = threading.Lock()
        self._side_lock = threading.Lock()
        self._read_lock = threading.Lock()

    def close_audit(self) -> None:
        for lock, db in (
            (self._write_lock, self._writer),
            (self._side_lock, self._side),
            (self._read_lock, self._reader),
        ):
            with lock:
                db.close()

    def append_batch(self, events: Sequence[AuditEvent]) -> list[int]:
        try:
            with self._write_lock:
                cur = self._writer.cursor()
                cur.execute("BEGIN IMMEDIATE")
                try:
                    sequences = []
                    for event in events:
                        cur.execute(_INSERT, event_params(event))
                        sequences.append(int(cur.lastrowid or 0))
                    cur.execute("COMMIT")
                except BaseException:
                    _rollback(cur)
                    raise
        except sqlite3.Error as exc:
            log.error("audit append failed", extra={"error": type(exc).__name__})
            raise AuditUnavailable(_UNAVAILABLE) from exc
        return sequences

    def add_chain(self, record: Record) -> None:
        self._side_write(
            "INSERT INTO audit_chains (chain, writer, time, jws) VALUES (?, ?, ?, ?)",
            (record["chain"], record["writer"], record["time"], record["jws"]),
        )

    def add_checkpoint(self, record: Record) -> None:
        self._side_write(
            "INSERT INTO audit_checkpoints (chain, chain_sequence, head, time, closed, jws) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (
                record["chain"],
                record["chain_sequence"],
                record["head"],
                record["time"],
                int(record["closed"]),
                record["jws"],
            ),
        )

    def _side_write(self, sql: str, params: tuple[Any, ...]) -> None:
        try:
            with self._side_lock:
                cur = self._side.cursor()
                cur.execute("BEGIN IMMEDIATE")
                try:
                    cur.execute(sql, params)
                    cur.execute("COMMIT")
                except BaseException:
                    _rollback(cur)
                    raise
        except sqlite3.Error as exc:
            log.error("audit record write failed", extra={"error": type(exc).__name__})
            raise AuditUnavailable("the audit log cannot be written; retry later") from exc

    @contextmanager
    def snapshot(self) -> Iterator[SqliteSnapshot]:
        try:
            db = reading(connect(self._audit_path, self._busy_ms))
            db.execute("BEGIN")
        except sqlite3.Error as exc:
            raise AuditUnavailable("the audit log cannot be read; retry later") from exc
        try:
            yield SqliteSnapshot(db)
        except sqlite3.Error as exc:
            raise AuditUnavailable("the audit log cannot be read; retry later") from exc
        finally:
            with suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            db.close()

    def events(self, flt: AuditFilter) -> Iterator[AuditEvent]:
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
        for record in self._paged(where, params, flt.after_sequence, flt.limit):
            problem = evidence.event_problem(record)
            if problem:
                # Listing goes on past a damaged row; VerifyAuditLog reports it.
                log.warning(
                    "damaged audit row skipped",
                    extra={"sequence": record.get("sequence"), "problem": problem},
                )
                continue
            yield record_event(record)

    def _paged(
        self, where: list[str], params: list[object], after: int, limit: int
    ) -> Iterator[Record]:
        # Pages of PAGE rows by sequence, each read under the reader's lock; the generator
        # yields without holding it, so a slow stream reader never blocks anyone, and memory
        # stays bounded however long the trail is.
        conditions = " AND ".join(["sequence > ?", *where])
        sql = f"{_SELECT} WHERE {conditions} ORDER BY sequence LIMIT ?"
        remaining = limit or None
        while True:
            size = min(PAGE, remaining) if remaining else PAGE
            try:
                with self._read_lock:
                    rows = self._reader.execute(sql, [after, *params, size]).fetchall()
            except sqlite3.Error as exc:
                log.error("audit read failed", extra={"error": type(exc).__name__})
                raise AuditUnavailable("the audit log cannot be read; retry later") from exc
            for row in rows:
                yield row_record(row)
            if remaining:
                remaining -= len(rows)
            if len(rows) < size or remaining == 0:
                return
            after = rows[-1][0]


def _rollback(cur: sqlite3.Cursor) -> None:
    try:
        cur.execute("ROLLBACK")
    except sqlite3.Error:
        log.warning("rollback failed", exc_info=True)
