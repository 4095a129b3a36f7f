"""Approval requests on PostgreSQL (the `ApprovalStore` port): a mixin of `PostgresStore`, on
its connection pool.

Compare-and-set is `UPDATE ... WHERE revision = expected`: a concurrent writer of the same
row waits for the first to commit, then re-checks the condition on the row's newest version
and updates nothing. Applying an approved change runs the request's and the key's
compare-and-set in one transaction, so among replicas racing to apply one request exactly one
commits, and a key changed since the request is never overwritten.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg_pool import ConnectionPool

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
from broker.adapters.sql_common import STORE_UNAVAILABLE, postgres
from broker.domain import ApprovalRequest, ApprovalState, Key
from broker.errors import AlreadyExists, ConcurrentModification, NotFound, StoreUnavailable

log = logging.getLogger(__name__)


class PostgresApprovals:
    """The approval half of `PostgresStore` (a mixin: the store opens the pool first)."""

    _pool: ConnectionPool[Any]

    @contextmanager
    def _approval_tx(self) -> Iterator[psycopg.Connection[Any]]:
        """One transaction on a pooled connection; database errors as StoreUnavailable."""
        try:
            with self._pool.connection() as conn, conn.transaction():
                yield conn
        except psycopg.Error as exc:
            raise _unavailable(exc) from exc

    def _approval_rows(self, sql: str, params: Sequence[Any]) -> list[tuple[str, int]]:
        try:
            with self._pool.connection() as conn:
                rows = conn.execute(postgres(sql), tuple(params)).fetchall()
        except psycopg.Error as exc:
            raise _unavailable(exc) from exc
        return [(str(r[0]), int(r[1])) for r in rows]

    def create_approval(self, request: ApprovalRequest) -> None:
        try:
            with self._pool.connection() as conn:
                conn.execute(postgres(INSERT_APPROVAL), insert_params(request))
        except pg_errors.UniqueViolation as exc:
            raise AlreadyExists(f"approval request {request.request_id!r} exists") from exc
        except psycopg.Error as exc:
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
        with self._approval_tx() as conn:
            _cas_approval(conn, request, expected_revision)
        return request.evolve(revision=expected_revision + 1)

    def apply_approval(
        self,
        request: ApprovalRequest,
        expected_revision: int,
        key: Key,
        expected_key_revision: int,
    ) -> tuple[ApprovalRequest, Key]:
        stored_key = key.evolve(revision=expected_key_revision + 1)
        with self._approval_tx() as conn:
            _cas_approval(conn, request, expected_revision)
            cur = conn.execute(
                postgres(UPDATE_KEY),
                (key_to_json(stored_key), stored_key.revision, key.key_id, expected_key_revision),
            )
            if cur.rowcount != 1:
                if conn.execute(postgres(KEY_EXISTS), (key.key_id,)).fetchone() is None:
                    raise NotFound(f"key {key.key_id!r} not found")
                raise ConcurrentModification(f"key {key.key_id!r} was changed concurrently")
        return request.evolve(revision=expected_revision + 1), stored_key


def _cas_approval(
    conn: psycopg.Connection[Any], request: ApprovalRequest, expected_revision: int
) -> None:
    """The request's compare-and-set inside a transaction; raises to roll it back."""
    cur = conn.execute(postgres(UPDATE_APPROVAL), update_params(request, expected_revision))
    if cur.rowcount == 1:
        return
    if conn.execute(postgres(APPROVAL_EXISTS), (request.request_id,)).fetchone() is None:
        raise NotFound(f"approval request {request.request_id!r} not found")
    raise ConcurrentModification(f"approval request {request.request_id!r} changed concurrently")


def _unavailable(exc: psycopg.Error) -> StoreUnavailable:
    log.error("metadata store error", extra={"error": type(exc).__name__})
    return StoreUnavailable(STORE_UNAVAILABLE)
