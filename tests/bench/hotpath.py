"""`make bench`: the hot path of keybroker beside OpenBao Transit, in one run.

    .venv/bin/python -m tests.bench.hotpath [--rounds 3] [--window 2] [--quick]

1. Starts keybroker (1 worker; 2 as well when `--help` offers `--workers`), OpenBao in dev mode
   with a file audit device, and gRPC echo servers with the broker's set-up (`echo.py`).
2. Picks the gRPC load generator: every candidate (C++, Node, Python processes) against the
   echo servers at the top concurrency; the lowest generator CPU per request wins.
3. Warms up, then runs the rounds: keybroker and OpenBao alternate which goes first; every
   scenario at each concurrency in one window; then the echo ceiling and the raw PyKCS11 rate.
4. Writes bench-results/hot-path-TIME.json, the section "Hot path: keybroker and OpenBao" of
   docs/benchmarks.md (only that section is replaced) and docs/benchmarks-hot-path.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from tests.bench import gen, keybroker, openbao, plot, procs, report
from tests.bench.gen import ROOT, Call, Generator
from tests.bench.report import Key, Results

CANDIDATES = (
    Generator("cpp", 1),
    Generator("node", 1),
    Generator("py-aio", 2),
    Generator("py-threads", 2),
)
T_START = time.monotonic()


def _line(exc: BaseException) -> str:
    """The first ERROR line of an error holding a log tail (else its last line), shortened."""
    lines = [x for x in str(exc).splitlines() if x.strip()]
    errors = [x for x in lines if " ERROR " in x]
    return (errors or lines[-1:] or [type(exc).__name__])[0][:240]


def log(text: str) -> None:
    print(f"[{time.monotonic() - T_START:6.1f} s] {text}", flush=True)


class Bench:
    """The servers of one run and the windows measured against them."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.results = Results(args.rounds)
        self.notes: list[str] = []
        harness = [".venv/bin/python", "-m", "tests.bench.hotpath", *sys.argv[1:]]
        self.commands: list[str] = [f"{shlex.join(harness)}  (make bench)"]
        self.calibration: list[list[str]] = []
        self.scratch = Path(tempfile.mkdtemp(prefix="hot-path-"))
        self.brokers: dict[int, keybroker.Broker] = {}
        self.echoes: dict[tuple[str, int], tuple[subprocess.Popen[bytes], str]] = {}
        self.bao: openbao.OpenBao | None = None
        self.generator = CANDIDATES[-1]
        self.http_generator = "wrk" if shutil.which("wrk") else "py-http x2 (wrk is missing)"

    # -- servers ---------------------------------------------------------------------------

    def start(self) -> None:
        has_flag = "--workers" in keybroker.server_help()
        self.workers = [1, 2] if has_flag else [1]
        if not has_flag:
            self.notes.append("2 workers: n/a, the server's `--help` has no `--workers` yet.")
        for w in list(self.workers):
            log(f"starting keybroker, {w} worker(s)")
            try:
                self.brokers[w] = keybroker.start(w, has_flag)
            except RuntimeError as exc:
                if w == 1:
                    raise
                # Say so and go on with one worker; a second try tells a race from a failure.
                self.notes.append(f"{w} workers: the broker failed to start: {_line(exc)}")
                log(f"{w} workers failed to start ({_line(exc)}); trying once more")
                try:
                    self.brokers[w] = keybroker.start(w, has_flag)
                except RuntimeError as again:
                    self.notes.append(f"{w} workers, second try: {_line(again)}")
                    self.workers.remove(w)
                    continue
            self.commands.append(self._mask(shlex.join(self.brokers[w].cmd)))
        note = self.brokers[1].batch_note
        if note:
            self.notes.append(f"batch path: n/a, {note}.")
        log("starting OpenBao")
        self.bao = openbao.start()
        self.commands.append(
            self._mask(shlex.join(self.bao.cmd)) + "  (root token in BAO_DEV_ROOT_TOKEN_ID)"
        )
        pki = self.brokers[1].home / "pki"
        for mode in ("sync", "aio"):
            for w in self.workers:
                cmd = [sys.executable, "-m", "tests.bench.echo", "--pki", str(pki)]
                cmd += ["--mode", mode, "--procs", str(w)]
                proc = procs.start_group(cmd, cwd=ROOT, stdout=subprocess.PIPE)
                assert proc.stdout is not None
                line = proc.stdout.readline().split()
                if len(line) != 2:
                    raise RuntimeError(f"the echo server did not start: {shlex.join(cmd)}")
                port = int(line[1])
                self.echoes[(mode, w)] = (proc, f"127.0.0.1:{port}")
                self.commands.append(self._mask(shlex.join(cmd)))

    def stop(self) -> None:
        for proc, _ in self.echoes.values():
            procs.stop_group(proc)
        if self.bao:
            self.bao.stop()
        for broker in self.brokers.values():
            broker.stop()
        shutil.rmtree(self.scratch, ignore_errors=True)

    def _mask(self, text: str) -> str:
        for w, broker in self.brokers.items():
            text = text.replace(str(broker.home), f"<broker{w} home>")
        if self.bao:
            text = text.replace(str(self.bao.home), "<bao home>")
        return text.replace(sys.executable, ".venv/bin/python").replace(str(ROOT) + "/", "")

    # -- windows ---------------------------------------------------------------------------

    def echo_call(self) -> Call:
        decrypt = self.brokers[1].calls["Decrypt"]  # a request of realistic size
        return Call("/bench.Echo/Echo", decrypt.payload, decrypt.tls)

    def grpc_window(
        self,
        g: Generator,
        target: str,
        call: Call,
        inflight: int,
        pgid: int,
        seconds: float | None = None,
    ) -> tuple[dict[str, float], str]:
        w = gen.run_window(
            g, target, call, inflight, pgid, seconds or self.args.window, self.args.warmup
        )
        return w.figures(), (w.error if (w.errors or not w.ok) else "")

    def measure(self, key: Key, rnd: int, run: Callable[[], tuple[dict[str, float], str]]) -> None:
        try:
            figures, error = run()
        except Exception as exc:
            figures, error = {}, f"{type(exc).__name__}: {exc}"
        self.results.add(key, rnd, figures, error)
        shown = " ".join(f"{k}={report.num(v)}" for k, v in figures.items() if k != "errors")
        log(
            f"r{rnd + 1} {key.system} {key.scenario} w{key.workers} x{key.inflight}: "
            f"{shown} {error[:120]}"
        )

    def calibrate(self) -> None:
        """Every candidate generator against the echo servers at the top concurrency."""
        top = max(self.args.concurrency)
        available = []
        for cand in CANDIDATES:
            why = gen.build_cpp() if cand.kind == "cpp" else ""
            why = why or (gen.node_available() if cand.kind == "node" else "")
            if why:
                self.calibration.append([cand.name, "-", "-", "-", "-", why])
                self.notes.append(f"generator {cand.name}: {why}.")
                continue
            costs = []
            for mode in ("sync", "aio"):
                proc, target = self.echoes[(mode, 1)]
                try:
                    fig, err = self.grpc_window(cand, target, self.echo_call(), top, proc.pid)
                except RuntimeError as exc:
                    fig, err = {}, str(exc)
                if fig and not err:
                    costs.append(fig["gen_cpu_ms"])
                row = [cand.name, mode] + [
                    report.num(fig[m]) if fig else "-"
                    for m in ("rps", "gen_cpu_ms", "server_cpu_ms")
                ]
                self.calibration.append([*row, err[:80]])
                log(f"generator {cand.name} vs echo {mode}: {row[2:]} {err[:80]}")
            if len(costs) == 2:
                available.append((sum(costs) / 2, cand))
        if available:
            self.generator = min(available, key=lambda x: x[0])[1]
        log(f"generator: {self.generator.name}")

    def warm_up(self) -> None:
        """Connections, the first HSM sessions and any cache: one unmeasured pass."""
        for w, broker in self.brokers.items():
            for name, call in (broker.calls | broker.batch).items():
                self.grpc_window(self.generator, broker.target, call, 16, broker.pgid, 1.0)
                log(f"warmed keybroker {name} w{w}")
        assert self.bao is not None
        if self.http_generator == "wrk":
            openbao.warm_up(self.bao, self.scratch)
        log("warmed OpenBao")

    def round_keybroker(self, rnd: int) -> None:
        for w, broker in self.brokers.items():
            for name, call in (broker.calls | broker.batch).items():
                for c in self.args.concurrency:
                    if w > 1 and c == 1:
                        continue  # one call at a time reaches one worker: nothing to learn
                    if name in broker.batch and c > report.BATCH_MAX_INFLIGHT:
                        continue
                    self.measure(
                        Key("keybroker", name, w, c),
                        rnd,
                        partial(
                            self.grpc_window, self.generator, broker.target, call, c, broker.pgid
                        ),
                    )

    def round_openbao(self, rnd: int) -> None:
        bao = self.bao
        assert bao is not None
        for scenario in bao.bodies:
            for c in self.args.concurrency:
                self.measure(
                    Key("openbao", scenario, 1, c),
                    rnd,
                    partial(self._bao_window, bao, scenario, c),
                )

    def _bao_window(
        self, bao: openbao.OpenBao, scenario: str, c: int
    ) -> tuple[dict[str, float], str]:
        if self.http_generator == "wrk":
            fig = openbao.measure_wrk(
                bao, scenario, c, max(1, round(self.args.window)), self.scratch
            )
            return fig, "errors from wrk" if fig["errors"] else ""
        path, body = bao.bodies[scenario]
        token_file = self.scratch / "bao.token"  # the scratch directory is private (0700)
        token_file.write_text(bao.token)
        call = Call(f"/v1/{path}", body.encode(), None, token_file)
        return self.grpc_window(Generator("py-http", 2), bao.url, call, c, bao.pgid)

    def round_ceilings(self, rnd: int) -> None:
        top = max(self.args.concurrency)
        for (mode, w), (proc, target) in self.echoes.items():
            for c in self.args.concurrency if w == 1 else [top]:
                self.measure(
                    Key("echo", f"echo {mode}", w, c),
                    rnd,
                    partial(
                        self.grpc_window, self.generator, target, self.echo_call(), c, proc.pid
                    ),
                )
        self._pkcs11(rnd)

    def _pkcs11(self, rnd: int) -> None:
        cmd = [sys.executable, "-m", "tests.bench.pkcs11raw", str(self.args.window)]
        if rnd == 0:
            self.commands.append(self._mask(shlex.join(cmd)))
        try:
            out = subprocess.run(
                cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, check=True
            )
            raw = json.loads(out.stdout.strip().splitlines()[-1])
        except (subprocess.SubprocessError, ValueError, IndexError) as exc:
            self.results.add(Key("pkcs11", "decrypt", 1, 1), rnd, {}, str(exc)[:200])
            return
        for op in ("decrypt", "datakey"):
            fig = {"rps": raw[op]["ops"], "server_cpu_ms": raw[op]["cpu_ms"]}
            self.results.add(Key("pkcs11", op, 1, 1), rnd, fig)
        log(f"r{rnd + 1} raw PyKCS11: {raw}")

    def sample_commands(self) -> None:
        broker = self.brokers[1]
        call = broker.calls["Decrypt"]
        cmd = self.generator.command(broker.target, call, max(self.args.concurrency))
        self.commands.append(
            self._mask(shlex.join(cmd).replace(call.payload.hex(), "<request hex>"))
        )
        if self.bao and self.http_generator == "wrk":
            path = self.bao.bodies["decrypt"][0]
            script = self.scratch / "decrypt.lua"
            c = max(self.args.concurrency)
            wrk = openbao.wrk_command(self.bao, script, path, c, max(1, round(self.args.window)))
            self.commands.append(self._mask(shlex.join(wrk).replace(str(self.scratch), "<tmp>")))


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    # 2 s windows keep the whole of `make bench` under 10 minutes from a clean clone.
    parser.add_argument("--window", type=float, default=2.0, help="seconds per window")
    parser.add_argument("--warmup", type=float, default=0.3, help="seconds before each window")
    parser.add_argument("--concurrency", default="1,16,64", help="calls in flight")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "benchmarks-hot-path.png")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: 1 round of 1 s windows, no doc or plot written",
    )
    args = parser.parse_args(argv)
    args.concurrency = sorted({int(c) for c in args.concurrency.split(",")})
    if args.quick:
        args.rounds, args.window, args.warmup = 1, 1.0, 0.2
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    bench = Bench(args)
    machine = procs.machine()
    log(f"machine: {machine['nproc']} x {machine['cpu_model']}")
    try:
        bench.start()
        bench.calibrate()
        bench.warm_up()
        for rnd in range(args.rounds):
            systems = [bench.round_keybroker, bench.round_openbao]
            for system in systems if rnd % 2 == 0 else systems[::-1]:
                system(rnd)
            bench.round_ceilings(rnd)
        bench.sample_commands()
    finally:
        bench.stop()
    machine["load average at the end"] = procs.load_average()
    run = report.Run(
        date=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        minutes=(time.monotonic() - T_START) / 60,
        window_s=args.window,
        generator=bench.generator.name,
        http_generator=bench.http_generator,
        workers=bench.workers,
        concurrency=args.concurrency,
        machine=machine,
        commands=bench.commands,
        calibration=bench.calibration,
        notes=bench.notes,
    )
    args.out.mkdir(exist_ok=True)
    raw = {
        "run": dataclasses.asdict(run),
        "windows": [
            {
                **dataclasses.asdict(key),
                "round": rnd + 1,
                **fig,
                "error": bench.results.errors.get(key, ""),
            }
            for key, rounds in bench.results.windows.items()
            for rnd, fig in sorted(rounds.items())
        ],
    }
    out = args.out / f"hot-path-{int(time.time())}.json"
    out.write_text(json.dumps(raw, indent=1, default=str))
    text = report.section(bench.results, run, args.plot.name)
    print(text)
    if args.quick:
        log(f"quick run: raw figures in {out}; docs left as they are")
        return 0
    plot.plot(bench.results, args.concurrency, bench.workers, args.plot)
    # Read and write at once: another section of the file may be written by another bench.
    existing = args.doc.read_text() if args.doc.exists() else None
    args.doc.write_text(report.replace_section(existing, text))
    log(f"wrote {args.doc}, {args.plot} and {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
