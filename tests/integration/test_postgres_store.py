"""What only the PostgreSQL store has to show: sequence order is commit order across writers,
use limits are counted once across connections, commits are synchronous, and an unreachable
database fails calls closed (UNAVAILABLE) until it is back. Runs with --store=postgres."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import grpc
import psycopg
import pytest
from keybroker.v1 import crypto_pb2
from psycopg import sql as pgsql

from broker.adapters.postgres_audit import AUDIT_APPEND_LOCK
from broker.adapters.postgres_store import PostgresStore
from broker.adapters.sql_common import INSERT_EVENT, event_params, postgres
from broker.domain import AuditEvent, Outcome
from broker.errors import StoreUnavailable
from broker.transport.server import HealthMonitor
from tests.broker_fixtures import start_broker
from tests.integration.audit_helpers import verify
from tests.integration.flows import CTX, code_of, create_key, datakey
from tests.store_fixtures import RUN, admin, connect, open_store, store_url

pytestmark = pytest.mark.postgres


def wait_until(condition: Callable[[], bool], what: str, limit: float = 60.0) -> None:
    """Polls `condition` (no timing is asserted: the limit only ends a hung test)."""
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {limit} s")
        time.sleep(0.05)


def event(chain: str, number: int) -> AuditEvent:
    return AuditEvent(
        sequence=0,
        time=datetime.now(UTC),
        principal="tester",
        operation="GenerateDataKey",
        key_id="k",
        key_version=1,
        token_id="",
        context={},
        justification="",
        outcome=Outcome.ALLOWED,
        reason="",
        request_id=f"{chain}-{number}",
        prev_hash="",
        hash="",
        chain=chain,
        chain_sequence=number,
    )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[PostgresStore]:
    opened = open_store(tmp_path / "pg.db")
    assert isinstance(opened, PostgresStore)
    yield opened
    opened.close()


def test_an_append_waits_for_the_batch_before_it_to_commit(
    store: PostgresStore, tmp_path: Path
) -> None:
    """Another writer draws its sequence and holds the append lock; our append waits for the
    lock (seen in pg_locks), and its sequence comes after the other's, which is visible by the
    time ours is: a reader resuming after our sequence can never miss the other's."""
    other = psycopg.connect(store_url(tmp_path / "pg.db"))  # a transaction until commit
    try:
        other.execute("SELECT pg_advisory_xact_lock(%s)", (AUDIT_APPEND_LOCK,))
        row = other.execute(
            postgres(INSERT_EVENT) + " RETURNING sequence", event_params(event("other", 1))
        ).fetchone()
        assert row is not None
        theirs = int(row[0])
        ours: list[int] = []
        appender = threading.Thread(target=lambda: ours.extend(store.append_batch([event("a", 1)])))
        appender.start()
        wait_until(lambda: waiting_on_advisory_lock(tmp_path / "pg.db"), "the append waits")
        assert not ours  # still waiting while the other batch is uncommitted
        other.commit()
        appender.join(30)
        assert ours and ours[0] > theirs
    finally:
        other.close()
    with store.snapshot() as snap:
        seen = [r["sequence"] for r in snap.events()]
    assert seen == [theirs, ours[0]]


def test_a_row_written_by_hand_ahead_of_the_sequence_does_not_stop_the_trail(
    store: PostgresStore, tmp_path: Path
) -> None:
    [first] = store.append_batch([event("a", 1)])
    with connect(tmp_path / "pg.db") as db:
        db.execute(
            "INSERT INTO audit_events (sequence, chain, chain_sequence, time, principal, "
            "operation, key_id, key_version, token_id, context, justification, outcome, reason, "
            "request_id, prev_hash, hash) VALUES (?, 'by-hand', 1, 't', 'p', 'Decrypt', 'k', 1, "
            "'', '{}', '', 'allowed', '', 'r', '', '')",
            (first + 5,),
        )
    # The sequence reaches the row: that append moves past it rather than failing.
    got = [store.append_batch([event("a", n)])[0] for n in range(2, 8)]
    assert first + 5 not in got and got == sorted(got) and got[-1] > first + 5


def test_the_audit_sequence_caches_no_values(store: PostgresStore) -> None:
    """A session that cached sequence values would hand out smaller ones after another
    session's greater ones, whatever the lock."""
    with store._pool.connection() as conn:
        rows = conn.execute(
            "SELECT cache_size FROM pg_sequences WHERE sequencename LIKE 'audit_events%'"
        ).fetchall()
    assert rows == [(1,)]


