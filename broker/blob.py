"""The versioned, self-describing blob format shared by wrapped keys and ciphertexts.

Layout of format version 1 (all integers big-endian; see docs/blob-format.md):

    offset  size  field
    0       2     magic b"KB"
    2       1     format version, 0x01
    3       1     n = length of the key id in bytes (1..63)
    4       n     key id, ASCII, matching ^[a-z0-9][a-z0-9._-]{0,62}$
    4+n     4     key version (uint32, >= 1)
    8+n     12    GCM IV (random, made on the host: SoftHSM2 cannot generate GCM IVs)
    20+n    m     AES-256-GCM ciphertext (m >= 0)
    20+n+m  16    GCM tag

The header (bytes 0 .. 8+n) is authenticated: the AAD given to the HSM is
    b"keybroker.blob.v1" || header || canonical_context(context)
so a blob presented as another key's or version's, or with any other context, fails.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass

from broker.domain import KEY_ID_PATTERN, canonical_context
from broker.errors import InvalidArgument

MAGIC = b"KB"
FORMAT_VERSION = 1
IV_BYTES = 12
TAG_BYTES = 16
AAD_LABEL = b"keybroker.blob.v1"
#: Largest plaintext Encrypt accepts; data keys are 32 bytes.
MAX_PLAINTEXT = 64 * 1024
MAX_BLOB = 2 + 1 + 1 + 63 + 4 + IV_BYTES + MAX_PLAINTEXT + TAG_BYTES

_MALFORMED = "ciphertext is not a keybroker blob (truncated, extended or of an unknown format)"


@dataclass(frozen=True, slots=True)
class Blob:
    key_id: str
    key_version: int
    iv: bytes
    sealed: bytes  # ciphertext || tag

    def header(self) -> bytes:
        kid = self.key_id.encode("ascii")
        return MAGIC + bytes([FORMAT_VERSION, len(kid)]) + kid + struct.pack(">I", self.key_version)

    def aad(self, context: Mapping[str, str]) -> bytes:
        return AAD_LABEL + self.header() + canonical_context(context)

    def encode(self) -> bytes:
        return self.header() + self.iv + self.sealed


def parse(data: bytes) -> Blob:
    """Parses a blob without decrypting it.

    Raises:
        InvalidArgument: empty, truncated, oversize, unknown magic or format version.
    """
    if not data:
        raise InvalidArgument("ciphertext is required")
    if len(data) > MAX_BLOB:
        raise InvalidArgument(_MALFORMED)
    if len(data) < 4 or data[:2] != MAGIC or data[2] != FORMAT_VERSION:
        raise InvalidArgument(_MALFORMED)
    n = data[3]
    end_header = 4 + n + 4
    if n == 0 or len(data) < end_header + IV_BYTES + TAG_BYTES:
        raise InvalidArgument(_MALFORMED)
    try:
        key_id = data[4 : 4 + n].decode("ascii")
    except UnicodeDecodeError:
        raise InvalidArgument(_MALFORMED) from None
    if not KEY_ID_PATTERN.fullmatch(key_id):
        raise InvalidArgument(_MALFORMED)
    (version,) = struct.unpack(">I", data[4 + n : end_header])
    if version == 0:
        raise InvalidArgument(_MALFORMED)
    iv = data[end_header : end_header + IV_BYTES]
    return Blob(key_id, version, iv, data[end_header + IV_BYTES :])
