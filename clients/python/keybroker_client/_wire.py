"""Conversions between the SDK's types and the keybroker.v1 protobuf messages, in one place.

Only :mod:`keybroker_client.client` uses this module; nothing the SDK returns is a message.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from google.protobuf import duration_pb2, message, timestamp_pb2
from keybroker.v1 import audit_pb2, crypto_pb2, key_admin_pb2, resources_pb2, tokens_pb2

from keybroker_client.types import (
    AuditEvent,
    AuditReport,
    DataKey,
    Decrypted,
    Encrypted,
    Grant,
    IssuedToken,
    Key,
    KeyPage,
    KeyPolicy,
    KeyState,
    KeyVersion,
    Operation,
    Outcome,
)

_KEY_STATES = {
    resources_pb2.KEY_STATE_ENABLED: KeyState.ENABLED,
    resources_pb2.KEY_STATE_DISABLED: KeyState.DISABLED,
    resources_pb2.KEY_STATE_PENDING_DESTRUCTION: KeyState.PENDING_DESTRUCTION,
    resources_pb2.KEY_STATE_DESTROYED: KeyState.DESTROYED,
}
_OPERATIONS = {
    resources_pb2.OPERATION_ENCRYPT: Operation.ENCRYPT,
    resources_pb2.OPERATION_DECRYPT: Operation.DECRYPT,
    resources_pb2.OPERATION_REWRAP: Operation.REWRAP,
}
_OPERATION_NUMBERS = {op: number for number, op in _OPERATIONS.items()}
_OUTCOMES = {
    resources_pb2.OUTCOME_ALLOWED: Outcome.ALLOWED,
    resources_pb2.OUTCOME_DENIED: Outcome.DENIED,
    resources_pb2.OUTCOME_ERROR: Outcome.ERROR,
}


# Times and spans


def duration_to_proto(value: timedelta) -> duration_pb2.Duration:
    out = duration_pb2.Duration()
    out.FromTimedelta(value)
    return out


def timestamp_to_proto(value: datetime) -> timestamp_pb2.Timestamp:
    """A Timestamp of ``value``; a naive datetime is taken as UTC."""
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(value if value.tzinfo else value.replace(tzinfo=UTC))
    return out


def _time(parent: message.Message, field_name: str) -> datetime | None:
    if not parent.HasField(field_name):
        return None
    value: timestamp_pb2.Timestamp = getattr(parent, field_name)
    result: datetime = value.ToDatetime(tzinfo=UTC)
    return result


def _span(parent: message.Message, field_name: str) -> timedelta | None:
    if not parent.HasField(field_name):
        return None
    value: duration_pb2.Duration = getattr(parent, field_name)
    result: timedelta = value.ToTimedelta()
    return result


# Keys and policies


def grant_to_proto(grant: Grant) -> resources_pb2.Grant:
    out = resources_pb2.Grant(
        principal=grant.principal,
        operations=[
            _OPERATION_NUMBERS.get(op, resources_pb2.OPERATION_UNSPECIFIED)
            for op in grant.operations
        ],
        context=dict(grant.context),
    )
    if grant.max_token_ttl is not None:
        out.max_token_ttl.CopyFrom(duration_to_proto(grant.max_token_ttl))
    return out


def policy_to_proto(policy: KeyPolicy) -> resources_pb2.KeyPolicy:
    return resources_pb2.KeyPolicy(
        grants=[grant_to_proto(g) for g in policy.grants],
        allowed_jurisdictions=list(policy.allowed_jurisdictions),
    )


def grant_from_proto(grant: resources_pb2.Grant) -> Grant:
    return Grant(
        principal=grant.principal,
        operations=tuple(_OPERATIONS.get(op, Operation.UNSPECIFIED) for op in grant.operations),
        context=dict(grant.context),
        max_token_ttl=_span(grant, "max_token_ttl"),
    )


def policy_from_proto(policy: resources_pb2.KeyPolicy) -> KeyPolicy:
    return KeyPolicy(
        grants=tuple(grant_from_proto(g) for g in policy.grants),
        allowed_jurisdictions=tuple(policy.allowed_jurisdictions),
    )


def key_from_proto(key: resources_pb2.Key) -> Key:
    return Key(
        key_id=key.key_id,
        description=key.description,
        state=_KEY_STATES.get(key.state, KeyState.UNSPECIFIED),
        primary_version=key.primary_version,
        versions=tuple(
            KeyVersion(version=v.version, create_time=_time(v, "create_time")) for v in key.versions
        ),
        min_decryption_version=key.min_decryption_version,
        policy=policy_from_proto(key.policy),
        hsm=key.hsm,
        create_time=_time(key, "create_time"),
        rotation_period=_span(key, "rotation_period"),
        next_rotation_time=_time(key, "next_rotation_time"),
        destroy_time=_time(key, "destroy_time"),
    )


def key_page_from_proto(page: key_admin_pb2.ListKeysResponse) -> KeyPage:
    return KeyPage(
        keys=tuple(key_from_proto(k) for k in page.keys), next_page_token=page.next_page_token
    )


# Data keys, blobs and tokens


def data_key_from_proto(response: crypto_pb2.GenerateDataKeyResponse) -> DataKey:
    return DataKey(
        plaintext_key=response.plaintext_key,
        wrapped_key=response.wrapped_key,
        key_id=response.key_id,
        key_version=response.key_version,
    )


def encrypted_from_proto(
    response: crypto_pb2.EncryptResponse | crypto_pb2.ReWrapResponse,
) -> Encrypted:
    return Encrypted(response.ciphertext, response.key_id, response.key_version)


def decrypted_from_proto(response: crypto_pb2.DecryptResponse) -> Decrypted:
    return Decrypted(response.plaintext, response.key_id, response.key_version)


def issued_token_from_proto(response: tokens_pb2.IssueTokenResponse) -> IssuedToken:
    return IssuedToken(
        token=response.token,
        token_id=response.token_id,
        expire_time=_time(response, "expire_time"),
        max_uses=response.max_uses,
    )


# Audit


def audit_event_from_proto(event: resources_pb2.AuditEvent) -> AuditEvent:
    return AuditEvent(
        sequence=event.sequence,
        time=_time(event, "time"),
        principal=event.principal,
        operation=event.operation,
        key_id=event.key_id,
        key_version=event.key_version,
        token_id=event.token_id,
        context=dict(event.context),
        justification=event.justification,
        outcome=_OUTCOMES.get(event.outcome, Outcome.UNSPECIFIED),
        reason=event.reason,
        request_id=event.request_id,
        prev_hash=event.prev_hash,
        hash=event.hash,
        chain=event.chain,
        chain_sequence=event.chain_sequence,
    )


def audit_report_from_proto(response: audit_pb2.VerifyAuditLogResponse) -> AuditReport:
    return AuditReport(
        ok=response.ok,
        events_checked=response.events_checked,
        first_bad_sequence=response.first_bad_sequence,
        error=response.error,
        head_hash=response.head_hash,
        first_bad_chain=response.first_bad_chain,
        unsigned_events=response.unsigned_events,
        chains_checked=response.chains_checked,
        checkpoints_checked=response.checkpoints_checked,
    )
