"""Composition root: settings -> adapters -> services -> server. The only place that picks
adapters; everything else receives its collaborators through constructors."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import TypeVar

from broker import devhsm
from broker.adapters.audit_sinks import QueuedSink, SinkFanout, open_sinks
from broker.adapters.pkcs11 import Pkcs11Hsm, Pkcs11Library
from broker.adapters.postgres_store import PostgresStore
from broker.adapters.sqlite_store import SqliteStore
from broker.clock import SystemClock
from broker.config import DEV_IDENTITIES, ConfigError, Settings
from broker.devpki import ensure_dev_pki
from broker.domain import Role
from broker.errors import HsmPinRefused, Unavailable
from broker.fault_injection import with_faults
from broker.metrics import Metrics
from broker.ports import AuditStore, Clock, Hsm, HsmInfo, Store
from broker.probes import PROBE_TIMEOUT, bounded
from broker.services.access import Access, RateLimiter
from broker.services.approvals import ApprovalService, ApprovalSettings
from broker.services.audit import AuditLog, AuditReader, AuditSettings
from broker.services.crypto import CryptoService
from broker.services.keys import KeyService
from broker.services.orphans import report_orphans
from broker.services.scheduler import KeyScheduler, new_holder_id
from broker.services.signing import AUDIT_PURPOSE, TOKEN_PURPOSE, SigningKeys
from broker.services.startup_check import check_templates, settled
from broker.services.tokens import TokenService, TokenSettings
from broker.transport.revocation import ClientCertificateRevocations, RevocationFileError
from broker.transport.server import Services, TlsMaterial

log = logging.getLogger(__name__)


@dataclass
class App:
    settings: Settings
    services: Services
    store: Store
    hsms: dict[str, Hsm]
    signing: SigningKeys
    tls: TlsMaterial
    audit_sinks: SinkFanout
    audit: AuditLog | None = None
    metrics: Metrics = field(default_factory=Metrics)
    #: Due destructions and rotations (`keys.scheduler_interval`); a pass is run by hand
    #: with `scheduler.run_once()`.
    scheduler: KeyScheduler | None = None

    def health_probes(self, timeout: float = PROBE_TIMEOUT) -> list[Callable[[], None]]:
        """What health watches (`HealthMonitor`): every HSM and the store, each recorded in
        `keybroker_dependency_up`. Any of them down, or not answering within `timeout`
        seconds (a hung HSM, `broker.probes`), makes the broker NOT_SERVING."""
        checks = {f"hsm:{name}": h.check for name, h in self.hsms.items()}
        checks["store"] = self.store.check
        return [
            self.metrics.probe(name, bounded(name, check, timeout))
            for name, check in checks.items()
        ]

    def close(self) -> None:
        if self.scheduler is not None:
            # Before anything it uses closes; a pass under way finishes first.
            self.scheduler.close()
        if self.audit is not None:
            # First, while the HSM is open: the chain's closing checkpoint.
            self.audit.close()
        for hsm in self.hsms.values():
            hsm.close()
        self.store.close()
        # Last: whatever the trail committed up to here still goes out to the SIEM.
        self.audit_sinks.close()


def open_hsms(settings: Settings, metrics: Metrics | None = None) -> dict[str, Hsm]:
    """Loads each PKCS#11 module once, initialises development SoftHSM2 tokens if asked
    (`broker.devhsm`), and opens a session pool per configured token (reported to `metrics`)."""
    libraries: dict[str, Pkcs11Library] = {}
    hsms: dict[str, Hsm] = {}
    if any(not c.module for c in settings.hsms):
        # SoftHSM2 reads SOFTHSM2_CONF when the module is initialised: point it at HOME first.
        devhsm.activate_softhsm_conf(settings.home)
    for cfg in settings.hsms:
        module = cfg.module or devhsm.find_softhsm_module()
        if module not in libraries:
            libraries[module] = Pkcs11Library.shared(module)
        library = libraries[module]
        if cfg.softhsm_init:
            assert cfg.pin_file is not None
            # Not retried: a listing that missed the token for a moment must not make a new one.
            devhsm.ensure_token(settings.home, cfg.token_label, cfg.pin_file, library=library)
        info = HsmInfo(cfg.name, cfg.jurisdiction, cfg.operator)
        observer = metrics.hsm_operation if metrics is not None else None
        pin = cfg.read_pin()
        try:
            hsm: Hsm = _start_retrying(
                cfg.name,
                partial(
                    Pkcs11Hsm, library, cfg.token_label, pin, info, cfg.pool_size, observer=observer
                ),
                library,
            )
        except Unavailable as exc:
            for opened in hsms.values():
                opened.close()
            raise RuntimeError(f"HSM {cfg.name!r} (token {cfg.token_label!r}): {exc}") from exc
        try:
            hsm = with_faults(hsm, cfg)  # tests only: docs/operations.md
            _first_check(hsm, library)
        except ConfigError:
            for opened in (hsm, *hsms.values()):
                opened.close()
            raise
        except Unavailable as exc:
            for opened in (hsm, *hsms.values()):
                opened.close()
            raise RuntimeError(f"HSM {cfg.name!r} (token {cfg.token_label!r}): {exc}") from exc
        hsms[cfg.name] = hsm
    return hsms


_T = TypeVar("_T")

#: Pauses between the start's attempts to reach an HSM (seconds).
START_RETRY_DELAYS = (0.5, 1.0, 2.0)


def _start_retrying(
    name: str, attempt: Callable[[], _T], library: Pkcs11Library | None = None
) -> _T:
    """`attempt()`, tried again after the START_RETRY_DELAYS while the HSM is unavailable
    (not when it refuses the PIN): SoftHSM2 answers CKR_GENERAL_ERROR to a token listing while
    a sibling worker rewrites the token's files."""
    for delay in (*START_RETRY_DELAYS, None):
        try:
            return attempt()
        except HsmPinRefused:
            raise
        except Unavailable as exc:
            if delay is None:
                raise
            log.warning("HSM %s not reachable at start (%s); retrying", name, exc)
            time.sleep(delay)
            if library is not None:
                # SoftHSM2 keeps a broken view of a token read mid-rewrite until re-initialised.
                try:
                    library.reinitialize()
                except Unavailable as again:
                    log.warning("PKCS#11 module not re-initialised: %s", again)
    raise AssertionError("unreachable")


