"""The one table from domain errors to gRPC status codes (DESIGN.md, "Status codes")."""

from __future__ import annotations

import grpc

from broker import errors

#: Most specific first: the first class an error is an instance of decides its code.
STATUS_TABLE: tuple[tuple[type[errors.KeybrokerError], grpc.StatusCode], ...] = (
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.Unimplemented, grpc.StatusCode.UNIMPLEMENTED),
    (errors.ConcurrentModification, grpc.StatusCode.ABORTED),
    # An HSM object the metadata names is gone: the HSM is not what it should be.
    (errors.HsmObjectMissing, grpc.StatusCode.UNAVAILABLE),
)


def status_for(exc: errors.KeybrokerError) -> grpc.StatusCode:
    for cls, code in STATUS_TABLE:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL
