"""Where the client finds the broker and its credentials.

The defaults follow the broker's embedded development setup: the broker writes its bound
``host:port`` to ``HOME/listen.addr`` at start, and generates a development PKI under
``HOME/pki/`` (``ca.pem`` and one ``NAME.pem``/``NAME.key`` pair per identity).

Precedence, highest first: an explicit argument (a CLI flag), then the ``KEYBROKER_*``
environment variable, then the profile file (``~/.config/keybroker/config.toml`` or
``$KEYBROKER_CONFIG``: ``target``, ``home``, ``identity``), then the default under the home
directory. ``identity`` picks the pair
``HOME/pki/NAME.pem`` + ``HOME/pki/NAME.key``; an explicit ``identity`` argument beats
``KEYBROKER_CERT``/``KEYBROKER_KEY`` from the environment, explicit ``cert``/``key`` beat both.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from keybroker_client.errors import ConfigError
from keybroker_client.pem import check_tls_files

DEFAULT_HOME = "./var"
DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_IDENTITY = "admin"
#: The settings a profile file may give, as defaults below options and the environment.
PROFILE_KEYS = ("target", "home", "identity")

_IDENTITY_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_HINT = (
    "`make run` in the repository, or `keybroker-server --home DIR` anywhere, creates the "
    "development PKI; or pass --home/--ca/--cert/--key"
)
# A server bound to the wildcard address is reached through the loopback address, which the
# development server certificate is valid for.
_WILDCARD_HOSTS = {"0.0.0.0": "127.0.0.1", "[::]": "127.0.0.1", "": "127.0.0.1"}  # noqa: S104


@dataclass(frozen=True, slots=True)
class ClientSettings:
    """How to reach one broker over mutual TLS.

    Attributes:
        target: the broker's ``host:port``, or several brokers' as ``"a:1,b:2"``.
        ca: PEM file of the CA that signed the broker's server certificate.
        cert: PEM file of the client certificate; its identity is the caller's principal.
        key: PEM file of the client certificate's private key.
    """

    target: str
    ca: Path
    cert: Path
    key: Path


def resolve_settings(
    *,
    home: str | os.PathLike[str] | None = None,
    target: str | None = None,
    ca: str | os.PathLike[str] | None = None,
    cert: str | os.PathLike[str] | None = None,
    key: str | os.PathLike[str] | None = None,
    identity: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> ClientSettings:
    """Resolves the client settings from arguments, environment and the home directory.

    Args:
        home: the broker's home directory; default ``$KEYBROKER_HOME`` or ``./var``.
        target: ``host:port``, or several as ``"a:1,b:2"`` (interchangeable brokers, see
            :mod:`keybroker_client.failover`); default ``$KEYBROKER_TARGET``, else the contents of
            ``HOME/listen.addr``, else ``127.0.0.1:50051``.
        ca: CA certificate file; default ``$KEYBROKER_CA`` or ``HOME/pki/ca.pem``.
        cert: client certificate file; default ``$KEYBROKER_CERT`` or ``HOME/pki/NAME.pem``.
        key: client key file; default ``$KEYBROKER_KEY`` or ``HOME/pki/NAME.key``.
        identity: development identity NAME; default ``$KEYBROKER_IDENTITY`` or ``admin``.
        environ: the environment to read (default ``os.environ``); for tests. It also
            locates the profile file (see :func:`load_profile`), whose ``home``, ``target``
            and ``identity`` come after the environment and before the defaults.

    Returns:
        The settings, with every file checked to exist and to hold the PEM it should (the
        key being the certificate's), before any connection is made.

    Raises:
        ConfigError: a file is missing or not the right PEM, the key does not belong to the
            certificate, the identity name is malformed, or only one of a certificate and its
            key was given.
    """
    env = os.environ if environ is None else environ
    profile = load_profile(env)
    home_dir = Path(
        home
        if home is not None
        else env.get("KEYBROKER_HOME") or profile.get("home") or DEFAULT_HOME
    )

    resolved_target = (
        target
        or env.get("KEYBROKER_TARGET")
        or profile.get("target")
        or _target_from_home(home_dir)
    )

    ca_path = Path(ca) if ca is not None else _env_path(env, "KEYBROKER_CA")
    if ca_path is None:
        ca_path = home_dir / "pki" / "ca.pem"

    if cert is not None or key is not None:
        pair = (cert, key)
        origin = "--cert and --key"
    elif identity is not None:
        pair = (None, None)
        origin = ""
    else:
        pair = (env.get("KEYBROKER_CERT") or None, env.get("KEYBROKER_KEY") or None)
        origin = "KEYBROKER_CERT and KEYBROKER_KEY"
    if (pair[0] is None) != (pair[1] is None):
        raise ConfigError(f"{origin} go together: give both a certificate and its key")
    if pair[0] is not None and pair[1] is not None:
        cert_path, key_path = Path(pair[0]), Path(pair[1])
    else:
        name = (
            identity or env.get("KEYBROKER_IDENTITY") or profile.get("identity") or DEFAULT_IDENTITY
        )
        if not _IDENTITY_PATTERN.fullmatch(name):
            raise ConfigError(f"bad identity name {name!r}: use letters, digits, '.', '_', '-'")
        cert_path = home_dir / "pki" / f"{name}.pem"
        key_path = home_dir / "pki" / f"{name}.key"

    _require_file(ca_path, "CA certificate")
    if pair[0] is None and not cert_path.is_file() and ca_path.is_file():
        raise ConfigError(_unknown_identity(cert_path))
    _require_file(cert_path, "client certificate")
    _require_file(key_path, "client key")
    check_tls_files(ca_path, cert_path, key_path)
    return ClientSettings(target=resolved_target, ca=ca_path, cert=cert_path, key=key_path)


def profile_path(environ: Mapping[str, str]) -> tuple[Path | None, bool]:
    """The profile file to read, and whether it was named explicitly (``$KEYBROKER_CONFIG``).

    Default: ``$XDG_CONFIG_HOME/keybroker/config.toml``, else
    ``$HOME/.config/keybroker/config.toml``; None without either variable.
    """
    explicit = environ.get("KEYBROKER_CONFIG")
    if explicit:
        return Path(explicit).expanduser(), True
    base = environ.get("XDG_CONFIG_HOME") or (
        str(Path(environ["HOME"]) / ".config") if environ.get("HOME") else ""
    )
    return (Path(base) / "keybroker" / "config.toml" if base else None), False


def load_profile(environ: Mapping[str, str]) -> dict[str, str]:
    """The defaults of the profile file: ``target``, ``home``, ``identity`` (all optional).

    ``target`` is a string (``"a:1"`` or ``"a:1,b:2"``) or a list of addresses.

    A relative ``home`` is taken from the file's directory; ``~`` is expanded. A missing
    default file is no profile; a missing ``$KEYBROKER_CONFIG`` file is an error.

    Raises:
        ConfigError: the file named by ``$KEYBROKER_CONFIG`` is missing, or the file is not
            TOML, has another key, or a value that is not a string.
    """
    path, explicit = profile_path(environ)
    if path is None:
        return {}
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"profile not found: {path.absolute()} (KEYBROKER_CONFIG)") from None
        return {}
    except OSError as exc:
        raise ConfigError(f"cannot read profile {path.absolute()}: {exc.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"profile {path.absolute()} is not valid TOML: {exc}") from None
    unknown = sorted(set(data) - set(PROFILE_KEYS))
    if unknown:
        raise ConfigError(
            f"profile {path.absolute()}: unknown setting {unknown[0]!r} "
            f"(known: {', '.join(PROFILE_KEYS)})"
        )
    profile: dict[str, str] = {}
    for name, given in data.items():
        value = given
        if name == "target" and isinstance(given, list) and given:
            # Several brokers: target = ["kb-1:50051", "kb-2:50051"], as "a,b" elsewhere.
            if not all(isinstance(item, str) and item for item in given):
                raise ConfigError(f"profile {path.absolute()}: target must list non-empty strings")
            value = ",".join(given)
        if not isinstance(value, str) or not value:
            raise ConfigError(f"profile {path.absolute()}: {name} must be a non-empty string")
        profile[name] = value
    if "home" in profile:
        profile["home"] = os.path.normpath(path.parent / Path(profile["home"]).expanduser())
    return profile


def _env_path(env: Mapping[str, str], name: str) -> Path | None:
    value = env.get(name)
    return Path(value) if value else None


def _target_from_home(home_dir: Path) -> str:
    try:
        written = (home_dir / "listen.addr").read_text(encoding="utf-8").strip()
    except OSError:
        return DEFAULT_TARGET
    if not written:
        return DEFAULT_TARGET
    host, sep, port = written.rpartition(":")
    if sep and host in _WILDCARD_HOSTS:
        return f"{_WILDCARD_HOSTS[host]}:{port}"
    return written


def known_identities(pki: Path) -> list[str]:
    """The identities with a certificate and a key under ``pki`` (not the CA or the server)."""
    try:
        names = sorted(p.stem for p in pki.glob("*.pem") if p.with_suffix(".key").is_file())
    except OSError:
        return []
    return [n for n in names if n not in {"ca", "server"}]


def _unknown_identity(cert_path: Path) -> str:
    pki = cert_path.parent.absolute()
    known = ", ".join(known_identities(pki)) or "none"
    return (
        f"client certificate not found: {cert_path.absolute()}: unknown identity "
        f"{cert_path.stem!r}; known under {pki}: {known} (create one with "
        f"`keybroker-server --home {pki.parent} dev-identity NAME`)"
    )


def _require_file(path: Path, what: str) -> None:
    if not path.is_file():
        # Absolute: the message must say which file even when read from another directory.
        raise ConfigError(f"{what} not found: {path.absolute()} ({_HINT})")
