"""The slow-disk benchmark's shim, arithmetic and its own section of the docs (no timing)."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.bench import procs, report, slowdisk

PROBE = """
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o600)
os.write(fd, b"x")
os.fdatasync(fd)
os.fsync(fd)
try:
    os.fdatasync(987)
except OSError as exc:
    print(exc.errno)
"""


@pytest.mark.skipif(not shutil.which("gcc") or not shutil.which("strace"), reason="gcc, strace")
def test_the_shim_sleeps_before_each_flush_and_keeps_its_result(tmp_path: Path) -> None:
    shim = slowdisk.build_shim()
    trace = tmp_path / "trace"
    out = subprocess.run(
        ["strace", "-f", "-qq", "-o", str(trace), "-e", "trace=clock_nanosleep,nanosleep,"
         "fsync,fdatasync", sys.executable, "-c", PROBE, str(tmp_path / "f")],
        env={"LD_PRELOAD": str(shim), "SLOWSYNC_DELAY_US": "1500"},
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert out.stdout.strip() == "9"  # EBADF, as without the shim
    calls = [
        line.split("(")[0].split()[-1]
        for line in trace.read_text().splitlines()
        if "(" in line and "resumed" not in line
    ]
    flushes = [i for i, name in enumerate(calls) if name in ("fsync", "fdatasync")]
    assert len(flushes) == 3
    for i in flushes:  # each flush right after a sleep of the configured length
        assert calls[i - 1] in ("clock_nanosleep", "nanosleep")
    assert "tv_nsec=1500000" in trace.read_text()


def _args(**kw: object) -> argparse.Namespace:
    base = {"rounds": 3, "window": 2.0, "delay_ms": 2.0, "concurrency": [1, 64]}
    return argparse.Namespace(**(base | {"scenarios": ["Decrypt"]} | kw))


def _cells(fast: list[float], slow: list[float]) -> slowdisk.Cells:
    def cell(rps: list[float]) -> dict[str, list[float]]:
        return {f: list(rps) if f == "rps" else [1.0] * len(rps) for f in slowdisk.FIGURES}

    return {
        ("this disk", "Decrypt", 64): cell(fast),
        ("fsync +2 ms", "Decrypt", 64): cell(slow),
        ("this disk", "Decrypt", 1): cell([500.0]),
        ("fsync +2 ms", "Decrypt", 1): cell([200.0]),
    }


def _systems() -> list[slowdisk.System]:
    return [
        slowdisk.System(name, SimpleNamespace(), "")  # type: ignore[arg-type]
        for name in ("this disk", "fsync +2 ms")
    ]


def test_the_ratio_is_slow_over_fast_at_the_top_concurrency() -> None:
    found = slowdisk.ratios(_args(), _cells([1000, 1200, 900], [700, 800, 760]), _systems())
    assert found == {"Decrypt": pytest.approx(760 / 1000)}


def test_the_section_says_whether_the_goal_is_met() -> None:
    meta = {
        "date": "d", "minutes": "1", "generator": "cpp x1", "disk": "ext4 (/dev/x)",
        "fdatasync_ms": "0.2", "load": "0",
    }  # fmt: skip
    met = slowdisk.section(
        _args(), _cells([1000] * 3, [850] * 3), _systems(), {"Decrypt": 0.85}, meta
    )
    missed = slowdisk.section(_args(), _cells([1000], [700]), _systems(), {"Decrypt": 0.7}, meta)
    assert "| Decrypt | 0.85x | yes |" in met
    assert "| Decrypt | 0.70x | no |" in missed
    assert "| fsync +2 ms | Decrypt | 64 | 850 [850-850] |" in met


def test_each_benchmark_replaces_only_its_own_section() -> None:
    doc = report.replace_section(None, "hot path v1")
    doc = report.replace_section(doc, "slow v1", slowdisk.BEGIN, slowdisk.END)
    doc = report.replace_section(doc, "hot path v2")
    doc = report.replace_section(doc, "slow v2", slowdisk.BEGIN, slowdisk.END)
    assert "hot path v2" in doc and "slow v2" in doc
    assert "v1" not in doc
    assert doc.index(report.END) < doc.index(slowdisk.BEGIN)


def test_the_file_system_of_a_path_is_its_longest_mount_point() -> None:
    assert procs.filesystem(Path("/proc/self")).startswith("proc ")
    assert procs.filesystem(Path("/")) != "n/a"
