"""``keybroker keys ...``: create and manage keys and their policies."""

from __future__ import annotations

from datetime import timedelta

import click

from keybroker_client.cli import render
from keybroker_client.cli.completion import complete_key_ids
from keybroker_client.cli.errors import fail_usage
from keybroker_client.cli.options import DURATION, GRANT_HELP, json_flag, policy_from_options
from keybroker_client.cli.output import echo_json, echo_key
from keybroker_client.cli.state import get_state


@click.group()
def keys() -> None:
    """Create and manage keys (admin; auditors may list and show)."""


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
) -> None:
    """Create KEY_ID; version 1 is generated inside the HSM."""
    state = get_state(ctx)
    policy = policy_from_options(grants, jurisdictions, max_token_ttl)
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
    """Enable a disabled key."""
    state = get_state(ctx)
    echo_key(state, state.client().enable_key(key_id))


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
) -> None:
    """Replace KEY_ID's whole policy with the given grants and jurisdictions."""
    if not grants and not no_grants:
        fail_usage("give at least one --grant, or --no-grants to remove every grant")
    if grants and no_grants:
        fail_usage("--no-grants and --grant exclude each other")
    state = get_state(ctx)
    policy = policy_from_options(grants, jurisdictions, max_token_ttl)
    echo_key(state, state.client().update_key_policy(key_id, policy))


@keys.command("schedule-destruction")
@click.argument("key_id", shell_complete=complete_key_ids)
@click.option(
    "--pending-window", type=DURATION, help="Time until destruction, e.g. 7d (broker default)."
)
@json_flag
@click.pass_context
def keys_schedule_destruction(
    ctx: click.Context, *, key_id: str, pending_window: timedelta | None
) -> None:
    """Schedule destruction of every version of KEY_ID."""
    state = get_state(ctx)
    echo_key(state, state.client().schedule_key_destruction(key_id, pending_window))


@keys.command("cancel-destruction")
@click.argument("key_id", shell_complete=complete_key_ids)
@json_flag
@click.pass_context
def keys_cancel_destruction(ctx: click.Context, key_id: str) -> None:
    """Cancel a scheduled destruction; the key comes back disabled."""
    state = get_state(ctx)
    echo_key(state, state.client().cancel_key_destruction(key_id))
