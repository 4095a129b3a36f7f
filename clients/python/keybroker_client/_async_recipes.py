"""The file recipes as coroutines, for :class:`~keybroker_client.aio.AsyncKeybrokerClient`.

Same arguments, results and errors as :class:`keybroker_client.recipes.FileRecipes`; the broker
calls are awaited and the chunks are encrypted in a worker thread.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol, cast

from keybroker_client import fileformat
from keybroker_client.fileformat import DEFAULT_CHUNK_SIZE, Progress, Reader, Writer
from keybroker_client.recipes import (
    FileInfo,
    StrPath,
    _check_token_source,
    _cipher,
    _file_context,
    _files,
    _new_file,
)
from keybroker_client.types import DataKey, Decrypted, IssuedToken

__all__ = ["AsyncFileRecipes"]


class _AsyncBroker(Protocol):
    def generate_data_key(
        self, key_id: str, context: Mapping[str, str] | None = None
    ) -> Awaitable[DataKey]: ...
    def issue_token(
        self,
        key_id: str,
        context: Mapping[str, str] | None,
        justification: str,
        *,
        max_uses: int = 0,
    ) -> Awaitable[IssuedToken]: ...
    def decrypt(
        self, ciphertext: bytes, context: Mapping[str, str] | None, token: str
    ) -> Awaitable[Decrypted]: ...


async def _in_thread(
    work: Callable[..., int], reader: Reader, writer: Writer, progress: Progress | None
) -> int:
    """Runs a blocking stream in a worker thread; cancelling stops it at the next chunk."""
    cancelled = threading.Event()

    def step(n: int) -> None:
        if cancelled.is_set():
            raise asyncio.CancelledError
        if progress is not None:
            progress(n)

    try:
        return await asyncio.to_thread(work, reader, writer, progress=step)
    except asyncio.CancelledError:
        cancelled.set()
        raise


class AsyncFileRecipes:
    """The file recipes as coroutines of :class:`~keybroker_client.aio.AsyncKeybrokerClient`.

    Same arguments, results and errors as :class:`~keybroker_client.recipes.FileRecipes`.
    Readers and writers are ordinary (blocking) binary files: the chunks are encrypted and
    written in a worker thread, so the event loop stays free, and ``progress`` is called from
    that thread.
    """

    async def encrypt_stream(
        self,
        reader: Reader,
        writer: Writer,
        key_id: str,
        context: Mapping[str, str] | None = None,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        progress: Progress | None = None,
    ) -> FileInfo:
        """See :meth:`FileRecipes.encrypt_stream`."""
        ctx = _new_file(context, chunk_size)
        dk: DataKey = await _async_broker(self).generate_data_key(key_id, ctx)
        cipher = _cipher(dk.plaintext_key, fileformat.new_header(dk.wrapped_key, ctx, chunk_size))
        size = await _in_thread(cipher.encrypt, reader, writer, progress)
        return FileInfo(dk.key_id, dk.key_version, ctx, chunk_size, size)

    async def decrypt_stream(
        self,
        reader: Reader,
        writer: Writer,
        *,
        context: Mapping[str, str] | None = None,
        token: str | None = None,
        justification: str | None = None,
        progress: Progress | None = None,
    ) -> FileInfo:
        """See :meth:`FileRecipes.decrypt_stream`."""
        _check_token_source(token, justification)
        broker = _async_broker(self)
        header = await asyncio.to_thread(fileformat.read_header, reader)
        ctx = _file_context(header, context)
        if not token:
            issued: IssuedToken = await broker.issue_token(
                header.key_id, ctx, str(justification), max_uses=1
            )
            token = issued.token
        opened: Decrypted = await broker.decrypt(header.wrapped_key, ctx, token)
        cipher, version = _cipher(opened.plaintext, header), opened.key_version
        del opened
        size = await _in_thread(cipher.decrypt, reader, writer, progress)
        return FileInfo(header.key_id, version, ctx, header.chunk_size, size)

    async def encrypt_file(
        self,
        in_path: StrPath,
        out_path: StrPath,
        key_id: str,
        context: Mapping[str, str] | None = None,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        progress: Progress | None = None,
    ) -> FileInfo:
        """See :meth:`FileRecipes.encrypt_file`."""
        with _files(in_path, out_path, secret=False) as (src, dst):
            return await self.encrypt_stream(
                src, dst, key_id, context, chunk_size=chunk_size, progress=progress
            )

    async def decrypt_file(
        self,
        in_path: StrPath,
        out_path: StrPath,
        context: Mapping[str, str] | None = None,
        token: str | None = None,
        justification: str | None = None,
        *,
        progress: Progress | None = None,
    ) -> FileInfo:
        """See :meth:`FileRecipes.decrypt_file`."""
        _check_token_source(token, justification)
        with _files(in_path, out_path, secret=True) as (src, dst):
            return await self.decrypt_stream(
                src,
                dst,
                context=context,
                token=token,
                justification=justification,
                progress=progress,
            )


def _async_broker(obj: object) -> _AsyncBroker:
    return cast(_AsyncBroker, obj)
