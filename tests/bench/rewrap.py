"""Bulk re-wrap throughput: ReWrapStream through the SDK against one broker process.

Starts a broker (the embedded default: SoftHSM2, SQLite, mutual TLS on 127.0.0.1) in a
throwaway home, creates a key, and for each round: wraps ``--blobs`` fresh data keys under the
current primary version (GenerateDataKeys, not timed), rotates the key, then times

- ``stream``: ``KeybrokerClient.rewrap_stream`` over all of them (each one re-wrapped to the
  new version: an HSM decrypt and encrypt, one audit event);
- ``current``: the same call over the blobs it just returned (each one already current:
  checked with an HSM decrypt, returned unchanged, one audit event);
- ``unary``: ``ReWrap`` one call per blob over ``--unary`` of the old blobs, for comparison.

Prints blobs per second of wall clock and the broker process's CPU milliseconds per blob
(user + system, from /proc; steadier than wall clock on a shared machine), each the median of
the rounds with min-max in brackets, and the command line; the figures of a run are quoted by
hand in docs/benchmarks.md ("Bulk re-wrap").

    .venv/bin/python -m tests.bench.rewrap [--blobs 20000] [--rounds 3] [--batch-size 250]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import grpc
from keybroker.v1 import crypto_pb2, crypto_pb2_grpc
from keybroker_client import policy_from_grants

from tests.bench.files import client, start_broker

CTX = {"dataset": "bench"}
KEY_ID = "bench-rewrap"


def crypto_stub(home: Path, target: str, who: str) -> crypto_pb2_grpc.CryptoStub:
    """A Crypto stub for the batch call the SDK does not wrap (GenerateDataKeys)."""
    pki = home / "pki"
    credentials = grpc.ssl_channel_credentials(
        (pki / "ca.pem").read_bytes(), (pki / f"{who}.key").read_bytes(),
        (pki / f"{who}.pem").read_bytes(),
    )  # fmt: skip
    return crypto_pb2_grpc.CryptoStub(grpc.secure_channel(target, credentials))


def wrapped_keys(stub: crypto_pb2_grpc.CryptoStub, count: int) -> list[bytes]:
    """``count`` data keys wrapped under the key's primary version (GenerateDataKeys)."""
    blobs: list[bytes] = []
    while len(blobs) < count:
        request = crypto_pb2.GenerateDataKeysRequest(
            key_id=KEY_ID, context=CTX, count=min(1000, count - len(blobs))
        )
        blobs += [dk.wrapped_key for dk in stub.GenerateDataKeys(request, timeout=60).data_keys]
    return blobs


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(pid: int, count: int, run: Callable[[], int]) -> tuple[float, float]:
    """(items per second of wall clock, broker CPU milliseconds per item) of ``run``."""
    cpu0, t0 = cpu_seconds(pid), time.perf_counter()
    done = run()
    wall, cpu = time.perf_counter() - t0, cpu_seconds(pid) - cpu0
    assert done == count, f"{done} of {count} items succeeded"
    return count / wall, cpu * 1000 / count


def cell(values: list[float]) -> str:
    return f"{statistics.median(values):.0f} [{min(values):.0f}-{max(values):.0f}]"


def cell2(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} [{min(values):.2f}-{max(values):.2f}]"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blobs", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--in-flight", type=int, default=2)
    parser.add_argument("--unary", type=int, default=1000)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="kb-bench-rewrap-home-"))
    server, target = start_broker(home)
    figures: dict[str, list[tuple[float, float]]] = {"stream": [], "current": [], "unary": []}
    try:
        admin, producer = client(home, target, "admin"), client(home, target, "producer")
        stub = crypto_stub(home, target, "producer")
        admin.create_key(
            KEY_ID, policy=policy_from_grants(["producer:encrypt+rewrap:dataset=bench"])
        )

        def stream(blobs: list[bytes], want_current: bool) -> int:
            results = producer.rewrap_stream(
                blobs, CTX, batch_size=args.batch_size, in_flight=args.in_flight
            )
            fresh.clear()
            for r in results:
                if r.ok and r.already_current == want_current:
                    fresh.append(r.ciphertext)
            return len(fresh)

        fresh: list[bytes] = []
        for i in range(args.rounds + 1):  # round 0 warms up
            old = wrapped_keys(stub, args.blobs)
            admin.rotate_key(KEY_ID)
            pid = server.pid
            took = {
                "stream": measure(pid, args.blobs, lambda old=old: stream(old, False)),
                "current": measure(pid, args.blobs, lambda: stream(list(fresh), True)),
                "unary": measure(
                    pid,
                    args.unary,
                    lambda old=old: sum(
                        producer.rewrap(b, CTX).key_version > 0 for b in old[: args.unary]
                    ),
                ),
            }
            if i:
                for name, value in took.items():
                    figures[name].append(value)
            print(f"round {i}: " + ", ".join(f"{k} {v[0]:.0f}/s" for k, v in took.items()))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)
    print()
    print(f"{args.blobs} blobs per round, {args.rounds} rounds, batches of {args.batch_size}, "
          f"{args.in_flight} in flight; load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    for name, what in (
        ("stream", "ReWrapStream, old version -> primary"),
        ("current", "ReWrapStream, already current       "),
        ("unary", "ReWrap, one call per blob           "),
    ):
        rates, cpus = [r for r, _ in figures[name]], [c for _, c in figures[name]]
        print(f"{what}: {cell(rates)} blobs/s, broker CPU {cell2(cpus)} ms/blob")
    print(f".venv/bin/python -m tests.bench.rewrap {' '.join(sys.argv[1:])}".rstrip())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
