"""The session pool of one token, and the lease of one session to one operation.

A `SessionPool` keeps at most `size` logged-in read/write sessions; `lease(operation)` lends
one as a `Lease`, through which the operation makes all its PKCS#11 calls. A session whose
call failed is dropped, never reused; after a device-class failure the next lease probes the
token and re-initialises the module if it does not answer.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import PyKCS11
from PyKCS11 import LowLevel

from broker.adapters.pkcs11.errors import AUTH_FAILURES, TokenLost, ckr_name, log_ckr
from broker.adapters.pkcs11.gate import Gate
from broker.adapters.pkcs11.library import Pkcs11Library
from broker.adapters.pkcs11.templates import pkcs11_name
from broker.errors import HsmObjectMissing, HsmPinRefused, HsmUnavailable

log = logging.getLogger(__name__)

_USER_STATES = frozenset({PyKCS11.CKS_RO_USER_FUNCTIONS, PyKCS11.CKS_RW_USER_FUNCTIONS})


def object_handle(value: int) -> LowLevel.CK_OBJECT_HANDLE:
    """A PyKCS11 object handle for a materialised handle value."""
    handle = LowLevel.CK_OBJECT_HANDLE()
    handle.assign(value)
    return handle


@dataclass(slots=True)
class PooledSession:
    session: PyKCS11.Session
    generation: int
    broken: bool = False


class HandleCache:
    """Object handles by (label, object class), for one module generation.

    Handles of token objects stay valid across the sessions of one module initialisation
    (SoftHSM2 measured); a re-initialisation voids them all.
    """

    def __init__(self, generation: Callable[[], int]) -> None:
        self._generation = generation
        self._seen = generation()
        self._lock = threading.Lock()
        self._values: dict[tuple[str, int], int] = {}

    def _sync(self) -> None:
        generation = self._generation()
        with self._lock:
            if self._seen != generation:
                self._values.clear()
                self._seen = generation

    def get(self, key: tuple[str, int]) -> int | None:
        self._sync()
        return self._values.get(key)

    def put(self, key: tuple[str, int], value: int) -> None:
        self._sync()
        with self._lock:
            self._values[key] = value

    def evict_label(self, label: str) -> None:
        with self._lock:
            for key in [k for k in self._values if k[0] == label]:
                del self._values[key]

    def clear(self) -> None:
        with self._lock:
            self._values.clear()


class Lease:
    """One session lent to one operation; every PKCS#11 call goes through `call`.

    Args:
        gate: the gate of the token's calls.
        pooled: the leased session.
        cache: the token's object handles.
        probe: raises `TokenLost` when the token does not answer (see `probe_token`).
        hsm_name: for messages.
    """

    def __init__(
        self,
        gate: Gate,
        pooled: PooledSession,
        cache: HandleCache,
        probe: Callable[[], None],
        hsm_name: str,
    ) -> None:
        self._gate = gate
        self._pooled = pooled
        self._cache = cache
        self._probe = probe
        self._hsm = hsm_name

    def call(self, name: str, *args: Any) -> Any:
        """`session.name(*args)` through the gate."""
        return self._gate.call(self._pooled.session, name, *args)

    def call_with(self, wrap: Callable[[Any], Any], name: str, *args: Any) -> Any:
        """`wrap(session).name(*args)` through the gate: for operations the adapter performs
        with PyKCS11's low-level functions on this session (see `inplace.InPlace`)."""
        return self._gate.call(wrap(self._pooled.session), name, *args)

    def discard(self) -> None:
        """Marks the session broken: it is closed, not pooled again, when the lease ends."""
        self._pooled.broken = True

    def find(self, template: list[tuple[int, Any]]) -> list[int]:
        """Materialised handle values of the objects matching `template`."""
        return [h.value() for h in self.call("findObjects", template)]

    def probe_token(self) -> None:
        """Raises `TokenLost` when the token does not answer C_GetTokenInfo.

        SoftHSM2 answers searches with nothing (not an error) once its token directory is
        gone; this probe tells "no such object" from "no token".
        """
        self._probe()

    def key(self, label: str, cls: int) -> LowLevel.CK_OBJECT_HANDLE:
        """The handle of the one object of class `cls` labelled `label` (cached).

        Raises:
            HsmObjectMissing: there is none.
            HsmUnavailable: several objects carry that label and class.
        """
        cache_key = (label, cls)
        value = self._cache.get(cache_key)
        if value is None:
            found = self.find([(PyKCS11.CKA_CLASS, cls), (PyKCS11.CKA_LABEL, label)])
            if not found:
                self.probe_token()
                raise HsmObjectMissing(
                    f"HSM {self._hsm!r} holds no {pkcs11_name(PyKCS11.CKO, cls)} labelled {label!r}"
                )
            if len(found) > 1:
                raise HsmUnavailable(
                    f"HSM {self._hsm!r} holds {len(found)} objects labelled {label!r}; "
                    "refusing to guess which one is the key"
                )
            value = found[0]
            self._cache.put(cache_key, value)
        return object_handle(value)


