"""Thin servicers: proto in, domain call, proto out. Errors are mapped by the interceptor."""

from __future__ import annotations

import json
from collections.abc import Iterator

import grpc
from keybroker.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    crypto_pb2,
    crypto_pb2_grpc,
    key_admin_pb2,
    key_admin_pb2_grpc,
    resources_pb2,
    tokens_pb2,
    tokens_pb2_grpc,
)

from broker.domain import AuditFilter, Key
from broker.errors import KeybrokerError
from broker.services.approvals import ApprovalService, Requested
from broker.services.audit import AuditReader
from broker.services.crypto import CryptoService, Opened, ReWrapped
from broker.services.keys import KeyService
from broker.services.tokens import TokenService
from broker.transport.auth import caller_of
from broker.transport.convert import (
    approval_state_from_pb,
    approval_to_pb,
    event_to_pb,
    from_dur,
    from_ts,
    key_to_pb,
    policy_from_pb,
    ts,
    usage_to_pb,
)
from broker.transport.status import status_for

Ctx = grpc.ServicerContext


class KeyAdminServicer(key_admin_pb2_grpc.KeyAdminServicer):
    def __init__(self, keys: KeyService, approvals: ApprovalService) -> None:
        self._keys = keys
        self._approvals = approvals

    def _requested(self, done: Requested) -> dict[str, object]:
        """A gated change's response fields: the key, and the pending request if any."""
        fields: dict[str, object] = {"key": self._key(done.key)}
        if done.pending is not None:
            fields["approval_request"] = approval_to_pb(done.pending)
        return fields

    def _key(self, key: Key) -> resources_pb2.Key:
        """The key's message, with where its HSM stands (name, jurisdiction, operator)."""
        return key_to_pb(key, self._keys.hsm_info(key.hsm))

    def CreateKey(self, request: key_admin_pb2.CreateKeyRequest, context: Ctx) -> object:
        caller = caller_of(context)
        key = self._keys.create(
            caller,
            request.key_id,
            request.description,
            policy_from_pb(request.policy),
            from_dur(request, "rotation_period"),
            request.hsm,
        )
        return key_admin_pb2.CreateKeyResponse(key=self._key(key))

    def GetKey(self, request: key_admin_pb2.GetKeyRequest, context: Ctx) -> object:
        key = self._keys.get(caller_of(context), request.key_id)
        return key_admin_pb2.GetKeyResponse(key=self._key(key))

    def ListKeys(self, request: key_admin_pb2.ListKeysRequest, context: Ctx) -> object:
        keys, token = self._keys.list(caller_of(context), request.page_size, request.page_token)
        return key_admin_pb2.ListKeysResponse(
            keys=[self._key(k) for k in keys], next_page_token=token
        )

    def RotateKey(self, request: key_admin_pb2.RotateKeyRequest, context: Ctx) -> object:
        key = self._keys.rotate(caller_of(context), request.key_id)
        return key_admin_pb2.RotateKeyResponse(key=self._key(key))

    def UpdateKeyPolicy(
        self, request: key_admin_pb2.UpdateKeyPolicyRequest, context: Ctx
    ) -> object:
        caller = caller_of(context)
        policy = policy_from_pb(request.policy)
        done = self._approvals.update_policy(caller, request.key_id, policy)
        return key_admin_pb2.UpdateKeyPolicyResponse(**self._requested(done))

    def EnableKey(self, request: key_admin_pb2.EnableKeyRequest, context: Ctx) -> object:
        done = self._approvals.enable(caller_of(context), request.key_id)
        return key_admin_pb2.EnableKeyResponse(**self._requested(done))

    def DisableKey(self, request: key_admin_pb2.DisableKeyRequest, context: Ctx) -> object:
        key = self._keys.set_enabled(caller_of(context), request.key_id, False)
        return key_admin_pb2.DisableKeyResponse(key=self._key(key))

    def ScheduleKeyDestruction(
        self, request: key_admin_pb2.ScheduleKeyDestructionRequest, context: Ctx
    ) -> object:
        done = self._approvals.schedule_destruction(
            caller_of(context), request.key_id, from_dur(request, "pending_window")
        )
        return key_admin_pb2.ScheduleKeyDestructionResponse(**self._requested(done))

    def CancelKeyDestruction(
        self, request: key_admin_pb2.CancelKeyDestructionRequest, context: Ctx
    ) -> object:
        key = self._keys.cancel_destruction(caller_of(context), request.key_id)
        return key_admin_pb2.CancelKeyDestructionResponse(key=self._key(key))

    def SetMinDecryptionVersion(
        self, request: key_admin_pb2.SetMinDecryptionVersionRequest, context: Ctx
    ) -> object:
        key = self._keys.set_min_decryption_version(
            caller_of(context), request.key_id, request.min_decryption_version
        )
        return key_admin_pb2.SetMinDecryptionVersionResponse(key=self._key(key))

    def GetKeyUsage(self, request: key_admin_pb2.GetKeyUsageRequest, context: Ctx) -> object:
        key, usage, events = self._keys.usage(caller_of(context), request.key_id)
        return key_admin_pb2.GetKeyUsageResponse(
            key=self._key(key), versions=[usage_to_pb(u) for u in usage], events_counted=events
        )

    def GetDestructionReceipt(
        self, request: key_admin_pb2.GetDestructionReceiptRequest, context: Ctx
    ) -> object:
        key, receipt = self._keys.destruction_receipt(caller_of(context), request.key_id)
        return key_admin_pb2.GetDestructionReceiptResponse(key=self._key(key), receipt_json=receipt)

    def ApproveRequest(self, request: key_admin_pb2.ApproveRequestRequest, context: Ctx) -> object:
        approval, key = self._approvals.approve(caller_of(context), request.request_id)
        return key_admin_pb2.ApproveRequestResponse(
            approval_request=approval_to_pb(approval), key=self._key(key)
        )

    def GetApprovalRequest(
        self, request: key_admin_pb2.GetApprovalRequestRequest, context: Ctx
    ) -> object:
        approval = self._approvals.get(caller_of(context), request.request_id)
        return key_admin_pb2.GetApprovalRequestResponse(approval_request=approval_to_pb(approval))

    def ListApprovalRequests(
        self, request: key_admin_pb2.ListApprovalRequestsRequest, context: Ctx
    ) -> object:
        found, token = self._approvals.list(
            caller_of(context),
            approval_state_from_pb(request.state),
            request.key_id,
            request.page_size,
            request.page_token,
        )
        return key_admin_pb2.ListApprovalRequestsResponse(
            approval_requests=[approval_to_pb(r) for r in found], next_page_token=token
        )

    def CancelApprovalRequest(
        self, request: key_admin_pb2.CancelApprovalRequestRequest, context: Ctx
    ) -> object:
        approval = self._approvals.cancel(caller_of(context), request.request_id)
        return key_admin_pb2.CancelApprovalRequestResponse(
            approval_request=approval_to_pb(approval)
        )


