"""Versioned schema migrations at start, on the store of the run (SQLite, or PostgreSQL with
--store=postgres): a fresh database, a restart, an upgrade from version 1 or from before
versioning, and a schema newer than the code, which refuses to start."""

from __future__ import annotations

import os
import sqlite3
import subprocess
from pathlib import Path

import psycopg
import pytest
from keybroker.v1 import key_admin_pb2

from broker.adapters import migrations
from broker.adapters.migrations import POSTGRES, SQLITE, SchemaTooNew, migrate
from broker.app import build_app
from tests.broker_fixtures import broker_settings, start_broker
from tests.integration.audit_helpers import query, sql, verify
from tests.integration.flows import create_key, datakey
from tests.integration.test_server_process import SERVER
from tests.store_fixtures import store_url, using_postgres

LATEST = migrations.latest("postgres" if using_postgres() else "sqlite")
#: What version 2 added, dropped again to make a version-1 database.
UNDO_V2 = "DROP INDEX audit_events_by_time"


def versions(db: Path) -> list[tuple[int, str, str]]:
    rows = query(db, "SELECT version, name, applied_at FROM schema_migrations ORDER BY version")
    return [tuple(r) for r in rows]  # type: ignore[misc]


def has_time_index(db: Path) -> bool:
    if using_postgres():
        found = query(db, "SELECT 1 FROM pg_indexes WHERE indexname = 'audit_events_by_time'")
    else:
        found = query(
            db, "SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = 'audit_events_by_time'"
        )
    return bool(found)


def migrate_raw(db: Path, target: int) -> None:
    """Creates the schema up to `target` on an empty database, as an older keybroker did."""
    if using_postgres():
        with psycopg.connect(store_url(db), autocommit=True) as conn:
            migrate(conn, POSTGRES, target=target)
    else:
        conn = sqlite3.connect(db, isolation_level=None)
        migrate(conn, SQLITE, target=target)
        conn.close()


def test_both_backends_know_the_same_versions() -> None:
    sqlite = [(m.version, m.name) for m in migrations.migrations("sqlite")]
    postgres = [(m.version, m.name) for m in migrations.migrations("postgres")]
    assert sqlite == postgres and sqlite[0] == (1, "initial") and len(sqlite) >= 2


def test_a_fresh_database_gets_every_version_and_a_restart_changes_nothing(
    hsm_home: Path, tmp_path: Path
) -> None:
    db = tmp_path / "fresh.db"
    b = start_broker(hsm_home, database=db)
    try:
        key_id = create_key(b)
    finally:
        b.close()
    first = versions(db)
    assert [v for v, _, _ in first] == list(range(1, LATEST + 1))
    b = start_broker(hsm_home, database=db)
    try:
        assert versions(db) == first  # nothing applied twice
        assert datakey(b, key_id).key_version == 1
        assert verify(b).ok
    finally:
        b.close()


@pytest.mark.parametrize("start", ["version 1", "before versioning"])
def test_an_older_database_is_upgraded_at_start_and_keeps_its_data(
    hsm_home: Path, tmp_path: Path, start: str
) -> None:
    db = tmp_path / "old.db"
    b = start_broker(hsm_home, database=db)
    try:
        key_id = create_key(b)
        datakey(b, key_id)
    finally:
        b.close()
    # What the older keybroker left: version 1 recorded, or no record at all (the tables
    # as they were made before migrations were versioned).
    undo = "DELETE FROM schema_migrations WHERE version > 1"
    if start == "before versioning":
        undo = "DROP TABLE schema_migrations"
    sql(db, UNDO_V2, undo)
    assert not has_time_index(db)
    b = start_broker(hsm_home, database=db)
    try:
        assert [v for v, _, _ in versions(db)] == list(range(1, LATEST + 1))
        assert has_time_index(db)
        got = b.keys().GetKey(key_admin_pb2.GetKeyRequest(key_id=key_id))
        assert got.key.key_id == key_id
        assert datakey(b, key_id).key_version == 1
        report = verify(b)
        assert report.ok and report.chains_checked == 2, report.error
    finally:
        b.close()


def test_a_version_1_database_made_empty_is_upgraded(hsm_home: Path, tmp_path: Path) -> None:
    db = tmp_path / "v1.db"
    migrate_raw(db, 1)
    assert [v for v, _, _ in versions(db)] == [1] and not has_time_index(db)
    b = start_broker(hsm_home, database=db)
    try:
        assert [v for v, _, _ in versions(db)] == list(range(1, LATEST + 1))
        assert datakey(b, create_key(b)).key_version == 1
    finally:
        b.close()


def newer_schema(db: Path) -> int:
    """A database a newer keybroker migrated: one version more than this code knows."""
    migrate_raw(db, LATEST)
    sql(
        db,
        "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
        params=(LATEST + 1, "from_the_future", "2031-01-01T00:00:00+00:00"),
    )
    return LATEST + 1


def test_a_newer_schema_refuses_to_start_and_is_left_alone(hsm_home: Path, tmp_path: Path) -> None:
    db = tmp_path / "newer.db"
    newer = newer_schema(db)
    before = versions(db)
    with pytest.raises(SchemaTooNew) as refused:
        build_app(broker_settings(hsm_home, database=db))
    assert f"version {newer}, newer than this keybroker knows ({LATEST})" in str(refused.value)
    assert versions(db) == before


def test_the_server_says_so_in_one_line_and_exits_2(tmp_path: Path) -> None:
    db = tmp_path / "newer.db"
    newer_schema(db)
    home = tmp_path / "home"
    home.mkdir()
    store = f'[store]\nurl = "{store_url(db)}"\n' if using_postgres() else f'database = "{db}"\n'
    config = tmp_path / "kb.toml"
    config.write_text(store)
    env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}
    done = subprocess.run(
        [*SERVER, "--home", str(home), "--listen", "127.0.0.1:0", "--config", str(config)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"the database schema is version {LATEST + 1}, newer than" in done.stdout + done.stderr
