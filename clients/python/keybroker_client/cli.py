"""The ``keybroker`` command line: keys, data keys, encryption, tokens and the audit log.

Errors end the command with one line on stderr, ``keybroker: CODE: message``, and an exit code
per error class (see ``EXIT_CODES`` and docs/cli.md); never with a traceback.
"""

from __future__ import annotations

import os

# gRPC core reads its log level when it is first imported, and logs TLS handshake failures on
# stderr; the CLI reports those itself in its one error line. A GRPC_VERBOSITY set by the user
# still wins. This must run before anything below imports grpc.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import base64
import binascii
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import IO, Any, NoReturn, TypeVar

import click
from keybroker.v1 import resources_pb2

from keybroker_client import _render
from keybroker_client.client import DEFAULT_TIMEOUT, KeybrokerClient, cert_thumbprint
from keybroker_client.config import resolve_settings
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
from keybroker_client.parsing import parse_context, parse_duration, parse_time, policy_from_grants

F = TypeVar("F", bound=Callable[..., Any])

#: Exit status of ``audit verify`` when the log does not verify.
EXIT_VERIFY_FAILED = 1
#: Exit status of click usage errors: unknown option, bad --context, --grant or duration.
EXIT_USAGE = 2
#: Exit status when stdout is closed early by its reader (128 + SIGPIPE, as a shell reports).
EXIT_BROKEN_PIPE = 141
#: Exit status of any error class not in EXIT_CODES.
EXIT_OTHER = 13
#: Exit status per error class; documented in docs/cli.md.
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
#: The broker's Encrypt RPC takes at most this many bytes; larger data goes through datakey.
MAX_ENCRYPT_BYTES = 64 * 1024

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


@dataclass
class _State:
    """Global options, and the client opened on first use."""

    home: str | None
    target: str | None
    ca: str | None
    cert: str | None
    key: str | None
    identity: str | None
    timeout: float
    json: bool
    _client: KeybrokerClient | None = field(default=None, repr=False)

    def client(self) -> KeybrokerClient:
        if self._client is None:
            settings = resolve_settings(
                home=self.home,
                target=self.target,
                ca=self.ca,
                cert=self.cert,
                key=self.key,
                identity=self.identity,
            )
            self._client = KeybrokerClient.from_settings(settings, timeout=self.timeout)
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def _describe(exc: KeybrokerError, state: _State | None) -> str:
    text = str(exc)
    target = state._client.target if state is not None and state._client is not None else None
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
    return text


