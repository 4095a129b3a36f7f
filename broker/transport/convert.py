"""Proto <-> domain conversions. No rules here beyond shape: services validate."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from keybroker.v1 import key_admin_pb2
from keybroker.v1 import resources_pb2 as pb

from broker.domain import (
    ApprovalOperation,
    ApprovalRequest,
    ApprovalState,
    AuditEvent,
    Grant,
    Key,
    KeyPolicy,
    KeyState,
    Operation,
    Outcome,
    VersionUsage,
)
from broker.errors import InvalidArgument
from broker.ports import HsmInfo

_OPS = {
    pb.OPERATION_ENCRYPT: Operation.ENCRYPT,
    pb.OPERATION_DECRYPT: Operation.DECRYPT,
    pb.OPERATION_REWRAP: Operation.REWRAP,
}
_OPS_BACK = {v: k for k, v in _OPS.items()}
_STATES = {
    KeyState.ENABLED: pb.KEY_STATE_ENABLED,
    KeyState.DISABLED: pb.KEY_STATE_DISABLED,
    KeyState.PENDING_DESTRUCTION: pb.KEY_STATE_PENDING_DESTRUCTION,
    KeyState.DESTROYED: pb.KEY_STATE_DESTROYED,
}
_OUTCOMES = {
    Outcome.ALLOWED: pb.OUTCOME_ALLOWED,
    Outcome.DENIED: pb.OUTCOME_DENIED,
    Outcome.ERROR: pb.OUTCOME_ERROR,
}
_APPROVAL_STATES = {
    ApprovalState.PENDING: key_admin_pb2.APPROVAL_STATE_PENDING,
    ApprovalState.APPLIED: key_admin_pb2.APPROVAL_STATE_APPLIED,
    ApprovalState.FAILED: key_admin_pb2.APPROVAL_STATE_FAILED,
    ApprovalState.EXPIRED: key_admin_pb2.APPROVAL_STATE_EXPIRED,
    ApprovalState.CANCELLED: key_admin_pb2.APPROVAL_STATE_CANCELLED,
}
_APPROVAL_STATES_BACK = {v: k for k, v in _APPROVAL_STATES.items()}
_APPROVAL_OPERATIONS = {
    ApprovalOperation.UPDATE_KEY_POLICY: key_admin_pb2.APPROVAL_OPERATION_UPDATE_KEY_POLICY,
    ApprovalOperation.ENABLE_KEY: key_admin_pb2.APPROVAL_OPERATION_ENABLE_KEY,
    ApprovalOperation.SCHEDULE_KEY_DESTRUCTION: (
        key_admin_pb2.APPROVAL_OPERATION_SCHEDULE_KEY_DESTRUCTION
    ),
}


def ts(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    out = Timestamp()
    out.FromDatetime(value.astimezone(UTC))
    return out


def from_ts(msg: object, field: str) -> datetime | None:
    if not msg.HasField(field):  # type: ignore[attr-defined]
        return None
    value: Timestamp = getattr(msg, field)
    try:
        return value.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError, OSError):
        raise InvalidArgument(f"{field} is out of range") from None


def dur(value: timedelta | None) -> Duration | None:
    if value is None:
        return None
    out = Duration()
    out.FromTimedelta(value)
    return out


def from_dur(msg: object, field: str) -> timedelta | None:
    if not msg.HasField(field):  # type: ignore[attr-defined]
        return None
    value: Duration = getattr(msg, field)
    if value.seconds < 0 or value.nanos < 0:
        raise InvalidArgument(f"{field} must not be negative")
    try:
        return value.ToTimedelta()
    except (ValueError, OverflowError):
        raise InvalidArgument(f"{field} is out of range") from None


def policy_from_pb(msg: pb.KeyPolicy) -> KeyPolicy:
    grants = []
    for g in msg.grants:
        ops = set()
        for op in g.operations:
            if op not in _OPS:
                raise InvalidArgument(
                    f"grant for {g.principal!r}: operations must be OPERATION_ENCRYPT, "
                    "OPERATION_DECRYPT or OPERATION_REWRAP"
                )
            ops.add(_OPS[op])
        grants.append(
            Grant(
                principal=g.principal,
                operations=frozenset(ops),
                context=dict(g.context),
                max_token_ttl=from_dur(g, "max_token_ttl"),
                countries=tuple(g.countries),
            )
        )
    return KeyPolicy(tuple(grants), tuple(msg.allowed_jurisdictions))


def policy_to_pb(policy: KeyPolicy) -> pb.KeyPolicy:
    return pb.KeyPolicy(
        grants=[
            pb.Grant(
                principal=g.principal,
                operations=sorted(_OPS_BACK[op] for op in g.operations),
                context=dict(g.context),
                max_token_ttl=dur(g.max_token_ttl),
                countries=list(g.countries),
            )
            for g in policy.grants
        ],
        allowed_jurisdictions=list(policy.allowed_jurisdictions),
    )


def hsm_info_to_pb(info: HsmInfo | None) -> pb.HsmInfo | None:
    if info is None:
        return None
    return pb.HsmInfo(name=info.name, jurisdiction=info.jurisdiction, operator=info.operator)


def key_to_pb(key: Key, hsm_info: HsmInfo | None = None) -> pb.Key:
    """The key's message; `hsm_info` is where its HSM stands (left unset when None)."""
    return pb.Key(
        key_id=key.key_id,
        description=key.description,
        state=_STATES[key.state],
        primary_version=key.primary_version,
        versions=[
            pb.KeyVersion(version=v.version, create_time=ts(v.create_time)) for v in key.versions
        ],
        min_decryption_version=key.min_decryption_version,
        policy=policy_to_pb(key.policy),
        hsm=key.hsm,
        create_time=ts(key.create_time),
        rotation_period=dur(key.rotation_period),
        next_rotation_time=ts(key.next_rotation_time),
        destroy_time=ts(key.destroy_time),
        hsm_info=hsm_info_to_pb(hsm_info),
    )


