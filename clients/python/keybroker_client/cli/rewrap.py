"""``keybroker rewrap-file IN OUT``: every blob of a text file under its key's primary version.

The blob file is UTF-8 text, one item per line (docs/cli.md, "Re-wrapping a file of blobs"):

- ``BASE64``: a blob (wrapped data key or ciphertext), standard or URL-safe base64, padding
  optional, re-wrapped under ``--context``;
- ``{"ciphertext": "BASE64", "context": {...}, ...}``: a JSON object; its ``context`` (when
  present) is the blob's, and its other members are kept as they are;
- a blank line, kept.

OUT has the same lines in the same order: each re-wrapped blob replaced by the new one
(standard base64), every other line (already current, failed, blank) exactly as it was, so
nothing is ever lost. The input is streamed: memory holds a few batches, whatever its size.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import stat
import sys
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import click

from keybroker_client.cli.files import _output, _progress
from keybroker_client.cli.options import context_option, json_flag
from keybroker_client.cli.output import echo_json
from keybroker_client.cli.render import terminal_safe
from keybroker_client.cli.state import get_state
from keybroker_client.client import KeybrokerClient
from keybroker_client.types import ReWrapResult

#: Exit status when some lines could not be re-wrapped (OUT is written all the same).
EXIT_ITEMS_FAILED = 1
#: Longest line read, in bytes: a blob is at most about 64 KiB, 88 KiB in base64.
MAX_LINE = 1 << 20
#: Failed lines named on stderr, at most (the JSON summary lists them all).
SHOWN_FAILURES = 20


@dataclass(slots=True)
class _Line:
    """One line of IN.

    Attributes:
        number: from 1.
        raw: as read, line ending included.
        blob: the blob to re-wrap; None for a line that is not sent (blank or bad).
        context: the blob's context from its JSON line, None for the command's.
        record: the JSON object of a JSON line.
        problem: why a non-blank line is not sent.
    """

    number: int
    raw: bytes
    blob: bytes | None = None
    context: dict[str, str] | None = None
    record: dict[str, Any] | None = None
    problem: str = ""


@dataclass(slots=True)
class Tally:
    """What a run did, for the summary."""

    rewrapped: int = 0
    already_current: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return len(self.failures)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rewrapped": self.rewrapped,
            "already_current": self.already_current,
            "failed": self.failed,
            "failures": self.failures,
        }


def _decode_b64(text: str) -> bytes:
    """Standard or URL-safe base64, padding optional."""
    cleaned = text.strip().replace("-", "+").replace("_", "/")
    try:
        data = base64.b64decode(cleaned + "=" * (-len(cleaned) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not base64") from None
    return data


def _json_line(text: bytes) -> tuple[bytes, dict[str, str] | None, dict[str, Any]]:
    try:
        record = json.loads(text)
    except (ValueError, UnicodeDecodeError):
        raise ValueError("not a JSON object") from None
    if not isinstance(record, dict) or not isinstance(record.get("ciphertext"), str):
        raise ValueError('a JSON line needs a "ciphertext" member (base64)')
    context = record.get("context")
    if context is not None and not (
        isinstance(context, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in context.items())
    ):
        raise ValueError('"context" must be an object of strings')
    return _decode_b64(record["ciphertext"]), context, record


def parse_line(number: int, raw: bytes) -> _Line:
    """Reads one line of the blob file (see the module docstring)."""
    line = _Line(number, raw)
    text = raw.strip()
    if not text:
        return line
    if len(raw) > MAX_LINE:
        line.problem = f"line is longer than {MAX_LINE} bytes"
        return line
    try:
        if text.startswith(b"{"):
            line.blob, line.context, line.record = _json_line(text)
        else:
            line.blob = _decode_b64(text.decode("ascii"))
    except UnicodeDecodeError:
        line.problem, line.blob = "not base64", None
    except ValueError as exc:
        line.problem, line.blob = str(exc), None
    return line


def _ending(raw: bytes) -> bytes:
    return raw[len(raw.rstrip(b"\r\n")) :]


def rewritten(line: _Line, result: ReWrapResult) -> bytes:
    """The line of OUT for a line whose blob was re-wrapped."""
    blob = base64.b64encode(result.ciphertext).decode("ascii")
    if line.record is None:
        return blob.encode("ascii") + _ending(line.raw)
    record = dict(line.record, ciphertext=blob)
    text = json.dumps(record, ensure_ascii=False, separators=(",", ":"))
    return text.encode("utf-8") + _ending(line.raw)


def _read_lines(src: IO[bytes]) -> Iterator[_Line]:
    number = 0
    while raw := src.readline(MAX_LINE + 1):
        number += 1
        if len(raw) > MAX_LINE and not raw.endswith(b"\n"):
            # Keep the whole line in OUT, as it was, without ever holding it all.
            rest = [raw]
            while (more := src.readline(MAX_LINE)) and not rest[-1].endswith(b"\n"):
                rest.append(more)
            raw = b"".join(rest)
        yield parse_line(number, raw)


def rewrap_lines(
    client: KeybrokerClient,
    src: IO[bytes],
    dst: IO[bytes],
    context: dict[str, str],
    batch_size: int,
    progress: Callable[[int], object] | None = None,
) -> Tally:
    """Streams IN's blobs through ``ReWrapStream`` and writes OUT's lines in IN's order.

    gRPC reads the items on a thread of its own; each line read is queued here first, so the
    lines that are not sent (blank, bad) are written in their place as the results come back.
    """
    tally = Tally()
    pending: deque[_Line] = deque()

    def items() -> Iterator[tuple[bytes, dict[str, str] | None]]:
        for line in _read_lines(src):
            pending.append(line)
            if line.blob is not None:
                yield line.blob, line.context

    def write_unsent() -> None:
        while pending and pending[0].blob is None:
            line = pending.popleft()
            if line.problem:
                tally.failures.append(
                    {"line": line.number, "code": "INVALID_ARGUMENT", "message": line.problem}
                )
            dst.write(line.raw)
            if progress is not None:
                progress(len(line.raw))

    for result in client.rewrap_stream(items(), context, batch_size=batch_size):
        write_unsent()
        line = pending.popleft()
        if not result.ok:
            tally.failures.append(
                {"line": line.number, "code": result.code, "message": result.message}
            )
            dst.write(line.raw)
        elif result.already_current:
            tally.already_current += 1
            dst.write(line.raw)
        else:
            tally.rewrapped += 1
            dst.write(rewritten(line, result))
        if progress is not None:
            progress(len(line.raw))
    write_unsent()
    return tally


@contextlib.contextmanager
def _input(path: str) -> Iterator[tuple[IO[bytes], int | None]]:
    """IN (buffered: it is read by lines) and its size when it is a regular file."""
    if path == "-":
        yield sys.stdin.buffer, None
        return
    with open(path, "rb") as src:
        info = os.fstat(src.fileno())
        yield src, info.st_size if stat.S_ISREG(info.st_mode) else None


def _summary(tally: Tally, out_path: str) -> None:
    counts = (
        f"{tally.rewrapped} re-wrapped, {tally.already_current} already current, "
        f"{tally.failed} failed"
    )
    click.echo(
        f"rewrap-file: {counts}" + ("" if out_path == "-" else f"; wrote {out_path}"), err=True
    )
    for failure in tally.failures[:SHOWN_FAILURES]:
        message = terminal_safe(f"{failure['code']}: {failure['message']}")
        click.echo(f"  line {failure['line']}: {message}", err=True)
    if tally.failed > SHOWN_FAILURES:
        click.echo(f"  ... and {tally.failed - SHOWN_FAILURES} more (see --json)", err=True)


@click.command("rewrap-file")
@click.argument("in_path", metavar="IN")
@click.argument("out_path", metavar="OUT")
@context_option
@click.option(
    "--batch-size",
    type=click.IntRange(1, 1000),
    default=250,
    show_default=True,
    help="Blobs per request message of the stream.",
)
@json_flag
@click.pass_context
def rewrap_file(
    ctx: click.Context,
    *,
    in_path: str,
    out_path: str,
    context: dict[str, str],
    batch_size: int,
) -> None:
    """Re-wrap every blob of the text file IN under its key's primary version into OUT.

    One blob per line, in base64, or a JSON object per line with "ciphertext" (base64) and
    its own "context"; --context is the context of the lines that name none. OUT keeps every
    line in its place: re-wrapped blobs are replaced, the others (already current, failed,
    blank) stay as they were. OUT appears only once the whole stream is done (- for stdin
    and stdout). Prints a summary on stderr (--json: on stdout); exits 1 when any line
    failed. Admin, or a rewrap grant on the blobs' keys.
    """
    state = get_state(ctx)
    with (
        _input(in_path) as (src, size),
        _output(out_path, secret=False) as dst,
        _progress(size, "re-wrapping") as progress,
    ):
        tally = rewrap_lines(state.client(), src, dst, context, batch_size, progress)
    if state.json and out_path != "-":
        echo_json({**tally.to_dict(), "out": out_path})
    elif state.json:
        click.echo(json.dumps({**tally.to_dict(), "out": out_path}), err=True)
    else:
        _summary(tally, out_path)
    if tally.failed:
        ctx.exit(EXIT_ITEMS_FAILED)


#: The top-level commands this module adds to ``keybroker``.
COMMANDS = (rewrap_file,)