class _KeybrokerGroup(click.Group):
    """The root group: turns client errors into one stderr line and an exit status."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeybrokerError as exc:
            state = ctx.obj if isinstance(ctx.obj, _State) else None
            _fail(ctx, _describe(exc, state), EXIT_CODES.get(type(exc), EXIT_OTHER))
        except BrokenPipeError:
            # The reader went away (`keybroker audit list | head`): stop quietly like other
            # Unix tools, and keep Python from failing again when it flushes stdout at exit.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            ctx.exit(EXIT_BROKEN_PIPE)
        except OSError as exc:
            # Local files given with --in/--out and friends.
            where = f": {exc.filename}" if exc.filename else ""
            _fail(ctx, f"IO: {exc.strerror or exc}{where}", EXIT_CODES[ConfigError])


def _fail(ctx: click.Context, message: str, exit_code: int) -> NoReturn:
    """Prints ``keybroker: <message>`` as one line on stderr and exits with ``exit_code``."""
    click.echo(f"keybroker: {' '.join(message.split())}", err=True)
    ctx.exit(exit_code)


def _state(ctx: click.Context) -> _State:
    return ctx.find_object(_State)  # type: ignore[return-value]


def _json_flag(func: F) -> F:
    """Adds a local ``--json`` to a command, same as the global one."""

    def set_json(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
        if value:
            _state(ctx).json = True

    return click.option(
        "--json",
        is_flag=True,
        expose_value=False,
        callback=set_json,
        help="Machine-readable JSON output (same as the global --json).",
    )(func)


class _DurationType(click.ParamType):
    name = "DURATION"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, timedelta):
            return value
        try:
            return parse_duration(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


DURATION = _DurationType()


def _context_callback(
    _ctx: click.Context, param: click.Parameter, value: tuple[str, ...]
) -> dict[str, str]:
    try:
        return parse_context(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param=param) from None


def _context_option(func: F) -> F:
    return click.option(
        "--context",
        "context",
        multiple=True,
        metavar="KEY=VALUE",
        callback=_context_callback,
        help="Encryption context entry; repeat for several. The value may contain '='.",
    )(func)


def _time_callback(
    _ctx: click.Context, param: click.Parameter, value: str | None
) -> datetime | None:
    if value is None:
        return None
    try:
        return parse_time(value, now=datetime.now(UTC))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param=param) from None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _echo_json(obj: Any, *, lines: bool = False) -> None:
    click.echo(json.dumps(obj, separators=(",", ":")) if lines else json.dumps(obj, indent=2))


def _write_out(path: str, data: bytes, *, secret: bool) -> None:
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


def _read_blob(in_file: IO[bytes] | None, blob_b64: str | None) -> bytes:
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


def _echo_key(state: _State, key: resources_pb2.Key) -> None:
    if state.json:
        _echo_json(_render.key_to_dict(key))
    else:
        click.echo(_render.key_text(key))


def _policy(
    grants: tuple[str, ...], jurisdictions: tuple[str, ...], max_token_ttl: timedelta | None
) -> resources_pb2.KeyPolicy:
    try:
        return policy_from_grants(grants, jurisdictions, max_token_ttl=max_token_ttl)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--grant/--jurisdiction") from None


def _fail_usage(message: str) -> NoReturn:
    raise click.UsageError(message)


_GRANT_HELP = (
    "PRINCIPAL:OPS[:k=v,k2=v2]. OPS is encrypt, decrypt, rewrap joined with '+' "
    "(producer:encrypt+rewrap); the optional k=v list is the context every token under the "
    "grant must carry (consumer:decrypt:dataset=cohort-42; a value ending in '*' matches by "
    "prefix). Repeat for several grants."
)


@click.group(cls=_KeybrokerGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--home",
    metavar="DIR",
    help="Broker home with listen.addr and pki/ [env KEYBROKER_HOME; default ./var].",
)
@click.option(
    "--target",
    metavar="HOST:PORT",
    help="Broker address [env KEYBROKER_TARGET; default HOME/listen.addr, else 127.0.0.1:50051].",
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
@click.option("--json", "json_output", is_flag=True, help="Machine-readable JSON output.")
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
    json_output: bool,
) -> None:
    """Client of the keybroker key broker (mutual TLS, talks to `keybroker-server`).

    By default it finds the local broker and the development certificates under ./var, as
    written by `make run`. Errors print one line, `keybroker: CODE: message`, and exit non-zero.
    """
    state = _State(home, target, ca, cert, key, identity, timeout, json_output)
    ctx.obj = state
    ctx.call_on_close(state.close)


# keys


@cli.group()
def keys() -> None:
    """Create and manage keys (admin; auditors may list and show)."""


@keys.command("create")
@click.argument("key_id")
@click.option("--description", default="", help="Free text shown with the key.")
@click.option("--grant", "grants", multiple=True, metavar="GRANT", help=_GRANT_HELP)
@click.option(
    "--max-token-ttl",
    type=DURATION,
    help="Longest token lifetime for the decrypt grants, e.g. 15m (broker cap: 1h).",
)
@click.option(
    "--jurisdiction",
    "jurisdictions",
    multiple=True,
    metavar="CC",
    help="ISO 3166-1 code of a jurisdiction whose HSMs may hold the key; repeat. Default: EU/EEA.",
)
@click.option("--rotation-period", type=DURATION, help="Rotate automatically, e.g. 30d.")
@click.option("--hsm", default="", metavar="NAME", help="Configured HSM to create the key on.")
@_json_flag
@click.pass_context
def keys_create(
    ctx: click.Context,
    *,
    key_id: str,
    description: str,
    grants: tuple[str, ...],
    max_token_ttl: timedelta | None,
    jurisdictions: tuple[str, ...],
    rotation_period: timedelta | None,
    hsm: str,
) -> None:
    """Create KEY_ID; version 1 is generated inside the HSM."""
    state = _state(ctx)
    policy = _policy(grants, jurisdictions, max_token_ttl)
    key = state.client().create_key(
        key_id, description=description, policy=policy, rotation_period=rotation_period, hsm=hsm
    )
    _echo_key(state, key)


@keys.command("list")
@click.option(
    "--page-size",
    type=click.IntRange(1, 1000),
    default=100,
    show_default=True,
    help="Keys per request; every page is fetched.",
)
@_json_flag
@click.pass_context
def keys_list(ctx: click.Context, page_size: int) -> None:
    """List every key, one per line (JSON lines with --json)."""
    state = _state(ctx)
    for key in state.client().iter_keys(page_size=page_size):
        if state.json:
            _echo_json(_render.key_to_dict(key), lines=True)
        else:
            click.echo(_render.key_row(key))


@keys.command("show")
@click.argument("key_id")
@_json_flag
@click.pass_context
def keys_show(ctx: click.Context, key_id: str) -> None:
    """Show KEY_ID's metadata and policy."""
    state = _state(ctx)
    _echo_key(state, state.client().get_key(key_id))


