"""Whole files in one call: encrypt and decrypt in the keybroker file format.

The recipes level of the SDK (the raw level is ``generate_data_key``, ``issue_token`` and
``decrypt``). :class:`KeybrokerClient` carries them as methods (and
:class:`~keybroker_client.aio.AsyncKeybrokerClient` as coroutines)::

    with KeybrokerClient.from_settings(resolve_settings(identity="producer")) as kb:
        kb.encrypt_file("cohort-42.csv", "cohort-42.csv.kbf", "patients", {"dataset": "cohort-42"})
    with KeybrokerClient.from_settings(resolve_settings(identity="consumer")) as kb:
        kb.decrypt_file("cohort-42.csv.kbf", "cohort-42.csv", justification="survival study 42")

Encrypting asks the broker for a fresh data key (``GenerateDataKey``) and writes the wrapped key
and the context into the file's header (:mod:`keybroker_client.fileformat`). Decrypting reads
the header, asks for a single-use token with the caller's justification unless a token is given
(``IssueToken``), unwraps the data key (``Decrypt``) and decrypts chunk by chunk.

The plaintext data key is copied into a ``bytearray`` that is zeroed as soon as the file is done,
and it is never written anywhere. That is as far as Python allows: the ``bytes`` the gRPC layer
decoded it into cannot be wiped, only dropped at once, and the AES context holds a derived key.

File outputs are written to a temporary file beside the output path and renamed over it only once
the whole input is done (for decryption: once the final chunk authenticates); on any error the
temporary file is deleted, so a truncated or tampered file never leaves a plausible output.
"""

from __future__ import annotations

import contextlib
import io
import os
import secrets
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import BinaryIO, Protocol, cast

from keybroker_client import fileformat
from keybroker_client.fileformat import (
    DEFAULT_CHUNK_SIZE,
    FileCipher,
    Header,
    InvalidFile,
    Progress,
    Reader,
    Writer,
)
from keybroker_client.types import DataKey, Decrypted, IssuedToken

__all__ = [
    "FileInfo",
    "FileRecipes",
    "replace_on_success",
]

StrPath = str | os.PathLike[str]


@dataclass(frozen=True, slots=True)
class FileInfo:
    """What a recipe did.

    Attributes:
        key_id: the key that wraps the file's data key.
        key_version: that key's version.
        context: the file's encryption context.
        chunk_size: plaintext bytes per chunk.
        plaintext_size: plaintext bytes encrypted or decrypted.
    """

    key_id: str
    key_version: int
    context: Mapping[str, str]
    chunk_size: int
    plaintext_size: int


class _Broker(Protocol):
    def generate_data_key(
        self, key_id: str, context: Mapping[str, str] | None = None
    ) -> DataKey: ...
    def issue_token(
        self,
        key_id: str,
        context: Mapping[str, str] | None,
        justification: str,
        *,
        max_uses: int = 0,
    ) -> IssuedToken: ...
    def decrypt(
        self, ciphertext: bytes, context: Mapping[str, str] | None, token: str
    ) -> Decrypted: ...


@contextlib.contextmanager
def replace_on_success(path: StrPath, *, secret: bool) -> Iterator[BinaryIO]:
    """Yields a file to write; it replaces ``path`` only if the block ends without an error.

    The temporary file is created beside ``path`` (same file system, so the rename is atomic),
    mode 0600 for a ``secret`` (decrypted data), else 0644, both less the umask. On any error,
    Ctrl-C included, it is deleted and ``path`` is left as it was.
    """
    target = os.fspath(path)
    directory, name = os.path.split(os.path.abspath(target))
    while True:
        temp = os.path.join(directory, f".{name}.{secrets.token_hex(6)}.part")
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if secret else 0o644)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as out:
            yield out
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise


@contextlib.contextmanager
def _files(
    in_path: StrPath, out_path: StrPath, *, secret: bool
) -> Iterator[tuple[io.FileIO, BinaryIO]]:
    """The input unbuffered (chunks are read straight into the cipher's buffer) and the output
    through :func:`replace_on_success`."""
    with (
        open(in_path, "rb", buffering=0) as src,
        replace_on_success(out_path, secret=secret) as dst,
    ):
        yield src, dst


def _check_token_source(token: str | None, justification: str | None) -> None:
    if token is not None and justification is not None:
        raise ValueError("give either a token or a justification, not both")
    if not token and not justification:
        raise ValueError(
            "decrypting a file needs a token (from issue_token) or a justification to ask the "
            "broker for one"
        )


def _file_context(header: Header, context: Mapping[str, str] | None) -> dict[str, str]:
    if context is not None and dict(context) != dict(header.context):
        raise InvalidFile(
            "the file was encrypted with another context: "
            + (", ".join(f"{k}={v}" for k, v in sorted(header.context.items())) or "(empty)")
        )
    return dict(header.context)


