"""PostgreSQL store for key metadata, revocations, signing keys and the audit trail, shared by
every replica of the broker (the audit tables are in `postgres_audit`).

The same tables and statements as the SQLite store (`sql_common`, `migrations/`), through a
psycopg connection pool. Connections run in autocommit: a single statement is its own
transaction, and the few writes that need more open one explicitly. A use limit is counted in
one `INSERT ... ON CONFLICT DO UPDATE ... WHERE`, which PostgreSQL runs atomically against
concurrent replicas (the conflicting row is locked and the condition re-checked on its newest
version), so a `max_uses=1` token succeeds once in the whole fleet.

Errors: an unreachable database (refused, timed out, connection lost, pool exhausted) is
`StoreUnavailable` for metadata and `AuditUnavailable` for the trail, so calls fail closed.
A read whose pooled connection turns out dead (the server restarted) is tried once more on a
fresh one; a write is never repeated (it might have committed).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool, PoolTimeout

from broker.adapters.codec import dt_to_str, key_to_json
from broker.adapters.migrations import POSTGRES, migrate
from broker.adapters.postgres_approvals import PostgresApprovals
from broker.adapters.postgres_audit import PostgresAudit
from broker.adapters.sql_common import (
    REVOKED_AND_KEY,
    STORE_UNAVAILABLE,
    KeyCache,
    postgres,
    without_nul,
)
from broker.domain import Key
from broker.errors import AlreadyExists, ConcurrentModification, NotFound, StoreUnavailable

log = logging.getLogger(__name__)

#: Seconds to open a connection, and to wait for a free one in the pool.
CONNECT_TIMEOUT = 5
#: Seconds a health probe waits for a connection.
CHECK_TIMEOUT = 2.0


def describe(url: str) -> str:
    """`postgresql://USER@HOST:PORT/DB` of a connection URL: where, never a secret."""
    try:
        parts = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "postgresql://(unparsable URL)"
    user = f"{parts['user']}@" if parts.get("user") else ""
    port = f":{parts['port']}" if parts.get("port") else ""
    return f"postgresql://{user}{parts.get('host', '')}{port}/{parts.get('dbname', '')}"


def _configure(conn: psycopg.Connection[Any]) -> None:
    """Every pooled connection: commits wait for the WAL flush, whatever the server's default."""
    conn.execute("SET synchronous_commit TO on")