class CryptoServicer(crypto_pb2_grpc.CryptoServicer):
    def __init__(self, crypto: CryptoService) -> None:
        self._crypto = crypto

    def GenerateDataKey(self, request: crypto_pb2.GenerateDataKeyRequest, context: Ctx) -> object:
        data_key, sealed = self._crypto.generate_data_key(
            caller_of(context), request.key_id, dict(request.context)
        )
        return crypto_pb2.GenerateDataKeyResponse(
            plaintext_key=data_key,
            wrapped_key=sealed.blob,
            key_id=sealed.key_id,
            key_version=sealed.key_version,
        )

    def Encrypt(self, request: crypto_pb2.EncryptRequest, context: Ctx) -> object:
        sealed = self._crypto.encrypt(
            caller_of(context), request.key_id, request.plaintext, dict(request.context)
        )
        return crypto_pb2.EncryptResponse(
            ciphertext=sealed.blob, key_id=sealed.key_id, key_version=sealed.key_version
        )

    def Decrypt(self, request: crypto_pb2.DecryptRequest, context: Ctx) -> object:
        opened = self._crypto.decrypt(
            caller_of(context), request.ciphertext, dict(request.context), request.token
        )
        return crypto_pb2.DecryptResponse(
            plaintext=opened.plaintext, key_id=opened.key_id, key_version=opened.key_version
        )

    def GenerateDataKeys(self, request: crypto_pb2.GenerateDataKeysRequest, context: Ctx) -> object:
        made = self._crypto.generate_data_keys(
            caller_of(context), request.key_id, dict(request.context), request.count
        )
        first = made[0][1]
        return crypto_pb2.GenerateDataKeysResponse(
            data_keys=[
                crypto_pb2.DataKey(plaintext_key=data_key, wrapped_key=sealed.blob)
                for data_key, sealed in made
            ],
            key_id=first.key_id,
            key_version=first.key_version,
        )

    def BatchDecrypt(self, request: crypto_pb2.BatchDecryptRequest, context: Ctx) -> object:
        results = self._crypto.batch_decrypt(
            caller_of(context),
            [(item.ciphertext, dict(item.context), item.token) for item in request.items],
        )
        return crypto_pb2.BatchDecryptResponse(results=[_batch_result(r) for r in results])

    def ReWrap(self, request: crypto_pb2.ReWrapRequest, context: Ctx) -> object:
        sealed = self._crypto.rewrap(caller_of(context), request.ciphertext, dict(request.context))
        return crypto_pb2.ReWrapResponse(
            ciphertext=sealed.blob, key_id=sealed.key_id, key_version=sealed.key_version
        )

    def ReWrapStream(
        self, request_iterator: Iterator[crypto_pb2.ReWrapStreamRequest], context: Ctx
    ) -> Iterator[object]:
        """One batch at a time: each request message is answered before the next is taken."""
        caller = caller_of(context)
        for request in request_iterator:
            if not context.is_active():
                return
            items = [(item.ciphertext, dict(item.context)) for item in request.items]
            results = self._crypto.rewrap_many(caller, items)
            yield crypto_pb2.ReWrapStreamResponse(results=[_rewrap_result(r) for r in results])


