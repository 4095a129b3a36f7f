"""The destinations of the secondary audit sinks: JSON lines (a file or a stream such as
stdout) and syslog (RFC 5424 over UDP, TCP with octet counting per RFC 6587, or a unix socket).

Each writer is driven by one `QueuedSink` thread; `close()` may also come from the thread that
stops the broker, to unblock a write that hangs, so it is idempotent and never raises.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from datetime import UTC
from pathlib import Path
from typing import IO

from keybroker_client import evidence

from broker.domain import AuditEvent, Outcome, event_record
from broker.sink_settings import SYSLOG_FACILITIES, parse_address

#: The severity of an event by its outcome: a refusal is a warning, a failure an error.
SEVERITIES = {Outcome.ALLOWED: 6, Outcome.DENIED: 4, Outcome.ERROR: 3}
#: RFC 5424 section 6.4: MSG in UTF-8 starts with the byte order mark.
BOM = b"\xef\xbb\xbf"


def encode_record(event: AuditEvent) -> bytes:
    """The event's record exactly as the audit export writes it (`event_record`, in the
    canonical form of `evidence.canonical`: sorted keys, no spaces, UTF-8), without newline."""
    return evidence.canonical(event_record(event))


class JsonLinesFile:
    """Appends one JSON line per event to a file (created mode 0600).

    Each line is one `write(2)` on a file opened with O_APPEND, so processes sharing the file
    never interleave within a line. When the path no longer names the open file (rotated by
    logrotate, or deleted), the file is opened again; if that fails, so does the write.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None
        self._identity = (0, 0)

    def open(self) -> None:
        self.close()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        info = os.fstat(fd)
        self._fd, self._identity = fd, (info.st_dev, info.st_ino)

    def write(self, event: AuditEvent) -> None:
        try:
            info = os.stat(self.path)
            moved = (info.st_dev, info.st_ino) != self._identity
        except FileNotFoundError:
            moved = True
        if moved or self._fd is None:
            self.open()
        assert self._fd is not None
        data = encode_record(event) + b"\n"
        if os.write(self._fd, data) != len(data):
            raise OSError(f"short write to {self.path}")

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


class JsonLinesStream:
    """Writes one JSON line per event to an open binary stream (stdout); never closes it."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream

    def open(self) -> None:
        pass

    def write(self, event: AuditEvent) -> None:
        self._stream.write(encode_record(event) + b"\n")
        self._stream.flush()

    def close(self) -> None:
        pass


def _header_field(text: str, limit: int) -> str:
    """An RFC 5424 header field: printable US-ASCII without spaces, at most `limit`, or '-'."""
    kept = "".join(c for c in text if 33 <= ord(c) <= 126)[:limit]
    return kept or "-"


def format_rfc5424(
    event: AuditEvent, facility: int, hostname: str, app_name: str, procid: str
) -> bytes:
    """One syslog message: `<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID - BOM JSON`.

    The timestamp is the event's time (UTC, microseconds), MSGID the operation (e.g.
    `Decrypt`), no structured data (`-`), and the message the event's canonical JSON record.
    """
    pri = facility * 8 + SEVERITIES[event.outcome]
    timestamp = event.time.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    header = " ".join(
        [
            f"<{pri}>1",
            timestamp,
            _header_field(hostname, 255),
            _header_field(app_name, 48),
            _header_field(procid, 128),
            _header_field(event.operation, 32),
            "-",
        ]
    )
    return header.encode("ascii") + b" " + BOM + encode_record(event)


class SyslogWriter:
    """Sends RFC 5424 messages to a syslog receiver.

    Over UDP each message is one datagram (RFC 5426); over TCP, and over a unix stream socket,
    each is framed by octet counting (`LENGTH SP MESSAGE`, RFC 6587 section 3.4.1); a unix
    socket is tried as a datagram socket first, as /dev/log is.

    Args:
        address: `udp://HOST:PORT`, `tcp://HOST:PORT` or `unix:///PATH`.
        facility: a name of `SYSLOG_FACILITIES`.
        app_name: the APP-NAME field.
        hostname: the HOSTNAME field (default: this machine's name).
        timeout: seconds a connect or a send may take before it counts as failed.
    """

    def __init__(
        self,
        address: str,
        facility: str = "auth",
        app_name: str = "keybroker",
        hostname: str | None = None,
        timeout: float = 5.0,
    ) -> None:
        self.scheme, self._host, self._port = parse_address(address)
        if facility not in SYSLOG_FACILITIES:
            raise ValueError(f"unknown syslog facility {facility!r}")
        self._facility = SYSLOG_FACILITIES[facility]
        self._app_name = app_name
        self._hostname = hostname or socket.gethostname()
        self._timeout = timeout
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._stream = False

    def open(self) -> None:
        self.close()
        if self.scheme == "tcp":
            sock = socket.create_connection((self._host, self._port), self._timeout)
            stream = True
        elif self.scheme == "udp":
            family, kind, proto, _, addr = socket.getaddrinfo(
                self._host, self._port, type=socket.SOCK_DGRAM
            )[0]
            sock = socket.socket(family, kind, proto)
            sock.settimeout(self._timeout)
            # Connected, so the kernel reports a receiver that is not there (ICMP).
            sock.connect(addr)
            stream = False
        else:
            sock, stream = self._open_unix()
        with self._lock:
            self._sock, self._stream = sock, stream

    def _open_unix(self) -> tuple[socket.socket, bool]:
        for kind, stream in ((socket.SOCK_DGRAM, False), (socket.SOCK_STREAM, True)):
            sock = socket.socket(socket.AF_UNIX, kind)
            sock.settimeout(self._timeout)
            try:
                sock.connect(self._host)
            except OSError as exc:
                sock.close()
                if kind == socket.SOCK_DGRAM and exc.errno == getattr(os, "EPROTOTYPE", 91):
                    continue
                raise
            return sock, stream
        raise OSError(f"cannot connect to {self._host}")  # pragma: no cover

    def write(self, event: AuditEvent) -> None:
        message = format_rfc5424(
            event, self._facility, self._hostname, self._app_name, str(os.getpid())
        )
        with self._lock:
            sock, stream = self._sock, self._stream
        if sock is None:
            raise OSError("not connected")
        if stream:
            sock.sendall(str(len(message)).encode("ascii") + b" " + message)
        else:
            sock.send(message)

    def close(self) -> None:
        with self._lock:
            sock, self._sock = self._sock, None
        if sock is not None:
            # Ends a send that blocks in another thread (a peer that stopped reading).
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
