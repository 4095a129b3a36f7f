"""Domain exceptions.

Each class names the situation, not the transport: `transport/status.py` holds the one table
that maps them to gRPC status codes. Messages say what was wrong and what to do; they never
carry a secret (key bytes, plaintext, tokens, PINs) nor an oracle detail.
"""

from __future__ import annotations


class KeybrokerError(Exception):
    """Base class of every error the broker reports to a caller.

    Args:
        message: what the caller is told.
        audit_reason: what the audit trail records instead, when it may say more than the
            caller may learn (auditors may read what a service may not: that a key it has no
            grant on does not exist, for example); empty: the message.
    """

    def __init__(self, message: str, *, audit_reason: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.audit_reason = audit_reason or message


class InvalidArgument(KeybrokerError):
    """Malformed or oversize request, bad key id or context, undecryptable blob."""


class DecryptionFailed(InvalidArgument):
    """A blob did not authenticate. One message for every cause, so there is no oracle."""

    def __init__(self) -> None:
        super().__init__("ciphertext or context does not match")


class Unauthenticated(KeybrokerError):
    """No client certificate, or a bad, expired, revoked or foreign-bound token."""


class PermissionDenied(KeybrokerError):
    """Role, grant, scope, context or jurisdiction does not allow the call."""


class NotFound(KeybrokerError):
    """Unknown key or key version."""


class AlreadyExists(KeybrokerError):
    """The key id is taken."""


class FailedPrecondition(KeybrokerError):
    """The key is disabled, pending destruction or destroyed, or the version is too old."""


class ResourceExhausted(KeybrokerError):
    """A rate limit or token use limit is reached."""


class Unavailable(KeybrokerError):
    """A dependency the call needs is unreachable; the call failed closed."""


class HsmUnavailable(Unavailable):
    """The HSM could not be reached or failed; nothing secret was returned."""


class HsmPinRefused(HsmUnavailable):
    """The HSM refused the configured PIN. Never retried: a real HSM may lock the PIN after a
    few wrong attempts."""


class AuditUnavailable(Unavailable):
    """The audit record could not be made durable; nothing secret was returned."""


class StoreUnavailable(Unavailable):
    """The metadata store could not be reached."""


class DeadlineExceeded(KeybrokerError):
    """The caller's deadline passed while the call was under way; it stopped there. The
    message says whether a key was used (`services.deadline`)."""


class Unimplemented(KeybrokerError):
    """The RPC is declared but not served by this version."""


class ConcurrentModification(KeybrokerError):
    """A compare-and-set update lost a race; the caller re-reads and retries."""


class HsmObjectMissing(KeybrokerError):
    """An HSM object the metadata names is not on the token."""