def _reload_tokens(hsms: dict[str, Hsm]) -> None:
    """Has each PKCS#11 token read afresh before the start looks again for a missing object."""
    modules: set[int] = set()
    for hsm in hsms.values():
        # One re-initialisation per loaded module re-reads every token of it.
        if isinstance(hsm, Pkcs11Hsm) and id(hsm.library) not in modules:
            modules.add(id(hsm.library))
            try:
                hsm.reload()
            except Unavailable as exc:
                log.warning("HSM %s not re-read: %s", hsm.info.name, exc)


def _first_check(hsm: Hsm, library: Pkcs11Library | None = None) -> None:
    """Logs in now, so that a wrong PIN or a missing token stops the start.

    A transient failure (SoftHSM2 answers CKR_GENERAL_ERROR or CKR_USER_PIN_NOT_INITIALIZED
    while another process rewrites its token files; a network HSM may blink) is tried again a
    few times, `library` re-initialised in between. A refused PIN is not: a real HSM may lock
    the PIN after a few wrong attempts.
    """
    _start_retrying(hsm.info.name, hsm.check, library)


def load_tls(settings: Settings) -> TlsMaterial:
    if settings.dev_pki:
        ensure_dev_pki(settings.pki_dir, DEV_IDENTITIES)
        pki = settings.pki_dir
        paths = (pki / "server.pem", pki / "server.key", pki / "ca.pem")
    else:
        assert settings.tls_cert and settings.tls_key and settings.client_ca
        paths = (settings.tls_cert, settings.tls_key, settings.client_ca)
    cert, key, ca = (Path(p).read_bytes() for p in paths)
    return TlsMaterial(
        server_cert=cert, server_key=key, client_ca=ca, revocations=load_revocations(settings, ca)
    )


def load_revocations(settings: Settings, client_ca: bytes) -> ClientCertificateRevocations | None:
    """The revocation check of `tls.crl_file` and `tls.deny_list_file`; None when neither
    is set.

    Raises:
        ConfigError: a file cannot be read, or a CRL is not signed by a client CA.
    """
    if settings.tls_crl_file is None and settings.tls_deny_list_file is None:
        return None
    try:
        return ClientCertificateRevocations(
            client_ca,
            crl_file=settings.tls_crl_file,
            deny_list_file=settings.tls_deny_list_file,
            check_seconds=settings.tls_revocation_check_seconds,
        )
    except RevocationFileError as exc:
        raise ConfigError(str(exc)) from None


def open_store(settings: Settings) -> Store:
    """The PostgreSQL database of `store.url` (replicas share it), else the embedded SQLite
    file; either brings its schema up to date first (docs/storage.md).

    Raises:
        StoreUnavailable: the database cannot be reached.
        SchemaTooNew: a newer keybroker migrated it.
        ConfigError: the password file is missing or unsafe.
    """
    if settings.store_url:
        return PostgresStore(
            settings.store_url, settings.read_database_password(), settings.store_pool_size
        )
    return SqliteStore(settings.database or settings.home / "keybroker.db")


