"""Configuration: one table of settings drives the file, the environment and the docs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from broker.config import (
    DEFAULT_LISTEN,
    HOME_ENV,
    HSM_PIN_ENV,
    OPTIONS,
    ConfigError,
    HsmConfig,
    Settings,
    load_settings,
    reference_table,
)
from broker.sink_settings import AuditSinkConfig

DOCS = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def load(tmp_path: Path, text: str | None = None, **env: str) -> Settings:
    config_file = None
    if text is not None:
        config_file = tmp_path / "kb.toml"
        config_file.write_text(text)
    return load_settings(home=tmp_path / "home", config_file=config_file, env=env)


def refused(tmp_path: Path, text: str, **env: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text, **env)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_defaults(tmp_path: Path) -> None:
    settings = load(tmp_path)
    home = (tmp_path / "home").resolve()
    assert settings == Settings(
        home=home,
        hsms=(
            HsmConfig(
                name="local",
                jurisdiction="FR",
                operator="local SoftHSM2 (development)",
                token_label="keybroker",
                pin_file=home / "hsm.pin",
                softhsm_init=True,
            ),
        ),
        default_hsm="local",
    )
    assert settings.listen == DEFAULT_LISTEN
    assert settings.admins == ("admin",) and settings.auditors == ("auditor",)
    assert settings.dev_pki and settings.database is None
    assert settings.rate_limit_per_second == 0.0 and settings.grace_seconds == 5.0


def test_the_documented_example_loads(tmp_path: Path) -> None:
    (example,) = re.findall(r"```toml\n(.*?)```", DOCS.read_text(), re.S)
    settings = load(tmp_path, example)
    home = (tmp_path / "home").resolve()
    assert settings.broker_id == "kb-paris-1" and settings.default_hsm == "paris"
    assert settings.database == home / "keybroker.db"
    assert settings.admins == ("secops-alice", "secops-bob") and settings.auditors == ("dpo",)
    assert not settings.dev_pki and settings.client_ca == Path("/etc/keybroker/clients-ca.pem")
    assert settings.rate_limit_per_second == 200.0 and settings.rate_limit_burst == 400
    assert isinstance(settings.grace_seconds, float)
    paris, frankfurt = settings.hsms
    assert paris.pin_env == "KEYBROKER_HSM_PIN" and paris.pin_file is None
    assert frankfurt.pin_file == Path("/etc/keybroker/hsm-de.pin") and frankfurt.pool_size == 4


def test_unknown_top_level_key(tmp_path: Path) -> None:
    message = refused(tmp_path, 'lisen = "0.0.0.0:50051"\n')
    assert message.startswith(f"{tmp_path / 'kb.toml'}: unknown setting lisen")
    assert "did you mean listen?" in message


def test_unknown_key_in_a_table(tmp_path: Path) -> None:
    message = refused(tmp_path, '[roles]\nadmin = ["alice"]\n')
    assert "kb.toml: unknown setting roles.admin;" in message
    assert "did you mean roles.admins?" in message


def test_unknown_key_in_an_hsm(tmp_path: Path) -> None:
    text = '[[hsm]]\nname = "a"\njurisdiction = "FR"\noperator = "o"\npin = "1234"\n'
    message = refused(tmp_path, text)
    assert "kb.toml: unknown setting hsm[0].pin" in message
    assert "1234" not in message


def test_wrong_type(tmp_path: Path) -> None:
    message = refused(tmp_path, 'grace_seconds = "five"\n')
    assert message == f"{tmp_path / 'kb.toml'}: grace_seconds must be a number, not a string"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[limits]\nmax_workers = true\n", "limits.max_workers must be an integer, not a boolean"),
        ("[limits]\nmax_workers = 1.5\n", "limits.max_workers must be an integer, not a float"),
        ("[roles]\nadmins = [1]\n", "roles.admins must be a list of strings, not an array"),
        ('database = ""\n', "database must be a path, not an empty string"),
        ("roles = 1\n", "roles must be a table"),
        ('[hsm]\nname = "a"\n', "hsm must be an array of tables"),
    ],
)
def test_wrong_types(tmp_path: Path, text: str, expected: str) -> None:
    assert f"kb.toml: {expected}" in refused(tmp_path, text)


def test_wrong_type_in_an_hsm(tmp_path: Path) -> None:
    text = (
        '[[hsm]]\nname = "a"\njurisdiction = "FR"\noperator = "o"\npin_env = "P"\n'
        '[[hsm]]\nname = "b"\njurisdiction = "DE"\noperator = "o"\npin_env = "P"\n'
        'pool_size = "4"\n'
    )
    message = refused(tmp_path, text)
    assert message.endswith("kb.toml: hsm[1].pool_size must be an integer, not a string")


def test_missing_required_keys(tmp_path: Path) -> None:
    assert refused(tmp_path, '[[hsm]]\nname = "x"\n').endswith("hsm[0].jurisdiction is required")
    assert refused(tmp_path, '[tls]\ncert = "s.pem"\n').endswith("tls.key is required")


def test_unreadable_file_is_one_line(tmp_path: Path) -> None:
    assert "cannot read config file" in refused(tmp_path, "listen = \n")


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    text = 'listen = "0.0.0.0:1"\n[roles]\nadmins = ["alice"]\n[[hsm]]\nname = "a"\n'
    text += 'jurisdiction = "FR"\noperator = "o"\npin_file = "a.pin"\n'
    settings = load(
        tmp_path,
        text,
        KEYBROKER_LISTEN="127.0.0.1:2",
        KEYBROKER_INSECURE_LISTEN="127.0.0.1:3",
        KEYBROKER_BROKER_ID="kb-2",
        KEYBROKER_ADMINS="bob, carol",
        KEYBROKER_AUDITORS="dpo",
        KEYBROKER_RATE_LIMIT="2.5",
        KEYBROKER_HSM_PIN="secret",
    )
    assert settings.listen == "127.0.0.1:2" and settings.insecure_listen == "127.0.0.1:3"
    assert settings.broker_id == "kb-2" and settings.issuer == "urn:keybroker:kb-2"
    assert settings.admins == ("bob", "carol") and settings.auditors == ("dpo",)
    assert settings.rate_limit_per_second == 2.5
    assert settings.hsms[0].pin_env == HSM_PIN_ENV
    assert settings.hsms[0].pin_file == (tmp_path / "home").resolve() / "a.pin"
    # An empty variable overrides nothing; the --listen flag wins over everything.
    assert load(tmp_path, text, KEYBROKER_LISTEN="").listen == "0.0.0.0:1"
    flagged = load_settings(
        home=tmp_path, listen="127.0.0.1:9", env={"KEYBROKER_LISTEN": "127.0.0.1:2"}
    )
    assert flagged.listen == "127.0.0.1:9"


def test_home_from_the_environment(tmp_path: Path) -> None:
    settings = load_settings(env={HOME_ENV: str(tmp_path / "h")})
    assert settings.home == (tmp_path / "h").resolve()


def test_bad_environment_value_is_one_line(tmp_path: Path) -> None:
    message = refused(tmp_path, "", KEYBROKER_RATE_LIMIT="fast")
    assert message == "KEYBROKER_RATE_LIMIT must be a number"


def test_every_option_sets_a_field() -> None:
    owners = {"hsm": HsmConfig, "audit.sinks": AuditSinkConfig}
    for option in OPTIONS:
        assert option.field in owners.get(option.table, Settings).__dataclass_fields__


def test_docs_list_every_setting_as_the_code_does() -> None:
    docs = DOCS.read_text()
    assert reference_table() in docs, (
        "docs/configuration.md must carry the settings table as the code renders it:\n"
        + reference_table()
    )
    for var in [o.env for o in OPTIONS if o.env] + [HOME_ENV, HSM_PIN_ENV]:
        assert f"`{var}`" in docs
