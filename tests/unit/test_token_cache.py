"""Verify once: a token's signature is checked once per process; everything else per call."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from broker.domain import Caller, KeyPolicy
from broker.errors import PermissionDenied, Unauthenticated
from broker.services.token_cache import VerifiedTokenCache
from tests.unit.test_services import ADMIN, CONSUMER, POLICY, World, world  # noqa: F401


@pytest.fixture
def decodes(world: World, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Counts the signature verifications the token service performs."""
    seen: list[str] = []
    real = world.tokens._decoder.decode

    def counting(token: str, *args: Any, **kwargs: Any) -> Any:
        seen.append(token)
        return real(token, *args, **kwargs)

    monkeypatch.setattr(world.tokens._decoder, "decode", counting)
    return seen


def _token(world: World) -> tuple[str, str]:
    world.keys.create(ADMIN, "k", "", POLICY, None, "")
    token, claims = world.tokens.issue(CONSUMER, "k", {"d": "x"}, "why", None)
    return token, claims.token_id


def test_a_token_is_verified_once(world: World, decodes: list[str]) -> None:
    token, token_id = _token(world)
    for _ in range(5):
        assert world.tokens.verify(token, CONSUMER).token_id == token_id
    assert decodes == [token]


def test_a_refused_token_is_never_remembered(world: World, decodes: list[str]) -> None:
    token, _ = _token(world)
    head, body, sig = token.split(".")
    forged = f"{head}.{body}.{sig[:-4]}AAAA"
    for _ in range(3):
        with pytest.raises(Unauthenticated):
            world.tokens.verify(forged, CONSUMER)
    assert decodes == [forged] * 3


def test_revocation_still_applies_to_a_verified_token(world: World) -> None:
    token, token_id = _token(world)
    world.tokens.verify(token, CONSUMER)
    world.tokens.revoke(CONSUMER, token_id)
    with pytest.raises(Unauthenticated, match="revoked"):
        world.tokens.verify(token, CONSUMER)


def test_expiry_still_applies_to_a_verified_token(world: World, decodes: list[str]) -> None:
    token, _ = _token(world)
    world.tokens.verify(token, CONSUMER)
    world.clock.t += timedelta(minutes=5)
    with pytest.raises(Unauthenticated, match="expired"):
        world.tokens.verify(token, CONSUMER)
    with pytest.raises(Unauthenticated, match="expired"):
        world.tokens.verify(token, CONSUMER)


def test_certificate_binding_still_applies_to_a_verified_token(world: World) -> None:
    token, _ = _token(world)
    world.tokens.verify(token, CONSUMER)
    thief = Caller(CONSUMER.principal, "T" * 43, "r9")
    with pytest.raises(Unauthenticated, match="another client certificate"):
        world.tokens.verify(token, thief)


def test_a_withdrawn_grant_still_stops_a_verified_token(world: World) -> None:
    from broker.domain import AuditOperation
    from broker.services.audit import AuditDraft

    token, _ = _token(world)
    draft = AuditDraft(caller=CONSUMER, operation=AuditOperation.DECRYPT)
    key = world.store.get_key("k")
    world.tokens.authorize(draft, token, "k", key.primary_version, {"d": "x"})
    world.keys.update_policy(ADMIN, "k", KeyPolicy(()))
    with pytest.raises(PermissionDenied):
        world.tokens.authorize(draft, token, "k", key.primary_version, {"d": "x"})


def test_the_cache_is_bounded_and_forgets_the_least_recently_used(world: World) -> None:
    world.keys.create(ADMIN, "k", "", POLICY, None, "")
    cache = VerifiedTokenCache(max_entries=2)
    now = world.clock.now()
    claims = [world.tokens.issue(CONSUMER, "k", {"d": "x"}, "why", None)[1] for _ in range(3)]
    for i, c in enumerate(claims):
        cache.put(bytes([i]) * 32, c)
        if i == 1:
            assert cache.get(bytes([0]) * 32, now) is claims[0]  # 0 is now the most recent
    assert len(cache) == 2
    assert cache.get(bytes([1]) * 32, now) is None
    assert cache.get(bytes([0]) * 32, now) is claims[0]
    assert cache.get(bytes([2]) * 32, now) is claims[2]
    assert cache.get(bytes([2]) * 32, claims[2].expires_at) is None
    assert len(cache) == 1