@keys.command("rotate")
@click.argument("key_id")
@_json_flag
@click.pass_context
def keys_rotate(ctx: click.Context, key_id: str) -> None:
    """Make a new version primary; older versions still decrypt."""
    state = _state(ctx)
    _echo_key(state, state.client().rotate_key(key_id))


@keys.command("enable")
@click.argument("key_id")
@_json_flag
@click.pass_context
def keys_enable(ctx: click.Context, key_id: str) -> None:
    """Enable a disabled key."""
    state = _state(ctx)
    _echo_key(state, state.client().enable_key(key_id))


@keys.command("disable")
@click.argument("key_id")
@_json_flag
@click.pass_context
def keys_disable(ctx: click.Context, key_id: str) -> None:
    """Disable a key: it neither encrypts nor decrypts until enabled."""
    state = _state(ctx)
    _echo_key(state, state.client().disable_key(key_id))


@keys.command("set-policy")
@click.argument("key_id")
@click.option("--grant", "grants", multiple=True, metavar="GRANT", help=_GRANT_HELP)
@click.option(
    "--max-token-ttl", type=DURATION, help="Longest token lifetime for the decrypt grants."
)
@click.option(
    "--jurisdiction", "jurisdictions", multiple=True, metavar="CC", help="As for keys create."
)
@click.option(
    "--no-grants",
    is_flag=True,
    help="Confirm a policy without any grant (nobody but admins may use the key).",
)
@_json_flag
@click.pass_context
def keys_set_policy(
    ctx: click.Context,
    *,
    key_id: str,
    grants: tuple[str, ...],
    max_token_ttl: timedelta | None,
    jurisdictions: tuple[str, ...],
    no_grants: bool,
) -> None:
    """Replace KEY_ID's whole policy with the given grants and jurisdictions."""
    if not grants and not no_grants:
        _fail_usage("give at least one --grant, or --no-grants to remove every grant")
    if grants and no_grants:
        _fail_usage("--no-grants and --grant exclude each other")
    state = _state(ctx)
    policy = _policy(grants, jurisdictions, max_token_ttl)
    _echo_key(state, state.client().update_key_policy(key_id, policy))


@keys.command("schedule-destruction")
@click.argument("key_id")
@click.option(
    "--pending-window", type=DURATION, help="Time until destruction, e.g. 7d (broker default)."
)
@_json_flag
@click.pass_context
def keys_schedule_destruction(
    ctx: click.Context, *, key_id: str, pending_window: timedelta | None
) -> None:
    """Schedule destruction of every version of KEY_ID."""
    state = _state(ctx)
    _echo_key(state, state.client().schedule_key_destruction(key_id, pending_window))


@keys.command("cancel-destruction")
@click.argument("key_id")
@_json_flag
@click.pass_context
def keys_cancel_destruction(ctx: click.Context, key_id: str) -> None:
    """Cancel a scheduled destruction; the key comes back disabled."""
    state = _state(ctx)
    _echo_key(state, state.client().cancel_key_destruction(key_id))


# data keys and blobs


