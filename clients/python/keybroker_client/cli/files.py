"""``keybroker encrypt-file|decrypt-file``: whole files in the keybroker file format."""

from __future__ import annotations

import contextlib
import os
import stat
import sys
from collections.abc import Callable, Iterator
from typing import IO, Any, NoReturn, cast

import click
from click.core import ParameterSource

from keybroker_client.cli.errors import EXIT_CODES, fail, fail_usage
from keybroker_client.cli.options import context_option, json_flag
from keybroker_client.cli.output import echo_json
from keybroker_client.cli.state import State, get_state
from keybroker_client.errors import InvalidArgument
from keybroker_client.fileformat import (
    DEFAULT_CHUNK_SIZE,
    MAX_CHUNK_SIZE,
    MIN_CHUNK_SIZE,
    InvalidFile,
    Reader,
)
from keybroker_client.recipes import FileInfo, replace_on_success

_UNITS = {"": 1, "K": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MIB": 1 << 20}


class ChunkSizeType(click.ParamType):
    """A power of two from 4K to 16M: ``64K``, ``1M``, or a number of bytes."""

    name = "SIZE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, int):
            return value
        text = str(value).strip().upper()
        digits = text.rstrip("KIBM")
        unit = text[len(digits) :]
        if digits.isdigit() and unit in _UNITS:
            size = int(digits) * _UNITS[unit]
            if MIN_CHUNK_SIZE <= size <= MAX_CHUNK_SIZE and size & (size - 1) == 0:
                return size
        self.fail(f"{value!r}: a power of two from 4K to 16M (e.g. 64K, 1M)", param, ctx)


@contextlib.contextmanager
def _input(path: str) -> Iterator[tuple[Reader, int | None]]:
    """The input stream and its size when known (a regular file), for the progress bar."""
    if path == "-":
        yield cast(Reader, sys.stdin.buffer), None
        return
    with open(path, "rb", buffering=0) as src:
        info = os.fstat(src.fileno())
        yield src, info.st_size if stat.S_ISREG(info.st_mode) else None


@contextlib.contextmanager
def _output(path: str, *, secret: bool) -> Iterator[IO[bytes]]:
    """stdout for ``-``, else a temporary file renamed to ``path`` only on success."""
    if path == "-":
        if sys.stdout.isatty():
            fail_usage("OUT is a terminal: give a file name, or redirect stdout (`> FILE`)")
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    with replace_on_success(path, secret=secret) as dst:
        yield dst


@contextlib.contextmanager
def _progress(size: int | None, label: str) -> Iterator[Callable[[int], object] | None]:
    """A progress bar on stderr when it is a terminal and the size is known; else nothing."""
    if size is None or not sys.stderr.isatty():
        yield None
        return
    with click.progressbar(length=size, label=label, file=sys.stderr, show_eta=True) as bar:
        done = 0

        def step(n: int) -> None:
            nonlocal done
            done += n
            bar.update(n)

        yield step
        # The header is not counted by the recipe: close the bar at exactly 100 %.
        bar.update(max(0, size - done))


def _report(state: State, info: FileInfo, out_path: str) -> None:
    if state.json and out_path != "-":
        echo_json(
            {
                "key_id": info.key_id,
                "key_version": info.key_version,
                "context": dict(info.context),
                "chunk_size": info.chunk_size,
                "plaintext_bytes": info.plaintext_size,
                "out": out_path,
            }
        )


def _invalid_file(ctx: click.Context, in_path: str, out_path: str, exc: InvalidFile) -> NoReturn:
    where = "stdin" if in_path == "-" else in_path
    tail = "" if out_path == "-" else f"; {out_path} was not written"
    fail(ctx, f"INVALID_ARGUMENT: {where}: {exc}{tail}", EXIT_CODES[InvalidArgument])


@click.command("encrypt-file")
@click.argument("in_path", metavar="IN")
@click.argument("out_path", metavar="OUT")
@click.option("--key-id", required=True, metavar="KEY_ID", help="Key to wrap the data key under.")
@context_option
@click.option(
    "--chunk-size",
    type=ChunkSizeType(),
    default=DEFAULT_CHUNK_SIZE,
    show_default="64K",
    help="Plaintext bytes per chunk: a power of two from 4K to 16M.",
)
@json_flag
@click.pass_context
def encrypt_file(
    ctx: click.Context,
    *,
    in_path: str,
    out_path: str,
    key_id: str,
    context: dict[str, str],
    chunk_size: int,
) -> None:
    """Encrypt the file IN into OUT under a fresh data key of KEY_ID (- for stdin/stdout).

    The wrapped data key and the context go into OUT's header; chunks of AES-256-GCM follow
    (docs/file-format.md). OUT appears only once all of IN is encrypted. Needs an encrypt grant.
    """
    state = get_state(ctx)
    with (
        _input(in_path) as (src, size),
        _output(out_path, secret=False) as dst,
        _progress(size, "encrypting") as progress,
    ):
        try:
            info = state.client().encrypt_stream(
                src, dst, key_id, context, chunk_size=chunk_size, progress=progress
            )
        except ValueError as exc:
            fail_usage(str(exc))
    _report(state, info, out_path)


@click.command("decrypt-file")
@click.argument("in_path", metavar="IN")
@click.argument("out_path", metavar="OUT")
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
@click.option(
    "--justification",
    metavar="TEXT",
    help="Why the data is needed: ask the broker for a single-use token with it.",
)
@context_option
@json_flag
@click.pass_context
def decrypt_file(
    ctx: click.Context,
    *,
    in_path: str,
    out_path: str,
    token: str | None,
    token_file: str | None,
    justification: str | None,
    context: dict[str, str],
) -> None:
    """Decrypt the keybroker file IN into OUT (- for stdin/stdout).

    Give a token, or a justification to get one. The key and context come from IN's header;
    --context, if given, must match it. OUT (mode 0600) appears only once every chunk has
    authenticated; to stdout, chunks are written as they authenticate, so check the exit status.
    """
    state = get_state(ctx)
    if ctx.get_parameter_source("token") is ParameterSource.ENVIRONMENT and (
        justification or token_file
    ):
        token = None  # an explicit option beats a token left in the environment
    if token_file is not None:
        if token is not None:
            fail_usage("--token and --token-file exclude each other")
        with open(token_file, encoding="utf-8") as fh:
            token = fh.read().strip()
    if token is not None and justification is not None:
        fail_usage("give --token or --justification, not both")
    if not token and not justification:
        fail_usage("give --token, --token-file or --justification")
    with (
        _input(in_path) as (src, size),
        _output(out_path, secret=True) as dst,
        _progress(size, "decrypting") as progress,
    ):
        try:
            info = state.client().decrypt_stream(
                src,
                dst,
                context=context or None,
                token=token.strip() if token else None,
                justification=justification,
                progress=progress,
            )
        except InvalidFile as exc:
            _invalid_file(ctx, in_path, out_path, exc)
    _report(state, info, out_path)


#: The top-level commands this module adds to ``keybroker``.
COMMANDS = (encrypt_file, decrypt_file)