def usage_to_pb(u: VersionUsage) -> key_admin_pb2.KeyVersionUsage:
    return key_admin_pb2.KeyVersionUsage(
        version=u.version,
        data_keys_issued=u.data_keys_issued,
        encryptions=u.encryptions,
        rewrapped=u.rewrapped,
        decrypts=u.decrypts,
        decrypts_refused=u.decrypts_refused,
        last_decrypt_time=ts(u.last_decrypt_time),
        last_use_time=ts(u.last_use_time),
    )


def event_to_pb(e: AuditEvent) -> pb.AuditEvent:
    return pb.AuditEvent(
        sequence=e.sequence,
        time=ts(e.time),
        principal=e.principal,
        operation=e.operation,
        key_id=e.key_id,
        key_version=e.key_version,
        token_id=e.token_id,
        context=dict(e.context),
        justification=e.justification,
        outcome=_OUTCOMES[e.outcome],
        reason=e.reason,
        request_id=e.request_id,
        prev_hash=e.prev_hash,
        hash=e.hash,
        chain=e.chain,
        chain_sequence=e.chain_sequence,
    )


def approval_state_from_pb(value: int) -> ApprovalState | None:
    """A listing's state filter: None for APPROVAL_STATE_UNSPECIFIED (every state)."""
    if value == key_admin_pb2.APPROVAL_STATE_UNSPECIFIED:
        return None
    if value not in _APPROVAL_STATES_BACK:
        raise InvalidArgument("state must be an ApprovalState value")
    return _APPROVAL_STATES_BACK[value]


def approval_to_pb(r: ApprovalRequest) -> key_admin_pb2.ApprovalRequest:
    return key_admin_pb2.ApprovalRequest(
        request_id=r.request_id,
        operation=_APPROVAL_OPERATIONS[r.operation],
        key_id=r.key_id,
        requester=r.requester,
        create_time=ts(r.create_time),
        expire_time=ts(r.expire_time),
        state=_APPROVAL_STATES[r.state],
        required_approvals=r.required,
        approvals=[
            key_admin_pb2.Approval(principal=a.principal, approve_time=ts(a.time))
            for a in r.approvals
        ],
        policy=None if r.policy is None else policy_to_pb(r.policy),
        pending_window=dur(r.pending_window),
        widening=bool(r.widening),
        widening_summary=list(r.widening),
        reason=r.reason,
        close_time=ts(r.close_time),
        closed_by=r.closed_by,
    )
