"""``keybroker approvals ...``: the changes that wait for other admins' approval (the broker's
``approvals.required``), and what ``keys set-policy``, ``keys enable`` and
``keys schedule-destruction`` print when their change is one of them.

Also the policy difference ``keys set-policy`` shows before it applies, with what widens the
key's use (more jurisdictions, a longer token lifetime cap), which it asks to confirm.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import click

from keybroker_client.cli.errors import EXIT_CODES, fail
from keybroker_client.cli.options import json_flag
from keybroker_client.cli.output import echo_json
from keybroker_client.cli.render import (
    duration_text,
    grant_to_dict,
    terminal_safe,
    time_text,
)
from keybroker_client.cli.state import State, get_state
from keybroker_client.errors import ApprovalPending, FailedPrecondition
from keybroker_client.types import ApprovalRequest, ApprovalState, Grant, KeyPolicy

#: The broker's longest token lifetime: what a grant without a cap allows.
MAX_TOKEN_TTL = timedelta(hours=1)
#: The EU/EEA member states: the jurisdictions of a policy that names none.
EU_EEA = frozenset(
    {
        "AT", "BE", "BG", "HR", "CY", "CZ", "DK", "EE", "FI", "FR", "DE", "GR", "IE", "IT",
        "LV", "LT", "LU", "MT", "NL", "PL", "PT", "RO", "SK", "SI", "ES", "SE", "IS", "LI",
        "NO",
    }
)  # fmt: skip
_STATES = {s.value.lower(): s for s in ApprovalState if s is not ApprovalState.UNSPECIFIED}


# Rendering -----------------------------------------------------------------------------------


def approval_to_dict(r: ApprovalRequest) -> dict[str, Any]:
    """An ApprovalRequest as a JSON-ready dict (times ISO 8601 UTC, durations like ``7d``)."""
    return {
        "request_id": r.request_id,
        "state": r.state.value.lower(),
        "operation": r.operation.value,
        "key_id": r.key_id,
        "requester": r.requester,
        "required_approvals": r.required_approvals,
        "approvals": [
            {"principal": a.principal, "approve_time": time_text(a.approve_time)}
            for a in r.approvals
        ],
        "create_time": time_text(r.create_time),
        "expire_time": time_text(r.expire_time),
        "policy": None
        if r.policy is None
        else {
            "grants": [grant_to_dict(g) for g in r.policy.grants],
            "allowed_jurisdictions": list(r.policy.allowed_jurisdictions),
        },
        "pending_window": duration_text(r.pending_window),
        "widening": r.widening,
        "widening_summary": list(r.widening_summary),
        "reason": r.reason,
        "close_time": time_text(r.close_time),
        "closed_by": r.closed_by,
    }


def approval_text(r: ApprovalRequest) -> str:
    """A request as aligned lines for people (every broker-stored string made inert)."""
    data = approval_to_dict(r)
    approvers = ", ".join(a["principal"] for a in data["approvals"]) or "-"
    rows = [
        ("request_id", data["request_id"]),
        ("state", data["state"]),
        ("operation", data["operation"]),
        ("key_id", data["key_id"]),
        ("requester", data["requester"]),
        ("approvals", f"{len(data['approvals'])} of {data['required_approvals']}: {approvers}"),
        ("created", data["create_time"] or "-"),
        ("expires", data["expire_time"] or "-"),
    ]
    if data["pending_window"]:
        rows.append(("pending_window", data["pending_window"]))
    if data["policy"] is not None:
        jurisdictions = ", ".join(data["policy"]["allowed_jurisdictions"]) or "EU/EEA (default)"
        rows.append(("jurisdictions", jurisdictions))
    if r.widening:
        rows.append(("widening", "YES: " + "; ".join(data["widening_summary"])))
    if data["reason"]:
        rows.append(("reason", data["reason"]))
    if data["close_time"]:
        rows.append(("closed", f"{data['close_time']} by {data['closed_by'] or '-'}"))
    lines = [f"{name + ':':<16}{terminal_safe(str(value))}" for name, value in rows]
    if r.policy is not None:
        lines.append("grants:" if r.policy.grants else "grants:         (none)")
        lines += [f"  {terminal_safe(grant_text(g))}" for g in r.policy.grants]
    return "\n".join(lines)


#: The header row of ``approvals list``, aligned with :func:`approval_row`.
APPROVAL_HEADER = (
    f"{'REQUEST_ID':<29} {'STATE':<10} {'OPERATION':<23} {'KEY_ID':<24} {'REQUESTER':<12} "
    f"{'APPROVED':<8} {'EXPIRES':<20} WIDENING"
)


def approval_row(r: ApprovalRequest) -> str:
    """One line per request for ``approvals list``."""
    expires = expiry_text(r)
    approved = f"{len(r.approvals)}/{r.required_approvals}"
    return (
        f"{r.request_id:<29} {r.state.value.lower():<10} {r.operation.value:<23} "
        f"{terminal_safe(r.key_id):<24} {terminal_safe(r.requester):<12} {approved:<8} "
        f"{expires:<20} {'yes' if r.widening else '-'}"
    )


def expiry_text(request: ApprovalRequest) -> str:
    """The request's expiry to the second, as people read it."""
    if request.expire_time is None:
        return "-"
    return time_text(request.expire_time.replace(microsecond=0)) or "-"


