"""Choosing the store: `[store] url` selects PostgreSQL, the password never comes from the file;
and the migration files of both backends."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.adapters import migrations
from broker.config import ConfigError, Settings, load_settings

URL = "postgresql://keybroker@db.internal:5432/keybroker?sslmode=verify-full"


def load(tmp_path: Path, text: str | None = None, **env: str) -> Settings:
    config_file = None
    if text is not None:
        config_file = tmp_path / "kb.toml"
        config_file.write_text(text)
    return load_settings(home=tmp_path / "home", config_file=config_file, env=env)


def refused(tmp_path: Path, text: str | None, **env: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text, **env)
    return str(info.value)


def test_sqlite_stays_the_default(tmp_path: Path) -> None:
    settings = load(tmp_path)
    assert settings.store_url == "" and settings.database is None
    assert settings.database_location == str(tmp_path / "home" / "keybroker.db")


def test_a_postgresql_url_selects_postgresql(tmp_path: Path) -> None:
    settings = load(tmp_path, f'[store]\nurl = "{URL}"\npool_size = 4\n')
    assert settings.store_url == URL and settings.store_pool_size == 4
    # Shown without its parameters.
    assert settings.database_location == "postgresql://keybroker@db.internal:5432/keybroker"
    assert load(tmp_path, KEYBROKER_STORE_URL=URL).store_url == URL


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://keybroker:hunter2@db.internal/keybroker",
        "postgresql://keybroker@db.internal/keybroker?password=hunter2",
    ],
)
def test_a_password_in_the_url_is_refused_without_repeating_it(tmp_path: Path, url: str) -> None:
    message = refused(tmp_path, f'[store]\nurl = "{url}"\n')
    assert "store.url must not hold the password" in message
    assert "KEYBROKER_DATABASE_PASSWORD" in message and "hunter2" not in message


def test_a_password_key_in_the_file_is_refused(tmp_path: Path) -> None:
    message = refused(tmp_path, f'[store]\nurl = "{URL}"\npassword = "hunter2"\n')
    assert "store.password" in message and "hunter2" not in message


def test_other_urls_and_sqlite_with_postgresql_are_refused(tmp_path: Path) -> None:
    assert "must start with postgresql://" in refused(
        tmp_path, '[store]\nurl = "mysql://db/keybroker"\n'
    )
    both = refused(tmp_path, f'database = "kb.db"\n[store]\nurl = "{URL}"\n')
    assert "not both" in both
    assert "between 1 and 100" in refused(tmp_path, f'[store]\nurl = "{URL}"\npool_size = 0\n')


def test_the_password_comes_from_the_environment_or_a_private_file(tmp_path: Path) -> None:
    secret = tmp_path / "db.password"
    secret.write_text("s3cret\n")
    secret.chmod(0o600)
    settings = load(tmp_path, f'[store]\nurl = "{URL}"\npassword_file = "{secret}"\n')
    assert settings.read_database_password({}) == "s3cret"
    assert settings.read_database_password({"KEYBROKER_DATABASE_PASSWORD": "env"}) == "env"
    assert "s3cret" not in repr(settings)
    secret.chmod(0o644)
    with pytest.raises(ConfigError, match=r"password file .* has mode 0644"):
        settings.read_database_password({})
    assert load(tmp_path, f'[store]\nurl = "{URL}"\n').read_database_password({}) is None


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_migration_files_are_numbered_without_gaps(backend: str) -> None:
    found = migrations.migrations(backend)
    assert [m.version for m in found] == list(range(1, len(found) + 1))
    assert all(m.statements for m in found)
    assert migrations.latest(backend) == found[-1].version


def test_a_script_splits_into_statements_without_its_comments() -> None:
    script = "-- a comment; with a semicolon\nCREATE TABLE a (x INT);\n\nCREATE INDEX i ON a (x);"
    assert migrations.split(script) == ("CREATE TABLE a (x INT)", "CREATE INDEX i ON a (x)")
