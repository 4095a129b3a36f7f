"""Certificate-bound decryption tokens: ES256 JWTs signed in the HSM (RFC 7519, RFC 8705)."""

from __future__ import annotations

import hmac
import logging
import re
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol

import jwt

from broker.domain import (
    AuditOperation,
    Caller,
    Operation,
    Role,
    TokenClaims,
    validate_key_id,
)
from broker.errors import (
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
)
from broker.ports import Clock, Hsm, KeyStore, RevocationStore
from broker.services.access import Access, RateLimiter
from broker.services.audit import AuditDraft, AuditedService, AuditLog
from broker.services.keys import MAX_TOKEN_TTL
from broker.services.signing import TOKEN_PURPOSE, SigningKeys
from broker.services.token_cache import VerifiedTokenCache
from broker.services.token_format import (
    INVALID,
    MAX_TOKEN_BYTES,
    REQUIRED_CLAIMS,
    TOKEN_TYPE,
    decode_claims,
    encode_payload,
    peek_max_uses,
    token_kid,
)

log = logging.getLogger(__name__)

DEFAULT_TTL = timedelta(minutes=5)
#: The default clock-skew leeway, and the most the contract allows.
LEEWAY = timedelta(seconds=5)
MAX_JUSTIFICATION = 1024
MAX_USES = 10_000
_THUMBPRINT = re.compile(r"[A-Za-z0-9_-]{43}")
REVOKED = "token has been revoked"


class TokenObserver(Protocol):
    """Told of token decisions (the metrics); must be cheap and never raise."""

    def issued(self) -> None:
        """A token was issued."""

    def refused(self, stage: str, error: Exception) -> None:
        """A token request (stage "issue") or a token presented (stage "use") was refused."""


def _span(value: timedelta) -> str:
    seconds = int(value.total_seconds())
    for unit, size in (("hour", 3600), ("minute", 60), ("second", 1)):
        if seconds % size == 0:
            count = seconds // size
            return f"{count} {unit}{'' if count == 1 else 's'}"
    raise AssertionError("unreachable")  # pragma: no cover


@dataclass(frozen=True, slots=True)
class TokenSettings:
    """What tokens this broker issues and accepts.

    Attributes:
        issuer: the `iss` this broker writes and expects.
        audience: the `aud` this broker writes and expects (its own id).
        default_ttl: the lifetime of a token whose request names none (the grant caps it).
        max_ttl: the longest lifetime issued or accepted; at most 1 hour.
        leeway: clock skew tolerated on `nbf` and `iat` (never on `exp`); at most 5 seconds.
        max_uses: the highest use limit a token may carry.
    """

    issuer: str
    audience: str
    default_ttl: timedelta = DEFAULT_TTL
    max_ttl: timedelta = MAX_TOKEN_TTL
    leeway: timedelta = LEEWAY
    max_uses: int = MAX_USES

    def __post_init__(self) -> None:
        if not self.issuer or not self.audience:
            raise ValueError("tokens need an issuer and an audience")
        if not timedelta(seconds=1) <= self.max_ttl <= MAX_TOKEN_TTL:
            raise ValueError("max_ttl must be between 1 second and 1 hour")
        if not timedelta(seconds=1) <= self.default_ttl <= self.max_ttl:
            raise ValueError("default_ttl must be between 1 second and max_ttl")
        if not timedelta(0) <= self.leeway <= LEEWAY:
            raise ValueError("leeway must be between 0 and 5 seconds")
        if not 0 <= self.max_uses <= MAX_USES:
            raise ValueError(f"max_uses must be between 0 and {MAX_USES}")


@dataclass(frozen=True, slots=True)
class Authorized:
    """A Decrypt that a token allows: the token's claims and the HSM object to decrypt with."""

    claims: TokenClaims
    hsm: Hsm
    hsm_label: str


