"""The embedded SoftHSM2 of development and the embedded default (never for production).

Next to `devpki`: the composition root uses it for HSMs configured without a PKCS#11 module
(`HsmConfig.module` empty) or with `softhsm_init`: it writes HOME/softhsm2.conf, finds the
SoftHSM2 module and initialises missing tokens.

A SoftHSM2 installation is configured by one file, named by the environment variable
`SOFTHSM2_CONF` and read once, at C_Initialize. Hence a process can use only one
softhsm2.conf: `ensure_token` sets the variable before it loads the module, and refuses a
library loaded under another configuration. Several tokens (labels) may share one conf.

Tokens are initialised through PyKCS11 (C_InitToken, then C_InitPIN in an SO session), never
with `softhsm2-util`, so no PIN ever appears on a command line. The user PIN is written to a
file created with mode 0600; the SO PIN is random and forgotten.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import PyKCS11

from broker.adapters.pkcs11 import Pkcs11Library
from broker.config import ConfigError, read_pin_file

#: Where distributions install the SoftHSM2 PKCS#11 module, searched in order.
SOFTHSM_MODULE_PATHS: tuple[str, ...] = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
    "/opt/homebrew/lib/softhsm/libsofthsm2.so",
)

#: Environment variable naming the PKCS#11 module to use instead of the search.
MODULE_ENV = "KEYBROKER_PKCS11_MODULE"


def _search_module() -> str | None:
    override = os.environ.get(MODULE_ENV)
    if override:
        return override if os.path.isfile(override) else None
    return next((p for p in SOFTHSM_MODULE_PATHS if os.path.isfile(p)), None)


def find_softhsm_module() -> str:
    """The path of the SoftHSM2 PKCS#11 module (or of `$KEYBROKER_PKCS11_MODULE`).

    Raises:
        RuntimeError: the module is not installed, or the override names no file.
    """
    override = os.environ.get(MODULE_ENV)
    if override:
        if not os.path.isfile(override):
            raise RuntimeError(f"{MODULE_ENV}={override} names no file")
        return override
    found = _search_module()
    if found is None:
        raise RuntimeError(
            "SoftHSM2 is not installed (looked in "
            + ", ".join(SOFTHSM_MODULE_PATHS)
            + "): run `sudo apt-get install softhsm2`, or set "
            + f"{MODULE_ENV} to your PKCS#11 module"
        )
    return found


def write_softhsm_conf(home: Path) -> Path:
    """Writes HOME/softhsm2.conf with its token directory HOME/tokens (mode 0700).

    Idempotent: the file is rewritten (atomically) only when its content differs.

    Returns:
        The absolute path of the configuration file.
    """
    home = Path(home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    tokens = home / "tokens"
    tokens.mkdir(mode=0o700, exist_ok=True)
    tokens.chmod(0o700)
    conf = home / "softhsm2.conf"
    content = (
        "# Written by keybroker (broker.devhsm); SoftHSM2 reads it at C_Initialize.\n"
        f"directories.tokendir = {tokens}\n"
        "objectstore.backend = file\n"
        "log.level = ERROR\n"
    )
    if not conf.exists() or conf.read_text() != content:
        tmp = conf.with_name(f".{conf.name}.{secrets.token_hex(4)}.tmp")
        tmp.write_text(content)
        tmp.replace(conf)
    return conf


def activate_softhsm_conf(home: Path) -> Path:
    """Writes HOME/softhsm2.conf and points `SOFTHSM2_CONF` at it, for a module not yet loaded.

    SoftHSM2 reads the variable at C_Initialize, so call this before `Pkcs11Library(...)`.

    Returns:
        The configuration file.

    Raises:
        RuntimeError: a SoftHSM2 module is already loaded in this process under another conf.
    """
    conf = write_softhsm_conf(home)
    for path in (*SOFTHSM_MODULE_PATHS, os.environ.get(MODULE_ENV, "")):
        existing = Pkcs11Library.loaded(path) if path and os.path.isfile(path) else None
        if existing is not None and existing.softhsm2_conf != str(conf):
            raise RuntimeError(
                f"{existing.module_path} is already loaded with "
                f"SOFTHSM2_CONF={existing.softhsm2_conf}; a process can use only one "
                "softhsm2.conf"
            )
    os.environ["SOFTHSM2_CONF"] = str(conf)
    return conf


@dataclass(frozen=True, slots=True)
class SoftHsmToken:
    """An initialised SoftHSM2 token and the loaded module to reach it.

    Attributes:
        conf_path: the softhsm2.conf the process uses (SOFTHSM2_CONF).
        module: path of the PKCS#11 module.
        label: the token label.
        pin_file: file holding the user PIN (mode 0600); read it with `broker.config.read_pin_file`.
        library: the process's one loaded module; pass it to `Pkcs11Hsm` and to further
            `ensure_token` calls.
    """

    conf_path: Path
    module: str
    label: str
    pin_file: Path
    library: Pkcs11Library = field(repr=False, compare=False)

    def pin(self) -> str:
        """The user PIN, read from `pin_file` (see `broker.config.read_pin_file`)."""
        return read_pin_file(self.pin_file)


def _write_secret(path: Path, secret: str) -> None:
    """Creates `path` (which must not exist) with mode 0600 from the first instant."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secret + "\n")
        handle.flush()
        os.fsync(handle.fileno())


