"""Reading a token's claims locally, without verifying it: for ``token revoke TOKEN`` (its
``jti``) and ``token lookup``. Nothing here trusts a claim for anything but display and the id
the broker then checks itself."""

from __future__ import annotations

import base64
import binascii
import json
from datetime import UTC, datetime
from typing import Any

import click

from keybroker_client.cli.render import terminal_safe, time_text

#: The longest token id the broker accepts (RevokeToken refuses longer ones).
MAX_TOKEN_ID = 64


def unverified_claims(token: str) -> dict[str, Any]:
    """The claims set of a JWT, decoded without any signature check.

    Raises:
        click.BadParameter: the text is not three base64url segments with a JSON object in
            the middle. The message never quotes the token, which is a bearer secret.
    """
    parts = token.strip().split(".")
    if len(parts) != 3:
        raise click.BadParameter("not a token (a JWT has three dot-separated parts)")
    body = parts[1]
    try:
        claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    except (binascii.Error, ValueError):
        raise click.BadParameter("not a token: its claims are not base64url JSON") from None
    if not isinstance(claims, dict):
        raise click.BadParameter("not a token: its claims are not a JSON object")
    return claims


def token_id_of(token_or_id: str) -> str:
    """The token id: the argument itself, or the ``jti`` of a token given whole."""
    if "." not in token_or_id:
        return token_or_id
    jti = unverified_claims(token_or_id).get("jti")
    if not isinstance(jti, str) or not jti or len(jti) > MAX_TOKEN_ID:
        raise click.BadParameter("the token carries no usable id (jti)")
    return jti


def _time(seconds: Any) -> datetime | None:
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        return None
    return datetime.fromtimestamp(seconds, UTC)


def _expiry(seconds: Any, now: datetime) -> str:
    moment = _time(seconds)
    if moment is None:
        return "?"
    left = int((moment - now).total_seconds())
    return f"{time_text(moment)} ({'expired' if left <= 0 else f'in {left}s'})"


def claims_text(claims: dict[str, Any], now: datetime) -> str:
    """The claims for a human, one field per line, headed by the fact they are unverified."""
    scope = claims.get("scope") if isinstance(claims.get("scope"), dict) else {}
    context = scope.get("context") if isinstance(scope.get("context"), dict) else {}
    cnf = claims.get("cnf") if isinstance(claims.get("cnf"), dict) else {}
    uses = scope.get("max_uses")
    rows = [
        ("token_id", claims.get("jti")),
        ("subject", claims.get("sub")),
        ("key_id", scope.get("key_id")),
        ("operations", ",".join(map(str, scope.get("operations") or []))),
        ("context", ",".join(f"{k}={v}" for k, v in sorted(context.items()))),
        ("justification", scope.get("justification")),
        ("max_uses", f"{uses} (no limit)" if uses == 0 else uses),
        ("issued", time_text(_time(claims.get("iat"))) or "?"),
        ("expires", _expiry(claims.get("exp"), now)),
        ("issuer", claims.get("iss")),
        ("audience", claims.get("aud")),
        ("bound to", f"certificate x5t#S256 {cnf.get('x5t#S256')}"),
    ]
    lines = ["UNVERIFIED: decoded locally; the broker checks the signature when it is used"]
    lines += [f"{name:<14}{terminal_safe(str(value))}" for name, value in rows]
    return "\n".join(lines)
