"""Configuration: one table of settings drives the file, the environment and the docs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from broker import config
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


def refused(tmp_path: Path, text: str | None, **env: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text, **env)
    message = str(info.value)
    assert "\n" not in message
    return message


def problems(tmp_path: Path, text: str | None, **env: str) -> list[str]:
    """Every line a configuration gets refused with (one run reports them all)."""
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text, **env)
    assert str(info.value) == "\n".join(info.value.problems)
    return list(info.value.problems)


def reference_row(option: config.Option) -> str:
    """The row `reference_table` renders for `option`."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(config, "OPTIONS", (option,))
        return config.reference_table().splitlines()[-1]


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
    assert message == f"{tmp_path / 'kb.toml'}: unknown key 'lisen'; did you mean 'listen'?"


def test_unknown_key_in_a_table(tmp_path: Path) -> None:
    message = refused(tmp_path, '[roles]\nadmin = ["alice"]\n')
    assert message.endswith("kb.toml: unknown key 'roles.admin'; did you mean 'roles.admins'?")
    message = refused(tmp_path, "[audit]\nchekpoint_events = 10\n")
    assert message.endswith(
        "kb.toml: unknown key 'audit.chekpoint_events'; did you mean 'audit.checkpoint_events'?"
    )


def test_a_key_in_the_wrong_table_names_its_table(tmp_path: Path) -> None:
    message = refused(tmp_path, "checkpoint_events = 10\n")
    assert message.endswith(
        "unknown key 'checkpoint_events'; did you mean 'audit.checkpoint_events'?"
    )


def test_a_pin_in_the_file_is_refused_and_never_repeated(tmp_path: Path) -> None:
    text = '[[hsm]]\nname = "a"\njurisdiction = "FR"\noperator = "o"\npin = "1234"\n'
    message = refused(tmp_path, text)
    assert message == (
        f"{tmp_path / 'kb.toml'}: 'hsm[0].pin' is a secret and is never read from the "
        "configuration file; use 'hsm[0].pin_file' (a file of mode 0600) or 'hsm[0].pin_env' "
        "(the name of an environment variable) or KEYBROKER_HSM_PIN (the first HSM's PIN)"
    )
    assert "1234" not in message


@pytest.mark.parametrize("text", ['password = "hunter2"\n', '[roles]\nso_pin = "hunter2"\n'])
def test_any_secret_looking_key_is_refused(tmp_path: Path, text: str) -> None:
    message = refused(tmp_path, text)
    assert "is a secret and is never read from the configuration file" in message
    assert "hunter2" not in message


def test_a_pin_where_the_variable_name_belongs_is_refused_unrepeated(tmp_path: Path) -> None:
    text = '[[hsm]]\nname = "a"\njurisdiction = "FR"\noperator = "o"\npin_env = "12 34"\n'
    message = refused(tmp_path, text)
    assert message == "hsm[0].pin_env must be the name of an environment variable"


