"""`--workers N`: N broker processes sharing one listening port.

PyKCS11 holds the GIL for every PKCS#11 call, so one process uses one core at best; the broker
scales across cores with processes. Neither PKCS#11 nor gRPC core survives a fork, so the
parent never opens either: it prepares the home in a short-lived child (on a first start: the
SoftHSM2 token, the development PKI, the database and the signing keys, so that workers never
race to create them), reserves the port, then forks the workers. Each worker builds the whole
broker after the fork (its own PKCS#11 sessions, database connections, audit chain and gRPC
server) and binds the port with SO_REUSEPORT; the kernel spreads new connections over them.
Each worker also keeps its own metrics and serves them on a port of its own (`metrics.listen`'s
port plus the worker's index, see `worker_settings`), so no state is shared between processes.

The parent reports ready once every worker is, forwards SIGTERM and SIGINT to the workers (each
drains its calls in flight and exits), and restarts a worker that dies unexpectedly, unless
workers keep dying, then it stops them all and exits non-zero.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from broker.config import Settings

log = logging.getLogger(__name__)

#: A worker that exits this many times within `RESTART_WINDOW` seconds stops the broker.
MAX_RESTARTS = 5
RESTART_WINDOW = 60.0
#: How long the parent waits for every worker to report ready.
READY_TIMEOUT = 120.0

#: serve(settings, reuse_port, on_ready) -> exit code: runs one broker process until SIGTERM.
Serve = Callable[[Settings, bool, Callable[[int], None]], int]
#: prepare(settings) -> exit code: builds and closes the broker once (first-start set-up).
Prepare = Callable[[Settings], int]


@dataclass(slots=True)
class _Worker:
    index: int
    pid: int
    ready_fd: int


def reserve_port(listen: str) -> tuple[socket.socket, str]:
    """Binds (without listening) a SO_REUSEPORT socket on `listen` to fix its port.

    Workers bind the same port with SO_REUSEPORT; only listening sockets receive connections,
    so the parent's socket just keeps the port while workers come and go.

    Returns:
        The socket (keep it open) and HOST:PORT with the actual port.

    Raises:
        OSError: the address cannot be bound.
    """
    host, _, port = listen.rpartition(":")
    bare = host.strip("[]")
    family = socket.AF_INET6 if ":" in bare else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((bare, int(port)))
    except OSError:
        sock.close()
        raise
    return sock, f"{host}:{sock.getsockname()[1]}"


def run_workers(
    settings: Settings, prepare: Prepare, serve: Serve, on_ready: Callable[[int], None]
) -> int:
    """Runs `settings.workers` broker processes until SIGTERM or SIGINT; returns the exit code.

    Args:
        settings: validated settings.
        prepare: first-start set-up, run in a child that exits afterwards.
        serve: one worker's life, run in each forked child.
        on_ready: called in the parent with the port once every worker serves.
    """
    code = _in_child(lambda: prepare(settings))
    if code != 0:
        return code
    try:
        reserved, listen = reserve_port(settings.listen)
    except OSError as exc:
        log.error("cannot listen on %s: %s", settings.listen, exc)
        return 2
    worker_settings = replace(settings, listen=listen)
    port = int(listen.rpartition(":")[2])
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        if not stopping:
            log.info("signal %s: draining %d workers", signal.Signals(signum).name, len(workers))
        stopping = True

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    workers: dict[int, _Worker] = {}
    try:
        for index in range(settings.workers):
            worker = _spawn(index, worker_settings, serve)
            workers[worker.pid] = worker
        if not _await_ready(list(workers.values()), lambda: stopping):
            _stop_all(workers, settings.grace_seconds)
            return 2
        on_ready(port)
        return _supervise(workers, worker_settings, serve, lambda: stopping)
    finally:
        _stop_all(workers, settings.grace_seconds)
        for s, handler in previous.items():
            signal.signal(s, handler)
        reserved.close()


def worker_settings(settings: Settings, index: int) -> Settings:
    """Worker `index`'s settings: no token set-up, and its metrics on `metrics.listen`'s port
    plus `index`.

    One port per worker rather than one merged endpoint: each worker's registry stays in its
    own process (custom collectors read live objects, which a shared multiprocess store
    cannot), a restarted worker comes back on the same port, and Prometheus scrapes each port
    as a target of its own. Port 0 (which the settings refuse with several workers) stays 0.
    """
    # The set-up child made the development tokens; a worker only opens them (a worker that
    # missed its token while a sibling rewrote the files must never make a new one).
    settings = replace(settings, hsms=tuple(replace(h, softhsm_init=False) for h in settings.hsms))
    if not settings.metrics_listen:
        return settings
    host, _, port = settings.metrics_listen.rpartition(":")
    if int(port) == 0:
        return settings
    return replace(settings, metrics_listen=f"{host}:{int(port) + index}")


def _in_child(body: Callable[[], int]) -> int:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            code = body()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _spawn(index: int, settings: Settings, serve: Serve) -> _Worker:
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        os.close(read_fd)
        code = 1
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)

            def ready(_port: int) -> None:
                os.write(write_fd, b"R")

            code = serve(worker_settings(settings, index), True, ready)
        finally:
            os._exit(code)
    os.close(write_fd)
    log.info("worker %d started", index, extra={"worker": index, "pid": pid})
    return _Worker(index, pid, read_fd)


def _await_ready(workers: list[_Worker], stopping: Callable[[], bool]) -> bool:
    pending = {w.ready_fd: w for w in workers}
    deadline = time.monotonic() + READY_TIMEOUT
    while pending:
        if stopping() or time.monotonic() > deadline:
            return False
        readable, _, _ = select.select(list(pending), [], [], 0.2)
        for fd in readable:
            worker = pending.pop(fd)
            if os.read(fd, 1) != b"R":
                log.error("worker %d exited before serving", worker.index)
                return False
    return True


def _supervise(
    workers: dict[int, _Worker], settings: Settings, serve: Serve, stopping: Callable[[], bool]
) -> int:
    exits: list[float] = []
    while not stopping():
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return 1
        if pid == 0:
            time.sleep(0.2)
            continue
        worker = workers.pop(pid, None)
        if worker is None:
            continue
        os.close(worker.ready_fd)
        log.error(
            "worker %d exited unexpectedly (%s); restarting it",
            worker.index,
            _describe(status),
            extra={"worker": worker.index, "pid": pid},
        )
        now = time.monotonic()
        exits = [t for t in exits if now - t < RESTART_WINDOW] + [now]
        if len(exits) > MAX_RESTARTS:
            log.error("workers keep exiting: stopping the broker")
            return 1
        replacement = _spawn(worker.index, settings, serve)
        workers[replacement.pid] = replacement
    return 0


def _stop_all(workers: dict[int, _Worker], grace: float) -> None:
    for pid in workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace + 10
    while workers and time.monotonic() < deadline:
        for pid in list(workers):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                worker = workers.pop(pid)
                os.close(worker.ready_fd)
                if os.waitstatus_to_exitcode(status) != 0:
                    log.warning("worker %d stopped with %s", worker.index, _describe(status))
        time.sleep(0.05)
    for pid, worker in list(workers.items()):
        log.error("worker %d did not stop in time; killing it", worker.index)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(worker.ready_fd)
        del workers[pid]


def _describe(status: int) -> str:
    code = os.waitstatus_to_exitcode(status)
    return f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
