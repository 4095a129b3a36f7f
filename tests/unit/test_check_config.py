"""`keybroker-server --check-config`: every problem one line naming the key, exit 2; else a
summary and exit 0. Nothing is opened: the home is not even created."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from broker.__main__ import main


def check(tmp_path: Path, text: str | None = None, **env: str) -> Result:
    args = ["--check-config", "--home", str(tmp_path / "home")]
    if text is not None:
        (tmp_path / "kb.toml").write_text(text)
        args += ["--config", str(tmp_path / "kb.toml")]
    # Only the variables the test gives: none of the machine's KEYBROKER_* leak in.
    clean: dict[str, str | None] = {k: None for k in os.environ if k.startswith("KEYBROKER_")}
    return CliRunner().invoke(main, args, env={**clean, **env})


def problem_lines(result: Result) -> list[str]:
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    return result.stderr.splitlines()


def test_the_defaults_are_ok_and_nothing_is_created(tmp_path: Path) -> None:
    result = check(tmp_path)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "ok: the settings are usable"
    assert f"  home      {(tmp_path / 'home').resolve()}" in lines
    assert "  listen    127.0.0.1:50051 (mutual TLS), 1 worker(s)" in lines
    assert "  env       no KEYBROKER_* setting" in lines
    # The development PKI is said for what it is, on stderr.
    assert "warning: development PKI: its CA key" in result.stderr
    assert not (tmp_path / "home").exists()


def test_a_typo_is_named_with_the_closest_key(tmp_path: Path) -> None:
    lines = problem_lines(check(tmp_path, "[audit]\nchekpoint_events = 10\n"))
    assert lines == [
        f"keybroker-server: {tmp_path / 'kb.toml'}: unknown key 'audit.chekpoint_events'; "
        "did you mean 'audit.checkpoint_events'?"
    ]


def test_every_problem_gets_its_line(tmp_path: Path) -> None:
    text = 'grace_seconds = "soon"\nworkers = 99\n[limits]\nmax_workrs = 3\n'
    lines = problem_lines(check(tmp_path, text))
    source = tmp_path / "kb.toml"
    assert lines == [
        f"keybroker-server: {source}: grace_seconds must be a number, not a string",
        f"keybroker-server: {source}: unknown key 'limits.max_workrs'; "
        "did you mean 'limits.max_workers'?",
        "keybroker-server: workers must be between 1 and 64, not 99",
    ]


def test_an_environment_override_is_checked_and_named_never_shown(tmp_path: Path) -> None:
    result = check(tmp_path, 'listen = "127.0.0.1:1"\n', KEYBROKER_LISTEN="127.0.0.1:7")
    assert result.exit_code == 0, result.output
    assert "  listen    127.0.0.1:7 (mutual TLS), 1 worker(s)" in result.stdout
    assert "  env       KEYBROKER_LISTEN" in result.stdout
    result = check(tmp_path, None, KEYBROKER_HSM_PIN="s3cret-pin")
    assert "  env       KEYBROKER_HSM_PIN" in result.stdout
    assert "PIN from $KEYBROKER_HSM_PIN" in result.stdout
    assert "s3cret-pin" not in result.output
    lines = problem_lines(check(tmp_path, None, KEYBROKER_LIMITS_MAX_WORKERS="many"))
    assert lines == [
        "keybroker-server: KEYBROKER_LIMITS_MAX_WORKERS (limits.max_workers) must be an integer"
    ]


def test_a_pin_in_the_file_is_refused(tmp_path: Path) -> None:
    text = '[[hsm]]\nname = "paris"\njurisdiction = "FR"\noperator = "o"\npin = "1234-5678"\n'
    result = check(tmp_path, text)
    (line,) = problem_lines(result)
    assert "'hsm[0].pin' is a secret and is never read from the configuration file" in line
    assert "'hsm[0].pin_file'" in line and "KEYBROKER_HSM_PIN" in line
    assert "1234-5678" not in result.output


def test_a_database_password_in_the_file_is_refused(tmp_path: Path) -> None:
    result = check(tmp_path, '[store]\npassword = "hunter2"\n')
    (line,) = problem_lines(result)
    assert line.endswith(
        "'store.password' is a secret and is never read from the configuration file; use "
        "'store.password_file' (a file of mode 0600) or the environment variable "
        "KEYBROKER_DATABASE_PASSWORD"
    )
    assert "hunter2" not in result.output


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '[[hsm]]\nname = "a"\njurisdiction = "FR"\noperator = "o"\npin_env = "KB_TEST_PIN"\n',
            "hsm[0].pin_env: the environment variable KB_TEST_PIN is not set",
        ),
        (
            '[[hsm]]\nname = "a"\njurisdiction = "FR"\noperator = "o"\npin_file = "a.pin"\n',
            "hsm[0].pin_file: PIN file {home}/a.pin does not exist",
        ),
        (
            '[[hsm]]\nname = "a"\njurisdiction = "FR"\noperator = "o"\npin_env = "P"\n'
            'module = "/nonexistent/libpkcs11.so"\n',
            "hsm[0].module: /nonexistent/libpkcs11.so does not exist",
        ),
        (
            '[tls]\ncert = "s.pem"\nkey = "s.key"\nclient_ca = "/nonexistent/ca.pem"\n',
            "tls.cert: {home}/s.pem does not exist",
        ),
    ],
)
def test_a_missing_file_or_variable_is_named(tmp_path: Path, text: str, expected: str) -> None:
    lines = problem_lines(check(tmp_path, text, P="x"))
    home = (tmp_path / "home").resolve()
    assert f"keybroker-server: {expected.format(home=home)}" in lines


def test_a_missing_config_file_is_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["--check-config", "--config", str(tmp_path / "no.toml")])
    assert problem_lines(result) == [
        f"keybroker-server: config file {tmp_path / 'no.toml'} does not exist"
    ]
