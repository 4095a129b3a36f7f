"""AES-GCM operations whose plaintext stays in a buffer the adapter can erase.

PyKCS11's `Session.decrypt` and `Session.encrypt` copy their input and output through Python
`bytes`, which are immutable: a data key unwrapped that way lingers in memory until the
allocator reuses it. A re-wrap (unwrap, then wrap under another key version) needs the
plaintext only between two calls of the same token, so `InPlace` runs both with PyKCS11's
low-level functions on one `ckbytelist` (a C++ vector) that the caller wipes afterwards
(`gate.wipe_vector`). The methods are named `decrypt` and `encrypt` so that the gate's fork
check and injected faults treat them as the plain operations.
"""

from __future__ import annotations

from typing import Any

import PyKCS11


def _check(rv: int) -> None:
    if rv != PyKCS11.CKR_OK:
        raise PyKCS11.PyKCS11Error(rv)


def new_buffer() -> Any:
    """An empty `ckbytelist` for `InPlace.decrypt` to fill."""
    return PyKCS11.LowLevel.ckbytelist()


class InPlace:
    """Single-part GCM calls on one PyKCS11 session, with a caller-owned plaintext buffer.

    Args:
        session: the leased `PyKCS11.Session`.
    """

    def __init__(self, session: Any) -> None:
        self._lib = session.lib
        self._handle = session.session

    def decrypt(self, key: Any, ciphertext: bytes, mechanism: Any, out: Any) -> None:
        """C_DecryptInit, then C_Decrypt twice (length, then data) into `out`."""
        native = mechanism.to_native()
        data = PyKCS11.ckbytelist(ciphertext)
        _check(self._lib.C_DecryptInit(self._handle, native, key))
        _check(self._lib.C_Decrypt(self._handle, data, out))
        _check(self._lib.C_Decrypt(self._handle, data, out))

    def encrypt(self, key: Any, plaintext: Any, mechanism: Any) -> Any:
        """C_EncryptInit, then C_Encrypt twice, of the `ckbytelist` `plaintext` (not copied);
        returns the ciphertext || tag as a `ckbytelist` (the gate hands it back as bytes)."""
        native = mechanism.to_native()
        out = PyKCS11.LowLevel.ckbytelist()
        _check(self._lib.C_EncryptInit(self._handle, native, key))
        _check(self._lib.C_Encrypt(self._handle, plaintext, out))
        _check(self._lib.C_Encrypt(self._handle, plaintext, out))
        return out
