"""Key lifecycle: create, read, rotate, change policy, enable, disable, schedule and cancel
destruction, retire old versions, report use per version, hand out destruction receipts.

The background half (due destructions and rotations) is `broker.services.scheduler`.
"""

from __future__ import annotations

import base64
import logging
import re
import secrets
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta

from broker.domain import (
    MAX_CONTEXT_VALUE_BYTES,
    REWRAP_ALREADY_CURRENT,
    AuditEvent,
    AuditFilter,
    AuditOperation,
    Caller,
    Key,
    KeyPolicy,
    KeyState,
    KeyVersion,
    Outcome,
    VersionUsage,
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
from broker.ports import Clock, Hsm, HsmInfo, KeyStore
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
#: The shortest pending window by default (setting `keys.min_destruction_window`).
DEFAULT_MIN_DESTRUCTION_WINDOW = timedelta(days=7)
MAX_DESTRUCTION_WINDOW = timedelta(days=3653)
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
        for code in grant.countries:
            if not _JURISDICTION.fullmatch(code):
                raise InvalidArgument(
                    f"the grant for {grant.principal!r}: countries takes ISO 3166-1 alpha-2 "
                    f"codes such as 'FR'; got {code!r}"
                )
    for code in policy.allowed_jurisdictions:
        if not _JURISDICTION.fullmatch(code):
            raise InvalidArgument(
                f"allowed_jurisdictions takes ISO 3166-1 alpha-2 codes such as 'FR'; got {code!r}"
            )
    return policy


def policy_widening(old: KeyPolicy, new: KeyPolicy) -> tuple[str, ...]:
    """How `new` widens `old`, one line each ("" lines never): jurisdictions added, and for each
    principal of both, a longer token lifetime cap (a cap dropped is the broker's 1 hour).

    A principal's cap is the longest of its grants' caps. New grants and operations are
    changes too, shown by `keybroker keys set-policy`, but not "widening": widening is what
    moves a key's use out of where and how long it was allowed.
    """
    lines = []
    added = sorted(new.jurisdictions() - old.jurisdictions())
    if added:
        lines.append(f"jurisdictions widened: +{', +'.join(added)}")
    old_caps, new_caps = _token_caps(old), _token_caps(new)
    for principal in sorted(old_caps.keys() & new_caps.keys()):
        before, after = old_caps[principal], new_caps[principal]
        if after > before:
            how = "dropped" if after == MAX_TOKEN_TTL else "raised"
            lines.append(
                f"token lifetime cap of {principal!r} {how}: {_ttl(before)} -> {_ttl(after)}"
            )
    return tuple(lines)


def _token_caps(policy: KeyPolicy) -> dict[str, timedelta]:
    caps: dict[str, timedelta] = {}
    for grant in policy.grants:
        cap = grant.max_token_ttl or MAX_TOKEN_TTL
        caps[grant.principal] = max(cap, caps.get(grant.principal, timedelta(0)))
    return caps


def _ttl(value: timedelta) -> str:
    seconds = int(value.total_seconds())
    if seconds % 3600 == 0:
        return f"{seconds // 3600}h"
    if seconds % 60 == 0:
        return f"{seconds // 60}m"
    return f"{seconds}s"


def widening_context(widening: Sequence[str]) -> dict[str, str]:
    """The audit context entry (`widening`) that says how a policy widens, cut to fit."""
    if not widening:
        return {}
    text = "; ".join(widening)
    if len(text.encode("utf-8")) > MAX_CONTEXT_VALUE_BYTES:
        text = text.encode("utf-8")[: MAX_CONTEXT_VALUE_BYTES - 3].decode("utf-8", "ignore") + "..."
    return {"widening": text}


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
        min_destruction_window: the shortest `pending_window` a destruction may be scheduled
            with, and the window of a request that gives none.
    """

    def __init__(
        self,
        store: KeyStore,
        access: Access,
        audit: AuditLog,
        clock: Clock,
        default_hsm: str,
        limiter: RateLimiter,
        *,
        min_destruction_window: timedelta = DEFAULT_MIN_DESTRUCTION_WINDOW,
    ) -> None:
        super().__init__(audit, limiter)
        self._store = store
        self._access = access
        self._clock = clock
        self._default_hsm = default_hsm
        self._min_destruction_window = min_destruction_window

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

    def hsm_info(self, name: str) -> HsmInfo | None:
        """Where the HSM `name` stands as this broker declares it (None when it is not
        configured here): shown with every key, so that its reader sees where it lives."""
        return self._access.hsm_info(name)

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
        """Replaces the key's policy; a policy that widens the key's (see `policy_widening`)
        says how in its audit event's context (`widening`)."""
        change = self.policy_change(key_id, policy)
        with self._call(caller, AuditOperation.UPDATE_KEY_POLICY, key_id=key_id) as draft:
            self._access.require_admin(caller)
            validate_policy(policy)

            def widening_noted(key: Key) -> Key:
                draft.context = widening_context(policy_widening(key.policy, policy))
                return change(key)

            return self._update(validate_key_id(key_id), widening_noted)

    def policy_change(self, key_id: str, policy: KeyPolicy) -> Callable[[Key], Key]:
        """The key with `policy` (validated by the caller), refused with PermissionDenied when
        the key's HSM lies outside the policy's jurisdictions."""

        def change(key: Key) -> Key:
            hsm = self._access.hsm_named(key.hsm)
            Access.require_jurisdiction(policy.jurisdictions(), hsm, key_id)
            return key.evolve(policy=policy)

        return change

    def set_enabled(self, caller: Caller, key_id: str, enabled: bool) -> Key:
        change = self.enabled_change(key_id, enabled)
        operation = AuditOperation.ENABLE_KEY if enabled else AuditOperation.DISABLE_KEY
        with self._call(caller, operation, key_id=key_id):
            self._access.require_admin(caller)
            return self._update(validate_key_id(key_id), change)

    @staticmethod
    def enabled_change(key_id: str, enabled: bool) -> Callable[[Key], Key]:
        """The key enabled (or disabled); FailedPrecondition once its destruction is
        scheduled."""

        def change(key: Key) -> Key:
            if key.state in (KeyState.PENDING_DESTRUCTION, KeyState.DESTROYED):
                raise FailedPrecondition(
                    f"key {key_id!r} is {key.state.value.replace('_', ' ')}; "
                    "cancel the destruction first"
                )
            return key.evolve(state=KeyState.ENABLED if enabled else KeyState.DISABLED)

        return change

    def schedule_destruction(
        self, caller: Caller, key_id: str, pending_window: timedelta | None
    ) -> Key:
        """Puts the key in PENDING_DESTRUCTION: from now on it neither encrypts nor decrypts,
        and once `pending_window` is over the scheduler destroys its HSM objects.

        Raises:
            InvalidArgument: the window is shorter than `keys.min_destruction_window` or
                longer than 10 years.
            FailedPrecondition: the key is already pending destruction or destroyed.
        """
        with self._call(caller, AuditOperation.SCHEDULE_KEY_DESTRUCTION, key_id=key_id):
            self._access.require_admin(caller)
            window = self.destruction_window(pending_window)
            return self._update(validate_key_id(key_id), self.destruction_change(key_id, window))

    def destruction_window(self, pending_window: timedelta | None) -> timedelta:
        """The window a destruction scheduled with `pending_window` gets (None: the shortest).

        Raises:
            InvalidArgument: shorter than `keys.min_destruction_window` or over 10 years.
        """
        window = self._min_destruction_window if pending_window is None else pending_window
        if window < self._min_destruction_window:
            raise InvalidArgument(
                f"pending_window must be at least {_span(self._min_destruction_window)} "
                "(setting keys.min_destruction_window)"
            )
        if window > MAX_DESTRUCTION_WINDOW:
            raise InvalidArgument("pending_window must be at most 10 years")
        return window

    def destruction_change(self, key_id: str, window: timedelta) -> Callable[[Key], Key]:
        """The key pending destruction `window` from when the change is made; refused with
        FailedPrecondition for a key already pending destruction or destroyed."""

        def change(key: Key) -> Key:
            if key.state is KeyState.PENDING_DESTRUCTION:
                assert key.destroy_time is not None
                raise FailedPrecondition(
                    f"key {key_id!r} is already scheduled for destruction at "
                    f"{key.destroy_time.isoformat()}; cancel it first to change the date"
                )
            if key.state is KeyState.DESTROYED:
                raise FailedPrecondition(f"key {key_id!r} is already destroyed")
            return key.evolve(
                state=KeyState.PENDING_DESTRUCTION, destroy_time=self._clock.now() + window
            )

        return change

    def cancel_destruction(self, caller: Caller, key_id: str) -> Key:
        """Takes a key out of PENDING_DESTRUCTION; it comes back DISABLED, so that an admin
        decides when it is used again.

        Raises:
            FailedPrecondition: the key is not pending destruction, or its destruction is
                due or has begun (some HSM objects may be gone already).
        """

        def change(key: Key) -> Key:
            if key.state is not KeyState.PENDING_DESTRUCTION:
                raise FailedPrecondition(
                    f"key {key_id!r} is {key.state.value.replace('_', ' ')}, not pending "
                    "destruction: there is nothing to cancel"
                )
            due = key.destroy_time is not None and key.destroy_time <= self._clock.now()
            if due or key.destruction_started():
                raise FailedPrecondition(
                    f"the destruction of key {key_id!r} is due and may have begun; "
                    "it can no longer be cancelled"
                )
            return key.evolve(state=KeyState.DISABLED, destroy_time=None, lease=None)

        with self._call(caller, AuditOperation.CANCEL_KEY_DESTRUCTION, key_id=key_id):
            self._access.require_admin(caller)
            return self._update(validate_key_id(key_id), change)

    def set_min_decryption_version(self, caller: Caller, key_id: str, version: int) -> Key:
        """Retires the versions below `version`: their blobs no longer decrypt nor re-wrap.
        Lowering it again brings them back (their HSM objects are kept).

        Raises:
            InvalidArgument: `version` is 0.
            FailedPrecondition: `version` is above the primary version (the primary cannot
                be retired), or the key is pending destruction or destroyed.
        """

        def change(key: Key) -> Key:
            if key.state in (KeyState.PENDING_DESTRUCTION, KeyState.DESTROYED):
                raise FailedPrecondition(
                    f"key {key_id!r} is {key.state.value.replace('_', ' ')}; its versions "
                    "cannot be retired"
                )
            if version > key.primary_version:
                raise FailedPrecondition(
                    f"cannot retire the primary version {key.primary_version} of key "
                    f"{key_id!r}: min_decryption_version must be at most "
                    f"{key.primary_version}; rotate the key first"
                )
            return key.evolve(min_decryption_version=version)

        with self._call(caller, AuditOperation.SET_MIN_DECRYPTION_VERSION, key_id=key_id) as draft:
            draft.key_version = version
            self._access.require_admin(caller)
            if version < 1:
                raise InvalidArgument("min_decryption_version must be at least 1")
            return self._update(validate_key_id(key_id), change)

    def usage(self, caller: Caller, key_id: str) -> tuple[Key, Sequence[VersionUsage], int]:
        """Counts, per version, what the audit trail records of the key's use.

        Returns:
            The key, one `VersionUsage` per version (oldest first), and how many of the
            key's events were read.
        """
        with self._call(caller, AuditOperation.GET_KEY_USAGE, key_id=key_id):
            self._access.require_reader(caller)
            key = self._store.get_key(validate_key_id(key_id))
            counter = UsageCounter(v.version for v in key.versions)
            for event in self._audit.events(AuditFilter(key_id=key_id)):
                counter.add(event)
            return key, counter.result(), counter.events

    def destruction_receipt(self, caller: Caller, key_id: str) -> tuple[Key, str]:
        """The signed receipt of a destroyed key (`keybroker_client.evidence.receipt`).

        Raises:
            FailedPrecondition: the key is not destroyed (yet).
        """
        with self._call(caller, AuditOperation.GET_DESTRUCTION_RECEIPT, key_id=key_id):
            self._access.require_reader(caller)
            key = self._store.get_key(validate_key_id(key_id))
            if key.state is not KeyState.DESTROYED or not key.destruction_receipt:
                raise FailedPrecondition(
                    f"key {key_id!r} is {key.state.value.replace('_', ' ')}; a destruction "
                    "receipt exists once the key is destroyed"
                )
            return key, key.destruction_receipt

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


def _span(value: timedelta) -> str:
    """A window as people read it: `7 days`, `1:00:00`, `30 seconds`."""
    seconds = value.total_seconds()
    if seconds % 86400 == 0:
        days = int(seconds // 86400)
        return f"{days} day{'s' if days != 1 else ''}"
    if seconds < 3600:
        return f"{seconds:g} seconds"
    return str(value)


#: Audit operations that use a version, and the counter each allowed event adds to.
_USE_COUNTERS = {
    AuditOperation.GENERATE_DATA_KEY.value: "data_keys_issued",
    AuditOperation.ENCRYPT.value: "encryptions",
    AuditOperation.REWRAP.value: "rewrapped",
    AuditOperation.DECRYPT.value: "decrypts",
}


class UsageCounter:
    """Per-version counts of a key's allowed uses, fed the key's audit events in order.

    A GenerateDataKey, Encrypt or Decrypt event names the version it used; an allowed ReWrap
    event names the version it re-wrapped into. Events of versions the key does not have
    (refused calls with a forged blob) are not counted.
    """

    def __init__(self, versions: Iterable[int]) -> None:
        self._counts: dict[int, dict[str, int]] = {v: {} for v in versions}
        self._last_decrypt: dict[int, datetime] = {}
        self._last_use: dict[int, datetime] = {}
        self.events = 0

    def add(self, event: AuditEvent) -> None:
        self.events += 1
        counts = self._counts.get(event.key_version)
        field = _USE_COUNTERS.get(event.operation)
        if counts is None or field is None:
            return
        if event.outcome is not Outcome.ALLOWED:
            if field == "decrypts":
                counts["decrypts_refused"] = counts.get("decrypts_refused", 0) + 1
            return
        if not (field == "rewrapped" and event.reason == REWRAP_ALREADY_CURRENT):
            # A blob found already current was checked under the version, not moved into it.
            counts[field] = counts.get(field, 0) + 1
        _keep_latest(self._last_use, event.key_version, event.time)
        if field == "decrypts":
            _keep_latest(self._last_decrypt, event.key_version, event.time)

    def result(self) -> list[VersionUsage]:
        return [
            VersionUsage(
                version,
                last_decrypt_time=self._last_decrypt.get(version),
                last_use_time=self._last_use.get(version),
                **counts,
            )
            for version, counts in sorted(self._counts.items())
        ]


def _keep_latest(times: dict[int, datetime], version: int, time: datetime) -> None:
    # Sequence order across writers' chains is only nearly time order.
    if version not in times or time > times[version]:
        times[version] = time
