"""The `Hsm` port over PKCS#11 (PyKCS11), tested against SoftHSM2 and meant for real HSMs.

Two classes:

- `Pkcs11Library` loads one PKCS#11 module once per process, finds tokens by label and can
  finalise and initialise the module again when the device breaks. It refuses to be used from
  a forked child: PKCS#11 sessions must not cross a fork.
- `Pkcs11Hsm` is one token: a bounded pool of logged-in read/write sessions, one mapping table
  from `CKR_*` codes to domain errors, a per-process cache of object handles, and the key
  templates of invariant 1 (DESIGN.md).

Only the exceptions of `broker.errors` leave `Pkcs11Hsm` (plus `RuntimeError` for
misuse such as a call from a forked child). Every PKCS#11 failure is logged with the CKR name as
a structured field; never a PIN, a key or plaintext.
"""

from __future__ import annotations

import enum
import logging
import os
import queue
import struct
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import PyKCS11
from PyKCS11 import LowLevel

from broker.errors import (
    AlreadyExists,
    DecryptionFailed,
    FailedPrecondition,
    HsmObjectMissing,
    HsmUnavailable,
    InvalidArgument,
)
from broker.ports import HsmInfo

log = logging.getLogger(__name__)

_T = TypeVar("_T")

#: GCM nonce length: the only one the broker uses (NIST SP 800-38D's recommended 96 bits).
GCM_IV_BYTES = 12
#: GCM tag length in bytes (128 bits).
GCM_TAG_BYTES = 16
#: DER of the OID 1.2.840.10045.3.1.7 (prime256v1, NIST P-256), the value of CKA_EC_PARAMS.
P256_EC_PARAMS = bytes.fromhex("06082a8648ce3d030107")
#: Length of an uncompressed SEC1 P-256 point (0x04 || X || Y).
P256_POINT_BYTES = 65
#: Longest label accepted, in UTF-8 bytes.
MAX_LABEL_BYTES = 255
#: Largest single C_GenerateRandom request.
MAX_RANDOM_BYTES = 1 << 16

# CKA_ALLOWED_MECHANISMS is an array of CK_MECHANISM_TYPE, i.e. native `unsigned long`s.
# PyKCS11 passes it as raw bytes; "@L" is exactly CK_ULONG on every platform (on LP64 Linux
# it equals the measured `struct.pack("=Q", ...)` form).
_CK_ULONG = struct.Struct("@L")

_USER_STATES = frozenset({PyKCS11.CKS_RO_USER_FUNCTIONS, PyKCS11.CKS_RW_USER_FUNCTIONS})

#: The attributes `Pkcs11Hsm.attributes` reports, in this order.
SECURITY_ATTRIBUTES: tuple[int, ...] = (
    PyKCS11.CKA_CLASS,
    PyKCS11.CKA_KEY_TYPE,
    PyKCS11.CKA_LABEL,
    PyKCS11.CKA_ID,
    PyKCS11.CKA_TOKEN,
    PyKCS11.CKA_PRIVATE,
    PyKCS11.CKA_SENSITIVE,
    PyKCS11.CKA_ALWAYS_SENSITIVE,
    PyKCS11.CKA_EXTRACTABLE,
    PyKCS11.CKA_NEVER_EXTRACTABLE,
    PyKCS11.CKA_MODIFIABLE,
    PyKCS11.CKA_COPYABLE,
    PyKCS11.CKA_DESTROYABLE,
    PyKCS11.CKA_LOCAL,
    PyKCS11.CKA_KEY_GEN_MECHANISM,
    PyKCS11.CKA_ENCRYPT,
    PyKCS11.CKA_DECRYPT,
    PyKCS11.CKA_WRAP,
    PyKCS11.CKA_UNWRAP,
    PyKCS11.CKA_SIGN,
    PyKCS11.CKA_SIGN_RECOVER,
    PyKCS11.CKA_VERIFY,
    PyKCS11.CKA_VERIFY_RECOVER,
    PyKCS11.CKA_DERIVE,
    PyKCS11.CKA_TRUSTED,
    PyKCS11.CKA_WRAP_WITH_TRUSTED,
    PyKCS11.CKA_VALUE_LEN,
    PyKCS11.CKA_EC_PARAMS,
    PyKCS11.CKA_ALLOWED_MECHANISMS,
)


def pack_mechanisms(*mechanisms: int) -> list[int]:
    """The value of CKA_ALLOWED_MECHANISMS for PyKCS11: the bytes of native CK_ULONGs."""
    return list(b"".join(_CK_ULONG.pack(m) for m in mechanisms))


def unpack_mechanisms(raw: object) -> list[int]:
    """Inverse of `pack_mechanisms` for a value read back with getAttributeValue."""
    data = bytes(raw)  # type: ignore[call-overload]
    if len(data) % _CK_ULONG.size:
        raise ValueError("CKA_ALLOWED_MECHANISMS is not an array of CK_ULONG")
    return [m for (m,) in _CK_ULONG.iter_unpack(data)]


def ckr_name(code: int) -> str:
    """The `CKR_*` name of a PKCS#11 return value (or its hex form when unknown)."""
    name = PyKCS11.CKR.get(code)
    return name if isinstance(name, str) else f"CKR_0x{code & 0xFFFFFFFF:08X}"


