"""An in-memory fake of the `Hsm` port for unit tests of the services."""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from broker.errors import (
    AlreadyExists,
    DecryptionFailed,
    HsmObjectMissing,
    HsmUnavailable,
)
from broker.ports import HsmInfo, KeyKind, KeyProperties


class FakeHsm:
    def __init__(self, name: str = "local", jurisdiction: str = "FR") -> None:
        self.info = HsmInfo(name, jurisdiction, "fake")
        self.keks: dict[str, AESGCM] = {}
        self.signers: dict[str, ec.EllipticCurvePrivateKey] = {}
        self.down = False
        self.calls = 0
        #: Labels whose key a test has "weakened": what `key_properties` then reports.
        self.weakened: dict[str, tuple[str, ...]] = {}
        #: The audit anchors: label -> values (one each, as `write_anchor` leaves them).
        self.anchors: dict[str, list[bytes]] = {}

    def _tick(self) -> None:
        self.calls += 1
        if self.down:
            raise HsmUnavailable("fake HSM is down")

    def generate_kek(self, label: str) -> None:
        self._tick()
        if label in self.keks:
            raise AlreadyExists(label)
        self.keks[label] = AESGCM(AESGCM.generate_key(256))

    def encrypt(self, label: str, iv: bytes, plaintext: bytes, aad: bytes) -> bytes:
        self._tick()
        if label not in self.keks:
            raise HsmObjectMissing(label)
        return self.keks[label].encrypt(iv, plaintext, aad)

    def decrypt(self, label: str, iv: bytes, ciphertext: bytes, aad: bytes) -> bytes:
        self._tick()
        if label not in self.keks:
            raise HsmObjectMissing(label)
        try:
            return self.keks[label].decrypt(iv, ciphertext, aad)
        except InvalidTag:
            raise DecryptionFailed() from None

    def reencrypt(
        self,
        label: str,
        iv: bytes,
        ciphertext: bytes,
        aad: bytes,
        new_label: str,
        new_iv: bytes,
        new_aad: bytes,
    ) -> bytes:
        plaintext = self.decrypt(label, iv, ciphertext, aad)
        return self.encrypt(new_label, new_iv, plaintext, new_aad)

    def authenticate(self, label: str, iv: bytes, ciphertext: bytes, aad: bytes) -> None:
        self.decrypt(label, iv, ciphertext, aad)

    def generate_signing_key(self, label: str) -> bytes:
        self._tick()
        self.signers[label] = ec.generate_private_key(ec.SECP256R1())
        return self.public_point(label)

    def public_point(self, label: str) -> bytes:
        if label not in self.signers:
            raise HsmObjectMissing(label)
        return (
            self.signers[label]
            .public_key()
            .public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
        )

    def sign(self, label: str, digest: bytes) -> bytes:
        self._tick()
        from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

        der = self.signers[label].sign(digest, ec.ECDSA(Prehashed(hashes.SHA256())))
        r, s = decode_dss_signature(der)
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")

    def random(self, length: int) -> bytes:
        self._tick()
        return os.urandom(length)

    def destroy(self, label: str) -> None:
        self.keks.pop(label, None)
        self.signers.pop(label, None)

    def key_properties(self, label: str, kind: KeyKind) -> KeyProperties:
        if label in self.keks:
            actual, objects = KeyKind.KEK, 1
        elif label in self.signers:
            actual, objects = KeyKind.SIGNING, 2
        else:
            raise HsmObjectMissing(label)
        problems = self.weakened.get(label, ())
        if actual is not kind:
            problems = (f"a {actual.value} key, not a {kind.value} key", *problems)
        return KeyProperties(label, kind, objects, problems)

    def write_anchor(self, label: str, data: bytes) -> None:
        self._tick()
        self.anchors[label] = [bytes(data)]

    def read_anchors(self, prefix: str) -> dict[str, list[bytes]]:
        self._tick()
        return {k: list(v) for k, v in self.anchors.items() if k.startswith(prefix)}

    def labels(self, prefix: str) -> list[str]:
        self._tick()
        return sorted(k for k in (*self.keks, *self.signers) if k.startswith(prefix))

    def check(self) -> None:
        self._tick()

    def close(self) -> None:
        pass
