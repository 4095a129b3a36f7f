"""Shared by the CLI edge tests: a broker home naming the fake broker, and a runner."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner, Result
from keybroker_client.cli import cli

from tests.unit.client_fakes import FakeBroker, Pki


def make_home(tmp_path: Path, client_pki: Pki, fake_broker: FakeBroker) -> Path:
    """A broker home as `make run` leaves it: pki/ and listen.addr naming the fake broker."""
    (tmp_path / "pki").symlink_to(client_pki.dir, target_is_directory=True)
    (tmp_path / "listen.addr").write_text(fake_broker.target + "\n")
    return tmp_path


def run(home: Path, *args: str, input: bytes | str | None = None) -> Result:
    """Runs the CLI with --home; it must end with SystemExit, never a traceback."""
    result = CliRunner().invoke(cli, ["--home", str(home), *args], input=input)
    if result.exception is not None:
        assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    return result
