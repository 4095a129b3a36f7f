"""Turns broker messages into plain dicts (for --json) and short text (for people)."""

from __future__ import annotations

from datetime import UTC
from typing import Any

from google.protobuf import duration_pb2, message, timestamp_pb2
from keybroker.v1 import audit_pb2, resources_pb2

from keybroker_client.parsing import format_duration


def _enum_suffix(enum_name: str, prefix: str) -> str:
    return enum_name.removeprefix(prefix)


def timestamp_text(parent: message.Message, field_name: str) -> str | None:
    """ISO 8601 UTC text of a Timestamp field, or None when the field is unset."""
    if not parent.HasField(field_name):
        return None
    value: timestamp_pb2.Timestamp = getattr(parent, field_name)
    return value.ToDatetime(tzinfo=UTC).isoformat().replace("+00:00", "Z")


def duration_text(parent: message.Message, field_name: str) -> str | None:
    """``1h30m`` text of a Duration field, or None when the field is unset."""
    if not parent.HasField(field_name):
        return None
    value: duration_pb2.Duration = getattr(parent, field_name)
    return format_duration(value.ToTimedelta())


def operation_name(op: int) -> str:
    """``encrypt`` for OPERATION_ENCRYPT, and so on."""
    return _enum_suffix(resources_pb2.Operation.Name(op), "OPERATION_").lower()


def grant_to_dict(grant: resources_pb2.Grant) -> dict[str, Any]:
    """A Grant as a JSON-ready dict."""
    return {
        "principal": grant.principal,
        "operations": [operation_name(op) for op in grant.operations],
        "context": dict(sorted(grant.context.items())),
        "max_token_ttl": duration_text(grant, "max_token_ttl"),
    }


def key_to_dict(key: resources_pb2.Key) -> dict[str, Any]:
    """A Key as a JSON-ready dict (times ISO 8601 UTC, durations like ``30d``)."""
    return {
        "key_id": key.key_id,
        "description": key.description,
        "state": _enum_suffix(resources_pb2.KeyState.Name(key.state), "KEY_STATE_"),
        "primary_version": key.primary_version,
        "versions": [
            {"version": v.version, "create_time": timestamp_text(v, "create_time")}
            for v in key.versions
        ],
        "min_decryption_version": key.min_decryption_version,
        "policy": {
            "grants": [grant_to_dict(g) for g in key.policy.grants],
            "allowed_jurisdictions": list(key.policy.allowed_jurisdictions),
        },
        "hsm": key.hsm,
        "create_time": timestamp_text(key, "create_time"),
        "rotation_period": duration_text(key, "rotation_period"),
        "next_rotation_time": timestamp_text(key, "next_rotation_time"),
        "destroy_time": timestamp_text(key, "destroy_time"),
    }


def key_text(key: resources_pb2.Key) -> str:
    """A Key as a few aligned lines for people."""
    data = key_to_dict(key)
    jurisdictions = ", ".join(data["policy"]["allowed_jurisdictions"]) or "EU/EEA (default)"
    rows = [
        ("key_id", data["key_id"]),
        ("description", data["description"] or "-"),
        ("state", data["state"]),
        ("primary_version", str(data["primary_version"])),
        ("versions", ", ".join(str(v["version"]) for v in data["versions"]) or "-"),
        ("min_decryption_version", str(data["min_decryption_version"])),
        ("hsm", data["hsm"] or "-"),
        ("jurisdictions", jurisdictions),
        ("created", data["create_time"] or "-"),
        ("rotation_period", data["rotation_period"] or "-"),
        ("next_rotation", data["next_rotation_time"] or "-"),
    ]
    if data["destroy_time"]:
        rows.append(("destroy_time", data["destroy_time"]))
    lines = [f"{name + ':':<24}{value}" for name, value in rows]
    lines.append("grants:" if data["policy"]["grants"] else "grants:                 (none)")
    for grant in data["policy"]["grants"]:
        parts = [f"  {grant['principal']}: {'+'.join(grant['operations'])}"]
        if grant["context"]:
            parts.append(",".join(f"{k}={v}" for k, v in grant["context"].items()))
        if grant["max_token_ttl"]:
            parts.append(f"max_token_ttl={grant['max_token_ttl']}")
        lines.append("  ".join(parts))
    return "\n".join(lines)


def key_row(key: resources_pb2.Key) -> str:
    """One line per key for ``keys list``."""
    state = _enum_suffix(resources_pb2.KeyState.Name(key.state), "KEY_STATE_")
    line = f"{key.key_id:<32} {state:<20} v{key.primary_version:<4} {key.hsm or '-':<16} "
    return (line + key.description).rstrip()


def event_to_dict(event: resources_pb2.AuditEvent) -> dict[str, Any]:
    """An AuditEvent as a JSON-ready dict."""
    return {
        "sequence": event.sequence,
        "time": timestamp_text(event, "time"),
        "principal": event.principal,
        "operation": event.operation,
        "key_id": event.key_id,
        "key_version": event.key_version,
        "token_id": event.token_id,
        "context": dict(sorted(event.context.items())),
        "justification": event.justification,
        "outcome": _enum_suffix(resources_pb2.Outcome.Name(event.outcome), "OUTCOME_"),
        "reason": event.reason,
        "request_id": event.request_id,
        "prev_hash": event.prev_hash,
        "hash": event.hash,
    }


def event_line(event: resources_pb2.AuditEvent) -> str:
    """One line per event: sequence, time, principal, operation, key, version, outcome, reason."""
    data = event_to_dict(event)
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


def verify_to_dict(report: audit_pb2.VerifyAuditLogResponse) -> dict[str, Any]:
    """A VerifyAuditLogResponse as a JSON-ready dict."""
    return {
        "ok": report.ok,
        "events_checked": report.events_checked,
        "first_bad_sequence": report.first_bad_sequence,
        "error": report.error,
        "head_hash": report.head_hash,
    }
