"""Client SDK and CLI for the keybroker key broker.

The SDK talks to the broker over mutual TLS only. Start with :func:`resolve_settings` and
:class:`KeybrokerClient`; errors are the flat classes in :mod:`keybroker_client.errors`.

The names below are loaded on first use, so that ``keybroker_client.cli`` can configure gRPC's
logging before ``grpc`` is imported.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from keybroker_client.client import (
        DEFAULT_TIMEOUT,
        DataKey,
        Decrypted,
        Encrypted,
        IssuedToken,
        KeybrokerClient,
        cert_thumbprint,
    )
    from keybroker_client.config import ClientSettings, resolve_settings
    from keybroker_client.errors import (
        AlreadyExists,
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
    from keybroker_client.parsing import (
        format_duration,
        parse_context,
        parse_duration,
        parse_grant,
        policy_from_grants,
    )

_EXPORTS = {
    "keybroker_client.client": (
        "DEFAULT_TIMEOUT",
        "DataKey",
        "Decrypted",
        "Encrypted",
        "IssuedToken",
        "KeybrokerClient",
        "cert_thumbprint",
    ),
    "keybroker_client.config": ("ClientSettings", "resolve_settings"),
    "keybroker_client.errors": (
        "AlreadyExists",
        "ConfigError",
        "DeadlineExceeded",
        "FailedPrecondition",
        "InvalidArgument",
        "KeybrokerError",
        "NotFound",
        "PermissionDenied",
        "ResourceExhausted",
        "Unauthenticated",
        "Unavailable",
        "UnexpectedError",
    ),
    "keybroker_client.parsing": (
        "format_duration",
        "parse_context",
        "parse_duration",
        "parse_grant",
        "policy_from_grants",
    ),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = [
    "DEFAULT_TIMEOUT",
    "AlreadyExists",
    "ClientSettings",
    "ConfigError",
    "DataKey",
    "DeadlineExceeded",
    "Decrypted",
    "Encrypted",
    "FailedPrecondition",
    "InvalidArgument",
    "IssuedToken",
    "KeybrokerClient",
    "KeybrokerError",
    "NotFound",
    "PermissionDenied",
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


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'keybroker_client' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_MODULE_OF))
