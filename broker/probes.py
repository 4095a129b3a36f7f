"""Health probes that answer within a bound, even when the dependency hangs.

A probe of an HSM is a PKCS#11 call; a hung HSM (a network HSM that stopped answering, a
device stuck in a call) hangs the probe with it. Run inline, it would stall the health
monitor's round, and health would stay SERVING for as long as the hang lasts: exactly the
moment a load balancer needs to hear NOT_SERVING. So each probe runs in a thread of its own
and the monitor waits for it at most `timeout` seconds; past that the probe counts as failed.

A probe still hung at the next round is not started a second time (its thread is waited on
again): a hung dependency costs one thread, not one per round.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from broker.errors import Unavailable

#: Seconds a health probe may take before it counts as failed (an HSM probe is one
#: C_GetTokenInfo on a pooled session; the pool's own lease timeout is 5 s).
PROBE_TIMEOUT = 10.0


class ProbeTimedOut(Unavailable):
    """The probe did not answer within its bound."""


def bounded(
    name: str, probe: Callable[[], None], timeout: float = PROBE_TIMEOUT
) -> Callable[[], None]:
    """`probe`, raising `ProbeTimedOut` when it takes longer than `timeout` seconds (it goes on
    in its thread; the next call waits for that run instead of starting another)."""
    lock = threading.Lock()
    running: list[_Run] = []  # the run in flight, if any

    def call() -> None:
        with lock:
            if not running or running[0].done.is_set():
                running[:] = [_Run(name, probe)]
            run = running[0]
        if not run.done.wait(timeout):
            raise ProbeTimedOut(
                f"{name} did not answer its health probe within {timeout:g}s; it may be hung"
            )
        if run.error is not None:
            raise run.error

    return call


class _Run:
    """One run of a probe in a daemon thread (a hung HSM call must not keep the process up)."""

    def __init__(self, name: str, probe: Callable[[], None]) -> None:
        self.done = threading.Event()
        self.error: Exception | None = None
        self._probe = probe
        threading.Thread(target=self._run, name=f"probe-{name}", daemon=True).start()

    def _run(self) -> None:
        try:
            self._probe()
        except Exception as exc:  # noqa: BLE001 - handed to the caller of the probe
            self.error = exc
        finally:
            self.done.set()
