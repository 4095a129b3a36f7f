"""The event loop the grpc.aio server runs on, in a thread of its own, so callers stay sync.

`create_server` and `RunningServer.stop` are called from ordinary threads (the CLI, the tests,
the health monitor); they hand coroutines to this loop and wait for them.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class LoopThread:
    """An asyncio event loop running forever in a daemon thread until `close`.

    Args:
        name: the thread's name (in logs and profiles).
    """

    def __init__(self, name: str = "grpc-aio") -> None:
        self.loop = asyncio.new_event_loop()
        #: Set once `close` began: nothing new should be handed to the loop.
        self.closing = False
        self._started = threading.Event()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()
        self._started.wait()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._started.set)
        try:
            self.loop.run_forever()
        finally:
            self.loop.close()

    def in_loop_thread(self) -> bool:
        return threading.current_thread() is self.thread

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Runs `coro` on the loop and waits for its result (from any thread but the loop's)."""
        if self.in_loop_thread():
            coro.close()
            raise RuntimeError("LoopThread.run called from its own loop: it would deadlock")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T] | asyncio.Task[T]:
        """Starts `coro` on the loop without waiting (safe from the loop's own thread too)."""
        if self.in_loop_thread():
            return self.loop.create_task(coro)
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self) -> None:
        """Stops the loop (whatever still runs on it is abandoned) and joins the thread."""
        if self.closing:
            return
        self.closing = True
        self.loop.call_soon_threadsafe(self.loop.stop)
        if not self.in_loop_thread():
            self.thread.join()
