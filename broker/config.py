"""Settings: one TOML file plus KEYBROKER_* environment overrides, validated at start.

Every setting is one row of `OPTIONS`: its table, key, type, environment variable and meaning;
its default is the `Settings` (or `HsmConfig`) field's. That one table parses the file, checks
that no key is unknown or of the wrong type, applies the environment, and renders the reference
in docs/configuration.md (`reference_table()`).

PINs never come from the command line: from a file (mode 0600) or an environment variable.

Why this file is over 400 lines: the table is the point. Every setting, its loader and its
checks sit together so that adding a setting is one row here and nowhere else.
"""

from __future__ import annotations

import difflib
import enum
import json
import os
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields, replace
from pathlib import Path
from typing import Any

from broker.sink_settings import AuditSinkConfig

DEFAULT_LISTEN = "127.0.0.1:50051"
DEV_IDENTITIES = ("admin", "auditor", "producer", "consumer")


class ConfigError(ValueError):
    """The configuration cannot be used; the message says which setting and why."""


@dataclass(frozen=True, slots=True)
class HsmConfig:
    """One PKCS#11 token the broker uses: an `[[hsm]]` of the file, whose keys `OPTIONS`
    lists with their meaning (`pin_file` and `pin_env` are None when not set)."""

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
    #: Secondary copies of the audit trail for a SIEM (`[[audit.sinks]]`), best effort.
    audit_sinks: tuple[AuditSinkConfig, ...] = ()
    #: Sign the audit chain's head after this many unsigned events ...
    audit_checkpoint_events: int = 1000
    #: ... and at least this often (seconds) while any event is unsigned.
    audit_checkpoint_seconds: float = 2.0
    #: Broker processes sharing the listening port (SO_REUSEPORT), each with its own
    #: PKCS#11 sessions, gRPC server and audit chain.
    workers: int = 1

    @property
    def issuer(self) -> str:
        return f"urn:keybroker:{self.broker_id}"

    @property
    def audience(self) -> str:
        return f"urn:keybroker:{self.broker_id}"

    @property
    def pki_dir(self) -> Path:
        return self.home / "pki"


HOME_ENV = "KEYBROKER_HOME"
HSM_PIN_ENV = "KEYBROKER_HSM_PIN"
_DEV_PKI = "none: the development PKI in `HOME/pki`"


class Type(enum.Enum):
    """The type of a setting's value, as the file writes it."""

    STRING = "string"
    INTEGER = "integer"
    NUMBER = "number"
    BOOLEAN = "boolean"
    PATH = "path"
    NAMES = "list of strings"


@dataclass(frozen=True, slots=True)
class Option:
    """One setting of the file.

    Attributes:
        table: "" for the top level, else the table holding it ("hsm": each `[[hsm]]`).
        key: its name in that table.
        type: what its value must be.
        meaning: one line for the reference.
        field_name: the `Settings` (in `[[hsm]]`, `HsmConfig`) field it sets; default `key`.
        env: the KEYBROKER_* variable that overrides it, if any.
        required: must be given whenever its table is.
        default_text: the default as the reference shows it, when the field's does not say it.
    """

    table: str
    key: str
    type: Type
    meaning: str
    field_name: str = ""
    env: str = ""
    required: bool = False
    default_text: str = ""

    @property
    def name(self) -> str:
        return f"{self.table}.{self.key}" if self.table else self.key

    @property
    def field(self) -> str:
        return self.field_name or self.key

    def default(self) -> object:
        """The field's default (MISSING for a required `[[hsm]]` field)."""
        owner = {"hsm": HsmConfig, "audit.sinks": AuditSinkConfig}.get(self.table, Settings)
        return next(f.default for f in fields(owner) if f.name == self.field)


