"""The `Hsm` port over PKCS#11 (PyKCS11), tested against SoftHSM2 and meant for real HSMs.

- `library`: `Pkcs11Library`, one PKCS#11 module loaded once per process.
- `gate`: `Gate`, the one door every PyKCS11 call goes through (fork check, fault injection).
- `errors`: the CKR table and the domain errors the codes become.
- `pool`: the session pool of a token and the lease of a session to one operation.
- `templates`: the key templates of DESIGN.md invariant 1, to generate keys and check them.
- `anchors`: the audit anchors, private data objects holding each chain's newest signature.
- `hsm`: `Pkcs11Hsm`, one token as the `Hsm` port.
"""

from broker.adapters.pkcs11.errors import ERROR_TABLE, ckr_name
from broker.adapters.pkcs11.gate import Fault, Gate
from broker.adapters.pkcs11.hsm import Pkcs11Hsm
from broker.adapters.pkcs11.library import Pkcs11Library
from broker.adapters.pkcs11.templates import (
    KEK,
    SIGNING_PRIVATE,
    SIGNING_PUBLIC,
    pack_mechanisms,
    unpack_mechanisms,
)

__all__ = [
    "ERROR_TABLE",
    "KEK",
    "SIGNING_PRIVATE",
    "SIGNING_PUBLIC",
    "Fault",
    "Gate",
    "Pkcs11Hsm",
    "Pkcs11Library",
    "ckr_name",
    "pack_mechanisms",
    "unpack_mechanisms",
]
