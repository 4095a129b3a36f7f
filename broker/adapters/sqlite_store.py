"""SQLite store for key metadata, revocations, signing keys and the audit trail.

Portable SQL only (the PostgreSQL adapter uses the same schema). Durability: WAL with
`synchronous=FULL`, so a committed audit event survives power loss. Appends take the write
lock with `BEGIN IMMEDIATE`, which excludes other threads and other processes.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from broker.adapters.codec import dt_to_str, key_from_json, key_to_json, str_to_dt
from broker.domain import AuditEvent, AuditFilter, Key, Outcome
from broker.errors import (
    AlreadyExists,
    AuditUnavailable,
    ConcurrentModification,
    NotFound,
    StoreUnavailable,
)

log = logging.getLogger(__name__)

GENESIS_HASH = "0" * 64
PAGE = 1000

SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    key_id TEXT PRIMARY KEY,
    revision INTEGER NOT NULL,
    data TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS issued_tokens (
    token_id TEXT PRIMARY KEY,
    subject TEXT NOT NULL,
    key_id TEXT NOT NULL,
    expires_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS token_uses (
    token_id TEXT PRIMARY KEY,
    uses BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS revocations (
    token_id TEXT PRIMARY KEY,
    subject TEXT NOT NULL,
    expires_at TEXT NOT NULL,
    revoked_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS signing_keys (
    kid TEXT PRIMARY KEY,
    purpose TEXT NOT NULL,
    hsm TEXT NOT NULL,
    label TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_events (
    sequence BIGINT PRIMARY KEY,
    time TEXT NOT NULL,
    principal TEXT NOT NULL,
    operation TEXT NOT NULL,
    key_id TEXT NOT NULL,
    key_version BIGINT NOT NULL,
    token_id TEXT NOT NULL,
    context TEXT NOT NULL,
    justification TEXT NOT NULL,
    outcome TEXT NOT NULL,
    reason TEXT NOT NULL,
    request_id TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_events_key_id ON audit_events (key_id, sequence);
CREATE INDEX IF NOT EXISTS audit_events_principal ON audit_events (principal, sequence);
"""

_AUDIT_COLUMNS = (
    "sequence, time, principal, operation, key_id, key_version, token_id, context, "
    "justification, outcome, reason, request_id, prev_hash, hash"
)


def _row_to_event(row: tuple) -> AuditEvent:  # type: ignore[type-arg]
    time = str_to_dt(row[1])
    assert time is not None
    return AuditEvent(
        sequence=row[0],
        time=time,
        principal=row[2],
        operation=row[3],
        key_id=row[4],
        key_version=row[5],
        token_id=row[6],
        context=json.loads(row[7]),
        justification=row[8],
        outcome=Outcome(row[9]),
        reason=row[10],
        request_id=row[11],
        prev_hash=row[12],
        hash=row[13],
    )


def _event_params(e: AuditEvent) -> tuple:  # type: ignore[type-arg]
    return (
        e.sequence,
        dt_to_str(e.time),
        e.principal,
        e.operation,
        e.key_id,
        e.key_version,
        e.token_id,
        json.dumps(dict(e.context), sort_keys=True),
        e.justification,
        e.outcome.value,
        e.reason,
        e.request_id,
        e.prev_hash,
        e.hash,
    )