class TokenService(AuditedService):
    """Issues, verifies, authorizes and revokes decryption tokens.

    Args:
        settings: issuer, audience and lifetimes.
        keys: key metadata (for grants).
        revocations: issued and revoked token ids.
        access: role, grant and jurisdiction checks.
        audit: the audit trail.
        limiter: per-principal rate limit.
        clock: the time source; verification uses it too.
        signing: the HSM-held signing keys.
        verified: tokens verified before (a fresh bounded cache when None).
        observer: told of tokens issued and refused; None for none.
    """

    def __init__(
        self,
        settings: TokenSettings,
        *,
        keys: KeyStore,
        revocations: RevocationStore,
        access: Access,
        audit: AuditLog,
        limiter: RateLimiter,
        clock: Clock,
        signing: SigningKeys,
        verified: VerifiedTokenCache | None = None,
        observer: TokenObserver | None = None,
    ) -> None:
        super().__init__(audit, limiter)
        self._observer = observer
        self._settings = settings
        self._keys = keys
        self._revocations = revocations
        self._access = access
        self._clock = clock
        self._signing = signing
        self._decoder = jwt.PyJWT()
        self._verified = VerifiedTokenCache() if verified is None else verified

    # IssueToken ----------------------------------------------------------------------------

    def issue(
        self,
        caller: Caller,
        key_id: str,
        context: Mapping[str, str],
        justification: str,
        ttl: timedelta | None,
        subject: str = "",
        subject_thumbprint: str = "",
        max_uses: int = 0,
    ) -> tuple[str, TokenClaims]:
        limits = self._settings
        with (
            self._observed("issue"),
            self._call(
                caller,
                AuditOperation.ISSUE_TOKEN,
                key_id=key_id,
                context=context,
                justification=justification,
            ) as draft,
        ):
            validate_key_id(key_id)
            ctx = draft.validated_context()
            justification = justification.strip()
            if not justification:
                raise InvalidArgument("justification is required: say why the data is needed")
            if len(justification) > MAX_JUSTIFICATION:
                raise InvalidArgument(f"justification is longer than {MAX_JUSTIFICATION} chars")
            if subject or subject_thumbprint:
                self._access.require_admin(caller)
                if not subject or not _THUMBPRINT.fullmatch(subject_thumbprint):
                    raise InvalidArgument(
                        "issuing for another principal needs subject and "
                        "subject_cert_thumbprint (base64url SHA-256 of its DER certificate)"
                    )
            else:
                subject, subject_thumbprint = caller.principal, caller.cert_thumbprint
            if ttl is not None and (ttl <= timedelta(0) or ttl > limits.max_ttl):
                raise InvalidArgument(f"ttl must be between 1 second and {_span(limits.max_ttl)}")
            if not 0 <= max_uses <= limits.max_uses:
                raise InvalidArgument(
                    f"max_uses must be between 0 (no limit) and {limits.max_uses}"
                )
            # The grant before the key's state: a caller without one learns neither that
            # state nor whether the key exists (`Access.granted_key`).
            key = self._access.granted_key(
                self._keys.get_key, caller.principal, key_id, Operation.DECRYPT
            )
            # The caller's own certificate is checked here; a subject's certificate named by
            # an admin is checked when the token is used (Decrypt).
            on_own_behalf = (subject, subject_thumbprint) == (
                caller.principal,
                caller.cert_thumbprint,
            )
            grants = Access.matching_grants(
                key,
                subject,
                Operation.DECRYPT,
                ctx,
                country=caller.country if on_own_behalf else None,
            )
            Access.require_usable(key)
            self._access.hsm_for(key)
            allowed = min(max(g.max_token_ttl or limits.max_ttl for g in grants), limits.max_ttl)
            if ttl is None:
                ttl = min(limits.default_ttl, allowed)
            elif ttl > allowed:
                raise PermissionDenied(
                    f"ttl of {int(ttl.total_seconds())}s exceeds the grant's maximum of "
                    f"{int(allowed.total_seconds())}s"
                )
            now = self._clock.now().replace(microsecond=0)
            claims = TokenClaims(
                token_id=str(uuid.uuid4()),
                subject=subject,
                key_id=key_id,
                operations=frozenset({Operation.DECRYPT}),
                context=ctx,
                justification=justification,
                issued_at=now,
                not_before=now,
                expires_at=now + ttl,
                cert_thumbprint=subject_thumbprint,
                max_uses=max_uses,
            )
            token = self._sign(claims)
            if len(token) > MAX_TOKEN_BYTES:
                # Verification refuses a longer token: never hand out one that cannot be used.
                raise InvalidArgument(
                    f"the token would be longer than {MAX_TOKEN_BYTES} bytes, the most Decrypt "
                    "accepts: shorten the context or the justification"
                )
            draft.token_id = claims.token_id
            self._revocations.record_issued(claims.token_id, subject, key_id, claims.expires_at)
            return token, claims

    @contextmanager
    def _observed(self, stage: str) -> Iterator[None]:
        """Tells the observer how the block ended. Around IssueToken's audit scope, so an issue
        whose audit record failed counts as refused, not issued."""
        try:
            yield
        except Exception as exc:
            if self._observer is not None:
                self._observer.refused(stage, exc)
            raise
        if stage == "issue" and self._observer is not None:
            self._observer.issued()

    def _sign(self, claims: TokenClaims) -> str:
        body = encode_payload(claims, self._settings.issuer, self._settings.audience)
        return self._signing.sign_jws(TOKEN_PURPOSE, body, {"typ": TOKEN_TYPE})

    # Verification ----------------------------------------------------------------------------

    def verify(self, token: str, caller: Caller) -> TokenClaims:
        """Checks a token presented by `caller` and returns its claims.

        Checks, in order: size and shape; header (ES256 only, typ at+jwt, a kid of this
        broker's token keys, no key-carrying headers); no duplicate members; signature, `iss`,
        `aud` (exact, strict), required claims (PyJWT); time with at most 5 s leeway for
        `nbf`/`iat` and none for `exp`; a lifetime of at most 1 hour; subject and
        certificate binding (`cnf.x5t#S256`) to the calling connection; revocation.

        Raises:
            Unauthenticated: any check failed. Messages tell the caller what to do and never
                echo the token.
        """
        claims = self._checked_claims(token, caller)
        if self._revocations.is_revoked(claims.token_id):
            raise Unauthenticated(REVOKED)
        return claims

    def counts_uses(self, token: str) -> bool:
        """Whether a Decrypt with `token` would count a use (a write to the database): a hint
        for where to run the call, never a decision. From the verified claims when the token
        was verified before, else from its payload as written, unchecked; False for a token
        that cannot be read (it will be refused)."""
        if not token or len(token) > MAX_TOKEN_BYTES:
            return False
        claims = self._verified.get(VerifiedTokenCache.digest(token), self._clock.now())
        if claims is not None:
            return claims.max_uses > 0
        return peek_max_uses(token) > 0

    def _checked_claims(self, token: str, caller: Caller) -> TokenClaims:
        """`verify` but for revocation, which the caller checks (alone, or with its key)."""
        if len(token) > MAX_TOKEN_BYTES:
            raise Unauthenticated(INVALID)
        now = self._clock.now()
        digest = VerifiedTokenCache.digest(token)
        claims = self._verified.get(digest, now)
        if claims is None:
            claims = self._verify_signature(token)
            if now < claims.expires_at:
                self._verified.put(digest, claims)
        leeway = self._settings.leeway
        if now >= claims.expires_at:
            raise Unauthenticated("token has expired; get a new one with Tokens.IssueToken")
        if claims.not_before > now + leeway or claims.issued_at > now + leeway:
            raise Unauthenticated("token is not valid yet; check the clocks")
        if claims.expires_at - claims.issued_at > self._settings.max_ttl:
            raise Unauthenticated(INVALID)
        if claims.subject != caller.principal or not hmac.compare_digest(
            claims.cert_thumbprint, caller.cert_thumbprint
        ):
            raise Unauthenticated(
                "token is bound to another client certificate; tokens cannot be shared"
            )
        return claims

    def _verify_signature(self, token: str) -> TokenClaims:
        """The checks whose outcome depends on the token's bytes alone: shape, header,
        signature, issuer, audience, required claims, claim types."""
        kid = token_kid(token)
        public_key = self._signing.public_key(kid, TOKEN_PURPOSE)
        if public_key is None:
            raise Unauthenticated(INVALID)
        try:
            payload = self._decoder.decode(
                token,
                key=public_key,
                algorithms=["ES256"],
                audience=self._settings.audience,
                issuer=self._settings.issuer,
                options={
                    "require": list(REQUIRED_CLAIMS),
                    "strict_aud": True,
                    # Time is checked by `verify` against the injected clock, on every call.
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                },
            )
        except jwt.InvalidTokenError:
            raise Unauthenticated(INVALID) from None
        return decode_claims(payload, self._settings.max_uses)

    def authorize(
        self,
        draft: AuditDraft,
        token: str,
        key_id: str,
        version: int,
        context: Mapping[str, str],
    ) -> Authorized:
        """Lets the caller of a Decrypt use version `version` of `key_id` under `context` on
        the strength of `token`, and counts one use of the token.

        Checks, in order: the token (see `verify`); its scope: the key, the decrypt operation,
        each of its context entries present in `context`; the key's policy again, so a grant
        withdrawn after issuance stops its tokens at once; the key and version able to decrypt
        on an HSM whose jurisdiction the policy allows. The use is counted only then, so a
        refused call does not use up a token.

        Args:
            draft: the call's audit draft: names the caller, and receives the token's id and
                justification as soon as the token is verified.
            token: the token presented.
            key_id: the key the blob names.
            version: the key version the blob names.
            context: the request's validated context.

        Raises:
            Unauthenticated: the token is not valid for this caller.
            PermissionDenied: the token's scope or the key's policy does not cover the call.
            FailedPrecondition, NotFound, Unavailable: the version cannot decrypt here.
            ResourceExhausted: the token has been used as often as it allows.
        """
        with self._observed("use"):
            return self._authorize(draft, token, key_id, version, context)

    def _authorize(
        self,
        draft: AuditDraft,
        token: str,
        key_id: str,
        version: int,
        context: Mapping[str, str],
    ) -> Authorized:
        claims = self._checked_claims(token, draft.caller)
        # Revocation and the key in one read: as exact as two, at half the round trips.
        revoked, key = self._revocations.revoked_and_key(claims.token_id, key_id)
        if revoked:
            raise Unauthenticated(REVOKED)
        draft.token_id, draft.justification = claims.token_id, claims.justification
        if not hmac.compare_digest(claims.key_id, key_id):
            raise PermissionDenied(f"the token is for another key, not {key_id!r}")
        if Operation.DECRYPT not in claims.operations:
            raise PermissionDenied("the token does not allow decrypt")
        for name, value in claims.context.items():
            if name not in context:
                raise PermissionDenied(
                    f"the request's context does not carry the token's entry {name!r}"
                )
            if context[name] != value:
                # Context values are not secret (they are audited); naming both ends a guess.
                raise PermissionDenied(
                    f"the token requires context {name}={value!r}, "
                    f"the request has {name}={context[name]!r}"
                )
        if key is None:
            raise self._access.unknown_key(draft.caller.principal, key_id, Operation.DECRYPT)
        Access.matching_grants(
            key, claims.subject, Operation.DECRYPT, claims.context, country=draft.caller.country
        )
        hsm, label = self._access.decrypting_version(key, version)
        self._consume_use(claims)
        return Authorized(claims, hsm, label)

    def _consume_use(self, claims: TokenClaims) -> None:
        if claims.max_uses and not self._revocations.consume_use(claims.token_id, claims.max_uses):
            raise ResourceExhausted(
                f"token has been used its {claims.max_uses} allowed time(s); get a new one"
            )

    # RevokeToken -------------------------------------------------------------------------

    def revoke(self, caller: Caller, token_id: str) -> None:
        with self._call(caller, AuditOperation.REVOKE_TOKEN, token_id=token_id):
            if not token_id or len(token_id) > 64:
                raise InvalidArgument("token_id is required (the jti of the token)")
            subject = self._revocations.issued_subject(token_id)
            is_admin = self._access.has_role(caller.principal, Role.ADMIN)
            if subject is None:
                if not is_admin:
                    # Non-admins learn nothing about token ids that are not theirs.
                    raise PermissionDenied("only an admin or the token's subject may revoke it")
                raise NotFound(f"no token with id {token_id!r} was issued by this broker")
            if not is_admin and subject != caller.principal:
                raise PermissionDenied("only an admin or the token's subject may revoke it")
            keep_until = self._clock.now() + self._settings.max_ttl + self._settings.leeway
            self._revocations.revoke(token_id, subject, keep_until)

    def jwks(self) -> dict[str, Any]:
        return self._signing.jwks()