# PyKCS11's reverse tables keep the last of two aliases (CKK_ECDSA, CKA_ECDSA_PARAMS, ...);
# report the current names of PKCS#11 v2.40.
_CURRENT_NAMES = {
    ("CKK", PyKCS11.CKK_EC): "CKK_EC",
    ("CKM", PyKCS11.CKM_EC_KEY_PAIR_GEN): "CKM_EC_KEY_PAIR_GEN",
    ("CKA", PyKCS11.CKA_EC_PARAMS): "CKA_EC_PARAMS",
}


def _name(table: dict[Any, Any], value: object) -> object:
    name = table.get(value)
    if not isinstance(name, str):
        return value
    return _CURRENT_NAMES.get((name.split("_", 1)[0], value), name)


def _handle(value: int) -> LowLevel.CK_OBJECT_HANDLE:
    handle = LowLevel.CK_OBJECT_HANDLE()
    handle.assign(value)
    return handle


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
    every `Pkcs11Hsm` (one per token) and to `hsm_sim.softhsm.ensure_token`.

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
                lib.load(self.module_path)
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

    def _check_pid(self) -> None:
        if os.getpid() != self._pid:
            raise RuntimeError(
                "this Pkcs11Library was loaded before a fork; PKCS#11 is not fork-safe: "
                "load the module again in the child process"
            )

    @property
    def pykcs11(self) -> PyKCS11.PyKCS11Lib:
        """The underlying PyKCS11 library (for token set-up and tests)."""
        self._check_pid()
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
        self._check_pid()
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
        with self.using() as lib:
            try:
                for slot in lib.getSlotList(tokenPresent=True):
                    info = lib.getTokenInfo(slot)
                    if not info.flags & PyKCS11.CKF_TOKEN_INITIALIZED:
                        continue
                    label = _token_label(info)
                    if label in found:
                        raise HsmUnavailable(
                            f"two tokens are labelled {label!r}; relabel or remove one"
                        )
                    found[label] = int(slot)
            except PyKCS11.PyKCS11Error as exc:
                _log_ckr("list tokens", exc)
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
        with self.using() as lib:
            try:
                for slot in lib.getSlotList(tokenPresent=True):
                    if not lib.getTokenInfo(slot).flags & PyKCS11.CKF_TOKEN_INITIALIZED:
                        return int(slot)
            except PyKCS11.PyKCS11Error as exc:
                _log_ckr("find free slot", exc)
                raise HsmUnavailable(f"cannot list PKCS#11 slots ({ckr_name(exc.value)})") from exc
        raise HsmUnavailable("no free PKCS#11 slot to initialise a token in")

    def init_token(self, slot: int, so_pin: str, label: str) -> None:
        """C_InitToken: (re)initialises the token in `slot`, destroying what it held.

        Raises:
            HsmUnavailable: the module refused.
        """
        with self.using() as lib:
            try:
                lib.initToken(slot, so_pin, _pad_label(label))
            except PyKCS11.PyKCS11Error as exc:
                _log_ckr("init token", exc)
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
        self._check_pid()
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
                rv = self._lib.lib.C_Finalize()
                if rv not in (PyKCS11.CKR_OK, PyKCS11.CKR_CRYPTOKI_NOT_INITIALIZED):
                    log.warning("pkcs11 finalize failed", extra={"ckr": ckr_name(rv)})
            self._generation += 1
            self._initialized = False
            rv = self._lib.lib.C_Initialize()
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

    def close(self) -> None:
        """Finalises and unloads the module; the object is unusable afterwards."""
        self._check_pid()
        with self._lock.exclusive(self._reinit_drain_timeout):
            self._initialized = False
            self._generation += 1
            self._lib.unload()
        with Pkcs11Library._loaded_guard:
            Pkcs11Library._loaded.pop((self._pid, self.module_path), None)


# --------------------------------------------------------------------------------------------
# Error mapping


class _Kind(enum.Enum):
    """What a CKR code means for the session, the cache and the caller."""

    DEVICE = "device"  # drop the session; probe the token (maybe re-initialise) next time
    SESSION = "session"  # drop the session; the next call opens a fresh one
    HANDLE = "handle"  # stale object handle: evict the cache, find again, retry once
    REFUSED = "refused"  # the key's template or the mechanism forbids it; session is fine
    BAD_TAG = "bad_tag"  # GCM tag did not verify; session is fine


_DEFAULT_TABLE: dict[int, _Kind] = {
    PyKCS11.CKR_GENERAL_ERROR: _Kind.DEVICE,
    PyKCS11.CKR_FUNCTION_FAILED: _Kind.DEVICE,
    PyKCS11.CKR_HOST_MEMORY: _Kind.DEVICE,
    PyKCS11.CKR_DEVICE_ERROR: _Kind.DEVICE,
    PyKCS11.CKR_DEVICE_MEMORY: _Kind.DEVICE,
    PyKCS11.CKR_DEVICE_REMOVED: _Kind.DEVICE,
    PyKCS11.CKR_TOKEN_NOT_PRESENT: _Kind.DEVICE,
    PyKCS11.CKR_TOKEN_NOT_RECOGNIZED: _Kind.DEVICE,
    PyKCS11.CKR_CRYPTOKI_NOT_INITIALIZED: _Kind.DEVICE,
    PyKCS11.CKR_SESSION_HANDLE_INVALID: _Kind.SESSION,
    PyKCS11.CKR_SESSION_CLOSED: _Kind.SESSION,
    PyKCS11.CKR_USER_NOT_LOGGED_IN: _Kind.SESSION,
    PyKCS11.CKR_OPERATION_ACTIVE: _Kind.SESSION,
    PyKCS11.CKR_OPERATION_NOT_INITIALIZED: _Kind.SESSION,
    PyKCS11.CKR_OBJECT_HANDLE_INVALID: _Kind.HANDLE,
    PyKCS11.CKR_KEY_HANDLE_INVALID: _Kind.HANDLE,
    PyKCS11.CKR_MECHANISM_INVALID: _Kind.REFUSED,
    PyKCS11.CKR_MECHANISM_PARAM_INVALID: _Kind.REFUSED,
    PyKCS11.CKR_KEY_FUNCTION_NOT_PERMITTED: _Kind.REFUSED,
    PyKCS11.CKR_KEY_TYPE_INCONSISTENT: _Kind.REFUSED,
    PyKCS11.CKR_KEY_SIZE_RANGE: _Kind.REFUSED,
    PyKCS11.CKR_ACTION_PROHIBITED: _Kind.REFUSED,
}