class PostgresStore(PostgresAudit, PostgresApprovals):
    """KeyStore, RevocationStore, AuditStore (see `PostgresAudit`), ApprovalStore (see
    `PostgresApprovals`) and SigningKeyStore on one PostgreSQL database.

    Args:
        url: a libpq connection URL (`postgresql://USER@HOST:PORT/DB?sslmode=...`).
        password: the database password, when the server asks for one (never in `url`).
        pool_size: most connections this process opens.

    Raises:
        StoreUnavailable: the database cannot be reached at start (the message says where
            and why).
        SchemaTooNew: the database was migrated by a newer keybroker.
    """

    def __init__(self, url: str, password: str | None = None, pool_size: int = 10) -> None:
        self.where = describe(url)
        kwargs: dict[str, Any] = {
            "autocommit": True,
            "connect_timeout": CONNECT_TIMEOUT,
            "application_name": "keybroker",
        }
        if password:
            kwargs["password"] = password
        self._keys = KeyCache()
        self._migrate(url, kwargs)
        self._pool: ConnectionPool[Any] = ConnectionPool(
            url,
            kwargs=kwargs,
            min_size=1,
            max_size=pool_size,
            open=False,
            name="keybroker",
            configure=_configure,
            timeout=CONNECT_TIMEOUT,
        )
        try:
            self._pool.open(wait=True, timeout=CONNECT_TIMEOUT * 2)
        except PoolTimeout as exc:
            self._pool.close()
            raise StoreUnavailable(f"cannot connect to {self.where}") from exc

    def _migrate(self, url: str, kwargs: dict[str, Any]) -> None:
        """Opens one connection first, so an unreachable database or a refused password stops
        the start with the server's own reason, then brings the schema up to date on it."""
        try:
            conn = psycopg.connect(url, **kwargs)
        except psycopg.Error as exc:
            reason = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
            raise StoreUnavailable(
                f"cannot connect to {self.where}: {reason or type(exc).__name__}"
            ) from exc
        with conn:
            _configure(conn)
            try:
                version = migrate(conn, POSTGRES)  # migrations/postgres
            except psycopg.Error as exc:
                raise StoreUnavailable(f"cannot migrate the schema of {self.where}: {exc}") from exc
        log.info("store: %s, schema version %d", self.where, version)

    def close(self) -> None:
        self._pool.close()

    def check(self) -> None:
        """Cheap liveness probe (health): `SELECT 1` on a pooled connection.

        Raises:
            StoreUnavailable: no connection could be had, or it failed.
        """
        try:
            with self._pool.connection(timeout=CHECK_TIMEOUT) as conn:
                conn.execute("SELECT 1").fetchone()
        except psycopg.Error as exc:
            raise StoreUnavailable(
                f"the metadata store {self.where} does not answer ({type(exc).__name__})"
            ) from exc

    # Plumbing ------------------------------------------------------------------------------

    def _query(self, sql: str, params: Sequence[Any]) -> list[Any]:
        """Rows of a read; once more on a fresh connection if the pooled one was dead."""
        for attempt in (1, 2):
            try:
                with self._pool.connection() as conn:
                    return list(conn.execute(postgres(sql), without_nul(params)).fetchall())
            except psycopg.OperationalError as exc:
                if attempt == 2 or isinstance(exc, PoolTimeout):
                    raise _unavailable(exc) from exc
                log.info("store read on a dead connection; trying a fresh one")
            except psycopg.Error as exc:
                raise _unavailable(exc) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    @contextmanager
    def _write(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection for writes, its failures as StoreUnavailable."""
        try:
            with self._pool.connection() as conn:
                yield conn
        except psycopg.Error as exc:
            raise _unavailable(exc) from exc

    # KeyStore ------------------------------------------------------------------------------

    def create_key(self, key: Key) -> None:
        with self._write() as conn:
            try:
                conn.execute(
                    "INSERT INTO keys (key_id, revision, data) VALUES (%s, %s, %s)",
                    (key.key_id, key.revision, key_to_json(key)),
                )
            except pg_errors.UniqueViolation as exc:
                raise AlreadyExists(f"key {key.key_id!r} already exists") from exc

    def get_key(self, key_id: str) -> Key:
        rows = self._query("SELECT data, revision FROM keys WHERE key_id = ?", (key_id,))
        if not rows:
            raise NotFound(f"key {key_id!r} not found")
        return self._keys.parsed(key_id, rows[0][0], rows[0][1])

    def list_keys(self, after: str, limit: int) -> list[Key]:
        rows = self._query(
            "SELECT key_id, data, revision FROM keys WHERE key_id > ? ORDER BY key_id LIMIT ?",
            (after, limit),
        )
        return [self._keys.parsed(k, d, r) for k, d, r in rows]

    def update_key(self, key: Key, expected_revision: int) -> Key:
        stored = key.evolve(revision=expected_revision + 1)
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE keys SET data = %s, revision = %s WHERE key_id = %s AND revision = %s",
                (key_to_json(stored), stored.revision, key.key_id, expected_revision),
            )
            if cur.rowcount == 1:
                return stored
            exists = conn.execute("SELECT 1 FROM keys WHERE key_id = %s", (key.key_id,)).fetchone()
        if exists is None:
            raise NotFound(f"key {key.key_id!r} not found")
        raise ConcurrentModification(f"key {key.key_id!r} was changed concurrently")

    # RevocationStore -----------------------------------------------------------------------

    def record_issued(self, token_id: str, subject: str, key_id: str, expires_at: datetime) -> None:
        with self._write() as conn:
            conn.execute(
                "INSERT INTO issued_tokens (token_id, subject, key_id, expires_at) "
                "VALUES (%s, %s, %s, %s)",
                (token_id, subject, key_id, dt_to_str(expires_at)),
            )

    def issued_subject(self, token_id: str) -> str | None:
        rows = self._query("SELECT subject FROM issued_tokens WHERE token_id = ?", (token_id,))
        return str(rows[0][0]) if rows else None

    def revoke(self, token_id: str, subject: str, expires_at: datetime) -> None:
        with self._write() as conn:
            conn.execute(
                "INSERT INTO revocations (token_id, subject, expires_at, revoked_at) "
                "VALUES (%s, %s, %s, %s) ON CONFLICT (token_id) DO NOTHING",
                (token_id, subject, dt_to_str(expires_at), dt_to_str(datetime.now().astimezone())),
            )

    def is_revoked(self, token_id: str) -> bool:
        return bool(self._query("SELECT 1 FROM revocations WHERE token_id = ?", (token_id,)))

    def revoked_and_key(self, token_id: str, key_id: str) -> tuple[bool, Key | None]:
        (row,) = self._query(REVOKED_AND_KEY, (token_id, key_id))
        key = None if row[1] is None else self._keys.parsed(key_id, row[1], row[2])
        return bool(row[0]), key

    def consume_use(self, token_id: str, max_uses: int) -> bool:
        # One statement: the insert, or the conflicting row locked and its count re-checked
        # and raised, atomically however many replicas race (see the module's docstring).
        with self._write() as conn:
            cur = conn.execute(
                "INSERT INTO token_uses (token_id, uses) VALUES (%s, 1) "
                "ON CONFLICT (token_id) DO UPDATE SET uses = token_uses.uses + 1 "
                "WHERE token_uses.uses < %s",
                (token_id, max_uses),
            )
            return cur.rowcount == 1

    # SigningKeyStore -----------------------------------------------------------------------

    def signing_keys(self, purpose: str) -> list[tuple[str, str, str]]:
        rows = self._query(
            "SELECT kid, hsm, label FROM signing_keys WHERE purpose = ? ORDER BY created_at DESC",
            (purpose,),
        )
        return [(r[0], r[1], r[2]) for r in rows]

    def add_signing_key(self, purpose: str, kid: str, hsm: str, label: str) -> None:
        with self._write() as conn:
            conn.execute(
                "INSERT INTO signing_keys (kid, purpose, hsm, label, created_at) "
                "VALUES (%s, %s, %s, %s, %s)",
                (kid, purpose, hsm, label, dt_to_str(datetime.now().astimezone())),
            )


def _unavailable(exc: psycopg.Error) -> StoreUnavailable:
    log.error("metadata store error", extra={"error": type(exc).__name__})
    return StoreUnavailable(STORE_UNAVAILABLE)
