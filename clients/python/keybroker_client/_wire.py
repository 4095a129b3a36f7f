"""Conversions between the SDK's types and the keybroker.v1 protobuf messages, in one place.

Only the clients (:mod:`keybroker_client.client` and :mod:`keybroker_client.aio`) use this
module: each builds its requests and reads its responses here, so the blocking and the asyncio
client cannot drift apart; nothing the SDK returns is a message.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta

import grpc
from google.protobuf import duration_pb2, message, timestamp_pb2
from keybroker.v1 import audit_pb2, crypto_pb2, key_admin_pb2, resources_pb2, tokens_pb2

from keybroker_client.errors import ApprovalPending, UnexpectedError
from keybroker_client.parsing import parse_duration
from keybroker_client.types import (
    Approval,
    ApprovalOperation,
    ApprovalPage,
    ApprovalRequest,
    ApprovalState,
    AuditEvent,
    AuditReport,
    DataKey,
    Decrypted,
    DecryptResult,
    Encrypted,
    Grant,
    HsmInfo,
    IssuedToken,
    Key,
    KeyPage,
    KeyPolicy,
    KeyState,
    KeyUsage,
    KeyVersion,
    KeyVersionUsage,
    Operation,
    Outcome,
    ReWrapResult,
)

#: gRPC status codes by number, for the per-item codes of batch and stream results.
_STATUS_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}

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
        countries=list(grant.countries),
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
        countries=tuple(grant.countries),
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
        hsm_info=_hsm_info(key),
    )


def _hsm_info(key: resources_pb2.Key) -> HsmInfo | None:
    if not key.HasField("hsm_info"):
        return None
    info = key.hsm_info
    return HsmInfo(info.name, info.jurisdiction, info.operator)


def key_page_from_proto(page: key_admin_pb2.ListKeysResponse) -> KeyPage:
    return KeyPage(
        keys=tuple(key_from_proto(k) for k in page.keys), next_page_token=page.next_page_token
    )


# Approvals

_APPROVAL_STATES = {
    key_admin_pb2.APPROVAL_STATE_PENDING: ApprovalState.PENDING,
    key_admin_pb2.APPROVAL_STATE_APPLIED: ApprovalState.APPLIED,
    key_admin_pb2.APPROVAL_STATE_FAILED: ApprovalState.FAILED,
    key_admin_pb2.APPROVAL_STATE_EXPIRED: ApprovalState.EXPIRED,
    key_admin_pb2.APPROVAL_STATE_CANCELLED: ApprovalState.CANCELLED,
}
_APPROVAL_STATE_NUMBERS = {state: number for number, state in _APPROVAL_STATES.items()}
_APPROVAL_OPERATIONS = {
    key_admin_pb2.APPROVAL_OPERATION_UPDATE_KEY_POLICY: ApprovalOperation.UPDATE_KEY_POLICY,
    key_admin_pb2.APPROVAL_OPERATION_ENABLE_KEY: ApprovalOperation.ENABLE_KEY,
    key_admin_pb2.APPROVAL_OPERATION_SCHEDULE_KEY_DESTRUCTION: (
        ApprovalOperation.SCHEDULE_KEY_DESTRUCTION
    ),
}


def approval_state_to_proto(state: ApprovalState | None) -> int:
    """A listing's filter: unspecified (every state) for None."""
    if state is None:
        return int(key_admin_pb2.APPROVAL_STATE_UNSPECIFIED)
    return int(_APPROVAL_STATE_NUMBERS.get(state, key_admin_pb2.APPROVAL_STATE_UNSPECIFIED))


def approval_from_proto(r: key_admin_pb2.ApprovalRequest) -> ApprovalRequest:
    return ApprovalRequest(
        request_id=r.request_id,
        operation=_APPROVAL_OPERATIONS.get(r.operation, ApprovalOperation.UNSPECIFIED),
        key_id=r.key_id,
        requester=r.requester,
        create_time=_time(r, "create_time"),
        expire_time=_time(r, "expire_time"),
        state=_APPROVAL_STATES.get(r.state, ApprovalState.UNSPECIFIED),
        required_approvals=r.required_approvals,
        approvals=tuple(Approval(a.principal, _time(a, "approve_time")) for a in r.approvals),
        policy=policy_from_proto(r.policy) if r.HasField("policy") else None,
        pending_window=_span(r, "pending_window"),
        widening=r.widening,
        widening_summary=tuple(r.widening_summary),
        reason=r.reason,
        close_time=_time(r, "close_time"),
        closed_by=r.closed_by,
    )


def approval_page_from_proto(page: key_admin_pb2.ListApprovalRequestsResponse) -> ApprovalPage:
    return ApprovalPage(
        requests=tuple(approval_from_proto(r) for r in page.approval_requests),
        next_page_token=page.next_page_token,
    )


def changed_key_from_proto(response: message.Message, request_id: str = "") -> Key:
    """The key of a response to a change that may need approval (UpdateKeyPolicy, EnableKey,
    ScheduleKeyDestruction).

    Raises:
        ApprovalPending: the broker answered with a pending approval request: nothing has
            changed yet.
    """
    key = key_from_proto(response.key)  # type: ignore[attr-defined]
    if response.HasField("approval_request"):
        pending = approval_from_proto(response.approval_request)  # type: ignore[attr-defined]
        raise ApprovalPending(pending, key, request_id=request_id)
    return key


# Data keys, blobs and tokens


