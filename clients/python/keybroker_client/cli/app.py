"""The root ``keybroker`` command, its global options, and the console-script entry point."""

from __future__ import annotations

import click

from keybroker_client.cli import approvals, audit, crypto, files, keys, rewrap, tokens
from keybroker_client.cli.completion import completion
from keybroker_client.cli.errors import ErrorReportingGroup
from keybroker_client.cli.state import State
from keybroker_client.client import DEFAULT_TIMEOUT


@click.group(cls=ErrorReportingGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--home",
    metavar="DIR",
    help="Broker home with listen.addr and pki/ [env KEYBROKER_HOME; default ./var].",
)
@click.option(
    "--target",
    metavar="HOST:PORT[,...]",
    help="Broker address; several interchangeable brokers as a:1,b:2 (calls fail over where "
    "safe) [env KEYBROKER_TARGET; default HOME/listen.addr, else 127.0.0.1:50051].",
)
@click.option("--ca", metavar="PEM", help="CA certificate [env KEYBROKER_CA; HOME/pki/ca.pem].")
@click.option(
    "--cert", metavar="PEM", help="Client certificate [env KEYBROKER_CERT; HOME/pki/NAME.pem]."
)
@click.option("--key", metavar="PEM", help="Client key [env KEYBROKER_KEY; HOME/pki/NAME.key].")
@click.option(
    "--as",
    "identity",
    metavar="NAME",
    help="Development identity: use HOME/pki/NAME.pem and NAME.key "
    "(admin, auditor, producer, consumer) [env KEYBROKER_IDENTITY; default admin].",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULT_TIMEOUT,
    show_default=True,
    help="Deadline of each call, in seconds.",
)
@click.option(
    "--output",
    "output_format",
    type=click.Choice(["table", "json"], case_sensitive=False),
    help="Output format: table (text for people, the default) or json.",
)
@click.option("--json", "json_output", is_flag=True, help="Same as --output json.")
@click.version_option(package_name="keybroker-client", prog_name="keybroker")
@click.pass_context
def cli(
    ctx: click.Context,
    *,
    home: str | None,
    target: str | None,
    ca: str | None,
    cert: str | None,
    key: str | None,
    identity: str | None,
    timeout: float,
    output_format: str | None,
    json_output: bool,
) -> None:
    """Client of the keybroker key broker (mutual TLS, talks to `keybroker-server`).

    By default it finds the local broker and the development certificates under ./var, as
    written by `make run`. Errors print one line, `keybroker: CODE: message`, and exit non-zero.
    """
    as_json = json_output or (output_format or "").lower() == "json"
    state = State(home, target, ca, cert, key, identity, timeout, as_json)
    ctx.obj = state
    ctx.call_on_close(state.close)


cli.add_command(keys.keys)
cli.add_command(keys.verify_receipt)
for command in crypto.COMMANDS:
    cli.add_command(command)
for command in files.COMMANDS:
    cli.add_command(command)
for command in rewrap.COMMANDS:
    cli.add_command(command)
cli.add_command(tokens.token)
cli.add_command(audit.audit)
cli.add_command(approvals.approvals)
cli.add_command(completion)


def main() -> None:
    """Console-script entry point of ``keybroker``."""
    # GRPC_VERBOSITY is set by the console script (keybroker_cli.main) before grpc loads.
    cli(prog_name="keybroker")