#: The one table: per operation, CKR code -> what it means. Codes not listed are treated as
#: DEVICE (fail closed, drop the session): after an unexpected error a session may be left
#: with an operation active (SoftHSM2 does so after CKR_ARGUMENTS_BAD).
ERROR_TABLE: dict[str, dict[int, _Kind]] = {
    "default": _DEFAULT_TABLE,
    # SoftHSM2 answers a GCM tag mismatch (wrong key, IV, AAD, tag or ciphertext) with
    # CKR_GENERAL_ERROR; other tokens use the codes the standard names.
    "decrypt": {
        **_DEFAULT_TABLE,
        PyKCS11.CKR_GENERAL_ERROR: _Kind.BAD_TAG,
        PyKCS11.CKR_ENCRYPTED_DATA_INVALID: _Kind.BAD_TAG,
        PyKCS11.CKR_ENCRYPTED_DATA_LEN_RANGE: _Kind.BAD_TAG,
    },
}

_AUTH_FAILURES = frozenset(
    {
        PyKCS11.CKR_PIN_INCORRECT,
        PyKCS11.CKR_PIN_INVALID,
        PyKCS11.CKR_PIN_LEN_RANGE,
        PyKCS11.CKR_PIN_EXPIRED,
        PyKCS11.CKR_PIN_LOCKED,
        PyKCS11.CKR_USER_PIN_NOT_INITIALIZED,
    }
)


def _classify(operation: str, code: int) -> _Kind:
    table = ERROR_TABLE.get(operation, _DEFAULT_TABLE)
    return table.get(code, _Kind.DEVICE)


def _log_ckr(
    operation: str, exc: PyKCS11.PyKCS11Error, level: int = logging.WARNING, **fields: object
) -> None:
    log.log(
        level,
        "pkcs11 call failed",
        extra={"hsm_operation": operation, "ckr": ckr_name(exc.value), **fields},
    )


class _TokenLost(Exception):
    """Internal: a search found nothing and the token itself no longer answers."""

    def __init__(self, code: int) -> None:
        super().__init__(ckr_name(code))
        self.code = code


# --------------------------------------------------------------------------------------------
# Sessions


@dataclass(slots=True)
class _PooledSession:
    session: PyKCS11.Session
    generation: int
    broken: bool = False


#: Signature of a fault hook: called with the PyKCS11 method name before each call.
FaultHook = Callable[[str], None]


class _Lease:
    """One session lent to one operation: every PKCS#11 call of the operation goes through
    `call`, so the fault hook sees it."""

    def __init__(self, hsm: Pkcs11Hsm, pooled: _PooledSession) -> None:
        self.hsm = hsm
        self.pooled = pooled
        self.session = pooled.session

    def call(self, name: str, *args: Any) -> Any:
        hook = self.hsm.fault_hook
        if hook is not None:
            hook(name)
        return getattr(self.session, name)(*args)

    def find(self, template: list[tuple[int, Any]]) -> list[int]:
        """Materialised handle values of the objects matching `template`."""
        return [h.value() for h in self.call("findObjects", template)]

    def probe_token(self) -> None:
        """Raises `_TokenLost` when the token does not answer C_GetTokenInfo.

        SoftHSM2 answers searches with nothing (not an error) once its token directory is
        gone; this probe tells "no such object" from "no token".
        """
        hook = self.hsm.fault_hook
        try:
            if hook is not None:
                hook("getTokenInfo")
            self.hsm._library.pykcs11.getTokenInfo(self.hsm._slot_cached())
        except PyKCS11.PyKCS11Error as exc:
            raise _TokenLost(exc.value) from exc

    def key(self, label: str, cls: int) -> LowLevel.CK_OBJECT_HANDLE:
        """The handle of the one object of class `cls` labelled `label` (cached).

        Raises:
            HsmObjectMissing: there is none.
            HsmUnavailable: several objects carry that label and class.
        """
        cache_key = (label, cls)
        value = self.hsm._cache_get(cache_key)
        if value is None:
            found = self.find([(PyKCS11.CKA_CLASS, cls), (PyKCS11.CKA_LABEL, label)])
            if not found:
                self.probe_token()
                raise HsmObjectMissing(
                    f"HSM {self.hsm.info.name!r} holds no {_name(PyKCS11.CKO, cls)} "
                    f"labelled {label!r}"
                )
            if len(found) > 1:
                raise HsmUnavailable(
                    f"HSM {self.hsm.info.name!r} holds {len(found)} objects labelled {label!r}; "
                    "refusing to guess which one is the key"
                )
            value = found[0]
            self.hsm._cache_put(cache_key, value)
        return _handle(value)