T = Type
OPTIONS: tuple[Option, ...] = (
    Option("", "listen", T.STRING, "mutual-TLS listener, HOST:PORT; port 0 picks a free one",
           env="KEYBROKER_LISTEN"),
    Option("", "insecure_listen", T.STRING,
           "plaintext listener for development and health probes; empty: none",
           env="KEYBROKER_INSECURE_LISTEN"),
    Option("", "broker_id", T.STRING, "tokens carry `iss` = `aud` = `urn:keybroker:ID`",
           env="KEYBROKER_BROKER_ID"),
    Option("", "default_hsm", T.STRING, "the HSM of keys created without one",
           default_text="the first `[[hsm]]`"),
    Option("", "database", T.PATH, "the SQLite database", default_text="`HOME/keybroker.db`"),
    Option("", "grace_seconds", T.NUMBER, "time calls in flight get to finish after SIGTERM"),
    Option("", "workers", T.INTEGER, "broker processes on one port (SO_REUSEPORT), 1 to 64",
           env="KEYBROKER_WORKERS"),
    Option("roles", "admins", T.NAMES, "principals with the admin role", env="KEYBROKER_ADMINS"),
    Option("roles", "auditors", T.NAMES, "principals with the auditor role",
           env="KEYBROKER_AUDITORS"),
    Option("tls", "cert", T.PATH, "server certificate chain (PEM)", field_name="tls_cert",
           required=True, default_text=_DEV_PKI),
    Option("tls", "key", T.PATH, "its private key (PEM)", field_name="tls_key", required=True,
           default_text=_DEV_PKI),
    Option("tls", "client_ca", T.PATH, "CA certificates that issue client certificates",
           required=True, default_text=_DEV_PKI),
    Option("limits", "max_workers", T.INTEGER, "gRPC handler threads"),
    Option("limits", "max_concurrent_rpcs", T.INTEGER,
           "calls at once; beyond this, `RESOURCE_EXHAUSTED` at once"),
    Option("limits", "rate_limit_per_second", T.NUMBER,
           "requests per second per principal; 0 disables", env="KEYBROKER_RATE_LIMIT"),
    Option("limits", "rate_limit_burst", T.INTEGER, "requests a principal may send at once"),
    Option("hsm", "name", T.STRING, "what keys and requests call it", required=True),
    Option("hsm", "jurisdiction", T.STRING,
           "ISO 3166-1 alpha-2 code of the country whose law governs it", required=True),
    Option("hsm", "operator", T.STRING, "who runs it", required=True),
    Option("hsm", "module", T.STRING, "path of the PKCS#11 library; empty: SoftHSM2"),
    Option("hsm", "token_label", T.STRING, "the token's label"),
    Option("hsm", "pin_file", T.PATH, "file holding the user PIN (mode 0600)",
           default_text="none"),
    Option("hsm", "pin_env", T.STRING,
           "environment variable holding the user PIN; wins over `pin_file`",
           default_text="none"),
    Option("hsm", "softhsm_init", T.BOOLEAN,
           "initialise a missing SoftHSM2 token of that label (development and tests)"),
    Option("hsm", "pool_size", T.INTEGER, "PKCS#11 sessions kept open, 1 to 64"),
    Option("audit", "checkpoint_events", T.INTEGER,
           "sign the audit chain's head after this many unsigned events",
           field_name="audit_checkpoint_events"),
    Option("audit", "checkpoint_seconds", T.NUMBER,
           "... and at least this often while any event is unsigned: the most an insider "
           "with the database alone can drop unnoticed", field_name="audit_checkpoint_seconds"),
    Option("audit.sinks", "type", T.STRING, "`jsonl` (a file), `stdout` or `syslog`",
           field_name="kind", required=True),
    Option("audit.sinks", "name", T.STRING,
           "names it in logs and in health (`keybroker.audit.sink.NAME`)",
           default_text="its type"),
    Option("audit.sinks", "path", T.PATH, "`jsonl`: the file events are appended to",
           default_text="none"),
    Option("audit.sinks", "address", T.STRING,
           "`syslog`: `udp://HOST:PORT`, `tcp://HOST:PORT` or `unix:///PATH`"),
    Option("audit.sinks", "facility", T.STRING, "`syslog`: the facility, e.g. `auth`, `local0`"),
    Option("audit.sinks", "app_name", T.STRING, "`syslog`: the APP-NAME field"),
    Option("audit.sinks", "queue_size", T.INTEGER,
           "events held for a slow sink; beyond, events are dropped for it (and counted)"),
)  # fmt: skip
_TABLES = ("roles", "tls", "limits", "audit")  # and the array of tables "hsm"
_ARRAYS = {"audit": {"sinks"}}  # arrays of tables inside a table: [[audit.sinks]]


def reference_table() -> str:
    """The settings as the Markdown table in docs/configuration.md lists them."""
    rows = [
        "| key | type | default | environment | meaning |",
        "| --- | ---- | ------- | ----------- | ------- |",
    ]
    for o in OPTIONS:
        default = o.default()
        if isinstance(default, tuple):
            default = list(default)
        shown = o.default_text or ("required" if default is MISSING else f"`{json.dumps(default)}`")
        env = f"`{o.env}`" if o.env else ""
        rows.append(f"| `{o.name}` | {o.type.value} | {shown} | {env} | {o.meaning} |")
    return "\n".join(rows) + "\n"


def _embedded_hsm(home: Path) -> HsmConfig:
    pin_file = home / "hsm.pin"
    return HsmConfig(
        "local", "FR", "local SoftHSM2 (development)", pin_file=pin_file, softhsm_init=True
    )


_TOML_KINDS = (
    (bool, "a boolean"), (int, "an integer"), (float, "a float"), (str, "a string"),
    (list, "an array"), (dict, "a table"),
)  # fmt: skip


def _kind_of(value: object) -> str:
    if value == "":
        return "an empty string"
    return next((name for t, name in _TOML_KINDS if isinstance(value, t)), "a date or time")


