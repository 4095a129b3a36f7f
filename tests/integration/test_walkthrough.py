"""The README walkthrough, command by command, against a `keybroker-server` process."""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path

from tests.integration.test_server_process import start, stop, wait_ready

CLI = [sys.executable, "-c", "from keybroker_client.cli import main; main()"]


def kb(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_readme_walkthrough(tmp_path: Path) -> None:
    home = tmp_path / "var"
    proc = start(home)
    try:
        wait_ready(proc, home)
        r = kb(
            tmp_path,
            "--as",
            "admin",
            "keys",
            "create",
            "patients",
            "--description",
            "cohort data",
            "--grant",
            "producer:encrypt",
            "--grant",
            "consumer:decrypt:dataset=cohort-*",
        )
        assert r.returncode == 0, r.stderr
        r = kb(
            tmp_path,
            "--as",
            "producer",
            "datakey",
            "patients",
            "--context",
            "dataset=cohort-42",
            "--out",
            "patients.key.wrapped",
            "--plaintext-out",
            "patients.key",
        )
        assert r.returncode == 0, r.stderr
        data_key = (tmp_path / "patients.key").read_bytes()
        assert len(data_key) == 32
        assert (tmp_path / "patients.key").stat().st_mode & 0o777 == 0o600
        assert base64.b64encode(data_key).decode() not in r.stdout
        r = kb(
            tmp_path,
            "--as",
            "consumer",
            "token",
            "issue",
            "patients",
            "--context",
            "dataset=cohort-42",
            "--justification",
            "survival study 42",
        )
        assert r.returncode == 0, r.stderr
        token = r.stdout.strip()
        assert token.count(".") == 2
        r = kb(
            tmp_path,
            "--as",
            "consumer",
            "decrypt",
            "--token",
            token,
            "--context",
            "dataset=cohort-42",
            "--in",
            "patients.key.wrapped",
        )
        assert r.returncode == 0, r.stderr
        assert base64.b64decode(r.stdout.strip()) == data_key
        r = kb(
            tmp_path,
            "--as",
            "producer",
            "decrypt",
            "--token",
            token,
            "--context",
            "dataset=cohort-42",
            "--in",
            "patients.key.wrapped",
        )
        assert r.returncode == 5
        assert r.stderr.strip() == (
            "keybroker: UNAUTHENTICATED: token is bound to another "
            "client certificate; tokens cannot be shared"
        )
        assert "Traceback" not in r.stderr
        r = kb(tmp_path, "--as", "auditor", "audit", "list", "--key-id", "patients")
        assert r.returncode == 0 and "DENIED" in r.stdout and "Decrypt" in r.stdout
        r = kb(tmp_path, "--as", "auditor", "audit", "verify")
        assert r.returncode == 0, r.stdout
        r = kb(tmp_path, "--as", "admin", "keys", "rotate", "patients")
        assert r.returncode == 0, r.stderr
        r = kb(
            tmp_path,
            "--as",
            "consumer",
            "decrypt",
            "--token",
            token,
            "--context",
            "dataset=cohort-42",
            "--in",
            "patients.key.wrapped",
        )
        assert base64.b64decode(r.stdout.strip()) == data_key
    finally:
        stop(proc)
