"""Key lifecycle: create, read, rotate, change policy, enable, disable."""

from __future__ import annotations

import base64
import logging
import re
import secrets
from collections.abc import Callable
from datetime import timedelta

from broker.domain import (
    AuditOperation,
    Caller,
    Key,
    KeyPolicy,
    KeyState,
    KeyVersion,
    validate_context,
    validate_key_id,
)
from broker.errors import (
    AlreadyExists,
    ConcurrentModification,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    StoreUnavailable,
)
from broker.ports import Clock, Hsm, KeyStore
from broker.services.access import Access, RateLimiter
from broker.services.audit import AuditedService, AuditLog

log = logging.getLogger(__name__)

MAX_TOKEN_TTL = timedelta(hours=1)
MAX_DESCRIPTION = 1024
MAX_GRANTS = 256
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
CAS_ATTEMPTS = 8
MIN_ROTATION_PERIOD = timedelta(days=1)
MAX_ROTATION_PERIOD = timedelta(days=3653)
_JURISDICTION = re.compile(r"[A-Z]{2}")


def kek_label(key_id: str, version: int) -> str:
    """A fresh HSM label for a version; the random suffix keeps an orphan of a crashed
    attempt from blocking the retry."""
    return f"kek:{key_id}:v{version}:{secrets.token_hex(4)}"


def validate_policy(policy: KeyPolicy) -> KeyPolicy:
    """Raises InvalidArgument for a policy that cannot be meant."""
    if len(policy.grants) > MAX_GRANTS:
        raise InvalidArgument(f"a policy has at most {MAX_GRANTS} grants")
    for grant in policy.grants:
        if not grant.principal:
            raise InvalidArgument("every grant needs a principal")
        if not grant.operations:
            raise InvalidArgument(f"the grant for {grant.principal!r} names no operation")
        validate_context(grant.context)
        if grant.max_token_ttl is not None and not (
            timedelta(0) < grant.max_token_ttl <= MAX_TOKEN_TTL
        ):
            raise InvalidArgument("a grant's max_token_ttl must be between 1 second and 1 hour")
    for code in policy.allowed_jurisdictions:
        if not _JURISDICTION.fullmatch(code):
            raise InvalidArgument(
                f"allowed_jurisdictions takes ISO 3166-1 alpha-2 codes such as 'FR'; got {code!r}"
            )
    return policy


def encode_page_token(last_key_id: str) -> str:
    return base64.urlsafe_b64encode(last_key_id.encode()).decode().rstrip("=")


def decode_page_token(token: str) -> str:
    if not token:
        return ""
    try:
        key_id = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode("ascii")
        return validate_key_id(key_id)
    except (ValueError, InvalidArgument):
        raise InvalidArgument("page_token is not one this broker returned") from None


