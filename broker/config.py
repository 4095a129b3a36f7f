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
import re
import stat
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, fields, replace
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from broker.sink_settings import AuditSinkConfig

_E = TypeVar("_E", "HsmConfig", "AuditSinkConfig")
DEFAULT_LISTEN = "127.0.0.1:50051"
DEV_IDENTITIES = ("admin", "auditor", "producer", "consumer")


class ConfigError(ValueError):
    """The configuration cannot be used: each of `problems` is one line naming the setting and
    what is wrong (the message is those lines), so that one run reports every mistake."""

    def __init__(self, *problems: str) -> None:
        super().__init__("\n".join(problems))
        self.problems: tuple[str, ...] = problems


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
    #: Tests only (docs/operations.md): `MODULE:FUNCTION` that wraps this HSM with injected
    #: faults, called as FUNCTION(hsm, fault_spec); needs KEYBROKER_ALLOW_FAULT_INJECTION=1.
    fault_injection: str = ""
    fault_spec: str = ""

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


def read_pin_file(pin_file: Path, what: str = "PIN") -> str:
    """Reads a PIN file (or another secret's: `what` names it), refusing one that others could
    read.

    Raises:
        ConfigError: the file is missing, not a regular file, readable by group or others,
            or empty.
    """
    pin_file = Path(pin_file)
    try:
        info = pin_file.stat()
    except FileNotFoundError as exc:
        raise ConfigError(f"{what} file {pin_file} does not exist") from exc
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"{what} file {pin_file} is not a regular file")
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise ConfigError(
            f"{what} file {pin_file} has mode {mode:04o}: group or others may read it; "
            f"run `chmod 600 {pin_file}` (and consider the {what} exposed)"
        )
    pin = pin_file.read_text().strip()
    if not pin:
        raise ConfigError(f"{what} file {pin_file} is empty")
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
    #: A PostgreSQL database instead of the SQLite file (docs/storage.md): a libpq URL that
    #: never holds the password (`DATABASE_PASSWORD_ENV` or `store_password_file` does).
    store_url: str = ""
    store_password_file: Path | None = None
    store_pool_size: int = 10
    tls_cert: Path | None = None
    tls_key: Path | None = None
    client_ca: Path | None = None
    #: Revoked client certificates: CRLs (PEM or DER) signed by the client CA ...
    tls_crl_file: Path | None = None
    #: ... and/or a deny list of serial numbers and thumbprints; both read again when they
    #: change, looked at no more often than every `tls_revocation_check_seconds`.
    tls_deny_list_file: Path | None = None
    tls_revocation_check_seconds: float = 5.0
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
    #: Prometheus metrics over plain HTTP, HOST:PORT; empty: off. Worker i of `workers` serves
    #: its own on PORT + i (docs/metrics.md).
    metrics_listen: str = ""
    #: The shortest pending window of a scheduled destruction, in seconds (and the window of
    #: a request that gives none).
    keys_min_destruction_window: float = 7 * 86400.0
    #: Seconds between the key scheduler's passes (due destructions and rotations); 0: this
    #: process runs none.
    keys_scheduler_interval: float = 60.0
    #: Seconds a scheduler's claim on a due destruction or rotation holds: another process
    #: takes over the task of one that died only once its claim has expired.
    keys_lease_seconds: float = 300.0
    #: Distinct admins, the requester counting as the first, who must approve a policy change,
    #: the enabling of a disabled key and a scheduled destruction; 1: applied at once.
    approvals_required: int = 1
    #: Seconds an approval request waits for its approvals before it expires.
    approvals_expiry: float = 86400.0

    @property
    def issuer(self) -> str:
        return f"urn:keybroker:{self.broker_id}"

    @property
    def audience(self) -> str:
        return f"urn:keybroker:{self.broker_id}"

    @property
    def pki_dir(self) -> Path:
        return self.home / "pki"

    @property
    def database_location(self) -> str:
        """Where the store is, for people: the SQLite file, or the PostgreSQL URL without its
        parameters (it holds no password: `validate` refuses one)."""
        if self.store_url:
            return self.store_url.split("?", 1)[0]
        return str((self.database or self.home / "keybroker.db").absolute())

    def read_database_password(self, env: Mapping[str, str] | None = None) -> str | None:
        """The PostgreSQL password: `DATABASE_PASSWORD_ENV` when set, else the file
        `store.password_file` (mode 0600), else None (trust, peer, a client certificate or
        libpq's own ~/.pgpass).

        Raises:
            ConfigError: the file is missing, unsafe or empty.
        """
        env = os.environ if env is None else env
        if env.get(DATABASE_PASSWORD_ENV):
            return env[DATABASE_PASSWORD_ENV]
        if self.store_password_file is not None:
            return read_pin_file(self.store_password_file, "password")
        return None


