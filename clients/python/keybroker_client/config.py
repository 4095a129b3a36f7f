"""Where the client finds the broker and its credentials.

The defaults follow the broker's embedded development setup: the broker writes its bound
``host:port`` to ``HOME/listen.addr`` at start, and generates a development PKI under
``HOME/pki/`` (``ca.pem`` and one ``NAME.pem``/``NAME.key`` pair per identity).

Precedence, highest first: an explicit argument (a CLI flag), then the ``KEYBROKER_*``
environment variable, then the default under the home directory. ``identity`` picks the pair
``HOME/pki/NAME.pem`` + ``HOME/pki/NAME.key``; an explicit ``identity`` argument beats
``KEYBROKER_CERT``/``KEYBROKER_KEY`` from the environment, explicit ``cert``/``key`` beat both.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from keybroker_client.errors import ConfigError

DEFAULT_HOME = "./var"
DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_IDENTITY = "admin"

_IDENTITY_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_HINT = "run `make run` to create the development PKI, or pass --ca/--cert/--key"
# A server bound to the wildcard address is reached through the loopback address, which the
# development server certificate is valid for.
_WILDCARD_HOSTS = {"0.0.0.0": "127.0.0.1", "[::]": "127.0.0.1", "": "127.0.0.1"}  # noqa: S104


@dataclass(frozen=True, slots=True)
class ClientSettings:
    """How to reach one broker over mutual TLS.

    Attributes:
        target: the broker's ``host:port``.
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
        target: ``host:port``; default ``$KEYBROKER_TARGET``, else the contents of
            ``HOME/listen.addr``, else ``127.0.0.1:50051``.
        ca: CA certificate file; default ``$KEYBROKER_CA`` or ``HOME/pki/ca.pem``.
        cert: client certificate file; default ``$KEYBROKER_CERT`` or ``HOME/pki/NAME.pem``.
        key: client key file; default ``$KEYBROKER_KEY`` or ``HOME/pki/NAME.key``.
        identity: development identity NAME; default ``$KEYBROKER_IDENTITY`` or ``admin``.
        environ: the environment to read (default ``os.environ``); for tests.

    Returns:
        The settings, with every file checked to exist.

    Raises:
        ConfigError: a file is missing, the identity name is malformed, or only one of a
            certificate and its key was given.
    """
    env = os.environ if environ is None else environ
    home_dir = Path(home if home is not None else env.get("KEYBROKER_HOME") or DEFAULT_HOME)

    resolved_target = target or env.get("KEYBROKER_TARGET") or _target_from_home(home_dir)

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
        name = identity or env.get("KEYBROKER_IDENTITY") or DEFAULT_IDENTITY
        if not _IDENTITY_PATTERN.fullmatch(name):
            raise ConfigError(f"bad identity name {name!r}: use letters, digits, '.', '_', '-'")
        cert_path = home_dir / "pki" / f"{name}.pem"
        key_path = home_dir / "pki" / f"{name}.key"

    _require_file(ca_path, "CA certificate")
    _require_file(cert_path, "client certificate")
    _require_file(key_path, "client key")
    return ClientSettings(target=resolved_target, ca=ca_path, cert=cert_path, key=key_path)


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


def _require_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path} ({_HINT})")
