"""JSON forms of domain values for the SQL stores (shared by SQLite and PostgreSQL)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from broker.domain import (
    Grant,
    Key,
    KeyPolicy,
    KeyState,
    KeyVersion,
    Lease,
    LeaseTask,
    Operation,
)


def dt_to_str(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat(timespec="microseconds")


def str_to_dt(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value).astimezone(UTC)


def _td(value: timedelta | None) -> float | None:
    return None if value is None else value.total_seconds()


def _untd(value: float | None) -> timedelta | None:
    return None if value is None else timedelta(seconds=value)


def policy_to_obj(policy: KeyPolicy) -> dict[str, Any]:
    return {
        "grants": [
            {
                "principal": g.principal,
                "operations": sorted(op.value for op in g.operations),
                "context": dict(g.context),
                "max_token_ttl": _td(g.max_token_ttl),
                "countries": list(g.countries),
            }
            for g in policy.grants
        ],
        "allowed_jurisdictions": list(policy.allowed_jurisdictions),
    }


def policy_from_obj(obj: dict[str, Any]) -> KeyPolicy:
    return KeyPolicy(
        grants=tuple(
            Grant(
                principal=g["principal"],
                operations=frozenset(Operation(op) for op in g["operations"]),
                context=dict(g["context"]),
                max_token_ttl=_untd(g["max_token_ttl"]),
                # Absent from grants written before countries existed.
                countries=tuple(g.get("countries", ())),
            )
            for g in obj["grants"]
        ),
        allowed_jurisdictions=tuple(obj["allowed_jurisdictions"]),
    )


def lease_to_obj(lease: Lease | None) -> dict[str, Any] | None:
    if lease is None:
        return None
    return {
        "holder": lease.holder,
        "task": lease.task.value,
        "expire_time": dt_to_str(lease.expire_time),
    }


def lease_from_obj(obj: dict[str, Any] | None) -> Lease | None:
    if obj is None:
        return None
    expire_time = str_to_dt(obj["expire_time"])
    assert expire_time is not None
    return Lease(obj["holder"], LeaseTask(obj["task"]), expire_time)


def key_to_json(key: Key) -> str:
    return json.dumps(
        {
            "key_id": key.key_id,
            "description": key.description,
            "state": key.state.value,
            "primary_version": key.primary_version,
            "versions": [
                {
                    "version": v.version,
                    "create_time": dt_to_str(v.create_time),
                    "label": v.hsm_label,
                }
                for v in key.versions
            ],
            "min_decryption_version": key.min_decryption_version,
            "policy": policy_to_obj(key.policy),
            "hsm": key.hsm,
            "create_time": dt_to_str(key.create_time),
            "rotation_period": _td(key.rotation_period),
            "next_rotation_time": dt_to_str(key.next_rotation_time),
            "destroy_time": dt_to_str(key.destroy_time),
            "lease": lease_to_obj(key.lease),
            "destruction_receipt": key.destruction_receipt,
        },
        sort_keys=True,
    )


def key_from_json(text: str, revision: int) -> Key:
    obj = json.loads(text)
    create_time = str_to_dt(obj["create_time"])
    assert create_time is not None
    return Key(
        key_id=obj["key_id"],
        description=obj["description"],
        state=KeyState(obj["state"]),
        primary_version=obj["primary_version"],
        versions=tuple(
            KeyVersion(v["version"], str_to_dt(v["create_time"]), v["label"])  # type: ignore[arg-type]
            for v in obj["versions"]
        ),
        min_decryption_version=obj["min_decryption_version"],
        policy=policy_from_obj(obj["policy"]),
        hsm=obj["hsm"],
        create_time=create_time,
        rotation_period=_untd(obj["rotation_period"]),
        next_rotation_time=str_to_dt(obj["next_rotation_time"]),
        destroy_time=str_to_dt(obj["destroy_time"]),
        revision=revision,
        # Absent from records written before leases and receipts existed.
        lease=lease_from_obj(obj.get("lease")),
        destruction_receipt=obj.get("destruction_receipt", ""),
    )
