"""The README walkthrough, command by command, against a `keybroker-server` process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from broker.config import DEV_IDENTITIES
from broker.devpki import ensure_dev_pki
from tests.integration.signals import DEFAULT_SIGINT
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
        # Tab after `keybroker keys show pa` in a shell that sourced `keybroker completion bash`.
        completed = subprocess.run(
            CLI,
            cwd=tmp_path,
            env={
                **os.environ,
                "_KEYBROKER_COMPLETE": "bash_complete",
                "COMP_WORDS": "keybroker keys show pa",
                "COMP_CWORD": "3",
            },
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert (completed.returncode, completed.stdout) == (0, "plain,patients\n")
        rows = "".join(f"patient-{i},C50.9\n" for i in range(1, 100_001))
        (tmp_path / "cohort-42.csv").write_text(rows)  # what the README's `seq -f` writes
        r = kb(
            tmp_path,
            "--as",
            "producer",
            "encrypt-file",
            "cohort-42.csv",
            "cohort-42.csv.kbf",
            "--key-id",
            "patients",
            "--context",
            "dataset=cohort-42",
        )
        assert r.returncode == 0, r.stderr
        assert (r.stdout, r.stderr) == ("", "")
        sealed = (tmp_path / "cohort-42.csv.kbf").read_bytes()
        assert sealed[:4] == b"KBFS" and b"cohort-42" in sealed[:200]
        assert rows.encode()[:64] not in sealed

        def decrypt_file(
            who: str, src: str, out: str, *how: str
        ) -> subprocess.CompletedProcess[str]:
            return kb(tmp_path, "--as", who, "decrypt-file", src, out, *how)

        r = decrypt_file(
            "consumer",
            "cohort-42.csv.kbf",
            "cohort-42.out.csv",
            "--justification",
            "survival study 42",
        )
        assert r.returncode == 0, r.stderr
        assert (tmp_path / "cohort-42.out.csv").read_text() == rows
        assert (tmp_path / "cohort-42.out.csv").stat().st_mode & 0o777 == 0o600
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
        (tmp_path / "cohort-42.out.csv").unlink()
        r = decrypt_file("consumer", "cohort-42.csv.kbf", "cohort-42.out.csv", "--token", token)
        assert r.returncode == 0, r.stderr
        assert (tmp_path / "cohort-42.out.csv").read_text() == rows
        r = decrypt_file("producer", "cohort-42.csv.kbf", "cohort-42.stolen.csv", "--token", token)
        assert r.returncode == 5
        assert r.stderr.strip() == (
            "keybroker: UNAUTHENTICATED: token is bound to another "
            "client certificate; tokens cannot be shared"
        )
        assert "Traceback" not in r.stderr
        (tmp_path / "cohort-42.cut.kbf").write_bytes(sealed[:1_000_000])  # head -c 1000000
        r = decrypt_file(
            "consumer", "cohort-42.cut.kbf", "cohort-42.cut.csv", "--justification", "check"
        )
        assert r.returncode == 4
        assert r.stderr.startswith(
            "keybroker: INVALID_ARGUMENT: cohort-42.cut.kbf: chunk 15 does not authenticate: "
        )
        assert r.stderr.endswith("; cohort-42.cut.csv was not written\n")
        assert not (tmp_path / "cohort-42.stolen.csv").exists()
        assert not (tmp_path / "cohort-42.cut.csv").exists()
        r = kb(tmp_path, "--as", "auditor", "audit", "list", "--key-id", "patients")
        assert r.returncode == 0 and "DENIED" in r.stdout and "Decrypt" in r.stdout
        r = kb(tmp_path, "--as", "auditor", "audit", "verify")
        assert r.returncode == 0, r.stdout
        r = kb(tmp_path, "--as", "admin", "keys", "rotate", "patients")
        assert r.returncode == 0, r.stderr
        (tmp_path / "cohort-42.out.csv").unlink()
        r = decrypt_file("consumer", "cohort-42.csv.kbf", "cohort-42.out.csv", "--token", token)
        assert r.returncode == 0, r.stderr
        assert (tmp_path / "cohort-42.out.csv").read_text() == rows
        # The token as `token issue` printed it: looked up, then revoked, by its subject.
        r = kb(tmp_path, "token", "lookup", token)
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith("UNVERIFIED: ") and "dataset=cohort-42" in r.stdout
        token_id = next(ln.split()[1] for ln in r.stdout.splitlines() if ln.startswith("token_id"))
        r = kb(tmp_path, "--as", "consumer", "token", "revoke", token)
        assert (r.returncode, r.stdout) == (0, f"revoked {token_id}\n"), r.stderr
        r = decrypt_file("consumer", "cohort-42.csv.kbf", "cohort-42.again.csv", "--token", token)
        assert r.returncode == 5, r.stderr
        assert "revoked" in r.stderr
        # A new service principal from the dev CA, trusted by the running broker at once.
        made = subprocess.run(
            [sys.executable, "-m", "broker", "--home", str(home), "dev-identity", "ingest"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert made.returncode == 0, made.stderr
        assert f"created {home.absolute() / 'pki' / 'ingest.pem'}" in made.stdout
        r = kb(tmp_path, "keys", "create", "ingest-key", "--grant", "ingest:encrypt")
        assert r.returncode == 0, r.stderr
        r = subprocess.run(
            [*CLI, "--as", "ingest", "encrypt", "ingest-key", "--out", "x.enc"],
            cwd=tmp_path,
            input="payload",
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 0, r.stderr
        r = kb(tmp_path, "--as", "ingest", "keys", "list")
        assert r.returncode == 6  # authenticated as ingest, which is no admin
        r = kb(tmp_path, "--as", "nobody", "keys", "list")
        assert r.returncode == 3
        assert "known under " in r.stderr
        assert ": admin, auditor, consumer, ingest, producer (create one" in r.stderr
    finally:
        stop(proc)


def _blocked_reading_stdin(pid: int) -> bool:
    """Whether the process sleeps in read(0, ...): the CLI is running and waits for input."""
    try:
        fields = Path(f"/proc/{pid}/syscall").read_text().split()
    except OSError:
        return False
    # read() is syscall 0 on x86_64 and 63 on aarch64; its first argument is the fd.
    return len(fields) > 1 and fields[0] in {"0", "63"} and fields[1] == "0x0"


def test_usage_errors_and_ctrl_c_as_a_user_sees_them(tmp_path: Path) -> None:
    r = kb(tmp_path, "keys", "create")
    assert r.returncode == 2
    assert r.stderr == "keybroker: Missing argument 'KEY_ID'. (try --help)\n"
    r = kb(tmp_path, "audit", "list", "--since", "yesterday")
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
    # Ctrl-C while `encrypt` waits for its payload on stdin: 130, not 1 ("did not verify").
    # The PEM files are checked before anything is read, so the CLI needs a development PKI.
    ensure_dev_pki(tmp_path / "var" / "pki", DEV_IDENTITIES)
    proc = subprocess.Popen(
        [*DEFAULT_SIGINT, *CLI, "encrypt", "patients"],
        cwd=tmp_path,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for _ in range(3000):
            if _blocked_reading_stdin(proc.pid) or proc.poll() is not None:
                break
            time.sleep(0.01)
        if not Path(f"/proc/{proc.pid}/syscall").exists():
            pytest.skip("no /proc/PID/syscall to see the CLI waiting")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert err.strip() == "keybroker: interrupted"


def test_secrets_are_not_printed_to_a_terminal(tmp_path: Path) -> None:
    import pty

    leader, follower = pty.openpty()
    try:
        r = subprocess.run(
            [*CLI, "--as", "producer", "datakey", "patients"],
            cwd=tmp_path,
            stdout=follower,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(follower)
        os.close(leader)
    assert r.returncode == 2
    assert r.stderr.startswith("keybroker: refusing to print the plaintext key to a terminal: ")
