"""From the windows of one run to medians, the goal ratios and the Markdown section.

A result is one measured window: system, scenario, workers, calls in flight, round, and its
figures (req/s, p50/p99 ms, server and generator CPU ms per request). Figures are quoted as
the median of the rounds with the min-max spread; a ratio is computed within each round (both
systems measured minutes apart in the same round) and quoted the same way.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

BEGIN = "<!-- hot-path:begin (written by make bench: tests/bench/hotpath.py) -->"
END = "<!-- hot-path:end -->"
TITLE = "## Hot path: keybroker and OpenBao"
BATCH_ITEMS = 100
#: Batch calls in flight at most: 16 calls of 100 items already keep 1,600 items in flight, and
#: more only makes each window wait seconds for its calls to drain (make bench stays < 10 min).
BATCH_MAX_INFLIGHT = 16


@dataclass(frozen=True, slots=True)
class Key:
    system: str  # keybroker | openbao | echo | pkcs11
    scenario: str
    workers: int  # server processes (1 for OpenBao)
    inflight: int


@dataclass
class Results:
    """Every window of the run, by key and round."""

    rounds: int
    windows: dict[Key, dict[int, dict[str, float]]] = field(default_factory=dict)
    errors: dict[Key, str] = field(default_factory=dict)

    def add(self, key: Key, rnd: int, figures: dict[str, float], error: str = "") -> None:
        self.windows.setdefault(key, {})[rnd] = figures
        if error and key not in self.errors:
            self.errors[key] = error

    def values(self, key: Key, metric: str) -> list[float]:
        return [f[metric] for f in self.windows.get(key, {}).values() if metric in f]

    def ratio(
        self, num: Key, den: Key, metric_num: str, metric_den: str | None = None, scale: float = 1.0
    ) -> list[float]:
        """num/den within each round where both were measured."""
        out = []
        for rnd, fig in self.windows.get(num, {}).items():
            other = self.windows.get(den, {}).get(rnd)
            if other and other.get(metric_den or metric_num) and metric_num in fig:
                out.append(fig[metric_num] * scale / other[metric_den or metric_num])
        return out


def spread(values: list[float], fmt: Callable[[float], str]) -> str:
    if not values:
        return "n/a"
    med = statistics.median(values)
    if len(values) == 1:
        return fmt(med)
    return f"{fmt(med)} [{fmt(min(values))}-{fmt(max(values))}]"


def num(x: float) -> str:
    """Three significant figures, no exponent."""
    if x >= 100:
        return f"{x:,.0f}"
    if x >= 10:
        return f"{x:.1f}"
    if x >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def ratio_fmt(x: float) -> str:
    return f"{x:.2f}x"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def figures_table(results: Results, keys: list[Key], show_workers: bool) -> list[str]:
    header = ["scenario", "in flight"] + (["workers"] if show_workers else [])
    header += ["req/s", "p50 ms", "p99 ms", "server CPU ms/req", "generator CPU ms/req"]
    rows = []
    for key in keys:
        if key not in results.windows:
            continue
        items = BATCH_ITEMS if "batch" in key.scenario else 1
        rps = [v * items for v in results.values(key, "rps")]
        row = [key.scenario + (" (items/s)" if items > 1 else ""), str(key.inflight)]
        row += [str(key.workers)] if show_workers else []
        row += [spread(rps, num)]
        row += [spread(results.values(key, m), num) for m in ("p50_ms", "p99_ms")]
        row += [spread(results.values(key, m), num) for m in ("server_cpu_ms", "gen_cpu_ms")]
        if results.errors.get(key):
            row[0] += f" (errors: {results.errors[key][:80]})"
        rows.append(row)
    return table(header, rows)


@dataclass(frozen=True, slots=True)
class Goal:
    text: str
    target: float
    higher_is_better: bool
    values: list[float]

    def row(self) -> list[str]:
        bound = ">=" if self.higher_is_better else "<="
        if not self.values:
            return [self.text, f"{bound} {ratio_fmt(self.target)}", "n/a", "not measured"]
        med = statistics.median(self.values)
        met = med >= self.target if self.higher_is_better else med <= self.target
        return [
            self.text,
            f"{bound} {ratio_fmt(self.target)}",
            spread(self.values, ratio_fmt),
            "met" if met else "missed",
        ]


def goals(results: Results, workers: list[int], top: int) -> list[Goal]:
    """The issue's goals as ratios from this run, for each worker count measured."""
    out: list[Goal] = []
    bao = {s: Key("openbao", s, 1, top) for s in ("decrypt", "datakey", "batch decrypt")}
    bao1 = {s: Key("openbao", s, 1, 1) for s in ("decrypt", "datakey")}
    for w in workers:
        kb = {s: Key("keybroker", s, w, top) for s in ("Decrypt", "GenerateDataKey")}
        tag = f"({w} worker{'s' if w > 1 else ''})"
        out += [
            Goal(
                f"Decrypt at {top}: requests per server CPU-second vs OpenBao {tag}",
                1.5,
                True,
                results.ratio(bao["decrypt"], kb["Decrypt"], "server_cpu_ms"),
            ),
            Goal(
                f"Decrypt throughput at {top} vs OpenBao {tag}",
                1.5,
                True,
                results.ratio(kb["Decrypt"], bao["decrypt"], "rps"),
            ),
            Goal(
                f"GenerateDataKey throughput at {top} vs OpenBao datakey {tag}",
                1.5,
                True,
                results.ratio(kb["GenerateDataKey"], bao["datakey"], "rps"),
            ),
            Goal(
                f"Decrypt p99 at {top} vs OpenBao {tag}",
                0.25,
                False,
                results.ratio(kb["Decrypt"], bao["decrypt"], "p99_ms"),
            ),
            Goal(
                f"GenerateDataKey p99 at {top} vs OpenBao datakey {tag}",
                0.25,
                False,
                results.ratio(kb["GenerateDataKey"], bao["datakey"], "p99_ms"),
            ),
        ]
        if w == 1:
            out += [
                Goal(
                    "Decrypt p50 at 1 in flight vs OpenBao",
                    1.0,
                    False,
                    results.ratio(Key("keybroker", "Decrypt", 1, 1), bao1["decrypt"], "p50_ms"),
                ),
                Goal(
                    "GenerateDataKey p50 at 1 in flight vs OpenBao datakey",
                    1.0,
                    False,
                    results.ratio(
                        Key("keybroker", "GenerateDataKey", 1, 1), bao1["datakey"], "p50_ms"
                    ),
                ),
            ]
        out.append(
            Goal(
                f"Decrypt throughput at {top} vs the gRPC echo ceiling {tag}",
                0.8,
                True,
                _vs_ceiling(results, kb["Decrypt"], w, top),
            )
        )
        for op, raw in (("Decrypt", "decrypt"), ("GenerateDataKey", "datakey")):
            batch = Key("keybroker", f"{op} batch", w, min(top, BATCH_MAX_INFLIGHT))
            out.append(
                Goal(
                    f"{op} batch ({min(top, BATCH_MAX_INFLIGHT)} calls of {BATCH_ITEMS} in "
                    f"flight): items/s vs raw PyKCS11 {raw} {tag}",
                    0.7,
                    True,
                    results.ratio(batch, Key("pkcs11", raw, 1, 1), "rps", scale=BATCH_ITEMS),
                )
            )
    return out


