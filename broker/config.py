"""Settings: one TOML file plus KEYBROKER_* environment overrides, validated at start.

PINs never come from the command line: from a file (mode 0600) or an environment variable.
"""

from __future__ import annotations

import os
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

DEFAULT_LISTEN = "127.0.0.1:50051"
DEV_IDENTITIES = ("admin", "auditor", "producer", "consumer")


class ConfigError(ValueError):
    """The configuration cannot be used; the message says which setting and why."""


@dataclass(frozen=True, slots=True)
class HsmConfig:
    """One PKCS#11 token the broker uses.

    Attributes:
        name: what keys and requests call it.
        jurisdiction: ISO 3166-1 alpha-2 code of the country whose law governs the HSM.
        operator: who runs it.
        module: path of the PKCS#11 library; empty means SoftHSM2.
        token_label: the token's label.
        pin_file: file holding the user PIN (mode 0600), or None.
        pin_env: environment variable holding the user PIN, or None; wins over pin_file.
        softhsm_init: initialise a SoftHSM2 token with that label when it is missing
            (development and tests only).
        pool_size: PKCS#11 sessions kept open.
    """

    name: str
    jurisdiction: str
    operator: str
    module: str = ""
    token_label: str = "keybroker"
    pin_file: Path | None = None
    pin_env: str | None = None
    softhsm_init: bool = False
    pool_size: int = 4

    def read_pin(self, env: Mapping[str, str] | None = None) -> str:
        """The user PIN: from the environment variable `pin_env` when set, else `pin_file`.

        Raises:
            ConfigError: the variable is empty, or the file is missing or unsafe.
        """
        env = os.environ if env is None else env
        if self.pin_env:
            pin = env.get(self.pin_env, "")
            if not pin:
                raise ConfigError(
                    f"HSM {self.name!r}: environment variable {self.pin_env} is empty"
                )
            return pin
        if self.pin_file is None:
            raise ConfigError(f"HSM {self.name!r}: set pin_file or pin_env")
        return read_pin_file(self.pin_file)


def read_pin_file(pin_file: Path) -> str:
    """Reads a PIN file, refusing one that others could read.

    Raises:
        ConfigError: the file is missing, not a regular file, readable by group or others,
            or empty.
    """
    pin_file = Path(pin_file)
    try:
        info = pin_file.stat()
    except FileNotFoundError as exc:
        raise ConfigError(f"PIN file {pin_file} does not exist") from exc
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"PIN file {pin_file} is not a regular file")
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise ConfigError(
            f"PIN file {pin_file} has mode {mode:04o}: group or others may read it; "
            f"run `chmod 600 {pin_file}` (and consider the PIN exposed)"
        )
    pin = pin_file.read_text().strip()
    if not pin:
        raise ConfigError(f"PIN file {pin_file} is empty")
    return pin


@dataclass(frozen=True, slots=True)
class Settings:
    home: Path
    listen: str = DEFAULT_LISTEN
    #: A plaintext listener for local development and health probes; no key RPC succeeds on
    #: it, since it carries no client certificate.
    insecure_listen: str = ""
    broker_id: str = "keybroker-local"
    admins: tuple[str, ...] = ("admin",)
    auditors: tuple[str, ...] = ("auditor",)
    hsms: tuple[HsmConfig, ...] = ()
    default_hsm: str = ""
    database: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    client_ca: Path | None = None
    dev_pki: bool = True
    max_workers: int = 16
    max_concurrent_rpcs: int = 256
    rate_limit_per_second: float = 0.0
    rate_limit_burst: int = 100
    grace_seconds: float = 5.0

    @property
    def issuer(self) -> str:
        return f"urn:keybroker:{self.broker_id}"

    @property
    def audience(self) -> str:
        return f"urn:keybroker:{self.broker_id}"

    @property
    def pki_dir(self) -> Path:
        return self.home / "pki"


def _embedded_hsm(home: Path) -> HsmConfig:
    return HsmConfig(
        name="local",
        jurisdiction="FR",
        operator="local SoftHSM2 (development)",
        token_label="keybroker",
        pin_file=home / "hsm.pin",
        softhsm_init=True,
    )


def _path(home: Path, value: object, setting: str) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{setting} must be a non-empty path")
    path = Path(value).expanduser()
    return path if path.is_absolute() else home / path


