"""``keybroker keys ...``: create and manage keys and their policies, retire versions, report
their use, fetch destruction receipts; and ``keybroker verify-receipt`` (offline)."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import click

from keybroker_client import evidence
from keybroker_client.cli import render
from keybroker_client.cli.approvals import confirm_policy, echo_pending
from keybroker_client.cli.completion import complete_key_ids
from keybroker_client.cli.errors import EXIT_CODES, EXIT_VERIFY_FAILED, fail, fail_usage
from keybroker_client.cli.options import (
    DURATION,
    GRANT_HELP,
    caller_country_option,
    json_flag,
    policy_from_options,
)
from keybroker_client.cli.output import echo_json, echo_key, write_out
from keybroker_client.cli.state import get_state
from keybroker_client.errors import ApprovalPending, ConfigError
from keybroker_client.types import KeyUsage, KeyVersionUsage


@click.group()
def keys() -> None:
    """Create and manage keys (admin; auditors may list, show, usage and receipt)."""


@keys.command("create")
@click.argument("key_id")
@click.option("--description", default="", help="Free text shown with the key.")
@click.option("--grant", "grants", multiple=True, metavar="GRANT", help=GRANT_HELP)
@click.option(
    "--max-token-ttl",
    type=DURATION,
    help="Longest token lifetime for the decrypt grants, e.g. 15m (broker cap: 1h).",
)
@click.option(
    "--jurisdiction",
    "jurisdictions",
    multiple=True,
    metavar="CC",
    help="ISO 3166-1 code of a jurisdiction whose HSMs may hold the key; repeat. Default: EU/EEA.",
)
@click.option("--rotation-period", type=DURATION, help="Rotate automatically, e.g. 30d.")
@click.option("--hsm", default="", metavar="NAME", help="Configured HSM to create the key on.")
@caller_country_option
@json_flag
@click.pass_context
def keys_create(
    ctx: click.Context,
    *,
    key_id: str,
    description: str,
    grants: tuple[str, ...],
    max_token_ttl: timedelta | None,
    jurisdictions: tuple[str, ...],
    rotation_period: timedelta | None,
    hsm: str,
    caller_countries: tuple[str, ...],
) -> None:
    """Create KEY_ID; version 1 is generated inside the HSM."""
    state = get_state(ctx)
    policy = policy_from_options(grants, jurisdictions, max_token_ttl, caller_countries)
    key = state.client().create_key(
        key_id, description=description, policy=policy, rotation_period=rotation_period, hsm=hsm
    )
    echo_key(state, key)


@keys.command("list")
@click.option(
    "--page-size",
    type=click.IntRange(1, 1000),
    default=100,
    show_default=True,
    help="Keys per request; every page is fetched.",
)
@json_flag
@click.pass_context
def keys_list(ctx: click.Context, page_size: int) -> None:
    """List every key, one per line under a header row (JSON lines with --json)."""
    state = get_state(ctx)
    keys_iter = state.client().iter_keys(page_size=page_size)
    if not state.json:
        click.echo(render.KEY_HEADER)
    for key in keys_iter:
        if state.json:
            echo_json(render.key_to_dict(key), lines=True)
        else:
            click.echo(render.key_row(key))


@keys.command("show")
@click.argument("key_id", shell_complete=complete_key_ids)
@json_flag
@click.pass_context
def keys_show(ctx: click.Context, key_id: str) -> None:
    """Show KEY_ID's metadata and policy."""
    state = get_state(ctx)
    echo_key(state, state.client().get_key(key_id))


@keys.command("rotate")
@click.argument("key_id", shell_complete=complete_key_ids)
@json_flag
@click.pass_context
def keys_rotate(ctx: click.Context, key_id: str) -> None:
    """Make a new version primary; older versions still decrypt."""
    state = get_state(ctx)
    echo_key(state, state.client().rotate_key(key_id))


@keys.command("enable")
@click.argument("key_id", shell_complete=complete_key_ids)
@json_flag
@click.pass_context
def keys_enable(ctx: click.Context, key_id: str) -> None:
    """Enable a disabled key (a pending request when the broker needs approvals)."""
    state = get_state(ctx)
    try:
        echo_key(state, state.client().enable_key(key_id))
    except ApprovalPending as pending:
        echo_pending(state, pending)


@keys.command("disable")
@click.argument("key_id", shell_complete=complete_key_ids)
@json_flag
@click.pass_context
def keys_disable(ctx: click.Context, key_id: str) -> None:
    """Disable a key: it neither encrypts nor decrypts until enabled."""
    state = get_state(ctx)
    echo_key(state, state.client().disable_key(key_id))


