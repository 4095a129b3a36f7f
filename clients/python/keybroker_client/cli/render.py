"""Turns the SDK's values into plain dicts (for --json) and short text (for people).

Text for people passes every field a caller can influence through `terminal_safe`, so that
what the broker stores (a refused call's key id, a justification, a context) cannot move the
cursor, erase or recolour a line, or reorder text on the auditor's terminal. --json output
is exact: JSON escapes control characters itself.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

from keybroker_client.parsing import format_duration
from keybroker_client.types import AuditEvent, AuditReport, Grant, Key

#: What can change how a terminal shows a line rather than being shown: C0 controls, DEL and
#: C1 controls (ESC and CSI start ANSI sequences; CR and BS overwrite), the line and
#: paragraph separators, the bidirectional marks and overrides (U+061C, U+200E, U+200F,
#: U+202A-U+202E, U+2066-U+2069), and lone surrogates.
_UNSAFE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff]"
)
_SHORT = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    return _SHORT.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def terminal_safe(text: str) -> str:
    """``text`` with each character of `_UNSAFE` written as a Python-style escape (``\\x1b``,
    ``\\n``, ``\\u202e``); everything else, backslashes included, is left as it is."""
    return _UNSAFE.sub(_escape, text)


def time_text(value: datetime | None) -> str | None:
    """ISO 8601 UTC text such as ``2030-01-01T12:00:00Z``, or None for an unset time."""
    if value is None:
        return None
    aware = value if value.tzinfo else value.replace(tzinfo=UTC)
    return aware.astimezone(UTC).isoformat().replace("+00:00", "Z")


def duration_text(value: timedelta | None) -> str | None:
    """``1h30m`` text of a duration, or None for an unset one."""
    return None if value is None else format_duration(value)


def grant_to_dict(grant: Grant) -> dict[str, Any]:
    """A Grant as a JSON-ready dict."""
    return {
        "principal": grant.principal,
        "operations": [op.value for op in grant.operations],
        "context": dict(sorted(grant.context.items())),
        "max_token_ttl": duration_text(grant.max_token_ttl),
        "countries": list(grant.countries),
    }


def key_to_dict(key: Key) -> dict[str, Any]:
    """A Key as a JSON-ready dict (times ISO 8601 UTC, durations like ``30d``)."""
    return {
        "key_id": key.key_id,
        "description": key.description,
        "state": key.state.value,
        "primary_version": key.primary_version,
        "versions": [
            {"version": v.version, "create_time": time_text(v.create_time)} for v in key.versions
        ],
        "min_decryption_version": key.min_decryption_version,
        "policy": {
            "grants": [grant_to_dict(g) for g in key.policy.grants],
            "allowed_jurisdictions": list(key.policy.allowed_jurisdictions),
        },
        "hsm": key.hsm,
        "hsm_info": (
            None
            if key.hsm_info is None
            else {
                "name": key.hsm_info.name,
                "jurisdiction": key.hsm_info.jurisdiction,
                "operator": key.hsm_info.operator,
            }
        ),
        "create_time": time_text(key.create_time),
        "rotation_period": duration_text(key.rotation_period),
        "next_rotation_time": time_text(key.next_rotation_time),
        "destroy_time": time_text(key.destroy_time),
    }


def key_text(key: Key) -> str:
    """A Key as a few aligned lines for people."""
    data = key_to_dict(key)
    jurisdictions = ", ".join(data["policy"]["allowed_jurisdictions"]) or "EU/EEA (default)"
    info = data["hsm_info"]
    rows = [
        ("key_id", data["key_id"]),
        ("description", data["description"] or "-"),
        ("state", data["state"]),
        ("primary_version", str(data["primary_version"])),
        ("versions", ", ".join(str(v["version"]) for v in data["versions"]) or "-"),
        ("min_decryption_version", str(data["min_decryption_version"])),
        ("hsm", data["hsm"] or "-"),
        ("hsm_jurisdiction", info["jurisdiction"] if info else "unknown (HSM not configured here)"),
        ("hsm_operator", info["operator"] if info else "unknown"),
        ("jurisdictions", jurisdictions),
        ("created", data["create_time"] or "-"),
        ("rotation_period", data["rotation_period"] or "-"),
        ("next_rotation", data["next_rotation_time"] or "-"),
    ]
    if data["destroy_time"]:
        rows.append(("destroy_time", data["destroy_time"]))
    lines = [f"{name + ':':<24}{terminal_safe(value)}" for name, value in rows]
    lines.append("grants:" if data["policy"]["grants"] else "grants:                 (none)")
    for grant in data["policy"]["grants"]:
        parts = [f"  {terminal_safe(grant['principal'])}: {'+'.join(grant['operations'])}"]
        if grant["context"]:
            context = ",".join(f"{k}={v}" for k, v in grant["context"].items())
            parts.append(terminal_safe(context))
        if grant["max_token_ttl"]:
            parts.append(f"max_token_ttl={grant['max_token_ttl']}")
        if grant["countries"]:
            parts.append(terminal_safe(f"caller_country={','.join(grant['countries'])}"))
        lines.append("  ".join(parts))
    return "\n".join(lines)


#: The header row of ``keys list``, aligned with :func:`key_row`.
KEY_HEADER = f"{'KEY_ID':<32} {'STATE':<20} {'VER':<5} {'HSM':<16} DESCRIPTION"


def key_row(key: Key) -> str:
    """One line per key for ``keys list``."""
    state = key.state.value
    key_id, hsm = terminal_safe(key.key_id), terminal_safe(key.hsm or "-")
    line = f"{key_id:<32} {state:<20} v{key.primary_version:<4} {hsm:<16} "
    return (line + terminal_safe(key.description)).rstrip()


def event_to_dict(event: AuditEvent) -> dict[str, Any]:
    """An AuditEvent as a JSON-ready dict."""
    return {
        "sequence": event.sequence,
        "time": time_text(event.time),
        "principal": event.principal,
        "operation": event.operation,
        "key_id": event.key_id,
        "key_version": event.key_version,
        "token_id": event.token_id,
        "context": dict(sorted(event.context.items())),
        "justification": event.justification,
        "outcome": event.outcome.value,
        "reason": event.reason,
        "request_id": event.request_id,
        "prev_hash": event.prev_hash,
        "hash": event.hash,
    }


#: The header row of ``audit list``, aligned with :func:`event_line` (times to the second).
EVENT_HEADER = "  ".join(
    [
        f"{'SEQ':>6}",
        f"{'TIME':<20}",
        f"{'PRINCIPAL':<12}",
        f"{'OPERATION':<22}",
        f"{'KEY_ID':<20}",
        f"{'VER':<4}",
        f"{'OUTCOME':<7}",
        "REASON",
    ]
)


def event_line(event: AuditEvent) -> str:
    """One line per event: sequence, time, principal, operation, key, version, outcome, reason."""
    data = {
        k: terminal_safe(v) if isinstance(v, str) else v for k, v in event_to_dict(event).items()
    }
    version = f"v{data['key_version']}" if data["key_version"] else "-"
    return "  ".join(
        [
            f"{data['sequence']:>6}",
            data["time"] or "-",
            f"{data['principal'] or '-':<12}",
            f"{data['operation'] or '-':<22}",
            f"{data['key_id'] or '-':<20}",
            f"{version:<4}",
            f"{data['outcome']:<7}",
            data["reason"] or "-",
        ]
    )


def report_to_dict(report: AuditReport) -> dict[str, Any]:
    """An AuditReport as a JSON-ready dict."""
    return {
        "ok": report.ok,
        "events_checked": report.events_checked,
        "first_bad_sequence": report.first_bad_sequence,
        "error": report.error,
        "head_hash": report.head_hash,
    }