def _cipher(data_key: bytes, header: Header) -> FileCipher:
    """The file's cipher; the copy of the data key made for it is zeroed before returning."""
    key = bytearray(data_key)
    try:
        return FileCipher(key, header)
    finally:
        key[:] = bytes(len(key))


def _new_file(context: Mapping[str, str] | None, chunk_size: int) -> dict[str, str]:
    """The context as a dict, after the checks that need no broker call."""
    ctx = dict(context or {})
    fileformat.check_context(ctx)
    fileformat.chunk_exponent(chunk_size)
    return ctx


class FileRecipes:
    """The file recipes as methods of :class:`~keybroker_client.client.KeybrokerClient`."""

    def encrypt_stream(
        self,
        reader: Reader,
        writer: Writer,
        key_id: str,
        context: Mapping[str, str] | None = None,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        progress: Progress | None = None,
    ) -> FileInfo:
        """Encrypts ``reader`` into ``writer`` under a fresh data key of ``key_id``.

        Needs an ``encrypt`` grant. Memory stays flat whatever the input size.

        Args:
            reader: a binary input with ``readinto`` (a file opened ``"rb"``, stdin's buffer).
            writer: a binary output.
            key_id: the key to wrap the data key under.
            context: the encryption context, written in the header and bound to the data key.
            chunk_size: plaintext bytes per chunk, a power of two from 4 KiB to 16 MiB.
            progress: called with the plaintext bytes of each chunk.

        Returns:
            The key, version, context, chunk size and plaintext size.

        Raises:
            ValueError: a bad chunk size or context (before any call).
            KeybrokerError: the broker refused the data key.
        """
        ctx = _new_file(context, chunk_size)
        dk: DataKey = _broker(self).generate_data_key(key_id, ctx)
        cipher = _cipher(dk.plaintext_key, fileformat.new_header(dk.wrapped_key, ctx, chunk_size))
        size = cipher.encrypt(reader, writer, progress=progress)
        return FileInfo(dk.key_id, dk.key_version, ctx, chunk_size, size)

    def decrypt_stream(
        self,
        reader: Reader,
        writer: Writer,
        *,
        context: Mapping[str, str] | None = None,
        token: str | None = None,
        justification: str | None = None,
        progress: Progress | None = None,
    ) -> FileInfo:
        """Decrypts a keybroker file from ``reader`` into ``writer``.

        Chunks are written as they authenticate: the output is complete and genuine only when
        this returns. On an error, discard what was written (:meth:`decrypt_file` does).

        Args:
            reader: the file, from its first byte.
            writer: where the plaintext goes.
            context: if given, it must equal the context in the file's header.
            token: a token issued to this client for the file's key and context; or
            justification: why the data is needed, to ask for a single-use token.
            progress: called with the file bytes of each chunk.

        Raises:
            ValueError: neither (or both of) ``token`` and ``justification``.
            InvalidFile: not a keybroker file, another context, or it does not authenticate.
            KeybrokerError: the broker refused the token or the data key.
        """
        _check_token_source(token, justification)
        broker = _broker(self)
        header = fileformat.read_header(reader)
        ctx = _file_context(header, context)
        if not token:
            # The token serves this one Decrypt: it allows no other.
            issued: IssuedToken = broker.issue_token(
                header.key_id, ctx, str(justification), max_uses=1
            )
            token = issued.token
        opened: Decrypted = broker.decrypt(header.wrapped_key, ctx, token)
        cipher, version = _cipher(opened.plaintext, header), opened.key_version
        del opened
        size = cipher.decrypt(reader, writer, progress=progress)
        return FileInfo(header.key_id, version, ctx, header.chunk_size, size)

    def encrypt_file(
        self,
        in_path: StrPath,
        out_path: StrPath,
        key_id: str,
        context: Mapping[str, str] | None = None,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        progress: Progress | None = None,
    ) -> FileInfo:
        """Encrypts the file ``in_path`` into ``out_path`` (see :meth:`encrypt_stream`).

        ``out_path`` appears only once the whole input is encrypted.
        """
        with _files(in_path, out_path, secret=False) as (src, dst):
            return self.encrypt_stream(
                src, dst, key_id, context, chunk_size=chunk_size, progress=progress
            )

    def decrypt_file(
        self,
        in_path: StrPath,
        out_path: StrPath,
        context: Mapping[str, str] | None = None,
        token: str | None = None,
        justification: str | None = None,
        *,
        progress: Progress | None = None,
    ) -> FileInfo:
        """Decrypts the keybroker file ``in_path`` into ``out_path`` (mode 0600).

        ``out_path`` appears only once the final chunk authenticates; on any error nothing is
        left behind. Arguments and errors as for :meth:`decrypt_stream`.
        """
        _check_token_source(token, justification)
        with _files(in_path, out_path, secret=True) as (src, dst):
            return self.decrypt_stream(
                src,
                dst,
                context=context,
                token=token,
                justification=justification,
                progress=progress,
            )


def _broker(obj: object) -> _Broker:
    # The mixins are only used by the clients, which have these methods.
    return cast(_Broker, obj)
