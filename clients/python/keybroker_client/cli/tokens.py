"""``keybroker token ...``: issue and revoke decryption tokens; show the signing keys."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime, timedelta

import click

from keybroker_client.certs import cert_thumbprint
from keybroker_client.cli.completion import complete_key_ids
from keybroker_client.cli.errors import fail_usage
from keybroker_client.cli.options import DURATION, context_option, json_flag
from keybroker_client.cli.output import echo_json, write_out
from keybroker_client.cli.render import terminal_safe, time_text
from keybroker_client.cli.state import get_state
from keybroker_client.cli.token_view import claims_text, token_id_of, unverified_claims


@click.group()
def token() -> None:
    """Issue, look up and revoke decryption tokens; show the signing keys."""


@token.command("issue")
@click.argument("key_id", shell_complete=complete_key_ids)
@context_option
@click.option("--justification", required=True, help="Why the data is needed (audited).")
@click.option("--ttl", type=DURATION, help="Lifetime, e.g. 5m (broker default 5m, cap 1h).")
@click.option("--subject", metavar="NAME", help="Admin only: issue for another principal.")
@click.option(
    "--subject-cert",
    type=click.Path(exists=True, dir_okay=False),
    metavar="PEMFILE",
    help="With --subject: that principal's certificate; the token is bound to it.",
)
@click.option(
    "--max-uses",
    type=click.IntRange(0, 10_000),
    default=0,
    show_default=True,
    help="How many decrypts the token allows; 0 means no limit within its lifetime.",
)
@json_flag
@click.pass_context
def token_issue(
    ctx: click.Context,
    *,
    key_id: str,
    context: dict[str, str],
    justification: str,
    ttl: timedelta | None,
    subject: str | None,
    subject_cert: str | None,
    max_uses: int,
) -> None:
    """Issue a token for KEY_ID and print only the token, so that a shell can capture it:

    \b
        TOKEN=$(keybroker --as consumer token issue KEY_ID \\
                --context dataset=cohort-42 --justification "study 7")

    --json prints token, token_id and expire_time instead.
    """
    if (subject is None) != (subject_cert is None):
        fail_usage("--subject and --subject-cert go together")
    thumbprint = ""
    if subject_cert is not None:
        with open(subject_cert, "rb") as fh:
            pem = fh.read()
        try:
            thumbprint = cert_thumbprint(pem)
        except ValueError:
            raise click.BadParameter("not a PEM certificate", param_hint="--subject-cert") from None
    state = get_state(ctx)
    issued = state.client().issue_token(
        key_id,
        context,
        justification,
        ttl=ttl,
        subject=subject or "",
        subject_cert_thumbprint=thumbprint,
        max_uses=max_uses,
    )
    if state.json:
        echo_json(
            {
                "token": issued.token,
                "token_id": issued.token_id,
                "expire_time": time_text(issued.expire_time),
                "max_uses": issued.max_uses,
            }
        )
    else:
        click.echo(issued.token)


@token.command("revoke")
@click.argument("token_or_id", metavar="TOKEN|TOKEN_ID")
@json_flag
@click.pass_context
def token_revoke(ctx: click.Context, token_or_id: str) -> None:
    """Revoke a token everywhere (admin, or the token's subject).

    Give the token itself (as `token issue` printed it; its id is read from it) or its id
    (`token issue --json` prints token_id). - reads either from stdin.
    """
    if token_or_id == "-":
        token_or_id = sys.stdin.read().strip()
    token_id = token_id_of(token_or_id)
    state = get_state(ctx)
    state.client().revoke_token(token_id)
    if state.json:
        echo_json({"token_id": token_id, "revoked": True})
    else:
        click.echo(f"revoked {terminal_safe(token_id)}")


@token.command("lookup")
@click.argument("token_text", metavar="TOKEN", envvar="KEYBROKER_TOKEN")
@json_flag
@click.pass_context
def token_lookup(ctx: click.Context, token_text: str) -> None:
    """Print a token's claims: id, subject, key, context, justification, expiry.

    Decoded locally and marked unverified: the signature is not checked here (the broker
    checks it at each use). TOKEN may be - (stdin) or come from KEYBROKER_TOKEN.
    """
    if token_text == "-":
        token_text = sys.stdin.read()
    claims = unverified_claims(token_text)
    if get_state(ctx).json:
        echo_json({"verified": False, "claims": claims})
    else:
        click.echo(claims_text(claims, datetime.now(UTC)))


@token.command("jwks")
@click.option(
    "--output",
    "-o",
    default="-",
    metavar="FILE",
    show_default=True,
    help="Write the JWKS to FILE instead of stdout.",
)
@click.pass_context
def token_jwks(ctx: click.Context, output: str) -> None:
    """Print the broker's JWKS (RFC 7517): the public token and audit signing keys, as JSON.

    Keep it next to an audit export: `keybroker audit verify EXPORT --jwks FILE` checks the
    export's signatures with it, offline.
    """
    jwks = get_state(ctx).client().signing_keys()
    if output == "-":
        echo_json(jwks)
    else:
        write_out(output, (json.dumps(jwks, indent=2) + "\n").encode("utf-8"), secret=False)
