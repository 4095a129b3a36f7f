"""`make soak`: steady mixed load for minutes; errors, latency, memory and descriptors over time.

    python -m tests.bench.soak [--seconds 300] [--rate 100] [--interval 5]

Starts a broker as a user would (embedded default, throwaway home, its own process group:
`keybroker.py`), then `soakgen.py` in a process of its own sends a fixed rate of mixed calls
over mTLS (MIX: Decrypt mostly, then GenerateDataKey, Encrypt and IssueToken), well below
what the broker can serve (docs/benchmarks.md). Each time the generator reports an interval,
the broker's resident memory (VmRSS of /proc/PID/status) and open descriptors (/proc/PID/fd)
are read, summed over its process group.

At the end it checks, and says so in the report (exit status 1 when a check fails):
- no call failed and none was skipped (the generator never had to hold one back);
- the rate was kept;
- memory and descriptors are flat: the last third of the samples against the first third
  (after the first interval, the warm-up), within RSS_TOLERANCE / FD_TOLERANCE;
- the audit trail holds exactly one event per call the broker answered, by operation
  (ListAuditEvents after the set-up, the generator's identities only), every one ALLOWED,
  and VerifyAuditLog passes.

Writes docs/soak.md (the section between BEGIN and END) and docs/soak.png.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from keybroker.v1 import audit_pb2, audit_pb2_grpc, resources_pb2

from tests.bench import keybroker, procs
from tests.bench.gen import ROOT

DOC = ROOT / "docs" / "soak.md"
PNG = ROOT / "docs" / "soak.png"
BEGIN = "<!-- soak:begin (written by make soak: tests/bench/soak.py) -->"
END = "<!-- soak:end -->"
#: The mix: calls of each kind per round of 20, interleaved.
MIX = {"Decrypt": 14, "GenerateDataKey": 3, "Encrypt 1 KiB": 2, "IssueToken": 1}
#: The audit operation each call of the mix is recorded as.
OPERATION = {
    "Decrypt": "Decrypt",
    "GenerateDataKey": "GenerateDataKey",
    "Encrypt 1 KiB": "Encrypt",
    "IssueToken": "IssueToken",
}
#: Flat means: the last third's mean at most this much above the first third's
#: (relative, or absolute in MiB, whichever is larger).
RSS_TOLERANCE = (0.05, 4.0)
#: ... and the last third's highest descriptor count at most this many above the first's.
FD_TOLERANCE = 2
#: The rate must be kept to this fraction.
RATE_KEPT = 0.95


@dataclass(frozen=True, slots=True)
class Sample:
    t: float
    calls_per_s: float
    ok: int
    errors: dict[str, int]
    p50_ms: float
    p99_ms: float
    skipped: int
    rss_mib: float
    fds: int


@dataclass
class Run:
    seconds: float
    rate: float
    interval: float
    samples: list[Sample] = field(default_factory=list)
    final: dict[str, Any] = field(default_factory=dict)
    audit: dict[str, Any] = field(default_factory=dict)
    machine: dict[str, str] = field(default_factory=dict)
    command: list[str] = field(default_factory=list)
    started: str = ""
    took_s: float = 0.0


# -- the broker's process group from /proc ---------------------------------------------------


def group_pids(pgid: int) -> list[int]:
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[2]) == pgid:
            pids.append(int(entry.name))
    return pids


def group_rss_mib(pgid: int) -> float:
    """VmRSS summed over the group, in MiB."""
    total_kib = 0
    for pid in group_pids(pgid):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kib += int(line.split()[1])
        except OSError:
            continue
    return total_kib / 1024


def group_fds(pgid: int) -> int:
    total = 0
    for pid in group_pids(pgid):
        try:
            total += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            continue
    return total


# -- the run -----------------------------------------------------------------------------------


def _audit_stub(broker: keybroker.Broker) -> tuple[grpc.Channel, audit_pb2_grpc.AuditStub]:
    ch = broker.channel("auditor")
    return ch, audit_pb2_grpc.AuditStub(ch)


def last_sequence(broker: keybroker.Broker) -> int:
    ch, stub = _audit_stub(broker)
    with ch:
        last = 0
        for r in stub.ListAuditEvents(audit_pb2.ListAuditEventsRequest(), timeout=120):
            last = max(last, r.event.sequence)
        return last


def audit_check(broker: keybroker.Broker, after: int, final: dict[str, Any]) -> dict[str, Any]:
    """Events recorded since `after` for the generator's identities, by operation and outcome,
    against the calls the broker answered (every status but a refusal at the door: with no
    error at all, simply the calls that succeeded); and VerifyAuditLog."""
    answered: Counter[str] = Counter()
    for name, tally in final["totals"].items():
        at_door = sum(n for code, n in tally["errors"].items() if code == "RESOURCE_EXHAUSTED")
        answered[OPERATION[name]] += tally["ok"] + sum(tally["errors"].values()) - at_door
    events: Counter[str] = Counter()
    outcomes: Counter[str] = Counter()
    ch, stub = _audit_stub(broker)
    with ch:
        request = audit_pb2.ListAuditEventsRequest(after_sequence=after)
        for r in stub.ListAuditEvents(request, timeout=600):
            e = r.event
            if e.principal in ("producer", "consumer"):
                events[e.operation] += 1
                outcomes[resources_pb2.Outcome.Name(e.outcome)] += 1
        report = stub.VerifyAuditLog(audit_pb2.VerifyAuditLogRequest(), timeout=600)
    return {
        "answered": dict(answered),
        "events": dict(events),
        "outcomes": dict(outcomes),
        "equal": answered == events,
        "verify_ok": bool(report.ok),
        "events_checked": int(report.events_checked),
    }


def run(seconds: float, rate: float, interval: float) -> Run:
    result = Run(seconds, rate, interval, machine=_machine())
    result.started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    began = time.monotonic()
    broker = keybroker.start(1, with_flag=False)
    result.command = broker.cmd
    try:
        after = last_sequence(broker)
        spec = _spec(broker, seconds, rate, interval)
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(spec, f)
        try:
            gen = subprocess.Popen(
                [sys.executable, "-m", "tests.bench.soakgen", f.name],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                text=True,
            )
            assert gen.stdout is not None
            for line in gen.stdout:
                obj = json.loads(line)
                if obj.get("final"):
                    result.final = obj
                    continue
                sample = _sample(obj, interval, broker.pgid)
                result.samples.append(sample)
                print(_progress(sample), flush=True)
            if gen.wait() != 0 or not result.final:
                raise RuntimeError("the load generator failed")
        finally:
            Path(f.name).unlink(missing_ok=True)
        result.audit = audit_check(broker, after, result.final)
    finally:
        broker.stop()
    result.took_s = time.monotonic() - began
    return result


def _spec(broker: keybroker.Broker, seconds: float, rate: float, interval: float) -> dict[str, Any]:
    calls = []
    for name, weight in MIX.items():
        call = broker.calls[name]
        assert call.tls is not None
        calls.append(
            {
                "name": name,
                "method": call.method,
                "payload_hex": call.payload.hex(),
                "weight": weight,
                "ca": str(call.tls.ca),
                "cert": str(call.tls.cert),
                "key": str(call.tls.key),
            }
        )
    return {
        "target": broker.target,
        "rate": rate,
        "seconds": seconds,
        "interval": interval,
        "calls": calls,
    }


def _sample(obj: dict[str, Any], interval: float, pgid: int) -> Sample:
    return Sample(
        t=float(obj["t"]),
        calls_per_s=obj["done"] / interval,
        ok=int(obj["ok"]),
        errors=dict(obj["errors"]),
        p50_ms=float(obj["p50_ms"]),
        p99_ms=float(obj["p99_ms"]),
        skipped=int(obj["skipped"]),
        rss_mib=group_rss_mib(pgid),
        fds=group_fds(pgid),
    )


def _progress(s: Sample) -> str:
    errors = sum(s.errors.values())
    return (
        f"{s.t:7.0f} s  {s.calls_per_s:6.1f} calls/s  errors {errors}  p50 {s.p50_ms:6.2f} ms  "
        f"p99 {s.p99_ms:7.2f} ms  RSS {s.rss_mib:6.1f} MiB  fds {s.fds}"
    )


def _machine() -> dict[str, str]:
    info = procs.machine()
    keep = ("nproc", "cpu_model", "kernel", "python", "grpcio", "PyKCS11", "softhsm2")
    out = {k: info[k] for k in keep if k in info}
    out["load average at the start"] = info.get("load average at the start", "n/a")
    return out


# -- the verdict ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Drift:
    """A series' first third against its last third (warm-up interval left out)."""

    first: float
    last: float
    slope_per_min: float

    @property
    def change(self) -> float:
        return self.last - self.first


