"""Wycheproof AES-GCM vectors through the broker's HSM path (`Pkcs11Hsm.encrypt`/`decrypt` on
SoftHSM2), the primitive every wrapped data key relies on (invariant 2).

The vector keys are imported into the token as session objects (they vanish with the importing
session) because the broker's own KEKs are generated inside the HSM and never known. Provenance:
`tests/wycheproof.py`.

- 96-bit IV, 128-bit tag (what the broker uses): "valid" cases encrypt to exactly the published
  ciphertext and tag and decrypt back; "invalid" ones (modified tags, ...) fail with
  `DecryptionFailed`, never with plaintext.
- any other IV length (0, 8, ... 2056 bits; the zero-length IV of CVE-2017-7822 among them)
  is refused by the adapter with `InvalidArgument` before reaching the token.
"""

from __future__ import annotations

from collections.abc import Iterator

import PyKCS11
import pytest

from broker.adapters.pkcs11 import Pkcs11Hsm
from broker.errors import DecryptionFailed, InvalidArgument
from tests.hsm_fixtures import raw_session, unique_label
from tests.integration.hsm.common import Softhsm
from tests.wycheproof import AES_GCM, Vector, vectors

VECTORS = list(vectors(AES_GCM))
STANDARD = [v for v in VECTORS if v.group["ivSize"] == 96 and v.group["tagSize"] == 128]
OTHER_IV = [v for v in VECTORS if v.group["ivSize"] != 96]


@pytest.fixture(scope="module")
def imported(softhsm: Softhsm) -> Iterator[dict[bytes, str]]:
    """The label of each vector key, imported into the token for the module's duration."""
    library, token = softhsm
    labels: dict[bytes, str] = {}
    with raw_session(library, token) as session:
        for vector in VECTORS:
            key = vector.hex("key")
            if key in labels:
                continue
            labels[key] = unique_label("wycheproof")
            session.createObject(
                [
                    (PyKCS11.CKA_CLASS, PyKCS11.CKO_SECRET_KEY),
                    (PyKCS11.CKA_KEY_TYPE, PyKCS11.CKK_AES),
                    (PyKCS11.CKA_TOKEN, False),
                    (PyKCS11.CKA_PRIVATE, True),
                    (PyKCS11.CKA_LABEL, labels[key]),
                    (PyKCS11.CKA_VALUE, key),
                    (PyKCS11.CKA_ENCRYPT, True),
                    (PyKCS11.CKA_DECRYPT, True),
                ]
            )
        yield labels


def test_the_vectors_cover_the_broker_parameters() -> None:
    assert len(VECTORS) == 316
    assert any(v.group["keySize"] == 256 for v in STANDARD)
    assert {"valid", "invalid"} <= {v.case["result"] for v in STANDARD}
    assert any(v.group["ivSize"] == 0 for v in OTHER_IV)


@pytest.mark.parametrize("vector", STANDARD, ids=[v.id for v in STANDARD])
def test_gcm_through_the_hsm_matches_wycheproof(
    hsm: Pkcs11Hsm, imported: dict[bytes, str], vector: Vector
) -> None:
    label = imported[vector.hex("key")]
    iv, aad, msg = vector.hex("iv"), vector.hex("aad"), vector.hex("msg")
    sealed = vector.hex("ct") + vector.hex("tag")
    if vector.case["result"] == "valid":
        assert hsm.encrypt(label, iv, msg, aad) == sealed
        assert hsm.decrypt(label, iv, sealed, aad) == msg
    else:
        assert vector.case["result"] == "invalid"
        with pytest.raises(DecryptionFailed):
            hsm.decrypt(label, iv, sealed, aad)


@pytest.mark.parametrize("vector", OTHER_IV, ids=[v.id for v in OTHER_IV])
def test_other_iv_lengths_never_reach_the_token(
    hsm: Pkcs11Hsm, imported: dict[bytes, str], vector: Vector
) -> None:
    label = imported[vector.hex("key")]
    iv, aad = vector.hex("iv"), vector.hex("aad")
    with pytest.raises(InvalidArgument):
        hsm.decrypt(label, iv, vector.hex("ct") + vector.hex("tag"), aad)
    with pytest.raises(InvalidArgument):
        hsm.encrypt(label, iv, vector.hex("msg"), aad)
