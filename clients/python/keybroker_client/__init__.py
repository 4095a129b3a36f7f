"""Client SDK and CLI for the keybroker key broker.

The SDK talks to the broker over mutual TLS only. Start with :func:`resolve_settings` and
:class:`KeybrokerClient`. It takes and returns the plain values of :mod:`keybroker_client.types`
(frozen dataclasses and enums, never protobuf messages); errors are the flat classes in
:mod:`keybroker_client.errors`. Whole files go through the recipes ``encrypt_file`` and
``decrypt_file`` (format: :mod:`keybroker_client.fileformat`); :mod:`keybroker_client.aio` has
the asyncio client. The ``keybroker`` command line is :mod:`keybroker_client.cli`.
"""

from __future__ import annotations

from keybroker_client.certs import cert_thumbprint
from keybroker_client.client import DEFAULT_TIMEOUT, KeybrokerClient
from keybroker_client.config import ClientSettings, resolve_settings
from keybroker_client.errors import (
    AlreadyExists,
    ApprovalPending,
    ConfigError,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    KeybrokerError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    UnexpectedError,
)
from keybroker_client.fileformat import DEFAULT_CHUNK_SIZE, InvalidFile
from keybroker_client.parsing import (
    format_duration,
    parse_context,
    parse_duration,
    parse_grant,
    policy_from_grants,
)
from keybroker_client.recipes import FileInfo
from keybroker_client.types import (
    ApprovalRequest,
    ApprovalState,
    AuditEvent,
    AuditReport,
    DataKey,
    Decrypted,
    DecryptResult,
    Encrypted,
    Grant,
    HsmInfo,
    IssuedToken,
    Key,
    KeyPage,
    KeyPolicy,
    KeyState,
    KeyVersion,
    Operation,
    Outcome,
    ReWrapResult,
)

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_TIMEOUT",
    "AlreadyExists",
    "ApprovalPending",
    "ApprovalRequest",
    "ApprovalState",
    "AuditEvent",
    "AuditReport",
    "ClientSettings",
    "ConfigError",
    "DataKey",
    "DeadlineExceeded",
    "DecryptResult",
    "Decrypted",
    "Encrypted",
    "FailedPrecondition",
    "FileInfo",
    "Grant",
    "HsmInfo",
    "InvalidArgument",
    "InvalidFile",
    "IssuedToken",
    "Key",
    "KeyPage",
    "KeyPolicy",
    "KeyState",
    "KeyVersion",
    "KeybrokerClient",
    "KeybrokerError",
    "NotFound",
    "Operation",
    "Outcome",
    "PermissionDenied",
    "ReWrapResult",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "UnexpectedError",
    "cert_thumbprint",
    "format_duration",
    "parse_context",
    "parse_duration",
    "parse_grant",
    "policy_from_grants",
    "resolve_settings",
]