def echo_approval(state: State, request: ApprovalRequest) -> None:
    if state.json:
        echo_json(approval_to_dict(request))
    else:
        click.echo(approval_text(request))


def echo_pending(state: State, pending: ApprovalPending) -> None:
    """What a change that waits for approval prints: the request, and who does what next."""
    request = pending.request
    if state.json:
        echo_json({"approval_request": approval_to_dict(request)})
        return
    missing = request.required_approvals - len(request.approvals)
    click.echo(
        f"pending approval: {request.operation.value} of key {terminal_safe(request.key_id)} "
        f"needs {missing} more admin approval(s); nothing has changed yet"
    )
    click.echo(approval_text(request))
    click.echo(
        f"next: another admin runs `keybroker approvals approve {request.request_id}` "
        f"before {expiry_text(request)}"
    )


# The policy difference of ``keys set-policy`` ------------------------------------------------


def grant_text(grant: Grant) -> str:
    """A grant as the CLI writes it: ``principal: ops  context  max_token_ttl=...``."""
    data = grant_to_dict(grant)
    parts = [f"{data['principal']}: {'+'.join(data['operations'])}"]
    if data["context"]:
        parts.append(",".join(f"{k}={v}" for k, v in data["context"].items()))
    if data["max_token_ttl"]:
        parts.append(f"max_token_ttl={data['max_token_ttl']}")
    if data["countries"]:
        parts.append(f"caller_country={','.join(data['countries'])}")
    return "  ".join(parts)


def _jurisdictions(policy: KeyPolicy) -> frozenset[str]:
    return frozenset(policy.allowed_jurisdictions) if policy.allowed_jurisdictions else EU_EEA


def _caps(policy: KeyPolicy) -> dict[str, timedelta]:
    caps: dict[str, timedelta] = {}
    for g in policy.grants:
        caps[g.principal] = max(
            g.max_token_ttl or MAX_TOKEN_TTL, caps.get(g.principal, timedelta(0))
        )
    return caps


def policy_widening(old: KeyPolicy, new: KeyPolicy) -> list[str]:
    """How ``new`` widens ``old``: jurisdictions added, and per principal of both a longer
    token lifetime cap (none: the broker's 1 hour). The broker says the same in the request
    and its audit events."""
    lines = []
    added = sorted(_jurisdictions(new) - _jurisdictions(old))
    if added:
        lines.append(f"jurisdictions widened: +{', +'.join(added)}")
    old_caps, new_caps = _caps(old), _caps(new)
    for principal in sorted(old_caps.keys() & new_caps.keys()):
        before, after = old_caps[principal], new_caps[principal]
        if after > before:
            how = "dropped" if after == MAX_TOKEN_TTL else "raised"
            lines.append(
                f"token lifetime cap of {principal!r} {how}: "
                f"{duration_text(before)} -> {duration_text(after)}"
            )
    return lines


def policy_diff(old: KeyPolicy, new: KeyPolicy) -> list[str]:
    """The lines of a unified-style difference: ``-`` what goes, ``+`` what comes."""

    def jurisdictions(policy: KeyPolicy) -> str:
        return ", ".join(policy.allowed_jurisdictions) or "EU/EEA (default)"

    lines = []
    if jurisdictions(old) != jurisdictions(new):
        lines += [
            f"- jurisdictions: {jurisdictions(old)}",
            f"+ jurisdictions: {jurisdictions(new)}",
        ]
    before = [grant_text(g) for g in old.grants]
    after = [grant_text(g) for g in new.grants]
    lines += [f"- grant {g}" for g in before if g not in after]
    lines += [f"+ grant {g}" for g in after if g not in before]
    return lines