class Pkcs11Hsm:
    """One PKCS#11 token as the `Hsm` port.

    Sessions: at most `pool_size` read/write sessions, each leased to one operation at a time
    (PKCS#11 sessions run one operation at a time). A session whose call failed with a
    device- or session-class error is dropped; that call raises `HsmUnavailable`, and the
    next one probes the token, re-initialises the module if the token no longer answers, and
    opens a fresh logged-in session.

    Construction makes no PKCS#11 call: a wrong PIN or a missing token shows up as
    `HsmUnavailable` from `check()` and every other method, so the broker can report "not
    ready" and retry.

    Args:
        library: the process's loaded module.
        token_label: CKA_LABEL of the token (the label given at C_InitToken).
        pin: the user PIN; kept in memory to log in again after recovery, never logged.
        info: name, jurisdiction and operator of this HSM.
        pool_size: most sessions open at once.
        lease_timeout: seconds to wait for a free session before `HsmUnavailable`.

    Attributes:
        info: as given.
        fault_hook: for tests only: when set, called with the PyKCS11 method name
            ("encrypt", "findObjects", "openSession", "login", "getTokenInfo", ...) before
            each PKCS#11 call; raising `PyKCS11.PyKCS11Error` there simulates a failing HSM.
    """

    def __init__(
        self,
        library: Pkcs11Library,
        token_label: str,
        pin: str,
        info: HsmInfo,
        pool_size: int = 4,
        *,
        lease_timeout: float = 5.0,
    ) -> None:
        if pool_size < 1:
            raise ValueError("pool_size must be at least 1")
        if not pin:
            raise ValueError("an empty PIN cannot log in")
        self.info = info
        self.fault_hook: FaultHook | None = None
        self._library = library
        self._token_label = token_label
        self._pin = pin
        self._pool_size = pool_size
        self._lease_timeout = lease_timeout
        self._idle: queue.LifoQueue[_PooledSession] = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(pool_size)
        self._state_lock = threading.Lock()
        self._create_lock = threading.Lock()
        self._suspect = False
        self._closed = False
        self._slot: tuple[int, int] | None = None  # (generation, slot id)
        self._cache: dict[tuple[str, int], int] = {}
        self._cache_generation = library.generation

    def __repr__(self) -> str:
        return (
            f"Pkcs11Hsm(name={self.info.name!r}, token={self._token_label!r}, "
            f"pool_size={self._pool_size})"
        )

    # -- the port --------------------------------------------------------------------------

    def generate_kek(self, label: str) -> None:
        """Generates an AES-256 key-encryption key inside the token.

        Every usage flag is set explicitly (SoftHSM2 turns unset wrap, unwrap and verify on),
        CKA_ALLOWED_MECHANISMS restricts the key to CKM_AES_GCM, and CKA_COPYABLE is false
        so no C_CopyObject can produce a twin.

        Raises:
            AlreadyExists: an object with that label exists.
            HsmUnavailable: the token failed.
        """
        _check_label(label)
        template = kek_template(label)

        def work(lease: _Lease) -> None:
            if lease.find([(PyKCS11.CKA_LABEL, label)]):
                raise AlreadyExists(f"HSM {self.info.name!r} already holds {label!r}")
            lease.probe_token()
            lease.call("generateKey", template, PyKCS11.Mechanism(PyKCS11.CKM_AES_KEY_GEN, None))

        with self._create_lock:
            self._run("generate_kek", work)
        log.info("kek generated", extra={"hsm": self.info.name, "label": label})

    def encrypt(self, label: str, iv: bytes, plaintext: bytes, aad: bytes) -> bytes:
        """AES-256-GCM inside the HSM with a 128-bit tag; returns ciphertext || tag.

        Args:
            label: the KEK's label.
            iv: 12 bytes, unique per key (SoftHSM2 cannot generate GCM IVs).
            plaintext: may be empty.
            aad: additional authenticated data; may be empty.

        Raises:
            InvalidArgument: the IV is not 12 bytes.
            HsmObjectMissing: no key with that label.
            FailedPrecondition: the key refuses GCM encryption (not a broker KEK).
            HsmUnavailable: the token failed.
        """
        _check_label(label)
        _check_iv(iv)

        def work(lease: _Lease) -> bytes:
            key = lease.key(label, PyKCS11.CKO_SECRET_KEY)
            mech = PyKCS11.AES_GCM_Mechanism(iv, aad, GCM_TAG_BYTES * 8)
            if not plaintext:
                # PyKCS11 passes an empty buffer as NULL, which SoftHSM2 rejects with
                # CKR_ARGUMENTS_BAD (leaving the operation active); multi-part encryption
                # with no update produces the bare tag.
                lease.call("encryptInit", mech, key)
                return bytes(lease.call("encryptFinal"))
            return bytes(lease.call("encrypt", key, plaintext, mech))

        return self._run("encrypt", work)

    def decrypt(self, label: str, iv: bytes, ciphertext: bytes, aad: bytes) -> bytes:
        """Inverse of `encrypt`.

        Raises:
            InvalidArgument: the IV is not 12 bytes.
            DecryptionFailed: the tag did not verify (wrong AAD, IV, key or ciphertext).
            HsmObjectMissing: no key with that label.
            FailedPrecondition: the key refuses GCM decryption (not a broker KEK).
            HsmUnavailable: the token failed.
        """
        _check_label(label)
        _check_iv(iv)
        if len(ciphertext) < GCM_TAG_BYTES:
            # Too short to hold a tag; never sent to the token (SoftHSM2 leaves the session
            # with an active operation after such input).
            raise DecryptionFailed

        def work(lease: _Lease) -> bytes:
            key = lease.key(label, PyKCS11.CKO_SECRET_KEY)
            mech = PyKCS11.AES_GCM_Mechanism(iv, aad, GCM_TAG_BYTES * 8)
            return bytes(lease.call("decrypt", key, ciphertext, mech))

        return self._run("decrypt", work)

    def generate_signing_key(self, label: str) -> bytes:
        """Generates an ECDSA P-256 key pair inside the token; returns the public point.

        Both objects carry `label` as CKA_LABEL and CKA_ID. The private key is a sensitive,
        non-extractable, non-modifiable, non-copyable token object that signs only with
        CKM_ECDSA; the public key verifies only.

        Returns:
            The uncompressed SEC1 point (65 bytes).

        Raises:
            AlreadyExists: an object with that label exists.
            HsmUnavailable: the token failed.
        """
        _check_label(label)
        public_template, private_template = signing_key_templates(label)

        def work(lease: _Lease) -> bytes:
            if lease.find([(PyKCS11.CKA_LABEL, label)]):
                raise AlreadyExists(f"HSM {self.info.name!r} already holds {label!r}")
            lease.probe_token()
            public, _private = lease.call(
                "generateKeyPair",
                public_template,
                private_template,
                PyKCS11.Mechanism(PyKCS11.CKM_EC_KEY_PAIR_GEN, None),
            )
            (raw,) = lease.call("getAttributeValue", public, [PyKCS11.CKA_EC_POINT], True)
            return _unwrap_ec_point(raw)

        with self._create_lock:
            point = self._run("generate_signing_key", work)
        log.info("signing key generated", extra={"hsm": self.info.name, "label": label})
        return point

    def public_point(self, label: str) -> bytes:
        """The uncompressed SEC1 point of the signing key `label` (65 bytes).

        Raises:
            HsmObjectMissing: no such key pair.
            HsmUnavailable: the token failed or returned a malformed point.
        """
        _check_label(label)

        def work(lease: _Lease) -> bytes:
            key = lease.key(label, PyKCS11.CKO_PUBLIC_KEY)
            (raw,) = lease.call("getAttributeValue", key, [PyKCS11.CKA_EC_POINT], True)
            return _unwrap_ec_point(raw)

        return self._run("public_point", work)

    def sign(self, label: str, digest: bytes) -> bytes:
        """Raw ECDSA (CKM_ECDSA) over a SHA-256 digest made on the host.

        Returns:
            r || s, 64 bytes (the JWS ES256 signature format).

        Raises:
            InvalidArgument: the digest is not 32 bytes.
            HsmObjectMissing: no such private key.
            FailedPrecondition: the key refuses to sign.
            HsmUnavailable: the token failed.
        """
        _check_label(label)
        if len(digest) != 32:
            raise InvalidArgument("an ES256 signature is made over a 32-byte SHA-256 digest")

        def work(lease: _Lease) -> bytes:
            key = lease.key(label, PyKCS11.CKO_PRIVATE_KEY)
            signature = bytes(
                lease.call("sign", key, digest, PyKCS11.Mechanism(PyKCS11.CKM_ECDSA, None))
            )
            if len(signature) != 64:
                raise HsmUnavailable(
                    f"HSM {self.info.name!r} returned a {len(signature)}-byte P-256 signature"
                )
            return signature

        return self._run("sign", work)

    def random(self, length: int) -> bytes:
        """`length` bytes from the token's RNG (C_GenerateRandom).

        Raises:
            InvalidArgument: length is negative or above 65536.
            HsmUnavailable: the token failed.
        """
        if not 0 <= length <= MAX_RANDOM_BYTES:
            raise InvalidArgument(f"random length must be 0..{MAX_RANDOM_BYTES}")
        if length == 0:
            return b""
        data = self._run("random", lambda lease: bytes(lease.call("generateRandom", length)))
        if len(data) != length:
            raise HsmUnavailable(f"HSM {self.info.name!r} returned short random data")
        return data

    def has_object(self, label: str) -> bool:
        """True when an object with that label is on the token.

        Raises:
            HsmUnavailable: the token failed (an unreachable token is never "no object").
        """
        _check_label(label)

        def work(lease: _Lease) -> bool:
            if lease.find([(PyKCS11.CKA_LABEL, label)]):
                return True
            lease.probe_token()
            return False

        return self._run("has_object", work)

    def destroy(self, label: str) -> None:
        """Destroys every object with that label (no error when there is none).

        Raises:
            HsmUnavailable: the token failed.
        """
        _check_label(label)

        def work(lease: _Lease) -> int:
            found = lease.find([(PyKCS11.CKA_LABEL, label)])
            if not found:
                lease.probe_token()
            for value in found:
                lease.call("destroyObject", _handle(value))
            return len(found)

        try:
            count = self._run("destroy", work)
        finally:
            self._cache_evict_label(label)
        if count:
            log.info(
                "hsm objects destroyed",
                extra={"hsm": self.info.name, "label": label, "objects": count},
            )

    def attributes(self, label: str) -> dict[str, object]:
        """The security-relevant attributes of the key object(s) with that label.

        The top level holds the attributes of the object that keeps the secret (the
        CKO_SECRET_KEY, or the CKO_PRIVATE_KEY of a pair), keyed by `CKA_*` name: booleans as
        bool; CKA_CLASS, CKA_KEY_TYPE and CKA_KEY_GEN_MECHANISM as names; CKA_ID and
        CKA_EC_PARAMS as bytes; CKA_ALLOWED_MECHANISMS as a list of `CKM_*` names; None for an
        attribute the object does not have. Two extra keys:
        "public" (the CKO_PUBLIC_KEY's attributes, same form, when the label names a pair)
        and "objects" (how many objects carry the label; anything but 1 for a KEK or 2 for a
        key pair means a duplicate label, which a start-up check must refuse).

        Raises:
            HsmObjectMissing: no object with that label.
            HsmUnavailable: the token failed.
        """
        _check_label(label)

        def work(lease: _Lease) -> dict[str, object]:
            found = lease.find([(PyKCS11.CKA_LABEL, label)])
            if not found:
                lease.probe_token()
                raise HsmObjectMissing(f"HSM {self.info.name!r} holds nothing labelled {label!r}")
            by_class: dict[object, dict[str, object]] = {}
            for value in found:
                raw = lease.call(
                    "getAttributeValue", _handle(value), list(SECURITY_ATTRIBUTES), False
                )
                attrs = _decode_attributes(raw)
                by_class.setdefault(attrs["CKA_CLASS"], attrs)
            main = (
                by_class.get("CKO_SECRET_KEY")
                or by_class.get("CKO_PRIVATE_KEY")
                or next(iter(by_class.values()))
            )
            result = dict(main)
            if "CKO_PUBLIC_KEY" in by_class and main is not by_class["CKO_PUBLIC_KEY"]:
                result["public"] = by_class["CKO_PUBLIC_KEY"]
            result["objects"] = len(found)
            return result

        return self._run("attributes", work)

    def check(self) -> None:
        """Cheap liveness probe (C_GetTokenInfo on a leased, logged-in session).

        Raises:
            HsmUnavailable: the token is unreachable, or the PIN is refused.
        """
        self._run("check", lambda lease: lease.probe_token())

    def close(self) -> None:
        """Closes every idle session of this token; later calls raise HsmUnavailable.

        Sessions leased at that moment are closed when their operation ends.
        """
        self._closed = True
        self._drop_idle()

    # -- machinery -------------------------------------------------------------------------

    def _run(self, operation: str, work: Callable[[_Lease], _T]) -> _T:
        """Runs `work` on a leased session, mapping PKCS#11 errors through `ERROR_TABLE`.

        A stale object handle is re-found and the operation retried once.
        """
        for attempt in range(2):
            with self._lease(operation) as lease:
                try:
                    return work(lease)
                except _TokenLost as exc:
                    lease.pooled.broken = True
                    self._suspect = True
                    log.warning(
                        "hsm token not answering",
                        extra={"hsm": self.info.name, "hsm_operation": operation, "ckr": str(exc)},
                    )
                    raise HsmUnavailable(
                        f"HSM {self.info.name!r} is unreachable ({exc}); nothing was done, "
                        "retry later"
                    ) from exc
                except PyKCS11.PyKCS11Error as exc:
                    kind = _classify(operation, exc.value)
                    # A bad tag is the caller's doing (and may be an attacker's): no warning.
                    _log_ckr(
                        operation,
                        exc,
                        level=logging.DEBUG if kind is _Kind.BAD_TAG else logging.WARNING,
                        hsm=self.info.name,
                        kind=kind.value,
                    )
                    if kind is _Kind.HANDLE and attempt == 0:
                        self._cache_clear()
                        continue
                    raise self._map(operation, kind, exc, lease) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _map(
        self, operation: str, kind: _Kind, exc: PyKCS11.PyKCS11Error, lease: _Lease
    ) -> Exception:
        code = ckr_name(exc.value)
        if kind is _Kind.BAD_TAG:
            # A tag mismatch and a dying device look alike on SoftHSM2; ask the token.
            try:
                lease.probe_token()
            except _TokenLost:
                kind = _Kind.DEVICE
            else:
                return DecryptionFailed()
        if kind is _Kind.REFUSED:
            return FailedPrecondition(
                f"HSM {self.info.name!r} refused {operation} with this key ({code}); "
                "the key's template does not allow it"
            )
        lease.pooled.broken = True
        if kind is not _Kind.SESSION:
            # A device-class error may have broken every session of the token: the idle ones
            # go too, so that the next call really starts on a fresh session.
            self._suspect = True
            self._drop_idle()
        return HsmUnavailable(
            f"HSM {self.info.name!r} failed during {operation} ({code}); nothing was done, "
            "retry later"
        )

    @contextmanager
    def _lease(self, operation: str) -> Iterator[_Lease]:
        if self._closed:
            raise HsmUnavailable(f"HSM {self.info.name!r} is closed")
        if not self._slots.acquire(timeout=self._lease_timeout):
            log.warning(
                "hsm session pool exhausted",
                extra={"hsm": self.info.name, "hsm_operation": operation},
            )
            raise HsmUnavailable(
                f"no session of HSM {self.info.name!r} came free within "
                f"{self._lease_timeout:g}s; retry later"
            )
        try:
            self._recover_if_needed()
            with self._library.using():
                pooled = self._checkout()
                try:
                    yield _Lease(self, pooled)
                finally:
                    self._checkin(pooled)
        finally:
            self._slots.release()

    def _recover_if_needed(self) -> None:
        """Probes a suspect token; re-initialises the module when it does not answer."""
        library = self._library
        if not self._suspect and library.initialized:
            return
        seen = library.generation
        if library.initialized:
            try:
                with library.using() as lib:
                    hook = self.fault_hook
                    if hook is not None:
                        hook("getTokenInfo")
                    lib.getTokenInfo(self._slot_cached())
                self._suspect = False
                return
            except PyKCS11.PyKCS11Error as exc:
                _log_ckr("probe", exc, hsm=self.info.name)
            except HsmUnavailable:
                pass
        library.reinitialize(seen)
        self._suspect = False

    def _slot_cached(self) -> int:
        generation = self._library.generation
        cached = self._slot
        if cached is not None and cached[0] == generation:
            return cached[1]
        slot = self._library.slot_for_token(self._token_label)
        self._slot = (generation, slot)
        return slot

    def _checkout(self) -> _PooledSession:
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

    def _drop_idle(self) -> None:
        while True:
            try:
                pooled = self._idle.get_nowait()
            except queue.Empty:
                return
            self._close_session(pooled)

    def _checkin(self, pooled: _PooledSession) -> None:
        if pooled.generation != self._library.generation:
            return
        if pooled.broken or self._closed:
            self._close_session(pooled)
            return
        self._idle.put(pooled)

    def _close_session(self, pooled: _PooledSession) -> None:
        if pooled.generation != self._library.generation:
            return
        try:
            with self._library.using():
                pooled.session.closeSession()
        except (PyKCS11.PyKCS11Error, HsmUnavailable, RuntimeError):
            pass  # A session we drop because it failed may well refuse to close.

    def _open_session(self, generation: int) -> _PooledSession:
        hook = self.fault_hook
        lib = self._library.pykcs11
        slot = self._slot_cached()
        try:
            if hook is not None:
                hook("openSession")
            session = lib.openSession(slot, PyKCS11.CKF_RW_SESSION)
        except PyKCS11.PyKCS11Error as exc:
            _log_ckr("open session", exc, hsm=self.info.name)
            self._suspect = True
            raise HsmUnavailable(
                f"cannot open a session on HSM {self.info.name!r} ({ckr_name(exc.value)}); "
                "retry later"
            ) from exc
        pooled = _PooledSession(session, generation)
        try:
            self._login(session)
        except BaseException:
            self._close_session(pooled)
            raise
        log.debug("hsm session opened", extra={"hsm": self.info.name, "generation": generation})
        return pooled

    def _login(self, session: PyKCS11.Session) -> None:
        """Logs the token in unless it already is (login state is per token, not session)."""
        hook = self.fault_hook
        try:
            if hook is not None:
                hook("getSessionInfo")
            if session.getSessionInfo().state in _USER_STATES:
                return
            if hook is not None:
                hook("login")
            session.login(self._pin)
        except PyKCS11.PyKCS11Error as exc:
            if exc.value == PyKCS11.CKR_USER_ALREADY_LOGGED_IN:
                return
            _log_ckr("login", exc, hsm=self.info.name)
            if exc.value in _AUTH_FAILURES:
                raise HsmUnavailable(
                    f"HSM {self.info.name!r} refused the user PIN of token "
                    f"{self._token_label!r} ({ckr_name(exc.value)}); check the configured PIN"
                ) from exc
            self._suspect = True
            raise HsmUnavailable(
                f"cannot log in to HSM {self.info.name!r} ({ckr_name(exc.value)}); retry later"
            ) from exc

    # Object handles of token objects stay valid across the sessions of one process
    # initialisation (SoftHSM2 measured), so they are cached per generation.

    def _cache_sync(self) -> None:
        generation = self._library.generation
        if self._cache_generation != generation:
            with self._state_lock:
                self._cache.clear()
                self._cache_generation = generation

    def _cache_get(self, key: tuple[str, int]) -> int | None:
        self._cache_sync()
        return self._cache.get(key)

    def _cache_put(self, key: tuple[str, int], value: int) -> None:
        self._cache_sync()
        with self._state_lock:
            self._cache[key] = value

    def _cache_evict_label(self, label: str) -> None:
        with self._state_lock:
            for key in [k for k in self._cache if k[0] == label]:
                del self._cache[key]

    def _cache_clear(self) -> None:
        with self._state_lock:
            self._cache.clear()


