"""Shell completion: ``keybroker completion bash|zsh|fish`` prints the script to source, and
key id arguments complete from the broker's ``ListKeys``."""

from __future__ import annotations

from typing import Any

import click
from click.shell_completion import CompletionItem, get_completion_class

from keybroker_client.client import KeybrokerClient
from keybroker_client.config import resolve_settings

#: Longest wait for the key list while the user presses Tab, in seconds.
COMPLETION_TIMEOUT = 2.0
#: The variable the completion scripts set when they ask ``keybroker`` for candidates.
COMPLETE_VAR = "_KEYBROKER_COMPLETE"


def complete_key_ids(ctx: click.Context, _param: click.Parameter, incomplete: str) -> list[Any]:
    """The key ids starting with ``incomplete``, or none on any error (never a message).

    Completion parses the command line without running the root command, so the client is
    built here from the global options found so far.
    """
    try:
        params = ctx.find_root().params
        settings = resolve_settings(
            home=params.get("home"),
            target=params.get("target"),
            ca=params.get("ca"),
            cert=params.get("cert"),
            key=params.get("key"),
            identity=params.get("identity"),
        )
        timeout = min(float(params.get("timeout") or COMPLETION_TIMEOUT), COMPLETION_TIMEOUT)
        with KeybrokerClient.from_settings(settings, timeout=timeout) as client:
            return [
                CompletionItem(key.key_id)
                for key in client.iter_keys()
                if key.key_id.startswith(incomplete)
            ]
    except Exception:  # noqa: BLE001 - a failed lookup must not break the user's shell
        return []


@click.command("completion")
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
@click.pass_context
def completion(ctx: click.Context, shell: str) -> None:
    """Print the shell completion script for SHELL (commands, options, key ids).

    \b
    bash:  eval "$(keybroker completion bash)"            (in ~/.bashrc)
    zsh:   eval "$(keybroker completion zsh)"             (in ~/.zshrc)
    fish:  keybroker completion fish > ~/.config/fish/completions/keybroker.fish
    """
    root = ctx.find_root()
    shell_class = get_completion_class(shell)
    assert shell_class is not None  # the Choice lists only shells click supports
    script = shell_class(root.command, {}, "keybroker", COMPLETE_VAR).source()
    click.echo(script)
