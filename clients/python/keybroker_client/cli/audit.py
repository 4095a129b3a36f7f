"""``keybroker audit ...``: read, export and verify the audit log (online and offline)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any

import click

from keybroker_client import evidence
from keybroker_client.cli import render
from keybroker_client.cli.completion import complete_key_ids
from keybroker_client.cli.errors import EXIT_CODES, EXIT_VERIFY_FAILED, fail
from keybroker_client.cli.options import json_flag, time_callback
from keybroker_client.cli.output import echo_json
from keybroker_client.cli.state import get_state
from keybroker_client.errors import ConfigError
from keybroker_client.types import AuditEvent, AuditReport

#: The operations audit events record (the broker's RPC names), as ``--operation`` accepts them.
AUDIT_OPERATIONS = (
    "CreateKey",
    "GetKey",
    "ListKeys",
    "RotateKey",
    "UpdateKeyPolicy",
    "EnableKey",
    "DisableKey",
    "ScheduleKeyDestruction",
    "CancelKeyDestruction",
    "DestroyKey",
    "GetDestructionReceipt",
    "SetMinDecryptionVersion",
    "GetKeyUsage",
    "GenerateDataKey",
    "Encrypt",
    "Decrypt",
    "ReWrap",
    "IssueToken",
    "RevokeToken",
    "ListAuditEvents",
    "VerifyAuditLog",
    "ExportAuditLog",
    "RequestApproval",
    "ApproveRequest",
    "ApplyApprovedChange",
    "ExpireApprovalRequest",
    "CancelApprovalRequest",
    "GetApprovalRequest",
    "ListApprovalRequests",
)


def _fold(name: str) -> str:
    return name.replace("-", "").replace("_", "").lower()


_OPERATION_BY_FOLDED = {_fold(name): name for name in AUDIT_OPERATIONS}


def _operation_callback(_ctx: click.Context, param: click.Parameter, value: str) -> str:
    """The broker's spelling of ``value`` (``decrypt``, ``issue-token``); unknown: usage error.

    The broker filters on the exact name, so a typo would silently match nothing.
    """
    if not value:
        return ""
    known = _OPERATION_BY_FOLDED.get(_fold(value))
    if known is None:
        raise click.BadParameter(
            f"unknown operation {value!r}; one of: {', '.join(AUDIT_OPERATIONS)}", param=param
        )
    return known


#: Least deadline of an export stream, in seconds: a long trail takes a while to walk.
EXPORT_MIN_TIMEOUT = 600.0


@click.group()
def audit() -> None:
    """Read, export and verify the audit log (auditor or admin)."""


def _event_dict(event: AuditEvent) -> dict[str, Any]:
    return {
        **render.event_to_dict(event),
        "chain": event.chain,
        "chain_sequence": event.chain_sequence,
    }


@audit.command("list")
@click.option(
    "--key-id", default="", shell_complete=complete_key_ids, help="Only events about this key."
)
@click.option("--principal", default="", help="Only events by this principal.")
@click.option(
    "--operation",
    default="",
    callback=_operation_callback,
    metavar="NAME",
    help="Only this operation, in any case: decrypt, CreateKey, issue-token... "
    "(an unknown name is an error, with the list).",
)
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
    """List audit events, one per line under a header row, oldest first.

    Columns: sequence, time, principal, operation, key_id, version, outcome, reason.
    --json prints one JSON object per line with every field (chain and chain_sequence too).
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
    if not state.json:
        click.echo(render.EVENT_HEADER)
    for event in events:
        if state.json:
            echo_json(_event_dict(event), lines=True)
        else:
            click.echo(render.event_line(event))


@audit.command("export")
@click.option(
    "--output",
    "-o",
    default="-",
    metavar="FILE",
    help="Write the export to FILE (complete or not at all) instead of stdout.",
)
@click.option(
    "--after-sequence",
    type=click.IntRange(min=0),
    default=0,
    metavar="N",
    help="Only events after sequence N: the previous export's through_sequence.",
)
@click.pass_context
def audit_export(ctx: click.Context, *, output: str, after_sequence: int) -> None:
    """Export the audit log as JSON lines ending with the broker's signed manifest.

    Verify it anywhere, without the broker: keybroker audit verify FILE --jwks JWKS.
    Exit status 1 if the broker found the trail bad while exporting (the export is written).
    """
    state = get_state(ctx)
    lines = state.client().export_audit_log(
        after_sequence, timeout=max(state.timeout, EXPORT_MIN_TIMEOUT)
    )
    last = b""
    if output == "-":
        with click.open_file("-", "wb") as out:
            for line in lines:
                out.write(line + b"\n")
                last = line
            out.flush()
    else:
        partial = f"{output}.partial"
        try:
            with open(partial, "wb") as out:
                for line in lines:
                    out.write(line + b"\n")
                    last = line
                out.flush()
                os.fsync(out.fileno())
            os.replace(partial, output)
        finally:
            if os.path.exists(partial):
                os.unlink(partial)
    manifest = json.loads(last) if last else {}
    if output != "-":
        click.echo(
            f"exported events {manifest.get('after_sequence', after_sequence) + 1}.."
            f"{manifest.get('through_sequence', '?')} to {output}; next export: "
            f"--after-sequence {manifest.get('through_sequence', '?')}",
            err=True,
        )
    if not manifest.get("verified", False):
        fail(
            ctx,
            f"the broker found the trail bad: {manifest.get('error', '')}",
            EXIT_VERIFY_FAILED,
        )


