"""Access and token rules pinned one by one: grants and their contexts, jurisdiction at use,
issuing for another subject, the token size limit, rate limits, the audit fields of the token
calls and the roles of the audit reads. Each test fails if its rule is weakened (`make mutate`
checks that, docs/testing.md)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from broker.adapters.sqlite_store import SqliteStore
from broker.domain import (
    AuditEvent,
    AuditFilter,
    AuditOperation,
    Caller,
    Grant,
    KeyPolicy,
    Operation,
    Outcome,
    Role,
    TokenClaims,
)
from broker.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from broker.ports import HsmInfo
from broker.services.access import Access, RateLimiter
from broker.services.audit import AuditDraft, AuditLog, AuditReader
from broker.services.crypto import CryptoService
from broker.services.keys import KeyService
from broker.services.signing import AUDIT_PURPOSE, TOKEN_PURPOSE, SigningKeys
from broker.services.token_format import MAX_TOKEN_BYTES, TOKEN_TYPE, encode_payload
from broker.services.tokens import TokenService, TokenSettings
from tests.fakes.hsm import FakeHsm
from tests.unit.test_services import ADMIN, CONSUMER, PRODUCER, FixedClock

AUDITOR = Caller("auditor", "U" * 43, "r4")
#: A second consumer, with a decrypt grant of its own.
OTHER = Caller("other", "O" * 43, "r5")
ISSUER, AUDIENCE = "urn:i", "urn:a"


@dataclass
class Rig:
    """The services over a fake HSM ("local", FR) and a throwaway SQLite store."""

    hsm: FakeHsm
    store: SqliteStore
    clock: FixedClock
    access: Access
    audit: AuditLog
    keys: KeyService
    tokens: TokenService
    crypto: CryptoService
    reader: AuditReader

    def events(self, operation: str = "") -> list[AuditEvent]:
        return list(self.store.events(AuditFilter(operation=operation)))

    def last(self) -> AuditEvent:
        return self.events()[-1]

    def draft(self, caller: Caller = CONSUMER) -> AuditDraft:
        return AuditDraft(caller=caller, operation=AuditOperation.DECRYPT)


def make_rig(tmp: Path, rate: float = 0, burst: int = 2) -> Rig:
    hsm = FakeHsm()
    store = SqliteStore(tmp / "kb.db")
    clock = FixedClock()
    roles = {"admin": frozenset({Role.ADMIN}), "auditor": frozenset({Role.AUDITOR})}
    access = Access(roles, {"local": hsm})
    limiter = RateLimiter(rate, burst)
    signing = SigningKeys(store, {"local": hsm})
    signing.ensure(TOKEN_PURPOSE, "local")
    signing.ensure(AUDIT_PURPOSE, "local")
    audit = AuditLog(store, clock, signing, anchors=hsm)
    keys = KeyService(store, access, audit, clock, "local", limiter)
    tokens = TokenService(
        TokenSettings(issuer=ISSUER, audience=AUDIENCE),
        keys=store,
        revocations=store,
        access=access,
        audit=audit,
        limiter=limiter,
        clock=clock,
        signing=signing,
    )
    crypto = CryptoService(store, access, audit, tokens, limiter)
    reader = AuditReader(audit, access)
    return Rig(hsm, store, clock, access, audit, keys, tokens, crypto, reader)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = make_rig(tmp_path)
    yield r
    r.audit.close()


def decrypt_grant(principal: str, context: dict[str, str] | None = None, **kw: Any) -> Grant:
    return Grant(principal, frozenset({Operation.DECRYPT}), context or {}, **kw)


def with_key(rig: Rig, *grants: Grant, jurisdictions: tuple[str, ...] = ()) -> None:
    policy = KeyPolicy((Grant("producer", frozenset({Operation.ENCRYPT})), *grants), jurisdictions)
    rig.keys.create(ADMIN, "k", "", policy, None, "")


def issue(rig: Rig, caller: Caller, context: dict[str, str], **kw: Any) -> tuple[str, TokenClaims]:
    return rig.tokens.issue(caller, "k", context, "why", None, **kw)


# Grants and their contexts ----------------------------------------------------------------


@pytest.mark.parametrize("context", [{}, {"d": "y"}, {"d": "X"}, {"e": "x"}])
def test_a_context_outside_the_grant_s_context_gets_no_token(
    rig: Rig, context: dict[str, str]
) -> None:
    with_key(rig, decrypt_grant("consumer", {"d": "x"}))
    with pytest.raises(PermissionDenied, match="context does not satisfy"):
        issue(rig, CONSUMER, context)
    event = rig.last()
    assert (event.operation, event.outcome, event.token_id) == ("IssueToken", Outcome.DENIED, "")


def test_a_token_is_refused_once_its_context_leaves_every_grant(rig: Rig) -> None:
    with_key(rig, decrypt_grant("consumer", {"d": "x"}))
    token, _ = issue(rig, CONSUMER, {"d": "x"})
    key = rig.store.get_key("k")
    rig.tokens.authorize(rig.draft(), token, "k", 1, {"d": "x"})
    narrowed = KeyPolicy((decrypt_grant("consumer", {"d": "z"}),))
    rig.store.update_key(key.evolve(policy=narrowed), key.revision)
    with pytest.raises(PermissionDenied, match="context does not satisfy"):
        rig.tokens.authorize(rig.draft(), token, "k", 1, {"d": "x"})


def test_only_the_grant_whose_context_fits_sets_the_lifetime(rig: Rig) -> None:
    with_key(
        rig,
        decrypt_grant("consumer", {"d": "x"}, max_token_ttl=timedelta(minutes=1)),
        decrypt_grant("consumer", {"d": "y"}, max_token_ttl=timedelta(minutes=30)),
    )
    _, claims = rig.tokens.issue(CONSUMER, "k", {"d": "x"}, "why", None)
    assert claims.expires_at - claims.issued_at == timedelta(minutes=1)
    with pytest.raises(PermissionDenied, match="exceeds the grant's maximum of 60s"):
        rig.tokens.issue(CONSUMER, "k", {"d": "x"}, "why", timedelta(minutes=2))
    _, wide = rig.tokens.issue(CONSUMER, "k", {"d": "y"}, "why", timedelta(minutes=30))
    assert wide.expires_at - wide.issued_at == timedelta(minutes=30)


@pytest.mark.parametrize(
    ("value", "allowed"),
    [
        ("cohort-42", True),
        ("cohort-", True),
        ("cohort", False),
        ("cohortX", False),
        ("cohort_1", False),
        ("xcohort-1", False),
        ("", False),
    ],
)
def test_a_wildcard_grant_matches_its_whole_prefix_only(value: str, allowed: bool) -> None:
    grant = decrypt_grant("svc", {"dataset": "cohort-*"})
    assert grant.context_allows({"dataset": value}) is allowed


def test_a_grant_value_without_a_star_matches_exactly() -> None:
    grant = decrypt_grant("svc", {"dataset": "a*b"})
    assert grant.context_allows({"dataset": "a*b"})
    assert not grant.context_allows({"dataset": "a*bc"})
    assert not grant.context_allows({"dataset": "a"})
    assert decrypt_grant("svc").context_allows({})


def test_grants_are_per_principal_and_operation() -> None:
    from broker.domain import KeyPolicy as Policy

    enc = Grant("svc", frozenset({Operation.ENCRYPT}))
    dec = decrypt_grant("svc", {"d": "x"})
    other = decrypt_grant("other")
    policy = Policy((enc, dec, other))
    assert policy.grants_for("svc", Operation.DECRYPT) == [dec]
    assert policy.grants_for("svc", Operation.ENCRYPT) == [enc]
    assert policy.grants_for("svc", Operation.REWRAP) == []
    assert policy.grants_for("nobody", Operation.DECRYPT) == []


def test_a_principal_without_a_grant_gets_no_token(rig: Rig) -> None:
    with_key(rig, decrypt_grant("consumer", {"d": "x"}))
    with pytest.raises(PermissionDenied, match="has no decrypt grant"):
        issue(rig, PRODUCER, {"d": "x"})


# Countries ---------------------------------------------------------------------------------


def test_a_grant_naming_countries_admits_only_their_certificates(rig: Rig) -> None:
    with_key(rig, decrypt_grant("consumer", countries=("DE", "AT")))
    german = Caller("consumer", CONSUMER.cert_thumbprint, "r6", country="DE")
    french = Caller("consumer", CONSUMER.cert_thumbprint, "r7", country="FR")
    issue(rig, german, {})
    with pytest.raises(PermissionDenied) as refused:
        issue(rig, french, {})
    assert refused.value.message == (
        "principal 'consumer''s decrypt grant on key 'k' requires a client certificate from "
        "DE, AT; this certificate names country 'FR'"
    )
    with pytest.raises(PermissionDenied) as unplaced:
        issue(rig, CONSUMER, {})
    assert unplaced.value.message.endswith("; this certificate names no country (C=)")


def test_an_admin_s_token_for_another_subject_meets_the_countries_at_use(rig: Rig) -> None:
    with_key(rig, decrypt_grant("consumer", countries=("DE",)))
    # The subject's certificate is not at hand when the admin issues: no country check then.
    token, claims = rig.tokens.issue(
        ADMIN, "k", {}, "why", None, subject="consumer", subject_thumbprint="C" * 43
    )
    assert (claims.subject, claims.cert_thumbprint) == ("consumer", "C" * 43)
    german = Caller("consumer", "C" * 43, "r6", country="DE")
    french = Caller("consumer", "C" * 43, "r7", country="FR")
    rig.tokens.authorize(rig.draft(german), token, "k", 1, {})
    with pytest.raises(PermissionDenied, match="requires a client certificate from DE"):
        rig.tokens.authorize(rig.draft(french), token, "k", 1, {})


def test_country_matching() -> None:
    anywhere = decrypt_grant("svc")
    assert anywhere.country_allows("") and anywhere.country_allows("US")
    placed = decrypt_grant("svc", countries=("DE",))
    assert placed.country_allows("DE")
    assert not placed.country_allows("FR")
    assert not placed.country_allows("")


# Jurisdiction -------------------------------------------------------------------------------


def test_the_jurisdiction_is_checked_at_use_not_only_at_creation(rig: Rig) -> None:
    with_key(rig, decrypt_grant("consumer", {"d": "x"}), jurisdictions=("FR",))
    _, sealed = rig.crypto.generate_data_key(PRODUCER, "k", {"d": "x"})
    token, _ = issue(rig, CONSUMER, {"d": "x"})
    # The HSM is now declared in another jurisdiction (its operator moved it).
    rig.hsm.info = HsmInfo("local", "US", "fake")
    for call in (
        lambda: rig.crypto.decrypt(CONSUMER, sealed.blob, {"d": "x"}, token),
        lambda: issue(rig, CONSUMER, {"d": "x"}),
        lambda: rig.crypto.generate_data_key(PRODUCER, "k", {"d": "x"}),
        lambda: rig.keys.rotate(ADMIN, "k"),
    ):
        with pytest.raises(PermissionDenied) as refused:
            call()
        assert refused.value.message.startswith(
            "key 'k' may not be held or used in jurisdiction 'US' (HSM 'local')"
        )
    outcomes = [(e.operation, e.outcome) for e in rig.events()[-4:]]
    assert outcomes == [
        ("Decrypt", Outcome.DENIED),
        ("IssueToken", Outcome.DENIED),
        ("GenerateDataKey", Outcome.DENIED),
        ("RotateKey", Outcome.DENIED),
    ]
    # Back in France, the same token decrypts again: nothing was used up by the refusals.
    rig.hsm.info = HsmInfo("local", "FR", "fake")
    assert rig.crypto.decrypt(CONSUMER, sealed.blob, {"d": "x"}, token).key_id == "k"


def test_the_default_jurisdictions_are_the_eu_and_eea() -> None:
    from broker.domain import EU_EEA

    assert KeyPolicy().jurisdictions() == EU_EEA
    assert {"FR", "DE", "NO", "IS", "LI"} <= EU_EEA and "US" not in EU_EEA and "GB" not in EU_EEA
    assert KeyPolicy((), ("US",)).jurisdictions() == frozenset({"US"})


def test_an_hsm_outside_the_key_s_jurisdictions_is_named(rig: Rig) -> None:
    with pytest.raises(PermissionDenied) as refused:
        Access.require_jurisdiction(frozenset({"DE", "AT"}), rig.hsm, "k")
    assert refused.value.message == (
        "key 'k' may not be held or used in jurisdiction 'FR' (HSM 'local'); the key's "
        "policy allows AT, DE"
    )
    Access.require_jurisdiction(frozenset({"FR"}), rig.hsm, "k")


def test_a_key_on_an_unconfigured_hsm_is_unavailable(rig: Rig) -> None:
    with_key(rig, decrypt_grant("consumer"))
    key = rig.store.get_key("k").evolve(hsm="elsewhere")
    with pytest.raises(Unavailable, match="HSM 'elsewhere'"):
        rig.access.hsm_for(key)
    assert rig.access.hsm_info("elsewhere") is None
    assert rig.access.hsm_info("local") == rig.hsm.info
    assert rig.access.hsm_named("local") is rig.hsm
    with pytest.raises(NotFound, match=r"known: \['local'\]"):
        rig.access.hsm_named("elsewhere")


# Issuing for another subject ---------------------------------------------------------------


def test_only_an_admin_issues_a_token_for_another_subject(rig: Rig) -> None:
    # The subject holds a grant, so only the role check can refuse the consumer.
    with_key(rig, decrypt_grant("consumer"), decrypt_grant("other"))
    for subject, thumbprint in (("other", OTHER.cert_thumbprint), ("consumer", "Z" * 43)):
        with pytest.raises(PermissionDenied, match="does not have the admin role"):
            rig.tokens.issue(
                CONSUMER, "k", {}, "why", None, subject=subject, subject_thumbprint=thumbprint
            )
    assert rig.last().outcome is Outcome.DENIED
    token, claims = rig.tokens.issue(
        ADMIN, "k", {}, "why", None, subject="other", subject_thumbprint=OTHER.cert_thumbprint
    )
    assert (claims.subject, claims.cert_thumbprint) == ("other", OTHER.cert_thumbprint)
    assert rig.tokens.verify(token, OTHER).token_id == claims.token_id
    with pytest.raises(Unauthenticated):
        rig.tokens.verify(token, ADMIN)


@pytest.mark.parametrize(
    ("subject", "thumbprint"),
    [
        ("other", ""),
        ("", "O" * 43),
        ("other", "O" * 42),
        ("other", "O" * 44),
        ("other", "O+" * 21 + "O"),
    ],
)
def test_issuing_for_another_subject_needs_a_subject_and_a_thumbprint(
    rig: Rig, subject: str, thumbprint: str
) -> None:
    with_key(rig, decrypt_grant("other"))
    with pytest.raises(InvalidArgument, match="subject_cert_thumbprint"):
        rig.tokens.issue(
            ADMIN, "k", {}, "why", None, subject=subject, subject_thumbprint=thumbprint
        )


def test_a_token_is_for_its_caller_by_default(rig: Rig) -> None:
    with_key(rig, decrypt_grant("consumer"))
    _, claims = issue(rig, CONSUMER, {})
    assert (claims.subject, claims.cert_thumbprint) == ("consumer", CONSUMER.cert_thumbprint)
    assert rig.store.issued_subject(claims.token_id) == "consumer"


# Token requests ------------------------------------------------------------------------------


@pytest.mark.parametrize("justification", ["", "   ", "j" * 1025])
def test_a_token_needs_a_short_justification(rig: Rig, justification: str) -> None:
    with_key(rig, decrypt_grant("consumer"))
    with pytest.raises(InvalidArgument, match="justification"):
        rig.tokens.issue(CONSUMER, "k", {}, justification, None)


def test_the_justification_is_kept_stripped_and_up_to_its_limit(rig: Rig) -> None:
    with_key(rig, decrypt_grant("consumer"))
    _, claims = rig.tokens.issue(CONSUMER, "k", {}, "  why  ", None)
    assert claims.justification == "why"
    _, longest = rig.tokens.issue(CONSUMER, "k", {}, "j" * 1024, None)
    assert longest.justification == "j" * 1024


@pytest.mark.parametrize(
    "ttl", [timedelta(0), timedelta(seconds=-1), timedelta(hours=1, seconds=1)]
)
def test_a_ttl_outside_the_bounds_is_refused(rig: Rig, ttl: timedelta) -> None:
    with_key(rig, decrypt_grant("consumer"))
    with pytest.raises(InvalidArgument, match="ttl must be between 1 second and 1 hour"):
        rig.tokens.issue(CONSUMER, "k", {}, "why", ttl)


def test_ttl_bounds_name_the_configured_maximum(tmp_path: Path) -> None:
    r = make_rig(tmp_path)
    try:
        with_key(r, decrypt_grant("consumer"))
        for max_ttl, text in (
            (timedelta(minutes=30), "30 minutes"),
            (timedelta(seconds=90), "90 seconds"),
            (timedelta(hours=1), "1 hour"),
            (timedelta(minutes=1), "1 minute"),
            (timedelta(seconds=1), "1 second"),
        ):
            r.tokens._settings = TokenSettings(
                issuer=ISSUER, audience=AUDIENCE, max_ttl=max_ttl, default_ttl=max_ttl
            )
            with pytest.raises(InvalidArgument, match=f"and {text}$"):
                r.tokens.issue(CONSUMER, "k", {}, "why", max_ttl + timedelta(seconds=1))
            _, claims = r.tokens.issue(CONSUMER, "k", {}, "why", max_ttl)
            assert claims.expires_at - claims.issued_at == max_ttl
    finally:
        r.audit.close()


def test_the_lifetime_is_the_default_capped_by_the_grant(rig: Rig) -> None:
    with_key(
        rig,
        decrypt_grant("consumer", {"d": "x"}, max_token_ttl=timedelta(minutes=2)),
        decrypt_grant("consumer", {"d": "y"}),
    )
    _, capped = issue(rig, CONSUMER, {"d": "x"})
    assert capped.expires_at - capped.issued_at == timedelta(minutes=2)
    _, default = issue(rig, CONSUMER, {"d": "y"})
    assert default.expires_at - default.issued_at == timedelta(minutes=5)
    _, longest = rig.tokens.issue(CONSUMER, "k", {"d": "y"}, "why", timedelta(hours=1))
    assert longest.expires_at - longest.issued_at == timedelta(hours=1)
    _, exact = rig.tokens.issue(CONSUMER, "k", {"d": "x"}, "why", timedelta(minutes=2))
    assert exact.expires_at - exact.issued_at == timedelta(minutes=2)


def test_token_times_are_whole_seconds_of_the_clock(rig: Rig) -> None:
    with_key(rig, decrypt_grant("consumer"))
    rig.clock.t = datetime(2026, 11, 30, 12, 0, 0, 999_999, tzinfo=UTC)
    _, claims = issue(rig, CONSUMER, {})
    start = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
    assert (claims.issued_at, claims.not_before) == (start, start)
    assert claims.expires_at == start + timedelta(minutes=5)
    assert claims.operations == frozenset({Operation.DECRYPT})
    assert (claims.key_id, claims.context, claims.max_uses) == ("k", {}, 0)


@pytest.mark.parametrize("max_uses", [-1, 10_001])
def test_a_use_limit_outside_the_bounds_is_refused(rig: Rig, max_uses: int) -> None:
    with_key(rig, decrypt_grant("consumer"))
    with pytest.raises(InvalidArgument, match="max_uses must be between 0"):
        issue(rig, CONSUMER, {}, max_uses=max_uses)


def test_the_use_limits_at_the_bounds_are_issued(rig: Rig) -> None:
    with_key(rig, decrypt_grant("consumer"))
    assert issue(rig, CONSUMER, {}, max_uses=10_000)[1].max_uses == 10_000
    assert issue(rig, CONSUMER, {}, max_uses=0)[1].max_uses == 0


def test_a_token_for_a_disabled_key_or_a_bad_key_id_is_refused(rig: Rig) -> None:
    with_key(rig, decrypt_grant("consumer"))
    with pytest.raises(InvalidArgument, match="key_id"):
        rig.tokens.issue(CONSUMER, "K!", {}, "why", None)
    # No key of that id: refused like a key without the caller's grant (no existence oracle).
    with pytest.raises(PermissionDenied) as missing:
        rig.tokens.issue(CONSUMER, "nokey", {}, "why", None)
    assert missing.value.message.startswith(
        "principal 'consumer' has no decrypt grant on key 'nokey' (or there is no such key); "
        "ask an admin to check the key id and the key's policy"
    )
    assert rig.last().reason.startswith("no key 'nokey' exists")
    with pytest.raises(PermissionDenied) as ungranted:
        rig.tokens.issue(PRODUCER, "k", {}, "why", None)
    assert ungranted.value.message == missing.value.message.replace("consumer", "producer").replace(
        "nokey", "k"
    )
    assert rig.last().reason == "principal 'producer' has no decrypt grant on key 'k'"
    with pytest.raises(NotFound, match="key 'nokey' not found"):
        rig.tokens.issue(ADMIN, "nokey", {}, "why", None)
    with pytest.raises(InvalidArgument, match="context"):
        rig.tokens.issue(CONSUMER, "k", {"": "x"}, "why", None)
    rig.keys.set_enabled(ADMIN, "k", False)
    with pytest.raises(FailedPrecondition, match="an admin must enable it first"):
        issue(rig, CONSUMER, {})


# Token size --------------------------------------------------------------------------------


def signed(rig: Rig, justification: str) -> str:
    """A token of this broker, signed by its key, with `justification` as long as wanted."""
    now = rig.clock.now()
    claims = TokenClaims(
        token_id="t-1",
        subject="consumer",
        key_id="k",
        operations=frozenset({Operation.DECRYPT}),
        context={},
        justification=justification,
        issued_at=now,
        not_before=now,
        expires_at=now + timedelta(minutes=5),
        cert_thumbprint=CONSUMER.cert_thumbprint,
        max_uses=3,
    )
    payload = encode_payload(claims, ISSUER, AUDIENCE)
    return rig.tokens._signing.sign_jws(TOKEN_PURPOSE, payload, {"typ": TOKEN_TYPE})


def sized(rig: Rig, length: int) -> str:
    """A well-formed, correctly signed token of exactly `length` characters."""
    for pad in range(length):
        token = signed(rig, "j" * pad)
        if len(token) == length:
            return token
        if len(token) > length:
            break
    raise AssertionError(f"no token of {length} characters")  # base64 steps are 4 wide


def test_a_well_formed_token_over_the_size_limit_is_refused(rig: Rig) -> None:
    at_limit = sized(rig, MAX_TOKEN_BYTES)
    over = sized(rig, MAX_TOKEN_BYTES + 4)
    assert rig.tokens.verify(at_limit, CONSUMER).token_id == "t-1"
    digests: list[str] = []
    real_get = rig.tokens._verified.get

    def spying_get(digest: bytes, now: datetime) -> Any:
        digests.append(over)
        return real_get(digest, now)

    rig.tokens._verified.get = spying_get  # type: ignore[method-assign]
    with pytest.raises(Unauthenticated, match="token is invalid"):
        rig.tokens.verify(over, CONSUMER)
    # Refused on its length alone, before it is hashed for the cache.
    assert digests == []
    assert rig.tokens.counts_uses(at_limit) is True
    assert rig.tokens.counts_uses(over) is False
    assert rig.tokens.counts_uses("") is False


def test_a_token_that_would_exceed_the_size_limit_is_not_issued(rig: Rig) -> None:
    with_key(rig, decrypt_grant("consumer"))
    context = {f"{i:02d}" + "k" * 62: "v" * 256 for i in range(16)}
    with pytest.raises(InvalidArgument, match=f"longer than {MAX_TOKEN_BYTES} bytes"):
        rig.tokens.issue(CONSUMER, "k", context, "j" * 1024, None)
    event = rig.last()
    assert (event.operation, event.outcome, event.token_id) == ("IssueToken", Outcome.DENIED, "")
    # Nothing was recorded as issued: no token of that request exists anywhere.
    _, small = rig.tokens.issue(CONSUMER, "k", {"a": "b"}, "why", None)
    assert rig.store.issued_subject(small.token_id) == "consumer"


def test_counts_uses_reads_verified_claims_first(rig: Rig) -> None:
    with_key(rig, decrypt_grant("consumer"))
    limited, _ = issue(rig, CONSUMER, {}, max_uses=2)
    unlimited, _ = issue(rig, CONSUMER, {})
    assert rig.tokens.counts_uses(limited) is True
    assert rig.tokens.counts_uses(unlimited) is False
    rig.tokens.verify(limited, CONSUMER)
    rig.tokens.verify(unlimited, CONSUMER)
    assert rig.tokens.counts_uses(limited) is True
    assert rig.tokens.counts_uses(unlimited) is False
    assert rig.tokens.counts_uses("not.a.token") is False


# Token checks at use -------------------------------------------------------------------------


def test_a_token_is_for_its_key_and_context_only(rig: Rig) -> None:
    with_key(rig, decrypt_grant("consumer", {"d": "x"}))
    token, _ = issue(rig, CONSUMER, {"d": "x"})
    with pytest.raises(PermissionDenied, match="another key, not 'j'"):
        rig.tokens.authorize(rig.draft(), token, "j", 1, {"d": "x"})
    with pytest.raises(PermissionDenied, match="does not carry the token's entry 'd'"):
        rig.tokens.authorize(rig.draft(), token, "k", 1, {})
    with pytest.raises(PermissionDenied, match="the token requires context d='x'"):
        rig.tokens.authorize(rig.draft(), token, "k", 1, {"d": "y"})
    draft = rig.draft()
    use = rig.tokens.authorize(draft, token, "k", 1, {"d": "x", "extra": "1"})
    assert (use.hsm, use.hsm_label) == (rig.hsm, rig.store.get_key("k").primary().hsm_label)
    assert draft.justification == "why" and draft.token_id == use.claims.token_id


def test_a_revoked_token_is_refused_at_use(rig: Rig) -> None:
    with_key(rig, decrypt_grant("consumer"))
    token, claims = issue(rig, CONSUMER, {})
    rig.tokens.revoke(CONSUMER, claims.token_id)
    draft = rig.draft()
    with pytest.raises(Unauthenticated, match="revoked"):
        rig.tokens.authorize(draft, token, "k", 1, {})
    assert draft.token_id == ""


def test_a_token_for_a_key_gone_from_the_store_is_refused(rig: Rig) -> None:
    with_key(rig, decrypt_grant("consumer"))
    token, _ = issue(rig, CONSUMER, {})
    key = rig.store.get_key("k")
    rig.store.create_key(key.evolve(key_id="j"))
    token_j, _ = rig.tokens.issue(CONSUMER, "j", {}, "why", None)
    real = rig.store.revoked_and_key
    # The key is deleted between issue and use (the store answers: not revoked, no key).
    rig.store.revoked_and_key = lambda token_id, key_id: (  # type: ignore[method-assign]
        (False, None) if key_id == "j" else real(token_id, key_id)
    )
    with pytest.raises(
        PermissionDenied, match="principal 'consumer' has no decrypt grant on key 'j'"
    ):
        rig.tokens.authorize(rig.draft(), token_j, "j", 1, {})
    rig.tokens.authorize(rig.draft(), token, "k", 1, {})


def test_a_use_limit_counts_allowed_uses_only(rig: Rig) -> None:
    with_key(rig, decrypt_grant("consumer"))
    token, _ = issue(rig, CONSUMER, {}, max_uses=2)
    rig.tokens.authorize(rig.draft(), token, "k", 1, {})
    with pytest.raises(NotFound):
        rig.tokens.authorize(rig.draft(), token, "k", 9, {})
    rig.tokens.authorize(rig.draft(), token, "k", 1, {})
    with pytest.raises(ResourceExhausted, match="used its 2 allowed time"):
        rig.tokens.authorize(rig.draft(), token, "k", 1, {})


def test_token_times_are_checked_with_the_leeway_on_iat_and_nbf_only(rig: Rig) -> None:
    with_key(rig, decrypt_grant("consumer"))
    token, claims = issue(rig, CONSUMER, {})
    # Another replica's clock runs behind by the leeway: still valid, one second more is not.
    rig.clock.t = claims.issued_at - timedelta(seconds=5)
    rig.tokens.verify(token, CONSUMER)
    rig.clock.t = claims.issued_at - timedelta(seconds=6)
    with pytest.raises(Unauthenticated, match="not valid yet"):
        rig.tokens.verify(token, CONSUMER)
    rig.clock.t = claims.expires_at - timedelta(microseconds=1)
    rig.tokens.verify(token, CONSUMER)
    rig.clock.t = claims.expires_at
    with pytest.raises(Unauthenticated, match="expired"):
        rig.tokens.verify(token, CONSUMER)


def test_a_signed_token_longer_than_the_maximum_lifetime_is_refused(rig: Rig) -> None:
    now = rig.clock.now()
    for lifetime, ok in ((timedelta(hours=1), True), (timedelta(hours=1, seconds=1), False)):
        claims = TokenClaims(
            token_id=f"t-{ok}",
            subject="consumer",
            key_id="k",
            operations=frozenset({Operation.DECRYPT}),
            context={},
            justification="why",
            issued_at=now,
            not_before=now,
            expires_at=now + lifetime,
            cert_thumbprint=CONSUMER.cert_thumbprint,
        )
        token = rig.tokens._sign(claims)
        if ok:
            assert rig.tokens.verify(token, CONSUMER).expires_at == now + lifetime
        else:
            with pytest.raises(Unauthenticated, match="token is invalid"):
                rig.tokens.verify(token, CONSUMER)


def test_a_token_is_bound_to_its_subject_and_certificate(rig: Rig) -> None:
    with_key(rig, decrypt_grant("consumer"))
    token, _ = issue(rig, CONSUMER, {})
    for caller in (
        Caller("consumer", "X" * 43, "r8"),
        Caller("other", CONSUMER.cert_thumbprint, "r8"),
    ):
        with pytest.raises(Unauthenticated, match="another client certificate"):
            rig.tokens.verify(token, caller)


def test_a_token_of_another_issuer_or_audience_is_refused(rig: Rig) -> None:
    with_key(rig, decrypt_grant("consumer"))
    token, claims = issue(rig, CONSUMER, {})
    for issuer, audience in ((ISSUER + "x", AUDIENCE), (ISSUER, AUDIENCE + "x")):
        payload = encode_payload(claims, issuer, audience)
        forged = rig.tokens._signing.sign_jws(TOKEN_PURPOSE, payload, {"typ": TOKEN_TYPE})
        with pytest.raises(Unauthenticated, match="token is invalid"):
            rig.tokens.verify(forged, CONSUMER)
    audit_signed = rig.tokens._signing.sign_jws(
        AUDIT_PURPOSE, encode_payload(claims, ISSUER, AUDIENCE), {"typ": TOKEN_TYPE}
    )
    with pytest.raises(Unauthenticated, match="token is invalid"):
        rig.tokens.verify(audit_signed, CONSUMER)
    assert rig.tokens.verify(token, CONSUMER).token_id == claims.token_id
    assert {k["keybroker_purpose"] for k in rig.tokens.jwks()["keys"]} == {
        TOKEN_PURPOSE,
        AUDIT_PURPOSE,
    }


# RevokeToken ---------------------------------------------------------------------------------


def test_who_may_revoke_a_token(rig: Rig) -> None:
    with_key(rig, decrypt_grant("consumer"), decrypt_grant("other"))
    _, mine = issue(rig, CONSUMER, {})
    _, theirs = issue(rig, OTHER, {})
    with pytest.raises(PermissionDenied, match="only an admin or the token's subject"):
        rig.tokens.revoke(CONSUMER, theirs.token_id)
    # A non-admin learns nothing of ids that are not theirs: the same refusal for none.
    with pytest.raises(PermissionDenied, match="only an admin or the token's subject"):
        rig.tokens.revoke(CONSUMER, "no-such-token")
    with pytest.raises(NotFound, match="no token with id 'no-such-token'"):
        rig.tokens.revoke(ADMIN, "no-such-token")
    assert not rig.store.is_revoked(theirs.token_id)
    rig.tokens.revoke(CONSUMER, mine.token_id)
    rig.tokens.revoke(ADMIN, theirs.token_id)
    assert rig.store.is_revoked(mine.token_id) and rig.store.is_revoked(theirs.token_id)


@pytest.mark.parametrize("token_id", ["", "t" * 65])
def test_a_revocation_needs_a_token_id(rig: Rig, token_id: str) -> None:
    with pytest.raises(InvalidArgument, match="token_id is required"):
        rig.tokens.revoke(ADMIN, token_id)


def test_a_revocation_is_kept_as_long_as_any_token_can_be_valid(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    with_key(rig, decrypt_grant("consumer"))
    _, claims = issue(rig, CONSUMER, {})
    kept: list[tuple[str, str, datetime]] = []
    monkeypatch.setattr(rig.store, "revoke", lambda *args: kept.append(args))
    rig.tokens.revoke(ADMIN, claims.token_id)
    # The longest lifetime, and the leeway of a replica whose clock runs ahead.
    assert kept == [(claims.token_id, "consumer", rig.clock.now() + timedelta(hours=1, seconds=5))]
    with pytest.raises(NotFound):
        rig.tokens.revoke(ADMIN, "t" * 64)


# Rate limits -----------------------------------------------------------------------------------


def test_issue_token_is_rate_limited_and_the_refusal_audited(tmp_path: Path) -> None:
    r = make_rig(tmp_path, rate=0.0001, burst=3)
    try:
        # Creating the key spends the admin's budget, not the consumer's.
        with_key(r, decrypt_grant("consumer"), decrypt_grant("other"))
        for _ in range(3):
            issue(r, CONSUMER, {})
        with pytest.raises(ResourceExhausted, match="rate limit"):
            issue(r, CONSUMER, {})
        event = r.last()
        assert (event.operation, event.principal, event.outcome) == (
            "IssueToken",
            "consumer",
            Outcome.DENIED,
        )
        assert len(r.events("IssueToken")) == 4
        issue(r, OTHER, {})  # another principal has a budget of its own
    finally:
        r.audit.close()


def test_revoke_token_is_rate_limited_and_the_refusal_audited(tmp_path: Path) -> None:
    r = make_rig(tmp_path, rate=0.0001, burst=3)
    try:
        with_key(r, decrypt_grant("consumer"))
        _, claims = issue(r, CONSUMER, {})
        r.tokens.revoke(CONSUMER, claims.token_id)
        r.tokens.revoke(CONSUMER, claims.token_id)  # revoking twice is no error
        with pytest.raises(ResourceExhausted, match="rate limit"):
            r.tokens.revoke(CONSUMER, claims.token_id)
        event = r.last()
        assert (event.operation, event.token_id, event.outcome) == (
            "RevokeToken",
            claims.token_id,
            Outcome.DENIED,
        )
    finally:
        r.audit.close()


# Audit fields ----------------------------------------------------------------------------------


def test_the_audit_event_of_issue_token(rig: Rig) -> None:
    with_key(rig, decrypt_grant("consumer", {"d": "x"}))
    _, claims = rig.tokens.issue(CONSUMER, "k", {"d": "x", "site": "lyon"}, "audit 42", None)
    event = rig.last()
    assert (
        event.operation,
        event.principal,
        event.request_id,
        event.key_id,
        event.key_version,
        event.token_id,
        dict(event.context),
        event.justification,
        event.outcome,
        event.reason,
    ) == (
        "IssueToken",
        "consumer",
        "r3",
        "k",
        0,
        claims.token_id,
        {"d": "x", "site": "lyon"},
        "audit 42",
        Outcome.ALLOWED,
        "",
    )
    with pytest.raises(PermissionDenied):
        rig.tokens.issue(CONSUMER, "k", {"d": "y"}, "audit 43", None)
    denied = rig.last()
    assert (denied.key_id, dict(denied.context), denied.justification, denied.token_id) == (
        "k",
        {"d": "y"},
        "audit 43",
        "",
    )
    assert denied.reason.startswith("the context does not satisfy")


def test_the_audit_event_of_revoke_token(rig: Rig) -> None:
    with_key(rig, decrypt_grant("consumer"))
    _, claims = issue(rig, CONSUMER, {})
    rig.tokens.revoke(CONSUMER, claims.token_id)
    event = rig.last()
    assert (
        event.operation,
        event.principal,
        event.request_id,
        event.token_id,
        event.key_id,
        dict(event.context),
        event.justification,
        event.outcome,
    ) == ("RevokeToken", "consumer", "r3", claims.token_id, "", {}, "", Outcome.ALLOWED)
    with pytest.raises(NotFound):
        rig.tokens.revoke(ADMIN, "t-404")
    denied = rig.last()
    assert (denied.principal, denied.token_id, denied.outcome) == ("admin", "t-404", Outcome.DENIED)


# Audit reads --------------------------------------------------------------------------------


def test_verify_audit_log_needs_the_auditor_or_admin_role(rig: Rig) -> None:
    for caller in (CONSUMER, PRODUCER):
        with pytest.raises(PermissionDenied, match="needs the admin or auditor role"):
            rig.reader.verify(caller)
    assert rig.reader.verify(AUDITOR).ok
    assert rig.reader.verify(ADMIN).ok
    outcomes = [(e.principal, e.outcome) for e in rig.events("VerifyAuditLog")]
    assert outcomes == [
        ("consumer", Outcome.DENIED),
        ("producer", Outcome.DENIED),
        ("auditor", Outcome.ALLOWED),
        ("admin", Outcome.ALLOWED),
    ]


def test_listing_and_exporting_the_audit_log_need_the_role_too(rig: Rig) -> None:
    with pytest.raises(PermissionDenied):
        rig.reader.list(CONSUMER, AuditFilter())
    with pytest.raises(PermissionDenied):
        rig.reader.export(CONSUMER, 0)
    listed = list(rig.reader.list(AUDITOR, AuditFilter()))
    assert [(e.principal, e.operation, e.outcome) for e in listed] == [
        ("consumer", "ListAuditEvents", Outcome.DENIED),
        ("consumer", "ExportAuditLog", Outcome.DENIED),
        ("auditor", "ListAuditEvents", Outcome.ALLOWED),
    ]
    lines = list(rig.reader.export(AUDITOR, 0))
    assert lines and all(isinstance(line, bytes) for line in lines)
    assert rig.last().operation == "ExportAuditLog" and rig.last().outcome is Outcome.ALLOWED


def test_audit_reads_refuse_impossible_ranges(rig: Rig) -> None:
    now = rig.clock.now()
    with pytest.raises(InvalidArgument, match="start_time is after end_time"):
        rig.reader.list(AUDITOR, AuditFilter(start_time=now, end_time=now - timedelta(seconds=1)))
    rig.reader.list(AUDITOR, AuditFilter(start_time=now, end_time=now))
    for after in (2**63 - 1, 2**63):
        with pytest.raises(InvalidArgument, match="after_sequence must be below"):
            rig.reader.list(AUDITOR, AuditFilter(after_sequence=after))
        with pytest.raises(InvalidArgument, match="after_sequence must be below"):
            rig.reader.export(AUDITOR, after)
    assert list(rig.reader.list(AUDITOR, AuditFilter(after_sequence=2**63 - 2))) == []
    list(rig.reader.export(AUDITOR, 2**63 - 2))


# Token settings, observer, cache ------------------------------------------------------------


@pytest.mark.parametrize(
    "changes",
    [
        {"max_ttl": timedelta(seconds=1), "default_ttl": timedelta(seconds=1)},
        {"max_ttl": timedelta(hours=1), "default_ttl": timedelta(hours=1)},
        {"leeway": timedelta(0)},
        {"leeway": timedelta(seconds=5)},
        {"max_uses": 0},
        {"max_uses": 10_000},
    ],
)
def test_token_settings_at_the_contract_s_bounds(changes: dict[str, Any]) -> None:
    settings = TokenSettings(issuer=ISSUER, audience=AUDIENCE, **changes)
    assert all(getattr(settings, name) == value for name, value in changes.items())


@pytest.mark.parametrize(
    "changes",
    [
        {"audience": ""},
        {"max_ttl": timedelta(milliseconds=999), "default_ttl": timedelta(milliseconds=999)},
        {"default_ttl": timedelta(milliseconds=999)},
        {"default_ttl": timedelta(minutes=2), "max_ttl": timedelta(minutes=1)},
        {"leeway": timedelta(microseconds=-1)},
        {"max_uses": -1},
    ],
)
def test_token_settings_beyond_the_bounds(changes: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        TokenSettings(**{"issuer": ISSUER, "audience": AUDIENCE, **changes})


class Observer:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def issued(self) -> None:
        self.seen.append(("issued", ""))

    def refused(self, stage: str, error: Exception) -> None:
        self.seen.append((stage, type(error).__name__))


def test_the_observer_hears_of_issued_and_refused_tokens(rig: Rig) -> None:
    observer = Observer()
    rig.tokens._observer = observer
    with_key(rig, decrypt_grant("consumer", {"d": "x"}))
    token, _ = issue(rig, CONSUMER, {"d": "x"})
    with pytest.raises(PermissionDenied):
        issue(rig, CONSUMER, {"d": "y"})
    rig.tokens.authorize(rig.draft(), token, "k", 1, {"d": "x"})
    with pytest.raises(PermissionDenied):
        rig.tokens.authorize(rig.draft(), token, "k", 1, {"d": "y"})
    assert observer.seen == [
        ("issued", ""),
        ("issue", "PermissionDenied"),
        ("use", "PermissionDenied"),
    ]


def test_an_observer_is_passed_at_construction(tmp_path: Path) -> None:
    from broker.services.token_cache import VerifiedTokenCache

    r = make_rig(tmp_path)
    try:
        observer, cache = Observer(), VerifiedTokenCache()
        tokens = TokenService(
            TokenSettings(issuer=ISSUER, audience=AUDIENCE),
            keys=r.store,
            revocations=r.store,
            access=r.access,
            audit=r.audit,
            limiter=RateLimiter(0, 1),
            clock=r.clock,
            signing=r.tokens._signing,
            verified=cache,
            observer=observer,
        )
        with_key(r, decrypt_grant("consumer"))
        token, _ = tokens.issue(CONSUMER, "k", {}, "why", None)
        assert observer.seen == [("issued", "")]
        assert len(cache) == 0
        tokens.verify(token, CONSUMER)
        assert len(cache) == 1  # the cache given is the one used
    finally:
        r.audit.close()


def test_each_token_is_verified_as_itself(rig: Rig) -> None:
    with_key(rig, decrypt_grant("consumer"), decrypt_grant("other"))
    first, one = issue(rig, CONSUMER, {})
    second, two = issue(rig, CONSUMER, {})
    assert rig.tokens.verify(first, CONSUMER).token_id == one.token_id
    assert rig.tokens.verify(second, CONSUMER).token_id == two.token_id
    theirs, _ = issue(rig, OTHER, {})
    with pytest.raises(Unauthenticated, match="another client certificate"):
        rig.tokens.verify(theirs, CONSUMER)


def claims_at(rig: Rig, **times: datetime) -> TokenClaims:
    now = rig.clock.now()
    base = {"issued_at": now, "not_before": now, "expires_at": now + timedelta(minutes=5)}
    return TokenClaims(
        token_id="t-times",
        subject="consumer",
        key_id="k",
        operations=frozenset({Operation.DECRYPT}),
        context={},
        justification="why",
        cert_thumbprint=CONSUMER.cert_thumbprint,
        **{**base, **times},
    )


def test_not_before_and_issued_at_are_each_checked(rig: Rig) -> None:
    later = rig.clock.now() + timedelta(seconds=6)
    for field in ("not_before", "issued_at"):
        token = rig.tokens._sign(claims_at(rig, **{field: later}))
        with pytest.raises(Unauthenticated, match="not valid yet"):
            rig.tokens.verify(token, CONSUMER)
    edge = rig.clock.now() + timedelta(seconds=5)
    token = rig.tokens._sign(claims_at(rig, not_before=edge, issued_at=edge))
    assert rig.tokens.verify(token, CONSUMER).not_before == edge


def test_time_is_the_injected_clock_s_not_the_machine_s(rig: Rig) -> None:
    # Far ahead of the machine's clock: a library check against the real time would refuse.
    rig.clock.t = datetime(2099, 1, 1, tzinfo=UTC)
    with_key(rig, decrypt_grant("consumer"))
    token, claims = issue(rig, CONSUMER, {})
    assert rig.tokens.verify(token, CONSUMER).issued_at == datetime(2099, 1, 1, tzinfo=UTC)
    assert claims.not_before == datetime(2099, 1, 1, tzinfo=UTC)


def test_a_token_naming_a_list_of_audiences_is_refused(rig: Rig) -> None:
    import json

    claims = claims_at(rig)
    payload = json.loads(encode_payload(claims, ISSUER, AUDIENCE))
    payload["aud"] = [AUDIENCE]
    token = rig.tokens._signing.sign_jws(
        TOKEN_PURPOSE, json.dumps(payload).encode(), {"typ": TOKEN_TYPE}
    )
    with pytest.raises(Unauthenticated, match="token is invalid"):
        rig.tokens.verify(token, CONSUMER)


@pytest.mark.parametrize(
    "missing", ["iss", "sub", "aud", "iat", "nbf", "exp", "jti", "scope", "cnf"]
)
def test_a_token_missing_a_required_claim_is_refused(rig: Rig, missing: str) -> None:
    import json

    payload = json.loads(encode_payload(claims_at(rig), ISSUER, AUDIENCE))
    del payload[missing]
    token = rig.tokens._signing.sign_jws(
        TOKEN_PURPOSE, json.dumps(payload).encode(), {"typ": TOKEN_TYPE}
    )
    with pytest.raises(Unauthenticated, match="token is invalid"):
        rig.tokens.verify(token, CONSUMER)


# Key states and rate limiter ----------------------------------------------------------------


def test_a_key_that_cannot_be_used_says_why(rig: Rig) -> None:
    from broker.domain import KeyState

    with_key(rig, decrypt_grant("consumer"))
    key = rig.store.get_key("k")
    Access.require_usable(key)
    expected = {
        KeyState.DISABLED: "key 'k' is disabled; an admin must enable it first",
        KeyState.PENDING_DESTRUCTION: "key 'k' is pending destruction",
        KeyState.DESTROYED: (
            "key 'k' is destroyed: its HSM objects no longer exist, so nothing under it can "
            "be decrypted"
        ),
    }
    for state, message in expected.items():
        with pytest.raises(FailedPrecondition) as refused:
            Access.require_usable(key.evolve(state=state))
        assert refused.value.message == message


def test_a_version_below_the_minimum_or_unknown_does_not_decrypt(rig: Rig) -> None:
    with_key(rig, decrypt_grant("consumer"))
    rig.keys.rotate(ADMIN, "k")
    key = rig.store.get_key("k")
    assert rig.access.decrypting_version(key, 1) == (rig.hsm, key.version(1).hsm_label)  # type: ignore[union-attr]
    with pytest.raises(FailedPrecondition, match="retired"):
        rig.access.decrypting_version(key.evolve(min_decryption_version=2), 1)
    assert rig.access.decrypting_version(key.evolve(min_decryption_version=2), 2)[0] is rig.hsm
    with pytest.raises(NotFound, match="has no version 3"):
        rig.access.decrypting_version(key, 3)


class FrozenTime:
    """`time.monotonic` for the rate limiter, moved by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def frozen(monkeypatch: pytest.MonkeyPatch) -> FrozenTime:
    import broker.services.access as access_module

    clock = FrozenTime()
    monkeypatch.setattr(access_module, "time", clock)
    return clock


