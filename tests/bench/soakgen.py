"""The soak's load generator: a fixed rate of mixed calls over mTLS, from a process of its own.

    python -m tests.bench.soakgen SPEC.json

SPEC names the target, the rate (calls per second), the duration, the reporting interval and
the calls: for each, its gRPC method, its pre-serialised request (hex), its weight in the mix
and the client identity (CA, certificate, key) it is sent with. Calls are started on a fixed
schedule (open loop: the next call does not wait for the last one), in a fixed interleaved
order of the mix, each with a deadline of CALL_TIMEOUT_S. At most MAX_IN_FLIGHT calls are
outstanding; a call due beyond that is not sent and counted as `skipped` (the broker is then
slower than the rate, which the report shows).

Every INTERVAL seconds it prints one JSON line with the calls completed in that interval:
`{"t", "done", "ok", "errors": {CODE: n}, "p50_ms", "p99_ms", "skipped"}`; after the last call
completed, one line `{"final": true, "sent", "skipped", "p50_ms", "p99_ms", "totals": {NAME:
{"ok": n, "errors": {CODE: n}}}}` (its percentiles over every call of the run).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from tests.bench.gen import percentile

CALL_TIMEOUT_S = 10.0
MAX_IN_FLIGHT = 512


@dataclass
class Interval:
    """The calls completed since the last report."""

    lat_ms: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    skipped: int = 0

    def line(self, t: float) -> dict[str, Any]:
        ordered = sorted(self.lat_ms)
        return {
            "t": round(t, 3),
            "done": len(ordered) + sum(self.errors.values()),
            "ok": len(ordered),
            "errors": dict(self.errors),
            "p50_ms": percentile(ordered, 50),
            "p99_ms": percentile(ordered, 99),
            "skipped": self.skipped,
        }


@dataclass
class Totals:
    ok: Counter[str] = field(default_factory=Counter)
    errors: dict[str, Counter[str]] = field(default_factory=dict)

    def as_json(self, names: list[str]) -> dict[str, Any]:
        return {n: {"ok": self.ok[n], "errors": dict(self.errors.get(n, Counter()))} for n in names}


def schedule(weights: dict[str, int]) -> list[str]:
    """One round of the mix, interleaved (smooth weighted round-robin): with weights 14/3/2/1
    the rare calls are spread over the round instead of bunched at its end."""
    total = sum(weights.values())
    current = dict.fromkeys(weights, 0)
    order = []
    for _ in range(total):
        for name, w in weights.items():
            current[name] += w
        pick = max(current, key=lambda n: current[n])
        current[pick] -= total
        order.append(pick)
    return order


def _channel(target: str, call: dict[str, str]) -> grpc.aio.Channel:
    creds = grpc.ssl_channel_credentials(
        Path(call["ca"]).read_bytes(),
        Path(call["key"]).read_bytes(),
        Path(call["cert"]).read_bytes(),
    )
    return grpc.aio.secure_channel(target, creds)


async def run(spec: dict[str, Any]) -> None:
    calls = spec["calls"]
    channels: dict[str, grpc.aio.Channel] = {}
    stubs = {}
    for c in calls:
        if c["cert"] not in channels:
            channels[c["cert"]] = _channel(spec["target"], c)
        stubs[c["name"]] = (
            channels[c["cert"]].unary_unary(c["method"]),
            bytes.fromhex(c["payload_hex"]),
        )
    order = schedule({c["name"]: int(c["weight"]) for c in calls})
    interval, totals = Interval(), Totals()
    every_lat: list[float] = []
    skipped = 0
    in_flight: set[asyncio.Task[None]] = set()

    async def one(name: str) -> None:
        method, payload = stubs[name]
        start = time.perf_counter()
        try:
            await method(payload, timeout=CALL_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
            interval.errors[code] += 1
            totals.errors.setdefault(name, Counter())[code] += 1
            return
        ms = (time.perf_counter() - start) * 1000
        interval.lat_ms.append(ms)
        every_lat.append(ms)
        totals.ok[name] += 1

    loop = asyncio.get_running_loop()
    begin = loop.time()
    end = begin + float(spec["seconds"])
    rate, every = float(spec["rate"]), float(spec["interval"])
    next_report = begin + every
    n = 0
    while (due := begin + n / rate) < end:
        now = loop.time()
        if now >= next_report:
            _emit(interval.line(next_report - begin))
            interval = Interval()
            next_report += every
            continue
        if due > now:
            await asyncio.sleep(min(due, next_report) - now)
            continue
        if len(in_flight) >= MAX_IN_FLIGHT:
            interval.skipped += 1
            skipped += 1
        else:
            task = asyncio.create_task(one(order[n % len(order)]))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        n += 1
    if in_flight:
        await asyncio.wait(in_flight)
    _emit(interval.line(loop.time() - begin))
    names = [c["name"] for c in calls]
    every_lat.sort()
    _emit(
        {
            "final": True,
            "sent": n - skipped,
            "skipped": skipped,
            "seconds": round(loop.time() - begin, 3),
            "p50_ms": percentile(every_lat, 50),
            "p99_ms": percentile(every_lat, 99),
            "totals": totals.as_json(names),
        }
    )
    for ch in channels.values():
        await ch.close()


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    asyncio.run(run(spec))


if __name__ == "__main__":
    main()
