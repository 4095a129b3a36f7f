"""`keybroker-server`: runs the broker."""

from __future__ import annotations

import logging
import os
import re
import shlex
import signal
import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import NoReturn

import click

from broker import logs
from broker.app import build_app
from broker.config import (
    DATABASE_PASSWORD_ENV,
    HOME_ENV,
    HSM_PIN_ENV,
    OPTIONS,
    ConfigError,
    Settings,
    load_settings,
    validate,
)
from broker.devpki import issue_dev_identity
from broker.home import HomeInUse, HomeLock, holder, lock_home, tighten_home
from broker.metrics import MetricsEndpoint, serve_metrics
from broker.preflight import check_files, check_tls, listen_problem
from broker.supervisor import run_workers
from broker.transport.server import HealthMonitor, create_server

log = logging.getLogger("broker")


def _banner(
    home: Path, port: int, host: str, hsm: str, jurisdiction: str, database: str = ""
) -> str:
    # Absolute paths: the lines are copied into shells in other directories.
    app_home = home.absolute()
    return "\n".join(
        [
            f"keybroker listening on {host}:{port} (mutual TLS)",
            f"  home      {app_home}",
            f"  HSM       {hsm} ({jurisdiction}), PIN in {app_home / 'hsm.pin'}",
            f"  database  {database or app_home / 'keybroker.db'}",
            f"  PKI       {app_home / 'pki'}: ca.pem, admin, auditor, producer, consumer",
            "  client    (in another shell, so that `keybroker` finds this broker)",
            f"export KEYBROKER_HOME={shlex.quote(str(app_home))}",
            "  try       keybroker --as admin keys create demo --grant producer:encrypt",
        ]
    )


def _metrics_line(settings: Settings) -> str:
    """The banner's metrics line: the endpoint, or one port per worker (`worker_settings`);
    empty when metrics are off or on a port picked at start (the log names it)."""
    host, _, port = settings.metrics_listen.rpartition(":")
    if not settings.metrics_listen or int(port) == 0:
        return ""
    if settings.workers == 1:
        return f"  metrics   http://{host}:{port}/metrics (plain HTTP)"
    last = int(port) + settings.workers - 1
    return f"  metrics   http://{host}:{port}/metrics to :{last}, one port per worker (plain HTTP)"


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--home",
    type=click.Path(path_type=Path, file_okay=False),
    envvar="KEYBROKER_HOME",
    default=Path("var"),
    show_default=True,
    help="Directory holding all local state.",
)
@click.option("--listen", default=None, help="HOST:PORT to listen on [default: 127.0.0.1:50051].")
@click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="TOML configuration file.",
)
@click.option(
    "--check-config",
    is_flag=True,
    help="Check the settings (file, KEYBROKER_* variables, flags) and the files they name, "
    "print a summary and exit: 0 if a broker can start with them, 2 (one line per problem) if "
    "not. Opens no HSM and no port.",
)
@click.version_option(
    package_name="keybroker-server", prog_name="keybroker-server", message="%(prog)s %(version)s"
)
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    default=None,
    help="Broker processes sharing the port (SO_REUSEPORT) [default: 1, or `workers`].",
)
@click.option("--log-level", default="INFO", show_default=True)
@click.pass_context
def main(
    ctx: click.Context,
    home: Path,
    listen: str | None,
    config_file: Path | None,
    workers: int | None,
    check_config: bool,
    log_level: str,
) -> None:
    """Run the keybroker key broker (or, given a command, one development task)."""
    if ctx.invoked_subcommand is not None:
        return  # A development task such as dev-identity: no broker is started.
    try:
        settings = load_settings(home=home, listen=listen, config_file=config_file)
    except ConfigError as exc:
        # One line per problem naming the file and the setting; no traceback.
        _fail(exc.problems)
    if workers is not None:
        try:  # checked again with the flag: it bears on other settings (metrics.listen)
            settings = validate(replace(settings, workers=workers))
        except ConfigError as exc:
            _fail(exc.problems)
    if check_config:
        _check_config(settings, config_file)
    logs.configure(log_level)
    home_lock = _claim_home(settings)
    host = settings.listen.rsplit(":", 1)[0]
    addr_file = settings.home / "listen.addr"

    def on_ready(port: int) -> None:
        addr_file.write_text(f"{host}:{port}\n")
        hsm_cfg = next(h for h in settings.hsms if h.name == settings.default_hsm)
        banner = _banner(
            settings.home,
            port,
            host,
            hsm_cfg.name,
            hsm_cfg.jurisdiction,
            settings.database_location,
        )
        if settings.workers > 1:
            banner = banner.replace(" (mutual TLS)", f" (mutual TLS, {settings.workers} workers)")
        if metrics := _metrics_line(settings):
            banner += "\n" + metrics
        # stdout carries the audit events when a stdout sink is configured: banner to stderr.
        click.echo(banner, err=any(s.kind == "stdout" for s in settings.audit_sinks))

    try:
        if settings.workers > 1:
            code = run_workers(settings, prepare, serve, on_ready)
        else:
            code = serve(settings, False, on_ready)
    finally:
        addr_file.unlink(missing_ok=True)
        home_lock.release()
    if code:
        sys.exit(code)
    log.info("stopped")


