"""The audit tables on SQLite: events, chain records, checkpoints (the `AuditStore` port).

Connections: appends go through a writer connection of their own, chain records and
checkpoints through another, listings through a reader connection and every verification or
export through a fresh connection holding one read transaction (WAL: readers never wait for
the writer, and see one consistent state). The only lock an append holds across its fsync is
the database's write transaction (`BEGIN IMMEDIATE`), shared with other processes.

Waiting for that lock: a connection that writes asks for it every half millisecond until its
busy timeout has passed (`begin_immediate`), instead of leaving the wait to SQLite's busy
handler, which sleeps 1, 2, 5, 10 ... up to 100 ms between attempts. With two workers
committing every few milliseconds, that handler let a waiting writer sleep past many free
moments: some audit commits took 0.25 to 1 s, and Decrypt's p99 at 64 in flight was 788 ms
against 91 ms with one worker (docs/benchmarks.md).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from broker.adapters.sql_common import (
    AUDIT_UNAVAILABLE,
    AUDIT_UNREADABLE,
    INSERT_CHAIN,
    INSERT_CHECKPOINT,
    INSERT_EVENT,
    SELECT_CHECKPOINTS,
    SELECT_EVENT_CHAINS,
    SELECT_EVENTS_AFTER,
    SELECT_LAST_SEQUENCE,
    chain_params,
    chain_record,
    checkpoint_params,
    checkpoint_record,
    event_filter,
    event_params,
    listed_events,
    page_query,
    paged,
    row_record,
)
from broker.domain import AuditEvent, AuditFilter
from broker.errors import AuditUnavailable
from broker.ports import Record

__all__ = [
    "SqliteAudit",
    "SqliteSnapshot",
    "begin_immediate",
    "connect",
    "reading",
    "row_record",
    "sqlite_error",
    "writing",
]

log = logging.getLogger(__name__)


def connect(path: Path, busy_timeout_ms: int) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), WAL, synchronous=FULL."""
    db = sqlite3.connect(
        str(path), isolation_level=None, check_same_thread=False, timeout=busy_timeout_ms / 1000
    )
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
    return db


#: Seconds between two attempts at the write lock while another connection holds it.
WRITE_LOCK_POLL_S = 0.0005


def writing(db: sqlite3.Connection) -> sqlite3.Connection:
    """`db` set to answer SQLITE_BUSY at once, for `begin_immediate` to retry: only for a
    connection that runs write transactions and nothing else (a read would not be retried)."""
    db.execute("PRAGMA busy_timeout=0")
    return db


def begin_immediate(cur: sqlite3.Cursor, busy_timeout_ms: int) -> None:
    """Starts a write transaction on a `writing` connection, waiting up to `busy_timeout_ms`
    for another connection's (of any process) to end, and asking again every
    `WRITE_LOCK_POLL_S`.

    Raises:
        sqlite3.OperationalError: the database stayed locked (SQLITE_BUSY) for that long, or
            another error.
    """
    deadline = time.monotonic() + busy_timeout_ms / 1000
    while True:
        try:
            cur.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as exc:
            busy = getattr(exc, "sqlite_errorcode", 0) & 0xFF == sqlite3.SQLITE_BUSY
            if not busy or time.monotonic() >= deadline:
                raise
        time.sleep(WRITE_LOCK_POLL_S)


def reading(db: sqlite3.Connection) -> sqlite3.Connection:
    """`db` set to read text as stored: bytes that are not UTF-8 (an insider's doing) become
    a string the verifier reports as malformed, instead of an error that stops the read."""
    db.text_factory = lambda raw: raw.decode("utf-8", "surrogateescape")
    return db


def set_aside_legacy_audit_table(db: sqlite3.Connection) -> None:
    """Renames an audit table of the format before chains and checkpoints to
    `audit_events_v0` (its events cannot be verified under the new rule), so that the
    migrations create the table anew. Runs inside the migration transaction."""
    columns = [row[1] for row in db.execute("PRAGMA table_info(audit_events)")]
    if columns and "chain" not in columns:
        db.execute("ALTER TABLE audit_events RENAME TO audit_events_v0")
        log.warning(
            "the audit table had the format before chains and signed checkpoints: kept as "
            "audit_events_v0, not verified; the trail starts anew"
        )


