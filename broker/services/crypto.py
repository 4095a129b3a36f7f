"""Envelope encryption: data keys and small payloads under HSM-held key-encryption keys."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from broker import blob as blobs
from broker.domain import (
    REWRAP_ALREADY_CURRENT,
    AuditOperation,
    Caller,
    Key,
    Operation,
    Outcome,
    Role,
    validate_key_id,
)
from broker.errors import InvalidArgument, KeybrokerError
from broker.ports import Hsm, KeyStore
from broker.services import deadline
from broker.services.access import Access, RateLimiter
from broker.services.audit import AuditDraft, AuditedService, AuditLog, failure_outcome
from broker.services.tokens import TokenService

DATA_KEY_BYTES = 32
#: Most items of one batch call (GenerateDataKeys, BatchDecrypt, a ReWrapStream message).
MAX_BATCH = 1000


@dataclass(frozen=True, slots=True)
class Sealed:
    """A blob and the key version that made it."""

    blob: bytes
    key_id: str
    key_version: int


@dataclass(frozen=True, slots=True)
class ReWrapped:
    """One item of ReWrapStream done.

    Attributes:
        blob: the blob under the key's primary version (the item's own when already current).
        key_id: its key.
        key_version: its key version (the primary).
        already_current: the item was already under the primary version: checked, unchanged.
    """

    blob: bytes
    key_id: str
    key_version: int
    already_current: bool


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
            deadline.check(deadline.BEFORE_KEY_USE)
            sealed = _seal(hsm, key, iv, data_key, ctx)
            d.key_version = sealed.key_version
            deadline.check(deadline.AFTER_KEY_USE)
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
            iv = hsm.random(blobs.IV_BYTES)
            deadline.check(deadline.BEFORE_KEY_USE)
            sealed = _seal(hsm, key, iv, plaintext, ctx)
            d.key_version = sealed.key_version
            deadline.check(deadline.AFTER_KEY_USE)
            return sealed

    def decrypt(
        self, caller: Caller, ciphertext: bytes, context: Mapping[str, str], token: str
    ) -> Opened:
        """Opens a blob for the holder of a token that covers its key and context."""
        with self._call(caller, AuditOperation.DECRYPT, context=context) as d:
            opened = self._open(d, ciphertext, token)
            deadline.check(deadline.AFTER_KEY_USE)
            return opened

    def _open(self, d: AuditDraft, ciphertext: bytes, token: str) -> Opened:
        blob = blobs.parse(ciphertext)
        d.key_id, d.key_version = blob.key_id, blob.key_version
        ctx = d.validated_context()
        use = self._tokens.authorize(d, token, blob.key_id, blob.key_version, ctx)
        deadline.check(deadline.BEFORE_KEY_USE)
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
            deadline.check(deadline.BEFORE_KEY_USE)
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
                    outcomes.append((d, failure_outcome(exc), exc.audit_reason))
                except Exception:
                    self._audit.record_many([*outcomes, (d, Outcome.ERROR, "internal error")])
                    raise
            self._audit.record_many(outcomes)
            return results

    def rewrap(self, caller: Caller, ciphertext: bytes, context: Mapping[str, str]) -> Sealed:
        """Re-encrypts a blob under its key's primary version; no plaintext leaves the HSM
        adapter (`Hsm.reencrypt`)."""
        with self._call(caller, AuditOperation.REWRAP, context=context) as d:
            found = self._rewrappable(d, ciphertext, self._store.get_key)
            iv = found.hsm.random(blobs.IV_BYTES)
            deadline.check(deadline.BEFORE_KEY_USE)
            sealed = _reseal(found, iv)
            d.key_version = sealed.key_version
            deadline.check(deadline.AFTER_KEY_USE)
            return sealed

    def rewrap_many(
        self, caller: Caller, items: Sequence[tuple[bytes, Mapping[str, str]]]
    ) -> list[ReWrapped | KeybrokerError]:
        """One batch of ReWrapStream: each (blob, context) re-wrapped under its key's primary
        version as `rewrap` would, or, already under it, checked and returned unchanged; an
        item refused gives its error in its place. One audit event per item, all durable
        before the batch is answered.

        Raises:
            InvalidArgument: the batch is empty or holds more than MAX_BATCH items.
            Unauthenticated, ResourceExhausted, AuditUnavailable: the whole batch is refused.
        """
        with self._call(
            caller, AuditOperation.REWRAP, cost=len(items), record_success=False
        ) as call:
            if not 1 <= len(items) <= MAX_BATCH:
                raise InvalidArgument(f"a batch holds 1 to {MAX_BATCH} items")
            keys = _BatchKeys(self._store)
            ivs = _BatchIvs(len(items))
            results: list[ReWrapped | KeybrokerError] = []
            outcomes: list[tuple[AuditDraft, Outcome, str]] = []
            for ciphertext, context in items:
                d = AuditDraft(caller=call.caller, operation=AuditOperation.REWRAP, context=context)
                try:
                    done = self._rewrap_item(d, ciphertext, keys, ivs)
                except KeybrokerError as exc:
                    results.append(exc)
                    outcomes.append((d, failure_outcome(exc), exc.audit_reason))
                except Exception:
                    self._audit.record_many([*outcomes, (d, Outcome.ERROR, "internal error")])
                    raise
                else:
                    results.append(done)
                    outcomes.append(
                        (d, Outcome.ALLOWED, REWRAP_ALREADY_CURRENT if done.already_current else "")
                    )
            self._audit.record_many(outcomes)
            return results

    def _rewrap_item(
        self, d: AuditDraft, ciphertext: bytes, keys: _BatchKeys, ivs: _BatchIvs
    ) -> ReWrapped:
        found = self._rewrappable(d, ciphertext, keys.get)
        deadline.check(deadline.BEFORE_KEY_USE)
        primary = found.key.primary()
        if found.blob.key_version == primary.version:
            # Nothing to move; still prove the blob is sound (a damaged one is reported now,
            # not when its data is needed).
            blob, ctx = found.blob, found.context
            found.hsm.authenticate(found.label, blob.iv, blob.sealed, blob.aad(ctx))
            return ReWrapped(ciphertext, blob.key_id, blob.key_version, already_current=True)
        sealed = _reseal(found, ivs.take(found.hsm))
        d.key_version = sealed.key_version
        return ReWrapped(sealed.blob, sealed.key_id, sealed.key_version, already_current=False)

    def _rewrappable(
        self, d: AuditDraft, ciphertext: bytes, get_key: Callable[[str], Key]
    ) -> _Rewrappable:
        """Parses the blob and checks that the caller may re-wrap it here and now: admin or a
        rewrap grant covering the context (and the certificate's country), the key enabled,
        the version not below the minimum, the key's HSM in a jurisdiction its policy allows.
        The grant comes first: a caller without one learns neither the key's state nor
        whether it exists (`Access.granted_key`).
        """
        blob = blobs.parse(ciphertext)
        d.key_id, d.key_version = blob.key_id, blob.key_version
        ctx = d.validated_context()
        caller = d.caller
        key = self._access.granted_key(get_key, caller.principal, blob.key_id, Operation.REWRAP)
        if not self._access.has_role(caller.principal, Role.ADMIN):
            Access.matching_grants(
                key, caller.principal, Operation.REWRAP, ctx, country=caller.country
            )
        hsm, label = self._access.decrypting_version(key, blob.key_version)
        return _Rewrappable(blob, ctx, key, hsm, label)

    def _encrypting_key(self, d: AuditDraft, key_id: str) -> tuple[Key, Hsm, dict[str, str]]:
        """The key, its HSM and the checked context of a GenerateDataKey or Encrypt: the
        grant is checked before the key's state, so a caller without one learns neither
        that state nor whether the key exists (`Access.granted_key`)."""
        validate_key_id(key_id)
        ctx = d.validated_context()
        principal = d.caller.principal
        key = self._access.granted_key(self._store.get_key, principal, key_id, Operation.ENCRYPT)
        Access.matching_grants(key, principal, Operation.ENCRYPT, ctx, country=d.caller.country)
        Access.require_usable(key)
        return key, self._access.hsm_for(key), ctx


@dataclass(frozen=True, slots=True)
class _Rewrappable:
    """A blob the caller may re-wrap, and where its key version lives."""

    blob: blobs.Blob
    context: dict[str, str]
    key: Key
    hsm: Hsm
    label: str


class _BatchKeys:
    """The keys one batch names, each read from the store once (a refusal to read is
    remembered too, so a batch of blobs of an unknown key costs one look-up)."""

    def __init__(self, store: KeyStore) -> None:
        self._store = store
        self._seen: dict[str, Key | KeybrokerError] = {}

    def get(self, key_id: str) -> Key:
        found = self._seen.get(key_id)
        if found is None:
            try:
                found = self._store.get_key(key_id)
            except KeybrokerError as exc:
                found = exc
            self._seen[key_id] = found
        if isinstance(found, KeybrokerError):
            raise found
        return found


class _BatchIvs:
    """Fresh GCM IVs for one batch, drawn from each HSM's RNG in one call for the lot."""

    def __init__(self, count: int) -> None:
        self._count = count
        self._left: dict[str, bytes] = {}

    def take(self, hsm: Hsm) -> bytes:
        left = self._left.get(hsm.info.name, b"")
        if not left:
            left = hsm.random(blobs.IV_BYTES * self._count)
        iv, self._left[hsm.info.name] = left[: blobs.IV_BYTES], left[blobs.IV_BYTES :]
        return iv


def _reseal(found: _Rewrappable, iv: bytes) -> Sealed:
    """`found`'s blob re-encrypted under its key's primary version with `iv`, inside the HSM
    adapter: the plaintext is never handed to the service."""
    key, blob, ctx = found.key, found.blob, found.context
    primary = key.primary()
    shell = blobs.Blob(key.key_id, primary.version, iv, b"")
    sealed = found.hsm.reencrypt(
        found.label, blob.iv, blob.sealed, blob.aad(ctx), primary.hsm_label, iv, shell.aad(ctx)
    )
    return Sealed(
        blobs.Blob(key.key_id, primary.version, iv, sealed).encode(), key.key_id, primary.version
    )


def _seal(hsm: Hsm, key: Key, iv: bytes, plaintext: bytes, ctx: Mapping[str, str]) -> Sealed:
    primary = key.primary()
    shell = blobs.Blob(key.key_id, primary.version, iv, b"")
    sealed = hsm.encrypt(primary.hsm_label, iv, plaintext, shell.aad(ctx))
    return Sealed(
        blobs.Blob(key.key_id, primary.version, iv, sealed).encode(), key.key_id, primary.version
    )
