"""A gRPC echo server with the broker's set-up: the ceiling the broker's calls are held to.

    python -m tests.bench.echo --pki DIR --mode sync|aio [--procs N] [--port P]

The same mTLS (the broker's server certificate, client certificates required), the same
server options and limits as `broker.transport.server.create_server`, and one trivial unary
method `/bench.Echo/Echo` on bytes that answers a fixed 48-byte message. `sync` also runs the
broker's `ErrorInterceptor` (request id, trailing metadata), as every broker call does; `aio`
is the grpc.aio server with the same options. `--procs N` runs N processes on one port
(SO_REUSEPORT), the way `--workers N` shares the broker's port. Prints `port P` once serving.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from broker.config import Settings
from broker.transport.interceptors import ErrorInterceptor
from broker.transport.server import MAX_MESSAGE_BYTES

METHOD = "/bench.Echo/Echo"
RESPONSE = bytes(48)
LIMITS = Settings(home=Path("."))  # the broker's defaults: max_workers, max_concurrent_rpcs


def options(reuse_port: bool) -> list[tuple[str, int]]:
    """The option list of `broker.transport.server.create_server`, kept in step by hand."""
    return [
        ("grpc.so_reuseport", 1 if reuse_port else 0),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_metadata_size", 16 * 1024),
        ("grpc.max_connection_idle_ms", 5 * 60 * 1000),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.http2.min_ping_interval_without_data_ms", 60 * 1000),
    ]


def credentials(pki: Path) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials(
        [((pki / "server.key").read_bytes(), (pki / "server.pem").read_bytes())],
        root_certificates=(pki / "ca.pem").read_bytes(),
        require_client_auth=True,
    )


def _echo(_request: bytes, _context: object) -> bytes:
    return RESPONSE


async def _echo_async(_request: bytes, _context: object) -> bytes:
    return RESPONSE


def _handler(behaviour: object) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(behaviour)}
    )


def serve_sync(pki: Path, port: int, reuse_port: bool, started: threading.Event) -> None:
    server = grpc.server(
        ThreadPoolExecutor(max_workers=LIMITS.max_workers, thread_name_prefix="rpc"),
        interceptors=[ErrorInterceptor()],
        maximum_concurrent_rpcs=LIMITS.max_concurrent_rpcs,
        options=options(reuse_port),
    )
    server.add_generic_rpc_handlers((_handler(_echo),))
    bound = server.add_secure_port(f"127.0.0.1:{port}", credentials(pki))
    server.start()
    print(f"port {bound}", flush=True)
    started.set()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    server.stop(0).wait()


async def serve_aio(pki: Path, port: int, reuse_port: bool) -> None:
    server = grpc.aio.server(
        maximum_concurrent_rpcs=LIMITS.max_concurrent_rpcs, options=options(reuse_port)
    )
    server.add_generic_rpc_handlers((_handler(_echo_async),))
    bound = server.add_secure_port(f"127.0.0.1:{port}", credentials(pki))
    await server.start()
    print(f"port {bound}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(0)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pki", type=Path, required=True)
    parser.add_argument("--mode", choices=("sync", "aio"), required=True)
    parser.add_argument("--procs", type=int, default=1)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    reuse = args.procs > 1
    if args.port == 0 and reuse:
        # The first process binds a free port; the others join it (SO_REUSEPORT). They stay in
        # this process group, so the harness counts their CPU as the server's.
        return 0 if _bind_first(args) else 1
    port = max(args.port, 0)  # -1: the first of several, on a free port
    if args.mode == "sync":
        serve_sync(args.pki, port, reuse, threading.Event())
    else:
        asyncio.run(serve_aio(args.pki, port, reuse))
    return 0


def _bind_first(args: argparse.Namespace) -> int:
    first = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.bench.echo",
            "--pki",
            str(args.pki),
            "--mode",
            args.mode,
            "--procs",
            str(args.procs),
            "--port",
            "-1",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert first.stdout is not None
    line = first.stdout.readline().split()
    port = int(line[1])
    others = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.bench.echo",
                "--pki",
                str(args.pki),
                "--mode",
                args.mode,
                "--procs",
                str(args.procs),
                "--port",
                str(port),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(args.procs - 1)
    ]
    for other in others:
        assert other.stdout is not None
        other.stdout.readline()
    print(f"port {port}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    for child in (first, *others):
        child.terminate()
    for child in (first, *others):
        child.wait(10)
    return port


if __name__ == "__main__":
    sys.exit(main())
