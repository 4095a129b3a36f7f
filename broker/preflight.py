"""What the settings point at, checked before anything is opened: files, PIN sources, TLS
material and the listening port. `keybroker-server --check-config` runs these without opening
an HSM or a port; a start runs them too, so that a mistake is one line instead of a failure
halfway through the start.

The TLS checks hold one rule of the deployment: the broker never holds a certificate
authority's private key. Whoever reads a CA's key can mint client certificates for any
principal (admin and auditor included), so a key that belongs to a client CA, or to any CA
certificate, refuses the start; a client CA's key found beside the broker's TLS files is a
warning. The development PKI breaks the rule on purpose (its CA key sits in HOME/pki, to
issue development identities) and says so at every start.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes

from broker import devhsm
from broker.config import DATABASE_PASSWORD_ENV, ConfigError, Settings, read_pin_file
from broker.transport.revocation import ClientCertificateRevocations, RevocationFileError

#: At most this many files of a TLS file's directory are looked at for a CA's key ...
_MAX_NEIGHBOURS = 100
#: ... and only files up to this size (a PEM key is a few KiB).
_MAX_PEM_BYTES = 64 * 1024


def check_files(settings: Settings, env: Mapping[str, str] | None = None) -> list[str]:
    """Files and variables the settings name that are missing or unusable, one line each.

    A PIN file of an `[[hsm]]` with `softhsm_init` may be missing: the first start creates it.
    PINs are read to check them and dropped; no line ever carries one.
    """
    env = os.environ if env is None else env
    problems = []
    if not settings.dev_pki:
        for key, path in _tls_paths(settings).items():
            if path is not None and (problem := _unreadable(path)):
                problems.append(f"{key}: {problem}")
    for key, path in _revocation_paths(settings).items():
        if path is not None and (problem := _unreadable(path)):
            problems.append(f"{key}: {problem}")
    if any(not hsm.module for hsm in settings.hsms):
        try:
            devhsm.find_softhsm_module()
        except RuntimeError as exc:
            problems.append(f"hsm: {exc}")
    for i, hsm in enumerate(settings.hsms):
        if hsm.module and not os.path.isfile(hsm.module):
            problems.append(f"hsm[{i}].module: {hsm.module} does not exist")
        if hsm.pin_env:
            if not env.get(hsm.pin_env):
                problems.append(
                    f"hsm[{i}].pin_env: the environment variable {hsm.pin_env} is not set"
                )
        elif hsm.pin_file is not None and not (hsm.softhsm_init and not hsm.pin_file.exists()):
            try:
                read_pin_file(hsm.pin_file)
            except ConfigError as exc:
                problems.append(f"hsm[{i}].pin_file: {exc}")
    if settings.database is not None and not settings.database.parent.is_dir():
        problems.append(f"database: the directory {settings.database.parent} does not exist")
    if settings.store_password_file is not None and not env.get(DATABASE_PASSWORD_ENV):
        try:
            read_pin_file(settings.store_password_file, "password")
        except ConfigError as exc:
            problems.append(f"store.password_file: {exc}")
    return problems


def _tls_paths(settings: Settings) -> dict[str, Path | None]:
    return {
        "tls.cert": settings.tls_cert,
        "tls.key": settings.tls_key,
        "tls.client_ca": settings.client_ca,
    }


def _revocation_paths(settings: Settings) -> dict[str, Path | None]:
    return {
        "tls.crl_file": settings.tls_crl_file,
        "tls.deny_list_file": settings.tls_deny_list_file,
    }


def _revocation_problems(settings: Settings, client_ca: Path) -> list[str]:
    """A CRL that no client CA signed, or a deny list line that names no certificate: the
    start refuses them. Files that cannot be read are left to `check_files`."""
    paths = _revocation_paths(settings)
    if not any(paths.values()) or any(p is not None and _unreadable(p) for p in paths.values()):
        return []
    if _unreadable(client_ca):
        return []
    try:
        ClientCertificateRevocations(
            client_ca.read_bytes(), settings.tls_crl_file, settings.tls_deny_list_file
        )
    except (RevocationFileError, ValueError) as exc:
        return [f"[tls] revocation: {exc}"]
    return []


def _unreadable(path: Path) -> str:
    if not path.exists():
        return f"{path} does not exist"
    if not path.is_file():
        return f"{path} is not a file"
    if not os.access(path, os.R_OK):
        return f"{path} cannot be read (permissions)"
    return ""


def check_tls(settings: Settings) -> tuple[list[str], list[str]]:
    """The TLS material's problems (which refuse the start) and warnings.

    Returns:
        (problems, warnings), one line each. Files that cannot be read are left to
        `check_files`.
    """
    if settings.dev_pki:
        ca_key = settings.pki_dir / "ca.key"
        return _revocation_problems(settings, settings.pki_dir / "ca.pem"), [
            f"development PKI: its CA key {ca_key} can issue a client certificate for any "
            "principal (admin and auditor too), so whoever can read the home can act as "
            "anyone; outside development configure [tls] with a CA kept off this host"
        ]
    paths = _tls_paths(settings)
    if any(p is None or _unreadable(p) for p in paths.values()):
        return [], []
    cert_path, key_path, ca_path = (Path(str(p)) for p in paths.values())
    problems = [
        f"{key}: {path} holds a private key; give it certificates only (the broker must "
        "never read a CA's key)"
        for key, path in (("tls.cert", cert_path), ("tls.client_ca", ca_path))
        if b"PRIVATE KEY-----" in path.read_bytes()
    ]
    try:
        chain = x509.load_pem_x509_certificates(cert_path.read_bytes())
        cas = x509.load_pem_x509_certificates(ca_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        return [*problems, f"[tls]: cannot load the PEM files: {exc}"], []
    problems += _key_problems(key, chain, cas)
    problems += _revocation_problems(settings, ca_path)
    directories = {cert_path.parent, key_path.parent, ca_path.parent}
    return problems, _neighbour_warnings(directories, cas, key_path)


def _key_problems(
    key: PrivateKeyTypes, chain: list[x509.Certificate], cas: list[x509.Certificate]
) -> list[str]:
    public = _der(key.public_key())
    problems = []
    if _der(chain[0].public_key()) != public:
        problems.append("tls.key: the key does not belong to the first certificate of tls.cert")
    for ca in cas:
        if _der(ca.public_key()) == public:
            problems.append(
                f"tls.key: it is the private key of the client CA {ca.subject.rfc4514_string()}"
                " (tls.client_ca): whoever reads it can mint client identities; give the "
                "server a key of its own and keep the CA's key off this host"
            )
    if _is_ca(chain[0]):
        problems.append(
            "tls.cert: the server certificate is a CA certificate, so tls.key is a CA's key "
            "that can sign certificates; use a server certificate (CA:FALSE)"
        )
    return problems


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _der(public: PublicKeyTypes) -> bytes:
    return public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _neighbour_warnings(
    directories: set[Path], cas: list[x509.Certificate], key_path: Path
) -> list[str]:
    """A client CA's private key in a directory of the TLS files: not read by the broker,
    but readable by whoever can read its TLS key."""
    ca_keys = {_der(ca.public_key()) for ca in cas}
    warnings = []
    for directory in sorted(directories):
        try:
            names = sorted(os.listdir(directory))[:_MAX_NEIGHBOURS]
        except OSError:
            continue
        for name in names:
            path = directory / name
            if path == key_path or not _small_file(path):
                continue
            try:
                candidate = serialization.load_pem_private_key(path.read_bytes(), password=None)
            except (OSError, ValueError, TypeError):
                continue  # not a key, encrypted, or unreadable: nothing to say
            if _der(candidate.public_key()) in ca_keys:
                warnings.append(
                    f"{path} is the private key of a client CA (tls.client_ca) and sits beside "
                    "the broker's TLS files: whoever can read them can mint client identities; "
                    "keep it off this host"
                )
    return warnings


def _small_file(path: Path) -> bool:
    try:
        return path.is_file() and path.stat().st_size <= _MAX_PEM_BYTES
    except OSError:
        return False


def listen_problem(address: str) -> str:
    """Why the broker cannot listen on `address` (HOST:PORT) now, or "".

    A plain socket bind, with SO_REUSEADDR as gRPC sets it, on each address the host resolves
    to; like gRPC, one that binds is enough. Port 0 always binds.
    """
    host, _, port_text = address.rpartition(":")
    port = int(port_text)
    if port == 0:
        return ""
    bare = host.strip("[]")
    try:
        infos = socket.getaddrinfo(
            bare or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        return f"cannot listen on {address}: cannot resolve {bare!r} ({exc.strerror})"
    reasons = []
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(sockaddr)
            except OSError as exc:
                reasons.append((exc.strerror or str(exc)).lower())
                continue
            return ""
    return f"cannot listen on {address}: {reasons[0] if reasons else 'no address'}"
