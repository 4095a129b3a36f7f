"""gRPC load generators and one measured window.

A generator is one or more processes (Python threads or grpc.aio, Node @grpc/grpc-js, or C++
on libgrpc++), each with its own mTLS channel, sending one pre-serialised request over and
over with a fixed number of calls in flight. All speak one protocol on stdin/stdout:

1. connect and keep the calls going (warm-up); print `ready` once enough calls completed;
2. read `T0 T1` (CLOCK_MONOTONIC nanoseconds, the same clock in every process);
3. record every call that completes inside [T0, T1] (its latency, or an error); stop issuing
   at T1, drain, print one JSON line `{"ok", "errors", "error", "lat_us"}`.

The driver reads the server's and the generator's CPU from /proc at T0 and T1, so the window
is the same for the latencies, the count and both CPU figures.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from tests.bench import procs

ROOT = Path(__file__).resolve().parents[2]
NODE_DIR = ROOT / "tests" / "bench" / "node"
CPP_SOURCE = ROOT / "tests" / "bench" / "cpp" / "loadgen.cc"
CPP_BINARY = ROOT / "build" / "bench" / "loadgen-cpp"
READY_TIMEOUT_S = 60.0
#: Connections per generator process, at most: SO_REUSEPORT spreads connections (not calls)
#: over a server's processes, so with 8 connections per process all of them land on the same
#: one of 2 workers with a chance of 1 in 128.
CHANNELS = 8


@dataclass(frozen=True, slots=True)
class Tls:
    """The client identity a generator presents, and the CA it trusts."""

    ca: Path
    cert: Path
    key: Path


@dataclass(frozen=True, slots=True)
class Call:
    """One request as bytes: the gRPC method path (or HTTP path) and the serialised request.

    `token_file` holds the HTTP token of the fallback HTTP generator (never on a command line).
    """

    method: str
    payload: bytes
    tls: Tls | None
    token_file: Path | None = None


def _payload_arg(payload: bytes) -> str:
    """The request bytes for a generator's command line: hex when short, else `@FILE` (a
    batch request does not fit in argv)."""
    if len(payload) <= 4096:
        return payload.hex()
    path = Path(tempfile.gettempdir()) / f"kb-bench-{hashlib.sha256(payload).hexdigest()[:16]}.bin"
    if not path.exists():
        path.write_bytes(payload)
    return f"@{path}"


@dataclass(frozen=True, slots=True)
class Generator:
    """A load generator: `kind` in py-threads, py-aio, node, cpp (gRPC) or py-http (HTTP).

    Up to `procs` processes share the calls in flight.
    """

    kind: str
    procs: int

    @property
    def name(self) -> str:
        return f"{self.kind} x{self.procs}"

    def command(self, target: str, call: Call, inflight: int) -> list[str]:
        if self.kind == "py-http":
            return [
                sys.executable,
                "-m",
                "tests.bench.httpgen",
                target + call.method,
                str(call.token_file),
                call.payload.hex(),
                str(inflight),
            ]
        assert call.tls is not None
        args = [
            target,
            str(call.tls.ca),
            str(call.tls.cert),
            str(call.tls.key),
            call.method,
            _payload_arg(call.payload),
            str(inflight),
            str(min(inflight, CHANNELS)),
        ]
        if self.kind in ("py-threads", "py-aio"):
            mode = self.kind.removeprefix("py-")
            return [sys.executable, "-m", "tests.bench.pygen", mode, *args]
        if self.kind == "node":
            return ["node", str(NODE_DIR / "loadgen.js"), *args]
        if self.kind == "cpp":
            return [str(CPP_BINARY), *args]
        raise ValueError(self.kind)


def node_available() -> str:
    """Empty when the Node generator can run, else why not."""
    if not shutil.which("node"):
        return "node is not installed"
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        return "tests/bench/node has no node_modules (npm ci)"
    return ""


def build_cpp() -> str:
    """Builds the C++ generator if need be; empty when it is there, else why not."""
    if CPP_BINARY.exists() and CPP_BINARY.stat().st_mtime >= CPP_SOURCE.stat().st_mtime:
        return ""
    if not shutil.which("g++") or not shutil.which("pkg-config"):
        return "g++ or pkg-config is missing"
    flags = subprocess.run(
        ["pkg-config", "--cflags", "--libs", "grpc++"], capture_output=True, text=True, check=False
    )
    if flags.returncode != 0:
        return "libgrpc++-dev is not installed"
    CPP_BINARY.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        "g++",
        "-O2",
        "-std=c++17",
        str(CPP_SOURCE),
        *flags.stdout.split(),
        "-o",
        str(CPP_BINARY),
    ]
    built = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    if built.returncode != 0:
        return "the C++ generator did not build: " + built.stderr.strip()[-300:]
    return ""


@dataclass(slots=True)
class Window:
    """One measured window: every call completed inside it, and the CPU spent on both sides."""

    ok: int
    errors: int
    error: str
    seconds: float
    lat_us: list[int] = field(repr=False)
    server_cpu_s: float
    gen_cpu_s: float

    def figures(self) -> dict[str, float]:
        ordered = sorted(self.lat_us)
        done = max(self.ok, 1)
        return {
            "rps": self.ok / self.seconds,
            "p50_ms": percentile(ordered, 50) / 1000,
            "p99_ms": percentile(ordered, 99) / 1000,
            "server_cpu_ms": self.server_cpu_s / done * 1000,
            "gen_cpu_ms": self.gen_cpu_s / done * 1000,
            "calls": self.ok,
            "errors": self.errors,
        }


def percentile(ordered: list[int] | list[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list (0 for an empty one)."""
    if not ordered:
        return 0.0
    rank = max(1, -(-len(ordered) * p // 100))  # ceil(n * p / 100)
    return float(ordered[int(rank) - 1])


def _pump(proc: subprocess.Popen[str], lines: queue.Queue[str]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.put(line.strip())
    lines.put("")  # EOF


def _next_line(lines: queue.Queue[str], timeout: float, who: str) -> str:
    try:
        line = lines.get(timeout=timeout)
    except queue.Empty:
        raise RuntimeError(f"{who}: no answer within {timeout:.0f} s") from None
    if not line:
        raise RuntimeError(f"{who}: exited early")
    return line


def _sleep_until(deadline_ns: int) -> None:
    delay = (deadline_ns - time.monotonic_ns()) / 1e9
    if delay > 0:
        time.sleep(delay)


@dataclass(slots=True)
class _Proc:
    proc: subprocess.Popen[str]
    lines: queue.Queue[str]
    stderr: IO[str]

    def first_line(self, who: str) -> str:
        try:
            return _next_line(self.lines, READY_TIMEOUT_S, who)
        except RuntimeError as exc:
            self.stderr.seek(0)
            raise RuntimeError(f"{exc}: {self.stderr.read()[-500:]}") from None


def run_window(
    gen: Generator,
    target: str,
    call: Call,
    inflight: int,
    server_pgid: int,
    seconds: float,
    warmup: float,
) -> Window:
    """Runs `inflight` calls at once from `gen` and measures one window of `seconds`."""
    count = min(gen.procs, inflight)
    shares = [inflight // count + (1 if i < inflight % count else 0) for i in range(count)]
    started: list[_Proc] = []
    with contextlib.ExitStack() as stack:
        stack.callback(_reap, started)
        for share in shares:
            err = stack.enter_context(tempfile.TemporaryFile(mode="w+"))
            proc = subprocess.Popen(
                gen.command(target, call, share),
                cwd=ROOT,
                text=True,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
            )
            lines: queue.Queue[str] = queue.Queue()
            threading.Thread(target=_pump, args=(proc, lines), daemon=True).start()
            started.append(_Proc(proc, lines, err))
        for p in started:
            first = p.first_line(gen.name)
            if first != "ready":
                raise RuntimeError(f"{gen.name}: expected 'ready', got {first[:200]!r}")
        pids = [p.proc.pid for p in started]
        t0 = time.monotonic_ns() + int(warmup * 1e9)
        t1 = t0 + int(seconds * 1e9)
        for p in started:
            assert p.proc.stdin is not None
            p.proc.stdin.write(f"{t0} {t1}\n")
            p.proc.stdin.flush()
        _sleep_until(t0)
        server0, gen0 = procs.group_cpu(server_pgid), procs.pids_cpu(pids)
        _sleep_until(t1)
        server1, gen1 = procs.group_cpu(server_pgid), procs.pids_cpu(pids)
        results = [json.loads(_next_line(p.lines, 120.0, gen.name)) for p in started]
        for p in started:
            p.proc.wait(30)
    return Window(
        ok=sum(r["ok"] for r in results),
        errors=sum(r["errors"] for r in results),
        error=next((r["error"] for r in results if r["error"]), ""),
        seconds=seconds,
        lat_us=[x for r in results for x in r["lat_us"]],
        server_cpu_s=server1 - server0,
        gen_cpu_s=gen1 - gen0,
    )


def _reap(started: list[_Proc]) -> None:
    for p in started:
        if p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait()
