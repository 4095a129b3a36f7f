"""How the CLI ends on an error: one stderr line, ``keybroker: CODE: message``, and an exit
status per error class (documented in docs/cli.md); never a traceback."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence
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
#: Exit status of a usage error (a bad option or argument), as click's.
EXIT_USAGE = 2
#: Exit status after Ctrl-C (128 + SIGINT, as a shell reports), distinct from 1 ("audit did not
#: verify").
EXIT_INTERRUPTED = 130
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

#: The CLI command of each broker RPC, for hints the broker words for any client.
RPC_COMMANDS = {
    "CreateKey": "keys create",
    "GetKey": "keys show",
    "ListKeys": "keys list",
    "RotateKey": "keys rotate",
    "UpdateKeyPolicy": "keys set-policy",
    "EnableKey": "keys enable",
    "DisableKey": "keys disable",
    "ScheduleKeyDestruction": "keys schedule-destruction",
    "CancelKeyDestruction": "keys cancel-destruction",
    "SetMinDecryptionVersion": "keys retire",
    "GetKeyUsage": "keys usage",
    "GetDestructionReceipt": "keys receipt",
    "GenerateDataKey": "datakey",
    "Encrypt": "encrypt",
    "Decrypt": "decrypt",
    "ReWrap": "rewrap",
    "ReWrapStream": "rewrap-file",
    "IssueToken": "token issue",
    "RevokeToken": "token revoke",
    "GetSigningKeys": "token jwks",
    "ListAuditEvents": "audit list",
    "VerifyAuditLog": "audit verify",
    "ExportAuditLog": "audit export",
    "ApproveRequest": "approvals approve",
    "GetApprovalRequest": "approvals show",
    "ListApprovalRequests": "approvals list",
    "CancelApprovalRequest": "approvals cancel",
}
# A qualified method anywhere ("Tokens.IssueToken"), or a bare one after "use"/"with": other
# occurrences of a bare name ("Decrypt denied") are not hints and stay.
_RPC_HINT = re.compile(
    r"\b(?:(?:KeyAdmin|Crypto|Tokens|Audit)\.(?P<qualified>[A-Za-z]+)\b"
    r"|(?P<verb>use|with) (?P<bare>[A-Z][A-Za-z]+)\b(?!\.))"
)


def cli_hints(message: str) -> str:
    """``message`` with the broker's RPC names in hints written as ``keybroker`` commands."""

    def command(match: re.Match[str]) -> str:
        name = match["qualified"] or match["bare"]
        if name not in RPC_COMMANDS:
            return match[0]
        prefix = f"{match['verb']} " if match["verb"] else ""
        return f"{prefix}`keybroker {RPC_COMMANDS[name]}`"

    return _RPC_HINT.sub(command, message)


def is_local_target(target: str | None) -> bool:
    """Whether ``target`` (every broker of ``a:1,b:2``) is this machine: only then can
    `make run` be the fix."""
    if not target:
        return True
    hosts = [t.strip().rsplit(":", 1)[0].strip("[]").lower() for t in target.split(",")]
    return all(h in {"localhost", "::1", ""} or h.startswith("127.") for h in hosts)


def describe(exc: KeybrokerError, state: State | None) -> str:
    """The error line for ``exc``, with a hint when the broker could not be reached at all."""
    target = state.connected_target if state is not None else None
    lowered = exc.message.lower()
    if isinstance(exc, Unavailable) and any(s in lowered for s in _CONNECT_FAILURES):
        where = f" at {target}" if target else ""
        local = is_local_target(target)
        hint = (
            "is the broker running? try `make run` (or `keybroker-server`)"
            if local
            else "is the broker running there, and is the address right? (--target)"
        )
        if any(s in lowered for s in _TLS_FAILURES):
            hint = "TLS handshake failed: check --ca/--cert/--key" + (
                " (or `make run` to recreate them)" if local else ""
            )
        elif "socket closed" in lowered:
            # What a client sees when the broker refuses its certificate under TLS 1.3.
            hint += "; if it is, check that --cert/--key were issued by the broker's CA"
        return f"UNAVAILABLE: cannot reach the broker{where}: {exc.message}; {hint}"
    if isinstance(exc, DeadlineExceeded) and state is not None:
        return (
            f"DEADLINE_EXCEEDED: no answer within {state.timeout:g}s ({exc.message}); "
            "is the broker running? raise --timeout if it is busy"
        )
    return cli_hints(str(exc))


def fail(ctx: click.Context, message: str, exit_code: int) -> NoReturn:
    """Prints ``keybroker: <message>`` as one line on stderr and exits with ``exit_code``."""
    # The message may quote what a caller sent (a key id): no control character reaches the
    # terminal.
    _one_line(message)
    ctx.exit(exit_code)


def fail_usage(message: str) -> NoReturn:
    """Ends the command as a usage error (exit status 2), like click's own."""
    raise click.UsageError(message)


def _one_line(message: str) -> None:
    click.echo(f"keybroker: {terminal_safe(' '.join(message.split()))}", err=True)


class ErrorReportingGroup(click.Group):
    """The root group: turns client errors into one stderr line and an exit status."""

    def main(  # type: ignore[override]
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        """Runs the CLI; in standalone mode, usage errors and Ctrl-C end in one stderr line.

        Click's own report of a usage error takes three lines (``Usage:``, ``Try``,
        ``Error:``) and Ctrl-C exits 1, the status of "audit did not verify"; here a usage
        error is ``keybroker: <message> (try --help)`` with status 2 and Ctrl-C exits 130.
        """
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            status = super().main(args, prog_name, complete_var, False, **extra)
        except click.exceptions.NoArgsIsHelpError as exc:
            exc.show()  # `keybroker` alone: the help itself, not an error line.
            sys.exit(EXIT_USAGE)
        except click.UsageError as exc:
            _one_line(f"{exc.format_message()} (try --help)")
            sys.exit(EXIT_USAGE)
        except (click.Abort, KeyboardInterrupt):
            _one_line("interrupted")
            sys.exit(EXIT_INTERRUPTED)
        except click.ClickException as exc:
            _one_line(exc.format_message())
            sys.exit(exc.exit_code)
        # Without standalone mode click returns the command's value or the status of an
        # explicit ctx.exit(); commands return None.
        sys.exit(status if isinstance(status, int) else 0)

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
