"""Values and small helpers shared by the HSM adapter tests."""

from __future__ import annotations

import PyKCS11
import pytest

from broker.adapters.pkcs11 import Pkcs11Library
from broker.devhsm import SoftHsmToken

#: What the `softhsm` fixture yields.
Softhsm = tuple[Pkcs11Library, SoftHsmToken]

IV = bytes(range(12))
AAD = b"kb1|key-a|v1|ctx"


def ckr(exc_info: pytest.ExceptionInfo[PyKCS11.PyKCS11Error]) -> int:
    """The CKR code of a raised PyKCS11 error."""
    return int(exc_info.value.value)


def flip(data: bytes, index: int) -> bytes:
    """`data` with the lowest bit of byte `index` flipped."""
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]
