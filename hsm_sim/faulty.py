"""`FaultyHsm`: an `Hsm` that passes every call to another and misbehaves on the chosen ones.

It sits at the port boundary, so it wraps the PKCS#11 adapter and the unit tests' fake alike,
and what it raises is what the services would see: domain errors, or the error the PKCS#11
adapter maps a given CKR code to.

    hsm = FaultyHsm(inner)
    hsm.fail(HsmUnavailable("down"), nth=2, methods={"decrypt"})   # the 2nd decrypt fails
    hsm.fail_like_pkcs11(PyKCS11.CKR_DEVICE_ERROR, methods={"encrypt"})
    hsm.delay(0.2, methods={"sign"})
    release = hsm.hang(methods={"random"})   # random blocks until release.set()
    hsm.clear()
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

from broker.adapters.pkcs11.errors import classify, domain_error
from broker.ports import Hsm, KeyKind, KeyProperties

_T = TypeVar("_T")

#: Longest a hung call waits for its release, so a forgotten release cannot stall a test run.
MAX_HANG_SECONDS = 60.0


@dataclass(slots=True)
class Rule:
    """One misbehaviour: for calls of `methods` (every method when empty), from the `nth`
    matching call on and for `times` calls, wait `delay` seconds, block until `release` is
    set, then raise what `error` makes (when set) instead of calling the wrapped HSM."""

    methods: frozenset[str]
    nth: int = 1
    times: int = 1
    error: Callable[[str], Exception] | None = None
    delay: float = 0.0
    release: threading.Event | None = None
    seen: int = 0
    fired: int = 0

    def applies(self, method: str) -> bool:
        if self.methods and method not in self.methods:
            return False
        self.seen += 1
        if self.nth <= self.seen < self.nth + self.times:
            self.fired += 1
            return True
        return False


def _raising(error: Exception) -> Callable[[str], Exception]:
    return lambda _method: error


class FaultyHsm:
    """Wraps `inner` (any `Hsm`); with no rule it behaves exactly like it.

    Attributes:
        inner: the wrapped HSM.
        info: the wrapped HSM's.
        calls: names of the port methods called so far, in order.
    """

    def __init__(self, inner: Hsm) -> None:
        self.inner = inner
        self.info = inner.info
        self.calls: list[str] = []
        self._rules: list[Rule] = []
        self._lock = threading.Lock()

    # -- the plan ----------------------------------------------------------------------------

    def fail(
        self,
        error: Exception | Callable[[str], Exception],
        *,
        nth: int = 1,
        times: int = 1,
        methods: Iterable[str] = (),
    ) -> Rule:
        """From the `nth` matching call on, `times` calls raise `error` (an exception, or a
        function of the method name making one) without reaching the wrapped HSM."""
        make = error if not isinstance(error, Exception) else _raising(error)
        return self._add(Rule(frozenset(methods), nth, times, make))

    def fail_like_pkcs11(
        self, code: int, *, nth: int = 1, times: int = 1, methods: Iterable[str] = ()
    ) -> Rule:
        """Like `fail`, with the error the PKCS#11 adapter raises when the call fails with
        CKR `code` (through the adapter's own table: `HsmUnavailable` for a device or session
        error, `FailedPrecondition` for a refused mechanism, `DecryptionFailed` for a bad tag)."""

        def make(method: str) -> Exception:
            return domain_error(self.info.name, method, classify(method, code), code)

        return self.fail(make, nth=nth, times=times, methods=methods)

    def delay(
        self, seconds: float, *, nth: int = 1, times: int = 1_000_000, methods: Iterable[str] = ()
    ) -> Rule:
        """Matching calls take `seconds` longer, then proceed."""
        return self._add(Rule(frozenset(methods), nth, times, delay=seconds))

    def hang(
        self, *, nth: int = 1, times: int = 1_000_000, methods: Iterable[str] = ()
    ) -> threading.Event:
        """Matching calls block until the returned event is set (at most `MAX_HANG_SECONDS`),
        then proceed."""
        release = threading.Event()
        self._add(Rule(frozenset(methods), nth, times, release=release))
        return release

    def clear(self) -> None:
        """Forgets every rule; hung calls are released."""
        with self._lock:
            rules, self._rules = self._rules, []
        for rule in rules:
            if rule.release is not None:
                rule.release.set()

    def _add(self, rule: Rule) -> Rule:
        with self._lock:
            self._rules.append(rule)
        return rule

    def _through(self, method: str, call: Callable[[], _T]) -> _T:
        with self._lock:
            self.calls.append(method)
            due = [rule for rule in self._rules if rule.applies(method)]
        for rule in due:
            if rule.delay:
                time.sleep(rule.delay)
            if rule.release is not None:
                rule.release.wait(MAX_HANG_SECONDS)
            if rule.error is not None:
                raise rule.error(method)
        return call()

    # -- the port ----------------------------------------------------------------------------

    def generate_kek(self, label: str) -> None:
        self._through("generate_kek", lambda: self.inner.generate_kek(label))

    def encrypt(self, label: str, iv: bytes, plaintext: bytes, aad: bytes) -> bytes:
        return self._through("encrypt", lambda: self.inner.encrypt(label, iv, plaintext, aad))

    def decrypt(self, label: str, iv: bytes, ciphertext: bytes, aad: bytes) -> bytes:
        return self._through("decrypt", lambda: self.inner.decrypt(label, iv, ciphertext, aad))

    def generate_signing_key(self, label: str) -> bytes:
        return self._through("generate_signing_key", lambda: self.inner.generate_signing_key(label))

    def public_point(self, label: str) -> bytes:
        return self._through("public_point", lambda: self.inner.public_point(label))

    def sign(self, label: str, digest: bytes) -> bytes:
        return self._through("sign", lambda: self.inner.sign(label, digest))

    def random(self, length: int) -> bytes:
        return self._through("random", lambda: self.inner.random(length))

    def destroy(self, label: str) -> None:
        self._through("destroy", lambda: self.inner.destroy(label))

    def key_properties(self, label: str, kind: KeyKind) -> KeyProperties:
        return self._through("key_properties", lambda: self.inner.key_properties(label, kind))

    def write_anchor(self, label: str, data: bytes) -> None:
        self._through("write_anchor", lambda: self.inner.write_anchor(label, data))

    def read_anchors(self, prefix: str) -> dict[str, list[bytes]]:
        return self._through("read_anchors", lambda: self.inner.read_anchors(prefix))

    def check(self) -> None:
        self._through("check", self.inner.check)

    def close(self) -> None:
        """Releases hung calls and closes the wrapped HSM (never fails by a rule)."""
        self.clear()
        self.inner.close()
