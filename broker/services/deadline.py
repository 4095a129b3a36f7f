"""The caller's deadline as the services see it: a call past it stops before more work.

gRPC does not stop a handler when its caller's deadline passes: the handler runs on, uses
the HSM, and its answer is thrown away. The transport therefore hands each call's "time
remaining" to the services (`bounded_by`), and they check it where stopping is cheap and
meaningful: when the call starts, right before a key is used in the HSM, and right after
(so the answer that nobody will read is not produced). A call stopped that way raises
`DeadlineExceeded` inside its audit scope, so its event is written like any other, and its
reason says whether the key was used.

The services never read a clock for this: the transport's function (the gRPC context's
`time_remaining`) answers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from broker.errors import DeadlineExceeded

#: Seconds left before the caller's deadline (0 or less once passed), None for no deadline.
Remaining = Callable[[], float | None]

_remaining: ContextVar[Remaining | None] = ContextVar("deadline_remaining", default=None)

#: The audit reasons: each says whether a key was used.
NOT_STARTED = "the caller's deadline had passed when the call started; no key was used"
BEFORE_KEY_USE = "the caller's deadline passed before the key was used; no key was used"
AFTER_KEY_USE = "the caller's deadline passed after the key was used; nothing was returned"


def bind(remaining: Remaining | None) -> None:
    """Sets this call's deadline for the rest of the current context (an asyncio task, or
    a copy of it run on an executor thread)."""
    _remaining.set(remaining)


@contextmanager
def bounded_by(remaining: Remaining | None) -> Iterator[None]:
    """The block runs under the deadline `remaining` answers for (None for none)."""
    token = _remaining.set(remaining)
    try:
        yield
    finally:
        _remaining.reset(token)


def passed() -> bool:
    """True once the current call's deadline has passed (False when it has none)."""
    remaining = _remaining.get()
    if remaining is None:
        return False
    left = remaining()
    return left is not None and left <= 0


def check(reason: str) -> None:
    """Stops the call when its deadline has passed.

    Raises:
        DeadlineExceeded: with `reason` (one of the reasons above) as its message.
    """
    if passed():
        raise DeadlineExceeded(reason)