def waiting_on_advisory_lock(db: Path) -> bool:
    with admin() as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database "
            "WHERE l.locktype = 'advisory' AND NOT l.granted AND d.datname = %s",
            (RUN.database_name(db),),
        ).fetchone()
    return bool(row and row[0])


def test_readers_resuming_after_the_last_sequence_miss_nothing(tmp_path: Path) -> None:
    """Three writers (separate pools, as replicas) append batches at once while a reader
    follows the trail with after_sequence: everything committed is read, in order, once."""
    db = tmp_path / "pg.db"
    stores = [open_store(db) for _ in range(3)]
    done = threading.Event()
    read: list[int] = []

    def follow() -> None:
        # As an export resumed with after_sequence does, over and over.
        last = 0
        while True:
            finished = done.is_set()
            with stores[0].snapshot() as snap:
                for record in snap.events(after_sequence=last):
                    read.append(record["sequence"])
                    last = record["sequence"]
            if finished:
                return

    def write(index: int) -> list[int]:
        sequences = []
        for batch in range(40):
            events = [event(f"w{index}", batch * 3 + n) for n in range(1, 4)]
            sequences += stores[index].append_batch(events)
        return sequences

    reader = threading.Thread(target=follow)
    reader.start()
    try:
        with ThreadPoolExecutor(3) as pool:
            written = [s for part in pool.map(write, range(3)) for s in part]
    finally:
        done.set()
        reader.join(60)
        for s in stores:
            s.close()
    assert len(written) == 360
    assert read == sorted(written)


def test_a_use_limit_is_counted_once_across_connections(tmp_path: Path) -> None:
    stores = [open_store(tmp_path / "pg.db") for _ in range(3)]
    try:
        with ThreadPoolExecutor(12) as pool:
            results = list(pool.map(lambda i: stores[i % 3].consume_use("t-1", 1), range(24)))
        assert results.count(True) == 1
        with ThreadPoolExecutor(12) as pool:
            results = list(pool.map(lambda i: stores[i % 3].consume_use("t-5", 5), range(24)))
        assert results.count(True) == 5
    finally:
        for s in stores:
            s.close()


def test_commits_are_synchronous_whatever_the_database_default(tmp_path: Path) -> None:
    db = tmp_path / "pg.db"
    name = pgsql.Identifier(RUN.database_name(db))
    with admin() as conn:
        conn.execute(pgsql.SQL("ALTER DATABASE {} SET synchronous_commit = off").format(name))
    store = open_store(db)
    assert isinstance(store, PostgresStore)
    try:
        with store._pool.connection() as conn:
            row = conn.execute("SHOW synchronous_commit").fetchone()
        assert row == ("on",)
    finally:
        store.close()


def set_reachable(db: Path, reachable: bool) -> None:
    """Lets connections to the database in or not; when not, ends those already open (as a
    database failover or a network cut would)."""
    name = RUN.database_name(db)
    with admin() as conn:
        conn.execute(
            pgsql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS {}").format(
                pgsql.Identifier(name), pgsql.SQL("true" if reachable else "false")
            )
        )
        if not reachable:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (name,),
            )


def test_an_unreachable_database_fails_calls_closed_until_it_is_back(
    hsm_home: Path, tmp_path: Path
) -> None:
    db = tmp_path / "down.db"
    b = start_broker(hsm_home, database=db)
    health = HealthMonitor(b.running, b.app.health_probes(), interval=3600)  # rounds run here
    try:
        assert health.check_once()
        key_id = create_key(b)
        dk = datakey(b, key_id)
        set_reachable(db, False)
        code, message = code_of(
            lambda: b.crypto("producer").GenerateDataKey(
                crypto_pb2.GenerateDataKeyRequest(key_id=key_id, context=CTX)
            )
        )
        # The store's failure, or that of the audit record of the failed call: fail closed.
        assert code == grpc.StatusCode.UNAVAILABLE
        assert "retry later" in message or "fail closed" in message
        assert dk.plaintext_key.hex() not in message and "postgres" not in message
        with pytest.raises(StoreUnavailable):
            b.app.store.check()
        assert not health.check_once()  # NOT_SERVING: balancers send calls elsewhere
        set_reachable(db, True)

        def served() -> bool:
            try:
                datakey(b, key_id)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE
                return False
            return True

        wait_until(served, "calls succeed again")
        b.app.store.check()
        assert health.check_once()
        report = verify(b)
        assert report.ok, report.error
    finally:
        set_reachable(db, True)
        b.close()
