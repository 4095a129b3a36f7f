"""The hot path on a slow disk: every fsync of the broker 2 ms slower, beside the same broker.

    .venv/bin/python -m tests.bench.slowdisk [--rounds 3] [--window 2] [--delay-ms 2]
        [--concurrency 1,64] [--scenarios Decrypt,GenerateDataKey] [--no-doc]

Every call the broker answers has written its audit event with `synchronous=FULL` first, so
the disk's flush time is on the hot path unless commits are grouped and no lock is held across
the flush. Two brokers run on the embedded default, one worker each:

- `this disk`: as `make bench` runs it;
- `fsync +2 ms`: the same, with `slowsync.c` preloaded, which sleeps 2 ms in every `fsync` and
  `fdatasync` before the real one runs, as a disk whose flush takes 2 ms longer would.

(strace's `inject=fdatasync:delay_enter=` was tried first: on a loaded two-core machine a
multi-threaded tracee under strace runs several times slower even with no delay, which hides
the effect being measured.)

Rounds alternate the order of the brokers; each figure is the median of the rounds with the
min-max spread. Each broker serves Prometheus metrics, from which the run reads how many
events each audit commit held and how long a commit took. The goal: throughput with the slow
flush within 20 % of this disk's, at the top concurrency. Writes its own section of
docs/benchmarks.md (the others are left as they are) and bench-results/slow-disk-TIME.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tests.bench import gen, keybroker, procs
from tests.bench.gen import ROOT, Generator
from tests.bench.report import replace_section, spread

BEGIN = "<!-- slow-disk:begin (written by make bench: tests/bench/slowdisk.py) -->"
END = "<!-- slow-disk:end -->"
GOAL = 0.8  # throughput with the slow flush, as a share of this disk's
SHIM_SOURCE = ROOT / "tests" / "bench" / "slowsync.c"
SHIM = ROOT / "build" / "bench" / "slowsync.so"
FIGURES = ("rps", "p50_ms", "p99_ms", "server_cpu_ms", "events_per_commit", "commit_ms")


def build_shim() -> Path:
    """Compiles slowsync.c if need be; raises SystemExit when it cannot."""
    if SHIM.exists() and SHIM.stat().st_mtime >= SHIM_SOURCE.stat().st_mtime:
        return SHIM
    if not shutil.which("gcc"):
        raise SystemExit("gcc is missing: it builds tests/bench/slowsync.c")
    SHIM.parent.mkdir(parents=True, exist_ok=True)
    cmd = ["gcc", "-O2", "-Wall", "-Wextra", "-shared", "-fPIC", "-o", str(SHIM)]
    subprocess.run([*cmd, str(SHIM_SOURCE), "-ldl"], check=True)
    return SHIM


@dataclass
class System:
    """One broker of the comparison and where its metrics are served."""

    name: str
    broker: keybroker.Broker
    metrics: str

    def audit(self) -> tuple[float, float, float]:
        """Audit commits so far, the events they held, and the seconds they took."""
        with urllib.request.urlopen(self.metrics, timeout=10) as answer:
            text = answer.read().decode()
        values = {}
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            values[name] = value
        return (
            float(values.get("keybroker_audit_batch_events_count", 0)),
            float(values.get("keybroker_audit_batch_events_sum", 0)),
            float(values.get("keybroker_audit_commit_duration_seconds_sum", 0)),
        )


def start(args: argparse.Namespace) -> list[System]:
    slow = {"LD_PRELOAD": str(build_shim()), "SLOWSYNC_DELAY_US": str(round(args.delay_ms * 1e3))}
    systems = []
    for name, extra in (("this disk", {}), (f"fsync +{args.delay_ms:g} ms", slow)):
        port = procs.free_port()
        env = {"KEYBROKER_METRICS_LISTEN": f"127.0.0.1:{port}", **extra}
        broker = keybroker.start(1, True, env)
        systems.append(System(name, broker, f"http://127.0.0.1:{port}/metrics"))
    return systems


def _cell(values: list[float], fmt: str = "{:.3g}") -> str:
    return spread(values, fmt.format)


Cells = dict[tuple[str, str, int], dict[str, list[float]]]


def measure(args: argparse.Namespace, systems: list[System], generator: Generator) -> Cells:
    results: Cells = {}
    for s in systems:  # warm-up
        for name in args.scenarios:
            call = s.broker.calls[name]
            gen.run_window(generator, s.broker.target, call, 16, s.broker.pgid, 1.0, 0.2)
    for rnd in range(args.rounds):
        for s in systems if rnd % 2 == 0 else systems[::-1]:
            for name in args.scenarios:
                call = s.broker.calls[name]
                for c in args.concurrency:
                    before = s.audit()
                    w = gen.run_window(
                        generator, s.broker.target, call, c, s.broker.pgid, args.window, 0.3
                    )
                    fig = w.figures()
                    # Commits over the warm-up and the window: ratios of the two, so both
                    # parts count alike.
                    commits, events, seconds = (
                        a - b for a, b in zip(s.audit(), before, strict=True)
                    )
                    if commits:
                        fig["events_per_commit"] = events / commits
                        fig["commit_ms"] = seconds / commits * 1000
                    cell = results.setdefault((s.name, name, c), {f: [] for f in FIGURES})
                    for f in FIGURES:
                        if f in fig:
                            cell[f].append(fig[f])
                    errors = f" errors={w.errors} {w.error[:80]}" if w.errors else ""
                    shown = " ".join(f"{f}={fig[f]:.4g}" for f in FIGURES if f in fig)
                    print(f"r{rnd + 1} {s.name} {name} x{c}: {shown}{errors}", flush=True)
    return results


def ratios(args: argparse.Namespace, results: Cells, systems: list[System]) -> dict[str, float]:
    """Throughput with the slow flush over this disk's, at the top concurrency."""
    top = max(args.concurrency)
    fast, slow = systems[0].name, systems[1].name
    out = {}
    for name in args.scenarios:
        base = statistics.median(results[(fast, name, top)]["rps"])
        out[name] = statistics.median(results[(slow, name, top)]["rps"]) / base
    return out


