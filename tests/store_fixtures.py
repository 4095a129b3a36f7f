"""Which store the tests run against: the embedded SQLite file (default) or PostgreSQL.

`pytest --store=postgres` (or `KEYBROKER_TEST_STORE=postgres`) runs every broker the tests
start on PostgreSQL. Tests name their store by a SQLite path (`database=tmp_path / "x.db"`);
on PostgreSQL each distinct path maps to a fresh database of its own, `kb_test_<run>_<n>`,
created on first use and dropped when the run ends, so two brokers given one path share a
database exactly as they would share the file. The server is `KEYBROKER_TEST_POSTGRES`
(default `postgresql://postgres@127.0.0.1:5432/test`, a superuser: it creates databases).

The helpers here (`open_store`, `connect`, `backup`, `restore`) let a test act on "its
database" the same way on either backend, as an insider with write access to it would.
"""

from __future__ import annotations

import os
import secrets
import shutil
import sqlite3
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql as pgsql

from broker.adapters.postgres_store import PostgresStore
from broker.adapters.sqlite_store import SqliteStore
from broker.config import Settings
from broker.ports import Store

STORE_ENV = "KEYBROKER_TEST_STORE"
ADMIN_ENV = "KEYBROKER_TEST_POSTGRES"
ADMIN_URL = os.environ.get(ADMIN_ENV) or "postgresql://postgres@127.0.0.1:5432/test"
STORES = ("sqlite", "postgres")


class _Run:
    """The backend of this run and the PostgreSQL databases it made."""

    def __init__(self) -> None:
        self.kind = os.environ.get(STORE_ENV, "sqlite") or "sqlite"
        self.prefix = f"kb_test_{secrets.token_hex(4)}"
        self._names: dict[str, str] = {}
        self.paths: dict[str, Path] = {}  # database name -> the SQLite path it stands for
        self._lock = threading.Lock()

    def database_name(self, path: Path) -> str:
        """The PostgreSQL database standing for the SQLite file `path` (created on first use)."""
        key = str(Path(path).absolute())
        with self._lock:
            name = self._names.get(key)
            if name is None:
                name = f"{self.prefix}_{len(self._names) + 1}"
                with admin() as conn:
                    conn.execute(pgsql.SQL("CREATE DATABASE {}").format(pgsql.Identifier(name)))
                self._names[key] = name
                self.paths[name] = Path(key)
            return name

    def drop_all(self) -> None:
        with self._lock:
            names, self._names = list(self._names.values()), {}
        if not names:
            return
        with admin() as conn:
            for name in names:
                conn.execute(
                    pgsql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                        pgsql.Identifier(name)
                    )
                )


RUN = _Run()


def using_postgres() -> bool:
    return RUN.kind == "postgres"


def admin() -> psycopg.Connection[Any]:
    """A superuser connection to the test server's maintenance database (autocommit)."""
    return psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=5)


def url_of(name: str) -> str:
    """The URL of database `name` on the test server."""
    info = psycopg.conninfo.conninfo_to_dict(ADMIN_URL)
    info["dbname"] = name
    user = f"{info['user']}@" if info.get("user") else ""
    host, port = info.get("host", "127.0.0.1"), info.get("port", "5432")
    return f"postgresql://{user}{host}:{port}/{name}"


def store_url(path: Path) -> str:
    """The URL of the PostgreSQL database standing for `path` (PostgreSQL runs only)."""
    return url_of(RUN.database_name(path))


def store_changes(home: Path, changes: dict[str, object]) -> dict[str, object]:
    """Broker settings `changes` with, on a PostgreSQL run, the database standing for the
    SQLite file they name (`database`, else `HOME/keybroker.db`) in place of that file."""
    if not using_postgres() or changes.get("store_url"):
        return changes
    path = changes.pop("database", None) or home / "keybroker.db"
    assert isinstance(path, Path)
    return {**changes, "store_url": store_url(path)}


def database_path(settings: Settings) -> Path:
    """The SQLite path a broker's settings name, or the one its PostgreSQL database stands for:
    what `connect` takes to act on that broker's store."""
    if settings.database is not None:
        return Path(settings.database)
    if settings.store_url:
        return RUN.paths[settings.store_url.rsplit("/", 1)[1]]
    return settings.home / "keybroker.db"