def _strings(value: object, setting: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{setting} must be a list of names")
    return tuple(value)


def load_settings(  # noqa: PLR0915 - one flat list of settings reads best
    home: Path | None = None,
    listen: str | None = None,
    config_file: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> Settings:
    """Builds settings: defaults, then the TOML file, then KEYBROKER_* variables, then flags.

    Raises:
        ConfigError: a setting is missing, of the wrong type or inconsistent.
    """
    env = os.environ if env is None else env
    home = (home or Path(env.get("KEYBROKER_HOME", "var"))).expanduser().resolve()
    doc: dict[str, Any] = {}
    if config_file is not None:
        try:
            doc = tomllib.loads(config_file.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config file {config_file}: {exc}") from exc

    settings = Settings(home=home)
    changes: dict[str, Any] = {}
    if "listen" in doc:
        changes["listen"] = str(doc["listen"])
    if "insecure_listen" in doc:
        changes["insecure_listen"] = str(doc["insecure_listen"])
    if "broker_id" in doc:
        changes["broker_id"] = str(doc["broker_id"])
    roles = doc.get("roles", {})
    if "admins" in roles:
        changes["admins"] = _strings(roles["admins"], "roles.admins")
    if "auditors" in roles:
        changes["auditors"] = _strings(roles["auditors"], "roles.auditors")
    if "database" in doc:
        changes["database"] = _path(home, doc["database"], "database")
    tls = doc.get("tls", {})
    if tls:
        changes.update(
            tls_cert=_path(home, tls.get("cert"), "tls.cert"),
            tls_key=_path(home, tls.get("key"), "tls.key"),
            client_ca=_path(home, tls.get("client_ca"), "tls.client_ca"),
            dev_pki=False,
        )
    limits = doc.get("limits", {})
    for name in ("max_workers", "max_concurrent_rpcs", "rate_limit_burst"):
        if name in limits:
            changes[name] = int(limits[name])
    if "rate_limit_per_second" in limits:
        changes["rate_limit_per_second"] = float(limits["rate_limit_per_second"])
    if "grace_seconds" in doc:
        changes["grace_seconds"] = float(doc["grace_seconds"])
    hsms = []
    for i, h in enumerate(doc.get("hsm", [])):
        where = f"hsm[{i}]"
        for required in ("name", "jurisdiction", "operator"):
            if not isinstance(h.get(required), str) or not h[required]:
                raise ConfigError(f"{where}.{required} is required")
        hsms.append(
            HsmConfig(
                name=h["name"],
                jurisdiction=h["jurisdiction"],
                operator=h["operator"],
                module=str(h.get("module", "")),
                token_label=str(h.get("token_label", "keybroker")),
                pin_file=_path(home, h["pin_file"], f"{where}.pin_file")
                if "pin_file" in h
                else None,
                pin_env=h.get("pin_env"),
                softhsm_init=bool(h.get("softhsm_init", False)),
                pool_size=int(h.get("pool_size", 4)),
            )
        )
    changes["hsms"] = tuple(hsms) or (_embedded_hsm(home),)
    changes["default_hsm"] = str(doc.get("default_hsm", changes["hsms"][0].name))

    overrides = {
        "KEYBROKER_LISTEN": "listen",
        "KEYBROKER_INSECURE_LISTEN": "insecure_listen",
        "KEYBROKER_BROKER_ID": "broker_id",
    }
    for var, name in overrides.items():
        if env.get(var):
            changes[name] = env[var]
    if env.get("KEYBROKER_ADMINS"):
        changes["admins"] = _strings(env["KEYBROKER_ADMINS"], "KEYBROKER_ADMINS")
    if env.get("KEYBROKER_AUDITORS"):
        changes["auditors"] = _strings(env["KEYBROKER_AUDITORS"], "KEYBROKER_AUDITORS")
    if env.get("KEYBROKER_RATE_LIMIT"):
        changes["rate_limit_per_second"] = float(env["KEYBROKER_RATE_LIMIT"])
    if env.get("KEYBROKER_HSM_PIN"):
        first = changes["hsms"][0]
        changes["hsms"] = (replace(first, pin_env="KEYBROKER_HSM_PIN"), *changes["hsms"][1:])
    if listen:
        changes["listen"] = listen
    return validate(replace(settings, **changes))


def validate(settings: Settings) -> Settings:
    names = [h.name for h in settings.hsms]
    if len(set(names)) != len(names):
        raise ConfigError("HSM names must be unique")
    if settings.default_hsm not in names:
        raise ConfigError(f"default_hsm {settings.default_hsm!r} is not a configured HSM")
    for h in settings.hsms:
        if len(h.jurisdiction) != 2 or not h.jurisdiction.isupper():
            raise ConfigError(f"HSM {h.name!r}: jurisdiction must be an ISO code such as 'FR'")
        if h.pin_file is None and h.pin_env is None:
            raise ConfigError(f"HSM {h.name!r}: set pin_file or pin_env")
        if not 1 <= h.pool_size <= 64:
            raise ConfigError(f"HSM {h.name!r}: pool_size must be between 1 and 64")
    if ":" not in settings.listen:
        raise ConfigError("listen must be HOST:PORT")
    if settings.max_workers < 1 or settings.max_concurrent_rpcs < 1:
        raise ConfigError("limits must be positive")
    return settings
