"""What the SQLite and PostgreSQL stores share for approval requests: the JSON form of a
request, and the statements (written with `?` markers; `sql_common.postgres()` turns them into
psycopg's).

A request is one row of `approval_requests` (migrations/*/0003): its JSON in `data`, with
copies of `key_id` and `state` for listing, and `revision` for compare-and-set.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from broker.adapters.codec import dt_to_str, policy_from_obj, policy_to_obj, str_to_dt
from broker.domain import Approval, ApprovalOperation, ApprovalRequest, ApprovalState

INSERT_APPROVAL = (
    "INSERT INTO approval_requests (request_id, key_id, state, revision, data) "
    "VALUES (?, ?, ?, ?, ?)"
)
SELECT_APPROVAL = "SELECT data, revision FROM approval_requests WHERE request_id = ?"
UPDATE_APPROVAL = (
    "UPDATE approval_requests SET state = ?, revision = ?, data = ? "
    "WHERE request_id = ? AND revision = ?"
)
APPROVAL_EXISTS = "SELECT 1 FROM approval_requests WHERE request_id = ?"
UPDATE_KEY = "UPDATE keys SET data = ?, revision = ? WHERE key_id = ? AND revision = ?"
KEY_EXISTS = "SELECT 1 FROM keys WHERE key_id = ?"


def list_query(
    after: str, limit: int, states: Sequence[ApprovalState], key_id: str
) -> tuple[str, list[Any]]:
    """The statement and parameters of one page of `ApprovalStore.list_approvals`."""
    where = ["request_id > ?"]
    params: list[Any] = [after]
    if states:
        where.append(f"state IN ({', '.join('?' * len(states))})")
        params.extend(s.value for s in states)
    if key_id:
        where.append("key_id = ?")
        params.append(key_id)
    params.append(limit)
    sql = (
        "SELECT data, revision FROM approval_requests "  # noqa: S608 - markers only
        f"WHERE {' AND '.join(where)} ORDER BY request_id LIMIT ?"
    )
    return sql, params


def insert_params(request: ApprovalRequest) -> tuple[Any, ...]:
    return (
        request.request_id,
        request.key_id,
        request.state.value,
        request.revision,
        approval_to_json(request),
    )


def update_params(request: ApprovalRequest, expected_revision: int) -> tuple[Any, ...]:
    """UPDATE_APPROVAL's parameters, for `request` stored at expected_revision + 1."""
    stored = request.evolve(revision=expected_revision + 1)
    return (
        stored.state.value,
        stored.revision,
        approval_to_json(stored),
        stored.request_id,
        expected_revision,
    )


def approval_to_json(request: ApprovalRequest) -> str:
    return json.dumps(
        {
            "request_id": request.request_id,
            "operation": request.operation.value,
            "key_id": request.key_id,
            "requester": request.requester,
            "create_time": dt_to_str(request.create_time),
            "expire_time": dt_to_str(request.expire_time),
            "required": request.required,
            "key_revision": request.key_revision,
            "policy": None if request.policy is None else policy_to_obj(request.policy),
            "pending_window": (
                None if request.pending_window is None else request.pending_window.total_seconds()
            ),
            "widening": list(request.widening),
            "approvals": [
                {"principal": a.principal, "time": dt_to_str(a.time)} for a in request.approvals
            ],
            "state": request.state.value,
            "reason": request.reason,
            "close_time": dt_to_str(request.close_time),
            "closed_by": request.closed_by,
        },
        sort_keys=True,
    )


def approval_from_json(text: str, revision: int) -> ApprovalRequest:
    obj = json.loads(text)
    window = obj["pending_window"]
    return ApprovalRequest(
        request_id=obj["request_id"],
        operation=ApprovalOperation(obj["operation"]),
        key_id=obj["key_id"],
        requester=obj["requester"],
        create_time=_time(obj["create_time"]),
        expire_time=_time(obj["expire_time"]),
        required=obj["required"],
        key_revision=obj["key_revision"],
        policy=None if obj["policy"] is None else policy_from_obj(obj["policy"]),
        pending_window=None if window is None else timedelta(seconds=window),
        widening=tuple(obj["widening"]),
        approvals=tuple(Approval(a["principal"], _time(a["time"])) for a in obj["approvals"]),
        state=ApprovalState(obj["state"]),
        reason=obj["reason"],
        close_time=str_to_dt(obj["close_time"]),
        closed_by=obj["closed_by"],
        revision=revision,
    )


def _time(text: str) -> datetime:
    value = str_to_dt(text)
    assert value is not None  # written by approval_to_json from a datetime
    return value