HOME_ENV = "KEYBROKER_HOME"
HSM_PIN_ENV = "KEYBROKER_HSM_PIN"
#: Must be "1" for an `[[hsm]]` with `fault_injection` to start (tests only).
FAULT_INJECTION_ENV = "KEYBROKER_ALLOW_FAULT_INJECTION"
#: The PostgreSQL password (wins over `store.password_file`); never a setting of the file.
DATABASE_PASSWORD_ENV = "KEYBROKER_DATABASE_PASSWORD"
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
        env: an older, shorter variable that also sets it (`env_var` wins over it).
        required: must be given whenever its table is.
        default_text: the default as the reference shows it, when the field's does not say it.
        secret: a password or the like: read from its variable (`env_var`) and never from the
            file, which anyone who can read the configuration could copy.
    """

    table: str
    key: str
    type: Type
    meaning: str
    field_name: str = ""
    env: str = ""
    required: bool = False
    default_text: str = ""
    secret: bool = False

    @property
    def name(self) -> str:
        return f"{self.table}.{self.key}" if self.table else self.key

    @property
    def env_var(self) -> str:
        """The variable that overrides it: KEYBROKER_ and its name in upper case, dots and
        dashes as underscores; `<N>` stands for the entry's index in an array of tables
        (`KEYBROKER_HSM_<N>_POOL_SIZE`, see `env_var_of`)."""
        return self.env_var_of("<N>")

    def env_var_of(self, index: int | str) -> str:
        """`env_var` for entry `index` of an array of tables (`index` ignored elsewhere)."""
        table = f"{self.table}.{index}" if self.table in ARRAY_TABLES else self.table
        return "KEYBROKER_" + re.sub(r"[.-]", "_", f"{table}.{self.key}".lstrip(".")).upper()

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
    Option("store", "url", T.STRING,
           "`postgresql://USER@HOST:PORT/DB`: a PostgreSQL database replicas share instead of "
           "SQLite (docs/storage.md); never with the password in it", field_name="store_url",
           default_text="none: SQLite at `database`"),
    Option("store", "password_file", T.PATH,
           "file holding the PostgreSQL password (mode 0600); `KEYBROKER_DATABASE_PASSWORD` "
           "wins over it", field_name="store_password_file", default_text="none"),
    Option("store", "pool_size", T.INTEGER, "PostgreSQL connections per broker process, 1 to 100",
           field_name="store_pool_size"),
    Option("", "grace_seconds", T.NUMBER, "time calls in flight get to finish after SIGTERM"),
    Option("", "workers", T.INTEGER, "broker processes on one port (SO_REUSEPORT), 1 to 64",
           env="KEYBROKER_WORKERS"),
    Option("roles", "admins", T.NAMES, "principals with the admin role", env="KEYBROKER_ADMINS"),
    Option("roles", "auditors", T.NAMES, "principals with the auditor role",
           env="KEYBROKER_AUDITORS"),
    # The three [tls] keys go together (from the file or the environment): `validate` says so.
    Option("tls", "cert", T.PATH, "server certificate chain (PEM)", field_name="tls_cert",
           default_text=_DEV_PKI),
    Option("tls", "key", T.PATH, "its private key (PEM); never a CA's key", field_name="tls_key",
           default_text=_DEV_PKI),
    Option("tls", "client_ca", T.PATH, "CA certificates that issue client certificates",
           default_text=_DEV_PKI),
    Option("tls", "crl_file", T.PATH,
           "revoked client certificates: CRLs (PEM or DER) signed by the client CA; read "
           "again when it changes (docs/security.md)", field_name="tls_crl_file",
           default_text="none"),
    Option("tls", "deny_list_file", T.PATH,
           "revoked client certificates: one serial number or SHA-256 thumbprint a line; "
           "read again when it changes", field_name="tls_deny_list_file", default_text="none"),
    Option("tls", "revocation_check_seconds", T.NUMBER,
           "how often those two files are looked at for a change, 0 to 3600 (0: every call)",
           field_name="tls_revocation_check_seconds"),
    Option("limits", "max_workers", T.INTEGER,
           "threads for the calls not served on the event loop (key admin, tokens, audit, "
           "streams)"),
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
    Option("hsm", "fault_injection", T.STRING,
           "tests only: `MODULE:FUNCTION` wrapping this HSM with injected faults, e.g. "
           "`hsm_sim.faulty:from_spec`; refused unless `KEYBROKER_ALLOW_FAULT_INJECTION=1` "
           "(docs/operations.md)", default_text="none"),
    Option("hsm", "fault_spec", T.STRING,
           "tests only: the faults `fault_injection` injects, e.g. "
           "`decrypt nth=2 ckr=CKR_DEVICE_ERROR`, or `@FILE`", default_text="none"),
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
    Option("metrics", "listen", T.STRING,
           "Prometheus metrics over plain HTTP (docs/metrics.md), HOST:PORT, loopback advised; "
           "worker i serves on PORT + i; empty: off", field_name="metrics_listen"),
    Option("keys", "min_destruction_window", T.NUMBER,
           "shortest `pending_window` of a scheduled destruction, in seconds (also the window "
           "when a request gives none)", field_name="keys_min_destruction_window"),
    Option("keys", "scheduler_interval", T.NUMBER,
           "seconds between passes of the key scheduler (due destructions and rotations); "
           "0: none in this process", field_name="keys_scheduler_interval"),
    Option("keys", "lease_seconds", T.NUMBER,
           "seconds a scheduler's claim on a due task holds; a broker that died is taken over "
           "once it expires", field_name="keys_lease_seconds"),
    Option("approvals", "required", T.INTEGER,
           "distinct admins, the requester included, who must approve `UpdateKeyPolicy`, "
           "`EnableKey` of a disabled key and `ScheduleKeyDestruction` (docs/lifecycle.md); "
           "1: applied at once, 2 to 10: a pending request", field_name="approvals_required"),
    Option("approvals", "expiry", T.NUMBER,
           "seconds an approval request waits for its approvals before it expires, at most "
           "2592000 (30 days)", field_name="approvals_expiry"),
)  # fmt: skip
# And the array of tables "hsm".
_TABLES = ("roles", "tls", "limits", "audit", "metrics", "keys", "store", "approvals")
_ARRAYS = {"audit": {"sinks"}}  # arrays of tables inside a table: [[audit.sinks]]
#: Arrays of tables: KEYBROKER_<TABLE>_<N>_<KEY> overrides a key of entry N.
ARRAY_TABLES = ("hsm", "audit.sinks")
#: Keys that name a secret: refused in the file, whatever table they are in.
_SECRET_KEY = re.compile(r"(?:^|_)(pin|password|passwd|passphrase|secret)$")


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
        env = f"`{o.env_var}`" + (f" or `{o.env}`" if o.env not in ("", o.env_var) else "")
        if o.secret:
            env += " (never in the file)"
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


def _secret_refusal(table: str, label: str, key: str, index: int | None) -> str | None:
    """Why `key` may not be in the file, when it is a secret (never repeating its value).

    Returns:
        None when `key` names no secret; else one line naming the settings to use instead.
    """
    options = _OPTIONS_OF.get(table, {})
    option = options.get(key)
    found = _SECRET_KEY.search(key)
    if (option is not None and not option.secret) or (option is None and found is None):
        return None
    word = found.group(1) if found else key
    ways = []
    if f"{word}_file" in options:
        ways.append(f"'{label}{word}_file' (a file of mode 0600)")
    if f"{word}_env" in options:
        ways.append(f"'{label}{word}_env' (the name of an environment variable)")
    if option is not None:
        ways.append(f"the environment variable {option.env_var_of(index or 0)}")
    if table == "hsm" and word == "pin" and index == 0:
        ways.append(f"{HSM_PIN_ENV} (the first HSM's PIN)")
    if table == "store" and word == "password":
        ways.append(f"the environment variable {DATABASE_PASSWORD_ENV}")
    use = " or ".join(ways) if ways else "an environment variable or a file of mode 0600"
    return f"'{label}{key}' is a secret and is never read from the configuration file; use {use}"


def _unknown(known: set[str], label: str, key: str) -> str:
    """The line for an unknown key, with the closest known one (or the table it belongs in)."""
    close = [f"{label}{k}" for k in difflib.get_close_matches(key, sorted(known), n=1)]
    close = close or [o.name for o in OPTIONS if o.key == key and o.table not in ARRAY_TABLES]
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"unknown key '{label}{key}'{hint}"


def _section(
    values: Mapping[str, object],
    table: str,
    label: str,
    home: Path,
    source: str,
    problems: list[str],
    index: int | None = None,
) -> dict[str, Any]:
    """Checks one table of the file against its options.

    Returns:
        Field name -> value for the keys that are right; each wrong one adds a line to
        `problems` instead, so that one run reports every mistake.
    """
    options = _OPTIONS_OF.get(table, {})
    known = set(options) | ({*_TABLES, "hsm"} if not table else set()) | _ARRAYS.get(table, set())
    out: dict[str, Any] = {}
    for key, value in values.items():
        refusal = _secret_refusal(table, label, key, index)
        if refusal is not None:
            problems.append(f"{source}: {refusal}")
        elif key not in known:
            problems.append(f"{source}: {_unknown(known, label, key)}")
        elif key in options:
            try:
                option = options[key]
                out[option.field] = _convert(option, value, home, f"{source}: {label}{key}")
            except ConfigError as exc:
                problems.extend(exc.problems)
    for key, option in options.items():
        if option.required and key not in values:
            problems.append(f"{source}: {label}{key} is required")
    return out


def _entries(
    entries: object,
    table: str,
    make: Callable[..., _E],
    home: Path,
    source: str,
    problems: list[str],
) -> tuple[_E, ...]:
    """The entries of an array of tables (`[[hsm]]`); those with a problem are left out."""
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        problems.append(f"{source}: {table} must be an array of tables ([[{table}]])")
        return ()
    out = []
    for i, entry in enumerate(entries):
        before = len(problems)
        values = _section(entry, table, f"{table}[{i}].", home, source, problems, i)
        if len(problems) == before:
            out.append(make(**values))
    return tuple(out)


def _from_file(config_file: Path, home: Path, problems: list[str]) -> dict[str, Any]:
    try:
        doc = tomllib.loads(config_file.read_text())
    except FileNotFoundError:
        problems.append(f"config file {config_file} does not exist")
        return {}
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        problems.append(f"cannot read config file {config_file}: {reason}")
        return {}
    source = str(config_file)
    changes = _section(doc, "", "", home, source, problems)
    for table in [t for t in doc if t in _TABLES]:  # in the file's order, as its problems
        if not isinstance(doc[table], dict):
            problems.append(f"{source}: {table} must be a table ([{table}])")
            continue
        changes.update(_section(doc[table], table, f"{table}.", home, source, problems))
    tls = doc.get("tls")
    if isinstance(tls, dict) and {"cert", "key", "client_ca"} & set(tls):
        # Revocation keys alone keep the development PKI (its CA signs the CRL).
        changes["dev_pki"] = False
    hsms = _entries(doc.get("hsm", []), "hsm", HsmConfig, home, source, problems)
    if hsms:
        changes["hsms"] = hsms
    audit = doc.get("audit")
    sinks = audit.get("sinks", []) if isinstance(audit, dict) else []
    if sinks:
        changes["audit_sinks"] = _entries(
            sinks, "audit.sinks", AuditSinkConfig, home, source, problems
        )
    return changes


_BOOLEANS = {"1": True, "true": True, "yes": True, "on": True}
_BOOLEANS |= {"0": False, "false": False, "no": False, "off": False}


def _from_text(option: Option, text: str, home: Path, var: str) -> Any:
    """A variable's text as `option`'s value.

    Raises:
        ConfigError: one line naming the variable and the key (never the value of a secret).
    """
    value: object = text
    try:
        if option.type is Type.INTEGER:
            value = int(text)
        elif option.type is Type.NUMBER:
            value = float(text)
        elif option.type is Type.BOOLEAN:
            value = _BOOLEANS[text.strip().lower()]
    except (ValueError, KeyError):
        article = "an" if option.type is Type.INTEGER else "a"
        raise ConfigError(f"{var} ({option.name}) must be {article} {option.type.value}") from None
    return _convert(option, value, home, f"{var} ({option.name})")


def _from_env(env: Mapping[str, str], home: Path, problems: list[str]) -> dict[str, Any]:
    """The settings that KEYBROKER_* variables set, but those of `[[hsm]]`-like entries
    (`_entries_from_env`). An empty variable sets nothing."""
    changes: dict[str, Any] = {}
    for option in OPTIONS:
        if option.table in ARRAY_TABLES:
            continue
        for var in dict.fromkeys((option.env, option.env_var)):  # the canonical name wins
            text = env.get(var, "") if var else ""
            if text:
                try:
                    changes[option.field] = _from_text(option, text, home, var)
                except ConfigError as exc:
                    problems.extend(exc.problems)
    if {"tls_cert", "tls_key", "client_ca"} & set(changes):
        changes["dev_pki"] = False
    return changes


def _entries_from_env(
    entries: tuple[_E, ...], table: str, env: Mapping[str, str], home: Path, problems: list[str]
) -> tuple[_E, ...]:
    """`entries` with the keys that KEYBROKER_<TABLE>_<N>_<KEY> variables override."""
    options = {o.env_var_of(0): o for o in _OPTIONS_OF[table].values()}
    prefix = "KEYBROKER_" + table.replace(".", "_").upper() + "_"
    pattern = re.compile(re.escape(prefix) + r"(\d+)_(\w+)")
    changed = list(entries)
    for var in sorted(env):
        found = pattern.fullmatch(var)
        if found is None or not env[var]:
            continue
        index = int(found.group(1))
        option = options.get(f"{prefix}0_{found.group(2)}")
        if option is None:
            known = {o.key.upper() for o in options.values()}
            close = difflib.get_close_matches(found.group(2), sorted(known), n=1)
            hint = f"; did you mean {prefix}{index}_{close[0]}?" if close else ""
            problems.append(f"{var}: unknown key '{table}[{index}].{found.group(2).lower()}'{hint}")
        elif index >= len(changed):
            problems.append(f"{var}: there is no {table}[{index}] ({len(changed)} configured)")
        else:
            try:
                value = _from_text(option, env[var], home, var)
                changed[index] = replace(changed[index], **{option.field: value})  # type: ignore[type-var]
            except ConfigError as exc:
                problems.extend(exc.problems)
    return tuple(changed)


def load_settings(
    home: Path | None = None,
    listen: str | None = None,
    config_file: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> Settings:
    """Builds settings: defaults, then the TOML file, then KEYBROKER_* variables, then flags.

    Raises:
        ConfigError: settings are unknown, missing, of the wrong type, out of range or
            inconsistent; one line for each, naming the file (or variable) and the key.
    """
    env = os.environ if env is None else env
    home = (home or Path(env.get(HOME_ENV, "var"))).expanduser().resolve()
    problems: list[str] = []
    changes = _from_file(config_file, home, problems) if config_file is not None else {}
    changes.update(_from_env(env, home, problems))
    if listen:
        changes["listen"] = listen
    hsms: tuple[HsmConfig, ...] = changes.get("hsms") or (_embedded_hsm(home),)
    hsms = _entries_from_env(hsms, "hsm", env, home, problems)
    if env.get(HSM_PIN_ENV):
        hsms = (replace(hsms[0], pin_env=HSM_PIN_ENV), *hsms[1:])
    changes["hsms"] = hsms
    changes["audit_sinks"] = _entries_from_env(
        changes.get("audit_sinks", ()), "audit.sinks", env, home, problems
    )
    changes.setdefault("default_hsm", hsms[0].name)
    settings = replace(Settings(home=home), **changes)
    # Whether the settings agree with each other is asked only of settings that all parsed:
    # an [[hsm]] left out for a typo would make default_hsm look wrong too.
    problems += _problems_of(settings, consistency=not problems)
    problems += fault_injection_problems(settings, env)
    if problems:
        raise ConfigError(*problems)
    return settings


def fault_injection_problems(settings: Settings, env: Mapping[str, str]) -> list[str]:
    """One line per `[[hsm]]` whose `fault_injection` is set while KEYBROKER_ALLOW_FAULT_INJECTION
    is not "1": a test configuration copied to production must refuse to start, not fail
    calls on purpose."""
    if env.get(FAULT_INJECTION_ENV) == "1":
        return []
    return [
        f"hsm[{i}].fault_injection is for tests only: it makes HSM calls fail on purpose; "
        f"remove it, or set {FAULT_INJECTION_ENV}=1 in a test environment"
        for i, h in enumerate(settings.hsms)
        if h.fault_injection
    ]


def validate(settings: Settings) -> Settings:
    """Checks ranges and consistency of settings built in code (tests, `load_settings`).

    Raises:
        ConfigError: one line for each problem.
    """
    problems = _problems_of(settings)
    if problems:
        raise ConfigError(*problems)
    return settings


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _listen_problem(key: str, address: str) -> str | None:
    host, _, port = address.rpartition(":")
    if host and port.isdigit() and int(port) <= 65535:
        return None
    return f"{key} must be HOST:PORT with a port from 0 to 65535, not {address!r}"


def _problems_of(settings: Settings, consistency: bool = True) -> list[str]:
    """Every value out of its range, and (with `consistency`) every disagreement between
    settings, one line each naming the key."""
    s = settings
    problems = [p for p in (_listen_problem("listen", s.listen),) if p]
    if s.insecure_listen:
        problems += [p for p in (_listen_problem("insecure_listen", s.insecure_listen),) if p]
    for i, h in enumerate(s.hsms):
        if len(h.jurisdiction) != 2 or not h.jurisdiction.isalpha() or not h.jurisdiction.isupper():
            problems.append(f"hsm[{i}].jurisdiction must be an ISO code such as 'FR'")
        if h.pin_file is None and h.pin_env is None:
            problems.append(f"hsm[{i}] ({h.name}): set pin_file or pin_env")
        if h.pin_env is not None and not _ENV_NAME.fullmatch(h.pin_env):
            # Never repeated: a PIN written where the variable's name belongs.
            problems.append(f"hsm[{i}].pin_env must be the name of an environment variable")
        if not 1 <= h.pool_size <= 64:
            problems.append(f"hsm[{i}].pool_size must be between 1 and 64, not {h.pool_size}")
        if h.fault_injection and not re.fullmatch(r"[\w.]+:\w+", h.fault_injection):
            problems.append(f"hsm[{i}].fault_injection must be MODULE:FUNCTION")
        if h.fault_spec and not h.fault_injection:
            problems.append(f"hsm[{i}].fault_spec is set but fault_injection is not")
    ranges: tuple[tuple[str, float, float, float | None], ...] = (
        ("workers", s.workers, 1, 64),
        ("grace_seconds", s.grace_seconds, 0, None),
        ("limits.max_workers", s.max_workers, 1, None),
        ("limits.max_concurrent_rpcs", s.max_concurrent_rpcs, 1, None),
        ("limits.rate_limit_per_second", s.rate_limit_per_second, 0, None),
        ("limits.rate_limit_burst", s.rate_limit_burst, 1, None),
        ("audit.checkpoint_events", s.audit_checkpoint_events, 1, None),
        ("keys.min_destruction_window", s.keys_min_destruction_window, 1, 3653 * 86400),
        ("keys.scheduler_interval", s.keys_scheduler_interval, 0, 86400),
        ("keys.lease_seconds", s.keys_lease_seconds, 1, 86400),
        ("approvals.required", s.approvals_required, 1, 10),
        ("approvals.expiry", s.approvals_expiry, 1, 30 * 86400),
        ("tls.revocation_check_seconds", s.tls_revocation_check_seconds, 0, 3600),
    )
    for key, value, low, high in ranges:
        if high is not None and not low <= value <= high:
            problems.append(f"{key} must be between {low:g} and {high:g}, not {value:g}")
        elif value < low:
            problems.append(f"{key} must be at least {low:g}, not {value:g}")
    if not 0 < s.audit_checkpoint_seconds <= 3600:
        problems.append(
            "audit.checkpoint_seconds must be more than 0 and at most 3600, "
            f"not {s.audit_checkpoint_seconds:g}"
        )
    for i, sink in enumerate(s.audit_sinks):
        try:
            sink.check()
        except ValueError as exc:
            problems.append(f"audit.sinks[{i}]: {exc}")
    if problem := _metrics_problem(s):
        problems.append(problem)
    problems += _store_problems(s)
    if not s.dev_pki:
        tls = {"tls.cert": s.tls_cert, "tls.key": s.tls_key, "tls.client_ca": s.client_ca}
        problems += [f"{k} is required with the other [tls] keys" for k, v in tls.items() if not v]
    if consistency:
        problems += _disagreements(s)
    return problems


def _disagreements(s: Settings) -> list[str]:
    problems = []
    names = [h.name for h in s.hsms]
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"hsm: the name {name!r} is used by more than one [[hsm]]")
    if s.default_hsm not in names:
        problems.append(
            f"default_hsm {s.default_hsm!r} is not the name of an [[hsm]] ({', '.join(names)})"
        )
    sink_names = [x.sink_name for x in s.audit_sinks]
    if len(set(sink_names)) != len(sink_names):
        problems.append("audit.sinks: give each sink a distinct name (it defaults to its type)")
    return problems


#: The options of each table, by key.
_OPTIONS_OF: dict[str, dict[str, Option]] = {}
for _option in OPTIONS:
    _OPTIONS_OF.setdefault(_option.table, {})[_option.key] = _option


def _store_problems(s: Settings) -> list[str]:
    """What is wrong with the [store] keys: a URL that is not PostgreSQL's or that carries a
    password (a configuration file is copied and read by many), a pool out of range."""
    problems = []
    if not 1 <= s.store_pool_size <= 100:
        problems.append(f"store.pool_size must be between 1 and 100, not {s.store_pool_size}")
    if not s.store_url:
        if s.store_password_file is not None:
            problems.append("store.password_file is set but store.url is empty (SQLite)")
        return problems
    parts = urlsplit(s.store_url)
    if parts.scheme not in ("postgresql", "postgres"):
        problems.append("store.url must start with postgresql:// (empty: SQLite at `database`)")
    elif parts.password is not None or "password=" in parts.query:
        problems.append(
            f"store.url must not hold the password: set {DATABASE_PASSWORD_ENV} or "
            "store.password_file (mode 0600)"
        )
    if s.database is not None:
        problems.append("set database (SQLite) or store.url (PostgreSQL), not both")
    return problems


def _metrics_problem(settings: Settings) -> str:
    """What is wrong with `metrics.listen`, or "" (several workers need a fixed first port)."""
    listen = settings.metrics_listen
    if not listen:
        return ""
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        return f"metrics.listen must be HOST:PORT, not {listen!r}"
    if settings.workers > 1 and not 0 < int(port) <= 65536 - settings.workers:
        return (
            f"metrics.listen: with {settings.workers} workers give a fixed port (worker i "
            f"serves on PORT + i), at most {65536 - settings.workers}"
        )
    return ""