def test_the_rate_limiter_allows_exactly_the_burst_then_refills(frozen: FrozenTime) -> None:
    limiter = RateLimiter(2.0, 3)
    for _ in range(3):
        limiter.check("a")
    for _ in range(2):  # refused again and again, without refilling anything
        with pytest.raises(ResourceExhausted, match="rate limit of 2 requests per second"):
            limiter.check("a")
    frozen.now += 0.5  # one request's worth at 2 per second
    limiter.check("a")
    with pytest.raises(ResourceExhausted):
        limiter.check("a")
    frozen.now += 100  # never more than the burst
    for _ in range(3):
        limiter.check("a")
    with pytest.raises(ResourceExhausted):
        limiter.check("a")


def test_the_rate_limiter_charges_batches_up_to_the_burst(frozen: FrozenTime) -> None:
    limiter = RateLimiter(1.0, 4)
    limiter.check("a", cost=3)
    with pytest.raises(ResourceExhausted):
        limiter.check("a", cost=2)
    limiter.check("a", cost=0)  # at least one
    with pytest.raises(ResourceExhausted):
        limiter.check("a")
    frozen.now += 4
    limiter.check("a", cost=100)  # a full batch passes, costing the whole burst
    with pytest.raises(ResourceExhausted):
        limiter.check("a")