def build_app(
    settings: Settings,
    clock: Clock | None = None,
    audit_store: AuditStore | None = None,
    metrics: Metrics | None = None,
    *,
    scan_orphans: bool = False,
) -> App:
    """Builds every part of the broker for `settings`.

    Args:
        settings: validated settings.
        clock: the time source (tests inject one).
        audit_store: replaces the audit table (tests inject a failing one).
        metrics: where the broker reports; a fresh registry of its own when None.
        scan_orphans: log the HSM objects no key of the store refers to
            (`services.orphans`); it reads every key object of each token, so the server
            does it once per start rather than every broker a test builds.
    """
    settings.home.mkdir(mode=0o700, parents=True, exist_ok=True)
    clock = clock or SystemClock()
    metrics = metrics or Metrics()
    tls = load_tls(settings)
    hsms = open_hsms(settings, metrics)
    try:
        store = open_store(settings)
    except BaseException:
        for hsm in hsms.values():
            hsm.close()
        raise
    try:
        app = _assemble(settings, clock, audit_store, tls, hsms, store, metrics)
    except BaseException:
        # Nothing half-opened stays behind when the start fails (e.g. a weak key).
        for hsm in hsms.values():
            hsm.close()
        store.close()
        raise
    if scan_orphans:
        report_orphans(store, hsms, app.signing)  # reported, never deleted
    return app


def _assemble(
    settings: Settings,
    clock: Clock,
    audit_store: AuditStore | None,
    tls: TlsMaterial,
    hsms: dict[str, Hsm],
    store: Store,
    metrics: Metrics,
) -> App:
    roles: dict[str, frozenset[Role]] = {}
    for name in settings.admins:
        roles[name] = roles.get(name, frozenset()) | {Role.ADMIN}
    for name in settings.auditors:
        roles[name] = roles.get(name, frozenset()) | {Role.AUDITOR}
    access = Access(roles, hsms)
    limiter = RateLimiter(settings.rate_limit_per_second, settings.rate_limit_burst)
    signing = SigningKeys(store, hsms)
    refresh = partial(_reload_tokens, hsms)
    settled(lambda: signing.ensure(TOKEN_PURPOSE, settings.default_hsm), refresh)
    audit_key = settled(lambda: signing.ensure(AUDIT_PURPOSE, settings.default_hsm), refresh)
    check_templates(store, hsms, signing, refresh)
    # After the checks that may refuse the start, so no sink thread outlives a failed start.
    sinks = open_sinks(settings.audit_sinks)
    metrics.watch_pools({n: h.pool for n, h in hsms.items() if isinstance(h, Pkcs11Hsm)})
    metrics.watch_sinks({s.name: s.stats for s in sinks.sinks if isinstance(s, QueuedSink)})
    audit = AuditLog(
        metrics.timed_audit_store(audit_store or store),
        clock,
        signing,
        anchors=audit_key.hsm,  # the anchors live with the audit key
        settings=AuditSettings(
            settings.broker_id, settings.audit_checkpoint_events, settings.audit_checkpoint_seconds
        ),
        after_commit=sinks,
    )
    tokens = TokenService(
        TokenSettings(issuer=settings.issuer, audience=settings.audience),
        keys=store,
        revocations=store,
        access=access,
        audit=audit,
        limiter=limiter,
        clock=clock,
        signing=signing,
        observer=metrics,
    )
    keys = KeyService(
        store,
        access,
        audit,
        clock,
        settings.default_hsm,
        limiter,
        min_destruction_window=timedelta(seconds=settings.keys_min_destruction_window),
    )
    approval_settings = ApprovalSettings(
        settings.approvals_required, timedelta(seconds=settings.approvals_expiry)
    )
    if settings.approvals_required > len(set(settings.admins)):
        log.warning(
            "approvals.required is %d but roles.admins names %d: no change that needs "
            "approval can be approved",
            settings.approvals_required,
            len(set(settings.admins)),
        )
    services = Services(
        keys=keys,
        approvals=ApprovalService(
            store, store, keys, access, audit, clock, limiter, approval_settings
        ),
        crypto=CryptoService(store, access, audit, tokens, limiter),
        tokens=tokens,
        audit=AuditReader(audit, access),
        audit_sinks=sinks.sinks,
    )
    scheduler = KeyScheduler(
        store,
        hsms,
        access,
        audit,
        clock,
        signing,
        issuer=settings.issuer,
        holder=new_holder_id(settings.broker_id),
        interval=settings.keys_scheduler_interval,
        lease=timedelta(seconds=settings.keys_lease_seconds),
    )
    app = App(settings, services, store, hsms, signing, tls, sinks, audit, metrics, scheduler)
    scheduler.start()
    return app
