"""``keybroker audit ...``: read and verify the audit log."""

from __future__ import annotations

from datetime import datetime

import click

from keybroker_client.cli import render
from keybroker_client.cli.errors import EXIT_VERIFY_FAILED
from keybroker_client.cli.options import json_flag, time_callback
from keybroker_client.cli.output import echo_json
from keybroker_client.cli.state import get_state


@click.group()
def audit() -> None:
    """Read and verify the audit log (auditor or admin)."""


@audit.command("list")
@click.option("--key-id", default="", help="Only events about this key.")
@click.option("--principal", default="", help="Only events by this principal.")
@click.option("--operation", default="", help="Only this RPC, e.g. Decrypt or CreateKey.")
@click.option(
    "--after",
    type=click.IntRange(min=0),
    default=0,
    metavar="N",
    help="Only sequence numbers above N.",
)
@click.option(
    "--limit", type=click.IntRange(min=0), default=0, metavar="N", help="At most N events (0: all)."
)
@click.option(
    "--since",
    callback=time_callback,
    metavar="TIME",
    help="From this time: ISO 8601 (naive means UTC) or a duration ago, e.g. 1h.",
)
@click.option("--until", callback=time_callback, metavar="TIME", help="Before this time.")
@json_flag
@click.pass_context
def audit_list(
    ctx: click.Context,
    *,
    key_id: str,
    principal: str,
    operation: str,
    after: int,
    limit: int,
    since: datetime | None,
    until: datetime | None,
) -> None:
    """List audit events, one per line, oldest first.

    Columns: sequence, time, principal, operation, key_id, version, outcome, reason.
    --json prints one JSON object per line with every field.
    """
    state = get_state(ctx)
    events = state.client().audit_events(
        key_id=key_id,
        principal=principal,
        operation=operation,
        start_time=since,
        end_time=until,
        after_sequence=after,
        limit=limit,
    )
    for event in events:
        if state.json:
            echo_json(render.event_to_dict(event), lines=True)
        else:
            click.echo(render.event_line(event))


@audit.command("verify")
@json_flag
@click.pass_context
def audit_verify(ctx: click.Context) -> None:
    """Verify the audit log's hash chain and signed checkpoints; exit 1 if it is broken."""
    state = get_state(ctx)
    report = state.client().verify_audit_log()
    if state.json:
        echo_json(render.report_to_dict(report))
    elif report.ok:
        click.echo(f"ok: {report.events_checked} events checked, head {report.head_hash}")
    else:
        click.echo(
            f"FAILED: first bad sequence {report.first_bad_sequence} "
            f"after {report.events_checked} events checked: {report.error}"
        )
    if not report.ok:
        ctx.exit(EXIT_VERIFY_FAILED)