class SqliteStore:
    """KeyStore, RevocationStore, AuditStore and SigningKeyStore on one SQLite file."""

    def __init__(self, path: Path, busy_timeout_ms: int = 5000) -> None:
        self._path = path
        self._lock = threading.RLock()
        self._db = sqlite3.connect(
            str(path), isolation_level=None, check_same_thread=False, timeout=busy_timeout_ms / 1000
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        self._db.executescript(SCHEMA)
        path.chmod(0o600)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self, immediate: bool = False) -> Iterator[sqlite3.Cursor]:
        with self._lock:
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
            try:
                yield cur
            except BaseException:
                try:
                    cur.execute("ROLLBACK")
                except sqlite3.Error:
                    log.warning("rollback failed", exc_info=True)
                raise
            else:
                cur.execute("COMMIT")

    @contextmanager
    def _store_errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            log.error("metadata store error", extra={"error": type(exc).__name__})
            raise StoreUnavailable("the metadata store is unavailable; retry later") from exc

    # KeyStore ------------------------------------------------------------------------------

    def create_key(self, key: Key) -> None:
        with self._store_errors():
            try:
                with self._tx() as cur:
                    cur.execute(
                        "INSERT INTO keys (key_id, revision, data) VALUES (?, ?, ?)",
                        (key.key_id, key.revision, key_to_json(key)),
                    )
            except sqlite3.IntegrityError as exc:
                raise AlreadyExists(f"key {key.key_id!r} already exists") from exc

    def get_key(self, key_id: str) -> Key:
        with self._store_errors(), self._lock:
            row = self._db.execute(
                "SELECT data, revision FROM keys WHERE key_id = ?", (key_id,)
            ).fetchone()
        if row is None:
            raise NotFound(f"key {key_id!r} not found")
        return key_from_json(row[0], row[1])

    def list_keys(self, after: str, limit: int) -> list[Key]:
        with self._store_errors(), self._lock:
            rows = self._db.execute(
                "SELECT data, revision FROM keys WHERE key_id > ? ORDER BY key_id LIMIT ?",
                (after, limit),
            ).fetchall()
        return [key_from_json(d, r) for d, r in rows]

    def update_key(self, key: Key, expected_revision: int) -> Key:
        stored = key.evolve(revision=expected_revision + 1)
        with self._store_errors(), self._tx() as cur:
            cur.execute(
                "UPDATE keys SET data = ?, revision = ? WHERE key_id = ? AND revision = ?",
                (key_to_json(stored), stored.revision, key.key_id, expected_revision),
            )
            if cur.rowcount == 1:
                return stored
            exists = cur.execute("SELECT 1 FROM keys WHERE key_id = ?", (key.key_id,)).fetchone()
        if exists is None:
            raise NotFound(f"key {key.key_id!r} not found")
        raise ConcurrentModification(f"key {key.key_id!r} was changed concurrently")

    # RevocationStore -----------------------------------------------------------------------

    def record_issued(self, token_id: str, subject: str, key_id: str, expires_at: datetime) -> None:
        with self._store_errors(), self._tx() as cur:
            cur.execute(
                "INSERT INTO issued_tokens (token_id, subject, key_id, expires_at) "
                "VALUES (?, ?, ?, ?)",
                (token_id, subject, key_id, dt_to_str(expires_at)),
            )

    def issued_subject(self, token_id: str) -> str | None:
        with self._store_errors(), self._lock:
            row = self._db.execute(
                "SELECT subject FROM issued_tokens WHERE token_id = ?", (token_id,)
            ).fetchone()
        return None if row is None else str(row[0])

    def revoke(self, token_id: str, subject: str, expires_at: datetime) -> None:
        with self._store_errors(), self._tx() as cur:
            cur.execute(
                "INSERT INTO revocations (token_id, subject, expires_at, revoked_at) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (token_id) DO NOTHING",
                (token_id, subject, dt_to_str(expires_at), dt_to_str(datetime.now().astimezone())),
            )

    def is_revoked(self, token_id: str) -> bool:
        with self._store_errors(), self._lock:
            row = self._db.execute(
                "SELECT 1 FROM revocations WHERE token_id = ?", (token_id,)
            ).fetchone()
        return row is not None

    def consume_use(self, token_id: str, max_uses: int) -> bool:
        with self._store_errors(), self._tx(immediate=True) as cur:
            cur.execute(
                "INSERT INTO token_uses (token_id, uses) VALUES (?, 1) "
                "ON CONFLICT (token_id) DO UPDATE SET uses = token_uses.uses + 1 "
                "WHERE token_uses.uses < ?",
                (token_id, max_uses),
            )
            return cur.rowcount == 1

    # SigningKeyStore -----------------------------------------------------------------------

    def signing_keys(self, purpose: str) -> list[tuple[str, str, str]]:
        with self._store_errors(), self._lock:
            rows = self._db.execute(
                "SELECT kid, hsm, label FROM signing_keys WHERE purpose = ? "
                "ORDER BY created_at DESC",
                (purpose,),
            ).fetchall()
        return [(r[0], r[1], r[2]) for r in rows]

    def add_signing_key(self, purpose: str, kid: str, hsm: str, label: str) -> None:
        with self._store_errors(), self._tx() as cur:
            cur.execute(
                "INSERT INTO signing_keys (kid, purpose, hsm, label, created_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (kid, purpose, hsm, label, dt_to_str(datetime.now().astimezone())),
            )

    # AuditStore ----------------------------------------------------------------------------

    def append(self, build: Callable[[int, str], AuditEvent]) -> AuditEvent:
        try:
            with self._tx(immediate=True) as cur:
                row = cur.execute(
                    "SELECT sequence, hash FROM audit_events ORDER BY sequence DESC LIMIT 1"
                ).fetchone()
                seq, prev = (row[0] + 1, row[1]) if row else (1, GENESIS_HASH)
                event = build(seq, prev)
                cur.execute(  # the column list is a constant
                    f"INSERT INTO audit_events ({_AUDIT_COLUMNS}) "  # noqa: S608
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    _event_params(event),
                )
        except sqlite3.Error as exc:
            log.error("audit append failed", extra={"error": type(exc).__name__})
            raise AuditUnavailable(
                "the audit log cannot be written; the call was refused (fail closed)"
            ) from exc
        return event

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
        if flt.start_time is not None:
            where.append("time >= ?")
            params.append(dt_to_str(flt.start_time))
        if flt.end_time is not None:
            where.append("time < ?")
            params.append(dt_to_str(flt.end_time))
        yield from self._paged(where, params, flt.after_sequence, flt.limit)

    def all_events(self) -> Iterator[AuditEvent]:
        yield from self._paged([], [], 0, 0)

    def _paged(
        self, where: list[str], params: list[object], after: int, limit: int
    ) -> Iterator[AuditEvent]:
        # Pages of PAGE rows by sequence, each read under the lock; the generator yields
        # without holding it, so a slow stream reader never blocks writers, and memory stays
        # bounded however long the trail is.
        conditions = " AND ".join(["sequence > ?", *where])
        sql = (
            f"SELECT {_AUDIT_COLUMNS} FROM audit_events WHERE {conditions} "  # noqa: S608
            "ORDER BY sequence LIMIT ?"
        )
        remaining = limit or None
        while True:
            size = min(PAGE, remaining) if remaining else PAGE
            with self._store_errors(), self._lock:
                rows = self._db.execute(sql, [after, *params, size]).fetchall()
            for row in rows:
                yield _row_to_event(row)
            if remaining:
                remaining -= len(rows)
            if len(rows) < size or remaining == 0:
                return
            after = rows[-1][0]