@keys.command("set-policy")
@click.argument("key_id", shell_complete=complete_key_ids)
@click.option("--grant", "grants", multiple=True, metavar="GRANT", help=GRANT_HELP)
@click.option(
    "--max-token-ttl", type=DURATION, help="Longest token lifetime for the decrypt grants."
)
@click.option(
    "--jurisdiction", "jurisdictions", multiple=True, metavar="CC", help="As for keys create."
)
@click.option(
    "--no-grants",
    is_flag=True,
    help="Confirm a policy without any grant (nobody but admins may use the key).",
)
@click.option(
    "--yes", "-y", is_flag=True, help="Apply a policy that widens the key's use without asking."
)
@caller_country_option
@json_flag
@click.pass_context
def keys_set_policy(
    ctx: click.Context,
    *,
    key_id: str,
    grants: tuple[str, ...],
    max_token_ttl: timedelta | None,
    jurisdictions: tuple[str, ...],
    no_grants: bool,
    caller_countries: tuple[str, ...],
    yes: bool,
) -> None:
    """Replace KEY_ID's whole policy with the given grants and jurisdictions.

    Shows how the policy changes first (on stderr); one that widens the key's use (more
    jurisdictions, a longer token lifetime cap) is applied only once confirmed, or with --yes.
    """
    if not grants and not no_grants:
        fail_usage("give at least one --grant, or --no-grants to remove every grant")
    if grants and no_grants:
        fail_usage("--no-grants and --grant exclude each other")
    state = get_state(ctx)
    policy = policy_from_options(grants, jurisdictions, max_token_ttl, caller_countries)
    client = state.client()
    confirm_policy(key_id, client.get_key(key_id).policy, policy, yes=yes)
    try:
        echo_key(state, client.update_key_policy(key_id, policy))
    except ApprovalPending as pending:
        echo_pending(state, pending)


@keys.command("schedule-destruction")
@click.argument("key_id", shell_complete=complete_key_ids)
@click.option(
    "--pending-window",
    type=DURATION,
    help="Time until destruction, e.g. 30d; default and least: the broker's "
    "keys.min_destruction_window (7d unless configured).",
)
@json_flag
@click.pass_context
def keys_schedule_destruction(
    ctx: click.Context, *, key_id: str, pending_window: timedelta | None
) -> None:
    """Schedule destruction of every version of KEY_ID (a pending request when the broker
    needs approvals; the window then runs from the approval that applies it)."""
    state = get_state(ctx)
    try:
        echo_key(state, state.client().schedule_key_destruction(key_id, pending_window))
    except ApprovalPending as pending:
        echo_pending(state, pending)


@keys.command("cancel-destruction")
@click.argument("key_id", shell_complete=complete_key_ids)
@json_flag
@click.pass_context
def keys_cancel_destruction(ctx: click.Context, key_id: str) -> None:
    """Cancel a scheduled destruction; the key comes back disabled."""
    state = get_state(ctx)
    echo_key(state, state.client().cancel_key_destruction(key_id))


@keys.command("retire")
@click.argument("key_id", shell_complete=complete_key_ids)
@click.option(
    "--below",
    type=click.IntRange(min=1),
    required=True,
    metavar="N",
    help="Retire every version below N (min_decryption_version = N): their blobs no longer "
    "decrypt nor re-wrap. N is at most the primary version; a lower N brings versions back.",
)
@json_flag
@click.pass_context
def keys_retire(ctx: click.Context, key_id: str, below: int) -> None:
    """Retire KEY_ID's versions below N; re-wrap their blobs first (keybroker rewrap).

    Check with `keybroker keys usage KEY_ID` that nothing still decrypts them.
    """
    state = get_state(ctx)
    echo_key(state, state.client().set_min_decryption_version(key_id, below))


#: The header row of ``keys usage``, aligned with `_usage_row`.
USAGE_HEADER = (
    f"{'VERSION':<8} {'STATUS':<8} {'DATA_KEYS':>10} {'ENCRYPTS':>9} {'REWRAPPED':>10} "
    f"{'DECRYPTS':>9} {'REFUSED':>8}  {'LAST_DECRYPT':<28} LAST_USE"
)


def _version_status(usage: KeyUsage, version: int) -> str:
    if version == usage.key.primary_version:
        return "primary"
    return "retired" if version < usage.key.min_decryption_version else "active"


def _usage_dict(usage: KeyUsage, u: KeyVersionUsage) -> dict[str, Any]:
    return {
        "version": u.version,
        "status": _version_status(usage, u.version),
        "data_keys_issued": u.data_keys_issued,
        "encryptions": u.encryptions,
        "rewrapped": u.rewrapped,
        "decrypts": u.decrypts,
        "decrypts_refused": u.decrypts_refused,
        "last_decrypt_time": render.time_text(u.last_decrypt_time),
        "last_use_time": render.time_text(u.last_use_time),
    }


def _usage_row(row: dict[str, Any]) -> str:
    return (
        f"{row['version']:<8} {row['status']:<8} {row['data_keys_issued']:>10} "
        f"{row['encryptions']:>9} {row['rewrapped']:>10} {row['decrypts']:>9} "
        f"{row['decrypts_refused']:>8}  {row['last_decrypt_time'] or '-':<28} "
        f"{row['last_use_time'] or '-'}"
    )


