"""Certificate-bound decryption tokens: ES256 JWTs signed in the HSM (RFC 7519, RFC 8705)."""

from __future__ import annotations

import base64
import hmac
import json
import logging
import re
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt

from broker.domain import (
    Caller,
    Operation,
    Role,
    TokenClaims,
    validate_context,
    validate_key_id,
)
from broker.errors import (
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
)
from broker.ports import Clock, KeyStore, RevocationStore
from broker.services.access import Access, RateLimiter
from broker.services.audit import AuditLog
from broker.services.keys import MAX_TOKEN_TTL
from broker.services.signing import TOKEN_PURPOSE, SigningKeys

log = logging.getLogger(__name__)

DEFAULT_TTL = timedelta(minutes=5)
LEEWAY = timedelta(seconds=5)
MAX_TOKEN_BYTES = 8192
MAX_JUSTIFICATION = 1024
MAX_USES = 10_000
TOKEN_TYPE = "at+jwt"
REQUIRED_CLAIMS = ("iss", "sub", "aud", "iat", "nbf", "exp", "jti", "scope", "cnf")
_FORBIDDEN_HEADERS = frozenset({"jku", "jwk", "x5u", "x5c", "x5t", "x5t#S256", "crit"})
_THUMBPRINT = re.compile(r"[A-Za-z0-9_-]{43}")

_BAD = "token is invalid; get a new one with Tokens.IssueToken"


def _strict_json(data: bytes) -> dict[str, Any]:
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, value in pairs:
            if name in out:
                raise ValueError("duplicate member")
            out[name] = value
        return out

    obj = json.loads(data, object_pairs_hook=no_duplicates)
    if not isinstance(obj, dict):
        raise ValueError("not an object")
    return obj


