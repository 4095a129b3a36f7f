"""Waiting for SQLite's write lock: asked for again every half millisecond, up to the busy
timeout, instead of SQLite's back-off of up to 100 ms between attempts (no timing here)."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from broker.adapters import sqlite_audit
from broker.adapters.sqlite_audit import begin_immediate, connect, writing
from broker.adapters.sqlite_store import SqliteStore


def _attempts(db: sqlite3.Connection) -> list[str]:
    """Every statement `db` starts to run, failed ones included."""
    seen: list[str] = []
    db.set_trace_callback(seen.append)
    return seen


def test_a_writing_connection_answers_a_busy_database_at_once(tmp_path: Path) -> None:
    db = writing(connect(tmp_path / "a.db", 5000))
    assert db.execute("PRAGMA busy_timeout").fetchone()[0] == 0


def test_the_store_writes_only_on_connections_that_retry_themselves(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.db", busy_timeout_ms=5000)
    try:
        for db in (store._db, store._writer, store._side):
            assert db.execute("PRAGMA busy_timeout").fetchone()[0] == 0
        # Reads keep SQLite's own wait: they are not retried.
        assert store._read().execute("PRAGMA busy_timeout").fetchone()[0] == 5000
    finally:
        store.close()


def test_a_waiting_writer_asks_again_and_gets_the_lock_once_it_is_free(tmp_path: Path) -> None:
    path = tmp_path / "w.db"
    holder = connect(path, 5000)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN IMMEDIATE")
    waiter = writing(connect(path, 5000))
    attempts = _attempts(waiter)
    outcome: list[BaseException | None] = []

    def wait() -> None:
        try:
            begin_immediate(waiter.cursor(), 60_000)
            outcome.append(None)
        except BaseException as exc:  # handed to the test thread
            outcome.append(exc)

    thread = threading.Thread(target=wait)
    thread.start()
    polled = threading.Event()
    for _ in range(2000):  # until the waiter has asked three times (or 20 s)
        if attempts.count("BEGIN IMMEDIATE") >= 3:
            polled.set()
            break
        if outcome:  # it gave up (or got the lock) without asking again
            break
        polled.wait(0.01)
    holder.execute("COMMIT")
    thread.join(60)
    assert polled.is_set(), attempts
    assert outcome == [None]
    assert waiter.in_transaction
    waiter.execute("INSERT INTO t VALUES (1)")
    waiter.execute("COMMIT")
    assert holder.execute("SELECT count(*) FROM t").fetchone()[0] == 1


def test_a_lock_held_past_the_busy_timeout_is_reported_busy(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    holder = connect(path, 5000)
    holder.execute("BEGIN IMMEDIATE")
    waiter = writing(connect(path, 5000))
    attempts = _attempts(waiter)
    with pytest.raises(sqlite3.OperationalError) as busy:
        begin_immediate(waiter.cursor(), 30)
    assert busy.value.sqlite_errorcode & 0xFF == sqlite3.SQLITE_BUSY
    assert attempts.count("BEGIN IMMEDIATE") >= 2  # it asked again before giving up
    assert not waiter.in_transaction
    holder.execute("ROLLBACK")


class _Failing:
    """A cursor whose statements fail with the given SQLite error code."""

    def __init__(self, code: int) -> None:
        self.code = code
        self.calls = 0

    def execute(self, sql: str) -> None:
        self.calls += 1
        exc = sqlite3.OperationalError("disk I/O error")
        exc.sqlite_errorcode = self.code  # type: ignore[attr-defined]
        raise exc


def test_any_other_error_is_raised_at_the_first_attempt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite_audit, "WRITE_LOCK_POLL_S", 0.0)
    cursor = _Failing(sqlite3.SQLITE_IOERR)
    with pytest.raises(sqlite3.OperationalError, match="disk I/O"):
        begin_immediate(cursor, 60_000)  # type: ignore[arg-type]
    assert cursor.calls == 1