def key_usage_from_proto(response: key_admin_pb2.GetKeyUsageResponse) -> KeyUsage:
    return KeyUsage(
        key=key_from_proto(response.key),
        versions=tuple(
            KeyVersionUsage(
                version=u.version,
                data_keys_issued=u.data_keys_issued,
                encryptions=u.encryptions,
                rewrapped=u.rewrapped,
                decrypts=u.decrypts,
                decrypts_refused=u.decrypts_refused,
                last_decrypt_time=_time(u, "last_decrypt_time"),
                last_use_time=_time(u, "last_use_time"),
            )
            for u in response.versions
        ),
        events_counted=response.events_counted,
    )


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


def rewrap_result_from_proto(result: crypto_pb2.ReWrapResult) -> ReWrapResult:
    if result.code:
        name = _STATUS_NAMES.get(result.code, "UNKNOWN")
        return ReWrapResult(b"", code=name, message=result.message)
    return ReWrapResult(
        ciphertext=result.ciphertext,
        key_id=result.key_id,
        key_version=result.key_version,
        already_current=result.already_current,
    )


def rewrap_batch_from_proto(
    response: crypto_pb2.ReWrapStreamResponse, expected: int
) -> list[ReWrapResult]:
    """The results of one answered batch of ``ReWrapStream``, which held ``expected`` items.

    Raises:
        UnexpectedError: the broker answered with another number of results.
    """
    if len(response.results) != expected:
        raise UnexpectedError(
            "INTERNAL", "the broker answered a batch with a wrong number of results"
        )
    return [rewrap_result_from_proto(result) for result in response.results]


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


# Requests whose fields need more than a constructor call (shared by both clients)

#: A span as a ``timedelta`` or as text such as ``"30d"``, ``"1h30m"``.
DurationLike = timedelta | str


def duration_like_to_proto(value: DurationLike) -> duration_pb2.Duration:
    return duration_to_proto(parse_duration(value) if isinstance(value, str) else value)


def create_key_request(
    key_id: str,
    description: str,
    policy: KeyPolicy | None,
    rotation_period: DurationLike | None,
    hsm: str,
) -> key_admin_pb2.CreateKeyRequest:
    request = key_admin_pb2.CreateKeyRequest(key_id=key_id, description=description, hsm=hsm)
    if policy is not None:
        request.policy.CopyFrom(policy_to_proto(policy))
    if rotation_period is not None:
        request.rotation_period.CopyFrom(duration_like_to_proto(rotation_period))
    return request


def schedule_destruction_request(
    key_id: str, pending_window: DurationLike | None
) -> key_admin_pb2.ScheduleKeyDestructionRequest:
    request = key_admin_pb2.ScheduleKeyDestructionRequest(key_id=key_id)
    if pending_window is not None:
        request.pending_window.CopyFrom(duration_like_to_proto(pending_window))
    return request


def list_approval_requests_request(
    state: ApprovalState | None, key_id: str, page_size: int, page_token: str
) -> key_admin_pb2.ListApprovalRequestsRequest:
    return key_admin_pb2.ListApprovalRequestsRequest(
        state=approval_state_to_proto(state),
        key_id=key_id,
        page_size=page_size,
        page_token=page_token,
    )


def issue_token_request(
    key_id: str,
    context: Mapping[str, str] | None,
    justification: str,
    ttl: DurationLike | None,
    subject: str,
    subject_cert_thumbprint: str,
    max_uses: int,
) -> tokens_pb2.IssueTokenRequest:
    request = tokens_pb2.IssueTokenRequest(
        key_id=key_id,
        context=dict(context or {}),
        justification=justification,
        subject=subject,
        subject_cert_thumbprint=subject_cert_thumbprint,
        max_uses=max_uses,
    )
    if ttl is not None:
        request.ttl.CopyFrom(duration_like_to_proto(ttl))
    return request


def audit_events_request(
    key_id: str,
    principal: str,
    operation: str,
    start_time: datetime | None,
    end_time: datetime | None,
    after_sequence: int,
    limit: int,
) -> audit_pb2.ListAuditEventsRequest:
    request = audit_pb2.ListAuditEventsRequest(
        key_id=key_id,
        principal=principal,
        operation=operation,
        after_sequence=after_sequence,
        limit=limit,
    )
    if start_time is not None:
        request.start_time.CopyFrom(timestamp_to_proto(start_time))
    if end_time is not None:
        request.end_time.CopyFrom(timestamp_to_proto(end_time))
    return request


# The batch path

#: One item of a batch decrypt: the blob, the context it was made with, and a token for it.
DecryptItem = tuple[bytes, Mapping[str, str] | None, str]


def batch_decrypt_request(items: Sequence[DecryptItem]) -> crypto_pb2.BatchDecryptRequest:
    return crypto_pb2.BatchDecryptRequest(
        items=[
            crypto_pb2.DecryptRequest(ciphertext=blob, context=dict(context or {}), token=token)
            for blob, context, token in items
        ]
    )


def decrypt_results_from_proto(response: crypto_pb2.BatchDecryptResponse) -> list[DecryptResult]:
    results = []
    for r in response.results:
        if r.code:
            name = _STATUS_NAMES.get(r.code, "UNKNOWN")
            results.append(DecryptResult(b"", code=name, message=r.message))
        else:
            results.append(DecryptResult(r.plaintext, r.key_id, r.key_version))
    return results


def data_keys_from_proto(response: crypto_pb2.GenerateDataKeysResponse) -> list[DataKey]:
    return [
        DataKey(dk.plaintext_key, dk.wrapped_key, response.key_id, response.key_version)
        for dk in response.data_keys
    ]
