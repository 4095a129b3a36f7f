"""Faults for the adapter's one PyKCS11 gate (`broker.adapters.pkcs11.gate.Gate`).

Every PKCS#11 call of a `Pkcs11Hsm` (and of a `Pkcs11Library`) goes through its `gate`, which
calls `gate.fault(name)` first, with the PyKCS11 method name. A fault raises
`PyKCS11.PyKCS11Error` to simulate a failing HSM, or sleeps or blocks to simulate a slow one:

    hsm.gate.fault = FailOnCall(nth=1, code=PyKCS11.CKR_DEVICE_ERROR, names=frozenset({"decrypt"}))
    with injected(hsm, CallLog()) as calls: ...
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import PyKCS11

from broker.adapters.pkcs11 import Fault, Gate


@dataclass(slots=True)
class FailOnCall:
    """Makes PKCS#11 calls fail.

    Counts the calls whose PyKCS11 method name is in `names` (every call when empty) and
    raises `PyKCS11Error(code)` on the `nth` one (1-based) and the `times - 1` after it.

    Attributes:
        nth: which matching call fails first.
        code: the CKR code to raise, e.g. `PyKCS11.CKR_DEVICE_ERROR`.
        names: PyKCS11 method names to count ("encrypt", "sign", "findObjects", ...).
        times: how many consecutive matching calls fail.
        seen: matching calls so far.
        failed: calls made to fail so far.
    """

    nth: int
    code: int
    names: frozenset[str] = frozenset()
    times: int = 1
    seen: int = 0
    failed: int = 0

    def __call__(self, name: str) -> None:
        if self.names and name not in self.names:
            return
        self.seen += 1
        if self.nth <= self.seen < self.nth + self.times:
            self.failed += 1
            raise PyKCS11.PyKCS11Error(self.code)


@dataclass(slots=True)
class CallLog:
    """Records the PyKCS11 calls made, then passes them on to `then` (if any)."""

    then: Fault | None = None
    names: list[str] = field(default_factory=list)

    def __call__(self, name: str) -> None:
        self.names.append(name)
        if self.then is not None:
            self.then(name)

    def count(self, name: str) -> int:
        return self.names.count(name)


class HasGate(Protocol):
    """A `Pkcs11Hsm` or a `Pkcs11Library`."""

    gate: Gate


_F = TypeVar("_F", bound=Fault)


@contextmanager
def injected(target: HasGate, fault: _F) -> Iterator[_F]:
    """Installs `fault` in `target`'s gate for the block, then restores the previous one."""
    previous = target.gate.fault
    target.gate.fault = fault
    try:
        yield fault
    finally:
        target.gate.fault = previous
