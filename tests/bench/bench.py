"""`make bench`: what GenerateDataKey and Decrypt cost, over gRPC/mTLS against SoftHSM2.

Starts a broker process in a throwaway home, warms up, then for each operation runs rounds
of sequential calls and a concurrent phase. Reports per round: throughput, latency
percentiles over every call of the measured window, and the server's CPU seconds per call
(utime + stime + cutime + cstime of the server process from /proc, as BENCHMARKING.md asks).
Medians and min-max across rounds are printed last; raw figures go to bench-results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from keybroker.v1 import (
    crypto_pb2,
    crypto_pb2_grpc,
    key_admin_pb2,
    key_admin_pb2_grpc,
    resources_pb2,
    tokens_pb2,
    tokens_pb2_grpc,
)

CTX = {"dataset": "bench"}
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return (utime + stime + cutime + cstime) / TICKS


def channel(home: Path, target: str, who: str) -> grpc.Channel:
    pki = home / "pki"
    return grpc.secure_channel(
        target,
        grpc.ssl_channel_credentials(
            (pki / "ca.pem").read_bytes(),
            (pki / f"{who}.key").read_bytes(),
            (pki / f"{who}.pem").read_bytes(),
        ),
    )


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def measure(call, n: int, threads: int, pid: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    latencies: list[float] = []

    def one(_: int) -> None:
        t0 = time.perf_counter()
        call()
        latencies.append(time.perf_counter() - t0)

    cpu0, t0 = cpu_seconds(pid), time.perf_counter()
    if threads == 1:
        for i in range(n):
            one(i)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(one, range(n)))
    wall = time.perf_counter() - t0
    cpu = cpu_seconds(pid) - cpu0
    return {
        "calls": n,
        "rps": n / wall,
        "p50_ms": pct(latencies, 50) * 1000,
        "p99_ms": pct(latencies, 99) * 1000,
        "server_cpu_ms_per_call": cpu / n * 1000,
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=4)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="kb-bench-"))
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "broker",
            "--home",
            str(home),
            "--listen",
            "127.0.0.1:0",
            "--log-level",
            "WARNING",
        ],
        stdout=subprocess.DEVNULL,
        env={k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"},
    )
    try:
        addr = home / "listen.addr"
        for _ in range(600):
            if addr.exists() and addr.read_text().strip():
                break
            time.sleep(0.1)
        target = addr.read_text().strip()
        admin = key_admin_pb2_grpc.KeyAdminStub(channel(home, target, "admin"))
        admin.CreateKey(
            key_admin_pb2.CreateKeyRequest(
                key_id="bench",
                policy=resources_pb2.KeyPolicy(
                    grants=[
                        resources_pb2.Grant(
                            principal="producer", operations=[resources_pb2.OPERATION_ENCRYPT]
                        ),
                        resources_pb2.Grant(
                            principal="consumer", operations=[resources_pb2.OPERATION_DECRYPT]
                        ),
                    ]
                ),
            )
        )
        producer = crypto_pb2_grpc.CryptoStub(channel(home, target, "producer"))
        consumer_ch = channel(home, target, "consumer")
        consumer = crypto_pb2_grpc.CryptoStub(consumer_ch)
        token = (
            tokens_pb2_grpc.TokensStub(consumer_ch)
            .IssueToken(
                tokens_pb2.IssueTokenRequest(
                    key_id="bench", context=CTX, justification="benchmark", ttl={"seconds": 3600}
                )
            )
            .token
        )
        gdk_req = crypto_pb2.GenerateDataKeyRequest(key_id="bench", context=CTX)
        wrapped = producer.GenerateDataKey(gdk_req).wrapped_key
        dec_req = crypto_pb2.DecryptRequest(ciphertext=wrapped, context=CTX, token=token)
        ops = {
            "GenerateDataKey": lambda: producer.GenerateDataKey(gdk_req),
            "Decrypt": lambda: consumer.Decrypt(dec_req),
        }
        for call in ops.values():  # warm-up: connections, sessions, caches
            for _ in range(100):
                call()
        results: dict[str, list[dict[str, float]]] = {}
        for _ in range(args.rounds):
            for name, call in ops.items():
                for threads in (1, args.threads):
                    key = f"{name} x{threads}"
                    results.setdefault(key, []).append(
                        measure(call, args.calls, threads, server.pid)
                    )
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)
        shutil.rmtree(home, ignore_errors=True)
    report = {
        "machine": {
            "nproc": os.cpu_count(),
            "cpu": platform.processor() or platform.machine(),
            "python": platform.python_version(),
        },
        "command": " ".join(sys.argv),
        "results": results,
    }
    out = Path("bench-results")
    out.mkdir(exist_ok=True)
    (out / f"bench-{int(time.time())}.json").write_text(json.dumps(report, indent=2))
    print(f"{'operation':<20}{'rps':>24}{'p50 ms':>20}{'p99 ms':>22}{'server CPU ms/call':>22}")
    for key, rounds in results.items():

        def cell(metric: str, rounds: list[dict[str, float]] = rounds) -> str:
            vals = [r[metric] for r in rounds]
            return f"{statistics.median(vals):.2f} [{min(vals):.2f}-{max(vals):.2f}]"

        print(
            f"{key:<20}{cell('rps'):>24}{cell('p50_ms'):>20}{cell('p99_ms'):>22}"
            f"{cell('server_cpu_ms_per_call'):>22}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
