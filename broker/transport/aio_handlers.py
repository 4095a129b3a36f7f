"""grpc.aio handlers built from the sync servicers, with the error interceptor's behaviour.

The servicers (`servicers.py`) stay plain sync classes registered by the generated
`add_*Servicer_to_server` functions. `AioHandlers.install` runs those functions against a
collector, then registers with the grpc.aio server one async handler per method that wraps the
sync one. Every method of every service registered that way is served, including methods added
later to a servicer and its proto: nothing here lists them.

Where a method runs:

- **inline**, on the event loop, when it is listed in `inline` (unary-unary only): the hot path
  (Crypto's HSM calls take 100-200 us and hold the GIL anyway, so a thread hand-off would only
  add work). Its audit appends do not block (`audit_writer.deferring`): the handler returns,
  then the wrapper awaits every event of the call being durable before the response, or the
  error, leaves; a failed audit answers UNAVAILABLE instead (fail closed). A `route` may send
  one request of an inline method to the executor instead (a Decrypt whose token counts its
  uses writes that count, an fsync, and must not stall the loop).
- **in the executor** (a bounded thread pool), everything else: methods that write to the
  database or may be slow, streaming methods, and any method not listed. They run exactly as
  on the sync server, audit waits included. A streaming method's sync iterator runs on one
  executor thread and its items are handed to the loop as they come; a request stream is
  read from the loop for it, message by message.

Each call, wherever it runs: a request id (the client's `x-request-id` when well-formed) in the
logs, the audit event and the trailing metadata; a request that cannot be decoded answers
INVALID_ARGUMENT; a domain error its code from `status.status_for`; anything else a generic
INTERNAL naming the request id, the traceback logged and never sent. An observer, if any, is
told each call's method, status code and duration once it ends.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Executor
from typing import Any, NoReturn, Protocol

import grpc
from google.protobuf.message import DecodeError

from broker.errors import AuditUnavailable, InvalidArgument, KeybrokerError
from broker.services import deadline
from broker.services.audit_writer import TIMED_OUT, WAIT_SECONDS, AuditWaits, deferring
from broker.transport.auth import (
    CertificateCheck,
    certificate_check_var,
    request_id_from,
    request_id_var,
)
from broker.transport.status import status_for

log = logging.getLogger(__name__)

#: Registers a servicer with a server: a generated `add_*Servicer_to_server`.
Adder = Callable[[Any, Any], None]
#: Looks at a decoded request of an inline method; True sends this call to the executor.
Route = Callable[[Any], bool]

UNDECODABLE = "the request could not be decoded (malformed message or invalid UTF-8)"
UNDECODABLE_MESSAGE = "a request message could not be decoded (malformed or invalid UTF-8)"
#: Items of a response stream buffered ahead of the client, at most.
STREAM_BUFFER = 64
#: How often a thread blocked on a request stream checks that its call is still on (seconds).
_POLL_SECONDS = 0.5


class RpcObserver(Protocol):
    """Told of every keybroker RPC once it ends (the metrics). Must be cheap and never raise
    (what it raises is logged and swallowed)."""

    def rpc_finished(self, method: str, code: str, seconds: float) -> None:
        """`method` is the full gRPC method (`/keybroker.v1.Crypto/Decrypt`), `code` the
        name of its status code (`OK`, `PERMISSION_DENIED`, ...)."""


class _Aborted(Exception):
    """A sync servicer called `context.abort(code, details)`."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class SyncContext:
    """The sync `grpc.ServicerContext` API that the servicers use, over an aio context.

    Reads (`auth_context`, `invocation_metadata`, `peer`, `time_remaining`, `is_active`)
    and `set_trailing_metadata`/`set_code`/`set_details` go straight to the aio context, from
    the loop or from an executor thread (they read or store plain values). `abort` raises, as
    the sync one does; the wrapper answers with that status.
    """

    __slots__ = ("_context", "_loop")

    def __init__(self, context: grpc.aio.ServicerContext, loop: asyncio.AbstractEventLoop) -> None:
        self._context = context
        self._loop = loop

    def auth_context(self) -> Mapping[str, Iterable[bytes]]:
        return self._context.auth_context()  # type: ignore[no-any-return]

    def is_active(self) -> bool:
        return not self._context.done()

    def abort(self, code: grpc.StatusCode, details: str) -> NoReturn:
        raise _Aborted(code, details)

    def abort_with_status(self, status: grpc.Status) -> NoReturn:
        raise _Aborted(status.code, status.details)

    def add_callback(self, callback: Callable[[], None]) -> bool:
        self._loop.call_soon_threadsafe(
            self._context.add_done_callback, lambda _context: callback()
        )
        return True

    def send_initial_metadata(self, metadata: Sequence[tuple[str, str | bytes]]) -> None:
        future = asyncio.run_coroutine_threadsafe(
            self._context.send_initial_metadata(metadata), self._loop
        )
        if not _on_loop(self._loop):  # an inline handler cannot wait for its own loop
            future.result()

    def __getattr__(self, name: str) -> Any:
        # invocation_metadata, peer, peer_identities, time_remaining, set_trailing_metadata,
        # set_code, set_details, set_compression, ...: the same call on the aio context.
        return getattr(self._context, name)


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


