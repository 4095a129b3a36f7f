"""The start-up check (invariant 1) over the fake HSM: what it checks and how it refuses."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from broker.adapters.sqlite_store import SqliteStore
from broker.domain import Key, KeyPolicy, KeyState, KeyVersion
from broker.services.signing import TOKEN_PURPOSE, SigningKeys
from broker.services.startup_check import WeakKeyError, check_templates
from tests.fakes.hsm import FakeHsm

NOW = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    s = SqliteStore(tmp_path / "kb.db")
    yield s
    s.close()


def add_key(store: SqliteStore, hsm: FakeHsm, key_id: str, versions: int = 1) -> list[str]:
    labels = [f"{key_id}/v{n}" for n in range(1, versions + 1)]
    for label in labels:
        hsm.generate_kek(label)
    store.create_key(
        Key(
            key_id=key_id,
            description="",
            state=KeyState.ENABLED,
            primary_version=versions,
            versions=tuple(KeyVersion(n, NOW, lbl) for n, lbl in enumerate(labels, 1)),
            min_decryption_version=1,
            policy=KeyPolicy(),
            hsm=hsm.info.name,
            create_time=NOW,
        )
    )
    return labels


def test_every_version_and_signing_key_is_checked(store: SqliteStore) -> None:
    hsm = FakeHsm()
    signing = SigningKeys(store, {"local": hsm})
    signing.ensure(TOKEN_PURPOSE, "local")
    add_key(store, hsm, "a", versions=2)
    add_key(store, hsm, "b")
    assert check_templates(store, {"local": hsm}, signing) == 4


def test_a_weak_version_stops_the_start_naming_the_attribute(store: SqliteStore) -> None:
    hsm = FakeHsm()
    signing = SigningKeys(store, {"local": hsm})
    _v1, v2 = add_key(store, hsm, "a", versions=2)
    hsm.weakened[v2] = ("CKA_EXTRACTABLE=True (want False)",)
    with pytest.raises(WeakKeyError, match=r"a v2 .*weaker than required: CKA_EXTRACTABLE"):
        check_templates(store, {"local": hsm}, signing)


def test_a_missing_object_or_a_key_of_the_wrong_kind_stops_the_start(
    store: SqliteStore,
) -> None:
    hsm = FakeHsm()
    signing = SigningKeys(store, {"local": hsm})
    (label,) = add_key(store, hsm, "a")
    hsm.destroy(label)
    with pytest.raises(WeakKeyError, match="missing"):
        check_templates(store, {"local": hsm}, signing)
    hsm.generate_signing_key(label)  # the label now names a key pair, not a KEK
    with pytest.raises(WeakKeyError, match="not a kek key"):
        check_templates(store, {"local": hsm}, signing)


def test_keys_on_an_unconfigured_hsm_are_skipped(store: SqliteStore) -> None:
    hsm, other = FakeHsm(), FakeHsm("elsewhere")
    add_key(store, other, "a")
    assert check_templates(store, {"local": hsm}, SigningKeys(store, {"local": hsm})) == 0


def test_an_object_missing_for_a_moment_is_looked_for_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from broker.errors import HsmObjectMissing
    from broker.services import startup_check

    monkeypatch.setattr(startup_check, "SETTLE_DELAYS", (0.0, 0.0, 0.0))
    answers: list[object] = [HsmObjectMissing("gone"), HsmObjectMissing("gone"), "found"]

    def look() -> object:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert startup_check.settled(look) == "found"

    def never() -> object:
        raise HsmObjectMissing("gone for good")

    with pytest.raises(HsmObjectMissing, match="for good"):
        startup_check.settled(never)