def confirm_policy(key_id: str, old: KeyPolicy, new: KeyPolicy, *, yes: bool) -> None:
    """Shows (on stderr) how ``new`` differs from ``old``; a widening policy must be confirmed
    (or ``yes`` given), else the command ends without calling the broker."""
    diff = policy_diff(old, new)
    widening = policy_widening(old, new)
    safe = terminal_safe(key_id)
    if not diff:
        click.echo(f"the policy of {safe} is unchanged", err=True)
        return
    click.echo(f"policy of {safe}:", err=True)
    for line in diff:
        click.echo(f"  {terminal_safe(line)}", err=True)
    if not widening:
        return
    click.echo("this policy WIDENS the key's use:", err=True)
    for line in widening:
        click.echo(f"  ! {terminal_safe(line)}", err=True)
    if not yes and not click.confirm("apply it?", default=False, err=True):
        raise click.ClickException("not applied: the widening was not confirmed (or pass --yes)")


# Commands ------------------------------------------------------------------------------------


@click.group()
def approvals() -> None:
    """Changes waiting for other admins' approval (admin; auditors may list and show)."""


@approvals.command("list")
@click.option(
    "--state",
    "state_name",
    type=click.Choice([*_STATES, "all"], case_sensitive=False),
    default="pending",
    show_default=True,
    help="Only requests in this state.",
)
@click.option("--key-id", default="", help="Only requests about this key.")
@click.option(
    "--page-size",
    type=click.IntRange(1, 1000),
    default=100,
    show_default=True,
    help="Requests per call; every page is fetched.",
)
@json_flag
@click.pass_context
def approvals_list(ctx: click.Context, state_name: str, key_id: str, page_size: int) -> None:
    """List approval requests, oldest first, under a header row (JSON lines with --json)."""
    state = get_state(ctx)
    wanted = None if state_name.lower() == "all" else _STATES[state_name.lower()]
    found = state.client().iter_approval_requests(wanted, key_id, page_size)
    if not state.json:
        click.echo(APPROVAL_HEADER)
    for request in found:
        if state.json:
            echo_json(approval_to_dict(request), lines=True)
        else:
            click.echo(approval_row(request))


@approvals.command("show")
@click.argument("request_id")
@json_flag
@click.pass_context
def approvals_show(ctx: click.Context, request_id: str) -> None:
    """Show one approval request: the change, who asked, who approved, until when."""
    state = get_state(ctx)
    echo_approval(state, state.client().get_approval_request(request_id))


@approvals.command("approve")
@click.argument("request_id")
@click.option("--yes", "-y", is_flag=True, help="Approve without showing it and asking first.")
@json_flag
@click.pass_context
def approvals_approve(ctx: click.Context, request_id: str, yes: bool) -> None:
    """Approve REQUEST_ID (another admin than its requester).

    Shows the change first and asks; the approval that completes the quorum applies it.
    """
    state = get_state(ctx)
    client = state.client()
    if not yes:
        request = client.get_approval_request(request_id)
        click.echo(approval_text(request), err=True)
        if request.state is not ApprovalState.PENDING:
            fail(
                ctx,
                f"FAILED_PRECONDITION: request {request_id} is {request.state.value.lower()}: "
                "nothing to approve",
                EXIT_CODES[FailedPrecondition],
            )
        if not click.confirm("approve this change?", default=False, err=True):
            raise click.ClickException("not approved")
    approved = client.approve_request(request_id)
    if state.json:
        echo_approval(state, approved)
        return
    if approved.state is ApprovalState.APPLIED:
        key_id = terminal_safe(approved.key_id)
        click.echo(f"approved and applied: {approved.operation.value} of key {key_id}")
    else:
        missing = approved.required_approvals - len(approved.approvals)
        click.echo(f"approved: {missing} more admin approval(s) needed")
    click.echo(approval_text(approved))


@approvals.command("cancel")
@click.argument("request_id")
@json_flag
@click.pass_context
def approvals_cancel(ctx: click.Context, request_id: str) -> None:
    """Withdraw a pending request (its requester, or an admin)."""
    state = get_state(ctx)
    echo_approval(state, state.client().cancel_approval_request(request_id))