def thirds(ts: list[float], values: list[float], reduce: Any = statistics.fmean) -> Drift:
    n = len(values)
    third = max(1, n // 3)
    first, last = reduce(values[:third]), reduce(values[-third:])
    slope = statistics.linear_regression(ts, values).slope * 60 if n >= 2 else 0.0
    return Drift(first, last, slope)


def steady(samples: list[Sample]) -> list[Sample]:
    """The samples after the first (the warm-up: connections, caches, first sessions)."""
    return samples[1:] if len(samples) > 3 else samples


def verdict(r: Run) -> list[tuple[str, bool, str]]:
    """(check, passed, what was measured) for each check of the run."""
    body = steady(r.samples)
    ts = [s.t for s in body]
    rss = thirds(ts, [s.rss_mib for s in body])
    fds = thirds(ts, [float(s.fds) for s in body], max)
    errors = _errors(r)
    sent, skipped = r.final["sent"], r.final["skipped"]
    achieved = sent / r.final["seconds"]
    rel, mib = RSS_TOLERANCE
    a = r.audit
    return [
        ("no call failed", not errors, _codes(errors) or "0 errors"),
        ("no call held back", skipped == 0, f"{skipped} skipped"),
        (
            f"rate kept (>= {RATE_KEPT:.0%})",
            achieved >= RATE_KEPT * r.rate,
            f"{achieved:.1f} calls/s sent for {r.rate:g} asked",
        ),
        (
            "RSS flat",
            rss.change <= max(rel * rss.first, mib),
            f"{rss.first:.1f} -> {rss.last:.1f} MiB ({rss.change:+.1f}); "
            f"slope {rss.slope_per_min:+.2f} MiB/min",
        ),
        (
            "descriptors flat",
            fds.change <= FD_TOLERANCE,
            f"{fds.first:.0f} -> {fds.last:.0f} ({fds.change:+.0f}); "
            f"slope {fds.slope_per_min:+.2f} /min",
        ),
        (
            "one audit event per call answered",
            bool(a["equal"]),
            f"{sum(a['events'].values())} events for {sum(a['answered'].values())} calls",
        ),
        (
            "every event ALLOWED",
            set(a["outcomes"]) <= {"OUTCOME_ALLOWED"},
            _codes(a["outcomes"]) or "no events",
        ),
        (
            "audit trail verifies",
            bool(a["verify_ok"]),
            f"VerifyAuditLog ok={a['verify_ok']}, {a['events_checked']} events checked",
        ),
    ]


def _errors(r: Run) -> Counter[str]:
    total: Counter[str] = Counter()
    for tally in r.final["totals"].values():
        total.update(tally["errors"])
    return total


def _codes(errors: dict[str, int] | Counter[str]) -> str:
    return ", ".join(f"{code} {n}" for code, n in sorted(errors.items()))


# -- the report -------------------------------------------------------------------------------


def section(r: Run) -> str:
    checks = verdict(r)
    passed = all(ok for _, ok, _ in checks)
    f = r.final
    lines = [
        "## The last run",
        "",
        f"Written by `make soak` (`tests/bench/soak.py`) on {r.started}; the run took "
        f"{r.took_s / 60:.1f} min. {f['sent']:,} calls in {f['seconds']:.0f} s at a fixed "
        f"rate of {r.rate:g} calls/s ({_mix()}), from one generator process over mTLS to one "
        f"broker process; samples every {r.interval:g} s. Latency over the whole run: "
        f"p50 {f['p50_ms']:.2f} ms, p99 {f['p99_ms']:.2f} ms.",
        "",
        f"**{'Every check passed.' if passed else 'Some checks failed.'}**",
        "",
        "![Calls, latency, memory and descriptors over time](soak.png)",
        "",
        "| check | result | measured |",
        "|---|---|---|",
        *(f"| {name} | {'pass' if ok else 'FAIL'} | {got} |" for name, ok, got in checks),
        "",
        "### Calls and audit events by operation",
        "",
        "| call | operation | OK | errors | audit events |",
        "|---|---|---|---|---|",
    ]
    events = r.audit["events"]
    for name in MIX:
        tally = f["totals"][name]
        op = OPERATION[name]
        lines.append(
            f"| {name} | {op} | {tally['ok']:,} | {_codes(tally['errors']) or 0} | "
            f"{events.get(op, 0):,} |"
        )
    lines += [
        "",
        "### Over time",
        "",
        _table_note(r.samples),
        "",
        "| t (s) | calls/s | errors | p50 ms | p99 ms | RSS MiB | fds |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in _rows(r.samples):
        lines.append(
            f"| {s.t:.0f} | {s.calls_per_s:.1f} | {sum(s.errors.values())} | {s.p50_ms:.2f} | "
            f"{s.p99_ms:.2f} | {s.rss_mib:.1f} | {s.fds} |"
        )
    lines += [
        "",
        "### Machine and command",
        "",
        *(f"- {k}: {v}" for k, v in r.machine.items()),
        f"- broker: `{' '.join(_short(r.command))}`",
        f"- generator: `python -m tests.bench.soakgen SPEC` (rate {r.rate:g}/s, "
        f"{r.seconds:g} s, interval {r.interval:g} s)",
    ]
    return "\n".join(lines) + "\n"


MAX_ROWS = 40


def _rows(samples: list[Sample]) -> list[Sample]:
    step = max(1, -(-len(samples) // MAX_ROWS))
    picked = samples[::step]
    if samples and picked[-1] is not samples[-1]:
        picked.append(samples[-1])
    return picked


def _table_note(samples: list[Sample]) -> str:
    step = max(1, -(-len(samples) // MAX_ROWS))
    which = "Every interval" if step == 1 else f"One interval in {step} (and the last)"
    return (
        f"{which}: calls completed per second, failed calls and latency percentiles over the "
        "calls completed in that interval; the broker's RSS and descriptors when it ended."
    )


def _span(seconds: float) -> str:
    return f"{seconds / 60:g} min" if seconds >= 120 else f"{seconds:g} s"


def _mix() -> str:
    total = sum(MIX.values())
    return ", ".join(f"{name} {w / total:.0%}" for name, w in MIX.items())


def _short(cmd: list[str]) -> list[str]:
    """The command with the throwaway home and port generalised."""
    generic = {"--home": "HOME", "--listen": "127.0.0.1:PORT"}
    out = ["python"]
    for prev, part in itertools.pairwise(cmd):
        out.append(generic.get(prev, part))
    return out


def write_doc(text: str, path: Path = DOC) -> None:
    """Replaces the section between BEGIN and END (the rest of the page is prose)."""
    block = f"{BEGIN}\n{text.rstrip()}\n{END}\n"
    document = path.read_text() if path.exists() else "# Soak\n\n"
    if BEGIN in document and END in document:
        head, rest = document.split(BEGIN, 1)
        tail = rest.split(END, 1)[1].lstrip("\n")
        document = head + block + ("\n" + tail if tail else "")
    else:
        document = document.rstrip() + "\n\n" + block
    path.write_text(document)


def plot(r: Run, path: Path = PNG) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s.t / 60 for s in r.samples]
    fig, axes = plt.subplots(4, 1, figsize=(10, 10), sharex=True)
    calls, lat, mem, fd = axes
    calls.plot(t, [s.calls_per_s for s in r.samples], color="tab:blue", label="calls/s")
    calls.bar(
        t,
        [sum(s.errors.values()) / r.interval for s in r.samples],
        width=r.interval / 60 * 0.8,
        color="tab:red",
        label="errors/s",
    )
    calls.axhline(r.rate, color="gray", linestyle=":", label=f"rate asked ({r.rate:g}/s)")
    calls.set_ylabel("calls/s")
    calls.set_ylim(bottom=0)
    lat.plot(t, [s.p50_ms for s in r.samples], color="tab:green", label="p50")
    lat.plot(t, [s.p99_ms for s in r.samples], color="tab:orange", label="p99")
    lat.set_ylabel("latency (ms)")
    lat.set_ylim(bottom=0)
    mem.plot(t, [s.rss_mib for s in r.samples], color="tab:purple", label="RSS")
    mem.set_ylabel("broker RSS (MiB)")
    low = min(s.rss_mib for s in r.samples)
    mem.set_ylim(low * 0.9, max(s.rss_mib for s in r.samples) * 1.1)
    fd.plot(t, [s.fds for s in r.samples], color="tab:brown", label="open descriptors")
    fd.set_ylabel("broker fds")
    fd.set_ylim(0, max(s.fds for s in r.samples) * 1.3)
    fd.set_xlabel("minutes")
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(
        f"Soak: {r.rate:g} calls/s of mixed calls for {_span(r.seconds)} (one broker process, mTLS)"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--rate", type=float, default=100.0, help="calls per second")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    args = parser.parse_args(argv)
    r = run(args.seconds, args.rate, args.interval)
    write_doc(section(r))
    plot(r)
    checks = verdict(r)
    for name, ok, got in checks:
        print(f"{'pass' if ok else 'FAIL'}  {name}: {got}")
    print(f"written: {DOC.relative_to(ROOT)}, {PNG.relative_to(ROOT)}")
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
