"""The wire form of a decryption token: claims to JWT payload and back, parsed strictly.

Signing and signature checks are the token service's; this module only shapes and reads.
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from typing import Any

from broker.domain import Operation, TokenClaims
from broker.errors import Unauthenticated

MAX_TOKEN_BYTES = 8192
TOKEN_TYPE = "at+jwt"
REQUIRED_CLAIMS = ("iss", "sub", "aud", "iat", "nbf", "exp", "jti", "scope", "cnf")
INVALID = "token is invalid; get a new one with Tokens.IssueToken"
_FORBIDDEN_HEADERS = frozenset({"jku", "jwk", "x5u", "x5c", "x5t", "x5t#S256", "crit"})


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


def encode_payload(claims: TokenClaims, issuer: str, audience: str) -> bytes:
    """The JWT claims set of `claims`: canonical JSON, sorted members, no spaces."""
    payload = {
        "iss": issuer,
        "sub": claims.subject,
        "aud": audience,
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
    return json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()


def token_kid(token: str) -> str:
    """The `kid` of a token whose shape is acceptable, before any signature check.

    Checks: size and three segments; header and body JSON objects without duplicate
    members; header ES256 only, typ at+jwt, a string kid, no key-carrying headers.

    Raises:
        Unauthenticated: any check failed (the message never echoes the token).
    """
    if not token:
        raise Unauthenticated("a token is required: get one with Tokens.IssueToken")
    if len(token) > MAX_TOKEN_BYTES or token.count(".") != 2:
        raise Unauthenticated(INVALID)
    try:
        head_b64, body_b64, _ = token.split(".")
        header = _strict_json(_b64decode(head_b64))
        _strict_json(_b64decode(body_b64))
    except ValueError:
        raise Unauthenticated(INVALID) from None
    kid = header.get("kid")
    if (
        header.get("alg") != "ES256"
        or header.get("typ") != TOKEN_TYPE
        or _FORBIDDEN_HEADERS & header.keys()
        or not isinstance(kid, str)
    ):
        raise Unauthenticated(INVALID)
    return kid


def peek_max_uses(token: str) -> int:
    """The use limit a token's payload states, read without any check (signature, shape):
    only a hint where a call should run. -1 when the payload cannot be read that far."""
    try:
        body = json.loads(_b64decode(token.split(".")[1]))
        value = body["scope"]["max_uses"]
    except (ValueError, IndexError, KeyError, TypeError):
        return -1
    return value if isinstance(value, int) else -1


def decode_claims(payload: dict[str, Any], max_uses: int) -> TokenClaims:
    """The claims of a verified payload, every member of the expected type.

    Raises:
        Unauthenticated: a member is missing, of the wrong type or out of range.
    """
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
            and 0 <= scope["max_uses"] <= max_uses
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
        raise Unauthenticated(INVALID) from None
