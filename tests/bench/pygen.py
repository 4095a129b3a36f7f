"""A gRPC load generator process in Python: mTLS, pre-serialised request bytes, N in flight.

    python -m tests.bench.pygen MODE TARGET CA CERT KEY METHOD PAYLOAD_HEX INFLIGHT CHANNELS

MODE is `threads` (blocking calls, one thread per call in flight) or `aio` (grpc.aio, one
task per call in flight); calls spread over CHANNELS channels, each its own connection (a local
subchannel pool: SO_REUSEPORT spreads connections, not calls, over a server's processes),
through `channel.unary_unary(method)` with no serialiser, so the process only moves bytes. Several of these processes make candidate (a) of
the generator comparison (see `gen.py`, which also defines the protocol: warm up, print
"ready", read "T0 T1" in CLOCK_MONOTONIC nanoseconds from stdin, record every call that
completes inside the window, stop issuing at T1, drain, print one JSON line).
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

NEVER = 2**63
DEADLINE_S = 30.0
#: Each channel its own connection (channels to one target share one by default).
OPTIONS = [("grpc.use_local_subchannel_pool", 1)]


@dataclass
class Tally:
    """What one process saw; shared by its threads or tasks."""

    inflight: int
    t0: int = NEVER
    t1: int = NEVER
    ok: int = 0
    errors: int = 0
    warm: int = 0
    error: str = ""
    lat_us: list[int] = field(default_factory=list)
    ready: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, start: int, end: int, failure: str = "") -> bool:
        """Counts one completed call (`failure` says why it failed, if it did).

        Returns:
            False once the window is over: stop issuing.
        """
        with self.lock:
            if self.t0 <= end <= self.t1:
                if not failure:
                    self.ok += 1
                    self.lat_us.append((end - start) // 1000)
                else:
                    self.errors += 1
            elif not self.ready.is_set():
                self.warm += 1
                if self.warm >= max(20, 2 * self.inflight):
                    self.ready.set()
            if failure and not self.error:
                self.error = failure
        return end < self.t1

    def set_window(self, line: str) -> None:
        a, b = (int(x) for x in line.split())
        self.t1, self.t0 = b, a  # t1 first: a caller that sees t0 set sees t1 too

    def result(self) -> str:
        return json.dumps(
            {"ok": self.ok, "errors": self.errors, "error": self.error, "lat_us": self.lat_us}
        )


def _credentials(ca: str, cert: str, key: str) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        Path(ca).read_bytes(), Path(key).read_bytes(), Path(cert).read_bytes()
    )


def run_threads(
    target: str,
    creds: grpc.ChannelCredentials,
    method: str,
    payload: bytes,
    tally: Tally,
    channels: int,
) -> None:
    opened = [grpc.secure_channel(target, creds, options=OPTIONS) for _ in range(channels)]
    calls = [ch.unary_unary(method) for ch in opened]  # no serialisers: bytes in, bytes out

    def loop(call: grpc.UnaryUnaryMultiCallable) -> None:
        going = True
        while going:
            start = time.monotonic_ns()
            failure = ""
            try:
                call(payload, timeout=DEADLINE_S)
            except grpc.RpcError as exc:
                failure = f"{exc.code().name}: {exc.details()}"
            going = tally.record(start, time.monotonic_ns(), failure)

    threads = [
        threading.Thread(target=loop, args=(calls[i % channels],), daemon=True)
        for i in range(tally.inflight)
    ]
    for t in threads:
        t.start()
    tally.ready.wait()
    print("ready", flush=True)
    tally.set_window(sys.stdin.readline())
    for t in threads:
        t.join()
    for ch in opened:
        ch.close()


async def run_aio(
    target: str,
    creds: grpc.ChannelCredentials,
    method: str,
    payload: bytes,
    tally: Tally,
    channels: int,
) -> None:
    opened = [grpc.aio.secure_channel(target, creds, options=OPTIONS) for _ in range(channels)]
    calls = [ch.unary_unary(method) for ch in opened]
    try:

        async def loop(call: grpc.aio.UnaryUnaryMultiCallable) -> None:
            going = True
            while going:
                start = time.monotonic_ns()
                failure = ""
                try:
                    await call(payload, timeout=DEADLINE_S)
                except grpc.aio.AioRpcError as exc:
                    failure = f"{exc.code().name}: {exc.details()}"
                going = tally.record(start, time.monotonic_ns(), failure)

        tasks = [asyncio.create_task(loop(calls[i % channels])) for i in range(tally.inflight)]
        loop_ = asyncio.get_running_loop()
        await loop_.run_in_executor(None, tally.ready.wait)
        print("ready", flush=True)
        tally.set_window(await loop_.run_in_executor(None, sys.stdin.readline))
        await asyncio.gather(*tasks)
    finally:
        for ch in opened:
            await ch.close()


def main(argv: list[str]) -> int:
    mode, target, ca, cert, key, method, payload_hex, inflight, channels = argv
    tally = Tally(int(inflight))
    creds = _credentials(ca, cert, key)
    # "@PATH": the raw request bytes in a file (a batch request is too long for argv).
    payload = (
        Path(payload_hex[1:]).read_bytes()
        if payload_hex.startswith("@")
        else bytes.fromhex(payload_hex)
    )
    if mode == "threads":
        run_threads(target, creds, method, payload, tally, max(1, int(channels)))
    elif mode == "aio":
        asyncio.run(run_aio(target, creds, method, payload, tally, max(1, int(channels))))
    else:
        print(f"unknown mode {mode}", file=sys.stderr)
        return 2
    print(tally.result(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
