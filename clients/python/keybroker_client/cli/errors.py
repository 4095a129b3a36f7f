"""How the CLI ends on an error: one stderr line, ``keybroker: CODE: message``, and an exit
status per error class (documented in docs/cli.md); never a traceback."""

from __future__ import annotations

import os
import sys
from typing import Any, NoReturn

import click

from keybroker_client.cli.render import terminal_safe
from keybroker_client.cli.state import State
from keybroker_client.errors import (
    AlreadyExists,
    ConfigError,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    KeybrokerError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)

#: Exit status of ``audit verify`` when the log does not verify.
EXIT_VERIFY_FAILED = 1
#: Exit status when stdout is closed early by its reader (128 + SIGPIPE, as a shell reports).
EXIT_BROKEN_PIPE = 141
#: Exit status of any error class not in EXIT_CODES.
EXIT_OTHER = 13
#: Exit status per error class. Usage errors exit with click's 2.
EXIT_CODES: dict[type[KeybrokerError], int] = {
    ConfigError: 3,
    InvalidArgument: 4,
    Unauthenticated: 5,
    PermissionDenied: 6,
    NotFound: 7,
    AlreadyExists: 8,
    FailedPrecondition: 9,
    ResourceExhausted: 10,
    Unavailable: 11,
    DeadlineExceeded: 12,
}

# Substrings of gRPC's own messages when no connection could be made at all, as opposed to
# UNAVAILABLE sent by a running broker whose HSM or audit store is down.
_CONNECT_FAILURES = (
    "failed to connect",
    "connection refused",
    "dns resolution failed",
    "socket closed",
    "connection reset",
    "deadline exceeded while connecting",
)
_TLS_FAILURES = ("handshake", "ssl", "certificate", "tls")


def describe(exc: KeybrokerError, state: State | None) -> str:
    """The error line for ``exc``, with a hint when the broker could not be reached at all."""
    target = state.connected_target if state is not None else None
    lowered = exc.message.lower()
    if isinstance(exc, Unavailable) and any(s in lowered for s in _CONNECT_FAILURES):
        where = f" at {target}" if target else ""
        hint = "is the broker running? try `make run`"
        if any(s in lowered for s in _TLS_FAILURES):
            hint = "TLS handshake failed: check --ca/--cert/--key (or `make run` to recreate them)"
        elif "socket closed" in lowered:
            # What a client sees when the broker refuses its certificate under TLS 1.3.
            hint += "; if it is, check that --cert/--key were issued by the broker's CA"
        return f"UNAVAILABLE: cannot reach the broker{where}: {exc.message}; {hint}"
    if isinstance(exc, DeadlineExceeded) and state is not None:
        return (
            f"DEADLINE_EXCEEDED: no answer within {state.timeout:g}s ({exc.message}); "
            "is the broker running? raise --timeout if it is busy"
        )
    return str(exc)


def fail(ctx: click.Context, message: str, exit_code: int) -> NoReturn:
    """Prints ``keybroker: <message>`` as one line on stderr and exits with ``exit_code``."""
    # The message may quote what a caller sent (a key id): no control character reaches the
    # terminal.
    click.echo(f"keybroker: {terminal_safe(' '.join(message.split()))}", err=True)
    ctx.exit(exit_code)


def fail_usage(message: str) -> NoReturn:
    """Ends the command as a usage error (exit status 2), like click's own."""
    raise click.UsageError(message)


class ErrorReportingGroup(click.Group):
    """The root group: turns client errors into one stderr line and an exit status."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeybrokerError as exc:
            state = ctx.obj if isinstance(ctx.obj, State) else None
            fail(ctx, describe(exc, state), EXIT_CODES.get(type(exc), EXIT_OTHER))
        except BrokenPipeError:
            # The reader went away (`keybroker audit list | head`): stop quietly like other
            # Unix tools, and keep Python from failing again when it flushes stdout at exit.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            ctx.exit(EXIT_BROKEN_PIPE)
        except OSError as exc:
            # Local files given with --in/--out and friends.
            where = f": {exc.filename}" if exc.filename else ""
            fail(ctx, f"IO: {exc.strerror or exc}{where}", EXIT_CODES[ConfigError])
