"""The one door to PyKCS11: every PKCS#11 call of the adapter goes through a `Gate`.

A gate does two things before the call itself: it refuses to run in a forked child (neither
PKCS#11 modules nor PyKCS11 are fork-safe), and it gives an injected fault the chance to act
(tests only: `hsm_sim.faults`). Having one door means one place to inject faults, and no
PKCS#11 call that escapes them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

#: An injected fault: called with the PyKCS11 method name ("encrypt", "findObjects",
#: "openSession", "login", "getTokenInfo", "C_Initialize", ...) before each call. Raising
#: `PyKCS11.PyKCS11Error` simulates a failing HSM; sleeping or blocking simulates a slow one.
Fault = Callable[[str], None]


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
        """`target.name(*args)`, after the fork check and the injected fault.

        Raises:
            RuntimeError: called from a forked child.
            PyKCS11.PyKCS11Error: the call (or the injected fault) failed.
        """
        self.check_process()
        fault = self.fault
        if fault is not None:
            fault(name)
        return getattr(target, name)(*args)
