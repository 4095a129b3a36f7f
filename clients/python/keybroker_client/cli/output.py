"""Writing results: JSON, base64, raw bytes to files (secrets with mode 0600), and reading blobs."""

from __future__ import annotations

import base64
import binascii
import json
import os
import sys
from typing import IO, Any

import click

from keybroker_client.cli import render
from keybroker_client.cli.state import State
from keybroker_client.types import Key


def b64(data: bytes) -> str:
    """Standard base64 text of ``data``."""
    return base64.b64encode(data).decode("ascii")


def echo_json(obj: Any, *, lines: bool = False) -> None:
    """Prints ``obj`` as indented JSON, or as one compact line with ``lines`` (JSON lines)."""
    click.echo(json.dumps(obj, separators=(",", ":")) if lines else json.dumps(obj, indent=2))


def echo_key(state: State, key: Key) -> None:
    """Prints a key as JSON or as text, as the options ask."""
    if state.json:
        echo_json(render.key_to_dict(key))
    else:
        click.echo(render.key_text(key))


def stdout_is_terminal() -> bool:
    """Whether stdout is a terminal (not a pipe or a file)."""
    return sys.stdout.isatty()


def refuse_secret_on_terminal(allowed: bool, what: str, instead: str) -> None:
    """Ends with a usage error if ``what`` (a secret) would be printed to a terminal.

    A terminal keeps it in its scroll-back, screen recordings and shared sessions; a pipe or a
    file is the caller's deliberate choice. Checked before any call, so nothing is generated,
    decrypted or audited for output that would be refused.

    Args:
        allowed: the caller gave ``--plaintext-to-terminal``.
        what: the secret, as the message names it.
        instead: the options that put it elsewhere, as the message suggests them.
    """
    if not allowed and stdout_is_terminal():
        raise click.UsageError(
            f"refusing to print {what} to a terminal: use {instead}, pipe the output, "
            "or pass --plaintext-to-terminal"
        )


def plaintext_to_terminal_flag(func: Any) -> Any:
    """Adds ``--plaintext-to-terminal``: the explicit consent to print a secret on a terminal."""
    return click.option(
        "--plaintext-to-terminal",
        is_flag=True,
        help="Print the plaintext even when stdout is a terminal (refused by default: it is "
        "a secret, and stays in scroll-back). Pipes and files need no flag.",
    )(func)


def write_out(path: str, data: bytes, *, secret: bool) -> None:
    """Writes raw bytes to a file (``-`` for stdout); secret files are created mode 0600."""
    if path == "-":
        with click.open_file("-", "wb") as stream:
            stream.write(data)
            stream.flush()
        return
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if secret else 0o644)
    with os.fdopen(fd, "wb") as fh:
        if secret:
            # The file may have existed with wider permissions.
            os.fchmod(fh.fileno(), 0o600)
        fh.write(data)


def read_blob(in_file: IO[bytes] | None, blob_b64: str | None) -> bytes:
    """The blob given with exactly one of ``--in`` and ``--wrapped-b64``."""
    if (in_file is None) == (blob_b64 is None):
        raise click.UsageError("give the blob with exactly one of --in FILE and --wrapped-b64")
    if in_file is not None:
        return in_file.read()
    assert blob_b64 is not None
    text = blob_b64.strip()
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=False)
    except (binascii.Error, ValueError):
        raise click.BadParameter("not base64", param_hint="--wrapped-b64") from None
