"""`Pkcs11Hsm`: one PKCS#11 token as the `Hsm` port (PyKCS11; tested against SoftHSM2, meant
for real HSMs).

Only the exceptions of `broker.errors` leave `Pkcs11Hsm` (plus `RuntimeError` for misuse such
as a call from a forked child). Every PKCS#11 failure is logged with the CKR name as a
structured field; never a PIN, a key or plaintext.

Why this file is over 400 lines: it is the port's fifteen operations, one method each, with
the run/map machinery they share; the library, pool, gate, errors, templates and audit
anchors are apart.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import PyKCS11

from broker.adapters.pkcs11 import anchors
from broker.adapters.pkcs11.errors import Kind, TokenLost, classify, domain_error, log_ckr
from broker.adapters.pkcs11.gate import Gate, wipe_vector
from broker.adapters.pkcs11.inplace import InPlace, new_buffer
from broker.adapters.pkcs11.library import Pkcs11Library
from broker.adapters.pkcs11.pool import Lease, SessionPool, object_handle
from broker.adapters.pkcs11.templates import (
    SECURITY_ATTRIBUTES,
    combine_reports,
    decode_attributes,
    kek_template,
    signing_key_templates,
    template_problems,
    unwrap_ec_point,
)
from broker.errors import (
    AlreadyExists,
    DecryptionFailed,
    HsmObjectMissing,
    HsmUnavailable,
    InvalidArgument,
)
from broker.ports import HsmInfo, KeyKind, KeyProperties

log = logging.getLogger(__name__)

_T = TypeVar("_T")

#: GCM nonce length: the only one the broker uses (NIST SP 800-38D's recommended 96 bits).
GCM_IV_BYTES = 12
#: GCM tag length in bytes (128 bits).
GCM_TAG_BYTES = 16
#: Longest label accepted, in UTF-8 bytes.
MAX_LABEL_BYTES = 255
#: Largest single C_GenerateRandom request.
MAX_RANDOM_BYTES = 1 << 16
#: Session-class codes that mean every session of the token is gone, not only this one.
SESSIONS_GONE = frozenset(
    {
        PyKCS11.CKR_SESSION_HANDLE_INVALID,
        PyKCS11.CKR_SESSION_CLOSED,
        PyKCS11.CKR_USER_NOT_LOGGED_IN,
    }
)

#: Told of every operation once it ends (the metrics): HSM name, operation, seconds (waiting
#: for a session included), and whether it failed because the HSM failed or was unreachable.
#: It must be cheap and never raise.
OperationObserver = Callable[[str, str, float, bool], None]


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
        observer: told of every operation (see `OperationObserver`); None for none.

    Attributes:
        info: as given.
        gate: the door of every PKCS#11 call this token's sessions make; tests inject faults
            there (`hsm.gate.fault = hsm_sim.faults.FailOnCall(...)`).
        pool: the session pool (for tests: `pool.idle_sessions`).
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
        observer: OperationObserver | None = None,
    ) -> None:
        self.info = info
        self._observer = observer
        self._library = library
        self.gate = Gate(library.pid)
        self.pool = SessionPool(
            library, self.gate, token_label, pin, info.name, pool_size, lease_timeout
        )
        self._token_label = token_label
        self._pool_size = pool_size
        self._create_lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"Pkcs11Hsm(name={self.info.name!r}, token={self._token_label!r}, "
            f"pool_size={self._pool_size})"
        )

    # -- the port --------------------------------------------------------------------------

    def generate_kek(self, label: str) -> None:
        """Generates an AES-256 key-encryption key inside the token (`templates.KEK`).

        Every usage flag is set explicitly (SoftHSM2 turns unset wrap, unwrap and verify on),
        CKA_ALLOWED_MECHANISMS restricts the key to CKM_AES_GCM, and CKA_COPYABLE is false
        so no C_CopyObject can produce a twin.

        Raises:
            AlreadyExists: an object with that label exists.
            HsmUnavailable: the token failed.
        """
        template = kek_template(label)
        mechanism = PyKCS11.Mechanism(PyKCS11.CKM_AES_KEY_GEN, None)
        self._create(
            "generate_kek", label, lambda lease: lease.call("generateKey", template, mechanism)
        )
        log.info("kek generated", extra={"hsm": self.info.name, "label": label})

    def encrypt(self, label: str, iv: bytes, plaintext: bytes, aad: bytes) -> bytes:
        """AES-256-GCM inside the HSM with a 128-bit tag; returns ciphertext || tag.

        The IV (12 bytes, unique per key) comes from the caller: SoftHSM2 cannot generate GCM
        IVs. Plaintext and AAD may be empty.

        Raises:
            InvalidArgument: the IV is not 12 bytes.
            HsmObjectMissing: no key with that label.
            FailedPrecondition: the key refuses GCM encryption (not a broker KEK).
            HsmUnavailable: the token failed.
        """
        _check_label(label)
        _check_iv(iv)

        def work(lease: Lease) -> bytes:
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

        def work(lease: Lease) -> bytes:
            key = lease.key(label, PyKCS11.CKO_SECRET_KEY)
            mech = PyKCS11.AES_GCM_Mechanism(iv, aad, GCM_TAG_BYTES * 8)
            return bytes(lease.call("decrypt", key, ciphertext, mech))

        return self._run("decrypt", work)

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
        """`decrypt` under `label`, then `encrypt` under `new_label`; the plaintext lives only
        in one PyKCS11 vector, wiped before returning (`inplace`).

        Raises:
            As `decrypt`, then as `encrypt`.
        """
        plaintext = self._open_in_place(label, iv, ciphertext, aad)
        try:
            if not plaintext.size():
                return self.encrypt(new_label, new_iv, b"", new_aad)
            _check_label(new_label)
            _check_iv(new_iv)

            def seal(lease: Lease) -> bytes:
                key = lease.key(new_label, PyKCS11.CKO_SECRET_KEY)
                mech = PyKCS11.AES_GCM_Mechanism(new_iv, new_aad, GCM_TAG_BYTES * 8)
                return bytes(lease.call_with(InPlace, "encrypt", key, plaintext, mech))

            return self._run("encrypt", seal)
        finally:
            wipe_vector(plaintext)

    def authenticate(self, label: str, iv: bytes, ciphertext: bytes, aad: bytes) -> None:
        """`decrypt` whose plaintext is wiped at once: only the tag check matters.

        Raises:
            As `decrypt`.
        """
        wipe_vector(self._open_in_place(label, iv, ciphertext, aad))

    def _open_in_place(self, label: str, iv: bytes, ciphertext: bytes, aad: bytes) -> Any:
        """The plaintext of `ciphertext` in a `ckbytelist` the caller must wipe (wiped here
        when the decryption fails)."""
        _check_label(label)
        _check_iv(iv)
        if len(ciphertext) < GCM_TAG_BYTES:
            raise DecryptionFailed
        plaintext = new_buffer()

        def work(lease: Lease) -> None:
            key = lease.key(label, PyKCS11.CKO_SECRET_KEY)
            mech = PyKCS11.AES_GCM_Mechanism(iv, aad, GCM_TAG_BYTES * 8)
            lease.call_with(InPlace, "decrypt", key, ciphertext, mech, plaintext)

        try:
            self._run("decrypt", work)
        except BaseException:
            wipe_vector(plaintext)
            raise
        return plaintext

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
        public_template, private_template = signing_key_templates(label)
        mechanism = PyKCS11.Mechanism(PyKCS11.CKM_EC_KEY_PAIR_GEN, None)

        def generate(lease: Lease) -> bytes:
            public, _private = lease.call(
                "generateKeyPair", public_template, private_template, mechanism
            )
            (raw,) = lease.call("getAttributeValue", public, [PyKCS11.CKA_EC_POINT], True)
            return unwrap_ec_point(raw, self.info.name)

        point = self._create("generate_signing_key", label, generate)
        log.info("signing key generated", extra={"hsm": self.info.name, "label": label})
        return point

    def public_point(self, label: str) -> bytes:
        """The uncompressed SEC1 point of the signing key `label` (65 bytes).

        Raises:
            HsmObjectMissing: no such key pair.
            HsmUnavailable: the token failed or returned a malformed point.
        """
        _check_label(label)

        def work(lease: Lease) -> bytes:
            key = lease.key(label, PyKCS11.CKO_PUBLIC_KEY)
            (raw,) = lease.call("getAttributeValue", key, [PyKCS11.CKA_EC_POINT], True)
            return unwrap_ec_point(raw, self.info.name)

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

        def work(lease: Lease) -> bytes:
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

    def destroy(self, label: str) -> None:
        """Destroys every object with that label (no error when there is none).

        Raises:
            HsmUnavailable: the token failed.
        """
        _check_label(label)

        def work(lease: Lease) -> int:
            found = lease.find([(PyKCS11.CKA_LABEL, label)])
            if not found:
                lease.probe_token()
            for value in found:
                lease.call("destroyObject", object_handle(value))
            return len(found)

        try:
            count = self._run("destroy", work)
        finally:
            self.pool.cache.evict_label(label)
        if count:
            log.info(
                "hsm objects destroyed",
                extra={"hsm": self.info.name, "label": label, "objects": count},
            )

    def attributes(self, label: str) -> dict[str, object]:
        """The security-relevant attributes of the key object(s) with that label (not part of
        the port: the PKCS#11 view behind `key_properties`, and for tests).

        Keyed by `CKA_*` name, in the form of `templates.decode_value`, for the object that
        keeps the secret (CKO_SECRET_KEY, or the CKO_PRIVATE_KEY of a pair); plus "public"
        (the CKO_PUBLIC_KEY's, same form, for a pair) and "objects" (how many carry the label).

        Raises:
            HsmObjectMissing: no object with that label.
            HsmUnavailable: the token failed.
        """
        _check_label(label)

        def work(lease: Lease) -> dict[str, object]:
            found = lease.find([(PyKCS11.CKA_LABEL, label)])
            if not found:
                lease.probe_token()
                raise HsmObjectMissing(f"HSM {self.info.name!r} holds nothing labelled {label!r}")
            return combine_reports(
                decode_attributes(
                    lease.call(
                        "getAttributeValue", object_handle(v), list(SECURITY_ATTRIBUTES), False
                    )
                )
                for v in found
            )

        return self._run("attributes", work)

    def key_properties(self, label: str, kind: KeyKind) -> KeyProperties:
        """The objects labelled `label` compared with the template of `kind` (see
        `templates.template_problems`); problems name the `CKA_*` attribute that differs.

        Raises:
            HsmObjectMissing: no object with that label.
            HsmUnavailable: the token failed.
        """
        report = self.attributes(label)
        objects = report["objects"]
        assert isinstance(objects, int)
        return KeyProperties(label, kind, objects, tuple(template_problems(report, kind)))

    def write_anchor(self, label: str, data: bytes) -> None:
        """Replaces the audit anchor `label` by one holding `data` (see `anchors`).

        Raises:
            InvalidArgument: `data` is empty or over 16 KiB.
            HsmUnavailable: the token failed.
        """
        _check_label(label)
        if not 0 < len(data) <= anchors.MAX_ANCHOR_BYTES:
            raise InvalidArgument(f"an anchor holds 1 to {anchors.MAX_ANCHOR_BYTES} bytes")
        with self._create_lock:
            self._run("write_anchor", lambda lease: anchors.write(lease, label, data))

    def read_anchors(self, prefix: str) -> dict[str, list[bytes]]:
        """The audit anchors whose label starts with `prefix`, by label.

        Raises:
            HsmUnavailable: the token failed.
        """
        return self._run("read_anchors", lambda lease: anchors.read(lease, prefix))

    def labels(self, prefix: str) -> list[str]:
        """The distinct labels starting with `prefix` of the token's key objects, sorted.

        One search per key class, then one C_GetAttributeValue per object found: it reads
        every key of the token, so it is for the start-up scan, not for a call's path.

        Raises:
            HsmUnavailable: the token failed.
        """

        def work(lease: Lease) -> list[str]:
            found: set[str] = set()
            for cls in (PyKCS11.CKO_SECRET_KEY, PyKCS11.CKO_PRIVATE_KEY, PyKCS11.CKO_PUBLIC_KEY):
                for value in lease.find([(PyKCS11.CKA_CLASS, cls)]):
                    (raw,) = lease.call(
                        "getAttributeValue", object_handle(value), [PyKCS11.CKA_LABEL]
                    )
                    label = (
                        raw if isinstance(raw, str) else bytes(raw or b"").decode(errors="replace")
                    )
                    if label.startswith(prefix):
                        found.add(label)
            if not found:
                lease.probe_token()  # "no key" must not be a token that stopped answering
            return sorted(found)

        return self._run("labels", work)

    @property
    def library(self) -> Pkcs11Library:
        """The loaded PKCS#11 module this token is reached through."""
        return self._library

    def reload(self) -> None:
        """Re-initialises the PKCS#11 module, so the token is read afresh (SoftHSM2 can miss
        an object it read while another process rewrote the token's files, until then).

        Raises:
            HsmUnavailable: the module could not be re-initialised now.
        """
        self._library.reinitialize()

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
        self.pool.close()

    # -- machinery -------------------------------------------------------------------------

    def _create(self, operation: str, label: str, generate: Callable[[Lease], _T]) -> _T:
        """Runs `generate` unless an object already carries `label` (one creator at a time)."""
        _check_label(label)

        def work(lease: Lease) -> _T:
            if lease.find([(PyKCS11.CKA_LABEL, label)]):
                raise AlreadyExists(f"HSM {self.info.name!r} already holds {label!r}")
            lease.probe_token()  # an empty search on a lost token must not create anything
            return generate(lease)

        with self._create_lock:
            return self._run(operation, work)

    def _run(self, operation: str, work: Callable[[Lease], _T]) -> _T:
        """`_attempt`, reported to the observer."""
        if self._observer is None:
            return self._attempt(operation, work)
        started = time.perf_counter()
        failed = False  # a bad tag or a missing object is the caller's doing, not the HSM's
        try:
            return self._attempt(operation, work)
        except HsmUnavailable:
            failed = True
            raise
        finally:
            self._observer(self.info.name, operation, time.perf_counter() - started, failed)

    def _attempt(self, operation: str, work: Callable[[Lease], _T]) -> _T:
        """Runs `work` on a leased session, mapping PKCS#11 errors through `ERROR_TABLE`.

        A stale object handle is re-found and the operation retried once.
        """
        for attempt in range(2):
            with self.pool.lease(operation) as lease:
                try:
                    return work(lease)
                except TokenLost as exc:
                    lease.discard()
                    self.pool.mark_suspect()
                    log.warning(
                        "hsm token not answering",
                        extra={"hsm": self.info.name, "hsm_operation": operation, "ckr": str(exc)},
                    )
                    raise HsmUnavailable(
                        f"HSM {self.info.name!r} is unreachable ({exc}); nothing was done, "
                        "retry later"
                    ) from exc
                except PyKCS11.PyKCS11Error as exc:
                    kind = classify(operation, exc.value)
                    # A bad tag is the caller's doing (and may be an attacker's): no warning.
                    log_ckr(
                        operation,
                        exc.value,
                        level=logging.DEBUG if kind is Kind.BAD_TAG else logging.WARNING,
                        hsm=self.info.name,
                        kind=kind.value,
                    )
                    if kind is Kind.HANDLE and attempt == 0:
                        self.pool.cache.clear()
                        continue
                    raise self._map(operation, kind, exc.value, lease) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _map(self, operation: str, kind: Kind, code: int, lease: Lease) -> Exception:
        if kind is Kind.BAD_TAG:
            # A tag mismatch and a dying device look alike on SoftHSM2; ask the token.
            try:
                lease.probe_token()
            except TokenLost:
                kind = Kind.DEVICE
        if kind not in (Kind.BAD_TAG, Kind.REFUSED):
            lease.discard()
            if kind is not Kind.SESSION:
                # A device-class error may have broken every session of the token: the idle
                # ones go too, so that the next call really starts on a fresh session.
                self.pool.mark_suspect()
                self.pool.drop_idle()
            elif code in SESSIONS_GONE:
                # Not this session alone: C_CloseAllSessions or C_Logout through another
                # handle of this process voids every session of the token. Without this, each
                # idle session would fail one more call before the pool is fresh again.
                self.pool.drop_idle()
        return domain_error(self.info.name, operation, kind, code)


def _check_label(label: str) -> None:
    if not isinstance(label, str) or not label or len(label.encode()) > MAX_LABEL_BYTES:
        raise InvalidArgument(f"an HSM object label has 1 to {MAX_LABEL_BYTES} bytes")


def _check_iv(iv: bytes) -> None:
    if len(iv) != GCM_IV_BYTES:
        raise InvalidArgument(f"a GCM IV has {GCM_IV_BYTES} bytes")
