"""Parsers for the compact syntaxes the CLI accepts; usable from code as well.

- durations: ``90s``, ``5m``, ``1h``, ``2d``, or combined ``1h30m``;
- encryption context entries: ``key=value`` (the value may itself contain ``=``);
- grants: ``PRINCIPAL:OPS[:k=v,k2=v2]`` where OPS joins ``encrypt``, ``decrypt`` and
  ``rewrap`` with ``+`` (``producer:encrypt+rewrap``; ``,`` is accepted too);
- caller countries: ``PRINCIPAL=CC[,CC...]`` (``analyst=FR,DE``).

Every parser raises ``ValueError`` with a message that says what the right form is.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from keybroker_client.types import Grant, KeyPolicy, Operation

_DURATION_PART = re.compile(r"(\d+)([smhd])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_OPERATIONS = {op.value: op for op in (Operation.ENCRYPT, Operation.DECRYPT, Operation.REWRAP)}
_JURISDICTION = re.compile(r"[A-Za-z]{2}")


def parse_duration(text: str) -> timedelta:
    """Parses a positive duration such as ``90s``, ``5m``, ``1h``, ``2d`` or ``1h30m``.

    Args:
        text: one or more ``<integer><unit>`` parts, unit one of ``s``, ``m``, ``h``, ``d``.

    Returns:
        The duration.

    Raises:
        ValueError: the text is not of that form, or the duration is zero.
    """
    cleaned = text.strip().lower()
    parts = _DURATION_PART.findall(cleaned)
    if not cleaned or "".join(n + u for n, u in parts) != cleaned:
        raise ValueError(f"bad duration {text!r}: use a number and a unit, e.g. 90s, 5m, 1h, 2d")
    seconds = sum(int(n) * _UNIT_SECONDS[u] for n, u in parts)
    if seconds <= 0:
        raise ValueError(f"bad duration {text!r}: must be more than zero")
    return timedelta(seconds=seconds)


def format_duration(value: timedelta) -> str:
    """Formats a duration in the form :func:`parse_duration` reads, e.g. ``1h30m``.

    Args:
        value: a non-negative duration; fractions of a second are dropped.

    Returns:
        The shortest ``d``/``h``/``m``/``s`` form, ``0s`` for zero.
    """
    remaining = int(value.total_seconds())
    out = []
    for unit in ("d", "h", "m", "s"):
        count, remaining = divmod(remaining, _UNIT_SECONDS[unit])
        if count:
            out.append(f"{count}{unit}")
    return "".join(out) or "0s"


def parse_context_entry(text: str) -> tuple[str, str]:
    """Parses one ``key=value`` encryption-context entry.

    The first ``=`` separates key and value, so a value may contain ``=``.

    Raises:
        ValueError: there is no ``=`` or the key is empty.
    """
    key, sep, value = text.partition("=")
    if not sep:
        raise ValueError(f"bad context entry {text!r}: use key=value")
    if not key:
        raise ValueError(f"bad context entry {text!r}: the key must not be empty")
    return key, value


def parse_context(entries: Iterable[str]) -> dict[str, str]:
    """Parses repeated ``key=value`` entries into an encryption context.

    Args:
        entries: the entries, for example ``["dataset=cohort-42", "purpose=study"]``.

    Returns:
        The context as a dict.

    Raises:
        ValueError: an entry is malformed, or one key is given twice with different values.
    """
    context: dict[str, str] = {}
    for entry in entries:
        key, value = parse_context_entry(entry)
        if key in context and context[key] != value:
            raise ValueError(f"context key {key!r} given twice with different values")
        context[key] = value
    return context


def parse_grant(text: str, *, max_token_ttl: timedelta | None = None) -> Grant:
    """Parses one grant, ``PRINCIPAL:OPS[:k=v,k2=v2]``.

    OPS is one or more of ``encrypt``, ``decrypt``, ``rewrap`` joined with ``+`` (or ``,``).
    The optional third part is the grant's context: comma-separated ``k=v`` entries that every
    token issued under the grant must carry (a value ending in ``*`` matches by prefix). A
    context value can therefore not contain a comma.

    Args:
        text: the grant, e.g. ``consumer:decrypt:dataset=cohort-42`` or
            ``producer:encrypt+rewrap``.
        max_token_ttl: set as the grant's ``max_token_ttl`` if the grant allows ``decrypt``.

    Returns:
        The grant.

    Raises:
        ValueError: the text does not follow the syntax or names an unknown operation.
    """
    principal, sep, rest = text.partition(":")
    if not sep or not principal.strip():
        raise ValueError(f"bad grant {text!r}: use PRINCIPAL:OPS[:k=v,...], e.g. consumer:decrypt")
    ops_text, _, context_text = rest.partition(":")
    names = [n.strip().lower() for n in re.split(r"[+,]", ops_text) if n.strip()]
    if not names:
        raise ValueError(f"bad grant {text!r}: name at least one of encrypt, decrypt, rewrap")
    operations: list[Operation] = []
    for name in names:
        if name not in _OPERATIONS:
            raise ValueError(
                f"bad grant {text!r}: unknown operation {name!r} (use encrypt, decrypt, rewrap "
                "joined with '+')"
            )
        if _OPERATIONS[name] not in operations:
            operations.append(_OPERATIONS[name])
    try:
        context = parse_context(e for e in context_text.split(",") if e)
    except ValueError as exc:
        raise ValueError(f"bad grant {text!r}: {exc}") from None
    return Grant(
        principal=principal.strip(),
        operations=tuple(operations),
        context=context,
        max_token_ttl=max_token_ttl if Operation.DECRYPT in operations else None,
    )


def parse_country_code(code: str) -> str:
    """An ISO 3166-1 alpha-2 code, upper-cased; raises ValueError for anything else."""
    if not _JURISDICTION.fullmatch(code.strip()):
        raise ValueError(f"bad country {code!r}: use a two-letter ISO 3166-1 code, e.g. FR")
    return code.strip().upper()


def parse_caller_countries(texts: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """Parses ``PRINCIPAL=CC[,CC...]`` entries: the countries a principal's client certificate
    must name (its subject ``C=``) for its grants to apply.

    Raises:
        ValueError: an entry without ``=``, or a code that is not two letters.
    """
    countries: dict[str, list[str]] = {}
    for text in texts:
        principal, sep, codes = text.partition("=")
        if not sep or not principal.strip() or not codes.strip():
            raise ValueError(f"bad caller country {text!r}: use PRINCIPAL=CC[,CC], e.g. analyst=FR")
        chosen = countries.setdefault(principal.strip(), [])
        for code in codes.split(","):
            if (upper := parse_country_code(code)) not in chosen:
                chosen.append(upper)
    return {principal: tuple(codes) for principal, codes in countries.items()}


def policy_from_grants(
    grants: Iterable[str],
    jurisdictions: Iterable[str] = (),
    *,
    max_token_ttl: timedelta | None = None,
    caller_countries: Mapping[str, Iterable[str]] | None = None,
) -> KeyPolicy:
    """Builds a :class:`KeyPolicy` from grants in the CLI syntax (see :func:`parse_grant`).

    Args:
        grants: grant strings such as ``consumer:decrypt:dataset=cohort-42``.
        jurisdictions: ISO 3166-1 alpha-2 codes of the jurisdictions whose HSMs may hold the
            key; empty means the broker's default (the EU/EEA member states).
        max_token_ttl: the longest token lifetime for the grants that allow ``decrypt``.
        caller_countries: principal -> the countries its grants require of the caller's
            certificate (see :func:`parse_caller_countries`).

    Returns:
        The policy, ready for ``create_key`` or ``update_key_policy``.

    Raises:
        ValueError: a grant, a jurisdiction or a country code is malformed, or a caller
            country names a principal without a grant.
    """
    codes: list[str] = []
    for code in jurisdictions:
        if not _JURISDICTION.fullmatch(code.strip()):
            raise ValueError(
                f"bad jurisdiction {code!r}: use a two-letter ISO 3166-1 code, e.g. FR"
            )
        if code.strip().upper() not in codes:
            codes.append(code.strip().upper())
    parsed = [parse_grant(g, max_token_ttl=max_token_ttl) for g in grants]
    countries = {
        p: tuple(parse_country_code(c) for c in cs) for p, cs in (caller_countries or {}).items()
    }
    unknown = sorted(set(countries) - {g.principal for g in parsed})
    if unknown:
        raise ValueError(f"caller country for {', '.join(unknown)}, who has no grant")
    return KeyPolicy(
        grants=tuple(replace(g, countries=countries.get(g.principal, ())) for g in parsed),
        allowed_jurisdictions=tuple(codes),
    )


def parse_time(text: str, *, now: datetime) -> datetime:
    """Parses an ISO 8601 time, or a duration meaning that long before ``now``.

    Args:
        text: ``2025-01-31T12:00:00Z``, ``2025-01-31`` (naive times are UTC) or ``1h``.
        now: the current time, used for relative values.

    Returns:
        An aware datetime.

    Raises:
        ValueError: neither form.
    """
    try:
        return now - parse_duration(text)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"bad time {text!r}: use ISO 8601 (2025-01-31T12:00:00Z) or a duration ago (1h)"
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