def _vs_ceiling(results: Results, kb: Key, workers: int, top: int) -> list[float]:
    """Against the faster echo variant (sync or aio) with as many processes, per round."""
    out = []
    for rnd, fig in results.windows.get(kb, {}).items():
        ceilings = [
            results.windows.get(Key("echo", s, workers, top), {}).get(rnd, {}).get("rps", 0.0)
            for s in ("echo sync", "echo aio")
        ]
        if max(ceilings) > 0:
            out.append(fig["rps"] / max(ceilings))
    return out


def replace_section(document: str | None, section: str, begin: str = BEGIN, end: str = END) -> str:
    """The document with the section between `begin` and `end` replaced, or appended.

    With no document, a new one holding only that section. Every benchmark writes its own
    section of docs/benchmarks.md between its own markers and leaves the others as they are.
    """
    block = f"{begin}\n{section.rstrip()}\n{end}\n"
    if not document:
        return "# Benchmarks\n\n" + block
    if begin in document and end in document:
        head, rest = document.split(begin, 1)
        tail = rest.split(end, 1)[1].lstrip("\n")
        return head + block + ("\n" + tail if tail else "")
    return document.rstrip("\n") + "\n\n" + block


@dataclass
class Run:
    """What the section says besides the figures."""

    date: str
    minutes: float
    window_s: float
    generator: str
    http_generator: str
    workers: list[int]
    concurrency: list[int]
    machine: dict[str, str]
    commands: list[str]
    calibration: list[list[str]]
    notes: list[str]


