"""A focused run of the hot path: a few scenarios of one broker beside the gRPC echo ceiling.

    .venv/bin/python -m tests.bench.focus [--rounds 5] [--window 2] [--concurrency 1,64]
        [--scenarios Decrypt,GenerateDataKey] [--workers 1] [--generator cpp]

The same broker set-up, load generators and measured windows as `make bench`
(`tests/bench/hotpath.py`), without OpenBao and without writing the docs: for checking a change
to the hot path. Rounds alternate the broker and the echo server; every figure printed is the
median of the rounds with the min-max spread. Writes nothing but its output (and the raw
figures as JSON with `--json FILE`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from tests.bench import echo, gen, keybroker, procs
from tests.bench.gen import ROOT, Call, Generator

FIGURES = ("rps", "p50_ms", "p99_ms", "server_cpu_ms")


def _echo_server(pki: Path, mode: str) -> tuple[subprocess.Popen[bytes], str]:
    cmd = [sys.executable, "-m", "tests.bench.echo", "--pki", str(pki), "--mode", mode]
    proc = procs.start_group(cmd, cwd=ROOT, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    if len(line) != 2:
        raise RuntimeError(f"the echo server did not start: {cmd}")
    return proc, f"127.0.0.1:{int(line[1])}"


def _summary(values: list[float]) -> str:
    return f"{statistics.median(values):.4g} [{min(values):.4g}-{max(values):.4g}]"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--window", type=float, default=2.0)
    parser.add_argument("--warmup", type=float, default=0.3)
    parser.add_argument("--concurrency", default="1,64")
    parser.add_argument("--scenarios", default="Decrypt,GenerateDataKey")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--generator", default="cpp", choices=("cpp", "node", "py-aio"))
    parser.add_argument("--echo", default="sync,aio", help="echo modes to measure ('' for none)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.scenarios = [s for s in args.scenarios.split(",") if s]
    args.echo = [m for m in args.echo.split(",") if m]
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    generator = Generator(args.generator, 2 if args.generator == "py-aio" else 1)
    if generator.kind == "cpp" and (why := gen.build_cpp()):
        raise SystemExit(f"the C++ generator is not available: {why}")
    broker = keybroker.start(args.workers, True)
    echoes: dict[str, tuple[subprocess.Popen[bytes], str]] = {}
    results: dict[tuple[str, int], dict[str, list[float]]] = {}
    try:
        for mode in args.echo:
            echoes[mode] = _echo_server(broker.home / "pki", mode)
        decrypt = broker.calls["Decrypt"]
        echo_call = Call(echo.METHOD, decrypt.payload, decrypt.tls)
        targets: list[tuple[str, str, Call, int]] = [
            (name, broker.target, broker.calls[name], broker.pgid) for name in args.scenarios
        ]
        targets += [(f"echo {m}", t, echo_call, p.pid) for m, (p, t) in echoes.items()]
        for _name, target, call, pgid in targets:  # warm-up
            gen.run_window(generator, target, call, 16, pgid, 1.0, 0.2)
        for rnd in range(args.rounds):
            order = targets if rnd % 2 == 0 else targets[::-1]
            for name, target, call, pgid in order:
                for c in args.concurrency:
                    w = gen.run_window(generator, target, call, c, pgid, args.window, args.warmup)
                    fig = w.figures()
                    cell = results.setdefault((name, c), {f: [] for f in FIGURES})
                    for f in FIGURES:
                        cell[f].append(fig[f])
                    shown = " ".join(f"{f}={fig[f]:.4g}" for f in FIGURES)
                    errors = f" errors={w.errors} {w.error[:80]}" if w.errors else ""
                    print(f"r{rnd + 1} {name} x{c}: {shown}{errors}", flush=True)
    finally:
        for proc, _ in echoes.values():
            procs.stop_group(proc)
        broker.stop()
    print(f"\nmedian [min-max] of {args.rounds} rounds, {generator.name}, {args.workers} worker(s)")
    print("| scenario | in flight | req/s | p50 ms | p99 ms | server CPU ms/req |")
    print("|---|---|---|---|---|---|")
    for (name, c), cell in results.items():
        print(f"| {name} | {c} | " + " | ".join(_summary(cell[f]) for f in FIGURES) + " |")
    if args.json:
        args.json.write_text(json.dumps({f"{n} x{c}": v for (n, c), v in results.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