class _AuditBridge:
    """Waits, on the loop, for the deferred audit appends of calls.

    The writer thread reports a call settled through `AuditWaits.when_settled`; the calls
    settled by one commit are woken with one `call_soon_threadsafe`, not one each.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._ready: list[asyncio.Future[bool]] = []
        self._scheduled = False

    async def settled(self, waits: AuditWaits) -> AuditUnavailable | None:
        """Waits until every append of the call is done; their error, if any."""
        if waits.outstanding == 0:
            return waits.error
        # True when the writer did not answer in time (a hung database).
        future: asyncio.Future[bool] = self._loop.create_future()
        if waits.when_settled(lambda: self._from_writer(future)):
            return waits.error
        timer = self._loop.call_later(WAIT_SECONDS, _settle, future, True)
        try:
            if await future:
                return AuditUnavailable(TIMED_OUT)
            return waits.error
        finally:
            timer.cancel()

    def _from_writer(self, future: asyncio.Future[bool]) -> None:
        with self._lock:
            self._ready.append(future)
            if self._scheduled:
                return
            self._scheduled = True
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        with self._lock:
            ready, self._ready = self._ready, []
            self._scheduled = False
        for future in ready:
            _settle(future, False)


def _settle(future: asyncio.Future[bool], timed_out: bool) -> None:
    if not future.done():
        future.set_result(timed_out)


class _Pump:
    """Runs a sync iterator on an executor thread; the loop takes its items as they come.

    At most STREAM_BUFFER items wait for the loop; the thread waits beyond that (a slow
    client slows the producer, memory stays bounded). `close` (the call ended) stops the
    thread at its next item.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._cv = threading.Condition()
        self._items: deque[Any] = deque()
        self._finished = False
        self._error: BaseException | None = None
        self._closed = False
        self._waiter: asyncio.Future[None] | None = None

    def run(self, make: Callable[[], Iterable[Any]]) -> None:
        """The thread's part: iterates `make()` into the buffer."""
        iterator: Iterator[Any] | None = None
        try:
            iterator = iter(make())
            for item in iterator:
                with self._cv:
                    while len(self._items) >= STREAM_BUFFER and not self._closed:
                        self._cv.wait()
                    if self._closed:
                        break
                    self._items.append(item)
                    waiter, self._waiter = self._waiter, None
                if waiter is not None:
                    self._loop.call_soon_threadsafe(_release, waiter)
        except BaseException as exc:  # noqa: BLE001 - handed to the loop, which maps it
            self._error = exc
        finally:
            if self._closed and iterator is not None and hasattr(iterator, "close"):
                try:
                    iterator.close()  # the call is over: the servicer's own clean-up runs now
                except Exception:
                    log.exception("closing a response stream failed")
            with self._cv:
                self._finished = True
                waiter, self._waiter = self._waiter, None
            if waiter is not None and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(_release, waiter)

    async def next_batch(self) -> list[Any] | None:
        """The loop's part: the items produced since the last batch (waits for one at
        least); None once the iterator is done, or its exception."""
        while True:
            with self._cv:
                batch = list(self._items)
                self._items.clear()
                self._cv.notify_all()
                if batch:
                    return batch
                if self._finished:
                    if self._error is not None:
                        raise self._error
                    return None
                waiter = self._waiter = self._loop.create_future()
            await waiter

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()


