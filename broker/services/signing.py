"""The broker's signing keys (tokens, audit checkpoints): ES256 in the HSM, JWKS out."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import secrets
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import Algorithm, ECAlgorithm
from jwt.api_jws import PyJWS

from broker.errors import HsmObjectMissing
from broker.ports import Hsm, SigningKeyStore

log = logging.getLogger(__name__)

TOKEN_PURPOSE = "token"
AUDIT_PURPOSE = "audit"


@dataclass(frozen=True, slots=True)
class SigningKey:
    kid: str
    purpose: str
    hsm: Hsm
    label: str
    public_key: ec.EllipticCurvePublicKey


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def jwk_thumbprint(public_key: ec.EllipticCurvePublicKey) -> str:
    """RFC 7638 thumbprint: SHA-256 of the required members in lexicographic order."""
    jwk = json.loads(ECAlgorithm.to_jwk(public_key))
    canonical = json.dumps(
        {k: jwk[k] for k in ("crv", "kty", "x", "y")}, separators=(",", ":"), sort_keys=True
    )
    return b64url(hashlib.sha256(canonical.encode()).digest())


class _HsmES256(Algorithm):
    """ES256 whose private half lives in the HSM: PyJWT builds the JWS, the HSM signs.

    The "key" PyJWT hands to `sign` is the `SigningKey`; only signing goes through here,
    verification uses PyJWT's own ES256 with the public key.
    """

    def prepare_key(self, key: Any) -> Any:
        if not isinstance(key, SigningKey):
            raise TypeError("expected a SigningKey")
        return key

    def sign(self, msg: bytes, key: Any) -> bytes:
        return bytes(key.hsm.sign(key.label, hashlib.sha256(msg).digest()))

    def verify(self, msg: bytes, key: Any, sig: bytes) -> bool:  # pragma: no cover
        raise NotImplementedError("verify with PyJWT's ES256 and the public key")

    @staticmethod
    def to_jwk(key_obj: Any, as_dict: bool = False) -> Any:  # pragma: no cover
        raise NotImplementedError

    @staticmethod
    def from_jwk(jwk: Any) -> Any:  # pragma: no cover
        raise NotImplementedError


class SigningKeys:
    """Finds or makes the signing key of each purpose and signs JWS with it.

    Args:
        store: which HSM objects are signing keys.
        hsms: the configured HSMs by name.
    """

    def __init__(self, store: SigningKeyStore, hsms: dict[str, Hsm]) -> None:
        self._store = store
        self._hsms = hsms
        self._keys: dict[str, SigningKey] = {}
        self._current: dict[str, SigningKey] = {}
        self._jws = PyJWS(algorithms=[])
        self._jws.register_algorithm("ES256", _HsmES256())

    def ensure(self, purpose: str, hsm_name: str) -> SigningKey:
        """Loads the newest key of `purpose`, generating one in `hsm_name` the first time.

        Raises:
            HsmObjectMissing: the store names a key the HSM does not hold (never re-created
                silently: a missing key means the token or its directory changed).
        """
        for kid, hsm_label_hsm, label in self._store.signing_keys(purpose):
            hsm = self._hsms.get(hsm_label_hsm)
            if hsm is None:
                log.warning("signing key on an unconfigured HSM", extra={"kid": kid})
                continue
            key = SigningKey(kid, purpose, hsm, label, _public_key(hsm.public_point(label)))
            if key.kid != kid:
                raise HsmObjectMissing(f"signing key {kid} in the HSM does not match its record")
            self._keys[kid] = key
            self._current.setdefault(purpose, key)
        if purpose not in self._current:
            hsm = self._hsms[hsm_name]
            label = f"sig:{purpose}:{secrets.token_hex(4)}"
            public = _public_key(hsm.generate_signing_key(label))
            key = SigningKey(jwk_thumbprint(public), purpose, hsm, label, public)
            self._store.add_signing_key(purpose, key.kid, hsm_name, label)
            self._keys[key.kid] = key
            self._current[purpose] = key
        return self._current[purpose]

    def all(self) -> list[SigningKey]:
        return list(self._keys.values())

    def public_key(self, kid: str, purpose: str) -> ec.EllipticCurvePublicKey | None:
        key = self._keys.get(kid)
        return key.public_key if key is not None and key.purpose == purpose else None

    def sign_jws(self, purpose: str, payload: bytes, headers: dict[str, str]) -> str:
        key = self._current[purpose]
        # PyJWT hands `key` untouched to the registered HSM algorithm.
        hsm_key: Any = key
        return self._jws.encode(
            payload, hsm_key, algorithm="ES256", headers={**headers, "kid": key.kid}
        )

    def jwks(self) -> dict[str, Any]:
        keys = []
        for key in self._keys.values():
            jwk = json.loads(ECAlgorithm.to_jwk(key.public_key))
            jwk.update({"kid": key.kid, "use": "sig", "alg": "ES256", "key_ops": ["verify"]})
            jwk["keybroker_purpose"] = key.purpose
            keys.append(jwk)
        return {"keys": keys}


def _public_key(point: bytes) -> ec.EllipticCurvePublicKey:
    return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), bytes(point))
