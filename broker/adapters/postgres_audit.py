"""The audit tables on PostgreSQL: events, chain records, checkpoints (the `AuditStore` port).

Ordering. Export and verification read the trail by `sequence` and resume after the last
sequence they saw (`after_sequence`), so a sequence must never become visible after a greater
one has: sequence order must be commit order. A PostgreSQL sequence does not promise that: two
transactions draw 7 and 8, the one holding 8 commits first, and a reader that saw 8 then
resumes "after 8" and never sees 7. So appends are serialised: each batch's transaction first
takes a transaction-scoped advisory lock (`pg_advisory_xact_lock`), draws its sequences and
inserts while holding it, and PostgreSQL releases the lock only once the commit is durable and
visible. The next writer draws its sequences after that, so they are greater than every
sequence already visible. Every writer of every replica takes the same lock. The cost is one
lock per group-commit batch (not per event), held across one commit.

An advisory lock, not `LOCK TABLE`: a table lock in a mode that excludes other writers also
waits behind autovacuum (which holds SHARE UPDATE EXCLUSIVE), and readers never touch the
advisory lock. A batch waits for the lock at most `LOCK_TIMEOUT` and its transaction may sit
idle at most `IDLE_TIMEOUT` (a broker that hangs mid-batch cannot hold every replica's trail
up for longer); the batch then fails and its calls are refused (fail closed).

Durability: every connection runs with `synchronous_commit = on`, so a commit returns once its
WAL is flushed (and replicated, with synchronous standbys).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg_pool import ConnectionPool

from broker.adapters.sql_common import (
    AUDIT_UNAVAILABLE,
    AUDIT_UNREADABLE,
    INSERT_CHAIN,
    INSERT_CHECKPOINT,
    INSERT_EVENT,
    PAGE,
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
    postgres,
    row_record,
    without_nul,
)
from broker.domain import AuditEvent, AuditFilter
from broker.errors import AuditUnavailable
from broker.ports import Record

log = logging.getLogger(__name__)

#: The advisory lock every audit append of every replica takes (any constant of our own;
#: advisory locks are per database).
AUDIT_APPEND_LOCK = 0x6B620002
#: Longest a batch waits for another writer's batch to commit.
LOCK_TIMEOUT = "10s"
#: Longest an append transaction may sit idle (a hung broker) before the server ends it.
IDLE_TIMEOUT = "30s"

_LOCK = (
    f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'; "
    f"SET LOCAL idle_in_transaction_session_timeout = '{IDLE_TIMEOUT}'; "
    f"SELECT pg_advisory_xact_lock({AUDIT_APPEND_LOCK})"
)
_INSERT_EVENT = postgres(INSERT_EVENT) + " RETURNING sequence"
_RESYNC = (
    "SELECT setval(pg_get_serial_sequence('audit_events', 'sequence'), max(sequence)) "
    "FROM audit_events"
)
_CURSORS = itertools.count(1)


def _insert_events(conn: psycopg.Connection[Any], params: list[tuple[Any, ...]]) -> list[int]:
    """Inserts the batch's rows; returns the sequence each got, in order."""
    with conn.cursor() as cur:
        cur.executemany(_INSERT_EVENT, params, returning=True)
        sequences = []
        while True:
            row = cur.fetchone()
            assert row is not None  # one row per INSERT ... RETURNING
            sequences.append(int(row[0]))
            if not cur.nextset():
                return sequences


class PostgresSnapshot:
    """`AuditSnapshot` on one connection inside one REPEATABLE READ, READ ONLY transaction."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn

    def chains(self) -> list[Record]:
        rows = self._conn.execute("SELECT chain, writer, time, jws FROM audit_chains ORDER BY id")
        return [chain_record(row) for row in rows]

    def checkpoints(self) -> list[Record]:
        return [checkpoint_record(row) for row in self._conn.execute(SELECT_CHECKPOINTS)]

    def events(self, after_sequence: int = 0) -> Iterator[Record]:
        # A server-side cursor: the trail streams in pages, never whole into memory.
        try:
            with self._conn.cursor(name=f"audit_events_{next(_CURSORS)}") as cursor:
                cursor.itersize = PAGE
                cursor.execute(postgres(SELECT_EVENTS_AFTER), (after_sequence,))
                for row in cursor:
                    yield row_record(row)
        except psycopg.Error as exc:
            raise AuditUnavailable(AUDIT_UNREADABLE) from exc

    def event_chains(self, after_sequence: int = 0) -> list[str]:
        rows = self._conn.execute(postgres(SELECT_EVENT_CHAINS), (after_sequence,))
        return [str(r[0]) for r in rows]

    def last_sequence(self) -> int:
        row = self._conn.execute(SELECT_LAST_SEQUENCE).fetchone()
        return int(row[0] or 0) if row else 0


class PostgresAudit:
    """The audit half of `PostgresStore` (a mixin: the store opens the pool first)."""

    _pool: ConnectionPool[Any]

    def append_batch(self, events: Sequence[AuditEvent]) -> list[int]:
        params = [event_params(e) for e in events]
        try:
            with self._pool.connection() as conn, conn.transaction():
                conn.execute(_LOCK)  # see the module's docstring: sequence order = commit order
                try:
                    with conn.transaction():  # a savepoint: the batch may be tried once more
                        return _insert_events(conn, params)
                except pg_errors.UniqueViolation as exc:
                    if exc.diag.constraint_name != "audit_events_pkey":
                        raise
                # A row written outside the broker with a sequence of its own (by hand, or
                # copied in) is ahead of the identity sequence, which would otherwise fail
                # every later append. Under the lock nobody else draws: move past it.
                log.warning("audit sequence behind rows written outside the broker; moved past")
                conn.execute(_RESYNC)
                return _insert_events(conn, params)
        except psycopg.Error as exc:
            log.error("audit append failed", extra={"error": type(exc).__name__})
            raise AuditUnavailable(AUDIT_UNAVAILABLE) from exc

    def add_chain(self, record: Record) -> None:
        self._side_write(INSERT_CHAIN, chain_params(record))

    def add_checkpoint(self, record: Record) -> None:
        self._side_write(INSERT_CHECKPOINT, checkpoint_params(record))

    def _side_write(self, sql: str, params: tuple[Any, ...]) -> None:
        try:
            with self._pool.connection() as conn:
                conn.execute(postgres(sql), params)
        except psycopg.Error as exc:
            log.error("audit record write failed", extra={"error": type(exc).__name__})
            raise AuditUnavailable("the audit log cannot be written; retry later") from exc

    @contextmanager
    def snapshot(self) -> Iterator[PostgresSnapshot]:
        try:
            with self._pool.connection() as conn, conn.transaction():
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                yield PostgresSnapshot(conn)
        except psycopg.Error as exc:
            raise AuditUnavailable(AUDIT_UNREADABLE) from exc

    def events(self, flt: AuditFilter) -> Iterator[AuditEvent]:
        where, params = event_filter(flt)
        sql = postgres(page_query(where))

        def fetch(after: int, size: int) -> list[Any]:
            try:
                with self._pool.connection() as conn:
                    return list(conn.execute(sql, [after, *without_nul(params), size]).fetchall())
            except psycopg.Error as exc:
                log.error("audit read failed", extra={"error": type(exc).__name__})
                raise AuditUnavailable(AUDIT_UNREADABLE) from exc

        return listed_events(paged(fetch, flt.after_sequence, flt.limit))
