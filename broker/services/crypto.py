"""Envelope encryption: data keys and small payloads under HSM-held key-encryption keys."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from broker import blob as blobs
from broker.domain import AuditOperation, Caller, Key, Operation, Outcome, Role, validate_key_id
from broker.errors import InvalidArgument, KeybrokerError, Unavailable
from broker.ports import Hsm, KeyStore
from broker.services.access import Access, RateLimiter
from broker.services.audit import AuditDraft, AuditedService, AuditLog
from broker.services.tokens import TokenService

DATA_KEY_BYTES = 32
#: Most items of one batch call (GenerateDataKeys, BatchDecrypt).
MAX_BATCH = 1000


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


class CryptoService(AuditedService):
    """GenerateDataKey, Encrypt, Decrypt and ReWrap.

    Args:
        store: key metadata.
        access: role, grant and jurisdiction checks.
        audit: the audit trail.
        tokens: token authorization for Decrypt.
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
        super().__init__(audit, limiter)
        self._store = store
        self._access = access
        self._tokens = tokens

    def generate_data_key(
        self, caller: Caller, key_id: str, context: Mapping[str, str]
    ) -> tuple[bytes, Sealed]:
        """A fresh data key from the HSM's RNG and its wrapped form."""
        with self._call(
            caller, AuditOperation.GENERATE_DATA_KEY, key_id=key_id, context=context
        ) as d:
            key, hsm, ctx = self._encrypting_key(d, key_id)
            material = hsm.random(DATA_KEY_BYTES + blobs.IV_BYTES)
            data_key, iv = material[:DATA_KEY_BYTES], material[DATA_KEY_BYTES:]
            sealed = _seal(hsm, key, iv, data_key, ctx)
            d.key_version = sealed.key_version
            return data_key, sealed

    def encrypt(
        self, caller: Caller, key_id: str, plaintext: bytes, context: Mapping[str, str]
    ) -> Sealed:
        with self._call(caller, AuditOperation.ENCRYPT, key_id=key_id, context=context) as d:
            if not plaintext:
                raise InvalidArgument("plaintext is required")
            if len(plaintext) > blobs.MAX_PLAINTEXT:
                raise InvalidArgument(
                    f"plaintext is {len(plaintext)} bytes; Encrypt takes at most "
                    f"{blobs.MAX_PLAINTEXT} (use GenerateDataKey and encrypt locally)"
                )
            key, hsm, ctx = self._encrypting_key(d, key_id)
            sealed = _seal(hsm, key, hsm.random(blobs.IV_BYTES), plaintext, ctx)
            d.key_version = sealed.key_version
            return sealed

    def decrypt(
        self, caller: Caller, ciphertext: bytes, context: Mapping[str, str], token: str
    ) -> Opened:
        """Opens a blob for the holder of a token that covers its key and context."""
        with self._call(caller, AuditOperation.DECRYPT, context=context) as d:
            return self._open(d, ciphertext, token)

    def _open(self, d: AuditDraft, ciphertext: bytes, token: str) -> Opened:
        blob = blobs.parse(ciphertext)
        d.key_id, d.key_version = blob.key_id, blob.key_version
        ctx = d.validated_context()
        use = self._tokens.authorize(d, token, blob.key_id, blob.key_version, ctx)
        plaintext = use.hsm.decrypt(use.hsm_label, blob.iv, blob.sealed, blob.aad(ctx))
        return Opened(plaintext, blob.key_id, blob.key_version)

    # The batch path: many items in one call, each authorised and audited on its own, every
    # event durable (in one commit) before anything leaves.

    def generate_data_keys(
        self, caller: Caller, key_id: str, context: Mapping[str, str], count: int
    ) -> list[tuple[bytes, Sealed]]:
        """`count` fresh data keys and their wrapped forms; one audit event per data key."""
        with self._call(
            caller,
            AuditOperation.GENERATE_DATA_KEY,
            key_id=key_id,
            context=context,
            cost=count,
            record_success=False,
        ) as d:
            if not 1 <= count <= MAX_BATCH:
                raise InvalidArgument(f"count must be between 1 and {MAX_BATCH}")
            key, hsm, ctx = self._encrypting_key(d, key_id)
            per_key = DATA_KEY_BYTES + blobs.IV_BYTES
            material = hsm.random(per_key * count)  # one C_GenerateRandom for the lot
            made = []
            for start in range(0, per_key * count, per_key):
                data_key = material[start : start + DATA_KEY_BYTES]
                iv = material[start + DATA_KEY_BYTES : start + per_key]
                made.append((data_key, _seal(hsm, key, iv, data_key, ctx)))
            d.key_version = made[0][1].key_version
            self._audit.record_many([(d, Outcome.ALLOWED, "")] * count)
            return made

    def batch_decrypt(
        self, caller: Caller, items: Sequence[tuple[bytes, Mapping[str, str], str]]
    ) -> list[Opened | KeybrokerError]:
        """Opens each (ciphertext, context, token) as `decrypt` would; an item refused gives
        its error in its place. One audit event per item."""
        with self._call(
            caller, AuditOperation.DECRYPT, cost=len(items), record_success=False
        ) as call:
            if not 1 <= len(items) <= MAX_BATCH:
                raise InvalidArgument(f"a batch holds 1 to {MAX_BATCH} items")
            results: list[Opened | KeybrokerError] = []
            outcomes: list[tuple[AuditDraft, Outcome, str]] = []
            for ciphertext, context, token in items:
                d = AuditDraft(
                    caller=call.caller, operation=AuditOperation.DECRYPT, context=context
                )
                try:
                    results.append(self._open(d, ciphertext, token))
                    outcomes.append((d, Outcome.ALLOWED, ""))
                except KeybrokerError as exc:
                    results.append(exc)
                    failed = Outcome.ERROR if isinstance(exc, Unavailable) else Outcome.DENIED
                    outcomes.append((d, failed, exc.message))
                except Exception:
                    self._audit.record_many([*outcomes, (d, Outcome.ERROR, "internal error")])
                    raise
            self._audit.record_many(outcomes)
            return results

    def rewrap(self, caller: Caller, ciphertext: bytes, context: Mapping[str, str]) -> Sealed:
        """Re-encrypts a blob under its key's primary version; no plaintext leaves."""
        with self._call(caller, AuditOperation.REWRAP, context=context) as d:
            blob = blobs.parse(ciphertext)
            d.key_id, d.key_version = blob.key_id, blob.key_version
            ctx = d.validated_context()
            key = self._store.get_key(blob.key_id)
            if not self._access.has_role(caller.principal, Role.ADMIN):
                Access.matching_grants(key, caller.principal, Operation.REWRAP, ctx)
            hsm, label = self._access.decrypting_version(key, blob.key_version)
            plaintext = hsm.decrypt(label, blob.iv, blob.sealed, blob.aad(ctx))
            sealed = _seal(hsm, key, hsm.random(blobs.IV_BYTES), plaintext, ctx)
            d.key_version = sealed.key_version
            return sealed

    def _encrypting_key(self, d: AuditDraft, key_id: str) -> tuple[Key, Hsm, dict[str, str]]:
        validate_key_id(key_id)
        ctx = d.validated_context()
        key = self._store.get_key(key_id)
        Access.matching_grants(key, d.caller.principal, Operation.ENCRYPT, ctx)
        Access.require_usable(key)
        return key, self._access.hsm_for(key), ctx


def _seal(hsm: Hsm, key: Key, iv: bytes, plaintext: bytes, ctx: Mapping[str, str]) -> Sealed:
    primary = key.primary()
    shell = blobs.Blob(key.key_id, primary.version, iv, b"")
    sealed = hsm.encrypt(primary.hsm_label, iv, plaintext, shell.aad(ctx))
    return Sealed(
        blobs.Blob(key.key_id, primary.version, iv, sealed).encode(), key.key_id, primary.version
    )