@contextlib.contextmanager
def _init_lock(home: Path) -> Iterator[None]:
    """Serialises token initialisation between processes sharing HOME."""
    fd = os.open(home / ".softhsm-init.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def ensure_token(
    home: Path,
    label: str,
    pin_file: Path,
    module: str | None = None,
    library: Pkcs11Library | None = None,
) -> SoftHsmToken:
    """Makes sure a SoftHSM2 token `label` exists under HOME, initialising it if need be.

    The process's module is loaded once: pass the `library` of the composition root, or
    none: then the module already loaded in this process is used, or, when there is none,
    this function sets `SOFTHSM2_CONF` to HOME/softhsm2.conf, loads the module and returns it
    in `SoftHsmToken.library`.

    A new token gets a random SO PIN (forgotten at once) and a random user PIN, written to
    `pin_file` with mode 0600 (created so, never readable by others even for an instant).
    An existing token is reused with the PIN already in `pin_file`.

    Args:
        home: directory holding softhsm2.conf and tokens/.
        label: token label, 1 to 32 bytes of UTF-8.
        pin_file: where the user PIN lives.
        module: PKCS#11 module path (default: `find_softhsm_module()`).
        library: an already loaded module, loaded under this HOME's softhsm2.conf (see
            `activate_softhsm_conf`).

    Returns:
        The token, with the loaded library.

    Raises:
        RuntimeError: SoftHSM2 is missing, the library was loaded under another
            softhsm2.conf, the token exists but its PIN file is missing or unsafe, or the
            token cannot be initialised.
    """
    if not label or len(label.encode()) > 32:
        raise ValueError("a token label has 1 to 32 bytes of UTF-8")
    home = Path(home).resolve()
    pin_file = Path(pin_file)
    conf = write_softhsm_conf(home)
    with _init_lock(home):
        if library is None:
            module_path = module or find_softhsm_module()
            library = Pkcs11Library.loaded(module_path)
            if library is None:
                # Nothing loaded yet in this process: this HOME's conf becomes the process's.
                os.environ["SOFTHSM2_CONF"] = str(conf)
                library = Pkcs11Library(module_path)
        else:
            module_path = module or library.module_path
        loaded_conf = library.softhsm2_conf
        if loaded_conf is None or Path(loaded_conf).resolve() != conf:
            raise RuntimeError(
                f"the PKCS#11 module was loaded with SOFTHSM2_CONF={loaded_conf}, not {conf}; "
                "a process can use only one softhsm2.conf: call activate_softhsm_conf(home) "
                "before loading the module"
            )

        if label in library.tokens():
            try:
                read_pin_file(pin_file)  # A token without its PIN is useless: say so now.
            except ConfigError as exc:
                raise RuntimeError(str(exc)) from exc
            return SoftHsmToken(conf, module_path, label, pin_file, library)

        _initialise(library, label, pin_file)
        return SoftHsmToken(conf, module_path, label, pin_file, library)


def _initialise(library: Pkcs11Library, label: str, pin_file: Path) -> None:
    so_pin = secrets.token_urlsafe(24)
    user_pin = secrets.token_urlsafe(24)
    # The PIN goes to a private temporary file first and replaces pin_file only once the
    # token accepts it, so a failed initialisation leaves no PIN for a token that is not.
    tmp = pin_file.with_name(f".{pin_file.name}.{secrets.token_hex(4)}.tmp")
    _write_secret(tmp, user_pin)
    try:
        library.init_token(library.free_slot(), so_pin, label)
        slot = library.slot_for_token(label)
        call = library.gate.call
        with library.using() as lib:
            session = call(lib, "openSession", slot, PyKCS11.CKF_RW_SESSION)
            try:
                call(session, "login", so_pin, PyKCS11.CKU_SO)
                call(session, "initPin", user_pin)
                call(session, "logout")
            finally:
                call(session, "closeSession")
        os.replace(tmp, pin_file)
    except PyKCS11.PyKCS11Error as exc:
        raise RuntimeError(f"cannot initialise SoftHSM2 token {label!r}: {exc}") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