class SqliteSnapshot:
    """`AuditSnapshot` on one connection inside one read transaction."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def chains(self) -> list[Record]:
        rows = self._db.execute("SELECT chain, writer, time, jws FROM audit_chains ORDER BY rowid")
        return [chain_record(row) for row in rows]

    def checkpoints(self) -> list[Record]:
        return [checkpoint_record(row) for row in self._db.execute(SELECT_CHECKPOINTS)]

    def events(self, after_sequence: int = 0) -> Iterator[Record]:
        try:
            for row in self._db.execute(SELECT_EVENTS_AFTER, (after_sequence,)):
                yield row_record(row)
        except sqlite3.Error as exc:
            raise AuditUnavailable(AUDIT_UNREADABLE) from exc

    def event_chains(self, after_sequence: int = 0) -> list[str]:
        rows = self._db.execute(SELECT_EVENT_CHAINS, (after_sequence,))
        return [str(r[0]) for r in rows]

    def last_sequence(self) -> int:
        row = self._db.execute(SELECT_LAST_SEQUENCE).fetchone()
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
        self._writer = writing(connect(path, busy_timeout_ms))
        self._side = writing(connect(path, busy_timeout_ms))
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
                begin_immediate(cur, self._busy_ms)
                try:
                    sequences = []
                    for event in events:
                        cur.execute(INSERT_EVENT, event_params(event))
                        sequences.append(int(cur.lastrowid or 0))
                    cur.execute("COMMIT")
                except BaseException:
                    _rollback(cur)
                    raise
        except sqlite3.Error as exc:
            log.error("audit append failed", extra={"error": sqlite_error(exc)})
            raise AuditUnavailable(AUDIT_UNAVAILABLE) from exc
        return sequences

    def add_chain(self, record: Record) -> None:
        self._side_write(INSERT_CHAIN, chain_params(record))

    def add_checkpoint(self, record: Record) -> None:
        self._side_write(INSERT_CHECKPOINT, checkpoint_params(record))

    def _side_write(self, sql: str, params: tuple[Any, ...]) -> None:
        try:
            with self._side_lock:
                cur = self._side.cursor()
                begin_immediate(cur, self._busy_ms)
                try:
                    cur.execute(sql, params)
                    cur.execute("COMMIT")
                except BaseException:
                    _rollback(cur)
                    raise
        except sqlite3.Error as exc:
            log.error("audit record write failed", extra={"error": sqlite_error(exc)})
            raise AuditUnavailable("the audit log cannot be written; retry later") from exc

    @contextmanager
    def snapshot(self) -> Iterator[SqliteSnapshot]:
        try:
            db = reading(connect(self._audit_path, self._busy_ms))
            db.execute("BEGIN")
        except sqlite3.Error as exc:
            raise AuditUnavailable(AUDIT_UNREADABLE) from exc
        try:
            yield SqliteSnapshot(db)
        except sqlite3.Error as exc:
            raise AuditUnavailable(AUDIT_UNREADABLE) from exc
        finally:
            with suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            db.close()

    def events(self, flt: AuditFilter) -> Iterator[AuditEvent]:
        where, params = event_filter(flt)
        sql = page_query(where)

        def fetch(after: int, size: int) -> list[Any]:
            # Each page under the reader's lock; see `paged` for why it is not held longer.
            try:
                with self._read_lock:
                    return self._reader.execute(sql, [after, *params, size]).fetchall()
            except sqlite3.Error as exc:
                log.error("audit read failed", extra={"error": type(exc).__name__})
                raise AuditUnavailable(AUDIT_UNREADABLE) from exc

        return listed_events(paged(fetch, flt.after_sequence, flt.limit))


def sqlite_error(exc: BaseException) -> str:
    """What failed, for the log: SQLite's code name (SQLITE_FULL, SQLITE_IOERR_FSYNC,
    SQLITE_BUSY...), never the statement's parameters."""
    name = getattr(exc, "sqlite_errorname", None)
    return str(name) if name else type(exc).__name__


def _rollback(cur: sqlite3.Cursor) -> None:
    if not cur.connection.in_transaction:
        return  # SQLite already rolled back (a failed COMMIT on a full disk or an I/O error)
    try:
        cur.execute("ROLLBACK")
    except sqlite3.Error:
        log.warning("rollback failed", exc_info=True)