def section(results: Results, run: Run, plot_name: str) -> str:
    top = max(run.concurrency)
    kb_keys = [
        Key("keybroker", s, w, c)
        for s in (
            "Decrypt",
            "GenerateDataKey",
            "IssueToken",
            "Encrypt 1 KiB",
            "Decrypt batch",
            "GenerateDataKey batch",
        )
        for w in run.workers
        for c in run.concurrency
    ]
    bao_keys = [
        Key("openbao", s, 1, c)
        for s in ("decrypt", "datakey", "batch decrypt")
        for c in run.concurrency
    ]
    echo_keys = [
        Key("echo", s, w, c)
        for s in ("echo sync", "echo aio")
        for w in run.workers
        for c in run.concurrency
    ]
    lines = [
        TITLE,
        "",
        f"Written by `make bench` (`tests/bench/hotpath.py`) on {run.date}; the run took "
        f"{run.minutes:.1f} min. Each figure is the median of {results.rounds} rounds with the "
        "min-max spread in brackets. Each round measures keybroker and OpenBao one after the "
        "other (which one goes first alternates), every scenario in a window of "
        f"{run.window_s:g} s after a warm-up. Latency percentiles cover every request completed "
        "in the window. Server CPU is utime + stime + cutime + cstime of the server's whole "
        "process group from /proc over the window, per request completed; generator CPU is the "
        "same for the load generator's processes. Server and generator share the machine's "
        f"{run.machine.get('nproc', '?')} cores (other work may run beside them): per core, "
        "CPU per request is the figure to compare, throughput depends on the neighbours.",
        "",
        f"![Throughput and p99 against calls in flight]({plot_name})",
        "",
        "### Goals, as ratios from this run",
        "",
        *table(
            ["goal", "target", "measured", ""], [g.row() for g in goals(results, run.workers, top)]
        ),
        "",
        f"### keybroker over gRPC/mTLS (generator: {run.generator})",
        "",
        *figures_table(results, kb_keys, show_workers=True),
        "",
        f"### OpenBao Transit over HTTP, file audit device (generator: {run.http_generator})",
        "",
        *figures_table(results, bao_keys, show_workers=False),
        "",
        "### Ceilings: a gRPC echo with the broker's server set-up, the raw PyKCS11 rate",
        "",
        *figures_table(results, echo_keys, show_workers=True),
        "",
        *table(
            ["raw PyKCS11 on SoftHSM2, one process", "ops/s", "CPU ms/op"],
            [
                [
                    label,
                    spread(results.values(Key("pkcs11", raw, 1, 1), "rps"), num),
                    spread(results.values(Key("pkcs11", raw, 1, 1), "server_cpu_ms"), num),
                ]
                for raw, label in (
                    ("decrypt", "AES-GCM decrypt of a 32-byte data key"),
                    ("datakey", "GenerateRandom + AES-GCM encrypt (data key)"),
                )
            ],
        ),
        "",
        f"### Load generator: the candidates against the echo server at {top} in flight",
        "",
        *table(
            [
                "generator",
                "echo server",
                "req/s",
                "generator CPU ms/req",
                "server CPU ms/req",
                "note",
            ],
            run.calibration,
        ),
        "",
        f"Used: **{run.generator}**, the lowest generator CPU per request. "
        + _headroom(results, run),
        "",
    ]
    if run.notes:
        lines += ["### Not measured in this run", "", *[f"- {n}" for n in run.notes], ""]
    lines += ["### Machine, versions, command lines", ""]
    lines += [f"- {k}: {v}" for k, v in run.machine.items() if k != "executable"]
    lines += ["", "```", *run.commands, "```", ""]
    return "\n".join(lines)


def _headroom(results: Results, run: Run) -> str:
    """How much of a core the generator needed at the echo ceiling: is it the bottleneck?"""
    top = max(run.concurrency)
    best = None
    for scenario in ("echo sync", "echo aio"):
        key = Key("echo", scenario, 1, top)
        rps, gen = results.values(key, "rps"), results.values(key, "gen_cpu_ms")
        if rps and gen:
            cores = statistics.median(rps) * statistics.median(gen) / 1000
            if best is None or cores > best[0]:
                best = (cores, scenario, statistics.median(rps))
    if best is None:
        return ""
    return (
        f"At the {best[1]} ceiling ({num(best[2])} req/s, {top} in flight) it used "
        f"{best[0]:.2f} of a core, the server the rest of the machine's."
    )
