"""`Pkcs11Library`: one PKCS#11 module loaded once per process.

It finds tokens by label, initialises tokens (for `broker.devhsm`) and can finalise and
initialise the module again when the device breaks. A shared/exclusive lock keeps every
operation off a re-initialisation. Every PyKCS11 call goes through the library's `Gate`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import PyKCS11

from broker.adapters.pkcs11.errors import ckr_name, log_ckr
from broker.adapters.pkcs11.gate import Gate
from broker.errors import HsmUnavailable

log = logging.getLogger(__name__)


def _pad_label(label: str) -> str:
    """A token label as C_InitToken wants it: 32 bytes, blank padded."""
    raw = label.encode()
    if not raw or len(raw) > 32:
        raise ValueError("a token label has 1 to 32 bytes of UTF-8")
    return label + " " * (32 - len(raw))


def _token_label(info: Any) -> str:
    return str(info.label).rstrip(" \x00")


# --------------------------------------------------------------------------------------------
# The library


class _SharedExclusiveLock:
    """Many holders in shared mode (PKCS#11 operations) or one in exclusive mode (C_Finalize
    and C_Initialize), with writer preference. Shared mode is re-entrant per thread."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0
        self._local = threading.local()

    @contextmanager
    def shared(self) -> Iterator[None]:
        depth = getattr(self._local, "depth", 0)
        if depth == 0:
            with self._cond:
                while self._writer or self._writers_waiting:
                    self._cond.wait()
                self._readers += 1
        self._local.depth = depth + 1
        try:
            yield
        finally:
            self._local.depth = depth
            if depth == 0:
                with self._cond:
                    self._readers -= 1
                    if self._readers == 0:
                        self._cond.notify_all()

    @contextmanager
    def exclusive(self, timeout: float) -> Iterator[bool]:
        """Yields True once held; False when in-flight operations did not drain in time."""
        if getattr(self._local, "depth", 0):
            raise RuntimeError("exclusive HSM lock requested while holding it shared")
        deadline = time.monotonic() + timeout
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                acquired = not (self._writer or self._readers)
                if acquired:
                    self._writer = True
            finally:
                self._writers_waiting -= 1
                if not acquired:
                    self._cond.notify_all()
        try:
            yield acquired
        finally:
            if acquired:
                with self._cond:
                    self._writer = False
                    self._cond.notify_all()


