"""One interceptor: request ids, request decoding, and domain errors -> status codes."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from broker.errors import InvalidArgument, KeybrokerError
from broker.transport.auth import request_id_from, request_id_var
from broker.transport.status import status_for

log = logging.getLogger(__name__)

_EXEMPT_PREFIXES = ("/grpc.health.", "/grpc.reflection.")


def _abort_for(exc: BaseException, context: grpc.ServicerContext, method: str) -> None:
    if isinstance(exc, KeybrokerError):
        code = status_for(exc)
        log.info("call refused", extra={"method": method, "code": code.name})
        context.abort(code, exc.message)
    log.error("unexpected error", exc_info=exc, extra={"method": method})
    context.abort(
        grpc.StatusCode.INTERNAL, f"internal error; quote request id {request_id_var.get()}"
    )


class ErrorInterceptor(grpc.ServerInterceptor):
    """Wraps every keybroker handler.

    - sets the request id (client's `x-request-id` or a fresh one) for logs and audit;
    - decodes the request itself, so an undecodable message (invalid UTF-8 in a string,
      a truncated field) is INVALID_ARGUMENT rather than gRPC's INTERNAL;
    - maps domain errors through the status table, and anything else to a generic
      INTERNAL whose traceback is logged and never sent.
    """

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(_EXEMPT_PREFIXES):
            return handler
        request_id = request_id_from(handler_call_details.invocation_metadata)  # type: ignore[arg-type]
        decode = handler.request_deserializer

        def prepare(raw: bytes, context: grpc.ServicerContext) -> Any:
            request_id_var.set(request_id)
            context.set_trailing_metadata((("x-request-id", request_id),))
            try:
                return decode(raw) if decode else raw
            except DecodeError:
                context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "the request could not be decoded (malformed message or invalid UTF-8)",
                )

        if handler.unary_unary is not None:
            behavior = handler.unary_unary

            def unary(raw: bytes, context: grpc.ServicerContext) -> Any:
                request = prepare(raw, context)
                try:
                    return behavior(request, context)
                except Exception as exc:  # noqa: BLE001 - the one place that maps all errors
                    _abort_for(exc, context, method)

            return handler._replace(unary_unary=unary, request_deserializer=None)  # type: ignore[attr-defined]
        if handler.unary_stream is not None:
            stream_behavior = handler.unary_stream

            def stream(raw: bytes, context: grpc.ServicerContext) -> Iterator[Any]:
                request = prepare(raw, context)
                try:
                    yield from stream_behavior(request, context)
                except Exception as exc:  # noqa: BLE001 - the one place that maps all errors
                    _abort_for(exc, context, method)

            return handler._replace(unary_stream=stream, request_deserializer=None)  # type: ignore[attr-defined]
        if handler.stream_stream is not None:
            bidi_behavior = handler.stream_stream

            def bidi(raw_requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[Any]:
                request_id_var.set(request_id)
                context.set_trailing_metadata((("x-request-id", request_id),))
                requests = (decode_one(raw, context) for raw in raw_requests)
                try:
                    yield from bidi_behavior(requests, context)
                except Exception as exc:  # noqa: BLE001 - the one place that maps all errors
                    _abort_for(exc, context, method)

            def decode_one(raw: bytes, context: grpc.ServicerContext) -> Any:
                # Decoded while the handler runs: an error becomes a domain error that the
                # handler's own mapping turns into INVALID_ARGUMENT.
                try:
                    return decode(raw) if decode else raw
                except DecodeError:
                    raise InvalidArgument(
                        "a request message could not be decoded (malformed or invalid UTF-8)"
                    ) from None

            return handler._replace(stream_stream=bidi, request_deserializer=None)  # type: ignore[attr-defined]
        return handler
