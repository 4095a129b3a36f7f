"""Composition root: settings -> adapters -> services -> server. The only place that picks
adapters; everything else receives its collaborators through constructors."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from broker import devhsm
from broker.adapters.audit_sinks import SinkFanout, open_sinks
from broker.adapters.pkcs11 import Pkcs11Hsm, Pkcs11Library
from broker.adapters.sqlite_store import SqliteStore
from broker.clock import SystemClock
from broker.config import DEV_IDENTITIES, Settings
from broker.devpki import ensure_dev_pki
from broker.domain import Role
from broker.errors import HsmPinRefused, Unavailable
from broker.ports import AuditStore, Clock, Hsm, HsmInfo
from broker.services.access import Access, RateLimiter
from broker.services.audit import AuditLog, AuditReader, AuditSettings
from broker.services.crypto import CryptoService
from broker.services.keys import KeyService
from broker.services.signing import AUDIT_PURPOSE, TOKEN_PURPOSE, SigningKeys
from broker.services.startup_check import check_templates
from broker.services.tokens import TokenService, TokenSettings
from broker.transport.server import Services, TlsMaterial

log = logging.getLogger(__name__)


@dataclass
class App:
    settings: Settings
    services: Services
    store: SqliteStore
    hsms: dict[str, Hsm]
    signing: SigningKeys
    tls: TlsMaterial
    audit_sinks: SinkFanout
    audit: AuditLog | None = None

    def close(self) -> None:
        if self.audit is not None:
            # First, while the HSM is open: the chain's closing checkpoint.
            self.audit.close()
        for hsm in self.hsms.values():
            hsm.close()
        self.store.close()
        # Last: whatever the trail committed up to here still goes out to the SIEM.
        self.audit_sinks.close()


def open_hsms(settings: Settings) -> dict[str, Hsm]:
    """Loads each PKCS#11 module once, initialises development SoftHSM2 tokens if asked
    (`broker.devhsm`), and opens a session pool per configured token."""
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
            devhsm.ensure_token(settings.home, cfg.token_label, cfg.pin_file, library=library)
        info = HsmInfo(cfg.name, cfg.jurisdiction, cfg.operator)
        hsm = Pkcs11Hsm(library, cfg.token_label, cfg.read_pin(), info, cfg.pool_size)
        try:
            _first_check(hsm)
        except Unavailable as exc:
            for opened in (hsm, *hsms.values()):
                opened.close()
            raise RuntimeError(f"HSM {cfg.name!r} (token {cfg.token_label!r}): {exc}") from exc
        hsms[cfg.name] = hsm
    return hsms


#: Pauses between the start's attempts to reach an HSM (seconds).
START_RETRY_DELAYS = (0.5, 1.0, 2.0)


def _first_check(hsm: Hsm) -> None:
    """Logs in now, so that a wrong PIN or a missing token stops the start.

    A transient failure (SoftHSM2 answers CKR_GENERAL_ERROR while another process rewrites
    its token files; a network HSM may blink) is tried again a few times. A refused PIN is not:
    a real HSM may lock the PIN after a few wrong attempts.
    """
    for delay in (*START_RETRY_DELAYS, None):
        try:
            hsm.check()
            return
        except HsmPinRefused:
            raise
        except Unavailable as exc:
            if delay is None:
                raise
            log.warning("HSM %s not reachable at start (%s); retrying", hsm.info.name, exc)
            time.sleep(delay)


def load_tls(settings: Settings) -> TlsMaterial:
    if settings.dev_pki:
        ensure_dev_pki(settings.pki_dir, DEV_IDENTITIES)
        pki = settings.pki_dir
        paths = (pki / "server.pem", pki / "server.key", pki / "ca.pem")
    else:
        assert settings.tls_cert and settings.tls_key and settings.client_ca
        paths = (settings.tls_cert, settings.tls_key, settings.client_ca)
    cert, key, ca = (Path(p).read_bytes() for p in paths)
    return TlsMaterial(server_cert=cert, server_key=key, client_ca=ca)


def build_app(
    settings: Settings,
    clock: Clock | None = None,
    audit_store: AuditStore | None = None,
) -> App:
    """Builds every part of the broker for `settings`.

    Args:
        settings: validated settings.
        clock: the time source (tests inject one).
        audit_store: replaces the audit table (tests inject a failing one).
    """
    settings.home.mkdir(mode=0o700, parents=True, exist_ok=True)
    clock = clock or SystemClock()
    tls = load_tls(settings)
    hsms = open_hsms(settings)
    store = SqliteStore(settings.database or settings.home / "keybroker.db")
    try:
        return _assemble(settings, clock, audit_store, tls, hsms, store)
    except BaseException:
        # Nothing half-opened stays behind when the start fails (e.g. a weak key).
        for hsm in hsms.values():
            hsm.close()
        store.close()
        raise


def _assemble(
    settings: Settings,
    clock: Clock,
    audit_store: AuditStore | None,
    tls: TlsMaterial,
    hsms: dict[str, Hsm],
    store: SqliteStore,
) -> App:
    roles: dict[str, frozenset[Role]] = {}
    for name in settings.admins:
        roles[name] = roles.get(name, frozenset()) | {Role.ADMIN}
    for name in settings.auditors:
        roles[name] = roles.get(name, frozenset()) | {Role.AUDITOR}
    access = Access(roles, hsms)
    limiter = RateLimiter(settings.rate_limit_per_second, settings.rate_limit_burst)
    signing = SigningKeys(store, hsms)
    signing.ensure(TOKEN_PURPOSE, settings.default_hsm)
    audit_key = signing.ensure(AUDIT_PURPOSE, settings.default_hsm)
    check_templates(store, hsms, signing)
    # After the checks that may refuse the start, so no sink thread outlives a failed start.
    sinks = open_sinks(settings.audit_sinks)
    audit = AuditLog(
        audit_store or store,
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
    )
    services = Services(
        keys=KeyService(store, access, audit, clock, settings.default_hsm, limiter),
        crypto=CryptoService(store, access, audit, tokens, limiter),
        tokens=tokens,
        audit=AuditReader(audit, access),
        audit_sinks=sinks.sinks,
    )
    return App(settings, services, store, hsms, signing, tls, sinks, audit)