class Pkcs11Library:
    """One PKCS#11 module loaded once in this process.

    PKCS#11 allows one C_Initialize per module per process, and neither the module nor
    PyKCS11 is fork-safe: load the library after forking, once, and hand the same instance to
    every `Pkcs11Hsm` (one per token) and to `broker.devhsm.ensure_token`.

    SoftHSM2 reads `SOFTHSM2_CONF` at C_Initialize: set it before constructing this object.
    The value seen at load time is kept in `softhsm2_conf`.

    Args:
        module_path: path of the PKCS#11 module (`libsofthsm2.so`, a vendor library, ...).
        reinit_drain_timeout: seconds `reinitialize` waits for operations in flight to end.
        reinit_min_interval: seconds between two re-initialisation attempts; calls in
            between fail fast with `HsmUnavailable` instead of hammering a broken device.

    Raises:
        RuntimeError: the module is already loaded by another live `Pkcs11Library` of this
            process (use `Pkcs11Library.shared` to get that one), or it cannot be loaded.

    Attributes:
        gate: the door of the library's own PKCS#11 calls (slots, tokens, C_Initialize).
            Each `Pkcs11Hsm` has a gate of its own for its sessions.
    """

    _loaded: weakref.WeakValueDictionary[tuple[int, str], Pkcs11Library] = (
        weakref.WeakValueDictionary()
    )
    _loaded_guard = threading.Lock()

    def __init__(
        self,
        module_path: str,
        *,
        reinit_drain_timeout: float = 10.0,
        reinit_min_interval: float = 1.0,
    ) -> None:
        self.module_path = os.path.realpath(module_path)
        self.reinit_min_interval = reinit_min_interval
        self._last_reinit = float("-inf")
        self.softhsm2_conf = os.environ.get("SOFTHSM2_CONF")
        self._pid = os.getpid()
        self.gate = Gate(self._pid)
        self._lock = _SharedExclusiveLock()
        self._reinit_drain_timeout = reinit_drain_timeout
        self._generation = 0
        self._initialized = False
        key = (self._pid, self.module_path)
        with Pkcs11Library._loaded_guard:
            if key in Pkcs11Library._loaded:
                raise RuntimeError(
                    f"PKCS#11 module {self.module_path} is already loaded in this process; "
                    "pass that Pkcs11Library around or use Pkcs11Library.shared()"
                )
            lib = PyKCS11.PyKCS11Lib()
            try:
                self.gate.call(lib, "load", self.module_path)
            except PyKCS11.PyKCS11Error as exc:
                raise RuntimeError(f"cannot load PKCS#11 module {self.module_path}: {exc}") from exc
            self._lib = lib
            self._initialized = True
            Pkcs11Library._loaded[key] = self
        log.info(
            "pkcs11 module loaded",
            extra={"pkcs11_module": self.module_path, "softhsm2_conf": self.softhsm2_conf},
        )

    def __repr__(self) -> str:
        return f"Pkcs11Library({self.module_path!r}, generation={self._generation})"

    @classmethod
    def loaded(cls, module_path: str) -> Pkcs11Library | None:
        """The live instance of this process for `module_path`, if one is loaded."""
        with cls._loaded_guard:
            return cls._loaded.get((os.getpid(), os.path.realpath(module_path)))

    @classmethod
    def shared(cls, module_path: str) -> Pkcs11Library:
        """The process's instance for `module_path`, loading the module on first use.

        For composition roots that may run more than once in a process (tests starting
        several brokers): they then share one loaded module, one lock and one recovery state.

        Raises:
            RuntimeError: the module was loaded under another `SOFTHSM2_CONF` than the
                current one (a process can use only one), or cannot be loaded.
        """
        existing = cls.loaded(module_path)
        if existing is None:
            try:
                return cls(module_path)
            except RuntimeError:
                existing = cls.loaded(module_path)  # another thread won the race
                if existing is None:
                    raise
        current = os.environ.get("SOFTHSM2_CONF")
        if current != existing.softhsm2_conf:
            raise RuntimeError(
                f"PKCS#11 module {existing.module_path} was loaded with "
                f"SOFTHSM2_CONF={existing.softhsm2_conf}, now {current}; a process can use "
                "only one softhsm2.conf"
            )
        return existing

    # -- guards ----------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        """The process that loaded the module; no other may use it."""
        return self._pid

    @property
    def pykcs11(self) -> PyKCS11.PyKCS11Lib:
        """The underlying PyKCS11 library, to call through a `Gate` (and for tests)."""
        self.gate.check_process()
        return self._lib

    @property
    def generation(self) -> int:
        """Bumped by every `reinitialize`; sessions and handles of an older one are void."""
        return self._generation

    @property
    def initialized(self) -> bool:
        """False after a C_Initialize failed; `reinitialize` must succeed before any use."""
        return self._initialized

    @contextmanager
    def using(self) -> Iterator[PyKCS11.PyKCS11Lib]:
        """Holds off `reinitialize` while the block runs PKCS#11 calls.

        Session and object handles are small integers that C_Initialize hands out again from
        the start: an operation must never span a re-initialisation, or it could act on
        another session (of another token) that got the same number.

        Raises:
            HsmUnavailable: the module is not initialised (a re-initialisation failed).
        """
        self.gate.check_process()
        with self._lock.shared():
            if not self._initialized:
                raise HsmUnavailable(
                    "the PKCS#11 module is not initialised; it will be retried on the next call"
                )
            yield self._lib

    # -- tokens ----------------------------------------------------------------------------

    def tokens(self) -> dict[str, int]:
        """Initialised tokens by label.

        Raises:
            HsmUnavailable: the slots cannot be listed, or two tokens share a label.
        """
        found: dict[str, int] = {}
        call = self.gate.call
        with self.using() as lib:
            try:
                for slot in call(lib, "getSlotList", True):
                    info = call(lib, "getTokenInfo", slot)
                    if not info.flags & PyKCS11.CKF_TOKEN_INITIALIZED:
                        continue
                    label = _token_label(info)
                    if label in found:
                        raise HsmUnavailable(
                            f"two tokens are labelled {label!r}; relabel or remove one"
                        )
                    found[label] = int(slot)
            except PyKCS11.PyKCS11Error as exc:
                log_ckr("list tokens", exc.value)
                raise HsmUnavailable(f"cannot list PKCS#11 tokens ({ckr_name(exc.value)})") from exc
        return found

    def slot_for_token(self, label: str) -> int:
        """The slot holding the initialised token `label`.

        Raises:
            HsmUnavailable: no such token (or the slots cannot be listed).
        """
        slot = self.tokens().get(label)
        if slot is None:
            raise HsmUnavailable(
                f"no initialised PKCS#11 token labelled {label!r}; check the token label "
                "and the module configuration"
            )
        return slot

    def free_slot(self) -> int:
        """A slot whose token is not initialised yet (SoftHSM2 always offers one).

        Raises:
            HsmUnavailable: there is none.
        """
        call = self.gate.call
        with self.using() as lib:
            try:
                for slot in call(lib, "getSlotList", True):
                    if not call(lib, "getTokenInfo", slot).flags & PyKCS11.CKF_TOKEN_INITIALIZED:
                        return int(slot)
            except PyKCS11.PyKCS11Error as exc:
                log_ckr("find free slot", exc.value)
                raise HsmUnavailable(f"cannot list PKCS#11 slots ({ckr_name(exc.value)})") from exc
        raise HsmUnavailable("no free PKCS#11 slot to initialise a token in")

    def init_token(self, slot: int, so_pin: str, label: str) -> None:
        """C_InitToken: (re)initialises the token in `slot`, destroying what it held.

        Raises:
            HsmUnavailable: the module refused.
        """
        with self.using() as lib:
            try:
                self.gate.call(lib, "initToken", slot, so_pin, _pad_label(label))
            except PyKCS11.PyKCS11Error as exc:
                log_ckr("init token", exc.value)
                raise HsmUnavailable(
                    f"cannot initialise token {label!r} ({ckr_name(exc.value)})"
                ) from exc

    # -- recovery --------------------------------------------------------------------------

    def reinitialize(self, seen_generation: int | None = None) -> int:
        """C_Finalize then C_Initialize, to recover from a broken device or token.

        Every session of every token of this module is void afterwards; `Pkcs11Hsm` notices
        through `generation` and opens fresh ones. Waits for operations in flight to end.

        Args:
            seen_generation: the generation the caller found broken; when another thread
                has re-initialised since, nothing is done.

        Returns:
            The current generation.

        Raises:
            HsmUnavailable: in-flight operations did not end in time, or C_Initialize failed
                (the module then stays uninitialised until a later call succeeds).
        """
        self.gate.check_process()
        with self._lock.exclusive(self._reinit_drain_timeout) as acquired:
            if not acquired:
                raise HsmUnavailable(
                    "PKCS#11 re-initialisation postponed: operations still in flight"
                )
            if (
                seen_generation is not None
                and seen_generation != self._generation
                and self._initialized
            ):
                return self._generation
            since = time.monotonic() - self._last_reinit
            if since < self.reinit_min_interval:
                raise HsmUnavailable(
                    f"the PKCS#11 module was re-initialised {since:.1f}s ago and the token "
                    "still fails; retry later"
                )
            self._last_reinit = time.monotonic()
            if self._initialized:
                rv = self._low_level("C_Finalize")
                if rv not in (PyKCS11.CKR_OK, PyKCS11.CKR_CRYPTOKI_NOT_INITIALIZED):
                    log.warning("pkcs11 finalize failed", extra={"ckr": ckr_name(rv)})
            self._generation += 1
            self._initialized = False
            rv = self._low_level("C_Initialize")
            if rv in (PyKCS11.CKR_OK, PyKCS11.CKR_CRYPTOKI_ALREADY_INITIALIZED):
                self._initialized = True
                log.warning(
                    "pkcs11 module re-initialised",
                    extra={"pkcs11_module": self.module_path, "generation": self._generation},
                )
                return self._generation
            log.error(
                "pkcs11 re-initialisation failed",
                extra={"pkcs11_module": self.module_path, "ckr": ckr_name(rv)},
            )
            raise HsmUnavailable(
                f"the PKCS#11 module could not be initialised again ({ckr_name(rv)}); "
                "retrying on the next call"
            )

    def _low_level(self, name: str) -> int:
        """C_Finalize or C_Initialize, whose failure is a return value, not an exception."""
        try:
            return int(self.gate.call(self._lib.lib, name))
        except PyKCS11.PyKCS11Error as exc:  # an injected fault
            return int(exc.value)

    def close(self) -> None:
        """Finalises and unloads the module; the object is unusable afterwards."""
        self.gate.check_process()
        with self._lock.exclusive(self._reinit_drain_timeout):
            self._initialized = False
            self._generation += 1
            self.gate.call(self._lib, "unload")
        with Pkcs11Library._loaded_guard:
            Pkcs11Library._loaded.pop((self._pid, self.module_path), None)
