"""``keybroker datakey|encrypt|decrypt|rewrap``: data keys and blobs."""

from __future__ import annotations

from typing import IO, Any

import click

from keybroker_client.cli.completion import complete_key_ids
from keybroker_client.cli.errors import fail_usage
from keybroker_client.cli.options import blob_options, context_option, json_flag
from keybroker_client.cli.output import (
    b64,
    echo_json,
    plaintext_to_terminal_flag,
    read_blob,
    refuse_secret_on_terminal,
    write_out,
)
from keybroker_client.cli.state import State, get_state

#: The broker's Encrypt RPC takes at most this many bytes; larger data goes through datakey.
MAX_ENCRYPT_BYTES = 64 * 1024


@click.command("datakey")
@click.argument("key_id", shell_complete=complete_key_ids)
@context_option
@click.option(
    "--out",
    "out_path",
    metavar="FILE",
    help="Write the wrapped key (raw bytes) to FILE and leave the plaintext key out of stdout.",
)
@click.option(
    "--show-plaintext",
    is_flag=True,
    help="With --out, still print the plaintext key. It is a secret: anyone who sees it can "
    "read the data it encrypts, so it is hidden from stdout (and terminal scroll-back, logs "
    "and CI output) unless asked for.",
)
@click.option(
    "--plaintext-out",
    metavar="FILE",
    help="Write the plaintext key (raw 32 bytes) to FILE, created with mode 0600.",
)
@plaintext_to_terminal_flag
@click.pass_context
def datakey(
    ctx: click.Context,
    *,
    key_id: str,
    context: dict[str, str],
    out_path: str | None,
    show_plaintext: bool,
    plaintext_out: str | None,
    plaintext_to_terminal: bool,
) -> None:
    """Generate a data key under KEY_ID and print it as JSON.

    Prints {key_id, key_version, plaintext_key, wrapped_key}, bytes in base64. With --out the
    wrapped key goes to FILE and the plaintext key is printed only with --show-plaintext.
    Needs an encrypt grant. On a terminal, printing the plaintext key is refused unless
    --plaintext-to-terminal is given.
    """
    state = get_state(ctx)
    if show_plaintext or (not out_path and not plaintext_out):
        refuse_secret_on_terminal(
            plaintext_to_terminal, "the plaintext key", "--plaintext-out FILE --out FILE"
        )
    dk = state.client().generate_data_key(key_id, context)
    out: dict[str, Any] = {"key_id": dk.key_id, "key_version": dk.key_version}
    if plaintext_out:
        write_out(plaintext_out, dk.plaintext_key, secret=True)
        out["plaintext_key_file"] = plaintext_out
    if out_path:
        write_out(out_path, dk.wrapped_key, secret=False)
        out["wrapped_key_file"] = out_path
        if show_plaintext:
            out["plaintext_key"] = b64(dk.plaintext_key)
    else:
        if not plaintext_out or show_plaintext:
            out["plaintext_key"] = b64(dk.plaintext_key)
        out["wrapped_key"] = b64(dk.wrapped_key)
    echo_json(out)


def _emit_blob(state: State, blob: bytes, key_id: str, version: int, out_path: str | None) -> None:
    if out_path:
        write_out(out_path, blob, secret=False)
        if state.json and out_path != "-":
            echo_json({"key_id": key_id, "key_version": version, "out": out_path})
    elif state.json:
        echo_json({"ciphertext": b64(blob), "key_id": key_id, "key_version": version})
    else:
        click.echo(b64(blob))


