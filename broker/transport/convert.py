"""Proto <-> domain conversions. No rules here beyond shape: services validate."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from keybroker.v1 import resources_pb2 as pb

from broker.domain import (
    AuditEvent,
    Grant,
    Key,
    KeyPolicy,
    KeyState,
    Operation,
    Outcome,
)
from broker.errors import InvalidArgument

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
            )
            for g in policy.grants
        ],
        allowed_jurisdictions=list(policy.allowed_jurisdictions),
    )


def key_to_pb(key: Key) -> pb.Key:
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
