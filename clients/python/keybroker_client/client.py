"""The keybroker client: one mutual-TLS channel and one method per broker RPC.

(Over 400 lines because it is one short method per RPC; conversions live in `_wire.py`.)

Typical use::

    from keybroker_client import KeybrokerClient, resolve_settings

    with KeybrokerClient.from_settings(resolve_settings(identity="producer")) as kb:
        dk = kb.generate_data_key("patients", {"dataset": "cohort-42"})
        ...  # encrypt locally with dk.plaintext_key, store dk.wrapped_key next to the data

Every call carries a fresh ``x-request-id`` (the broker records it in the call's audit event)
and a deadline; a failed call raises a :class:`~keybroker_client.errors.KeybrokerError`
subclass, never a bare ``grpc.RpcError``.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, Self, TypeVar

import grpc
from google.protobuf import duration_pb2, message
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
from keybroker_client.config import ClientSettings
from keybroker_client.errors import ConfigError, error_from_rpc
from keybroker_client.parsing import parse_duration
from keybroker_client.recipes import FileRecipes
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

__all__ = ["DEFAULT_TIMEOUT", "DurationLike", "KeybrokerClient"]

DEFAULT_TIMEOUT = 10.0
REQUEST_ID_HEADER = "x-request-id"

_Response = TypeVar("_Response", bound=message.Message)
DurationLike = timedelta | str


def _duration(value: DurationLike) -> duration_pb2.Duration:
    return _wire.duration_to_proto(parse_duration(value) if isinstance(value, str) else value)


def _read(path: Any, what: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


class KeybrokerClient(FileRecipes):
    """A connection to one broker over mutual TLS.

    Use it as a context manager, or call :meth:`close`. It is safe to share between threads.
    Whole files: :meth:`encrypt_file`, :meth:`decrypt_file` and their stream forms
    (:class:`~keybroker_client.recipes.FileRecipes`).

    Args:
        target: the broker's ``host:port``.
        root_certificates: PEM of the CA that signed the broker's certificate.
        private_key: PEM of the client key.
        certificate_chain: PEM of the client certificate (its identity is the principal).
        timeout: the default deadline of each call, in seconds.
        server_name: the name to check the broker's certificate against, when it differs
            from the host in ``target`` (a load balancer address, for example).
        options: extra gRPC channel options.
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
        self._channel = grpc.secure_channel(target, credentials, options=channel_options)
        self._keys = key_admin_pb2_grpc.KeyAdminStub(self._channel)
        self._crypto = crypto_pb2_grpc.CryptoStub(self._channel)
        self._tokens = tokens_pb2_grpc.TokensStub(self._channel)
        self._audit = audit_pb2_grpc.AuditStub(self._channel)

    @classmethod
    def from_settings(
        cls, settings: ClientSettings, *, timeout: float = DEFAULT_TIMEOUT
    ) -> KeybrokerClient:
        """Opens a client from resolved settings (see :func:`resolve_settings`).

        Raises:
            ConfigError: a certificate, key or CA file cannot be read.
        """
        root_certificates = _read(settings.ca, "CA certificate")
        certificate_chain = _read(settings.cert, "client certificate")
        private_key = _read(settings.key, "client key")
        return cls(
            settings.target,
            root_certificates=root_certificates,
            private_key=private_key,
            certificate_chain=certificate_chain,
            timeout=timeout,
        )

    def close(self) -> None:
        """Closes the channel; calls in flight are cancelled."""
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _call(self, rpc: Callable[..., _Response], request: message.Message) -> _Response:
        request_id = str(uuid.uuid4())
        try:
            return rpc(request, timeout=self.timeout, metadata=((REQUEST_ID_HEADER, request_id),))
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, request_id=request_id) from None

    # KeyAdmin

    def _key_call(self, rpc: Callable[..., Any], request: message.Message) -> Key:
        return _wire.key_from_proto(self._call(rpc, request).key)

    def create_key(
        self,
        key_id: str,
        description: str = "",
        policy: KeyPolicy | None = None,
        rotation_period: DurationLike | None = None,
        hsm: str = "",
    ) -> Key:
        """Creates a key; version 1 is generated in the HSM. Admin only.

        Args:
            key_id: matches ``^[a-z0-9][a-z0-9._-]{0,62}$``.
            description: free text.
            policy: who may use the key and where it may live; see :func:`policy_from_grants`.
            rotation_period: automatic rotation interval (``timedelta`` or ``"30d"``).
            hsm: the configured HSM to create it on; empty for the broker's default.

        Returns:
            The new key's metadata.
        """
        request = key_admin_pb2.CreateKeyRequest(key_id=key_id, description=description, hsm=hsm)
        if policy is not None:
            request.policy.CopyFrom(_wire.policy_to_proto(policy))
        if rotation_period is not None:
            request.rotation_period.CopyFrom(_duration(rotation_period))
        return self._key_call(self._keys.CreateKey, request)

    def get_key(self, key_id: str) -> Key:
        """Returns a key's metadata. Admin or auditor."""
        return self._key_call(self._keys.GetKey, key_admin_pb2.GetKeyRequest(key_id=key_id))

    def list_keys(self, page_size: int = 0, page_token: str = "") -> KeyPage:
        """Returns one page of keys in key id order. Admin or auditor.

        Args:
            page_size: at most this many keys (1 to 1000); 0 lets the broker pick (100).
            page_token: ``next_page_token`` of the previous page; empty for the first.

        Returns:
            The page: ``keys`` and ``next_page_token`` (empty on the last page).
        """
        request = key_admin_pb2.ListKeysRequest(page_size=page_size, page_token=page_token)
        return _wire.key_page_from_proto(self._call(self._keys.ListKeys, request))

    def iter_keys(self, page_size: int = 0) -> Iterator[Key]:
        """Yields every key, following ``next_page_token`` from page to page."""
        token = ""
        while True:
            page = self.list_keys(page_size=page_size, page_token=token)
            yield from page.keys
            if not page.next_page_token:
                return
            token = page.next_page_token

    def rotate_key(self, key_id: str) -> Key:
        """Makes a new version primary; older versions still decrypt. Admin only."""
        return self._key_call(self._keys.RotateKey, key_admin_pb2.RotateKeyRequest(key_id=key_id))

    def update_key_policy(self, key_id: str, policy: KeyPolicy) -> Key:
        """Replaces the key's policy (all of it). Admin only."""
        request = key_admin_pb2.UpdateKeyPolicyRequest(
            key_id=key_id, policy=_wire.policy_to_proto(policy)
        )
        return self._key_call(self._keys.UpdateKeyPolicy, request)

    def enable_key(self, key_id: str) -> Key:
        """Enables a disabled key. Admin only."""
        return self._key_call(self._keys.EnableKey, key_admin_pb2.EnableKeyRequest(key_id=key_id))

    def disable_key(self, key_id: str) -> Key:
        """Disables a key: it neither encrypts nor decrypts until enabled. Admin only."""
        request = key_admin_pb2.DisableKeyRequest(key_id=key_id)
        return self._key_call(self._keys.DisableKey, request)

    def schedule_key_destruction(
        self, key_id: str, pending_window: DurationLike | None = None
    ) -> Key:
        """Schedules destruction of every version after ``pending_window``. Admin only.

        Args:
            key_id: the key.
            pending_window: how long until destruction; unset lets the broker pick.
        """
        request = key_admin_pb2.ScheduleKeyDestructionRequest(key_id=key_id)
        if pending_window is not None:
            request.pending_window.CopyFrom(_duration(pending_window))
        return self._key_call(self._keys.ScheduleKeyDestruction, request)

    def cancel_key_destruction(self, key_id: str) -> Key:
        """Cancels a scheduled destruction; the key comes back disabled. Admin only."""
        request = key_admin_pb2.CancelKeyDestructionRequest(key_id=key_id)
        return self._key_call(self._keys.CancelKeyDestruction, request)

    # Crypto

    def generate_data_key(self, key_id: str, context: Mapping[str, str] | None = None) -> DataKey:
        """Returns a fresh 32-byte data key and its wrapped form. Needs an ``encrypt`` grant.

        Args:
            key_id: the key to wrap under (its primary version).
            context: the encryption context bound into the wrapped key; the same context
                must be given to decrypt it.
        """
        request = crypto_pb2.GenerateDataKeyRequest(key_id=key_id, context=dict(context or {}))
        return _wire.data_key_from_proto(self._call(self._crypto.GenerateDataKey, request))

    def encrypt(
        self, key_id: str, plaintext: bytes, context: Mapping[str, str] | None = None
    ) -> Encrypted:
        """Encrypts a small payload (at most 64 KiB) in the HSM. Needs an ``encrypt`` grant."""
        request = crypto_pb2.EncryptRequest(
            key_id=key_id, plaintext=plaintext, context=dict(context or {})
        )
        return _wire.encrypted_from_proto(self._call(self._crypto.Encrypt, request))

    def decrypt(
        self, ciphertext: bytes, context: Mapping[str, str] | None, token: str
    ) -> Decrypted:
        """Decrypts a wrapped key or ciphertext.

        Args:
            ciphertext: the blob; it names its key and version.
            context: the context it was made with.
            token: a token from :meth:`issue_token`, issued to this client's certificate.
        """
        request = crypto_pb2.DecryptRequest(
            ciphertext=ciphertext, context=dict(context or {}), token=token
        )
        return _wire.decrypted_from_proto(self._call(self._crypto.Decrypt, request))

    def rewrap(self, ciphertext: bytes, context: Mapping[str, str] | None = None) -> Encrypted:
        """Re-encrypts a blob under its key's primary version; returns no plaintext.

        Admin, or a principal granted ``rewrap``.
        """
        request = crypto_pb2.ReWrapRequest(ciphertext=ciphertext, context=dict(context or {}))
        return _wire.encrypted_from_proto(self._call(self._crypto.ReWrap, request))

    # Tokens

    def issue_token(
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
        """Issues a decryption token bound to a client certificate.

        Args:
            key_id: the key the token is for.
            context: entries every ``Decrypt`` with the token must carry.
            justification: why the data is needed; recorded in the token and the audit trail.
            ttl: lifetime (default 5 minutes at the broker, capped by the grant and 1 hour).
            subject: admin only, the principal to issue for.
            subject_cert_thumbprint: admin only, with ``subject``: the ``x5t#S256`` of the
                subject's certificate (see :func:`~keybroker_client.certs.cert_thumbprint`).
            max_uses: how many ``Decrypt`` calls the token allows (0: no limit).
        """
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
        return _wire.issued_token_from_proto(self._call(self._tokens.IssueToken, request))

    def revoke_token(self, token_id: str) -> None:
        """Revokes a token everywhere. Admin, or the token's subject."""
        self._call(self._tokens.RevokeToken, tokens_pb2.RevokeTokenRequest(token_id=token_id))

    def signing_keys(self) -> dict[str, Any]:
        """Returns the broker's JWKS (RFC 7517): token and audit signing public keys."""
        response = self._call(self._tokens.GetSigningKeys, tokens_pb2.GetSigningKeysRequest())
        jwks: dict[str, Any] = json.loads(response.jwks_json or "{}")
        return jwks

    # Audit

    def audit_events(
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
    ) -> Iterator[AuditEvent]:
        """Streams audit events in sequence order; empty filters match everything.

        Args:
            key_id: only events about this key.
            principal: only events by this principal.
            operation: only this RPC, for example ``"Decrypt"``.
            start_time: only events at or after this time (naive means UTC).
            end_time: only events before this time (naive means UTC).
            after_sequence: only events with a greater sequence number.
            limit: at most this many events; 0 means no limit.
            timeout: deadline of the whole stream in seconds; default the client's timeout.

        Yields:
            The events. Errors are raised while iterating.
        """
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
            for item in stream:
                yield _wire.audit_event_from_proto(item.event)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, request_id=request_id) from None
        finally:
            # Stops the server-side stream if the caller leaves the loop early.
            stream.cancel()

    def verify_audit_log(self) -> AuditReport:
        """Walks the audit hash chain and checkpoints at the broker.

        Returns:
            The report: ``ok``, ``events_checked``, ``first_bad_sequence``, ``error``,
            ``head_hash``. Check ``ok``; a broken log is not raised as an error.
        """
        response = self._call(self._audit.VerifyAuditLog, audit_pb2.VerifyAuditLogRequest())
        return _wire.audit_report_from_proto(response)

    def export_audit_log(
        self, after_sequence: int = 0, *, timeout: float | None = None
    ) -> Iterator[bytes]:
        """Streams an export of the audit log (auditor or admin): JSON lines, each without
        its newline, ending with the broker's signed manifest. Verify it offline with
        :func:`keybroker_client.evidence.verify_export` and the broker's JWKS.

        Args:
            after_sequence: only events after this sequence (the previous export's
                manifest ``through_sequence``, to export consecutive ranges).
            timeout: deadline of the whole stream in seconds; default the client's timeout.
        """
        request = audit_pb2.ExportAuditLogRequest(after_sequence=after_sequence)
        request_id = str(uuid.uuid4())
        stream = self._audit.ExportAuditLog(
            request,
            timeout=self.timeout if timeout is None else timeout,
            metadata=((REQUEST_ID_HEADER, request_id),),
        )
        try:
            for item in stream:
                yield item.line
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, request_id=request_id) from None
        finally:
            stream.cancel()
