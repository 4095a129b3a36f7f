"""`keybroker-server`: runs the broker."""

from __future__ import annotations

import logging
import shlex
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import click

from broker import logs
from broker.app import build_app
from broker.config import ConfigError, Settings, load_settings
from broker.devpki import issue_dev_identity
from broker.supervisor import run_workers
from broker.transport.server import HealthMonitor, create_server

log = logging.getLogger("broker")


def _banner(home: Path, port: int, host: str, hsm: str, jurisdiction: str) -> str:
    # Absolute paths: the lines are copied into shells in other directories.
    app_home = home.absolute()
    return "\n".join(
        [
            f"keybroker listening on {host}:{port} (mutual TLS)",
            f"  home      {app_home}",
            f"  HSM       {hsm} ({jurisdiction}), PIN in {app_home / 'hsm.pin'}",
            f"  database  {app_home / 'keybroker.db'}",
            f"  PKI       {app_home / 'pki'}: ca.pem, admin, auditor, producer, consumer",
            "  client    (in another shell, so that `keybroker` finds this broker)",
            f"export KEYBROKER_HOME={shlex.quote(str(app_home))}",
            "  try       keybroker --as admin keys create demo --grant producer:encrypt",
        ]
    )


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
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    default=None,
    help="TOML configuration file.",
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
    log_level: str,
) -> None:
    """Run the keybroker key broker (or, given a command, one development task)."""
    if ctx.invoked_subcommand is not None:
        return  # A development task such as dev-identity: no broker is started.
    logs.configure(log_level)
    try:
        settings = load_settings(home=home, listen=listen, config_file=config_file)
    except ConfigError as exc:
        # One line naming the file and the setting; no traceback for a configuration mistake.
        click.echo(f"keybroker-server: {exc}", err=True)
        sys.exit(2)
    if workers is not None:
        settings = replace(settings, workers=workers)
    host = settings.listen.rsplit(":", 1)[0]
    addr_file = settings.home / "listen.addr"

    def on_ready(port: int) -> None:
        addr_file.write_text(f"{host}:{port}\n")
        hsm_cfg = next(h for h in settings.hsms if h.name == settings.default_hsm)
        banner = _banner(settings.home, port, host, hsm_cfg.name, hsm_cfg.jurisdiction)
        if settings.workers > 1:
            banner = banner.replace(" (mutual TLS)", f" (mutual TLS, {settings.workers} workers)")
        # stdout carries the audit events when a stdout sink is configured: banner to stderr.
        click.echo(banner, err=any(s.kind == "stdout" for s in settings.audit_sinks))

    try:
        if settings.workers > 1:
            code = run_workers(settings, prepare, serve, on_ready)
        else:
            code = serve(settings, False, on_ready)
    finally:
        addr_file.unlink(missing_ok=True)
    if code:
        sys.exit(code)
    log.info("stopped")


@main.command("dev-identity")
@click.argument("name")
@click.pass_context
def dev_identity(ctx: click.Context, name: str) -> None:
    """Create NAME.pem and NAME.key under HOME/pki from the development CA.

    NAME becomes the certificate's common name: the principal that key policies grant
    (`--grant NAME:encrypt`). Development only; an existing identity is never overwritten.
    Then: keybroker --as NAME ...
    """
    home: Path = ctx.parent.params["home"] if ctx.parent is not None else Path("var")
    try:
        cert, key = issue_dev_identity(home / "pki", name)
    except ValueError as exc:
        click.echo(f"keybroker-server: {exc}", err=True)
        sys.exit(2)
    click.echo(f"created {cert.absolute()} and {key.absolute()} (mode 0600)")
    click.echo(f"use it: keybroker --home {shlex.quote(str(home.absolute()))} --as {name} ...")


def prepare(settings: Settings) -> int:
    """Builds the broker once and closes it: the first start's set-up, before workers fork."""
    try:
        build_app(settings).close()
    except Exception as exc:
        log.error("start-up failed: %s", exc)
        log.debug("start-up failure", exc_info=True)
        return 2
    return 0


def serve(settings: Settings, reuse_port: bool, on_ready: Callable[[int], None]) -> int:
    """Runs one broker process until SIGTERM or SIGINT, then drains it; returns the exit code."""
    try:
        app = build_app(settings)
    except Exception as exc:
        log.error("start-up failed: %s", exc)
        log.debug("start-up failure", exc_info=True)
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
        )
    except (OSError, RuntimeError) as exc:
        log.error("cannot listen on %s: %s", settings.listen, exc)
        app.close()
        return 2
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("signal %s: draining", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    monitor = HealthMonitor(running, [h.check for h in app.hsms.values()]).start()
    on_ready(running.port)
    stop.wait()
    monitor.stop()
    running.stop(settings.grace_seconds)
    app.close()
    return 0


if __name__ == "__main__":
    main()
