"""The asyncio client: :class:`AsyncKeybrokerClient`, on ``grpc.aio``, for one or more brokers.

The same methods, arguments, types and errors as :class:`~keybroker_client.KeybrokerClient`,
as coroutines (``audit_events``, ``export_audit_log``, ``iter_keys``, ``iter_approval_requests``
and ``rewrap_stream`` are async iterators); requests are built and responses read by the same
functions of :mod:`keybroker_client._wire` as the blocking client's (a unit test fails when a
method of one has no counterpart in the other). Open it inside the event loop that uses it::

    from keybroker_client import resolve_settings
    from keybroker_client.aio import AsyncKeybrokerClient

    async def main() -> None:
        async with AsyncKeybrokerClient.from_settings(resolve_settings(identity="producer")) as kb:
            dk = await kb.generate_data_key("patients", {"dataset": "cohort-42"})
            await kb.encrypt_file("cohort-42.csv", "cohort-42.csv.kbf", "patients",
                                  {"dataset": "cohort-42"})
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any, Self

import grpc
import grpc.aio
from google.protobuf import message
from keybroker.v1 import (
    audit_pb2,
    crypto_pb2,
    key_admin_pb2,
    tokens_pb2,
)

from keybroker_client import _wire
from keybroker_client._async_recipes import AsyncFileRecipes
from keybroker_client._rewrap import DEFAULT_BATCH as DEFAULT_REWRAP_BATCH
from keybroker_client._rewrap import AsyncBatchFeeder, ReWrapItem
from keybroker_client._wire import DecryptItem
from keybroker_client.client import (
    DEFAULT_TIMEOUT,
    REQUEST_ID_HEADER,
    DurationLike,
    _read,
    base_options,
    rpcs_of,
)
from keybroker_client.config import ClientSettings
from keybroker_client.errors import error_from_rpc
from keybroker_client.failover import (
    DEFAULT_CONNECT_TIMEOUT,
    RETRY_RULES,
    Attempt,
    Call,
    Retry,
    TargetPool,
    attempts_for,
    channel_options,
    decrypt_retry,
    failing_async,
    resolve_targets,
    wait_ready_async,
)
from keybroker_client.types import (
    ApprovalPage,
    ApprovalRequest,
    ApprovalState,
    AuditEvent,
    AuditReport,
    DataKey,
    Decrypted,
    DecryptResult,
    Encrypted,
    IssuedToken,
    Key,
    KeyPage,
    KeyPolicy,
    KeyUsage,
    ReWrapResult,
)

__all__ = ["AsyncKeybrokerClient"]


class AsyncKeybrokerClient(AsyncFileRecipes):
    """A ``grpc.aio`` connection to one broker, or to several interchangeable ones.

    Use it as an async context manager, or await :meth:`close`. Arguments, and the rules for
    moving on to the next broker, as for :class:`~keybroker_client.KeybrokerClient`; each
    method's documentation is there.
    """

    def __init__(
        self,
        target: str | Sequence[str] | None = None,
        *,
        targets: Sequence[str] | None = None,
        root_certificates: bytes,
        private_key: bytes,
        certificate_chain: bytes,
        timeout: float = DEFAULT_TIMEOUT,
        server_name: str | None = None,
        options: Sequence[tuple[str, Any]] = (),
        max_attempts: int | None = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    ) -> None:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=root_certificates,
            private_key=private_key,
            certificate_chain=certificate_chain,
        )
        self.targets = resolve_targets(target, targets)
        self.target = ",".join(self.targets)
        self.timeout = timeout
        self.max_attempts = attempts_for(max_attempts, self.targets)
        self.connect_timeout = connect_timeout
        base = base_options(options, server_name)
        self._channels = [
            grpc.aio.secure_channel(
                t, credentials, options=channel_options(t, base, self.max_attempts > 1)
            )
            for t in self.targets
        ]
        self._rpcs = [rpcs_of(channel) for channel in self._channels]
        self._pool = TargetPool(len(self.targets))

    @classmethod
    def from_settings(
        cls,
        settings: ClientSettings,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_attempts: int | None = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    ) -> AsyncKeybrokerClient:
        """Opens a client from resolved settings (see :func:`resolve_settings`).

        Raises:
            ConfigError: a certificate, key or CA file cannot be read.
        """
        return cls(
            settings.target,
            root_certificates=_read(settings.ca, "CA certificate"),
            certificate_chain=_read(settings.cert, "client certificate"),
            private_key=_read(settings.key, "client key"),
            timeout=timeout,
            max_attempts=max_attempts,
            connect_timeout=connect_timeout,
        )

    async def close(self) -> None:
        """Closes the channels; calls in flight are cancelled."""
        for channel in self._channels:
            await channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _start(self, rpc: str, retry: Retry | None, timeout: float | None = None) -> Call:
        """The bookkeeping of one call of ``rpc`` (its rule unless ``retry`` overrides it)."""
        channels = self._channels
        return Call(
            pool=self._pool,
            targets=self.targets,
            retry=retry or RETRY_RULES[rpc],
            attempts=self.max_attempts,
            timeout=self.timeout if timeout is None else timeout,
            connect_timeout=self.connect_timeout,
            request_id=str(uuid.uuid4()),
            failing=lambda i: failing_async(channels[i]),
        )

    async def _ready(self, attempt: Attempt) -> bool:
        if not attempt.check_ready:
            return True
        return await wait_ready_async(self._channels[attempt.index], attempt.connect_timeout)

    async def _call(self, rpc: str, request: message.Message, retry: Retry | None = None) -> Any:
        """Sends a unary call, trying the next broker where its rule allows."""
        call = self._start(rpc, retry)
        metadata = ((REQUEST_ID_HEADER, call.request_id),)
        while (attempt := call.next()) is not None:
            if not await self._ready(attempt):
                call.unreachable(attempt)
                continue
            method = self._rpcs[attempt.index][rpc]
            try:
                response = await method(
                    request, timeout=attempt.timeout, metadata=metadata, wait_for_ready=False
                )
            except grpc.RpcError as exc:
                call.failed(attempt, error_from_rpc(exc, request_id=call.request_id))
                continue
            call.succeeded(attempt)
            return response
        raise call.error()

    async def _stream(
        self, rpc: str, request: message.Message, timeout: float | None
    ) -> AsyncIterator[Any]:
        """Yields a server stream's messages; another broker is tried only before the first."""
        call = self._start(rpc, None, timeout)
        metadata = ((REQUEST_ID_HEADER, call.request_id),)
        while (attempt := call.next()) is not None:
            if not await self._ready(attempt):
                call.unreachable(attempt)
                continue
            stream = self._rpcs[attempt.index][rpc](
                request, timeout=attempt.timeout, metadata=metadata, wait_for_ready=False
            )
            received = False
            try:
                async for item in stream:
                    received = True
                    yield item
            except grpc.RpcError as exc:
                error = error_from_rpc(exc, request_id=call.request_id)
                if received:
                    # Events already delivered: a new stream would repeat them.
                    raise error from None
                call.failed(attempt, error)
                continue
            finally:
                # Stops the server-side stream if the caller leaves the loop early.
                stream.cancel()
            call.succeeded(attempt)
            return
        raise call.error()

    # KeyAdmin

    async def _key_call(self, rpc: str, request: message.Message) -> Key:
        return _wire.key_from_proto((await self._call(rpc, request)).key)

    async def _changed_key(self, rpc: str, request: message.Message) -> Key:
        """A change that may need approval: the changed key, or ApprovalPending."""
        return _wire.changed_key_from_proto(await self._call(rpc, request))

    async def create_key(
        self,
        key_id: str,
        description: str = "",
        policy: KeyPolicy | None = None,
        rotation_period: DurationLike | None = None,
        hsm: str = "",
    ) -> Key:
        """Creates a key; version 1 is generated in the HSM. Admin only."""
        request = _wire.create_key_request(key_id, description, policy, rotation_period, hsm)
        return await self._key_call("CreateKey", request)

    async def get_key(self, key_id: str) -> Key:
        """Returns a key's metadata. Admin or auditor."""
        return await self._key_call("GetKey", key_admin_pb2.GetKeyRequest(key_id=key_id))

    async def list_keys(self, page_size: int = 0, page_token: str = "") -> KeyPage:
        """Returns one page of keys in key id order. Admin or auditor."""
        request = key_admin_pb2.ListKeysRequest(page_size=page_size, page_token=page_token)
        return _wire.key_page_from_proto(await self._call("ListKeys", request))

    async def iter_keys(self, page_size: int = 0) -> AsyncIterator[Key]:
        """Yields every key, following ``next_page_token`` from page to page."""
        token = ""
        while True:
            page = await self.list_keys(page_size=page_size, page_token=token)
            for key in page.keys:
                yield key
            if not page.next_page_token:
                return
            token = page.next_page_token

    async def rotate_key(self, key_id: str) -> Key:
        """Makes a new version primary; older versions still decrypt. Admin only."""
        request = key_admin_pb2.RotateKeyRequest(key_id=key_id)
        return await self._key_call("RotateKey", request)

    async def update_key_policy(self, key_id: str, policy: KeyPolicy) -> Key:
        """Replaces the key's policy (all of it). Admin only. Raises ApprovalPending when
        other admins must approve it first (the broker's ``approvals.required``)."""
        request = key_admin_pb2.UpdateKeyPolicyRequest(
            key_id=key_id, policy=_wire.policy_to_proto(policy)
        )
        return await self._changed_key("UpdateKeyPolicy", request)

    async def enable_key(self, key_id: str) -> Key:
        """Enables a disabled key. Admin only. Raises ApprovalPending as update_key_policy."""
        request = key_admin_pb2.EnableKeyRequest(key_id=key_id)
        return await self._changed_key("EnableKey", request)

    async def disable_key(self, key_id: str) -> Key:
        """Disables a key: it neither encrypts nor decrypts until enabled. Admin only."""
        request = key_admin_pb2.DisableKeyRequest(key_id=key_id)
        return await self._key_call("DisableKey", request)

    async def schedule_key_destruction(
        self, key_id: str, pending_window: DurationLike | None = None
    ) -> Key:
        """Schedules destruction of every version after ``pending_window``. Admin only.
        Raises ApprovalPending as update_key_policy."""
        request = _wire.schedule_destruction_request(key_id, pending_window)
        return await self._changed_key("ScheduleKeyDestruction", request)

    async def cancel_key_destruction(self, key_id: str) -> Key:
        """Cancels a scheduled destruction; the key comes back disabled. Admin only."""
        request = key_admin_pb2.CancelKeyDestructionRequest(key_id=key_id)
        return await self._key_call("CancelKeyDestruction", request)

    async def set_min_decryption_version(self, key_id: str, min_decryption_version: int) -> Key:
        """Retires the versions below ``min_decryption_version`` (not the primary). Admin
        only."""
        request = key_admin_pb2.SetMinDecryptionVersionRequest(
            key_id=key_id, min_decryption_version=min_decryption_version
        )
        return await self._key_call("SetMinDecryptionVersion", request)

    async def key_usage(self, key_id: str) -> KeyUsage:
        """Per-version use of a key, counted from the audit trail. Admin or auditor."""
        request = key_admin_pb2.GetKeyUsageRequest(key_id=key_id)
        return _wire.key_usage_from_proto(await self._call("GetKeyUsage", request))

    async def destruction_receipt(self, key_id: str) -> str:
        """The signed receipt of a destroyed key's destruction, as its file text. Admin or
        auditor. Raises FailedPrecondition when the key is not destroyed."""
        request = key_admin_pb2.GetDestructionReceiptRequest(key_id=key_id)
        receipt: str = (await self._call("GetDestructionReceipt", request)).receipt_json
        return receipt

    # Approvals (docs/lifecycle.md, "Approvals")

    async def approve_request(self, request_id: str) -> ApprovalRequest:
        """Approves a pending change. Admin only, never the requester."""
        request = key_admin_pb2.ApproveRequestRequest(request_id=request_id)
        response = await self._call("ApproveRequest", request)
        return _wire.approval_from_proto(response.approval_request)

    async def get_approval_request(self, request_id: str) -> ApprovalRequest:
        """One approval request. Admin or auditor."""
        request = key_admin_pb2.GetApprovalRequestRequest(request_id=request_id)
        response = await self._call("GetApprovalRequest", request)
        return _wire.approval_from_proto(response.approval_request)

    async def list_approval_requests(
        self,
        state: ApprovalState | None = None,
        key_id: str = "",
        page_size: int = 0,
        page_token: str = "",
    ) -> ApprovalPage:
        """One page of approval requests, oldest first. Admin or auditor."""
        request = _wire.list_approval_requests_request(state, key_id, page_size, page_token)
        return _wire.approval_page_from_proto(await self._call("ListApprovalRequests", request))

    async def iter_approval_requests(
        self, state: ApprovalState | None = None, key_id: str = "", page_size: int = 0
    ) -> AsyncIterator[ApprovalRequest]:
        """Yields every approval request (of ``state`` and ``key_id`` when given), following
        ``next_page_token`` from page to page."""
        token = ""
        while True:
            page = await self.list_approval_requests(state, key_id, page_size, token)
            for approval in page.requests:
                yield approval
            if not page.next_page_token:
                return
            token = page.next_page_token

    async def cancel_approval_request(self, request_id: str) -> ApprovalRequest:
        """Withdraws a pending request. Its requester, or an admin."""
        request = key_admin_pb2.CancelApprovalRequestRequest(request_id=request_id)
        response = await self._call("CancelApprovalRequest", request)
        return _wire.approval_from_proto(response.approval_request)

    # Crypto

    async def generate_data_key(
        self, key_id: str, context: Mapping[str, str] | None = None
    ) -> DataKey:
        """Returns a fresh 32-byte data key and its wrapped form. Needs an ``encrypt`` grant."""
        request = crypto_pb2.GenerateDataKeyRequest(key_id=key_id, context=dict(context or {}))
        return _wire.data_key_from_proto(await self._call("GenerateDataKey", request))

    async def encrypt(
        self, key_id: str, plaintext: bytes, context: Mapping[str, str] | None = None
    ) -> Encrypted:
        """Encrypts a small payload (at most 64 KiB) in the HSM. Needs an ``encrypt`` grant."""
        request = crypto_pb2.EncryptRequest(
            key_id=key_id, plaintext=plaintext, context=dict(context or {})
        )
        return _wire.encrypted_from_proto(await self._call("Encrypt", request))

    async def decrypt(
        self, ciphertext: bytes, context: Mapping[str, str] | None, token: str
    ) -> Decrypted:
        """Decrypts a wrapped key or ciphertext with a token issued to this client."""
        request = crypto_pb2.DecryptRequest(
            ciphertext=ciphertext, context=dict(context or {}), token=token
        )
        response = await self._call("Decrypt", request, retry=decrypt_retry(token))
        return _wire.decrypted_from_proto(response)

    async def rewrap(
        self, ciphertext: bytes, context: Mapping[str, str] | None = None
    ) -> Encrypted:
        """Re-encrypts a blob under its key's primary version; returns no plaintext."""
        request = crypto_pb2.ReWrapRequest(ciphertext=ciphertext, context=dict(context or {}))
        return _wire.encrypted_from_proto(await self._call("ReWrap", request))

    async def generate_data_keys(
        self, key_id: str, context: Mapping[str, str] | None = None, count: int = 1
    ) -> list[DataKey]:
        """Returns ``count`` fresh data keys (1 to 1,000) and their wrapped forms in one call.
        Needs an ``encrypt`` grant."""
        request = crypto_pb2.GenerateDataKeysRequest(
            key_id=key_id, context=dict(context or {}), count=count
        )
        return _wire.data_keys_from_proto(await self._call("GenerateDataKeys", request))

    async def batch_decrypt(self, items: Sequence[DecryptItem]) -> list[DecryptResult]:
        """Decrypts ``(ciphertext, context, token)`` items in one call; an item refused gives
        its status in its result without failing the others."""
        request = _wire.batch_decrypt_request(items)
        tokens = sorted({token for _, _, token in items})
        response = await self._call("BatchDecrypt", request, retry=decrypt_retry(*tokens))
        return _wire.decrypt_results_from_proto(response)

    async def rewrap_stream(
        self,
        items: Iterable[ReWrapItem] | AsyncIterable[ReWrapItem],
        context: Mapping[str, str] | None = None,
        *,
        batch_size: int = DEFAULT_REWRAP_BATCH,
        in_flight: int = 2,
        timeout: float | None = None,
    ) -> AsyncIterator[ReWrapResult]:
        """Re-wraps many blobs in one ``ReWrapStream``, one result per item in the items'
        order; ``items`` may be an async iterable too. At most ``in_flight`` batches are
        unanswered at a time, so memory stays bounded::

            async for result in kb.rewrap_stream(blobs):
                ...
        """
        feeder = AsyncBatchFeeder(items, context, batch_size, in_flight)
        call = self._start("ReWrapStream", None)
        while (attempt := call.next()) is not None:
            if await self._ready(attempt):
                break
            call.unreachable(attempt)
        else:
            raise call.error()
        responses = self._rpcs[attempt.index]["ReWrapStream"](
            feeder.requests(),
            timeout=timeout,
            metadata=((REQUEST_ID_HEADER, call.request_id),),
            wait_for_ready=False,
        )
        try:
            async for response in responses:
                for result in _wire.rewrap_batch_from_proto(response, feeder.answered()):
                    yield result
        except grpc.RpcError as exc:
            error = error_from_rpc(exc, request_id=call.request_id)
            call.failed(attempt, error)
            raise error from None
        finally:
            feeder.close()
            responses.cancel()
        call.succeeded(attempt)
        if feeder.error is not None:
            raise feeder.error

    # Tokens

    async def issue_token(
        self,
        key_id: str,
        context: Mapping[str, str] | None,
        justification: str,
        *,
        ttl: DurationLike | None = None,
        subject: str = "",
        subject_cert_thumbprint: str = "",
        max_uses: int = 0,
    ) -> IssuedToken:
        """Issues a decryption token bound to a client certificate."""
        request = _wire.issue_token_request(
            key_id, context, justification, ttl, subject, subject_cert_thumbprint, max_uses
        )
        return _wire.issued_token_from_proto(await self._call("IssueToken", request))

    async def revoke_token(self, token_id: str) -> None:
        """Revokes a token everywhere. Admin, or the token's subject."""
        request = tokens_pb2.RevokeTokenRequest(token_id=token_id)
        await self._call("RevokeToken", request)

    async def signing_keys(self) -> dict[str, Any]:
        """Returns the broker's JWKS (RFC 7517): token and audit signing public keys."""
        request = tokens_pb2.GetSigningKeysRequest()
        response = await self._call("GetSigningKeys", request)
        jwks: dict[str, Any] = json.loads(response.jwks_json or "{}")
        return jwks

    # Audit

    async def audit_events(
        self,
        *,
        key_id: str = "",
        principal: str = "",
        operation: str = "",
        start_time: datetime | None = None,
        end_time: datetime | None = None,
        after_sequence: int = 0,
        limit: int = 0,
        timeout: float | None = None,
    ) -> AsyncIterator[AuditEvent]:
        """Streams audit events in sequence order; empty filters match everything."""
        request = _wire.audit_events_request(
            key_id, principal, operation, start_time, end_time, after_sequence, limit
        )
        async for item in self._stream("ListAuditEvents", request, timeout):
            yield _wire.audit_event_from_proto(item.event)

    async def verify_audit_log(self) -> AuditReport:
        """Walks the audit hash chain and checkpoints at the broker; check ``ok``."""
        request = audit_pb2.VerifyAuditLogRequest()
        return _wire.audit_report_from_proto(await self._call("VerifyAuditLog", request))

    async def export_audit_log(
        self, after_sequence: int = 0, *, timeout: float | None = None
    ) -> AsyncIterator[bytes]:
        """Streams an export of the audit log (auditor or admin): JSON lines ending with the
        broker's signed manifest; verify it with :func:`keybroker_client.evidence.verify_export`.
        """
        request = audit_pb2.ExportAuditLogRequest(after_sequence=after_sequence)
        async for item in self._stream("ExportAuditLog", request, timeout):
            yield item.line
