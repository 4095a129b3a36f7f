"""The keybroker client: one mutual-TLS channel and one method per broker RPC.

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

import base64
import hashlib
import json
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Self, TypeVar

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from google.protobuf import duration_pb2, message, timestamp_pb2
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

from keybroker_client.config import ClientSettings
from keybroker_client.errors import ConfigError, error_from_rpc
from keybroker_client.parsing import parse_duration, policy_from_grants

__all__ = [
    "DEFAULT_TIMEOUT",
    "DataKey",
    "Decrypted",
    "Encrypted",
    "IssuedToken",
    "KeybrokerClient",
    "cert_thumbprint",
    "parse_duration",
    "policy_from_grants",
]

DEFAULT_TIMEOUT = 10.0
REQUEST_ID_HEADER = "x-request-id"

_Response = TypeVar("_Response", bound=message.Message)
DurationLike = timedelta | str


@dataclass(frozen=True, slots=True)
class DataKey:
    """A fresh data key from ``GenerateDataKey``.

    Attributes:
        plaintext_key: the 32-byte key to encrypt with locally; a secret, kept out of ``repr``.
            Drop it as soon as the data is encrypted.
        wrapped_key: the key wrapped by the broker; store it next to the ciphertext.
        key_id: the broker key that wrapped it.
        key_version: the version of that key.
    """

    plaintext_key: bytes = field(repr=False)
    wrapped_key: bytes
    key_id: str
    key_version: int


@dataclass(frozen=True, slots=True)
class Encrypted:
    """A blob made by ``Encrypt`` or ``ReWrap``.

    Attributes:
        ciphertext: the self-describing blob (it names key and version).
        key_id: the key it is encrypted under.
        key_version: the key version it is encrypted under.
    """

    ciphertext: bytes
    key_id: str
    key_version: int


@dataclass(frozen=True, slots=True)
class Decrypted:
    """The result of ``Decrypt``.

    Attributes:
        plaintext: the decrypted bytes (a data key or a small payload); kept out of ``repr``.
        key_id: the key the blob was encrypted under.
        key_version: the key version the blob was encrypted under.
    """

    plaintext: bytes = field(repr=False)
    key_id: str
    key_version: int


@dataclass(frozen=True, slots=True)
class IssuedToken:
    """A decryption token from ``IssueToken``.

    Attributes:
        token: the signed JWT to pass to :meth:`KeybrokerClient.decrypt`; kept out of ``repr``.
        token_id: the token's ``jti``, for :meth:`KeybrokerClient.revoke_token`.
        expire_time: when the token stops being accepted (UTC).
        max_uses: how many ``Decrypt`` calls the token allows; 0 means no limit.
    """

    token: str = field(repr=False)
    token_id: str
    expire_time: datetime | None
    max_uses: int = 0


def cert_thumbprint(pem_bytes: bytes) -> str:
    """Computes the RFC 8705 ``x5t#S256`` thumbprint of a certificate.

    Args:
        pem_bytes: the certificate in PEM form (the first certificate is used).

    Returns:
        base64url without padding of the SHA-256 of the certificate's DER encoding.

    Raises:
        ValueError: the bytes are not a PEM certificate.
    """
    cert = x509.load_pem_x509_certificate(pem_bytes)
    digest = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _duration(value: DurationLike) -> duration_pb2.Duration:
    if isinstance(value, str):
        value = parse_duration(value)
    out = duration_pb2.Duration()
    out.FromTimedelta(value)
    return out


def _timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(value if value.tzinfo else value.replace(tzinfo=UTC))
    return out


def _read(path: Any, what: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


class KeybrokerClient:
    """A connection to one broker over mutual TLS.

    Use it as a context manager, or call :meth:`close`. It is safe to share between threads.

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

    def create_key(
        self,
        key_id: str,
        description: str = "",
        policy: resources_pb2.KeyPolicy | None = None,
        rotation_period: DurationLike | None = None,
        hsm: str = "",
    ) -> resources_pb2.Key:
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
            request.policy.CopyFrom(policy)
        if rotation_period is not None:
            request.rotation_period.CopyFrom(_duration(rotation_period))
        return self._call(self._keys.CreateKey, request).key

    def get_key(self, key_id: str) -> resources_pb2.Key:
        """Returns a key's metadata. Admin or auditor."""
        return self._call(self._keys.GetKey, key_admin_pb2.GetKeyRequest(key_id=key_id)).key

    def list_keys(self, page_size: int = 0, page_token: str = "") -> key_admin_pb2.ListKeysResponse:
        """Returns one page of keys in key id order. Admin or auditor.

        Args:
            page_size: at most this many keys (1 to 1000); 0 lets the broker pick (100).
            page_token: ``next_page_token`` of the previous page; empty for the first.

        Returns:
            The page: ``keys`` and ``next_page_token`` (empty on the last page).
        """
        request = key_admin_pb2.ListKeysRequest(page_size=page_size, page_token=page_token)
        return self._call(self._keys.ListKeys, request)

    def iter_keys(self, page_size: int = 0) -> Iterator[resources_pb2.Key]:
        """Yields every key, following ``next_page_token`` from page to page."""
        token = ""
        while True:
            page = self.list_keys(page_size=page_size, page_token=token)
            yield from page.keys
            if not page.next_page_token:
                return
            token = page.next_page_token

    def rotate_key(self, key_id: str) -> resources_pb2.Key:
        """Makes a new version primary; older versions still decrypt. Admin only."""
        return self._call(self._keys.RotateKey, key_admin_pb2.RotateKeyRequest(key_id=key_id)).key

    def update_key_policy(self, key_id: str, policy: resources_pb2.KeyPolicy) -> resources_pb2.Key:
        """Replaces the key's policy (all of it). Admin only."""
        request = key_admin_pb2.UpdateKeyPolicyRequest(key_id=key_id, policy=policy)
        return self._call(self._keys.UpdateKeyPolicy, request).key

    def enable_key(self, key_id: str) -> resources_pb2.Key:
        """Enables a disabled key. Admin only."""
        return self._call(self._keys.EnableKey, key_admin_pb2.EnableKeyRequest(key_id=key_id)).key

    def disable_key(self, key_id: str) -> resources_pb2.Key:
        """Disables a key: it neither encrypts nor decrypts until enabled. Admin only."""
        request = key_admin_pb2.DisableKeyRequest(key_id=key_id)
        return self._call(self._keys.DisableKey, request).key

    def schedule_key_destruction(
        self, key_id: str, pending_window: DurationLike | None = None
    ) -> resources_pb2.Key:
        """Schedules destruction of every version after ``pending_window``. Admin only.

        Args:
            key_id: the key.
            pending_window: how long until destruction; unset lets the broker pick.
        """
        request = key_admin_pb2.ScheduleKeyDestructionRequest(key_id=key_id)
        if pending_window is not None:
            request.pending_window.CopyFrom(_duration(pending_window))
        return self._call(self._keys.ScheduleKeyDestruction, request).key

    def cancel_key_destruction(self, key_id: str) -> resources_pb2.Key:
        """Cancels a scheduled destruction; the key comes back disabled. Admin only."""
        request = key_admin_pb2.CancelKeyDestructionRequest(key_id=key_id)
        return self._call(self._keys.CancelKeyDestruction, request).key

    # Crypto

    def generate_data_key(self, key_id: str, context: Mapping[str, str] | None = None) -> DataKey:
        """Returns a fresh 32-byte data key and its wrapped form. Needs an ``encrypt`` grant.

        Args:
            key_id: the key to wrap under (its primary version).
            context: the encryption context bound into the wrapped key; the same context
                must be given to decrypt it.
        """
        request = crypto_pb2.GenerateDataKeyRequest(key_id=key_id, context=dict(context or {}))
        response = self._call(self._crypto.GenerateDataKey, request)
        return DataKey(
            plaintext_key=response.plaintext_key,
            wrapped_key=response.wrapped_key,
            key_id=response.key_id,
            key_version=response.key_version,
        )

    def encrypt(
        self, key_id: str, plaintext: bytes, context: Mapping[str, str] | None = None
    ) -> Encrypted:
        """Encrypts a small payload (at most 64 KiB) in the HSM. Needs an ``encrypt`` grant."""
        request = crypto_pb2.EncryptRequest(
            key_id=key_id, plaintext=plaintext, context=dict(context or {})
        )
        response = self._call(self._crypto.Encrypt, request)
        return Encrypted(response.ciphertext, response.key_id, response.key_version)

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
        response = self._call(self._crypto.Decrypt, request)
        return Decrypted(response.plaintext, response.key_id, response.key_version)

    def rewrap(self, ciphertext: bytes, context: Mapping[str, str] | None = None) -> Encrypted:
        """Re-encrypts a blob under its key's primary version; returns no plaintext.

        Admin, or a principal granted ``rewrap``.
        """
        request = crypto_pb2.ReWrapRequest(ciphertext=ciphertext, context=dict(context or {}))
        response = self._call(self._crypto.ReWrap, request)
        return Encrypted(response.ciphertext, response.key_id, response.key_version)

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
                subject's certificate (see :func:`cert_thumbprint`).
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
        response = self._call(self._tokens.IssueToken, request)
        expire = (
            response.expire_time.ToDatetime(tzinfo=UTC)
            if response.HasField("expire_time")
            else None
        )
        return IssuedToken(
            token=response.token,
            token_id=response.token_id,
            expire_time=expire,
            max_uses=response.max_uses,
        )

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
    ) -> Iterator[resources_pb2.AuditEvent]:
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
            AuditEvent protos. Errors are raised while iterating.
        """
        request = audit_pb2.ListAuditEventsRequest(
            key_id=key_id,
            principal=principal,
            operation=operation,
            after_sequence=after_sequence,
            limit=limit,
        )
        if start_time is not None:
            request.start_time.CopyFrom(_timestamp(start_time))
        if end_time is not None:
            request.end_time.CopyFrom(_timestamp(end_time))
        request_id = str(uuid.uuid4())
        stream = self._audit.ListAuditEvents(
            request,
            timeout=self.timeout if timeout is None else timeout,
            metadata=((REQUEST_ID_HEADER, request_id),),
        )
        try:
            for item in stream:
                yield item.event
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, request_id=request_id) from None
        finally:
            # Stops the server-side stream if the caller leaves the loop early.
            stream.cancel()

    def verify_audit_log(self) -> audit_pb2.VerifyAuditLogResponse:
        """Walks the audit hash chain and checkpoints at the broker.

        Returns:
            The report: ``ok``, ``events_checked``, ``first_bad_sequence``, ``error``,
            ``head_hash``. Check ``ok``; a broken log is not raised as an error.
        """
        return self._call(self._audit.VerifyAuditLog, audit_pb2.VerifyAuditLogRequest())