@keys.command("usage")
@click.argument("key_id", shell_complete=complete_key_ids)
@json_flag
@click.pass_context
def keys_usage(ctx: click.Context, key_id: str) -> None:
    """Show how each version of KEY_ID has been used, from the audit trail.

    Per version: data keys issued, Encrypt calls, blobs re-wrapped into it, decrypts (and
    refused decrypts), the last decrypt and the last use. Before retiring a version, check that
    its last decrypt is old and its blobs have been re-wrapped.
    """
    state = get_state(ctx)
    usage = state.client().key_usage(key_id)
    rows = [_usage_dict(usage, u) for u in usage.versions]
    if state.json:
        echo_json(
            {
                "key_id": usage.key.key_id,
                "state": usage.key.state.value,
                "primary_version": usage.key.primary_version,
                "min_decryption_version": usage.key.min_decryption_version,
                "events_counted": usage.events_counted,
                "versions": rows,
            }
        )
        return
    click.echo(USAGE_HEADER)
    for row in rows:
        click.echo(_usage_row(row))


@keys.command("receipt")
@click.argument("key_id", shell_complete=complete_key_ids)
@click.option(
    "--out", "-o", default="-", metavar="FILE", help="Write the receipt to FILE, not stdout."
)
@click.pass_context
def keys_receipt(ctx: click.Context, key_id: str, out: str) -> None:
    """Fetch the signed destruction receipt of the destroyed key KEY_ID.

    Keep the file as it is: `keybroker verify-receipt FILE --jwks JWKS` checks it offline,
    byte for byte, against the broker's public keys (keybroker token jwks --output JWKS).
    """
    state = get_state(ctx)
    text = state.client().destruction_receipt(key_id)
    write_out(out, (text + "\n").encode("utf-8"), secret=False)
    if out != "-":
        click.echo(
            f"wrote the destruction receipt of {render.terminal_safe(key_id)} to {out}; "
            f"check it: keybroker verify-receipt {out} --jwks JWKS",
            err=True,
        )


def _receipt_dict(receipt: evidence.DestructionReceipt) -> dict[str, Any]:
    return {
        "ok": True,
        "key_id": receipt.key_id,
        "issuer": receipt.issuer,
        "hsm": {
            "name": receipt.hsm_name,
            "jurisdiction": receipt.hsm_jurisdiction,
            "operator": receipt.hsm_operator,
        },
        "versions": [
            {"version": v.version, "label": v.label, "create_time": render.time_text(v.create_time)}
            for v in receipt.versions
        ],
        "scheduled_time": render.time_text(receipt.scheduled_time),
        "destroy_time": render.time_text(receipt.destroy_time),
        "audit": {
            "chain": receipt.audit_chain,
            "chain_sequence": receipt.audit_chain_sequence,
            "sequence": receipt.audit_sequence,
            "hash": receipt.audit_hash,
        },
        "kid": receipt.kid,
    }


def _receipt_lines(r: evidence.DestructionReceipt) -> list[str]:
    versions = ", ".join(f"v{v.version} ({v.label})" for v in r.versions)
    return [
        f"ok: key {r.key_id} was destroyed at {render.time_text(r.destroy_time)} "
        f"(due {render.time_text(r.scheduled_time)})",
        f"  hsm       {r.hsm_name} ({r.hsm_jurisdiction}, {r.hsm_operator})",
        f"  versions  {versions}",
        f"  audit     DestroyKey event, sequence {r.audit_sequence}, chain {r.audit_chain} "
        f"#{r.audit_chain_sequence}, hash {r.audit_hash}",
        f"  signed by audit key {r.kid} of {r.issuer}",
    ]


@click.command("verify-receipt")
@click.argument("receipt_file", metavar="FILE", type=click.Path(dir_okay=False))
@click.option(
    "--jwks",
    required=True,
    metavar="FILE",
    type=click.Path(dir_okay=False),
    help="The broker's JWKS (keybroker token jwks --output FILE).",
)
@click.option("--key-id", default=None, help="Also require the receipt to be for this key.")
@json_flag
@click.pass_context
def verify_receipt(ctx: click.Context, receipt_file: str, jwks: str, key_id: str | None) -> None:
    """Verify a destruction receipt offline; exit 1 if it does not verify.

    No broker is needed: the receipt must be byte for byte as `keybroker keys receipt` wrote
    it and signed by an audit key of JWKS.
    """
    state = get_state(ctx)
    try:
        with open(jwks, "rb") as fh:
            keys_json = json.load(fh)
        evidence.audit_keys(keys_json)
    except (OSError, ValueError, evidence.EvidenceError) as exc:
        fail(ctx, f"{jwks}: not a usable JWKS: {exc}", EXIT_CODES[ConfigError])
    try:
        with open(receipt_file, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        fail(ctx, f"cannot read {receipt_file}: {exc.strerror or exc}", EXIT_CODES[ConfigError])
    try:
        receipt = evidence.verify_receipt(data, keys_json, key_id=key_id)
    except evidence.ReceiptInvalid as exc:
        if state.json:
            echo_json({"ok": False, "error": str(exc)})
        else:
            click.echo(render.terminal_safe(f"FAILED: {receipt_file}: {exc}"))
        ctx.exit(EXIT_VERIFY_FAILED)
    if state.json:
        echo_json(_receipt_dict(receipt))
    else:
        # The receipt verified, but its strings come from a file: keep them inert.
        for line in _receipt_lines(receipt):
            click.echo(render.terminal_safe(line))
