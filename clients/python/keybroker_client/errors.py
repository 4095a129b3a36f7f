"""Errors raised by the keybroker client.

Every failed call raises one subclass of :class:`KeybrokerError`, chosen by the gRPC status
code the broker returned. The hierarchy is flat on purpose: catch the one class you can act on,
or :class:`KeybrokerError` for all of them. The broker's message is kept as is; it never carries
a secret (the broker promises that), so it is safe to log.
"""

from __future__ import annotations

import grpc

from keybroker_client.types import ApprovalRequest, Key


class KeybrokerError(Exception):
    """Base class of every error the client raises.

    Attributes:
        code_name: the gRPC status code name, for example ``"PERMISSION_DENIED"``, or
            ``"CONFIG"`` for a local configuration problem.
        message: what went wrong and, where the broker says so, what to do.
        request_id: the ``x-request-id`` sent with the failed call (empty if no call was made);
            the broker records it in the audit event of that call.
    """

    code_name: str = "UNKNOWN"

    def __init__(self, code_name: str, message: str, *, request_id: str = "") -> None:
        super().__init__(code_name, message)
        self.code_name = code_name
        self.message = message
        self.request_id = request_id

    def __str__(self) -> str:
        return f"{self.code_name}: {self.message}"


class ConfigError(KeybrokerError):
    """The client cannot be set up: a certificate, key or CA file is missing or unreadable."""

    code_name = "CONFIG"

    def __init__(self, message: str) -> None:
        super().__init__("CONFIG", message)


class InvalidArgument(KeybrokerError):
    """Malformed or oversize request, bad key id, bad context, or an undecryptable blob."""


class Unauthenticated(KeybrokerError):
    """No client certificate, or a bad, expired, revoked or foreign-bound token."""


class PermissionDenied(KeybrokerError):
    """The role, grant, scope, context or jurisdiction does not allow the call."""


class NotFound(KeybrokerError):
    """Unknown key or key version."""


class AlreadyExists(KeybrokerError):
    """A key with that id exists."""


class FailedPrecondition(KeybrokerError):
    """The key is disabled, pending destruction or destroyed, or the version is too old."""


class ResourceExhausted(KeybrokerError):
    """A token use limit or a rate limit was reached."""


class Unavailable(KeybrokerError):
    """The broker cannot be reached, or its HSM or audit store cannot (it fails closed)."""


class DeadlineExceeded(KeybrokerError):
    """The broker did not answer within the call's timeout."""


class UnexpectedError(KeybrokerError):
    """Any other status (INTERNAL, UNIMPLEMENTED, UNKNOWN, ...)."""


class ApprovalPending(KeybrokerError):
    """The broker took the change but has not applied it: it waits for the approval of other
    admins (the broker's ``approvals.required``). Raised by the calls of the changes that may
    need approval, so that no caller mistakes the key it sees for the key changed.

    Attributes:
        request: the pending :class:`~keybroker_client.types.ApprovalRequest`; other admins
            approve it with ``approve_request(request.request_id)``.
        key: the key as it stands, unchanged.
    """

    code_name = "APPROVAL_PENDING"

    def __init__(self, request: ApprovalRequest, key: Key, *, request_id: str = "") -> None:
        super().__init__(
            "APPROVAL_PENDING",
            f"{request.operation.value} of key {request.key_id!r} waits for approval: request "
            f"{request.request_id}, {len(request.approvals)} of {request.required_approvals} "
            "approvals; another admin approves it with approve_request "
            f"(keybroker approvals approve {request.request_id})",
            request_id=request_id,
        )
        self.request = request
        self.key = key


_BY_CODE: dict[grpc.StatusCode, type[KeybrokerError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
}


def error_from_rpc(exc: grpc.RpcError, *, request_id: str = "") -> KeybrokerError:
    """Translates a failed gRPC call into the matching :class:`KeybrokerError` subclass.

    Args:
        exc: the error raised by a grpc stub call (it is also a ``grpc.Call``).
        request_id: the request id that was sent with the call.

    Returns:
        The error to raise, for example ``NotFound("NOT_FOUND", "key 'x' does not exist")``.
    """
    code_fn = getattr(exc, "code", None)
    details_fn = getattr(exc, "details", None)
    code = code_fn() if callable(code_fn) else None
    details = details_fn() if callable(details_fn) else None
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    cls = _BY_CODE.get(code, UnexpectedError)
    return cls(code.name, details or code.name.lower().replace("_", " "), request_id=request_id)
