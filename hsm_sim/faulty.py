"""`FaultyHsm`: an `Hsm` that passes every call to another and misbehaves on the chosen ones.

It sits at the port boundary, so it wraps the PKCS#11 adapter and the unit tests' fake alike,
and what it raises is what the services would see: domain errors, or the error the PKCS#11
adapter maps a given CKR code to.

    hsm = FaultyHsm(inner)
    hsm.fail(HsmUnavailable("down"), nth=2, methods={"decrypt"})   # the 2nd decrypt fails
    hsm.fail_like_pkcs11(PyKCS11.CKR_DEVICE_ERROR, methods={"encrypt"})
    hsm.delay(0.2, methods={"sign"})
    release = hsm.hang(methods={"random"})   # random blocks until release.set()
    hsm.fail_at_random(PyKCS11.CKR_DEVICE_ERROR, 0.05, seed=7)   # 5% of every call fails
    hsm.hang(methods={"generate_kek"}, after=True)   # the key is made, the caller never hears
    hsm.clear()

A broker process selects it through its configuration (tests only, docs/operations.md):

    [[hsm]]
    fault_injection = "hsm_sim.faulty:from_spec"
    fault_spec = "decrypt nth=2 ckr=CKR_DEVICE_ERROR; * p=0.01 seed=7 ckr=CKR_DEVICE_ERROR"

with `KEYBROKER_ALLOW_FAULT_INJECTION=1` in its environment; `SPEC` is parsed by `parse_spec`.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import PyKCS11

from broker.adapters.pkcs11.errors import ckr_name, classify, domain_error
from broker.ports import Hsm, KeyKind, KeyProperties

log = logging.getLogger(__name__)

_T = TypeVar("_T")

#: Longest a hung call waits for its release, so a forgotten release cannot stall a test run.
MAX_HANG_SECONDS = 60.0
#: `times` of a rule that never stops firing.
ALWAYS = 1_000_000_000


@dataclass(slots=True)
class Rule:
    """One misbehaviour: for calls of `methods` (every method when empty), from the `nth`
    matching call on and for `times` calls (each with probability `probability`, drawn from
    `rng`), wait `delay` seconds, block until `release` is set (at most `hang_seconds`), then
    raise what `error` makes (when set) instead of calling the wrapped HSM. With `after`, all
    of that happens once the wrapped HSM has done the call: its effect stays, the caller
    never hears of it."""

    methods: frozenset[str]
    nth: int = 1
    times: int = 1
    error: Callable[[str], Exception] | None = None
    delay: float = 0.0
    release: threading.Event | None = None
    probability: float = 1.0
    rng: random.Random | None = None
    after: bool = False
    hang_seconds: float = MAX_HANG_SECONDS
    #: What it does, in words (logged each time it fires).
    text: str = ""
    seen: int = 0
    fired: int = 0

    def applies(self, method: str) -> bool:
        if self.methods and method not in self.methods:
            return False
        self.seen += 1
        if not self.nth <= self.seen < self.nth + self.times:
            return False
        if self.rng is not None and self.rng.random() >= self.probability:
            return False
        self.fired += 1
        return True

    def act(self, method: str) -> None:
        """Delays, hangs or raises, as the rule says."""
        log.warning(
            "injected fault: %s on %s",
            self.text or "fault",
            method,
            extra={"fault_call": self.seen},
        )
        if self.delay:
            time.sleep(self.delay)
        if self.release is not None:
            self.release.wait(self.hang_seconds)
        if self.error is not None:
            raise self.error(method)


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
        return self._add(Rule(frozenset(methods), nth, times, make, text=f"error {error}"))

    def fail_like_pkcs11(
        self, code: int, *, nth: int = 1, times: int = 1, methods: Iterable[str] = ()
    ) -> Rule:
        """Like `fail`, with the error the PKCS#11 adapter raises when the call fails with
        CKR `code` (through the adapter's own table: `HsmUnavailable` for a device or session
        error, `FailedPrecondition` for a refused mechanism, `DecryptionFailed` for a bad tag)."""

        rule = self.fail(self._pkcs11_error(code), nth=nth, times=times, methods=methods)
        rule.text = ckr_name(code)
        return rule

    def fail_at_random(
        self, code: int, probability: float, *, seed: int = 0, methods: Iterable[str] = ()
    ) -> Rule:
        """Each matching call fails like `fail_like_pkcs11(code)` with `probability`, drawn
        from a generator seeded with `seed`: the same calls in the same order fail again."""
        if not 0.0 <= probability <= 1.0:
            raise ValueError("a probability is between 0 and 1")
        rule = Rule(
            frozenset(methods),
            times=ALWAYS,
            error=self._pkcs11_error(code),
            probability=probability,
            rng=random.Random(seed),  # noqa: S311 - reproducible faults, not secrets
            text=f"{ckr_name(code)} at random (p={probability:g}, seed={seed})",
        )
        return self._add(rule)

    def _pkcs11_error(self, code: int) -> Callable[[str], Exception]:
        def make(method: str) -> Exception:
            return domain_error(self.info.name, method, classify(method, code), code)

        return make

    def delay(
        self, seconds: float, *, nth: int = 1, times: int = 1_000_000, methods: Iterable[str] = ()
    ) -> Rule:
        """Matching calls take `seconds` longer, then proceed."""
        return self._add(
            Rule(frozenset(methods), nth, times, delay=seconds, text=f"delay {seconds:g}s")
        )

    def hang(
        self,
        *,
        nth: int = 1,
        times: int = 1_000_000,
        methods: Iterable[str] = (),
        after: bool = False,
        seconds: float = MAX_HANG_SECONDS,
    ) -> threading.Event:
        """Matching calls block until the returned event is set (at most `seconds`), then
        proceed; with `after`, they block once the wrapped HSM has done the call (a key is
        generated, and then the process can be killed before anyone records it)."""
        release = threading.Event()
        text = "hang after the call" if after else "hang"
        rule = Rule(frozenset(methods), nth, times, release=release, after=after, text=text)
        rule.hang_seconds = seconds
        self._add(rule)
        return release

    def clear(self) -> None:
        """Forgets every rule; hung calls are released."""
        with self._lock:
            rules, self._rules = self._rules, []
        for rule in rules:
            if rule.release is not None:
                rule.release.set()

    def add(self, spec: FaultSpec) -> Rule:
        """Adds the rule one line of a fault spec describes (`parse_spec`)."""
        error = None if spec.ckr is None else self._pkcs11_error(spec.ckr)
        random_draw = spec.probability is not None
        rule = Rule(
            spec.methods,
            spec.nth,
            spec.times or (1 if error is not None and not random_draw else ALWAYS),
            error=error,
            delay=spec.delay,
            release=None if spec.hang is None else threading.Event(),
            probability=1.0 if spec.probability is None else spec.probability,
            rng=random.Random(spec.seed) if random_draw else None,  # noqa: S311 - as above
            after=spec.after,
            hang_seconds=MAX_HANG_SECONDS if spec.hang is None else spec.hang,
            text=" ".join(spec.words),
        )
        return self._add(rule)

    def _add(self, rule: Rule) -> Rule:
        with self._lock:
            self._rules.append(rule)
        return rule

    def _through(self, method: str, call: Callable[[], _T]) -> _T:
        with self._lock:
            self.calls.append(method)
            due = [rule for rule in self._rules if rule.applies(method)]
        for rule in due:
            if not rule.after:
                rule.act(method)
        result = call()
        for rule in due:
            if rule.after:
                rule.act(method)
        return result

    # -- the port ----------------------------------------------------------------------------

    def generate_kek(self, label: str) -> None:
        self._through("generate_kek", lambda: self.inner.generate_kek(label))

    def encrypt(self, label: str, iv: bytes, plaintext: bytes, aad: bytes) -> bytes:
        return self._through("encrypt", lambda: self.inner.encrypt(label, iv, plaintext, aad))

    def decrypt(self, label: str, iv: bytes, ciphertext: bytes, aad: bytes) -> bytes:
        return self._through("decrypt", lambda: self.inner.decrypt(label, iv, ciphertext, aad))

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
        return self._through(
            "reencrypt",
            lambda: self.inner.reencrypt(label, iv, ciphertext, aad, new_label, new_iv, new_aad),
        )

    def authenticate(self, label: str, iv: bytes, ciphertext: bytes, aad: bytes) -> None:
        self._through("authenticate", lambda: self.inner.authenticate(label, iv, ciphertext, aad))

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

    def labels(self, prefix: str) -> list[str]:
        return self._through("labels", lambda: self.inner.labels(prefix))

    def check(self) -> None:
        self._through("check", self.inner.check)

    def close(self) -> None:
        """Releases hung calls and closes the wrapped HSM (never fails by a rule)."""
        self.clear()
        self.inner.close()


# -- from a configuration -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FaultSpec:
    """One rule of a spec string (see `parse_spec`)."""

    methods: frozenset[str]
    nth: int = 1
    times: int | None = None
    ckr: int | None = None
    delay: float = 0.0
    hang: float | None = None
    after: bool = False
    probability: float | None = None
    seed: int = 0
    words: tuple[str, ...] = field(default=())


#: The port's methods a rule may name (`*` names them all).
PORT_METHODS = frozenset(
    {
        "generate_kek", "encrypt", "decrypt", "reencrypt", "authenticate",
        "generate_signing_key", "public_point", "sign", "random", "destroy", "key_properties",
        "write_anchor", "read_anchors", "labels", "check",
    }
)  # fmt: skip


def _ckr(text: str) -> int:
    name = text.upper()
    name = name if name.startswith("CKR_") else f"CKR_{name}"
    code = getattr(PyKCS11, name, None)
    if isinstance(code, int):
        return code
    try:
        return int(text, 0)
    except ValueError:
        raise ValueError(f"unknown CKR code {text!r} (e.g. CKR_DEVICE_ERROR)") from None


def _rule_of(text: str) -> FaultSpec:
    """One rule: `METHODS WORD...` (see `parse_spec`)."""
    methods_text, *words = text.split()
    methods = frozenset() if methods_text == "*" else frozenset(methods_text.split(","))
    unknown = sorted(methods - PORT_METHODS)
    if unknown:
        raise ValueError(f"{', '.join(unknown)}: no such HSM method (or * for all)")
    values: dict[str, object] = {}
    for word in words:
        key, has_value, value = word.partition("=")
        try:
            if key == "after" and not has_value:
                values["after"] = True
            elif key == "hang":
                values["hang"] = float(value) if has_value else MAX_HANG_SECONDS
            elif key in ("nth", "times", "seed"):
                values[key] = int(value)
            elif key in ("delay", "p"):
                values["probability" if key == "p" else key] = float(value)
            elif key == "ckr":
                values["ckr"] = _ckr(value)
            else:
                raise ValueError(f"unknown word {word!r}")
        except ValueError as exc:
            raise ValueError(f"{word!r}: {exc}") from None
    spec = FaultSpec(methods, words=tuple(words), **values)  # type: ignore[arg-type]
    if spec.ckr is None and not spec.delay and spec.hang is None:
        raise ValueError("a rule needs ckr=, delay= or hang")
    if spec.probability is not None and not 0.0 <= spec.probability <= 1.0:
        raise ValueError("p= is a probability between 0 and 1")
    if spec.nth < 1 or (spec.times is not None and spec.times < 1):
        raise ValueError("nth= and times= count from 1")
    return spec


def parse_spec(text: str) -> list[FaultSpec]:
    """The rules of a fault spec: one per line or `;`-separated, `#` starts a comment;
    `@PATH` reads the spec from a file.

    A rule is `METHODS WORD...`: METHODS is a comma-separated list of the port's methods or
    `*`; the words are `ckr=CKR_NAME` (fail as the adapter does when the HSM answers that
    code), `delay=SECONDS`, `hang` or `hang=SECONDS` (block that long, at most), `after`
    (act once the call is done), `nth=K` (from the K-th matching call), `times=N` (for N
    calls; errors default to 1, the rest to every call), `p=PROBABILITY` with `seed=S`
    (each matching call at random, reproducibly).

    Raises:
        ValueError: one line naming the rule and what is wrong with it.
    """
    text = text.strip()
    if text.startswith("@"):
        text = Path(text[1:]).read_text()
    rules = []
    for line in text.splitlines():
        for part in line.split("#", 1)[0].split(";"):
            if part.strip():
                try:
                    rules.append(_rule_of(part.strip()))
                except ValueError as exc:
                    raise ValueError(f"fault rule {part.strip()!r}: {exc}") from None
    return rules


def from_spec(inner: Hsm, spec: str) -> FaultyHsm:
    """`inner` wrapped in a `FaultyHsm` following `spec` (see `parse_spec`): the factory a
    broker's `fault_injection` setting names. An empty spec injects nothing until a test
    adds rules to the wrapper (`broker.app.hsms[name]`).

    Raises:
        ValueError: the spec is malformed.
    """
    faulty = FaultyHsm(inner)
    for rule in parse_spec(spec):
        faulty.add(rule)
    return faulty
