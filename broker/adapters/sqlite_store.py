"""SQLite store for key metadata, revocations, signing keys and the audit trail.

Portable SQL only (the PostgreSQL adapter uses the same schema). Durability: WAL with
`synchronous=FULL`, so a committed audit event survives power loss. The audit tables are in
`sqlite_audit`.

Reads never wait behind a write: each thread reads on a connection of its own (WAL lets
readers run beside the one writer, whose commit may be waiting on an fsync), while writes share
one connection under a lock, each in a `BEGIN IMMEDIATE` transaction (`begin_immediate`).
Parsed keys are kept by revision: a read fetches the stored revision with the row and parses
the JSON again only when it changed, so a policy change or a disabled key is seen by the very
next call, in every process.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from broker.adapters.codec import dt_to_str, key_from_json, key_to_json
from broker.adapters.migrations import SQLITE, migrate
from broker.adapters.sql_common import REVOKED_AND_KEY
from broker.adapters.sqlite_approvals import SqliteApprovals
from broker.adapters.sqlite_audit import (
    SqliteAudit,
    begin_immediate,
    connect,
    set_aside_legacy_audit_table,
    sqlite_error,
    writing,
)
from broker.adapters.sqlite_file import check_file
from broker.domain import Key
from broker.errors import (
    AlreadyExists,
    ConcurrentModification,
    NotFound,
    StoreUnavailable,
)

log = logging.getLogger(__name__)

#: Parsed keys kept at most (the cache starts over when full).
MAX_CACHED_KEYS = 10_000


class SqliteStore(SqliteAudit, SqliteApprovals):
    """KeyStore, RevocationStore, AuditStore (see `SqliteAudit`), ApprovalStore (see
    `SqliteApprovals`) and SigningKeyStore on one SQLite file."""

    def __init__(self, path: Path, busy_timeout_ms: int = 5000) -> None:
        self._path = path
        self._busy_timeout_ms = busy_timeout_ms
        self._lock = threading.RLock()
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._keys: dict[str, tuple[int, str, Key]] = {}
        check_file(path)  # a cut-short or appended-to file is refused, never repaired
        try:
            self._db = connect(path, busy_timeout_ms)
            migrate(self._db, SQLITE, before=set_aside_legacy_audit_table)  # migrations/sqlite
            writing(self._db)  # from now on it only writes; migrations wait as SQLite does
        except sqlite3.DatabaseError as exc:
            raise StoreUnavailable(
                f"the database {path} cannot be used ({sqlite_error(exc)}: {exc}); it was "
                "left as it is"
            ) from exc
        path.chmod(0o600)
        super().__init__(path, busy_timeout_ms)

    def close(self) -> None:
        self.close_audit()
        with self._readers_lock:
            readers, self._readers = self._readers, []
        for reader in readers:
            reader.close()
        with self._lock:
            self._db.close()

    def check(self) -> None:
        """Liveness probe for health: opens the database file afresh and reads its schema.

        A fresh connection, not an open one: an open connection keeps working on a file that
        was moved, deleted or made unreadable, while each new thread's read connection would
        fail. `mode=rw` never creates a missing file.

        Raises:
            StoreUnavailable: the database cannot be opened or read.
        """
        uri = f"{self._path.absolute().as_uri()}?mode=rw"
        try:
            db = sqlite3.connect(uri, uri=True, timeout=self._busy_timeout_ms / 1000)
            try:
                db.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
            finally:
                db.close()
        except sqlite3.Error as exc:
            raise StoreUnavailable(
                f"the metadata store cannot be read ({type(exc).__name__}); retry later"
            ) from exc

    def _read(self) -> sqlite3.Connection:
        """This thread's read connection (opened on first use)."""
        reader: sqlite3.Connection | None = getattr(self._local, "reader", None)
        if reader is None:
            reader = connect(self._path, self._busy_timeout_ms)
            with self._readers_lock:
                self._readers.append(reader)
            self._local.reader = reader
        return reader

    def _parsed(self, key_id: str, data: str, revision: int) -> Key:
        """The key stored as `data` at `revision`, parsed once for as long as it is unchanged.

        The cache is checked against the stored text itself, not only the revision, so even a
        row rewritten behind the broker's back is never answered from a stale parse.
        """
        cached = self._keys.get(key_id)
        if cached is not None and cached[0] == revision and cached[1] == data:
            return cached[2]
        key = key_from_json(data, revision)
        if len(self._keys) >= MAX_CACHED_KEYS:
            self._keys.clear()
        self._keys[key_id] = (revision, data, key)
        return key

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Cursor]:
        """A write transaction on the writing connection (see `begin_immediate`)."""
        with self._lock:
            cur = self._db.cursor()
            begin_immediate(cur, self._busy_timeout_ms)
            try:
                yield cur
            except BaseException:
                if self._db.in_transaction:  # a failed COMMIT may have rolled back already
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
            log.error("metadata store error", extra={"error": sqlite_error(exc)})
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
        with self._store_errors():
            row = (
                self._read()
                .execute("SELECT data, revision FROM keys WHERE key_id = ?", (key_id,))
                .fetchone()
            )
        if row is None:
            raise NotFound(f"key {key_id!r} not found")
        return self._parsed(key_id, row[0], row[1])

    def list_keys(self, after: str, limit: int) -> list[Key]:
        with self._store_errors():
            rows = (
                self._read()
                .execute(
                    "SELECT key_id, data, revision FROM keys WHERE key_id > ? "
                    "ORDER BY key_id LIMIT ?",
                    (after, limit),
                )
                .fetchall()
            )
        return [self._parsed(k, d, r) for k, d, r in rows]

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
        with self._store_errors():
            row = (
                self._read()
                .execute("SELECT subject FROM issued_tokens WHERE token_id = ?", (token_id,))
                .fetchone()
            )
        return None if row is None else str(row[0])

    def revoke(self, token_id: str, subject: str, expires_at: datetime) -> None:
        with self._store_errors(), self._tx() as cur:
            cur.execute(
                "INSERT INTO revocations (token_id, subject, expires_at, revoked_at) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (token_id) DO NOTHING",
                (token_id, subject, dt_to_str(expires_at), dt_to_str(datetime.now().astimezone())),
            )

    def is_revoked(self, token_id: str) -> bool:
        with self._store_errors():
            row = (
                self._read()
                .execute("SELECT 1 FROM revocations WHERE token_id = ?", (token_id,))
                .fetchone()
            )
        return row is not None

    def revoked_and_key(self, token_id: str, key_id: str) -> tuple[bool, Key | None]:
        with self._store_errors():
            row = self._read().execute(REVOKED_AND_KEY, (token_id, key_id)).fetchone()
        key = None if row[1] is None else self._parsed(key_id, row[1], row[2])
        return bool(row[0]), key

    def consume_use(self, token_id: str, max_uses: int) -> bool:
        with self._store_errors(), self._tx() as cur:
            cur.execute(
                "INSERT INTO token_uses (token_id, uses) VALUES (?, 1) "
                "ON CONFLICT (token_id) DO UPDATE SET uses = token_uses.uses + 1 "
                "WHERE token_uses.uses < ?",
                (token_id, max_uses),
            )
            return cur.rowcount == 1

    # SigningKeyStore -----------------------------------------------------------------------

    def signing_keys(self, purpose: str) -> list[tuple[str, str, str]]:
        with self._store_errors():
            rows = (
                self._read()
                .execute(
                    "SELECT kid, hsm, label FROM signing_keys WHERE purpose = ? "
                    "ORDER BY created_at DESC",
                    (purpose,),
                )
                .fetchall()
            )
        return [(r[0], r[1], r[2]) for r in rows]

    def add_signing_key(self, purpose: str, kid: str, hsm: str, label: str) -> None:
        with self._store_errors(), self._tx() as cur:
            cur.execute(
                "INSERT INTO signing_keys (kid, purpose, hsm, label, created_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (kid, purpose, hsm, label, dt_to_str(datetime.now().astimezone())),
            )