# --------------------------------------------------------------------------------------------
# Templates and helpers


def kek_template(label: str) -> list[tuple[int, Any]]:
    """The C_GenerateKey template of a KEK (invariant 1 of DESIGN.md); every flag explicit."""
    return [
        (PyKCS11.CKA_CLASS, PyKCS11.CKO_SECRET_KEY),
        (PyKCS11.CKA_KEY_TYPE, PyKCS11.CKK_AES),
        (PyKCS11.CKA_VALUE_LEN, 32),
        (PyKCS11.CKA_TOKEN, True),
        (PyKCS11.CKA_PRIVATE, True),
        (PyKCS11.CKA_SENSITIVE, True),
        (PyKCS11.CKA_EXTRACTABLE, False),
        (PyKCS11.CKA_MODIFIABLE, False),
        (PyKCS11.CKA_COPYABLE, False),
        (PyKCS11.CKA_WRAP, False),
        (PyKCS11.CKA_UNWRAP, False),
        (PyKCS11.CKA_SIGN, False),
        (PyKCS11.CKA_VERIFY, False),
        (PyKCS11.CKA_DERIVE, False),
        (PyKCS11.CKA_ENCRYPT, True),
        (PyKCS11.CKA_DECRYPT, True),
        (PyKCS11.CKA_LABEL, label),
        (PyKCS11.CKA_ID, label.encode()),
        (PyKCS11.CKA_ALLOWED_MECHANISMS, pack_mechanisms(PyKCS11.CKM_AES_GCM)),
    ]