@pytest.mark.parametrize("burst", [0, 1])
def test_a_burst_below_one_allows_one(frozen: FrozenTime, burst: int) -> None:
    limiter = RateLimiter(1.0, burst)
    limiter.check("a")
    with pytest.raises(ResourceExhausted):
        limiter.check("a")
    RateLimiter(0, 0).check("a")
    RateLimiter(-1, 0).check("a")


def test_an_admin_s_token_for_a_key_gone_from_the_store_is_not_found(rig: Rig) -> None:
    with_key(rig, decrypt_grant("admin"))
    token, _ = issue(rig, ADMIN, {})
    rig.store.revoked_and_key = lambda token_id, key_id: (False, None)  # type: ignore[method-assign]
    with pytest.raises(NotFound, match="key 'k' not found"):
        rig.tokens.authorize(rig.draft(ADMIN), token, "k", 1, {})


def test_a_single_use_token_counts_its_use(rig: Rig) -> None:
    with_key(rig, decrypt_grant("consumer"))
    token, _ = issue(rig, CONSUMER, {}, max_uses=1)
    assert rig.tokens.counts_uses(token) is True
    rig.tokens.verify(token, CONSUMER)
    assert rig.tokens.counts_uses(token) is True


def test_the_longest_token_that_verifies_is_issued(rig: Rig) -> None:
    with_key(rig, decrypt_grant("consumer"))
    context = {f"{i:02d}" + "k" * 62: "v" * 256 for i in range(15)}
    for length in range(780, 1025):
        try:
            token, _ = rig.tokens.issue(CONSUMER, "k", context, "j" * length, None)
        except InvalidArgument:
            raise AssertionError("no token of exactly the limit") from None
        if len(token) == MAX_TOKEN_BYTES:
            break
    assert rig.tokens.verify(token, CONSUMER).justification == "j" * length
    with pytest.raises(InvalidArgument, match="longer than"):
        rig.tokens.issue(CONSUMER, "k", context, "j" * (length + 1), None)
