"""Who may do what: roles, grants, jurisdictions and rate limits, in one place."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping

from broker.domain import Caller, Grant, Key, KeyState, Operation, Role
from broker.errors import (
    FailedPrecondition,
    KeybrokerError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from broker.ports import Hsm, HsmInfo


class Access:
    """Role and grant checks.

    Args:
        roles: principal -> roles, from configuration.
        hsms: the configured HSMs by name.
    """

    def __init__(self, roles: Mapping[str, frozenset[Role]], hsms: Mapping[str, Hsm]) -> None:
        self._roles = dict(roles)
        self._hsms = dict(hsms)

    def has_role(self, principal: str, role: Role) -> bool:
        return role in self._roles.get(principal, frozenset())

    def require_admin(self, caller: Caller) -> None:
        if not self.has_role(caller.principal, Role.ADMIN):
            raise PermissionDenied(f"principal {caller.principal!r} does not have the admin role")

    def require_reader(self, caller: Caller) -> None:
        roles = self._roles.get(caller.principal, frozenset())
        if not roles & {Role.ADMIN, Role.AUDITOR}:
            raise PermissionDenied(
                f"principal {caller.principal!r} needs the admin or auditor role"
            )

    def may_read_keys(self, principal: str) -> bool:
        """Admins and auditors, who may read any key's metadata (GetKey, ListKeys)."""
        return bool(self._roles.get(principal, frozenset()) & {Role.ADMIN, Role.AUDITOR})

    def granted_key(
        self,
        get_key: Callable[[str], Key],
        principal: str,
        key_id: str,
        operation: Operation,
    ) -> Key:
        """The key `key_id`, read for a caller whose `operation` grant on it is checked next
        (`matching_grants`), before anything about the key's state is.

        Raises:
            NotFound: there is no such key and the caller may read keys (admin, auditor).
            PermissionDenied: there is no such key and the caller may not: it is answered
                as an existing key without its grant would be, so that no service learns
                which key ids exist (see `unknown_key`).
        """
        try:
            return get_key(key_id)
        except NotFound:
            raise self.unknown_key(principal, key_id, operation) from None

    def unknown_key(self, principal: str, key_id: str, operation: Operation) -> KeybrokerError:
        """What a caller about to use `key_id` for `operation` is told when there is no such
        key: NOT_FOUND for admins and auditors, who may list the keys anyway; for anyone
        else the very refusal of an existing key they hold no grant on (same code, same
        message), while the audit trail records the truth for the auditors."""
        if self.may_read_keys(principal):
            return NotFound(f"key {key_id!r} not found")
        return no_grant(principal, operation, key_id, missing=True)

    @staticmethod
    def matching_grants(
        key: Key,
        principal: str,
        operation: Operation,
        context: Mapping[str, str],
        *,
        country: str | None,
    ) -> list[Grant]:
        """The principal's grants for `operation` on `key` whose context `context` satisfies
        and whose countries admit the caller's certificate.

        Args:
            key: the key.
            principal: who the grants must name.
            operation: what they must allow.
            context: the request's (or token's) context.
            country: the caller certificate's country ("" when it names none); None only
                where the certificate is not at hand (an admin issuing a token for another
                principal): the countries are then checked when the token is used.

        Raises:
            PermissionDenied: there is none.
        """
        grants = key.policy.grants_for(principal, operation)
        if not grants:
            raise no_grant(principal, operation, key.key_id)
        fitting = [g for g in grants if g.context_allows(context)]
        if not fitting:
            raise PermissionDenied(
                f"the context does not satisfy principal {principal!r}'s "
                f"{operation.value} grant on key {key.key_id!r}"
            )
        if country is None:
            return fitting
        placed = [g for g in fitting if g.country_allows(country)]
        if not placed:
            wanted = list(dict.fromkeys(c for g in fitting for c in g.countries))
            have = f"names country {country!r}" if country else "names no country (C=)"
            raise PermissionDenied(
                f"principal {principal!r}'s {operation.value} grant on key {key.key_id!r} "
                f"requires a client certificate from {', '.join(wanted)}; this certificate "
                f"{have}"
            )
        return placed

    def hsm_for(self, key: Key) -> Hsm:
        """The HSM holding `key`, after checking that the key's policy allows its jurisdiction.

        Raises:
            PermissionDenied: the HSM's jurisdiction is not allowed by the key's policy.
            Unavailable: the HSM is not configured on this broker.
        """
        hsm = self._hsms.get(key.hsm)
        if hsm is None:
            raise Unavailable(f"HSM {key.hsm!r} holding key {key.key_id!r} is not configured here")
        self.require_jurisdiction(key.policy.jurisdictions(), hsm, key.key_id)
        return hsm

    def hsm_info(self, name: str) -> HsmInfo | None:
        """Where the HSM `name` stands (name, jurisdiction, operator); None when it is not
        configured on this broker."""
        hsm = self._hsms.get(name)
        return hsm.info if hsm is not None else None

    def hsm_named(self, name: str) -> Hsm:
        hsm = self._hsms.get(name)
        if hsm is None:
            raise NotFound(f"no HSM named {name!r} is configured; known: {sorted(self._hsms)}")
        return hsm

    @staticmethod
    def require_jurisdiction(allowed: frozenset[str], hsm: Hsm, key_id: str) -> None:
        if hsm.info.jurisdiction not in allowed:
            raise PermissionDenied(
                f"key {key_id!r} may not be held or used in jurisdiction "
                f"{hsm.info.jurisdiction!r} (HSM {hsm.info.name!r}); the key's policy allows "
                f"{', '.join(sorted(allowed))}"
            )

    def decrypting_version(self, key: Key, version: int) -> tuple[Hsm, str]:
        """The HSM and object label of `version` of `key`, if that version may decrypt now.

        Raises:
            FailedPrecondition: the key is not enabled, or the version is below the key's
                minimum decryption version.
            NotFound: the key has no such version.
            PermissionDenied, Unavailable: see `hsm_for`.
        """
        self.require_usable(key)
        found = key.version(version)
        if found is None:
            raise NotFound(f"key {key.key_id!r} has no version {version}")
        if version < key.min_decryption_version:
            raise FailedPrecondition(
                f"version {version} of key {key.key_id!r} is retired: it is below the key's "
                f"min_decryption_version {key.min_decryption_version}, so its blobs neither "
                "decrypt nor re-wrap; an admin may lower the minimum again with "
                "KeyAdmin.SetMinDecryptionVersion"
            )
        return self.hsm_for(key), found.hsm_label

    @staticmethod
    def require_usable(key: Key) -> None:
        """Raises FailedPrecondition unless the key is enabled."""
        if key.state is KeyState.ENABLED:
            return
        message = f"key {key.key_id!r} is {key.state.value.replace('_', ' ')}"
        if key.state is KeyState.DISABLED:
            message += "; an admin must enable it first"
        elif key.state is KeyState.DESTROYED:
            message += ": its HSM objects no longer exist, so nothing under it can be decrypted"
        raise FailedPrecondition(message)