def signing_key_templates(label: str) -> tuple[list[tuple[int, Any]], list[tuple[int, Any]]]:
    """(public, private) C_GenerateKeyPair templates of an ECDSA P-256 signing key."""
    ecdsa_only = pack_mechanisms(PyKCS11.CKM_ECDSA)
    public = [
        (PyKCS11.CKA_CLASS, PyKCS11.CKO_PUBLIC_KEY),
        (PyKCS11.CKA_KEY_TYPE, PyKCS11.CKK_EC),
        (PyKCS11.CKA_EC_PARAMS, P256_EC_PARAMS),
        (PyKCS11.CKA_TOKEN, True),
        (PyKCS11.CKA_PRIVATE, False),
        (PyKCS11.CKA_MODIFIABLE, False),
        (PyKCS11.CKA_VERIFY, True),
        (PyKCS11.CKA_VERIFY_RECOVER, False),
        (PyKCS11.CKA_ENCRYPT, False),
        (PyKCS11.CKA_WRAP, False),
        (PyKCS11.CKA_DERIVE, False),
        (PyKCS11.CKA_LABEL, label),
        (PyKCS11.CKA_ID, label.encode()),
        (PyKCS11.CKA_ALLOWED_MECHANISMS, ecdsa_only),
    ]
    private = [
        (PyKCS11.CKA_CLASS, PyKCS11.CKO_PRIVATE_KEY),
        (PyKCS11.CKA_KEY_TYPE, PyKCS11.CKK_EC),
        (PyKCS11.CKA_TOKEN, True),
        (PyKCS11.CKA_PRIVATE, True),
        (PyKCS11.CKA_SENSITIVE, True),
        (PyKCS11.CKA_EXTRACTABLE, False),
        (PyKCS11.CKA_MODIFIABLE, False),
        (PyKCS11.CKA_COPYABLE, False),
        (PyKCS11.CKA_SIGN, True),
        (PyKCS11.CKA_SIGN_RECOVER, False),
        (PyKCS11.CKA_DECRYPT, False),
        (PyKCS11.CKA_UNWRAP, False),
        (PyKCS11.CKA_DERIVE, False),
        (PyKCS11.CKA_LABEL, label),
        (PyKCS11.CKA_ID, label.encode()),
        (PyKCS11.CKA_ALLOWED_MECHANISMS, ecdsa_only),
    ]
    return public, private