class TokensServicer(tokens_pb2_grpc.TokensServicer):
    def __init__(self, tokens: TokenService) -> None:
        self._tokens = tokens

    def IssueToken(self, request: tokens_pb2.IssueTokenRequest, context: Ctx) -> object:
        token, claims = self._tokens.issue(
            caller_of(context),
            request.key_id,
            dict(request.context),
            request.justification,
            from_dur(request, "ttl"),
            request.subject,
            request.subject_cert_thumbprint,
            request.max_uses,
        )
        return tokens_pb2.IssueTokenResponse(
            token=token,
            token_id=claims.token_id,
            expire_time=ts(claims.expires_at),
            max_uses=claims.max_uses,
        )

    def RevokeToken(self, request: tokens_pb2.RevokeTokenRequest, context: Ctx) -> object:
        self._tokens.revoke(caller_of(context), request.token_id)
        return tokens_pb2.RevokeTokenResponse()

    def GetSigningKeys(self, request: tokens_pb2.GetSigningKeysRequest, context: Ctx) -> object:
        caller_of(context).require_authenticated()
        return tokens_pb2.GetSigningKeysResponse(
            jwks_json=json.dumps(self._tokens.jwks(), sort_keys=True)
        )


class AuditServicer(audit_pb2_grpc.AuditServicer):
    def __init__(self, reader: AuditReader) -> None:
        self._reader = reader

    def ListAuditEvents(
        self, request: audit_pb2.ListAuditEventsRequest, context: Ctx
    ) -> Iterator[object]:
        flt = AuditFilter(
            key_id=request.key_id,
            principal=request.principal,
            operation=request.operation,
            start_time=from_ts(request, "start_time"),
            end_time=from_ts(request, "end_time"),
            after_sequence=request.after_sequence,
            limit=request.limit,
        )
        for event in self._reader.list(caller_of(context), flt):
            if not context.is_active():
                return
            yield audit_pb2.ListAuditEventsResponse(event=event_to_pb(event))

    def VerifyAuditLog(self, request: audit_pb2.VerifyAuditLogRequest, context: Ctx) -> object:
        report = self._reader.verify(caller_of(context))
        return audit_pb2.VerifyAuditLogResponse(
            ok=report.ok,
            events_checked=report.events_checked,
            first_bad_sequence=report.first_bad_sequence,
            error=report.error,
            head_hash=report.head_hash,
            first_bad_chain=report.first_bad_chain,
            unsigned_events=report.unsigned_events,
            chains_checked=report.chains_checked,
            checkpoints_checked=report.checkpoints_checked,
        )

    def ExportAuditLog(
        self, request: audit_pb2.ExportAuditLogRequest, context: Ctx
    ) -> Iterator[object]:
        lines = self._reader.export(caller_of(context), request.after_sequence)
        for line in lines:
            if not context.is_active():
                return
            yield audit_pb2.ExportAuditLogResponse(line=line)


def _batch_result(result: Opened | KeybrokerError) -> crypto_pb2.BatchDecryptResult:
    """One item's outcome: its plaintext, or the status code and message a Decrypt of it
    alone would have answered (the same table, `status_for`)."""
    if isinstance(result, KeybrokerError):
        return crypto_pb2.BatchDecryptResult(
            code=status_for(result).value[0], message=result.message
        )
    return crypto_pb2.BatchDecryptResult(
        plaintext=result.plaintext, key_id=result.key_id, key_version=result.key_version
    )


def _rewrap_result(result: ReWrapped | KeybrokerError) -> crypto_pb2.ReWrapResult:
    """One item's outcome: its blob under the primary version, or the status code and message
    a ReWrap of it alone would have answered."""
    if isinstance(result, KeybrokerError):
        return crypto_pb2.ReWrapResult(code=status_for(result).value[0], message=result.message)
    return crypto_pb2.ReWrapResult(
        ciphertext=result.blob,
        key_id=result.key_id,
        key_version=result.key_version,
        already_current=result.already_current,
    )