def test_a_secret_option_comes_from_its_variable_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An option marked `secret` (a database password, say) is refused in the file, and the
    line names its variable and its file option."""
    roles = dict(config._OPTIONS_OF["roles"])
    roles["token"] = config.Option("roles", "token", config.Type.STRING, "x", secret=True)
    roles["token_file"] = config.Option("roles", "token_file", config.Type.PATH, "x")
    monkeypatch.setitem(config._OPTIONS_OF, "roles", roles)
    message = refused(tmp_path, '[roles]\ntoken = "s3cr3t"\n')
    assert message.endswith(
        "'roles.token' is a secret and is never read from the configuration file; use "
        "'roles.token_file' (a file of mode 0600) or the environment variable "
        "KEYBROKER_ROLES_TOKEN"
    )
    assert "s3cr3t" not in message
    row = reference_row(
        config.Option("roles", "token", config.Type.STRING, "x", "broker_id", secret=True)
    )
    assert "| `KEYBROKER_ROLES_TOKEN` (never in the file) |" in row


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
    assert problems(tmp_path, '[[hsm]]\nname = "x"\n') == [
        f"{tmp_path / 'kb.toml'}: hsm[0].jurisdiction is required",
        f"{tmp_path / 'kb.toml'}: hsm[0].operator is required",
    ]
    assert problems(tmp_path, '[tls]\ncert = "s.pem"\n') == [
        "tls.key is required with the other [tls] keys",
        "tls.client_ca is required with the other [tls] keys",
    ]


def test_every_problem_is_one_line(tmp_path: Path) -> None:
    text = (
        'workers = 0\ngrace_seconds = "5"\nlisen = "x"\n[limits]\nrate_limit_burst = 0\n'
        '[[hsm]]\nname = "a"\njurisdiction = "France"\noperator = "o"\npin_env = "P"\n'
        "pool_size = 65\n"
    )
    source = tmp_path / "kb.toml"
    assert problems(tmp_path, text) == [
        f"{source}: grace_seconds must be a number, not a string",
        f"{source}: unknown key 'lisen'; did you mean 'listen'?",
        "hsm[0].jurisdiction must be an ISO code such as 'FR'",
        "hsm[0].pool_size must be between 1 and 64, not 65",
        "workers must be between 1 and 64, not 0",
        "limits.rate_limit_burst must be at least 1, not 0",
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('listen = "50051"\n', "listen must be HOST:PORT with a port from 0 to 65535, not '50051'"),
        ('insecure_listen = "h:99999"\n', "insecure_listen must be HOST:PORT with a port"),
        ("grace_seconds = -1\n", "grace_seconds must be at least 0, not -1"),
        ("[limits]\nmax_workers = 0\n", "limits.max_workers must be at least 1, not 0"),
        ("[limits]\nrate_limit_per_second = -2\n", "limits.rate_limit_per_second must be at"),
        ("[audit]\ncheckpoint_seconds = 0\n", "audit.checkpoint_seconds must be more than 0"),
        ('default_hsm = "nope"\n', "default_hsm 'nope' is not the name of an [[hsm]] (local)"),
    ],
)
def test_out_of_range(tmp_path: Path, text: str, expected: str) -> None:
    assert refused(tmp_path, text).startswith(expected)


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
    assert message == "KEYBROKER_RATE_LIMIT (limits.rate_limit_per_second) must be a number"
    message = refused(tmp_path, "", KEYBROKER_HSM_0_SOFTHSM_INIT="maybe")
    assert message == "KEYBROKER_HSM_0_SOFTHSM_INIT (hsm.softhsm_init) must be a boolean"


#: A value each option's variable can take, by name; then by type.
ENV_SAMPLES = {"listen": "127.0.0.1:7", "insecure_listen": "127.0.0.1:8", "default_hsm": "local",
               "metrics.listen": "127.0.0.1:9", "store.url": "postgresql://kb@db.example/kb"}  # fmt: skip
#: Variables a setting needs beside it.
ENV_WITH = {"store.password_file": {"KEYBROKER_STORE_URL": "postgresql://kb@db.example/kb"}}
TYPE_SAMPLES = {
    config.Type.STRING: "x",
    config.Type.INTEGER: "7",
    config.Type.NUMBER: "2.5",
    config.Type.BOOLEAN: "true",
    config.Type.PATH: "p",
    config.Type.NAMES: "a, b",
}
TLS_FIELDS = {"tls_cert", "tls_key", "client_ca"}


@pytest.mark.parametrize(
    "option", [o for o in OPTIONS if o.table not in config.ARRAY_TABLES], ids=lambda o: o.name
)
def test_every_setting_has_its_variable(tmp_path: Path, option: config.Option) -> None:
    """KEYBROKER_ and the key, dots as underscores, upper case: `limits.max_workers` is
    KEYBROKER_LIMITS_MAX_WORKERS, and it wins over the file."""
    assert option.env_var == "KEYBROKER_" + option.name.replace(".", "_").upper()
    text = ENV_SAMPLES.get(option.name, TYPE_SAMPLES[option.type])
    env = {option.env_var: text, **ENV_WITH.get(option.name, {})}
    if option.field in TLS_FIELDS:  # the three go together
        env |= {o.env_var: "t" for o in OPTIONS if o.field in TLS_FIELDS and o is not option}
    settings = load(tmp_path, **env)
    value = getattr(settings, option.field)
    expected = {
        config.Type.INTEGER: 7,
        config.Type.NUMBER: 2.5,
        config.Type.BOOLEAN: True,
        config.Type.PATH: (tmp_path / "home").resolve() / "p",
        config.Type.NAMES: ("a", "b"),
    }.get(option.type, text)
    assert value == expected


def test_the_canonical_variable_wins_over_the_older_name(tmp_path: Path) -> None:
    settings = load(
        tmp_path,
        KEYBROKER_RATE_LIMIT="1",
        KEYBROKER_LIMITS_RATE_LIMIT_PER_SECOND="3",
        KEYBROKER_ROLES_ADMINS="root",
    )
    assert settings.rate_limit_per_second == 3.0 and settings.admins == ("root",)
    assert load(tmp_path, KEYBROKER_RATE_LIMIT="1").rate_limit_per_second == 1.0


def test_tls_from_the_environment_turns_the_development_pki_off(tmp_path: Path) -> None:
    settings = load(
        tmp_path, KEYBROKER_TLS_CERT="/c.pem", KEYBROKER_TLS_KEY="k", KEYBROKER_TLS_CLIENT_CA="a"
    )
    assert not settings.dev_pki and settings.tls_cert == Path("/c.pem")
    assert problems(tmp_path, None, KEYBROKER_TLS_CERT="/c.pem") == [
        "tls.key is required with the other [tls] keys",
        "tls.client_ca is required with the other [tls] keys",
    ]


def test_revocation_files_keep_the_development_pki(tmp_path: Path) -> None:
    settings = load(tmp_path, '[tls]\ncrl_file = "pki/clients.crl"\nrevocation_check_seconds = 0\n')
    assert settings.dev_pki and settings.tls_crl_file == tmp_path / "home" / "pki/clients.crl"
    assert settings.tls_revocation_check_seconds == 0.0
    assert problems(tmp_path, "[tls]\nrevocation_check_seconds = -1\n") == [
        "tls.revocation_check_seconds must be between 0 and 3600, not -1"
    ]


def test_hsm_and_sink_entries_by_index(tmp_path: Path) -> None:
    text = (
        '[[hsm]]\nname = "a"\njurisdiction = "FR"\noperator = "o"\npin_env = "P"\n'
        '[[hsm]]\nname = "b"\njurisdiction = "DE"\noperator = "o"\npin_env = "P"\n'
        '[[audit.sinks]]\ntype = "stdout"\n'
    )
    settings = load(
        tmp_path,
        text,
        KEYBROKER_HSM_1_POOL_SIZE="8",
        KEYBROKER_HSM_1_PIN_FILE="de.pin",
        KEYBROKER_AUDIT_SINKS_0_QUEUE_SIZE="50",
    )
    assert [h.pool_size for h in settings.hsms] == [4, 8]
    assert settings.hsms[1].pin_file == (tmp_path / "home").resolve() / "de.pin"
    assert settings.audit_sinks[0].queue_size == 50
    # The embedded HSM is hsm[0] too.
    assert load(tmp_path, KEYBROKER_HSM_0_POOL_SIZE="2").hsms[0].pool_size == 2
    assert problems(
        tmp_path, None, KEYBROKER_HSM_3_POOL_SIZE="2", KEYBROKER_HSM_0_POOLSIZE="2"
    ) == [
        "KEYBROKER_HSM_0_POOLSIZE: unknown key 'hsm[0].poolsize'; did you mean "
        "KEYBROKER_HSM_0_POOL_SIZE?",
        "KEYBROKER_HSM_3_POOL_SIZE: there is no hsm[3] (1 configured)",
    ]


def test_precedence_flag_then_environment_then_file_then_default(tmp_path: Path) -> None:
    text = 'listen = "127.0.0.1:1"\nbroker_id = "from-file"\n'
    env = {"KEYBROKER_LISTEN": "127.0.0.1:2", "KEYBROKER_BROKER_ID": "from-env"}
    config_file = tmp_path / "kb.toml"
    config_file.write_text(text)
    flagged = load_settings(tmp_path, listen="127.0.0.1:3", config_file=config_file, env=env)
    assert flagged.listen == "127.0.0.1:3" and flagged.broker_id == "from-env"
    assert load(tmp_path, text).broker_id == "from-file"
    assert load(tmp_path).broker_id == "keybroker-local"


def test_a_missing_config_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(tmp_path, config_file=tmp_path / "nope.toml", env={})
    assert str(info.value) == f"config file {tmp_path / 'nope.toml'} does not exist"


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