@main.command("dev-identity")
@click.argument("name")
@click.option(
    "--country",
    default="",
    metavar="CC",
    help="The subject's country (C=), e.g. FR: what grants limited to countries check.",
)
@click.pass_context
def dev_identity(ctx: click.Context, name: str, country: str) -> None:
    """Create NAME.pem and NAME.key under HOME/pki from the development CA.

    NAME becomes the certificate's common name: the principal that key policies grant
    (`--grant NAME:encrypt`). Development only; an existing identity is never overwritten.
    Then: keybroker --as NAME ...
    """
    home: Path = ctx.parent.params["home"] if ctx.parent is not None else Path("var")
    try:
        cert, key = issue_dev_identity(home / "pki", name, country.strip().upper())
    except ValueError as exc:
        click.echo(f"keybroker-server: {exc}", err=True)
        sys.exit(2)
    click.echo(f"created {cert.absolute()} and {key.absolute()} (mode 0600)")
    click.echo(f"use it: keybroker --home {shlex.quote(str(home.absolute()))} --as {name} ...")


def _fail(problems: Iterable[str]) -> NoReturn:
    """One line per problem on stderr, then exit 2: the code of every refused start."""
    for problem in problems:
        click.echo(f"keybroker-server: {problem}", err=True)
    sys.exit(2)


def _check_config(settings: Settings, config_file: Path | None) -> NoReturn:
    """`--check-config`: what a start would refuse, or a summary of what it would run."""
    tls_problems, warnings = check_tls(settings)
    problems = check_files(settings) + tls_problems
    if problems:
        _fail(problems)
    for warning in warnings:
        click.echo(f"keybroker-server: warning: {warning}", err=True)
    click.echo("\n".join(_summary(settings, config_file)))
    sys.exit(0)


#: Environment variables that set a setting (`KEYBROKER_HSM_<N>_<KEY>` and the like aside).
_SETTING_VARS = {v for o in OPTIONS for v in (o.env, o.env_var) if v and "<N>" not in v}
_ENTRY_VAR = re.compile(r"KEYBROKER_(HSM|AUDIT_SINKS)_\d+_\w+")
#: Variables that are no setting of the file but that the broker reads.
_OTHER_VARS = {HOME_ENV, HSM_PIN_ENV, DATABASE_PASSWORD_ENV}


def _summary(settings: Settings, config_file: Path | None) -> list[str]:
    """The `--check-config` summary: where the settings came from and what they start.
    Names of variables only, never their values."""
    s = settings
    used = sorted(
        v
        for v, text in os.environ.items()
        if text and (v in _SETTING_VARS | _OTHER_VARS or _ENTRY_VAR.fullmatch(v))
    )
    running = holder(s.home)
    hsms = [
        f"{h.name} ({h.jurisdiction}), {h.module or 'SoftHSM2'}, token {h.token_label!r}, "
        + (f"PIN from ${h.pin_env}" if h.pin_env else f"PIN in {h.pin_file}")
        for h in s.hsms
    ]
    tls = (
        f"development PKI in {s.pki_dir}"
        if s.dev_pki
        else f"cert {s.tls_cert}, key {s.tls_key}, client CA {s.client_ca}"
    )
    lines = [
        "ok: the settings are usable",
        f"  home      {s.home}" + (f" (in use by pid {running.pid})" if running else ""),
        f"  file      {config_file.absolute() if config_file else 'none (built-in defaults)'}",
        f"  env       {', '.join(used) or 'no KEYBROKER_* setting'}",
        f"  listen    {s.listen} (mutual TLS), {s.workers} worker(s)",
        f"  tls       {tls}",
        *(f"  hsm       {h}" for h in hsms),
        f"  default   {s.default_hsm}",
        f"  database  {s.database_location}",
        f"  roles     admins {', '.join(s.admins)}; auditors {', '.join(s.auditors)}",
    ]
    revoked = [f"CRL {s.tls_crl_file}"] if s.tls_crl_file else []
    revoked += [f"deny list {s.tls_deny_list_file}"] if s.tls_deny_list_file else []
    if revoked:
        lines.append(f"  revoked   {', '.join(revoked)} (re-read when changed)")
    if s.insecure_listen:
        lines.append(f"  insecure  {s.insecure_listen} (plaintext: development only)")
    if s.metrics_listen:
        lines.append(f"  metrics   {s.metrics_listen}")
    lines += [f"  sink      {x.sink_name} ({x.kind})" for x in s.audit_sinks]
    return lines