@cli.command("datakey")
@click.argument("key_id")
@_context_option
@click.option(
    "--out",
    "out_path",
    metavar="FILE",
    help="Write the wrapped key (raw bytes) to FILE and leave the plaintext key out of stdout.",
)
@click.option(
    "--show-plaintext",
    is_flag=True,
    help="With --out, still print the plaintext key. It is a secret: anyone who sees it can "
    "read the data it encrypts, so it is hidden from stdout (and terminal scroll-back, logs "
    "and CI output) unless asked for.",
)
@click.option(
    "--plaintext-out",
    metavar="FILE",
    help="Write the plaintext key (raw 32 bytes) to FILE, created with mode 0600.",
)
@click.pass_context
def datakey(
    ctx: click.Context,
    *,
    key_id: str,
    context: dict[str, str],
    out_path: str | None,
    show_plaintext: bool,
    plaintext_out: str | None,
) -> None:
    """Generate a data key under KEY_ID and print it as JSON.

    Prints {key_id, key_version, plaintext_key, wrapped_key}, bytes in base64. With --out the
    wrapped key goes to FILE and the plaintext key is printed only with --show-plaintext.
    Needs an encrypt grant.
    """
    state = _state(ctx)
    dk = state.client().generate_data_key(key_id, context)
    out: dict[str, Any] = {"key_id": dk.key_id, "key_version": dk.key_version}
    if plaintext_out:
        _write_out(plaintext_out, dk.plaintext_key, secret=True)
        out["plaintext_key_file"] = plaintext_out
    if out_path:
        _write_out(out_path, dk.wrapped_key, secret=False)
        out["wrapped_key_file"] = out_path
        if show_plaintext:
            out["plaintext_key"] = _b64(dk.plaintext_key)
    else:
        if not plaintext_out or show_plaintext:
            out["plaintext_key"] = _b64(dk.plaintext_key)
        out["wrapped_key"] = _b64(dk.wrapped_key)
    _echo_json(out)


def _emit_blob(state: _State, blob: bytes, key_id: str, version: int, out_path: str | None) -> None:
    if out_path:
        _write_out(out_path, blob, secret=False)
        if state.json and out_path != "-":
            _echo_json({"key_id": key_id, "key_version": version, "out": out_path})
    elif state.json:
        _echo_json({"ciphertext": _b64(blob), "key_id": key_id, "key_version": version})
    else:
        click.echo(_b64(blob))


@cli.command("encrypt")
@click.argument("key_id")
@_context_option
@click.option(
    "--in",
    "in_file",
    type=click.File("rb"),
    metavar="FILE|-",
    default="-",
    show_default=True,
    help="Plaintext to encrypt (at most 64 KiB); - for stdin.",
)
@click.option(
    "--out",
    "out_path",
    metavar="FILE|-",
    help="Write the ciphertext (raw bytes) to FILE or - (stdout). Default: print base64.",
)
@_json_flag
@click.pass_context
def encrypt(
    ctx: click.Context,
    *,
    key_id: str,
    context: dict[str, str],
    in_file: IO[bytes],
    out_path: str | None,
) -> None:
    """Encrypt a small payload inside the HSM under KEY_ID (needs an encrypt grant).

    For larger data use `keybroker datakey` and encrypt locally with the data key.
    """
    state = _state(ctx)
    data = in_file.read(MAX_ENCRYPT_BYTES + 1)
    if len(data) > MAX_ENCRYPT_BYTES:
        _fail_usage(
            f"input is over {MAX_ENCRYPT_BYTES} bytes, the limit of encrypt; "
            "use `keybroker datakey` and encrypt locally"
        )
    result = state.client().encrypt(key_id, data, context)
    _emit_blob(state, result.ciphertext, result.key_id, result.key_version, out_path)


def _token_value(token: str | None, token_file: str | None) -> str:
    if token is not None and token_file is not None:
        _fail_usage("--token and --token-file exclude each other")
    if token_file is not None:
        with open(token_file, encoding="utf-8") as fh:
            token = fh.read().strip()
    if not token:
        _fail_usage("give a token with --token, --token-file or KEYBROKER_TOKEN")
    return token.strip()


