"""The keybroker client: mutual-TLS channels to one or more brokers, one method per RPC.

(Over 400 lines because it is one short method per RPC; conversions live in `_wire.py`.)

Typical use::

    from keybroker_client import KeybrokerClient, resolve_settings

    with KeybrokerClient.from_settings(resolve_settings(identity="producer")) as kb:
        dk = kb.generate_data_key("patients", {"dataset": "cohort-42"})
        ...  # encrypt locally with dk.plaintext_key, store dk.wrapped_key next to the data

Every call carries a fresh ``x-request-id`` (the broker records it in the call's audit event;
every try of one call sends the same) and a deadline; with several brokers, the rules of
:mod:`keybroker_client.failover` say when a call moves on to the next. A failed call raises a
:class:`~keybroker_client.errors.KeybrokerError` subclass, never a bare ``grpc.RpcError``.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any, Self

import grpc
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
from keybroker_client._rewrap import DEFAULT_BATCH as DEFAULT_REWRAP_BATCH
from keybroker_client._rewrap import BatchFeeder, ReWrapItem
from keybroker_client._wire import DecryptItem
from keybroker_client.config import ClientSettings
from keybroker_client.errors import ConfigError, error_from_rpc
from keybroker_client.failover import (
    DEFAULT_CONNECT_TIMEOUT,
    RETRY_RULES,
    Call,
    ChannelWatch,
    Retry,
    TargetPool,
    attempts_for,
    channel_options,
    decrypt_retry,
    resolve_targets,
)
from keybroker_client.recipes import FileRecipes
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

__all__ = ["DEFAULT_TIMEOUT", "DurationLike", "KeybrokerClient"]

DEFAULT_TIMEOUT = 10.0
REQUEST_ID_HEADER = "x-request-id"

DurationLike = _wire.DurationLike


#: The keybroker.v1 services, as (generated module, service name, stub class).
_SERVICES = (
    (key_admin_pb2, "KeyAdmin", key_admin_pb2_grpc.KeyAdminStub),
    (crypto_pb2, "Crypto", crypto_pb2_grpc.CryptoStub),
    (tokens_pb2, "Tokens", tokens_pb2_grpc.TokensStub),
    (audit_pb2, "Audit", audit_pb2_grpc.AuditStub),
)


def rpcs_of(channel: Any) -> dict[str, Any]:
    """Every keybroker.v1 RPC on ``channel`` (blocking or asyncio), by RPC name."""
    rpcs: dict[str, Any] = {}
    for module, service, stub_class in _SERVICES:
        stub = stub_class(channel)
        for method in module.DESCRIPTOR.services_by_name[service].methods:
            rpcs[method.name] = getattr(stub, method.name)
    return rpcs


def base_options(
    options: Sequence[tuple[str, Any]], server_name: str | None
) -> list[tuple[str, Any]]:
    """The caller's channel options, plus the certificate name to check when given."""
    chosen = list(options)
    if server_name:
        chosen.append(("grpc.ssl_target_name_override", server_name))
    return chosen