def _claim_home(settings: Settings) -> HomeLock:
    """Everything a start checks before it opens an HSM: the files the settings name, the
    TLS material, that no other broker uses the home, that the ports are free; then the home
    is made the owner's only. Exits 2 with one line per problem.

    Returns:
        The home's lock: held until the process ends (workers inherit it).
    """
    tls_problems, warnings = check_tls(settings)
    problems = check_files(settings) + tls_problems
    if problems:
        _fail(problems)
    # Before anything is created: the database's -wal and -shm, listen.addr, the PKI.
    os.umask(0o077)
    try:
        home_lock = lock_home(settings.home)
    except HomeInUse as exc:
        _fail([str(exc)])
    except OSError as exc:
        _fail([f"cannot use the home {settings.home}: {exc.strerror or exc}"])
    # Left by a broker that was killed (no clean stop removes it): clients must not try it.
    (settings.home / "listen.addr").unlink(missing_ok=True)
    addresses = [settings.listen] + ([settings.insecure_listen] if settings.insecure_listen else [])
    busy = [reason for address in addresses if (reason := listen_problem(address))]
    if busy:
        home_lock.release()
        _fail(busy)
    for warning in warnings:
        log.warning("%s", warning)
    extra = [settings.database] if settings.database is not None else []
    loosened = tighten_home(settings.home, extra)
    if loosened:
        log.warning(
            "%d files or directories of the home were open to group or others and are now "
            "the owner's only (consider what they held exposed): %s",
            len(loosened),
            ", ".join(str(p) for p in loosened[:5]) + (", ..." if len(loosened) > 5 else ""),
        )
    return home_lock


def prepare(settings: Settings) -> int:
    """Builds the broker once and closes it: the first start's set-up, before workers fork."""
    try:
        build_app(settings, scan_orphans=True).close()
    except Exception as exc:
        log.error("start-up failed: %s", exc)
        log.debug("start-up failure", exc_info=True)
        return 2
    return 0


def serve(settings: Settings, reuse_port: bool, on_ready: Callable[[int], None]) -> int:
    """Runs one broker process until SIGTERM or SIGINT, then drains it; returns the exit code."""
    try:
        # Workers (reuse_port) leave the scan to `prepare`, which ran it once before forking.
        app = build_app(settings, scan_orphans=not reuse_port)
    except Exception as exc:
        log.error("start-up failed: %s", exc)
        log.debug("start-up failure", exc_info=True)
        return 2
    endpoint: MetricsEndpoint | None = None
    if settings.metrics_listen:
        try:
            endpoint = serve_metrics(app.metrics, settings.metrics_listen)
        except OSError as exc:
            log.error("cannot serve metrics on %s: %s", settings.metrics_listen, exc)
            app.close()
            return 2
    try:
        running = create_server(
            app.services,
            app.tls,
            settings.listen,
            settings.insecure_listen,
            settings.max_workers,
            settings.max_concurrent_rpcs,
            reuse_port=reuse_port,
            observer=app.metrics,
        )
    except (OSError, RuntimeError) as exc:
        # The port was free a moment ago (`_claim_home`); say why it is not now, in words.
        # Workers share the port on purpose, so a plain bind would find it busy.
        reason = "" if reuse_port else listen_problem(settings.listen)
        log.error("%s", reason or f"cannot listen on {settings.listen}: {exc}")
        if endpoint is not None:
            endpoint.close()
        app.close()
        return 2
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("signal %s: draining", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    monitor = HealthMonitor(running, app.health_probes()).start()
    on_ready(running.port)
    stop.wait()
    monitor.stop()
    running.stop(settings.grace_seconds)
    if endpoint is not None:
        endpoint.close()
    app.close()
    return 0


if __name__ == "__main__":
    main()
