"""Option types and shared options of the ``keybroker`` commands.

Each one parses its compact syntax (see :mod:`keybroker_client.parsing`) while click reads the
command line, so a malformed value is a usage error (exit status 2) before any call is made.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import click

from keybroker_client.cli.state import get_state
from keybroker_client.parsing import (
    parse_caller_countries,
    parse_context,
    parse_duration,
    parse_time,
    policy_from_grants,
)
from keybroker_client.types import KeyPolicy

F = TypeVar("F", bound=Callable[..., Any])

GRANT_HELP = (
    "PRINCIPAL:OPS[:k=v,k2=v2]. OPS is encrypt, decrypt, rewrap joined with '+' "
    "(producer:encrypt+rewrap); the optional k=v list is the context every token under the "
    "grant must carry (consumer:decrypt:dataset=cohort-42; a value ending in '*' matches by "
    "prefix). Repeat for several grants."
)


class DurationType(click.ParamType):
    """``90s``, ``5m``, ``1h``, ``2d`` or ``1h30m``, converted to a timedelta."""

    name = "DURATION"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, timedelta):
            return value
        try:
            return parse_duration(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


DURATION = DurationType()


def json_flag(func: F) -> F:
    """Adds a local ``--json`` to a command, same as the global one."""

    def set_json(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
        if value:
            get_state(ctx).json = True

    return click.option(
        "--json",
        is_flag=True,
        expose_value=False,
        callback=set_json,
        help="Machine-readable JSON output (same as the global --json).",
    )(func)


def _context_callback(
    _ctx: click.Context, param: click.Parameter, value: tuple[str, ...]
) -> dict[str, str]:
    try:
        return parse_context(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param=param) from None


def context_option(func: F) -> F:
    """Adds a repeatable ``--context KEY=VALUE``, passed as a dict."""
    return click.option(
        "--context",
        "context",
        multiple=True,
        metavar="KEY=VALUE",
        callback=_context_callback,
        help="Encryption context entry; repeat for several. The value may contain '='.",
    )(func)


def time_callback(
    _ctx: click.Context, param: click.Parameter, value: str | None
) -> datetime | None:
    """Parses an ISO 8601 time or a duration ago (``1h``) into an aware datetime."""
    if value is None:
        return None
    try:
        return parse_time(value, now=datetime.now(UTC))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param=param) from None


def blob_options(func: F) -> F:
    """Adds ``--in FILE|-`` and ``--wrapped-b64``/``--ciphertext-b64`` for an input blob."""
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


def caller_country_option(func: F) -> F:
    """Adds a repeatable ``--caller-country PRINCIPAL=CC[,CC]``, passed as a tuple of str."""
    return click.option(
        "--caller-country",
        "caller_countries",
        multiple=True,
        metavar="PRINCIPAL=CC[,CC]",
        help="The grants of PRINCIPAL apply only to a client certificate whose subject "
        "country (C=) is one of CC, e.g. analyst=FR,DE; repeat for several principals.",
    )(func)


def policy_from_options(
    grants: tuple[str, ...],
    jurisdictions: tuple[str, ...],
    max_token_ttl: timedelta | None,
    caller_countries: tuple[str, ...] = (),
) -> KeyPolicy:
    """The policy from ``--grant``, ``--jurisdiction``, ``--max-token-ttl`` and
    ``--caller-country``."""
    try:
        return policy_from_grants(
            grants,
            jurisdictions,
            max_token_ttl=max_token_ttl,
            caller_countries=parse_caller_countries(caller_countries),
        )
    except ValueError as exc:
        raise click.BadParameter(
            str(exc), param_hint="--grant/--jurisdiction/--caller-country"
        ) from None