def _blob_options(func: F) -> F:
    func = click.option(
        "--wrapped-b64",
        "--ciphertext-b64",
        "blob_b64",
        metavar="BASE64",
        help="The blob (wrapped key or ciphertext) as base64 instead of --in.",
    )(func)
    return click.option(
        "--in",
        "in_file",
        type=click.File("rb"),
        metavar="FILE|-",
        help="The blob (wrapped key or ciphertext) as a raw file; - for stdin.",
    )(func)


@cli.command("decrypt")
@click.option(
    "--token",
    envvar="KEYBROKER_TOKEN",
    metavar="TOKEN",
    help="Token from `keybroker token issue` [env KEYBROKER_TOKEN].",
)
@click.option(
    "--token-file",
    type=click.Path(exists=True, dir_okay=False),
    help="File holding the token (keeps it out of the process list).",
)
@_context_option
@_blob_options
@click.option(
    "--out",
    "out_path",
    metavar="FILE|-",
    help="Write the plaintext (raw bytes) to FILE (mode 0600) or - (stdout). "
    "Default: print it in base64.",
)
@_json_flag
@click.pass_context
def decrypt(
    ctx: click.Context,
    *,
    token: str | None,
    token_file: str | None,
    context: dict[str, str],
    in_file: IO[bytes] | None,
    blob_b64: str | None,
    out_path: str | None,
) -> None:
    """Decrypt a wrapped data key or ciphertext with a token.

    The blob names its key and version; give the same --context it was made with.
    """
    state = _state(ctx)
    token_text = _token_value(token, token_file)
    blob = _read_blob(in_file, blob_b64)
    result = state.client().decrypt(blob, context, token_text)
    if out_path:
        _write_out(out_path, result.plaintext, secret=True)
        if state.json and out_path != "-":
            _echo_json({"key_id": result.key_id, "key_version": result.key_version})
    elif state.json:
        _echo_json(
            {
                "plaintext": _b64(result.plaintext),
                "key_id": result.key_id,
                "key_version": result.key_version,
            }
        )
    else:
        click.echo(_b64(result.plaintext))


@cli.command("rewrap")
@_context_option
@_blob_options
@click.option(
    "--out",
    "out_path",
    metavar="FILE|-",
    help="Write the new blob (raw bytes) to FILE or - (stdout). Default: print base64.",
)
@_json_flag
@click.pass_context
def rewrap(
    ctx: click.Context,
    *,
    context: dict[str, str],
    in_file: IO[bytes] | None,
    blob_b64: str | None,
    out_path: str | None,
) -> None:
    """Re-encrypt a blob under its key's primary version (admin or rewrap grant)."""
    state = _state(ctx)
    blob = _read_blob(in_file, blob_b64)
    result = state.client().rewrap(blob, context)
    _emit_blob(state, result.ciphertext, result.key_id, result.key_version, out_path)


# tokens


@cli.group()
def token() -> None:
    """Issue and revoke decryption tokens; show the signing keys."""


@token.command("issue")
@click.argument("key_id")
@_context_option
@click.option("--justification", required=True, help="Why the data is needed (audited).")
@click.option("--ttl", type=DURATION, help="Lifetime, e.g. 5m (broker default 5m, cap 1h).")
@click.option("--subject", metavar="NAME", help="Admin only: issue for another principal.")
@click.option(
    "--subject-cert",
    type=click.Path(exists=True, dir_okay=False),
    metavar="PEMFILE",
    help="With --subject: that principal's certificate; the token is bound to it.",
)
@click.option(
    "--max-uses",
    type=click.IntRange(0, 10_000),
    default=0,
    show_default=True,
    help="How many decrypts the token allows; 0 means no limit within its lifetime.",
)
@_json_flag
@click.pass_context
def token_issue(
    ctx: click.Context,
    *,
    key_id: str,
    context: dict[str, str],
    justification: str,
    ttl: timedelta | None,
    subject: str | None,
    subject_cert: str | None,
    max_uses: int,
) -> None:
    """Issue a token for KEY_ID and print only the token, so that a shell can capture it:

    \b
        TOKEN=$(keybroker --as consumer token issue KEY_ID \\
                --context dataset=cohort-42 --justification "study 7")

    --json prints token, token_id and expire_time instead.
    """
    if (subject is None) != (subject_cert is None):
        _fail_usage("--subject and --subject-cert go together")
    thumbprint = ""
    if subject_cert is not None:
        with open(subject_cert, "rb") as fh:
            pem = fh.read()
        try:
            thumbprint = cert_thumbprint(pem)
        except ValueError:
            raise click.BadParameter("not a PEM certificate", param_hint="--subject-cert") from None
    state = _state(ctx)
    issued = state.client().issue_token(
        key_id,
        context,
        justification,
        ttl=ttl,
        subject=subject or "",
        subject_cert_thumbprint=thumbprint,
        max_uses=max_uses,
    )
    if state.json:
        expire = (
            issued.expire_time.isoformat().replace("+00:00", "Z") if issued.expire_time else None
        )
        _echo_json(
            {
                "token": issued.token,
                "token_id": issued.token_id,
                "expire_time": expire,
                "max_uses": issued.max_uses,
            }
        )
    else:
        click.echo(issued.token)


