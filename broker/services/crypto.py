"""Envelope encryption: data keys and small payloads under HSM-held key-encryption keys."""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass

from broker import blob as blobs
from broker.domain import (
    Caller,
    Key,
    Operation,
    Role,
    validate_context,
    validate_key_id,
)
from broker.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from broker.ports import Hsm, KeyStore
from broker.services.access import Access, RateLimiter
from broker.services.audit import AuditLog
from broker.services.tokens import TokenService

DATA_KEY_BYTES = 32


@dataclass(frozen=True, slots=True)
class Sealed:
    """A blob and the key version that made it."""

    blob: bytes
    key_id: str
    key_version: int


@dataclass(frozen=True, slots=True)
class Opened:
    plaintext: bytes
    key_id: str
    key_version: int


class CryptoService:
    """GenerateDataKey, Encrypt, Decrypt and ReWrap.

    Args:
        store: key metadata.
        access: role, grant and jurisdiction checks.
        audit: the audit trail.
        tokens: token verification for Decrypt.
        limiter: per-principal rate limit.
    """

    def __init__(
        self,
        store: KeyStore,
        access: Access,
        audit: AuditLog,
        tokens: TokenService,
        limiter: RateLimiter,
    ) -> None:
        self._store = store
        self._access = access
        self._audit = audit
        self._tokens = tokens
        self._limiter = limiter

    def generate_data_key(
        self, caller: Caller, key_id: str, context: Mapping[str, str]
    ) -> tuple[bytes, Sealed]:
        """A fresh data key from the HSM's RNG and its wrapped form."""
        with self._audit.scope(caller, "GenerateDataKey", key_id=key_id, context=context) as d:
            self._limiter.check(caller.principal)
            key, hsm, ctx = self._encrypting_key(caller, key_id, context)
            material = hsm.random(DATA_KEY_BYTES + blobs.IV_BYTES)
            data_key, iv = material[:DATA_KEY_BYTES], material[DATA_KEY_BYTES:]
            sealed = _seal(hsm, key, iv, data_key, ctx)
            d.key_version = sealed.key_version
            return data_key, sealed

    def encrypt(
        self, caller: Caller, key_id: str, plaintext: bytes, context: Mapping[str, str]
    ) -> Sealed:
        with self._audit.scope(caller, "Encrypt", key_id=key_id, context=context) as d:
            self._limiter.check(caller.principal)
            if not plaintext:
                raise InvalidArgument("plaintext is required")
            if len(plaintext) > blobs.MAX_PLAINTEXT:
                raise InvalidArgument(
                    f"plaintext is {len(plaintext)} bytes; Encrypt takes at most "
                    f"{blobs.MAX_PLAINTEXT} (use GenerateDataKey and encrypt locally)"
                )
            key, hsm, ctx = self._encrypting_key(caller, key_id, context)
            sealed = _seal(hsm, key, hsm.random(blobs.IV_BYTES), plaintext, ctx)
            d.key_version = sealed.key_version
            return sealed

    def decrypt(
        self, caller: Caller, ciphertext: bytes, context: Mapping[str, str], token: str
    ) -> Opened:
        """Opens a blob for the holder of a token that covers its key and context."""
        with self._audit.scope(caller, "Decrypt", context=context) as d:
            self._limiter.check(caller.principal)
            blob = blobs.parse(ciphertext)
            d.key_id, d.key_version = blob.key_id, blob.key_version
            ctx = validate_context(context)
            claims = self._tokens.verify(token, caller)
            d.token_id, d.justification = claims.token_id, claims.justification
            if not hmac.compare_digest(claims.key_id, blob.key_id):
                raise PermissionDenied(f"the token is for another key, not {blob.key_id!r}")
            if Operation.DECRYPT not in claims.operations:
                raise PermissionDenied("the token does not allow decrypt")
            for name, value in claims.context.items():
                if ctx.get(name) != value:
                    raise PermissionDenied(
                        f"the request's context does not carry the token's entry {name!r}"
                    )
            key = self._store.get_key(blob.key_id)
            # The policy is evaluated again at use: a grant withdrawn after issuance stops
            # its tokens at once.
            Access.matching_grants(key, claims.subject, Operation.DECRYPT, claims.context)
            hsm, label = self._decrypting_version(key, blob.key_version)
            # Counted once every check has passed, so a refused call does not use up a token.
            self._tokens.consume_use(claims)
            plaintext = hsm.decrypt(label, blob.iv, blob.sealed, blob.aad(ctx))
            return Opened(plaintext, blob.key_id, blob.key_version)

    def rewrap(self, caller: Caller, ciphertext: bytes, context: Mapping[str, str]) -> Sealed:
        """Re-encrypts a blob under its key's primary version; no plaintext leaves."""
        with self._audit.scope(caller, "ReWrap", context=context) as d:
            self._limiter.check(caller.principal)
            blob = blobs.parse(ciphertext)
            d.key_id, d.key_version = blob.key_id, blob.key_version
            ctx = validate_context(context)
            key = self._store.get_key(blob.key_id)
            if not self._access.has_role(caller.principal, Role.ADMIN):
                Access.matching_grants(key, caller.principal, Operation.REWRAP, ctx)
            hsm, label = self._decrypting_version(key, blob.key_version)
            plaintext = hsm.decrypt(label, blob.iv, blob.sealed, blob.aad(ctx))
            sealed = _seal(hsm, key, hsm.random(blobs.IV_BYTES), plaintext, ctx)
            d.key_version = sealed.key_version
            return sealed

    def _encrypting_key(
        self, caller: Caller, key_id: str, context: Mapping[str, str]
    ) -> tuple[Key, Hsm, dict[str, str]]:
        validate_key_id(key_id)
        ctx = validate_context(context)
        key = self._store.get_key(key_id)
        Access.matching_grants(key, caller.principal, Operation.ENCRYPT, ctx)
        Access.require_usable(key)
        return key, self._access.hsm_for(key), ctx

    def _decrypting_version(self, key: Key, version: int) -> tuple[Hsm, str]:
        Access.require_usable(key)
        found = key.version(version)
        if found is None:
            raise NotFound(f"key {key.key_id!r} has no version {version}")
        if version < key.min_decryption_version:
            raise FailedPrecondition(
                f"version {version} of key {key.key_id!r} is below the minimum decryption "
                f"version {key.min_decryption_version}; re-wrap older data"
            )
        return self._access.hsm_for(key), found.hsm_label


def _seal(hsm: Hsm, key: Key, iv: bytes, plaintext: bytes, ctx: Mapping[str, str]) -> Sealed:
    primary = key.primary()
    shell = blobs.Blob(key.key_id, primary.version, iv, b"")
    sealed = hsm.encrypt(primary.hsm_label, iv, plaintext, shell.aad(ctx))
    return Sealed(
        blobs.Blob(key.key_id, primary.version, iv, sealed).encode(), key.key_id, primary.version
    )
