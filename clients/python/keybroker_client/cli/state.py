"""The global options of one ``keybroker`` run, and the client opened on first use."""

from __future__ import annotations

from dataclasses import dataclass, field

import click

from keybroker_client.client import KeybrokerClient
from keybroker_client.config import resolve_settings


@dataclass
class State:
    """Global options, and the client opened on first use (so that ``--help`` needs no files)."""

    home: str | None
    target: str | None
    ca: str | None
    cert: str | None
    key: str | None
    identity: str | None
    timeout: float
    json: bool
    _client: KeybrokerClient | None = field(default=None, repr=False)

    @property
    def connected_target(self) -> str | None:
        """The broker address of the open client, or None before the first call."""
        return self._client.target if self._client is not None else None

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


def get_state(ctx: click.Context) -> State:
    """The State the root command stored in the click context."""
    return ctx.find_object(State)  # type: ignore[return-value]