def _read(path: Any, what: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


class KeybrokerClient(FileRecipes):
    """A connection to one broker, or to several interchangeable ones, over mutual TLS.

    Use it as a context manager, or call :meth:`close`. It is safe to share between threads.
    Whole files: :meth:`encrypt_file`, :meth:`decrypt_file` and their stream forms
    (:class:`~keybroker_client.recipes.FileRecipes`).

    With several targets, calls go round robin over the brokers that answer, and a call that
    fails with ``UNAVAILABLE`` goes on to the next broker where that is safe: always for reads
    and calls whose repetition has no effect, only when nothing was sent for the others
    (:data:`keybroker_client.failover.RETRY_RULES`, docs/sdk.md). The deadline ``timeout``
    covers the whole call, every try included.

    Args:
        target: the broker's ``host:port``; several as ``"a:1,b:2"`` or a list.
        targets: the same as a list (give ``target`` or ``targets``).
        root_certificates: PEM of the CA that signed the broker's certificate.
        private_key: PEM of the client key.
        certificate_chain: PEM of the client certificate (its identity is the principal).
        timeout: the deadline of each call, in seconds, across all its tries.
        server_name: the name to check the broker's certificate against, when it differs
            from the host in ``target`` (a load balancer address, for example).
        options: extra gRPC channel options.
        max_attempts: at most this many tries of one call; default one per target. More
            than the targets goes round them again (for one ``dns:///`` name of many
            brokers, for example).
        connect_timeout: how long a try waits for a broker that is not connected before it
            moves on to the next one, in seconds.

    Raises:
        ConfigError: no target, a target given twice, or a bad ``max_attempts``.
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
        several = self.max_attempts > 1
        base = base_options(options, server_name)
        self._channels = [
            grpc.secure_channel(t, credentials, options=channel_options(t, base, several))
            for t in self.targets
        ]
        self._rpcs = [rpcs_of(channel) for channel in self._channels]
        # Only where a call may move on to another try; each channel starts connecting now.
        self._watches = [ChannelWatch(ch) for ch in self._channels] if several else []
        self._pool = TargetPool(len(self.targets))

    @classmethod
    def from_settings(
        cls,
        settings: ClientSettings,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_attempts: int | None = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    ) -> KeybrokerClient:
        """Opens a client from resolved settings (see :func:`resolve_settings`).

        ``settings.target`` may name several brokers (``"a:1,b:2"``).

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
            max_attempts=max_attempts,
            connect_timeout=connect_timeout,
        )

    def close(self) -> None:
        """Closes the channels; calls in flight are cancelled."""
        for channel in self._channels:
            channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _start(self, rpc: str, retry: Retry | None, timeout: float | None = None) -> Call:
        """The bookkeeping of one call of ``rpc`` (its rule unless ``retry`` overrides it)."""
        watches = self._watches
        return Call(
            pool=self._pool,
            targets=self.targets,
            retry=retry or RETRY_RULES[rpc],
            attempts=self.max_attempts,
            timeout=self.timeout if timeout is None else timeout,
            connect_timeout=self.connect_timeout,
            request_id=str(uuid.uuid4()),
            failing=(lambda i: watches[i].failing) if watches else (lambda _i: False),
        )

    def _call(self, rpc: str, request: message.Message, retry: Retry | None = None) -> Any:
        """Sends a unary call, trying the next broker where its rule allows."""
        call = self._start(rpc, retry)
        metadata = ((REQUEST_ID_HEADER, call.request_id),)
        while (attempt := call.next()) is not None:
            if attempt.check_ready and not self._watches[attempt.index].wait_ready(
                attempt.connect_timeout
            ):
                call.unreachable(attempt)
                continue
            method = self._rpcs[attempt.index][rpc]
            try:
                response = method(
                    request, timeout=attempt.timeout, metadata=metadata, wait_for_ready=False
                )
            except grpc.RpcError as exc:
                call.failed(attempt, error_from_rpc(exc, request_id=call.request_id))
                continue
            call.succeeded(attempt)
            return response
        raise call.error()

    def _stream(self, rpc: str, request: message.Message, timeout: float | None) -> Iterator[Any]:
        """Yields a server stream's messages; another broker is tried only before the first."""
        call = self._start(rpc, None, timeout)
        metadata = ((REQUEST_ID_HEADER, call.request_id),)
        while (attempt := call.next()) is not None:
            if attempt.check_ready and not self._watches[attempt.index].wait_ready(
                attempt.connect_timeout
            ):
                call.unreachable(attempt)
                continue
            stream = self._rpcs[attempt.index][rpc](
                request, timeout=attempt.timeout, metadata=metadata, wait_for_ready=False
            )
            received = False
            try:
                for item in stream:
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

    def _key_call(self, rpc: str, request: message.Message) -> Key:
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
        request = _wire.create_key_request(key_id, description, policy, rotation_period, hsm)
        return self._key_call("CreateKey", request)

    def get_key(self, key_id: str) -> Key:
        """Returns a key's metadata. Admin or auditor."""
        return self._key_call("GetKey", key_admin_pb2.GetKeyRequest(key_id=key_id))

    def list_keys(self, page_size: int = 0, page_token: str = "") -> KeyPage:
        """Returns one page of keys in key id order. Admin or auditor.

        Args:
            page_size: at most this many keys (1 to 1000); 0 lets the broker pick (100).
            page_token: ``next_page_token`` of the previous page; empty for the first.

        Returns:
            The page: ``keys`` and ``next_page_token`` (empty on the last page).
        """
        request = key_admin_pb2.ListKeysRequest(page_size=page_size, page_token=page_token)
        return _wire.key_page_from_proto(self._call("ListKeys", request))

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
        return self._key_call("RotateKey", key_admin_pb2.RotateKeyRequest(key_id=key_id))

    def _changed_key(self, rpc: str, request: message.Message) -> Key:
        """A change that may need approval: the changed key, or ApprovalPending."""
        return _wire.changed_key_from_proto(self._call(rpc, request))

    def update_key_policy(self, key_id: str, policy: KeyPolicy) -> Key:
        """Replaces the key's policy (all of it). Admin only.

        Raises:
            ApprovalPending: the broker needs other admins' approval first
                (``approvals.required``); nothing has changed yet.
        """
        request = key_admin_pb2.UpdateKeyPolicyRequest(
            key_id=key_id, policy=_wire.policy_to_proto(policy)
        )
        return self._changed_key("UpdateKeyPolicy", request)

    def enable_key(self, key_id: str) -> Key:
        """Enables a disabled key. Admin only.

        Raises:
            ApprovalPending: as :meth:`update_key_policy`.
        """
        return self._changed_key("EnableKey", key_admin_pb2.EnableKeyRequest(key_id=key_id))

    def disable_key(self, key_id: str) -> Key:
        """Disables a key: it neither encrypts nor decrypts until enabled. Admin only."""
        request = key_admin_pb2.DisableKeyRequest(key_id=key_id)
        return self._key_call("DisableKey", request)

    def schedule_key_destruction(
        self, key_id: str, pending_window: DurationLike | None = None
    ) -> Key:
        """Schedules destruction of every version after ``pending_window``. Admin only.

        Args:
            key_id: the key.
            pending_window: how long until destruction; unset lets the broker pick.

        Raises:
            ApprovalPending: as :meth:`update_key_policy`; once approved, the window runs
                from the approval that applies it.
        """
        request = _wire.schedule_destruction_request(key_id, pending_window)
        return self._changed_key("ScheduleKeyDestruction", request)

    def cancel_key_destruction(self, key_id: str) -> Key:
        """Cancels a scheduled destruction; the key comes back disabled. Admin only."""
        request = key_admin_pb2.CancelKeyDestructionRequest(key_id=key_id)
        return self._key_call("CancelKeyDestruction", request)

    def set_min_decryption_version(self, key_id: str, min_decryption_version: int) -> Key:
        """Retires the versions below ``min_decryption_version``: their blobs no longer
        decrypt nor re-wrap until it is lowered again. The primary version cannot be
        retired. Admin only."""
        request = key_admin_pb2.SetMinDecryptionVersionRequest(
            key_id=key_id, min_decryption_version=min_decryption_version
        )
        return self._key_call("SetMinDecryptionVersion", request)

    def key_usage(self, key_id: str) -> KeyUsage:
        """Per-version use of a key (data keys issued, re-wraps, decrypts, last decrypt),
        counted by the broker from its audit trail. Admin or auditor."""
        request = key_admin_pb2.GetKeyUsageRequest(key_id=key_id)
        return _wire.key_usage_from_proto(self._call("GetKeyUsage", request))

    def destruction_receipt(self, key_id: str) -> str:
        """The signed receipt of a destroyed key's destruction, as its file text (canonical
        JSON). Keep it byte for byte; check it offline with
        :func:`keybroker_client.evidence.verify_receipt` and the broker's JWKS. Admin or
        auditor.

        Raises:
            FailedPrecondition: the key is not destroyed.
        """
        request = key_admin_pb2.GetDestructionReceiptRequest(key_id=key_id)
        receipt: str = self._call("GetDestructionReceipt", request).receipt_json
        return receipt

    # Approvals (docs/lifecycle.md, "Approvals")

    def approve_request(self, request_id: str) -> ApprovalRequest:
        """Approves a pending change. Admin only, never the requester. The approval that
        completes the quorum applies the change (the request comes back ``APPLIED``).

        Raises:
            PermissionDenied: not an admin, or the requester.
            FailedPrecondition: the request is not pending (expired, cancelled, applied), it
                was approved by this admin already, or the key changed since the request
                (the request is then ``FAILED``).
        """
        request = key_admin_pb2.ApproveRequestRequest(request_id=request_id)
        response = self._call("ApproveRequest", request)
        return _wire.approval_from_proto(response.approval_request)

    def get_approval_request(self, request_id: str) -> ApprovalRequest:
        """One approval request. Admin or auditor."""
        request = key_admin_pb2.GetApprovalRequestRequest(request_id=request_id)
        return _wire.approval_from_proto(self._call("GetApprovalRequest", request).approval_request)

    def list_approval_requests(
        self,
        state: ApprovalState | None = None,
        key_id: str = "",
        page_size: int = 0,
        page_token: str = "",
    ) -> ApprovalPage:
        """One page of approval requests, oldest first. Admin or auditor.

        Args:
            state: only requests in this state; None for every state.
            key_id: only requests about this key; empty for every key.
            page_size: at most this many (1 to 1000); 0 lets the broker pick (100).
            page_token: ``next_page_token`` of the previous page; empty for the first.
        """
        request = _wire.list_approval_requests_request(state, key_id, page_size, page_token)
        return _wire.approval_page_from_proto(self._call("ListApprovalRequests", request))

    def iter_approval_requests(
        self, state: ApprovalState | None = None, key_id: str = "", page_size: int = 0
    ) -> Iterator[ApprovalRequest]:
        """Yields every approval request (of ``state`` and ``key_id`` when given), following
        ``next_page_token`` from page to page."""
        token = ""
        while True:
            page = self.list_approval_requests(state, key_id, page_size, token)
            yield from page.requests
            if not page.next_page_token:
                return
            token = page.next_page_token

    def cancel_approval_request(self, request_id: str) -> ApprovalRequest:
        """Withdraws a pending request. Its requester, or an admin."""
        request = key_admin_pb2.CancelApprovalRequestRequest(request_id=request_id)
        return _wire.approval_from_proto(
            self._call("CancelApprovalRequest", request).approval_request
        )

    # Crypto

    def generate_data_key(self, key_id: str, context: Mapping[str, str] | None = None) -> DataKey:
        """Returns a fresh 32-byte data key and its wrapped form. Needs an ``encrypt`` grant.

        Args:
            key_id: the key to wrap under (its primary version).
            context: the encryption context bound into the wrapped key; the same context
                must be given to decrypt it.
        """
        request = crypto_pb2.GenerateDataKeyRequest(key_id=key_id, context=dict(context or {}))
        return _wire.data_key_from_proto(self._call("GenerateDataKey", request))

    def encrypt(
        self, key_id: str, plaintext: bytes, context: Mapping[str, str] | None = None
    ) -> Encrypted:
        """Encrypts a small payload (at most 64 KiB) in the HSM. Needs an ``encrypt`` grant."""
        request = crypto_pb2.EncryptRequest(
            key_id=key_id, plaintext=plaintext, context=dict(context or {})
        )
        return _wire.encrypted_from_proto(self._call("Encrypt", request))

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
        response = self._call("Decrypt", request, retry=decrypt_retry(token))
        return _wire.decrypted_from_proto(response)

    def generate_data_keys(
        self, key_id: str, context: Mapping[str, str] | None = None, count: int = 1
    ) -> list[DataKey]:
        """Returns ``count`` fresh data keys (1 to 1,000) and their wrapped forms, in one
        call, all under the key's primary version. Needs an ``encrypt`` grant; one audit
        event per data key. The call is refused as a whole (nothing is made) when refused.
        """
        request = crypto_pb2.GenerateDataKeysRequest(
            key_id=key_id, context=dict(context or {}), count=count
        )
        return _wire.data_keys_from_proto(self._call("GenerateDataKeys", request))

    def batch_decrypt(self, items: Sequence[DecryptItem]) -> list[DecryptResult]:
        """Decrypts many blobs in one call (1 to 1,000 items).

        Each item is checked, counted against its token and audited as a ``Decrypt`` of its
        own; an item refused does not fail the others: its result carries the status name
        (:attr:`DecryptResult.code`) and message.

        Args:
            items: ``(ciphertext, context, token)`` triples; the tokens may differ.

        Raises:
            KeybrokerError: the call as a whole was refused (no client certificate, rate
                limit, more than 1,000 items, an unavailable broker or audit log).
        """
        request = _wire.batch_decrypt_request(items)
        tokens = sorted({token for _, _, token in items})
        response = self._call("BatchDecrypt", request, retry=decrypt_retry(*tokens))
        return _wire.decrypt_results_from_proto(response)

    def rewrap(self, ciphertext: bytes, context: Mapping[str, str] | None = None) -> Encrypted:
        """Re-encrypts a blob under its key's primary version; returns no plaintext.

        Admin, or a principal granted ``rewrap``.
        """
        request = crypto_pb2.ReWrapRequest(ciphertext=ciphertext, context=dict(context or {}))
        return _wire.encrypted_from_proto(self._call("ReWrap", request))

    def rewrap_stream(
        self,
        items: Iterable[ReWrapItem],
        context: Mapping[str, str] | None = None,
        *,
        batch_size: int = DEFAULT_REWRAP_BATCH,
        in_flight: int = 2,
        timeout: float | None = None,
    ) -> Iterator[ReWrapResult]:
        """Re-wraps many blobs under their keys' primary versions in one ``ReWrapStream``.

        Admin, or a principal granted ``rewrap`` on each blob's key. Yields one result per
        item, in the items' order, as the broker answers: the new blob, the item's own blob
        when it was already under the primary version (checked, unchanged), or the error of
        that item alone (:attr:`ReWrapResult.code`); a bad item does not stop the others. No
        plaintext ever leaves the broker. Items are read lazily and at most ``in_flight``
        batches are unanswered at a time, so memory stays bounded whatever the input size::

            blobs = (line.strip() for line in open("wrapped.b64"))
            for result in kb.rewrap_stream(base64.b64decode(b) for b in blobs):
                ...

        Args:
            items: blobs (under ``context``), or ``(blob, context)`` pairs.
            context: the context of items that name none.
            batch_size: items per request message (1 to 1,000).
            in_flight: batches sent and not yet answered, at most.
            timeout: deadline of the whole stream in seconds; default none (the stream
                lasts as long as its input).

        Raises:
            ValueError: a bad ``batch_size`` or ``in_flight`` (before any call).
            KeybrokerError: while iterating, when the stream as a whole fails (a caller the
                broker refuses outright, its rate limit, an unavailable broker or audit log);
                the results yielded before stay valid.
            TypeError: an item is neither bytes nor a (blob, context) pair.
        """
        feeder = BatchFeeder(items, context, batch_size, in_flight)
        call = self._start("ReWrapStream", None)
        while (attempt := call.next()) is not None:
            if attempt.check_ready and not self._watches[attempt.index].wait_ready(
                attempt.connect_timeout
            ):
                call.unreachable(attempt)
                continue
            break
        else:
            raise call.error()
        responses = self._rpcs[attempt.index]["ReWrapStream"](
            feeder.requests(),
            timeout=timeout,
            metadata=((REQUEST_ID_HEADER, call.request_id),),
            wait_for_ready=False,
        )
        try:
            for response in responses:
                yield from _wire.rewrap_batch_from_proto(response, feeder.answered())
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
        request = _wire.issue_token_request(
            key_id, context, justification, ttl, subject, subject_cert_thumbprint, max_uses
        )
        return _wire.issued_token_from_proto(self._call("IssueToken", request))

    def revoke_token(self, token_id: str) -> None:
        """Revokes a token everywhere. Admin, or the token's subject."""
        self._call("RevokeToken", tokens_pb2.RevokeTokenRequest(token_id=token_id))

    def signing_keys(self) -> dict[str, Any]:
        """Returns the broker's JWKS (RFC 7517): token and audit signing public keys."""
        response = self._call("GetSigningKeys", tokens_pb2.GetSigningKeysRequest())
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
        request = _wire.audit_events_request(
            key_id, principal, operation, start_time, end_time, after_sequence, limit
        )
        for item in self._stream("ListAuditEvents", request, timeout):
            yield _wire.audit_event_from_proto(item.event)

    def verify_audit_log(self) -> AuditReport:
        """Walks the audit hash chain and checkpoints at the broker.

        Returns:
            The report: ``ok``, ``events_checked``, ``first_bad_sequence``, ``error``,
            ``head_hash``. Check ``ok``; a broken log is not raised as an error.
        """
        response = self._call("VerifyAuditLog", audit_pb2.VerifyAuditLogRequest())
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
        for item in self._stream("ExportAuditLog", request, timeout):
            yield item.line