def _convert(option: Option, value: object, home: Path, where: str) -> Any:
    """`value` as the field's type.

    Raises:
        ConfigError: one line naming `where` (the file or variable), the key and the type.
    """
    kind = option.type
    if kind is Type.STRING and isinstance(value, str):
        return value
    if isinstance(value, bool):
        pass  # TOML booleans are no numbers (Python's are ints)
    elif kind is Type.INTEGER and isinstance(value, int):
        return value
    elif kind is Type.NUMBER and isinstance(value, int | float):
        return float(value)
    if kind is Type.BOOLEAN and isinstance(value, bool):
        return value
    if kind is Type.PATH and isinstance(value, str) and value:
        path = Path(value).expanduser()
        return path if path.is_absolute() else home / path
    if kind is Type.NAMES:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, list) and all(isinstance(v, str) and v for v in value):
            return tuple(value)
    article = "an" if kind is Type.INTEGER else "a"
    raise ConfigError(f"{where} must be {article} {kind.value}, not {_kind_of(value)}")


def _section(
    values: Mapping[str, object], table: str, label: str, home: Path, source: str
) -> dict[str, Any]:
    """Checks one table of the file against its options; returns field name -> value."""
    options = {o.key: o for o in OPTIONS if o.table == table}
    known = set(options) | ({*_TABLES, "hsm"} if not table else set()) | _ARRAYS.get(table, set())
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"; did you mean {label}{close[0]}?" if close else ""
            raise ConfigError(f"{source}: unknown setting {label}{key}{hint}")
    out: dict[str, Any] = {}
    for key, option in options.items():
        if key in values:
            out[option.field] = _convert(option, values[key], home, f"{source}: {label}{key}")
        elif option.required:
            raise ConfigError(f"{source}: {label}{key} is required")
    return out


def _from_file(config_file: Path, home: Path) -> dict[str, Any]:
    try:
        doc = tomllib.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config file {config_file}: {exc}") from exc
    source = str(config_file)
    changes = _section(doc, "", "", home, source)
    for table in _TABLES:
        if table in doc:
            if not isinstance(doc[table], dict):
                raise ConfigError(f"{source}: {table} must be a table ([{table}])")
            changes.update(_section(doc[table], table, f"{table}.", home, source))
    if "tls" in doc:
        changes["dev_pki"] = False
    entries = doc.get("hsm", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ConfigError(f"{source}: hsm must be an array of tables ([[hsm]])")
    hsms = [
        HsmConfig(**_section(e, "hsm", f"hsm[{i}].", home, source)) for i, e in enumerate(entries)
    ]
    if hsms:
        changes["hsms"] = tuple(hsms)
    sinks = doc.get("audit", {}).get("sinks", [])
    if not isinstance(sinks, list) or not all(isinstance(e, dict) for e in sinks):
        raise ConfigError(f"{source}: audit.sinks must be an array of tables ([[audit.sinks]])")
    if sinks:
        changes["audit_sinks"] = tuple(
            AuditSinkConfig(**_section(e, "audit.sinks", f"audit.sinks[{i}].", home, source))
            for i, e in enumerate(sinks)
        )
    return changes


def _from_env(env: Mapping[str, str], home: Path) -> dict[str, Any]:
    changes: dict[str, Any] = {}
    for option in OPTIONS:
        text = env.get(option.env, "") if option.env else ""
        if not text:
            continue
        value: object = text
        try:
            if option.type is Type.INTEGER:
                value = int(text)
            elif option.type is Type.NUMBER:
                value = float(text)
        except ValueError:
            raise ConfigError(f"{option.env} must be a {option.type.value}") from None
        changes[option.field] = _convert(option, value, home, option.env)
    return changes


def load_settings(
    home: Path | None = None,
    listen: str | None = None,
    config_file: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> Settings:
    """Builds settings: defaults, then the TOML file, then KEYBROKER_* variables, then flags.

    Raises:
        ConfigError: a setting is unknown, missing, of the wrong type or inconsistent; the
            message is one line naming the file (or variable) and the key.
    """
    env = os.environ if env is None else env
    home = (home or Path(env.get(HOME_ENV, "var"))).expanduser().resolve()
    changes = _from_file(config_file, home) if config_file is not None else {}
    changes.update(_from_env(env, home))
    if listen:
        changes["listen"] = listen
    hsms: tuple[HsmConfig, ...] = changes.get("hsms") or (_embedded_hsm(home),)
    if env.get(HSM_PIN_ENV):
        hsms = (replace(hsms[0], pin_env=HSM_PIN_ENV), *hsms[1:])
    changes["hsms"] = hsms
    changes.setdefault("default_hsm", hsms[0].name)
    return validate(replace(Settings(home=home), **changes))


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
    for i, sink in enumerate(settings.audit_sinks):
        try:
            sink.check()
        except ValueError as exc:
            raise ConfigError(f"audit.sinks[{i}]: {exc}") from None
    sink_names = [s.sink_name for s in settings.audit_sinks]
    if len(set(sink_names)) != len(sink_names):
        raise ConfigError("audit.sinks: give each sink a distinct name (it defaults to its type)")
    if not 1 <= settings.workers <= 64:
        raise ConfigError("workers must be between 1 and 64")
    if settings.audit_checkpoint_events < 1 or not 0 < settings.audit_checkpoint_seconds <= 3600:
        raise ConfigError(
            "audit.checkpoint_events must be at least 1 and audit.checkpoint_seconds "
            "between 0 and 3600"
        )
    return settings
