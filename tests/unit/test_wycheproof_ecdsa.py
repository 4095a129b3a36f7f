"""Wycheproof ECDSA P-256 / SHA-256 vectors (IEEE P1363 signatures, as JWS ES256 carries them)
through both verifiers of the project: PyJWT's ES256, which the broker's token verifier calls
for every token (`TokenService._verify_signature` decodes with `algorithms=["ES256"]`), and the
offline evidence verifier's `es256_verifies` (audit checkpoints and chain records).

Provenance: see `tests/wycheproof.py`. "valid" must verify, "invalid" must not; the few
"acceptable" cases (legacy encodings) may go either way but both verifiers must agree.
"""

from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import get_default_algorithms
from keybroker_client.evidence.records import es256_verifies

from tests.wycheproof import ECDSA_P256_P1363, Vector, load, vectors

ES256 = get_default_algorithms()["ES256"]
VECTORS = list(vectors(ECDSA_P256_P1363))


def _public_key(vector: Vector) -> ec.EllipticCurvePublicKey:
    point = ec.EllipticCurvePublicKey.from_encoded_point(
        ec.SECP256R1(), bytes.fromhex(vector.group["publicKey"]["uncompressed"])
    )
    # Through the JWK form, as the JWKS the verifiers are given carries keys.
    key = ES256.from_jwk(json.dumps(ES256.to_jwk(point, as_dict=True)))
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key


def test_the_file_is_the_published_p256_sha256_set() -> None:
    data = load(ECDSA_P256_P1363)
    assert data["algorithm"] == "ECDSA"
    assert all(g["publicKey"]["curve"] == "secp256r1" for g in data["testGroups"])
    assert all(g["sha"] == "SHA-256" for g in data["testGroups"])
    assert len(VECTORS) >= 200
    # Both outcomes are exercised, including the CVE-2022-21449 class (r = 0, s = 0).
    results = {v.case["result"] for v in VECTORS}
    assert {"valid", "invalid"} <= results
    assert any("InvalidSignature" in v.case["flags"] for v in VECTORS)


@pytest.mark.parametrize("vector", VECTORS, ids=[v.id for v in VECTORS])
def test_es256_verifiers_agree_with_wycheproof(vector: Vector) -> None:
    key = _public_key(vector)
    message, signature = vector.hex("msg"), vector.hex("sig")
    by_pyjwt = ES256.verify(message, key, signature)
    offline = es256_verifies(key, message, signature)
    assert by_pyjwt == offline
    if vector.case["result"] == "valid":
        assert by_pyjwt, vector.case["comment"]
    elif vector.case["result"] == "invalid":
        assert not by_pyjwt, vector.case["comment"]
