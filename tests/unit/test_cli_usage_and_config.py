"""CLI edges around the command itself: one-line usage errors, Ctrl-C, the TLS files
checked before connecting, absolute paths, hints for remote targets, the profile file."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from keybroker_client.cli import cli
from keybroker_client.cli.errors import EXIT_CODES, ErrorReportingGroup
from keybroker_client.errors import ConfigError

from tests.unit.cli_support import make_home, run
from tests.unit.client_fakes import FakeBroker, Pki


@pytest.fixture
def home(tmp_path: Path, client_pki: Pki, fake_broker: FakeBroker) -> Path:
    return make_home(tmp_path, client_pki, fake_broker)


# ---------------------------------------------------------------------------------------------
# usage errors and Ctrl-C


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["keys", "create"], "keybroker: Missing argument 'KEY_ID'. (try --help)"),
        (["--bogus", "keys", "list"], "keybroker: No such option '--bogus'. (try --help)"),
        (["keys", "show"], "keybroker: Missing argument 'KEY_ID'. (try --help)"),
    ],
)
def test_usage_error_is_one_line_with_exit_2(home: Path, args: list[str], message: str) -> None:
    result = run(home, *args)
    assert result.exit_code == 2
    assert result.stderr == message + "\n"
    assert result.stdout == ""


def test_bad_option_value_is_one_line(home: Path) -> None:
    result = run(home, "token", "issue", "k", "--justification", "j", "--ttl", "soon")
    assert result.exit_code == 2
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith("keybroker: Invalid value for '--ttl': ")
    assert result.stderr.endswith(" (try --help)\n")


def _group_with(command: click.Command) -> click.Group:
    group = ErrorReportingGroup(name="keybroker")
    group.add_command(command)
    return group


@pytest.mark.parametrize("raised", [KeyboardInterrupt, click.Abort])
def test_ctrl_c_exits_130(raised: type[BaseException]) -> None:
    @click.command()
    def slow() -> None:
        raise raised()

    result = CliRunner().invoke(_group_with(slow), ["slow"])
    assert result.exit_code == 130
    assert result.stderr.strip() == "keybroker: interrupted"


def test_click_exception_keeps_its_status_on_one_line() -> None:
    @click.command()
    def odd() -> None:
        raise click.ClickException("something\nodd")

    result = CliRunner().invoke(_group_with(odd), ["odd"])
    assert result.exit_code == 1
    assert result.stderr == "keybroker: something odd\n"


def test_no_arguments_prints_the_help() -> None:
    result = CliRunner().invoke(cli, [])
    assert result.exit_code == 2
    assert "Usage: cli [OPTIONS] COMMAND" in result.output


def test_help_still_exits_0() -> None:
    result = CliRunner().invoke(cli, ["keys", "--help"])
    assert result.exit_code == 0
    assert result.stdout.startswith("Usage: cli keys")


def test_config_error_exit_code_is_unchanged() -> None:
    assert EXIT_CODES[ConfigError] == 3


# ---------------------------------------------------------------------------------------------
# PEM files checked before connecting


def _pem_args(client_pki: Pki, **swap: Path) -> list[str]:
    files = {
        "ca": client_pki.dir / "ca.pem",
        "cert": client_pki.dir / "admin.pem",
        "key": client_pki.dir / "admin.key",
    }
    files.update(swap)
    return [arg for name, path in files.items() for arg in (f"--{name}", str(path))]


@pytest.mark.parametrize(
    ("which", "content", "expected"),
    [
        ("ca", b"hello\n", "CA certificate {path} is not a PEM certificate"),
        ("cert", b"", "client certificate {path} is not a PEM certificate"),
        ("key", b"-----BEGIN PRIVATE KEY-----\nAAAA\n", "client key {path} is not a PEM private"),
    ],
)
def test_a_file_that_is_not_pem_is_a_config_error_before_connecting(
    home: Path,
    tmp_path: Path,
    client_pki: Pki,
    fake_broker: FakeBroker,
    which: str,
    content: bytes,
    expected: str,
) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_bytes(content)
    result = run(home, *_pem_args(client_pki, **{which: bad}), "keys", "list")
    assert result.exit_code == EXIT_CODES[ConfigError]
    assert result.stderr.startswith("keybroker: CONFIG: " + expected.format(path=bad.absolute()))
    assert len(result.stderr.splitlines()) == 1
    assert fake_broker.requests("ListKeys") == []


def test_a_key_in_place_of_the_certificate_is_a_config_error(
    home: Path, client_pki: Pki, fake_broker: FakeBroker
) -> None:
    key = client_pki.dir / "admin.key"
    result = run(home, *_pem_args(client_pki, cert=key), "keys", "list")
    assert result.exit_code == 3
    assert f"client certificate {key} is not a PEM certificate" in result.stderr


def test_a_key_of_another_identity_is_a_config_error(
    home: Path, client_pki: Pki, fake_broker: FakeBroker
) -> None:
    other = client_pki.dir / "consumer.key"
    result = run(home, *_pem_args(client_pki, key=other), "keys", "list")
    assert result.exit_code == 3
    assert result.stderr.strip() == (
        f"keybroker: CONFIG: client key {other} does not belong to client certificate "
        f"{client_pki.dir / 'admin.pem'}"
    )
    assert fake_broker.requests("ListKeys") == []


def test_an_encrypted_key_is_a_config_error(home: Path, tmp_path: Path, client_pki: Pki) -> None:
    from cryptography.hazmat.primitives import serialization

    plain = serialization.load_pem_private_key(client_pki.read("admin.key"), password=None)
    locked = tmp_path / "locked.key"
    locked.write_bytes(
        plain.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pw"),
        )
    )
    result = run(home, *_pem_args(client_pki, key=locked), "keys", "list")
    assert result.exit_code == 3
    assert "is encrypted" in result.stderr


# ---------------------------------------------------------------------------------------------
# outside the repository: absolute paths, hints, the profile file


def test_missing_files_are_named_by_absolute_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["--home", "elsewhere", "keys", "list"])
    assert result.exit_code == 3
    assert f"CA certificate not found: {tmp_path / 'elsewhere' / 'pki' / 'ca.pem'} " in (
        result.stderr
    )
    assert "keybroker-server --home DIR" in result.stderr


def test_a_remote_target_is_not_told_to_make_run(home: Path) -> None:
    from keybroker_client.cli.errors import is_local_target

    assert is_local_target("127.0.0.1:5") and is_local_target("localhost:5")
    assert is_local_target("[::1]:5") and is_local_target(None)
    assert not is_local_target("broker.example.org:443")
    assert not is_local_target("10.0.0.7:50051")
    # The error line for a failed connection, built without connecting anywhere: tests send
    # traffic to this machine only.
    from types import SimpleNamespace

    from keybroker_client.cli.errors import describe
    from keybroker_client.errors import Unavailable

    failure = Unavailable("UNAVAILABLE", "failed to connect to all addresses")
    remote = describe(failure, SimpleNamespace(connected_target="kb.example.org:443"))  # type: ignore[arg-type]
    assert "at kb.example.org:443" in remote and "--target" in remote
    assert "make run" not in remote
    local = describe(failure, SimpleNamespace(connected_target="127.0.0.1:50051"))  # type: ignore[arg-type]
    assert "make run" in local


def _profile(tmp_path: Path, text: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    profile = tmp_path / "profile" / "config.toml"
    profile.parent.mkdir(exist_ok=True)
    profile.write_text(text)
    monkeypatch.setenv("KEYBROKER_CONFIG", str(profile))
    return profile


def test_profile_gives_home_and_identity(
    home: Path, tmp_path: Path, fake_broker: FakeBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    from keybroker.v1 import key_admin_pb2

    from tests.unit.client_fakes import make_key

    fake_broker.responses["GetKey"] = key_admin_pb2.GetKeyResponse(key=make_key("k"))
    # A relative home is taken from the profile's directory.
    _profile(tmp_path, 'home = ".."\nidentity = "auditor"\n', monkeypatch)
    monkeypatch.chdir("/")
    result = CliRunner().invoke(cli, ["keys", "show", "k"])
    assert result.exit_code == 0, result.output
    assert fake_broker.calls[-1].principal == "auditor"
    # Options and the environment beat the profile.
    monkeypatch.setenv("KEYBROKER_IDENTITY", "producer")
    assert CliRunner().invoke(cli, ["keys", "show", "k"]).exit_code == 0
    assert fake_broker.calls[-1].principal == "producer"
    assert CliRunner().invoke(cli, ["--as", "consumer", "keys", "show", "k"]).exit_code == 0
    assert fake_broker.calls[-1].principal == "consumer"


def test_profile_target(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from keybroker_client.config import resolve_settings

    _profile(tmp_path, 'target = "broker.example.org:443"\n', monkeypatch)
    settings = resolve_settings(home=home)
    assert settings.target == "broker.example.org:443"
    assert resolve_settings(home=home, target="h:1").target == "h:1"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('colour = "blue"\n', "unknown setting 'colour' (known: target, home, identity)"),
        ("home = 3\n", "home must be a non-empty string"),
        ("home = \n", "is not valid TOML"),
    ],
)
def test_a_bad_profile_is_a_config_error(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, message: str
) -> None:
    profile = _profile(tmp_path, text, monkeypatch)
    result = run(home, "keys", "list")
    assert result.exit_code == 3
    assert result.stderr.startswith(f"keybroker: CONFIG: profile {profile}")
    assert message in result.stderr


def test_a_missing_explicit_profile_is_an_error_the_default_one_is_not(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from keybroker_client.config import load_profile

    assert load_profile({"XDG_CONFIG_HOME": str(tmp_path / "none")}) == {}
    assert load_profile({}) == {}
    monkeypatch.setenv("KEYBROKER_CONFIG", str(tmp_path / "nope.toml"))
    result = run(home, "keys", "list")
    assert result.exit_code == 3
    assert f"profile not found: {tmp_path / 'nope.toml'} (KEYBROKER_CONFIG)" in result.stderr


def test_default_profile_location(tmp_path: Path) -> None:
    from keybroker_client.config import load_profile

    (tmp_path / ".config" / "keybroker").mkdir(parents=True)
    (tmp_path / ".config" / "keybroker" / "config.toml").write_text('identity = "consumer"\n')
    assert load_profile({"HOME": str(tmp_path)}) == {"identity": "consumer"}


def test_an_unknown_identity_lists_the_known_ones(home: Path, client_pki: Pki) -> None:
    result = run(home, "--as", "nobody", "keys", "list")
    assert result.exit_code == 3
    pki = (home / "pki").absolute()
    assert result.stderr.strip() == (
        f"keybroker: CONFIG: client certificate not found: {pki / 'nobody.pem'}: unknown "
        f"identity 'nobody'; known under {pki}: admin, auditor, consumer, producer (create one "
        f"with `keybroker-server --home {home.absolute()} dev-identity NAME`)"
    )
