"""The PNG of the hot-path report: throughput and p99 against calls in flight."""

from __future__ import annotations

import statistics
from pathlib import Path

from tests.bench.report import Key, Results

SERIES = (
    ("keybroker", "Decrypt", "keybroker Decrypt", "tab:blue"),
    ("keybroker", "GenerateDataKey", "keybroker GenerateDataKey", "tab:green"),
    ("keybroker", "IssueToken", "keybroker IssueToken", "tab:purple"),
    ("keybroker", "Encrypt 1 KiB", "keybroker Encrypt 1 KiB", "tab:olive"),
    ("openbao", "decrypt", "OpenBao decrypt", "tab:red"),
    ("openbao", "datakey", "OpenBao datakey", "tab:orange"),
    ("echo", "echo sync", "gRPC echo (sync)", "tab:gray"),
    ("echo", "echo aio", "gRPC echo (aio)", "black"),
)


def plot(results: Results, concurrency: list[int], workers: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 6.5))
    for system, scenario, label, colour in SERIES:
        for w in workers if system != "openbao" else [1]:
            xs, mids, lows, highs = [], [], [], []
            p99s = []
            for c in concurrency:
                key = Key(system, scenario, w, c)
                rps = results.values(key, "rps")
                if not rps:
                    continue
                xs.append(c)
                mids.append(statistics.median(rps))
                lows.append(mids[-1] - min(rps))
                highs.append(max(rps) - mids[-1])
                p99s.append(statistics.median(results.values(key, "p99_ms")))
            if not xs:
                continue
            style = "-" if w == 1 else "--"
            plural = "s" if w > 1 else ""
            alone = len(workers) == 1 or system == "openbao"
            name = label if alone else f"{label}, {w} worker{plural}"
            left.errorbar(
                xs, mids, yerr=[lows, highs], fmt=style + "o", color=colour, label=name, capsize=3
            )
            right.plot(xs, p99s, style + "o", color=colour, label=name)
    for ax, title, unit in ((left, "Throughput", "requests/s"), (right, "p99 latency", "ms")):
        ax.set_xscale("log")
        ax.set_xticks(concurrency)
        ax.set_xticklabels([str(c) for c in concurrency])
        ax.set_xlabel("calls in flight")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    right.set_yscale("log")
    handles, labels = left.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle("Hot path: keybroker and OpenBao Transit (medians; bars: min-max of rounds)")
    fig.tight_layout(rect=(0, 0.16, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
