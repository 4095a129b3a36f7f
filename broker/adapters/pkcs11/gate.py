"""The one door to PyKCS11: every PKCS#11 call of the adapter goes through a `Gate`.

A gate does two things before the call itself: it refuses to run in a forked child (neither
PKCS#11 modules nor PyKCS11 are fork-safe), and it gives an injected fault the chance to act
(tests only: `hsm_sim.faults`). Having one door means one place to inject faults, and no
PKCS#11 call that escapes them.

The gate also hands back byte results as `bytes`. PyKCS11 returns them as a SWIG
`std::vector<unsigned char>` (`ckbytelist`), and `bytes(ckbytelist)` walks it one element at a
time through a Python-level iterator: about 1 us a byte here, 50-60 us for a wrapped data key,
more than the AES-GCM operation itself. `vector_bytes` copies the vector's storage in one
`memcpy` instead, after a self-check that falls back to the slow walk if the layout were ever
different.
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Callable
from typing import Any

import PyKCS11

#: An injected fault: called with the PyKCS11 method name ("encrypt", "findObjects",
#: "openSession", "login", "getTokenInfo", "C_Initialize", ...) before each call. Raising
#: `PyKCS11.PyKCS11Error` simulates a failing HSM; sleeping or blocking simulates a slow one.
Fault = Callable[[str], None]


_POINTER = ctypes.sizeof(ctypes.c_void_p)


def _vector_storage(vector: Any) -> bytes:
    """The bytes of a `std::vector<unsigned char>` read from its (begin, end) pointers.

    libstdc++ and libc++ both lay a vector out as three pointers: begin, end, end of capacity.
    """
    address = int(vector.this)
    begin = ctypes.c_void_p.from_address(address).value or 0
    end = ctypes.c_void_p.from_address(address + _POINTER).value or 0
    return ctypes.string_at(begin, end - begin) if end > begin else b""


@functools.cache
def _storage_layout_ok() -> bool:
    """Whether `_vector_storage` reads vectors right on this platform (checked once)."""
    try:
        for probe in (b"", b"\x00", bytes(range(256)) * 3):
            vector = PyKCS11.ckbytelist(probe)
            if _vector_storage(vector) != probe or vector.size() != len(probe):
                return False
    except (AttributeError, TypeError, ValueError, OverflowError):
        return False
    return True


def vector_bytes(vector: Any) -> bytes:
    """`bytes(vector)` for a PyKCS11 `ckbytelist`, without the per-byte iteration."""
    if _storage_layout_ok():
        data = _vector_storage(vector)
        if len(data) == vector.size():
            return data
    return bytes(vector)


def wipe_vector(vector: Any) -> None:
    """Overwrites a PyKCS11 `ckbytelist`'s whole storage (up to its capacity, which may hold
    bytes of an earlier, longer content) with zeros, in place.

    The one way to erase a secret that passed through PyKCS11: a `bytes` copy of it cannot be
    erased, which is why secrets the broker must not keep stay in such vectors.
    """
    capacity = int(vector.capacity())
    if capacity and _storage_layout_ok():
        begin = ctypes.c_void_p.from_address(int(vector.this)).value
        if begin:
            # Assigned through a ctypes array rather than ctypes.memset, a foreign call that
            # lets go of the GIL and may wait a whole switch interval to get it back.
            (ctypes.c_char * capacity).from_address(begin).raw = bytes(capacity)
            return
    for index in range(vector.size()):
        vector[index] = 0


class Gate:
    """Runs `getattr(target, name)(*args)` for PyKCS11 objects (library, session, low level).

    Args:
        pid: the process the PKCS#11 module was loaded in.

    Attributes:
        fault: for tests only: when set, called with the method name before each call.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.fault: Fault | None = None

    def check_process(self) -> None:
        """Raises RuntimeError in a process other than the one that loaded the module."""
        if os.getpid() != self.pid:
            raise RuntimeError(
                "this Pkcs11Library was loaded before a fork; PKCS#11 is not fork-safe: "
                "load the module again in the child process"
            )

    def call(self, target: Any, name: str, *args: Any) -> Any:
        """`target.name(*args)`, after the fork check and the injected fault; a `ckbytelist`
        result comes back as `bytes`.

        Raises:
            RuntimeError: called from a forked child.
            PyKCS11.PyKCS11Error: the call (or the injected fault) failed.
        """
        self.check_process()
        fault = self.fault
        if fault is not None:
            fault(name)
        result = getattr(target, name)(*args)
        if isinstance(result, PyKCS11.LowLevel.ckbytelist):
            return vector_bytes(result)
        return result