def server_env(home: Path) -> dict[str, str]:
    """What a `keybroker-server` process started on `home` needs to use the run's store:
    on a PostgreSQL run, the database standing for `HOME/keybroker.db`."""
    if not using_postgres():
        return {}
    return {"KEYBROKER_STORE_URL": store_url(home / "keybroker.db")}


def open_store(path: Path) -> Store:
    """The store a broker given `database=path` would open (the caller closes it)."""
    if using_postgres():
        return PostgresStore(store_url(path))
    return SqliteStore(path)


class Db:
    """A plain DB-API connection to the store of `path`, as an insider with write access to
    the database has; statements use `?` markers on both backends."""

    def __init__(self, path: Path) -> None:
        self.postgres = using_postgres()
        self._con: Any = (
            psycopg.connect(store_url(path), connect_timeout=5)
            if self.postgres
            else sqlite3.connect(path)
        )

    def execute(self, statement: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        if self.postgres:
            statement = statement.replace("?", "%s")
        cur = self._con.execute(statement, tuple(params))
        return list(cur.fetchall()) if cur.description else []

    def commit(self) -> None:
        self._con.commit()

    def close(self) -> None:
        self._con.close()

    def __enter__(self) -> Db:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.commit()
        self.close()


def connect(path: Path) -> Db:
    return Db(path)


def backup(source: Path, target: Path) -> None:
    """A consistent copy of a live store: SQLite's backup API, or `pg_dump` into `target`."""
    if not using_postgres():
        src, dst = sqlite3.connect(source), sqlite3.connect(target)
        src.backup(dst)
        src.close()
        dst.close()
        return
    subprocess.run(
        ["pg_dump", "--format=custom", f"--file={target}", store_url(source)],
        check=True,
        capture_output=True,
        timeout=120,
    )


def restore(backup_file: Path, path: Path) -> None:
    """Puts an older copy in place of a stopped broker's store (the database is recreated
    and `pg_restore`d on PostgreSQL)."""
    if not using_postgres():
        for suffix in ("-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        shutil.copyfile(backup_file, path)
        return
    name = RUN.database_name(path)
    with admin() as conn:
        ident = pgsql.Identifier(name)
        conn.execute(pgsql.SQL("DROP DATABASE {} WITH (FORCE)").format(ident))
        conn.execute(pgsql.SQL("CREATE DATABASE {}").format(ident))
    subprocess.run(
        ["pg_restore", "--no-owner", f"--dbname={url_of(name)}", str(backup_file)],
        check=True,
        capture_output=True,
        timeout=120,
    )


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--store",
        choices=STORES,
        default=None,
        help=f"the store brokers run on: sqlite (default) or postgres (env {STORE_ENV}; "
        f"server {ADMIN_ENV}, default {ADMIN_URL})",
    )


def pytest_configure(config: pytest.Config) -> None:
    chosen = config.getoption("--store", default=None)
    if chosen:
        RUN.kind = chosen
    config.addinivalue_line("markers", "postgres: runs only on a PostgreSQL run (--store)")
    config.addinivalue_line("markers", "sqlite(reason): runs only on a SQLite run")
    if RUN.kind not in STORES:
        raise pytest.UsageError(f"{STORE_ENV} must be one of {', '.join(STORES)}")
    if using_postgres():
        try:
            admin().close()
        except psycopg.Error as exc:
            raise pytest.UsageError(
                f"--store=postgres: cannot reach {ADMIN_URL} ({exc}); start PostgreSQL "
                "(`make test` does) or set " + ADMIN_ENV
            ) from exc


def pytest_report_header(config: pytest.Config) -> str:
    return f"keybroker store: {RUN.kind}"


def pytest_unconfigure(config: pytest.Config) -> None:
    if using_postgres():
        RUN.drop_all()


@pytest.fixture(scope="session")
def store_kind() -> str:
    """ "sqlite" or "postgres": the store of this run."""
    return RUN.kind


_ONLY = {
    "postgres": "PostgreSQL only: runs with --store=postgres (the second pass of make test)",
    "sqlite": "SQLite only (the file itself)",
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`@pytest.mark.postgres` / `@pytest.mark.sqlite(reason)`: tests of one backend only,
    skipped with their reason on the other."""
    for item in items:
        for kind, default in _ONLY.items():
            mark = item.get_closest_marker(kind)
            if mark is not None and RUN.kind != kind:
                reason = mark.args[0] if mark.args else default
                item.add_marker(pytest.mark.skip(reason=reason))
