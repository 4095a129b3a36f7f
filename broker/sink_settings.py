"""Settings of the secondary audit sinks: each `[[audit.sinks]]` of the configuration file.

`broker.config` reads them through its `OPTIONS` table and calls `AuditSinkConfig.check`;
the adapters in `broker.adapters.audit_sinks` and `sink_writers` build the sinks from them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

SINK_TYPES = ("jsonl", "stdout", "syslog")
SINK_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
ADDRESS_SCHEMES = ("udp", "tcp", "unix")
#: RFC 5424 section 6.2.1 facility codes, by the names syslog.conf uses.
SYSLOG_FACILITIES = {
    "kern": 0, "user": 1, "mail": 2, "daemon": 3, "auth": 4, "syslog": 5, "lpr": 6, "news": 7,
    "uucp": 8, "cron": 9, "authpriv": 10, "ftp": 11,
    **{f"local{i}": 16 + i for i in range(8)},
}  # fmt: skip
MAX_QUEUE = 1_000_000


def parse_address(address: str) -> tuple[str, str, int]:
    """`udp://HOST:PORT`, `tcp://HOST:PORT` or `unix:///PATH` as (scheme, host or path, port).

    Raises:
        ValueError: another scheme, no host or path, or a port outside 1 to 65535.
    """
    parts = urlsplit(address)
    if parts.scheme not in ADDRESS_SCHEMES:
        raise ValueError(
            f"address {address!r}: use udp://HOST:PORT, tcp://HOST:PORT or unix:///PATH"
        )
    if parts.scheme == "unix":
        if not parts.path:
            raise ValueError(f"address {address!r}: no socket path")
        return parts.scheme, parts.path, 0
    try:
        port = parts.port
    except ValueError:
        port = None
    if not parts.hostname or port is None or not 1 <= port <= 65535:
        raise ValueError(f"address {address!r}: give a host and a port from 1 to 65535")
    return parts.scheme, parts.hostname, port


@dataclass(frozen=True, slots=True)
class AuditSinkConfig:
    """One secondary audit sink; `broker.config.OPTIONS` lists its keys and their meaning.

    `kind` is the file's `type`; `name` defaults to it.
    """

    kind: str
    name: str = ""
    path: Path | None = None
    address: str = ""
    facility: str = "auth"
    app_name: str = "keybroker"
    queue_size: int = 10_000

    @property
    def sink_name(self) -> str:
        """The name in logs and in the health service `keybroker.audit.sink.NAME`."""
        return self.name or self.kind

    def check(self) -> None:
        """Raises ValueError with one line saying what is wrong."""
        if self.kind not in SINK_TYPES:
            raise ValueError(f"type {self.kind!r}: use one of {', '.join(SINK_TYPES)}")
        if not SINK_NAME.fullmatch(self.sink_name):
            raise ValueError(f"name {self.sink_name!r}: use a-z, 0-9, '.', '_', '-'")
        if (self.kind == "jsonl") != (self.path is not None):
            raise ValueError("path is required for type jsonl, and only for it")
        if (self.kind == "syslog") != bool(self.address):
            raise ValueError("address is required for type syslog, and only for it")
        if self.kind == "syslog":
            parse_address(self.address)
            if self.facility not in SYSLOG_FACILITIES:
                raise ValueError(
                    f"facility {self.facility!r}: use one of {', '.join(SYSLOG_FACILITIES)}"
                )
        if not 1 <= self.queue_size <= MAX_QUEUE:
            raise ValueError(f"queue_size must be between 1 and {MAX_QUEUE}")