def _online_text(report: AuditReport) -> str:
    if report.ok:
        return (
            f"ok: {report.events_checked} events in {report.chains_checked} chains, "
            f"{report.checkpoints_checked} signed checkpoints, {report.unsigned_events} events "
            f"not yet signed; head {report.head_hash}"
        )
    return (
        f"FAILED: chain {report.first_bad_chain or '-'}, chain_sequence "
        f"{report.first_bad_sequence}, after {report.events_checked} events checked: "
        f"{report.error}"
    )


def _report_dict(report: AuditReport | evidence.Report) -> dict[str, Any]:
    data = {
        "ok": report.ok,
        "events_checked": report.events_checked,
        "chains_checked": report.chains_checked,
        "checkpoints_checked": report.checkpoints_checked,
        "unsigned_events": report.unsigned_events,
        "first_bad_chain": report.first_bad_chain,
        "first_bad_sequence": report.first_bad_sequence,
        "error": report.error,
        "head_hash": report.head_hash,
    }
    if isinstance(report, evidence.Report):
        data["location"] = report.location
    return data


@audit.command("verify")
@click.argument("exports", nargs=-1, metavar="[EXPORT]...", type=click.Path(dir_okay=False))
@click.option(
    "--jwks",
    metavar="FILE",
    type=click.Path(dir_okay=False),
    help="The broker's JWKS (keybroker token jwks): verify EXPORT files offline with it.",
)
@json_flag
@click.pass_context
def audit_verify(ctx: click.Context, *, exports: tuple[str, ...], jwks: str | None) -> None:
    """Verify the audit log; exit 1 if it is broken.

    Without EXPORT: the broker walks every chain, signed checkpoint and HSM anchor. With
    EXPORT files (consecutive exports, in order) and --jwks: offline, with no broker; the
    first bad record is named by file and line.
    """
    state = get_state(ctx)
    report: AuditReport | evidence.Report
    if not exports:
        if jwks:
            raise click.UsageError("--jwks is for verifying EXPORT files offline; name them")
        online = state.client().verify_audit_log()
        report, text = online, _online_text(online)
    else:
        if not jwks:
            raise click.UsageError(
                "offline verification needs --jwks FILE: the broker's public keys "
                "(keybroker token jwks --output FILE)"
            )
        report, text = _verify_files(ctx, exports, jwks)
    if state.json:
        echo_json(_report_dict(report))
    else:
        # A report names chains and quotes records of a file that may have been forged.
        click.echo(render.terminal_safe(text))
    if not report.ok:
        ctx.exit(EXIT_VERIFY_FAILED)


def _verify_files(
    ctx: click.Context, paths: Sequence[str], jwks_path: str
) -> tuple[evidence.Report, str]:
    try:
        with open(jwks_path, "rb") as fh:
            jwks = json.load(fh)
        evidence.audit_keys(jwks)
    except (ValueError, evidence.EvidenceError) as exc:
        fail(ctx, f"{jwks_path}: not a usable JWKS: {exc}", EXIT_CODES[ConfigError])
    starts: list[tuple[str, int]] = []
    report = evidence.verify_export(_lines(paths, starts), jwks)
    if report.ok:
        return report, (
            f"ok: {report.events_checked} events in {report.chains_checked} chains, "
            f"{report.checkpoints_checked} signed checkpoints, signed by the broker's manifest "
            f"({len(paths)} export file{'s' if len(paths) > 1 else ''})"
        )
    where = _where(report.location, starts)
    chain = f"chain {report.first_bad_chain}, " if report.first_bad_chain else ""
    seq = f"chain_sequence {report.first_bad_sequence}: " if report.first_bad_sequence else ""
    return report, f"FAILED: {where}: {chain}{seq}{report.error}"


def _lines(paths: Sequence[str], starts: list[tuple[str, int]]) -> Iterator[bytes]:
    """The lines of every file in turn; `starts` records each file's first line number."""
    number = 0
    for path in paths:
        starts.append((path, number + 1))
        with open(path, "rb") as fh:
            for line in fh:
                number += 1
                yield line


def _where(location: str, starts: list[tuple[str, int]]) -> str:
    """`line N` of the joined input as `FILE:LINE`."""
    try:
        number = int(location.removeprefix("line "))
    except ValueError:
        return location or "?"
    path, first = starts[0] if starts else ("?", 1)
    for candidate, begin in starts:
        if begin <= number:
            path, first = candidate, begin
    return f"{path}:{number - first + 1}"