def _b64decode(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


class TokenService:
    """Issues, verifies and revokes decryption tokens.

    Args:
        keys: key metadata (for grants).
        revocations: issued and revoked token ids.
        access: role, grant and jurisdiction checks.
        audit: the audit trail.
        clock: the time source; verification uses it too.
        signing: the HSM-held signing keys.
        issuer: the `iss` this broker writes and expects.
        audience: the `aud` this broker writes and expects (its own id).
        limiter: per-principal rate limit.
    """

    def __init__(
        self,
        keys: KeyStore,
        revocations: RevocationStore,
        access: Access,
        audit: AuditLog,
        clock: Clock,
        signing: SigningKeys,
        issuer: str,
        audience: str,
        limiter: RateLimiter,
    ) -> None:
        self._keys = keys
        self._revocations = revocations
        self._access = access
        self._audit = audit
        self._clock = clock
        self._signing = signing
        self._issuer = issuer
        self._audience = audience
        self._limiter = limiter
        self._decoder = jwt.PyJWT()

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
        with self._audit.scope(
            caller, "IssueToken", key_id=key_id, context=context, justification=justification
        ) as draft:
            self._limiter.check(caller.principal)
            validate_key_id(key_id)
            ctx = validate_context(context)
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
            if ttl is not None and (ttl <= timedelta(0) or ttl > MAX_TOKEN_TTL):
                raise InvalidArgument("ttl must be between 1 second and 1 hour")
            if not 0 <= max_uses <= MAX_USES:
                raise InvalidArgument(f"max_uses must be between 0 (no limit) and {MAX_USES}")
            key = self._keys.get_key(key_id)
            Access.require_usable(key)
            self._access.hsm_for(key)
            grants = Access.matching_grants(key, subject, Operation.DECRYPT, ctx)
            allowed = max(g.max_token_ttl or MAX_TOKEN_TTL for g in grants)
            if ttl is None:
                ttl = min(DEFAULT_TTL, allowed)
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
            draft.token_id = claims.token_id
            token = self._sign(claims)
            self._revocations.record_issued(claims.token_id, subject, key_id, claims.expires_at)
            return token, claims

    def _sign(self, claims: TokenClaims) -> str:
        payload = {
            "iss": self._issuer,
            "sub": claims.subject,
            "aud": self._audience,
            "iat": int(claims.issued_at.timestamp()),
            "nbf": int(claims.not_before.timestamp()),
            "exp": int(claims.expires_at.timestamp()),
            "jti": claims.token_id,
            "scope": {
                "key_id": claims.key_id,
                "operations": sorted(op.value for op in claims.operations),
                "context": dict(claims.context),
                "justification": claims.justification,
                "max_uses": claims.max_uses,
            },
            "cnf": {"x5t#S256": claims.cert_thumbprint},
        }
        body = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
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
        if not token:
            raise Unauthenticated("a token is required: get one with Tokens.IssueToken")
        if len(token) > MAX_TOKEN_BYTES or token.count(".") != 2:
            raise Unauthenticated(_BAD)
        try:
            head_b64, body_b64, _ = token.split(".")
            header = _strict_json(_b64decode(head_b64))
            _strict_json(_b64decode(body_b64))
        except ValueError:
            raise Unauthenticated(_BAD) from None
        if (
            header.get("alg") != "ES256"
            or header.get("typ") != TOKEN_TYPE
            or _FORBIDDEN_HEADERS & header.keys()
            or not isinstance(header.get("kid"), str)
        ):
            raise Unauthenticated(_BAD)
        public_key = self._signing.public_key(header["kid"], TOKEN_PURPOSE)
        if public_key is None:
            raise Unauthenticated(_BAD)
        try:
            payload = self._decoder.decode(
                token,
                key=public_key,
                algorithms=["ES256"],
                audience=self._audience,
                issuer=self._issuer,
                options={
                    "require": list(REQUIRED_CLAIMS),
                    "strict_aud": True,
                    # Time is checked below against the injected clock.
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                },
            )
        except jwt.InvalidTokenError:
            raise Unauthenticated(_BAD) from None
        claims = self._claims(payload)
        now = self._clock.now()
        if now >= claims.expires_at:
            raise Unauthenticated("token has expired; get a new one with Tokens.IssueToken")
        if claims.not_before > now + LEEWAY or claims.issued_at > now + LEEWAY:
            raise Unauthenticated("token is not valid yet; check the clocks")
        if claims.expires_at - claims.issued_at > MAX_TOKEN_TTL:
            raise Unauthenticated(_BAD)
        if claims.subject != caller.principal or not hmac.compare_digest(
            claims.cert_thumbprint, caller.cert_thumbprint
        ):
            raise Unauthenticated(
                "token is bound to another client certificate; tokens cannot be shared"
            )
        if self._revocations.is_revoked(claims.token_id):
            raise Unauthenticated("token has been revoked")
        return claims

    @staticmethod
    def _claims(payload: dict[str, Any]) -> TokenClaims:
        try:
            scope = payload["scope"]
            cnf = payload["cnf"]
            ops = frozenset(Operation(op) for op in scope["operations"])
            context = scope["context"]
            fields_ok = (
                isinstance(payload["sub"], str)
                and isinstance(payload["jti"], str)
                and isinstance(scope["key_id"], str)
                and isinstance(scope["justification"], str)
                and isinstance(context, dict)
                and all(isinstance(v, str) for v in context.values())
                and isinstance(cnf["x5t#S256"], str)
                and all(isinstance(payload[c], int) for c in ("iat", "nbf", "exp"))
                and isinstance(scope["max_uses"], int)
                and 0 <= scope["max_uses"] <= MAX_USES
            )
            if not fields_ok:
                raise TypeError
            return TokenClaims(
                token_id=payload["jti"],
                subject=payload["sub"],
                key_id=scope["key_id"],
                operations=ops,
                context=context,
                justification=scope["justification"],
                issued_at=datetime.fromtimestamp(payload["iat"], UTC),
                not_before=datetime.fromtimestamp(payload["nbf"], UTC),
                expires_at=datetime.fromtimestamp(payload["exp"], UTC),
                cert_thumbprint=cnf["x5t#S256"],
                max_uses=scope["max_uses"],
            )
        except (KeyError, TypeError, ValueError, OverflowError, OSError):
            raise Unauthenticated(_BAD) from None

    def consume_use(self, claims: TokenClaims) -> None:
        """Counts one Decrypt against the token's use limit, if it has one.

        Raises:
            ResourceExhausted: the token has been used as often as it allows.
        """
        if claims.max_uses and not self._revocations.consume_use(claims.token_id, claims.max_uses):
            raise ResourceExhausted(
                f"token has been used its {claims.max_uses} allowed time(s); get a new one"
            )

    # RevokeToken -------------------------------------------------------------------------

    def revoke(self, caller: Caller, token_id: str) -> None:
        with self._audit.scope(caller, "RevokeToken", token_id=token_id):
            self._limiter.check(caller.principal)
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
            self._revocations.revoke(token_id, subject, self._clock.now() + MAX_TOKEN_TTL + LEEWAY)

    def jwks(self) -> dict[str, Any]:
        return self._signing.jwks()
