"""Parsed key metadata is cached by revision, and a change is seen by the very next read."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest

from broker.adapters import sqlite_store
from broker.adapters.sqlite_store import SqliteStore
from broker.domain import Key, KeyPolicy, KeyState, KeyVersion

NOW = datetime(2026, 12, 1, tzinfo=UTC)


def a_key(key_id: str = "k") -> Key:
    return Key(
        key_id=key_id,
        description="d",
        state=KeyState.ENABLED,
        primary_version=1,
        versions=(KeyVersion(1, NOW, f"kek:{key_id}:1"),),
        min_decryption_version=1,
        policy=KeyPolicy(()),
        hsm="local",
        create_time=NOW,
    )


@pytest.fixture
def parses(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    seen: list[str] = []
    real = sqlite_store.key_from_json

    def counting(data: str, revision: int) -> Key:
        seen.append(data)
        return real(data, revision)

    monkeypatch.setattr(sqlite_store, "key_from_json", counting)
    return seen


def test_a_key_is_parsed_once_per_revision(tmp_path: Path, parses: list[str]) -> None:
    store = SqliteStore(tmp_path / "kb.db")
    store.create_key(a_key())
    for _ in range(5):
        assert store.get_key("k").state is KeyState.ENABLED
    assert len(parses) == 1
    store.close()


def test_a_change_from_another_process_is_seen_at_once(tmp_path: Path) -> None:
    mine, theirs = SqliteStore(tmp_path / "kb.db"), SqliteStore(tmp_path / "kb.db")
    mine.create_key(a_key())
    assert mine.get_key("k").state is KeyState.ENABLED
    current = theirs.get_key("k")
    theirs.update_key(current.evolve(state=KeyState.DISABLED), current.revision)
    assert mine.get_key("k").state is KeyState.DISABLED
    assert [k.state for k in mine.list_keys("", 10)] == [KeyState.DISABLED]
    mine.close()
    theirs.close()


def test_a_row_rewritten_at_the_same_revision_is_not_answered_from_the_cache(
    tmp_path: Path,
) -> None:
    store = SqliteStore(tmp_path / "kb.db")
    store.create_key(a_key())
    store.get_key("k")
    db = sqlite3.connect(tmp_path / "kb.db")
    data = db.execute("SELECT data FROM keys").fetchone()[0]
    db.execute(
        "UPDATE keys SET data = ?", (data.replace('"description": "d"', '"description": "e"'),)
    )
    db.commit()
    db.close()
    assert store.get_key("k").description == "e"
    store.close()