def _check_label(label: str) -> None:
    if not isinstance(label, str) or not label or len(label.encode()) > MAX_LABEL_BYTES:
        raise InvalidArgument(f"an HSM object label has 1 to {MAX_LABEL_BYTES} bytes")


def _check_iv(iv: bytes) -> None:
    if len(iv) != GCM_IV_BYTES:
        raise InvalidArgument(f"a GCM IV has {GCM_IV_BYTES} bytes")


def _unwrap_ec_point(raw: object) -> bytes:
    """CKA_EC_POINT is a DER OCTET STRING around the SEC1 point (some tokens omit it)."""
    data: bytes = bytes(raw)  # type: ignore[call-overload]
    if len(data) == P256_POINT_BYTES + 2 and data[0] == 0x04 and data[1] == P256_POINT_BYTES:
        data = data[2:]
    if len(data) != P256_POINT_BYTES or data[0] != 0x04:
        raise HsmUnavailable("the HSM returned a malformed P-256 public point")
    return data


def _decode_attributes(raw: list[object]) -> dict[str, object]:
    out: dict[str, object] = {}
    for attr, value in zip(SECURITY_ATTRIBUTES, raw, strict=True):
        name = str(_name(PyKCS11.CKA, attr))
        if value is None:
            out[name] = None
        elif attr == PyKCS11.CKA_CLASS:
            out[name] = _name(PyKCS11.CKO, value)
        elif attr == PyKCS11.CKA_KEY_TYPE:
            out[name] = _name(PyKCS11.CKK, value)
        elif attr == PyKCS11.CKA_KEY_GEN_MECHANISM:
            out[name] = _name(PyKCS11.CKM, value)
        elif attr == PyKCS11.CKA_ALLOWED_MECHANISMS:
            out[name] = [_name(PyKCS11.CKM, m) for m in unpack_mechanisms(value)]
        elif isinstance(value, bool | int | str):
            out[name] = value
        else:
            out[name] = bytes(value)  # type: ignore[call-overload]
    return out
