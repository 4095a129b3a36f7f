"""The request side of ``ReWrapStream``: items in batches, with a bound on what is in flight.

gRPC reads a bidirectional stream's requests on a thread of its own, as fast as the connection
takes them. `BatchFeeder` makes that reader wait once ``in_flight`` batches are sent and not yet
answered, so that a re-wrap of millions of blobs holds a few batches in memory, never the input.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Mapping
from itertools import islice

from keybroker.v1 import crypto_pb2

#: Items per request message when the caller names no size.
DEFAULT_BATCH = 250
#: Most items the broker takes in one request message.
MAX_BATCH = 1000

#: One item: a blob (under the call's context), or a blob and its own context.
ReWrapItem = bytes | tuple[bytes, Mapping[str, str] | None]


def _request_item(item: ReWrapItem, context: Mapping[str, str] | None) -> crypto_pb2.ReWrapRequest:
    if isinstance(item, tuple):
        blob, own = item
        context = own if own is not None else context
    else:
        blob = item
    if not isinstance(blob, bytes | bytearray | memoryview):
        raise TypeError(f"a re-wrap item is a blob (bytes) or (blob, context), not {type(item)}")
    return crypto_pb2.ReWrapRequest(ciphertext=bytes(blob), context=dict(context or {}))


def _check_limits(batch_size: int, in_flight: int) -> None:
    if not 1 <= batch_size <= MAX_BATCH:
        raise ValueError(f"batch_size must be between 1 and {MAX_BATCH}")
    if in_flight < 1:
        raise ValueError("in_flight must be at least 1")


class BatchFeeder:
    """Turns items into request messages of ``batch_size`` items for gRPC's reader thread.

    Args:
        items: the blobs, read lazily.
        context: the context of items that name none.
        batch_size: items per request message (1 to `MAX_BATCH`).
        in_flight: request messages sent and not yet answered, at most.

    Attributes:
        error: what reading or converting ``items`` raised; the request stream then ends
            early and the caller re-raises it once the answered batches are delivered.
    """

    def __init__(
        self,
        items: Iterable[ReWrapItem],
        context: Mapping[str, str] | None,
        batch_size: int,
        in_flight: int,
    ) -> None:
        _check_limits(batch_size, in_flight)
        self._items = iter(items)
        self._context = dict(context or {})
        self._batch_size = batch_size
        self._in_flight = in_flight
        self._slots = threading.Semaphore(in_flight)
        self._sizes: deque[int] = deque()
        self._closed = False
        self.error: BaseException | None = None

    def requests(self) -> Iterator[crypto_pb2.ReWrapStreamRequest]:
        """The request messages; blocks while `in_flight` of them await their answer."""
        while True:
            self._slots.acquire()
            if self._closed:
                return
            try:
                batch = [
                    _request_item(item, self._context)
                    for item in islice(self._items, self._batch_size)
                ]
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                self.error = exc
                return
            if not batch:
                return
            self._sizes.append(len(batch))
            yield crypto_pb2.ReWrapStreamRequest(items=batch)

    def answered(self) -> int:
        """Notes that the oldest batch in flight was answered; returns its item count."""
        size = self._sizes.popleft()
        self._slots.release()
        return size

    def close(self) -> None:
        """Ends the request stream (its reader is woken if it waits for a slot)."""
        self._closed = True
        self._slots.release(self._in_flight)


class AsyncBatchFeeder:
    """`BatchFeeder` for ``grpc.aio``: the request messages as an async iterator, which the
    channel reads on the event loop; it waits (without blocking the loop) while ``in_flight``
    of them await their answer.

    Args:
        items: the blobs, read lazily: an iterable, or an async iterable (a database cursor,
            a file read in chunks).
        context, batch_size, in_flight: as for `BatchFeeder`.

    Attributes:
        error: as for `BatchFeeder`.
    """

    def __init__(
        self,
        items: Iterable[ReWrapItem] | AsyncIterable[ReWrapItem],
        context: Mapping[str, str] | None,
        batch_size: int,
        in_flight: int,
    ) -> None:
        _check_limits(batch_size, in_flight)
        self._items: Iterator[ReWrapItem] | AsyncIterator[ReWrapItem] = (
            aiter(items) if isinstance(items, AsyncIterable) else iter(items)
        )
        self._context = dict(context or {})
        self._batch_size = batch_size
        self._in_flight = in_flight
        self._slots = asyncio.Semaphore(in_flight)
        self._sizes: deque[int] = deque()
        self._closed = False
        self.error: BaseException | None = None

    async def requests(self) -> AsyncIterator[crypto_pb2.ReWrapStreamRequest]:
        """The request messages; waits while `in_flight` of them await their answer."""
        while True:
            await self._slots.acquire()
            if self._closed:
                return
            try:
                batch = [_request_item(item, self._context) for item in await self._take()]
            except Exception as exc:  # noqa: BLE001 - handed to the caller's task
                self.error = exc
                return
            if not batch:
                return
            self._sizes.append(len(batch))
            yield crypto_pb2.ReWrapStreamRequest(items=batch)

    async def _take(self) -> list[ReWrapItem]:
        """The next `batch_size` items (fewer at the end)."""
        if isinstance(self._items, AsyncIterator):
            taken: list[ReWrapItem] = []
            async for item in self._items:
                taken.append(item)
                if len(taken) == self._batch_size:
                    break
            return taken
        return list(islice(self._items, self._batch_size))

    def answered(self) -> int:
        """Notes that the oldest batch in flight was answered; returns its item count."""
        size = self._sizes.popleft()
        self._slots.release()
        return size

    def close(self) -> None:
        """Ends the request stream (it is woken if it waits for a slot)."""
        self._closed = True
        for _ in range(self._in_flight):
            self._slots.release()
