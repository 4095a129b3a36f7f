"""Versioned schema migrations, applied when a store opens, for SQLite and PostgreSQL alike.

Each backend has its own ordered SQL files, `migrations/<backend>/NNNN_name.sql`, numbered from
1 without gaps. The table `schema_migrations` holds one row per version applied. Opening a
store applies, in one transaction, every version above the stored one, so a start either
reaches the newest schema or changes nothing; the transaction is taken under the database's
write lock (SQLite's `BEGIN IMMEDIATE`, a PostgreSQL advisory lock), so replicas starting at
once migrate one after the other and the later ones find nothing left to do.

A database whose schema is newer than this code knows (written by a newer keybroker) is
refused with `SchemaTooNew` rather than used: older code could misread or damage it.
"""

from __future__ import annotations

import importlib.resources
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from typing import Any, Protocol, TypeVar

log = logging.getLogger(__name__)

_FILE = re.compile(r"(\d{4})_([a-z0-9_]+)\.sql")

#: The advisory lock key under which PostgreSQL starts migrate (any constant of our own).
POSTGRES_MIGRATION_LOCK = 0x6B620001


class SchemaTooNew(RuntimeError):
    """The database was migrated by a newer keybroker than this one."""


@dataclass(frozen=True, slots=True)
class Migration:
    """One version of a backend's schema: the statements that bring version - 1 to it."""

    version: int
    name: str
    statements: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Dialect:
    """What differs between the backends for the runner itself.

    Attributes:
        backend: the folder of its SQL files.
        begin: statements that open the migration transaction under the write lock.
        placeholder: the driver's parameter marker.
    """

    backend: str
    begin: tuple[str, ...]
    placeholder: str


SQLITE = Dialect("sqlite", ("BEGIN IMMEDIATE",), "?")
POSTGRES = Dialect(
    "postgres", ("BEGIN", f"SELECT pg_advisory_xact_lock({POSTGRES_MIGRATION_LOCK})"), "%s"
)


class _Cursor(Protocol):
    def fetchone(self) -> Any: ...


class Connection(Protocol):
    """What the runner needs of a connection (sqlite3's and psycopg's both fit), in
    autocommit mode: the runner opens and ends its transaction itself."""

    def execute(self, sql: Any, params: Any = ..., /) -> Any: ...


_C = TypeVar("_C", bound=Connection)


def split(script: str) -> tuple[str, ...]:
    """The statements of a script: `--` comment lines dropped, split at `;` ending a line."""
    lines = [line for line in script.splitlines() if not line.lstrip().startswith("--")]
    parts = re.split(r";[ \t]*(?:\n|$)", "\n".join(lines))
    return tuple(part.strip() for part in parts if part.strip())


@cache
def migrations(backend: str) -> tuple[Migration, ...]:
    """The backend's migrations in version order.

    Raises:
        RuntimeError: a file is misnamed or a version is missing or repeated (a packaging
            mistake, caught by the tests).
    """
    folder = importlib.resources.files(__package__) / backend
    found: list[Migration] = []
    for entry in folder.iterdir():
        match = _FILE.fullmatch(entry.name)
        if match is None:
            if entry.name.endswith(".sql"):
                raise RuntimeError(f"migration file {entry.name!r} is not named NNNN_name.sql")
            continue
        found.append(Migration(int(match[1]), match[2], split(entry.read_text("utf-8"))))
    found.sort(key=lambda m: m.version)
    if [m.version for m in found] != list(range(1, len(found) + 1)):
        raise RuntimeError(f"{backend} migrations must be numbered 1, 2, 3... without gaps")
    return tuple(found)


def latest(backend: str) -> int:
    """The newest schema version this code knows for the backend."""
    return migrations(backend)[-1].version


CREATE_TABLE = (
    "CREATE TABLE IF NOT EXISTS schema_migrations ("
    "version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
)
INSERT_VERSION = "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)"


def migrate(
    db: _C,
    dialect: Dialect,
    target: int | None = None,
    before: Callable[[_C], None] | None = None,
) -> int:
    """Brings the schema to `target` (default: the newest), in one transaction.

    Args:
        db: a connection in autocommit mode.
        dialect: `SQLITE` or `POSTGRES`.
        target: the version to stop at (tests make older databases with it).
        before: run first inside the transaction (SQLite sets aside a table of an older format).

    Returns:
        The schema version now.

    Raises:
        SchemaTooNew: the stored version is above every version this code knows.
    """
    known = migrations(dialect.backend)
    newest = known[-1].version
    goal = newest if target is None else target
    for statement in dialect.begin:
        db.execute(statement)
    try:
        if before is not None:
            before(db)
        db.execute(CREATE_TABLE)
        current = int(db.execute("SELECT MAX(version) FROM schema_migrations").fetchone()[0] or 0)
        if current > newest:
            raise SchemaTooNew(
                f"the database schema is version {current}, newer than this keybroker knows "
                f"({newest}): run the keybroker release that migrated it, or a newer one"
            )
        _apply(db, dialect, [m for m in known if current < m.version <= goal])
        db.execute("COMMIT")
    except BaseException:
        try:
            db.execute("ROLLBACK")
        except Exception:  # the connection may be gone; the error that matters is raised below
            log.debug("rollback after a failed migration failed", exc_info=True)
        raise
    return max(current, goal)


def _apply(db: Connection, dialect: Dialect, pending: Sequence[Migration]) -> None:
    insert = INSERT_VERSION.replace("?", dialect.placeholder)
    for migration in pending:
        for statement in migration.statements:
            db.execute(statement)
        applied = datetime.now(UTC).isoformat(timespec="seconds")
        db.execute(insert, (migration.version, migration.name, applied))
        log.info(
            "database schema migrated to version %d (%s)",
            migration.version,
            migration.name,
            extra={"backend": dialect.backend},
        )