def _release(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class _RequestStream:
    """A request stream of the aio call as the sync iterator a servicer reads, on its thread:
    each message is read on the loop when the servicer asks for it, then decoded here."""

    def __init__(
        self,
        requests: AsyncIterator[bytes],
        decode: Callable[[bytes], Any] | None,
        loop: asyncio.AbstractEventLoop,
        context: grpc.aio.ServicerContext,
    ) -> None:
        self._requests = requests
        self._decode = decode
        self._loop = loop
        self._context = context

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        future = asyncio.run_coroutine_threadsafe(_next_or_end(self._requests), self._loop)
        while True:
            try:
                found, raw = future.result(_POLL_SECONDS)
                break
            except TimeoutError:
                if self._context.done() or not self._loop.is_running():
                    future.cancel()
                    raise StopIteration from None
            except Exception:
                if self._context.done():  # the call ended (cancelled): the stream just stops
                    raise StopIteration from None
                raise
        if not found:
            raise StopIteration
        if self._decode is None:
            return raw
        try:
            return self._decode(raw)
        except DecodeError:
            # Raised inside the handler: mapped as its own errors are, to INVALID_ARGUMENT.
            raise InvalidArgument(UNDECODABLE_MESSAGE) from None


async def _next_or_end(requests: AsyncIterator[bytes]) -> tuple[bool, bytes]:
    try:
        return True, await anext(requests)
    except StopAsyncIteration:
        return False, b""


class AioHandlers:
    """Builds and registers the async handlers of sync servicers on a grpc.aio server.

    Args:
        loop: the server's event loop.
        executor: the bounded pool that runs every method not inline.
        inline: full method names (`/keybroker.v1.Crypto/Decrypt`) run on the loop; only
            unary-unary methods can be, others go to the executor whatever this says.
        routes: per inline method, a look at the decoded request that may send that one call
            to the executor.
        observer: told of every RPC once it ends; None for none.
        certificates: the revocation check of client certificates (`auth.caller_of` asks
            it); None for none.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        executor: Executor,
        inline: frozenset[str] = frozenset(),
        routes: Mapping[str, Route] | None = None,
        observer: RpcObserver | None = None,
        certificates: CertificateCheck | None = None,
    ) -> None:
        self._loop = loop
        self._executor = executor
        self._inline = inline
        self._routes = dict(routes or {})
        self._observer = observer
        self._certificates = certificates
        self._audit = _AuditBridge(loop)
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    def install(self, server: grpc.aio.Server, servicers: Sequence[tuple[Adder, Any]]) -> None:
        """Registers each (add_*Servicer_to_server, servicer) with `server`, wrapped."""
        for add, servicer in servicers:
            collector = _Collector()
            add(servicer, collector)
            for service, handlers in collector.registered.items():
                wrapped = {
                    name: self.wrap(f"/{service}/{name}", handler)
                    for name, handler in handlers.items()
                }
                server.add_generic_rpc_handlers(
                    (grpc.method_handlers_generic_handler(service, wrapped),)
                )
                server.add_registered_method_handlers(service, wrapped)
            if collector.generic:
                # A hand-written registration (no method table): wrapped when first called.
                server.add_generic_rpc_handlers(
                    tuple(_LazyWrapped(g, self.wrap) for g in collector.generic)
                )

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """The async handler of one sync method handler (built once per method)."""
        if method in self._wrapped:
            return self._wrapped[method]
        decode = handler.request_deserializer
        encode = handler.response_serializer
        if handler.unary_unary is not None:
            unary = self._unary(method, handler.unary_unary, decode)
            wrapped = grpc.unary_unary_rpc_method_handler(unary, None, encode)
        elif handler.unary_stream is not None:
            out = self._unary_stream(method, handler.unary_stream, decode)
            wrapped = grpc.unary_stream_rpc_method_handler(out, None, encode)
        elif handler.stream_unary is not None:
            into = self._stream_unary(method, handler.stream_unary, decode)
            wrapped = grpc.stream_unary_rpc_method_handler(into, None, encode)
        else:
            bidi = self._stream_stream(method, handler.stream_stream, decode)
            wrapped = grpc.stream_stream_rpc_method_handler(bidi, None, encode)
        self._wrapped[method] = wrapped
        return wrapped

    # -- the four kinds ------------------------------------------------------------------

    def _unary(
        self, method: str, behavior: Callable[..., Any], decode: Callable[[bytes], Any] | None
    ) -> Callable[[bytes, grpc.aio.ServicerContext], Any]:
        inline = method in self._inline
        route = self._routes.get(method)

        async def unary(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
            call = _Call(self, method, context)
            try:
                request = call.decode(raw, decode)
                if inline and (route is None or not route(request)):
                    response = await call.inline(behavior, request)
                else:
                    response = await call.in_executor(behavior, request)
                call.code = "OK"
                return response
            except asyncio.CancelledError:
                call.cancelled()
                raise
            except Exception as exc:  # noqa: BLE001 - the one place that maps all errors
                await call.fail(exc)
            finally:
                call.finished()

        return unary

    def _unary_stream(
        self, method: str, behavior: Callable[..., Any], decode: Callable[[bytes], Any] | None
    ) -> Callable[[bytes, grpc.aio.ServicerContext], AsyncIterator[Any]]:
        async def unary_stream(raw: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            call = _Call(self, method, context)
            pump = None
            try:
                request = call.decode(raw, decode)
                pump = call.start_stream(lambda ctx: behavior(request, ctx))
                while (batch := await pump.next_batch()) is not None:
                    for item in batch:
                        yield item
                call.code = "OK"
            except asyncio.CancelledError:
                call.cancelled()
                raise
            except Exception as exc:  # noqa: BLE001 - the one place that maps all errors
                await call.fail(exc)
            finally:
                if pump is not None:
                    pump.close()
                call.finished()

        return unary_stream

    def _stream_unary(
        self, method: str, behavior: Callable[..., Any], decode: Callable[[bytes], Any] | None
    ) -> Callable[[AsyncIterator[bytes], grpc.aio.ServicerContext], Any]:
        async def stream_unary(
            requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
        ) -> Any:
            call = _Call(self, method, context)
            try:
                stream = _RequestStream(requests, decode, self._loop, context)
                response = await call.in_executor(behavior, stream)
                call.code = "OK"
                return response
            except asyncio.CancelledError:
                call.cancelled()
                raise
            except Exception as exc:  # noqa: BLE001 - the one place that maps all errors
                await call.fail(exc)
            finally:
                call.finished()

        return stream_unary

    def _stream_stream(
        self, method: str, behavior: Callable[..., Any], decode: Callable[[bytes], Any] | None
    ) -> Callable[[AsyncIterator[bytes], grpc.aio.ServicerContext], AsyncIterator[Any]]:
        async def stream_stream(
            requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            call = _Call(self, method, context)
            pump = None
            try:
                stream = _RequestStream(requests, decode, self._loop, context)
                pump = call.start_stream(lambda ctx: behavior(stream, ctx))
                while (batch := await pump.next_batch()) is not None:
                    for item in batch:
                        yield item
                call.code = "OK"
            except asyncio.CancelledError:
                call.cancelled()
                raise
            except Exception as exc:  # noqa: BLE001 - the one place that maps all errors
                await call.fail(exc)
            finally:
                if pump is not None:
                    pump.close()
                call.finished()

        return stream_stream


class _Call:
    """One RPC under way: its request id, where it runs, how it ends."""

    __slots__ = ("_handlers", "_started", "code", "context", "method", "sync")

    def __init__(
        self, handlers: AioHandlers, method: str, context: grpc.aio.ServicerContext
    ) -> None:
        self._started = time.perf_counter()
        self._handlers = handlers
        self.method = method
        self.context = context
        self.code = "UNKNOWN"
        request_id = request_id_from(context.invocation_metadata())
        request_id_var.set(request_id)  # this call's task has a context of its own
        certificate_check_var.set(handlers._certificates)
        # The services stop a call whose caller's deadline has passed (`deadline`).
        deadline.bind(context.time_remaining)
        context.set_trailing_metadata((("x-request-id", request_id),))
        self.sync = SyncContext(context, handlers._loop)

    def decode(self, raw: bytes, decode: Callable[[bytes], Any] | None) -> Any:
        if decode is None:
            return raw
        try:
            return decode(raw)
        except DecodeError:
            raise _Aborted(grpc.StatusCode.INVALID_ARGUMENT, UNDECODABLE) from None

    async def inline(self, behavior: Callable[..., Any], request: Any) -> Any:
        """Runs the handler on the loop; answers only once its audit events are durable."""
        waits = AuditWaits()
        error: Exception | None = None
        response = None
        with deferring(waits):
            try:
                response = behavior(request, self.sync)
            except Exception as exc:  # noqa: BLE001 - raised below, once its event is durable
                error = exc
        failed = await self._handlers._audit.settled(waits)
        if failed is not None:
            raise failed  # fail closed: nothing the handler produced leaves
        if error is not None:
            raise error
        return response

    async def in_executor(self, behavior: Callable[..., Any], request: Any) -> Any:
        """Runs the handler on an executor thread, as the sync server did (audit waits too)."""
        run = contextvars.copy_context().run
        loop = self._handlers._loop
        return await loop.run_in_executor(
            self._handlers._executor, run, behavior, request, self.sync
        )

    def start_stream(self, make: Callable[[SyncContext], Iterable[Any]]) -> _Pump:
        """Starts a sync response iterator on an executor thread; the pump hands its items
        to the loop (the caller closes it when the call ends)."""
        pump = _Pump(self._handlers._loop)
        run = contextvars.copy_context().run
        self._handlers._loop.run_in_executor(
            self._handlers._executor, run, pump.run, lambda: make(self.sync)
        )
        return pump

    async def fail(self, exc: Exception) -> NoReturn:
        """Answers `exc` with its status (an abort already under way goes on)."""
        if isinstance(exc, grpc.aio.AbortError):
            code = self.context.code()
            self.code = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
            raise exc
        code, details = status_of(exc, self.method)
        self.code = code.name
        await self.context.abort(code, details)
        raise AssertionError("unreachable")  # pragma: no cover - abort raises

    def cancelled(self) -> None:
        """The call was cancelled: by its client, or by its deadline."""
        remaining = self.context.time_remaining()
        expired = remaining is not None and remaining <= 0
        self.code = "DEADLINE_EXCEEDED" if expired else "CANCELLED"

    def finished(self) -> None:
        observer = self._handlers._observer
        if observer is None:
            return
        try:
            observer.rpc_finished(self.method, self.code, time.perf_counter() - self._started)
        except Exception:
            log.exception("rpc observer failed")


def status_of(exc: BaseException, method: str) -> tuple[grpc.StatusCode, str]:
    """The status a call answers for `exc` (the status table), logging as the sync
    interceptor did: refusals at INFO, anything unexpected with its traceback at ERROR."""
    if isinstance(exc, _Aborted):
        return exc.code, exc.details
    if isinstance(exc, KeybrokerError):
        code = status_for(exc)
        log.info("call refused", extra={"method": method, "code": code.name})
        return code, exc.message
    log.error("unexpected error", exc_info=exc, extra={"method": method})
    return grpc.StatusCode.INTERNAL, f"internal error; quote request id {request_id_var.get()}"


class _Collector:
    """Stands in for a server while a generated `add_*Servicer_to_server` registers a
    servicer: keeps its method table, and any generic handler that comes without one."""

    def __init__(self) -> None:
        self.registered: dict[str, dict[str, grpc.RpcMethodHandler]] = {}
        self._generic: list[grpc.GenericRpcHandler] = []

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        self.registered.setdefault(service, {}).update(handlers)

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._generic.extend(handlers)

    @property
    def generic(self) -> list[grpc.GenericRpcHandler]:
        """The generic handlers whose service has no method table (generated code registers
        both; its table is used)."""
        return [
            g
            for g in self._generic
            if not (isinstance(g, grpc.ServiceRpcHandler) and g.service_name() in self.registered)
        ]


class _LazyWrapped(grpc.GenericRpcHandler):
    """A generic handler whose method handlers are wrapped when first looked up."""

    def __init__(
        self,
        inner: grpc.GenericRpcHandler,
        wrap: Callable[[str, grpc.RpcMethodHandler], grpc.RpcMethodHandler],
    ) -> None:
        self._inner = inner
        self._wrap = wrap

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = self._inner.service(handler_call_details)
        if handler is None:
            return None
        return self._wrap(handler_call_details.method, handler)
