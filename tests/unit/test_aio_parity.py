"""The asyncio client keeps up with the blocking one: every public method of
`KeybrokerClient` has a counterpart on `AsyncKeybrokerClient`, awaitable (or an async
iterator where the blocking one yields), taking the same arguments."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from keybroker_client import KeybrokerClient
from keybroker_client.aio import AsyncKeybrokerClient

#: Public methods of the blocking client that the asyncio client deliberately lacks, and why.
#: Empty: there is none today. Add one only with its reason.
SYNC_ONLY: dict[str, str] = {}
#: Methods that are plain (not awaitable) in both: they do no I/O.
PLAIN_IN_BOTH = {"from_settings"}


def _public_methods(cls: type) -> dict[str, Callable[..., Any]]:
    return {
        name: getattr(cls, name)
        for name in dir(cls)
        if not name.startswith("_") and callable(getattr(cls, name))
    }


def _parameters(method: Callable[..., Any]) -> list[tuple[str, object, object]]:
    """Name, kind and default of each parameter (annotations differ: Iterator and
    AsyncIterator, for example)."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(method).parameters.values()]


def test_every_public_method_of_the_blocking_client_has_an_async_counterpart() -> None:
    blocking = _public_methods(KeybrokerClient)
    asynchronous = _public_methods(AsyncKeybrokerClient)
    missing = sorted(set(blocking) - set(asynchronous) - set(SYNC_ONLY))
    assert not missing, f"AsyncKeybrokerClient lacks {missing}: add them (or to SYNC_ONLY)"
    stale = sorted(set(SYNC_ONLY) & set(asynchronous))
    assert not stale, f"{stale} exist on AsyncKeybrokerClient now: drop them from SYNC_ONLY"


def test_counterparts_are_awaitable_and_take_the_same_arguments() -> None:
    asynchronous = _public_methods(AsyncKeybrokerClient)
    for name, method in _public_methods(KeybrokerClient).items():
        if name in SYNC_ONLY:
            continue
        counterpart = asynchronous[name]
        if name in PLAIN_IN_BOTH:
            assert not inspect.iscoroutinefunction(counterpart), name
        elif inspect.isgeneratorfunction(method):
            assert inspect.isasyncgenfunction(counterpart), f"{name} must be an async iterator"
        else:
            assert inspect.iscoroutinefunction(counterpart), f"{name} must be a coroutine"
        assert _parameters(counterpart) == _parameters(method), name


def test_the_asyncio_client_has_no_method_the_blocking_one_lacks() -> None:
    extra = set(_public_methods(AsyncKeybrokerClient)) - set(_public_methods(KeybrokerClient))
    assert not extra, f"KeybrokerClient lacks {sorted(extra)}"