def section(
    args: argparse.Namespace,
    results: Cells,
    systems: list[System],
    found: dict[str, float],
    meta: dict[str, str],
) -> str:
    top = max(args.concurrency)
    lines = [
        f"## Hot path on a slow disk: every fsync {args.delay_ms:g} ms slower",
        "",
        f"Written by `make bench` (`tests/bench/slowdisk.py`) on {meta['date']}; the run took "
        f"{meta['minutes']} min. Two brokers on the embedded default, one worker each, "
        f"{meta['generator']} load over mTLS, median of {args.rounds} rounds of {args.window:g} s "
        "windows with the min-max spread; rounds alternate the order of the brokers. "
        "*this disk* runs as in the hot-path section: its home is on "
        f"{meta['disk']}, where one fdatasync after a 4 KiB write took {meta['fdatasync_ms']} "
        f"ms (median of 50). *fsync +{args.delay_ms:g} ms* is the same broker with "
        "`tests/bench/slowsync.c` preloaded, which sleeps "
        f"{args.delay_ms:g} ms in every fsync and fdatasync before the real one runs. "
        "Events per commit and ms per commit come from each broker's own metrics "
        "(`keybroker_audit_batch_events`, `keybroker_audit_commit_duration_seconds`) over the "
        "warm-up and the window: each commit makes one transaction of the audit trail durable.",
        "",
        "| broker | call | in flight | req/s | p50 ms | p99 ms | server CPU ms/req "
        "| events/commit | ms/commit |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in args.scenarios:
        for c in args.concurrency:
            for s in systems:
                cell = results[(s.name, name, c)]
                lines.append(
                    f"| {s.name} | {name} | {c} | {_cell(cell['rps'], '{:.0f}')} | "
                    f"{_cell(cell['p50_ms'])} | {_cell(cell['p99_ms'])} | "
                    f"{_cell(cell['server_cpu_ms'])} | {_cell(cell['events_per_commit'])} | "
                    f"{_cell(cell['commit_ms'])} |"
                )
    lines += [
        "",
        f"Goal: at {top} in flight, throughput with the slow flush at least "
        f"{GOAL:.0%} of this disk's.",
        "",
        "| call | slow-disk / this-disk throughput | goal met |",
        "| --- | --- | --- |",
    ]
    for name, r in found.items():
        lines.append(f"| {name} | {r:.2f}x | {'yes' if r >= GOAL else 'no'} |")
    lines += [
        "",
        f"Load average at the end: {meta['load']} (other work may share the 2 cores).",
        "",
        "```",
        f".venv/bin/python -m tests.bench.slowdisk {' '.join(sys.argv[1:])}".rstrip(),
        "```",
    ]
    return "\n".join(lines) + "\n"


def fdatasync_ms(directory: Path) -> str:
    """Median time of one fdatasync after a 4 KiB write, in `directory`: this disk's flush."""
    path = directory / "flush-probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    times = []
    try:
        for _ in range(50):
            os.write(fd, b"x" * 4096)
            t0 = time.perf_counter()
            os.fdatasync(fd)
            times.append(time.perf_counter() - t0)
    finally:
        os.close(fd)
        path.unlink()
    return f"{statistics.median(times) * 1000:.2f}"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    # 1.5 s windows keep `make bench` (with the hot path and the files) under 10 minutes.
    parser.add_argument("--window", type=float, default=1.5)
    parser.add_argument("--delay-ms", type=float, default=2.0)
    parser.add_argument("--concurrency", default="1,64")
    parser.add_argument("--scenarios", default="Decrypt,GenerateDataKey")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results")
    parser.add_argument("--no-doc", action="store_true", help="print only; leave the docs")
    args = parser.parse_args(argv)
    args.concurrency = sorted({int(c) for c in args.concurrency.split(",")})
    args.scenarios = [s for s in args.scenarios.split(",") if s]
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    t0 = time.monotonic()
    generator = Generator("cpp", 1)
    if gen.build_cpp():
        generator = Generator("py-aio", 2)
    scratch = Path(tempfile.mkdtemp(prefix="slow-disk-"))
    systems: list[System] = []
    try:
        systems = start(args)
        results = measure(args, systems, generator)
    finally:
        for s in systems:
            s.broker.stop()
    meta = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "minutes": f"{(time.monotonic() - t0) / 60:.1f}",
        "generator": generator.name,
        "disk": procs.filesystem(scratch),
        "fdatasync_ms": fdatasync_ms(scratch),
        "load": procs.load_average(),
    }
    shutil.rmtree(scratch, ignore_errors=True)
    found = ratios(args, results, systems)
    text = section(args, results, systems, found, meta)
    print(text)
    args.out.mkdir(exist_ok=True)
    raw = {
        "meta": meta,
        "ratios": found,
        "cells": {f"{s} | {n} | {c}": v for (s, n, c), v in results.items()},
    }
    (args.out / f"slow-disk-{int(time.time())}.json").write_text(json.dumps(raw, indent=1))
    if not args.no_doc:
        doc = args.doc.read_text() if args.doc.exists() else None
        args.doc.write_text(replace_section(doc, text, BEGIN, END))
        print(f"written to {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
