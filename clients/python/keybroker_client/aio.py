"""The asyncio client: :class:`AsyncKeybrokerClient`, on ``grpc.aio``.

The same methods, arguments, types and errors as :class:`~keybroker_client.KeybrokerClient`,
as coroutines (``audit_events`` and ``iter_keys`` are async iterators); the conversions are the
ones of :mod:`keybroker_client._wire`. Open it inside the event loop that uses it::

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
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any, Self

import grpc
import grpc.aio
from google.protobuf import message
from keybroker.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    crypto_pb2,
    crypto_pb2_grpc,
    key_admin_pb2,
    key_admin_pb2_grpc,
    tokens_pb2,
    tokens_pb2_grpc,
)

from keybroker_client import _wire
from keybroker_client._async_recipes import AsyncFileRecipes
from keybroker_client.client import (
    DEFAULT_TIMEOUT,
    REQUEST_ID_HEADER,
    DurationLike,
    _duration,
    _read,
)
from keybroker_client.config import ClientSettings
from keybroker_client.errors import error_from_rpc
from keybroker_client.types import (
    AuditEvent,
    AuditReport,
    DataKey,
    Decrypted,
    Encrypted,
    IssuedToken,
    Key,
    KeyPage,
    KeyPolicy,
)

__all__ = ["AsyncKeybrokerClient"]


class AsyncKeybrokerClient(AsyncFileRecipes):
    """A ``grpc.aio`` connection to one broker over mutual TLS.

    Use it as an async context manager, or await :meth:`close`. Arguments as for
    :class:`~keybroker_client.KeybrokerClient`; each method's documentation is there.
    """

    def __init__(
        self,
        target: str,
        *,
        root_certificates: bytes,
        private_key: bytes,
        certificate_chain: bytes,
        timeout: float = DEFAULT_TIMEOUT,
        server_name: str | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=root_certificates,
            private_key=private_key,
            certificate_chain=certificate_chain,
        )
        channel_options = list(options)
        if server_name:
            channel_options.append(("grpc.ssl_target_name_override", server_name))
        self.target = target
        self.timeout = timeout
        self._channel = grpc.aio.secure_channel(target, credentials, options=channel_options)
        self._keys = key_admin_pb2_grpc.KeyAdminStub(self._channel)
        self._crypto = crypto_pb2_grpc.CryptoStub(self._channel)
        self._tokens = tokens_pb2_grpc.TokensStub(self._channel)
        self._audit = audit_pb2_grpc.AuditStub(self._channel)

    @classmethod
    def from_settings(
        cls, settings: ClientSettings, *, timeout: float = DEFAULT_TIMEOUT
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
        )

    async def close(self) -> None:
        """Closes the channel; calls in flight are cancelled."""
        await self._channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _call(self, rpc: Callable[..., Any], request: message.Message) -> Any:
        request_id = str(uuid.uuid4())
        try:
            return await rpc(
                request, timeout=self.timeout, metadata=((REQUEST_ID_HEADER, request_id),)
            )
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, request_id=request_id) from None

    # KeyAdmin

    async def _key_call(self, rpc: Callable[..., Any], request: message.Message) -> Key:
        return _wire.key_from_proto((await self._call(rpc, request)).key)

    async def create_key(
        self,
        key_id: str,
        description: str = "",
        policy: KeyPolicy | None = None,
        rotation_period: DurationLike | None = None,
        hsm: str = "",
    ) -> Key:
        """Creates a key; version 1 is generated in the HSM. Admin only."""
        request = key_admin_pb2.CreateKeyRequest(key_id=key_id, description=description, hsm=hsm)
        if policy is not None:
            request.policy.CopyFrom(_wire.policy_to_proto(policy))
        if rotation_period is not None:
            request.rotation_period.CopyFrom(_duration(rotation_period))
        return await self._key_call(self._keys.CreateKey, request)

    async def get_key(self, key_id: str) -> Key:
        """Returns a key's metadata. Admin or auditor."""
        return await self._key_call(self._keys.GetKey, key_admin_pb2.GetKeyRequest(key_id=key_id))

    async def list_keys(self, page_size: int = 0, page_token: str = "") -> KeyPage:
        """Returns one page of keys in key id order. Admin or auditor."""
        request = key_admin_pb2.ListKeysRequest(page_size=page_size, page_token=page_token)
        return _wire.key_page_from_proto(await self._call(self._keys.ListKeys, request))

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
        return await self._key_call(self._keys.RotateKey, request)

    async def update_key_policy(self, key_id: str, policy: KeyPolicy) -> Key:
        """Replaces the key's policy (all of it). Admin only."""
        request = key_admin_pb2.UpdateKeyPolicyRequest(
            key_id=key_id, policy=_wire.policy_to_proto(policy)
        )
        return await self._key_call(self._keys.UpdateKeyPolicy, request)

    async def enable_key(self, key_id: str) -> Key:
        """Enables a disabled key. Admin only."""
        request = key_admin_pb2.EnableKeyRequest(key_id=key_id)
        return await self._key_call(self._keys.EnableKey, request)

    async def disable_key(self, key_id: str) -> Key:
        """Disables a key: it neither encrypts nor decrypts until enabled. Admin only."""
        request = key_admin_pb2.DisableKeyRequest(key_id=key_id)
        return await self._key_call(self._keys.DisableKey, request)

    async def schedule_key_destruction(
        self, key_id: str, pending_window: DurationLike | None = None
    ) -> Key:
        """Schedules destruction of every version after ``pending_window``. Admin only."""
        request = key_admin_pb2.ScheduleKeyDestructionRequest(key_id=key_id)
        if pending_window is not None:
            request.pending_window.CopyFrom(_duration(pending_window))
        return await self._key_call(self._keys.ScheduleKeyDestruction, request)

    async def cancel_key_destruction(self, key_id: str) -> Key:
        """Cancels a scheduled destruction; the key comes back disabled. Admin only."""
        request = key_admin_pb2.CancelKeyDestructionRequest(key_id=key_id)
        return await self._key_call(self._keys.CancelKeyDestruction, request)

    # Crypto

    async def generate_data_key(
        self, key_id: str, context: Mapping[str, str] | None = None
    ) -> DataKey:
        """Returns a fresh 32-byte data key and its wrapped form. Needs an ``encrypt`` grant."""
        request = crypto_pb2.GenerateDataKeyRequest(key_id=key_id, context=dict(context or {}))
        return _wire.data_key_from_proto(await self._call(self._crypto.GenerateDataKey, request))

    async def encrypt(
        self, key_id: str, plaintext: bytes, context: Mapping[str, str] | None = None
    ) -> Encrypted:
        """Encrypts a small payload (at most 64 KiB) in the HSM. Needs an ``encrypt`` grant."""
        request = crypto_pb2.EncryptRequest(
            key_id=key_id, plaintext=plaintext, context=dict(context or {})
        )
        return _wire.encrypted_from_proto(await self._call(self._crypto.Encrypt, request))

    async def decrypt(
        self, ciphertext: bytes, context: Mapping[str, str] | None, token: str
    ) -> Decrypted:
        """Decrypts a wrapped key or ciphertext with a token issued to this client."""
        request = crypto_pb2.DecryptRequest(
            ciphertext=ciphertext, context=dict(context or {}), token=token
        )
        return _wire.decrypted_from_proto(await self._call(self._crypto.Decrypt, request))

    async def rewrap(
        self, ciphertext: bytes, context: Mapping[str, str] | None = None
    ) -> Encrypted:
        """Re-encrypts a blob under its key's primary version; returns no plaintext."""
        request = crypto_pb2.ReWrapRequest(ciphertext=ciphertext, context=dict(context or {}))
        return _wire.encrypted_from_proto(await self._call(self._crypto.ReWrap, request))

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
        request = tokens_pb2.IssueTokenRequest(
            key_id=key_id,
            context=dict(context or {}),
            justification=justification,
            subject=subject,
            subject_cert_thumbprint=subject_cert_thumbprint,
            max_uses=max_uses,
        )
        if ttl is not None:
            request.ttl.CopyFrom(_duration(ttl))
        return _wire.issued_token_from_proto(await self._call(self._tokens.IssueToken, request))

    async def revoke_token(self, token_id: str) -> None:
        """Revokes a token everywhere. Admin, or the token's subject."""
        request = tokens_pb2.RevokeTokenRequest(token_id=token_id)
        await self._call(self._tokens.RevokeToken, request)

    async def signing_keys(self) -> dict[str, Any]:
        """Returns the broker's JWKS (RFC 7517): token and audit signing public keys."""
        request = tokens_pb2.GetSigningKeysRequest()
        response = await self._call(self._tokens.GetSigningKeys, request)
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
        request = audit_pb2.ListAuditEventsRequest(
            key_id=key_id,
            principal=principal,
            operation=operation,
            after_sequence=after_sequence,
            limit=limit,
        )
        if start_time is not None:
            request.start_time.CopyFrom(_wire.timestamp_to_proto(start_time))
        if end_time is not None:
            request.end_time.CopyFrom(_wire.timestamp_to_proto(end_time))
        request_id = str(uuid.uuid4())
        stream = self._audit.ListAuditEvents(
            request,
            timeout=self.timeout if timeout is None else timeout,
            metadata=((REQUEST_ID_HEADER, request_id),),
        )
        try:
            async for item in stream:
                yield _wire.audit_event_from_proto(item.event)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, request_id=request_id) from None
        finally:
            # Stops the server-side stream if the caller leaves the loop early.
            stream.cancel()

    async def verify_audit_log(self) -> AuditReport:
        """Walks the audit hash chain and checkpoints at the broker; check ``ok``."""
        request = audit_pb2.VerifyAuditLogRequest()
        return _wire.audit_report_from_proto(await self._call(self._audit.VerifyAuditLog, request))