class KeyService(AuditedService):
    """Key administration.

    Args:
        store: key metadata.
        access: role, grant and jurisdiction checks.
        audit: the audit trail.
        clock: the time source.
        default_hsm: the HSM name used when a request names none.
        limiter: per-principal rate limit.
    """

    def __init__(
        self,
        store: KeyStore,
        access: Access,
        audit: AuditLog,
        clock: Clock,
        default_hsm: str,
        limiter: RateLimiter,
    ) -> None:
        super().__init__(audit, limiter)
        self._store = store
        self._access = access
        self._clock = clock
        self._default_hsm = default_hsm

    def create(
        self,
        caller: Caller,
        key_id: str,
        description: str,
        policy: KeyPolicy,
        rotation_period: timedelta | None,
        hsm_name: str,
    ) -> Key:
        with self._call(caller, AuditOperation.CREATE_KEY, key_id=key_id) as draft:
            self._access.require_admin(caller)
            validate_key_id(key_id)
            if len(description) > MAX_DESCRIPTION:
                raise InvalidArgument(f"description is longer than {MAX_DESCRIPTION} characters")
            validate_policy(policy)
            if rotation_period is not None and not (
                MIN_ROTATION_PERIOD <= rotation_period <= MAX_ROTATION_PERIOD
            ):
                raise InvalidArgument("rotation_period must be between 1 day and 10 years")
            hsm = self._access.hsm_named(hsm_name or self._default_hsm)
            Access.require_jurisdiction(policy.jurisdictions(), hsm, key_id)
            try:
                self._store.get_key(key_id)
            except NotFound:
                pass
            else:
                raise AlreadyExists(f"key {key_id!r} already exists")
            now = self._clock.now()
            label = kek_label(key_id, 1)
            hsm.generate_kek(label)
            key = Key(
                key_id=key_id,
                description=description,
                state=KeyState.ENABLED,
                primary_version=1,
                versions=(KeyVersion(1, now, label),),
                min_decryption_version=1,
                policy=policy,
                hsm=hsm.info.name,
                create_time=now,
                rotation_period=rotation_period,
                next_rotation_time=now + rotation_period if rotation_period else None,
            )
            self._store_new_key(hsm, key, label)
            draft.key_version = 1
            return key

    def _store_new_key(self, hsm: Hsm, key: Key, label: str) -> None:
        try:
            self._store.create_key(key)
        except (AlreadyExists, StoreUnavailable):
            # Nothing refers to the new HSM object: remove it rather than leave an orphan.
            _destroy_quietly(hsm, label)
            raise

    def get(self, caller: Caller, key_id: str) -> Key:
        with self._call(caller, AuditOperation.GET_KEY, key_id=key_id):
            self._access.require_reader(caller)
            return self._store.get_key(validate_key_id(key_id))

    def list(self, caller: Caller, page_size: int, page_token: str) -> tuple[list[Key], str]:
        with self._call(caller, AuditOperation.LIST_KEYS):
            self._access.require_reader(caller)
            if page_size < 0:
                raise InvalidArgument("page_size must not be negative")
            size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
            after = decode_page_token(page_token)
            keys = self._store.list_keys(after, size + 1)
            more = len(keys) > size
            keys = keys[:size]
            return keys, encode_page_token(keys[-1].key_id) if more else ""

    def rotate(self, caller: Caller, key_id: str) -> Key:
        with self._call(caller, AuditOperation.ROTATE_KEY, key_id=key_id) as draft:
            self._access.require_admin(caller)
            key = self._store.get_key(validate_key_id(key_id))
            if key.state in (KeyState.PENDING_DESTRUCTION, KeyState.DESTROYED):
                raise FailedPrecondition(
                    f"key {key_id!r} is {key.state.value.replace('_', ' ')} and cannot rotate"
                )
            hsm = self._access.hsm_for(key)
            number = max(v.version for v in key.versions) + 1
            label = kek_label(key_id, number)
            hsm.generate_kek(label)
            now = self._clock.now()
            rotated = key.evolve(
                versions=(*key.versions, KeyVersion(number, now, label)),
                primary_version=number,
                next_rotation_time=now + key.rotation_period if key.rotation_period else None,
            )
            try:
                stored = self._store.update_key(rotated, key.revision)
            except ConcurrentModification:
                # Another rotation (or change) won the race. Two rotations racing give one
                # new version: drop ours and report the key as it now stands.
                _destroy_quietly(hsm, label)
                stored = self._store.get_key(key_id)
                if stored.primary_version == key.primary_version:
                    raise
            except StoreUnavailable:
                _destroy_quietly(hsm, label)
                raise
            draft.key_version = stored.primary_version
            return stored

    def update_policy(self, caller: Caller, key_id: str, policy: KeyPolicy) -> Key:
        def change(key: Key) -> Key:
            hsm = self._access.hsm_named(key.hsm)
            Access.require_jurisdiction(policy.jurisdictions(), hsm, key_id)
            return key.evolve(policy=policy)

        with self._call(caller, AuditOperation.UPDATE_KEY_POLICY, key_id=key_id):
            self._access.require_admin(caller)
            validate_policy(policy)
            return self._update(validate_key_id(key_id), change)

    def set_enabled(self, caller: Caller, key_id: str, enabled: bool) -> Key:
        def change(key: Key) -> Key:
            if key.state in (KeyState.PENDING_DESTRUCTION, KeyState.DESTROYED):
                raise FailedPrecondition(
                    f"key {key_id!r} is {key.state.value.replace('_', ' ')}; "
                    "cancel the destruction first"
                )
            return key.evolve(state=KeyState.ENABLED if enabled else KeyState.DISABLED)

        operation = AuditOperation.ENABLE_KEY if enabled else AuditOperation.DISABLE_KEY
        with self._call(caller, operation, key_id=key_id):
            self._access.require_admin(caller)
            return self._update(validate_key_id(key_id), change)

    def _update(self, key_id: str, change: Callable[[Key], Key]) -> Key:
        for _ in range(CAS_ATTEMPTS):
            key = self._store.get_key(key_id)
            try:
                return self._store.update_key(change(key), key.revision)
            except ConcurrentModification:
                continue
        raise StoreUnavailable(f"key {key_id!r} is being changed by others; retry")


def _destroy_quietly(hsm: Hsm, label: str) -> None:
    try:
        hsm.destroy(label)
    except Exception:  # noqa: BLE001 - the caller's error matters more than this clean-up
        log.warning("could not remove an unused HSM object", extra={"label": label})