def no_grant(
    principal: str, operation: Operation, key_id: str, *, missing: bool = False
) -> PermissionDenied:
    """The refusal of a caller without an `operation` grant on `key_id`; the same words
    whether or not the key exists (`missing`), which only its audit reason tells.

    The message says both causes, so a caller who mistyped a key id knows to check it.
    """
    told = (
        f"principal {principal!r} has no {operation.value} grant on key {key_id!r} "
        "(or there is no such key); ask an admin to check the key id and the key's policy"
    )
    if missing:
        truth = f"no key {key_id!r} exists (the caller was answered as having no grant on it)"
    else:
        truth = f"principal {principal!r} has no {operation.value} grant on key {key_id!r}"
    return PermissionDenied(told, audit_reason=truth)


class RateLimiter:
    """A token bucket per principal; `rate` 0 disables it.

    Args:
        rate: requests per second allowed on average.
        burst: how many requests may come at once.
    """

    def __init__(self, rate: float, burst: int) -> None:
        self._rate = rate
        self._burst = max(burst, 1)
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def check(self, principal: str, cost: int = 1) -> None:
        """Takes `cost` requests' worth (a batch call costs one per item, at most the burst, so
        that a full batch can pass) from the principal's bucket, or raises ResourceExhausted."""
        if self._rate <= 0:
            return
        cost = min(max(cost, 1), self._burst)
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(principal, (float(self._burst), now))
            tokens = min(float(self._burst), tokens + (now - last) * self._rate)
            if tokens < cost:
                self._buckets[principal] = (tokens, now)
                raise ResourceExhausted(
                    f"rate limit of {self._rate:g} requests per second reached for "
                    f"{principal!r}; retry after a short back-off"
                )
            self._buckets[principal] = (tokens - cost, now)