class SessionPool:
    """At most `size` logged-in read/write sessions of one token.

    Args:
        library: the process's loaded module.
        gate: the gate of this token's calls.
        token_label: the token's label.
        pin: the user PIN; kept to log in again after recovery, never logged.
        hsm_name: for messages and logs.
        size: most sessions open at once.
        lease_timeout: seconds to wait for a free session before `HsmUnavailable`.

    Attributes:
        cache: the object handles of this token.
        size: most sessions open at once.
    """

    def __init__(
        self,
        library: Pkcs11Library,
        gate: Gate,
        token_label: str,
        pin: str,
        hsm_name: str,
        size: int,
        lease_timeout: float,
    ) -> None:
        if size < 1:
            raise ValueError("pool_size must be at least 1")
        if not pin:
            raise ValueError("an empty PIN cannot log in")
        self.cache = HandleCache(lambda: library.generation)
        self._library = library
        self._gate = gate
        self._token_label = token_label
        self._pin = pin
        self._hsm = hsm_name
        self._lease_timeout = lease_timeout
        self._idle: queue.LifoQueue[PooledSession] = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(size)
        self.size = size
        self._leased = 0
        self._leased_lock = threading.Lock()
        self._suspect = False
        self._closed = False
        self._slot: tuple[int, int] | None = None  # (generation, slot id)

    @property
    def idle_sessions(self) -> int:
        """How many sessions wait in the pool."""
        return self._idle.qsize()

    @property
    def in_use(self) -> int:
        """How many sessions are leased to an operation now (the metrics read it)."""
        return self._leased

    def _count_lease(self, change: int) -> None:
        with self._leased_lock:
            self._leased += change

    @contextmanager
    def lease(self, operation: str) -> Iterator[Lease]:
        """Lends one logged-in session for the block.

        Raises:
            HsmUnavailable: the pool is closed, no session came free in time, or no session
                could be opened and logged in.
        """
        if self._closed:
            raise HsmUnavailable(f"HSM {self._hsm!r} is closed")
        if not self._slots.acquire(timeout=self._lease_timeout):
            log.warning(
                "hsm session pool exhausted", extra={"hsm": self._hsm, "hsm_operation": operation}
            )
            raise HsmUnavailable(
                f"no session of HSM {self._hsm!r} came free within "
                f"{self._lease_timeout:g}s; retry later"
            )
        self._count_lease(1)
        try:
            self._recover_if_needed()
            with self._library.using():
                pooled = self._checkout()
                try:
                    yield Lease(self._gate, pooled, self.cache, self.probe_token, self._hsm)
                finally:
                    self._checkin(pooled)
        finally:
            self._count_lease(-1)
            self._slots.release()

    def probe_token(self) -> None:
        """C_GetTokenInfo on the token's slot; raises `TokenLost` when it fails."""
        try:
            self._gate.call(self._library.pykcs11, "getTokenInfo", self._slot_id())
        except PyKCS11.PyKCS11Error as exc:
            raise TokenLost(exc.value) from exc

    def mark_suspect(self) -> None:
        """The token may be broken: the next lease probes it first."""
        self._suspect = True

    def drop_idle(self) -> None:
        """Closes every idle session."""
        while True:
            try:
                pooled = self._idle.get_nowait()
            except queue.Empty:
                return
            self._close_session(pooled)

    def close(self) -> None:
        """Closes the idle sessions; later leases fail, leased sessions close when returned."""
        self._closed = True
        self.drop_idle()

    # -- machinery -------------------------------------------------------------------------

    def _recover_if_needed(self) -> None:
        """Probes a suspect token; re-initialises the module when it does not answer."""
        library = self._library
        if not self._suspect and library.initialized:
            return
        seen = library.generation
        if library.initialized:
            try:
                with library.using():
                    self.probe_token()
                self._suspect = False
                return
            except TokenLost as exc:
                log_ckr("probe", exc.code, hsm=self._hsm)
            except HsmUnavailable:
                pass
        library.reinitialize(seen)
        self._suspect = False

    def _slot_id(self) -> int:
        generation = self._library.generation
        cached = self._slot
        if cached is not None and cached[0] == generation:
            return cached[1]
        slot = self._library.slot_for_token(self._token_label)
        self._slot = (generation, slot)
        return slot

    def _checkout(self) -> PooledSession:
        generation = self._library.generation
        while True:
            try:
                pooled = self._idle.get_nowait()
            except queue.Empty:
                break
            if pooled.generation == generation:
                return pooled
            # A session of an earlier module initialisation: its handle number may now name
            # another session, so it is forgotten, never closed.
        return self._open_session(generation)

    def _checkin(self, pooled: PooledSession) -> None:
        if pooled.generation != self._library.generation:
            return
        if pooled.broken or self._closed:
            self._close_session(pooled)
            return
        self._idle.put(pooled)

    def _close_session(self, pooled: PooledSession) -> None:
        if pooled.generation != self._library.generation:
            return
        try:
            with self._library.using():
                self._gate.call(pooled.session, "closeSession")
        except (PyKCS11.PyKCS11Error, HsmUnavailable, RuntimeError):
            pass  # A session we drop because it failed may well refuse to close.

    def _open_session(self, generation: int) -> PooledSession:
        lib = self._library.pykcs11
        slot = self._slot_id()
        try:
            session = self._gate.call(lib, "openSession", slot, PyKCS11.CKF_RW_SESSION)
        except PyKCS11.PyKCS11Error as exc:
            log_ckr("open session", exc.value, hsm=self._hsm)
            self._suspect = True
            raise HsmUnavailable(
                f"cannot open a session on HSM {self._hsm!r} ({ckr_name(exc.value)}); retry later"
            ) from exc
        pooled = PooledSession(session, generation)
        try:
            self._login(session)
        except BaseException:
            self._close_session(pooled)
            raise
        log.debug("hsm session opened", extra={"hsm": self._hsm, "generation": generation})
        return pooled

    def _login(self, session: PyKCS11.Session) -> None:
        """Logs the token in unless it already is (login state is per token, not session)."""
        call = self._gate.call
        try:
            if call(session, "getSessionInfo").state in _USER_STATES:
                return
            call(session, "login", self._pin)
        except PyKCS11.PyKCS11Error as exc:
            if exc.value == PyKCS11.CKR_USER_ALREADY_LOGGED_IN:
                return
            log_ckr("login", exc.value, hsm=self._hsm)
            if exc.value in AUTH_FAILURES:
                raise HsmPinRefused(
                    f"HSM {self._hsm!r} refused the user PIN of token "
                    f"{self._token_label!r} ({ckr_name(exc.value)}); check the configured PIN"
                ) from exc
            self._suspect = True
            raise HsmUnavailable(
                f"cannot log in to HSM {self._hsm!r} ({ckr_name(exc.value)}); retry later"
            ) from exc
