"""ECDSA P-256 signing keys in the HSM."""

from __future__ import annotations

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature

from broker.adapters.pkcs11 import Pkcs11Hsm
from broker.errors import InvalidArgument
from tests.hsm_fixtures import unique_label
from tests.integration.hsm.common import flip


def test_signature_verifies_with_the_public_point(hsm: Pkcs11Hsm) -> None:
    label = unique_label("sig")
    point = hsm.generate_signing_key(label)
    assert len(point) == 65
    assert point[0] == 0x04
    assert hsm.public_point(label) == point
    public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)

    digest = hashes.Hash(hashes.SHA256())
    digest.update(b"header.payload")
    message_digest = digest.finalize()
    signature = hsm.sign(label, message_digest)
    assert len(signature) == 64
    der = encode_dss_signature(
        int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
    )
    public.verify(der, message_digest, ec.ECDSA(Prehashed(hashes.SHA256())))
    with pytest.raises(InvalidSignature):
        public.verify(der, flip(message_digest, 0), ec.ECDSA(Prehashed(hashes.SHA256())))
    # ECDSA is randomised: two signatures of one digest differ, both verify.
    assert hsm.sign(label, message_digest) != signature

    with pytest.raises(InvalidArgument):
        hsm.sign(label, b"not a digest")