@click.command("encrypt")
@click.argument("key_id", shell_complete=complete_key_ids)
@context_option
@click.option(
    "--in",
    "in_file",
    type=click.File("rb"),
    metavar="FILE|-",
    default="-",
    show_default=True,
    help="Plaintext to encrypt (at most 64 KiB); - for stdin.",
)
@click.option(
    "--out",
    "out_path",
    metavar="FILE|-",
    help="Write the ciphertext (raw bytes) to FILE or - (stdout). Default: print base64.",
)
@json_flag
@click.pass_context
def encrypt(
    ctx: click.Context,
    *,
    key_id: str,
    context: dict[str, str],
    in_file: IO[bytes],
    out_path: str | None,
) -> None:
    """Encrypt a small payload inside the HSM under KEY_ID (needs an encrypt grant).

    For larger data use `keybroker datakey` and encrypt locally with the data key.
    """
    state = get_state(ctx)
    data = in_file.read(MAX_ENCRYPT_BYTES + 1)
    if len(data) > MAX_ENCRYPT_BYTES:
        fail_usage(
            f"input is over {MAX_ENCRYPT_BYTES} bytes, the limit of encrypt; "
            "use `keybroker datakey` and encrypt locally"
        )
    result = state.client().encrypt(key_id, data, context)
    _emit_blob(state, result.ciphertext, result.key_id, result.key_version, out_path)


def _token_value(token: str | None, token_file: str | None) -> str:
    if token is not None and token_file is not None:
        fail_usage("--token and --token-file exclude each other")
    if token_file is not None:
        with open(token_file, encoding="utf-8") as fh:
            token = fh.read().strip()
    if not token:
        fail_usage("give a token with --token, --token-file or KEYBROKER_TOKEN")
    return token.strip()


@click.command("decrypt")
@click.option(
    "--token",
    envvar="KEYBROKER_TOKEN",
    metavar="TOKEN",
    help="Token from `keybroker token issue` [env KEYBROKER_TOKEN].",
)
@click.option(
    "--token-file",
    type=click.Path(exists=True, dir_okay=False),
    help="File holding the token (keeps it out of the process list).",
)
@context_option
@blob_options
@click.option(
    "--out",
    "out_path",
    metavar="FILE|-",
    help="Write the plaintext (raw bytes) to FILE (mode 0600) or - (stdout). "
    "Default: print it in base64 (on a terminal, only with --plaintext-to-terminal).",
)
@plaintext_to_terminal_flag
@json_flag
@click.pass_context
def decrypt(
    ctx: click.Context,
    *,
    token: str | None,
    token_file: str | None,
    context: dict[str, str],
    in_file: IO[bytes] | None,
    blob_b64: str | None,
    out_path: str | None,
    plaintext_to_terminal: bool,
) -> None:
    """Decrypt a wrapped data key or ciphertext with a token.

    The blob names its key and version; give the same --context it was made with.
    """
    state = get_state(ctx)
    if out_path in (None, "-"):
        refuse_secret_on_terminal(plaintext_to_terminal, "the plaintext", "--out FILE")
    token_text = _token_value(token, token_file)
    blob = read_blob(in_file, blob_b64)
    result = state.client().decrypt(blob, context, token_text)
    if out_path:
        write_out(out_path, result.plaintext, secret=True)
        if state.json and out_path != "-":
            echo_json({"key_id": result.key_id, "key_version": result.key_version})
    elif state.json:
        echo_json(
            {
                "plaintext": b64(result.plaintext),
                "key_id": result.key_id,
                "key_version": result.key_version,
            }
        )
    else:
        click.echo(b64(result.plaintext))


@click.command("rewrap")
@context_option
@blob_options
@click.option(
    "--out",
    "out_path",
    metavar="FILE|-",
    help="Write the new blob (raw bytes) to FILE or - (stdout). Default: print base64.",
)
@json_flag
@click.pass_context
def rewrap(
    ctx: click.Context,
    *,
    context: dict[str, str],
    in_file: IO[bytes] | None,
    blob_b64: str | None,
    out_path: str | None,
) -> None:
    """Re-encrypt a blob under its key's primary version (admin or rewrap grant)."""
    state = get_state(ctx)
    blob = read_blob(in_file, blob_b64)
    result = state.client().rewrap(blob, context)
    _emit_blob(state, result.ciphertext, result.key_id, result.key_version, out_path)


#: The top-level commands this module adds to ``keybroker``.
COMMANDS = (datakey, encrypt, decrypt, rewrap)
