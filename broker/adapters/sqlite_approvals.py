"""Approval requests on SQLite (the `ApprovalStore` port): a mixin of `SqliteStore`, writing on
the store's write connection and lock, reading on the calling thread's read connection.

Applying an approved change writes the request and the key in one `BEGIN IMMEDIATE`
transaction, each with its compare-and-set: SQLite's write lock makes the pair atomic against
every other writer of the file, in this process or another.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from broker.adapters.approval_sql import (
    APPROVAL_EXISTS,
    INSERT_APPROVAL,
    KEY_EXISTS,
    SELECT_APPROVAL,
    UPDATE_APPROVAL,
    UPDATE_KEY,
    approval_from_json,
    insert_params,
    list_query,
    update_params,
)
from broker.adapters.codec import key_to_json
from broker.adapters.sql_common import STORE_UNAVAILABLE
from broker.adapters.sqlite_audit import begin_immediate
from broker.domain import ApprovalRequest, ApprovalState, Key
from broker.errors import AlreadyExists, ConcurrentModification, NotFound, StoreUnavailable

log = logging.getLogger(__name__)


class SqliteApprovals:
    """The approval half of `SqliteStore` (a mixin: the store opens `_db` first)."""

    _db: sqlite3.Connection
    _lock: threading.RLock
    _busy_timeout_ms: int

    def _read(self) -> sqlite3.Connection:
        raise NotImplementedError  # the store's: this thread's read connection

    @contextmanager
    def _approval_tx(self) -> Iterator[sqlite3.Cursor]:
        """A write transaction under the database's write lock; errors as StoreUnavailable."""
        with self._lock:
            try:
                cur = self._db.cursor()
                begin_immediate(cur, self._busy_timeout_ms)
            except sqlite3.Error as exc:
                raise _unavailable(exc) from exc
            try:
                yield cur
            except BaseException:
                try:
                    cur.execute("ROLLBACK")
                except sqlite3.Error:
                    log.warning("rollback failed", exc_info=True)
                raise
            try:
                cur.execute("COMMIT")
            except sqlite3.Error as exc:
                raise _unavailable(exc) from exc

    def _approval_rows(self, sql: str, params: Sequence[object]) -> list[tuple[str, int]]:
        # On this thread's read connection: the write connection answers a busy database at
        # once (`writing`), and a read is not retried.
        try:
            return [(str(r[0]), int(r[1])) for r in self._read().execute(sql, tuple(params))]
        except sqlite3.Error as exc:
            raise _unavailable(exc) from exc

    def create_approval(self, request: ApprovalRequest) -> None:
        try:
            with self._approval_tx() as cur:
                cur.execute(INSERT_APPROVAL, insert_params(request))
        except sqlite3.IntegrityError as exc:
            raise AlreadyExists(f"approval request {request.request_id!r} exists") from exc
        except sqlite3.Error as exc:
            raise _unavailable(exc) from exc

    def get_approval(self, request_id: str) -> ApprovalRequest:
        rows = self._approval_rows(SELECT_APPROVAL, (request_id,))
        if not rows:
            raise NotFound(f"approval request {request_id!r} not found")
        return approval_from_json(*rows[0])

    def list_approvals(
        self, after: str, limit: int, states: Sequence[ApprovalState] = (), key_id: str = ""
    ) -> list[ApprovalRequest]:
        sql, params = list_query(after, limit, states, key_id)
        return [approval_from_json(d, r) for d, r in self._approval_rows(sql, params)]

    def update_approval(self, request: ApprovalRequest, expected_revision: int) -> ApprovalRequest:
        try:
            with self._approval_tx() as cur:
                _cas_approval(cur, request, expected_revision)
        except sqlite3.Error as exc:
            raise _unavailable(exc) from exc
        return request.evolve(revision=expected_revision + 1)

    def apply_approval(
        self,
        request: ApprovalRequest,
        expected_revision: int,
        key: Key,
        expected_key_revision: int,
    ) -> tuple[ApprovalRequest, Key]:
        stored_key = key.evolve(revision=expected_key_revision + 1)
        try:
            with self._approval_tx() as cur:
                _cas_approval(cur, request, expected_revision)
                cur.execute(
                    UPDATE_KEY,
                    (
                        key_to_json(stored_key),
                        stored_key.revision,
                        key.key_id,
                        expected_key_revision,
                    ),
                )
                if cur.rowcount != 1:
                    if cur.execute(KEY_EXISTS, (key.key_id,)).fetchone() is None:
                        raise NotFound(f"key {key.key_id!r} not found")
                    raise ConcurrentModification(f"key {key.key_id!r} was changed concurrently")
        except sqlite3.Error as exc:
            raise _unavailable(exc) from exc
        return request.evolve(revision=expected_revision + 1), stored_key


def _cas_approval(cur: sqlite3.Cursor, request: ApprovalRequest, expected_revision: int) -> None:
    """The request's compare-and-set inside a transaction; raises to roll it back."""
    cur.execute(UPDATE_APPROVAL, update_params(request, expected_revision))
    if cur.rowcount == 1:
        return
    if cur.execute(APPROVAL_EXISTS, (request.request_id,)).fetchone() is None:
        raise NotFound(f"approval request {request.request_id!r} not found")
    raise ConcurrentModification(f"approval request {request.request_id!r} changed concurrently")


def _unavailable(exc: sqlite3.Error) -> StoreUnavailable:
    log.error("metadata store error", extra={"error": type(exc).__name__})
    return StoreUnavailable(STORE_UNAVAILABLE)