@token.command("revoke")
@click.argument("token_id")
@_json_flag
@click.pass_context
def token_revoke(ctx: click.Context, token_id: str) -> None:
    """Revoke TOKEN_ID everywhere (admin, or the token's subject)."""
    state = _state(ctx)
    state.client().revoke_token(token_id)
    if state.json:
        _echo_json({"token_id": token_id, "revoked": True})
    else:
        click.echo(f"revoked {token_id}")


@token.command("jwks")
@click.pass_context
def token_jwks(ctx: click.Context) -> None:
    """Print the broker's JWKS: the public token and audit signing keys."""
    _echo_json(_state(ctx).client().signing_keys())


# audit


@cli.group()
def audit() -> None:
    """Read and verify the audit log (auditor or admin)."""


@audit.command("list")
@click.option("--key-id", default="", help="Only events about this key.")
@click.option("--principal", default="", help="Only events by this principal.")
@click.option("--operation", default="", help="Only this RPC, e.g. Decrypt or CreateKey.")
@click.option(
    "--after",
    type=click.IntRange(min=0),
    default=0,
    metavar="N",
    help="Only sequence numbers above N.",
)
@click.option(
    "--limit", type=click.IntRange(min=0), default=0, metavar="N", help="At most N events (0: all)."
)
@click.option(
    "--since",
    callback=_time_callback,
    metavar="TIME",
    help="From this time: ISO 8601 (naive means UTC) or a duration ago, e.g. 1h.",
)
@click.option("--until", callback=_time_callback, metavar="TIME", help="Before this time.")
@_json_flag
@click.pass_context
def audit_list(
    ctx: click.Context,
    *,
    key_id: str,
    principal: str,
    operation: str,
    after: int,
    limit: int,
    since: datetime | None,
    until: datetime | None,
) -> None:
    """List audit events, one per line, oldest first.

    Columns: sequence, time, principal, operation, key_id, version, outcome, reason.
    --json prints one JSON object per line with every field.
    """
    state = _state(ctx)
    events = state.client().audit_events(
        key_id=key_id,
        principal=principal,
        operation=operation,
        start_time=since,
        end_time=until,
        after_sequence=after,
        limit=limit,
    )
    for event in events:
        if state.json:
            _echo_json(_render.event_to_dict(event), lines=True)
        else:
            click.echo(_render.event_line(event))


@audit.command("verify")
@_json_flag
@click.pass_context
def audit_verify(ctx: click.Context) -> None:
    """Verify the audit log's hash chain and signed checkpoints; exit 1 if it is broken."""
    state = _state(ctx)
    report = state.client().verify_audit_log()
    if state.json:
        _echo_json(_render.verify_to_dict(report))
    elif report.ok:
        click.echo(f"ok: {report.events_checked} events checked, head {report.head_hash}")
    else:
        click.echo(
            f"FAILED: first bad sequence {report.first_bad_sequence} "
            f"after {report.events_checked} events checked: {report.error}"
        )
    if not report.ok:
        ctx.exit(EXIT_VERIFY_FAILED)


def main() -> None:
    """Console-script entry point of ``keybroker``."""
    cli(prog_name="keybroker")
