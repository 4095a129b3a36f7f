"""`keybroker encrypt-file` / `decrypt-file` as a user runs them: subprocesses against the real
broker (gRPC over mTLS, SoftHSM2), files, pipes, exit codes, one-line errors, progress bars."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.broker_fixtures import Broker
from tests.integration.flows import create_key

CLI = [sys.executable, "-c", "from keybroker_client.cli import main; main()"]


def kb(
    broker: Broker, who: str, *args: str, cwd: Path, **kw: Any
) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYBROKER_")}
    env.update(kw.pop("env", {}))
    base = ["--home", str(broker.home), "--target", broker.target, "--as", who]
    kw.setdefault("capture_output", True)
    return subprocess.run([*CLI, *base, *args], cwd=cwd, env=env, timeout=60, check=False, **kw)


@pytest.fixture
def key_id(broker: Broker) -> str:
    return create_key(broker)


def test_round_trip_through_files(broker: Broker, key_id: str, tmp_path: Path) -> None:
    data = os.urandom(300_000)
    (tmp_path / "cohort.csv").write_bytes(data)
    r = kb(
        broker, "producer", "encrypt-file", "cohort.csv", "cohort.kbf", "--key-id", key_id,
        "--context", "dataset=cohort-42", "--json", cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stderr == b""  # no progress bar when stderr is not a terminal
    summary = json.loads(r.stdout)
    assert summary == {
        "key_id": key_id,
        "key_version": 1,
        "context": {"dataset": "cohort-42"},
        "chunk_size": 65536,
        "plaintext_bytes": len(data),
        "out": "cohort.kbf",
    }
    r = kb(
        broker, "consumer", "decrypt-file", "cohort.kbf", "out.csv",
        "--justification", "survival study 42", cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert (r.stdout, r.stderr) == (b"", b"")
    assert (tmp_path / "out.csv").read_bytes() == data
    assert (tmp_path / "out.csv").stat().st_mode & 0o777 == 0o600


def test_stdin_to_stdout_pipes(broker: Broker, key_id: str, tmp_path: Path) -> None:
    data = os.urandom(150_000)
    r = kb(
        broker, "producer", "encrypt-file", "-", "-", "--key-id", key_id,
        "--context", "dataset=cohort-42", "--chunk-size", "16K", input=data, cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    sealed = r.stdout
    assert sealed[:6] == b"KBFS\x01\x0e"  # 2**14-byte chunks
    (tmp_path / "token").write_text(
        kb(
            broker, "consumer", "token", "issue", key_id, "--context", "dataset=cohort-42",
            "--justification", "pipe", cwd=tmp_path,
        ).stdout.decode()
    )  # fmt: skip
    r = kb(
        broker, "consumer", "decrypt-file", "-", "-", "--token-file", "token",
        input=sealed, cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout == data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["token"]
    # A token left in the environment: used when nothing else is given, overridden otherwise.
    stale = {"KEYBROKER_TOKEN": "not.a.token"}
    r = kb(broker, "consumer", "decrypt-file", "-", "-", input=sealed, cwd=tmp_path, env=stale)
    assert r.returncode == 5, r.stderr
    r = kb(broker, "consumer", "decrypt-file", "-", "-", "--justification", "pipe",
           input=sealed, cwd=tmp_path, env=stale)  # fmt: skip
    assert r.returncode == 0 and r.stdout == data, r.stderr


def one_line_error(r: subprocess.CompletedProcess[bytes], code: int, start: str) -> str:
    assert r.returncode == code, r.stderr
    text = r.stderr.decode()
    assert text.count("\n") == 1 and text.startswith(start), text
    assert "Traceback" not in text
    return text


def test_a_tampered_file_gives_one_line_and_leaves_no_output(
    broker: Broker, key_id: str, tmp_path: Path
) -> None:
    (tmp_path / "in").write_bytes(os.urandom(200_000))
    kb(broker, "producer", "encrypt-file", "in", "in.kbf", "--key-id", key_id,
       "--context", "dataset=cohort-42", cwd=tmp_path)  # fmt: skip
    sealed = bytearray((tmp_path / "in.kbf").read_bytes())
    sealed[150_000] ^= 0x40
    (tmp_path / "bad.kbf").write_bytes(sealed)
    r = kb(broker, "consumer", "decrypt-file", "bad.kbf", "out", "--justification", "j",
           cwd=tmp_path)  # fmt: skip
    line = one_line_error(r, 4, "keybroker: INVALID_ARGUMENT: bad.kbf: chunk 2 does not authent")
    assert line.rstrip().endswith("out was not written")
    (tmp_path / "short.kbf").write_bytes(sealed[:65_536])
    r = kb(broker, "consumer", "decrypt-file", "-", "-", "--justification", "j",
           input=(tmp_path / "in.kbf").read_bytes()[:-20], cwd=tmp_path)  # fmt: skip
    one_line_error(r, 4, "keybroker: INVALID_ARGUMENT: stdin: chunk 3 does not authenticate")
    (tmp_path / "junk").write_bytes(b"not a keybroker file at all" * 3)
    r = kb(broker, "consumer", "decrypt-file", "junk", "out", "--justification", "j",
           cwd=tmp_path)  # fmt: skip
    one_line_error(r, 4, "keybroker: INVALID_ARGUMENT: junk: not a keybroker file")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "bad.kbf", "in", "in.kbf", "junk", "short.kbf"
    ]  # fmt: skip


def test_refusals_and_usage(broker: Broker, key_id: str, tmp_path: Path) -> None:
    (tmp_path / "in").write_bytes(b"rows")
    r = kb(broker, "producer", "encrypt-file", "in", "in.kbf", "--key-id", key_id,
           "--context", "dataset=cohort-42", cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    r = kb(broker, "producer", "decrypt-file", "in.kbf", "out", "--justification", "j",
           cwd=tmp_path)  # fmt: skip
    one_line_error(r, 6, "keybroker: PERMISSION_DENIED:")
    r = kb(broker, "consumer", "decrypt-file", "in.kbf", "out", "--justification", "j",
           "--context", "dataset=cohort-7", cwd=tmp_path)  # fmt: skip
    one_line_error(r, 4, "keybroker: INVALID_ARGUMENT: in.kbf: the file was encrypted with "
                   "another context: dataset=cohort-42")  # fmt: skip
    r = kb(broker, "consumer", "decrypt-file", "in.kbf", "out", cwd=tmp_path)
    assert r.returncode == 2 and b"--justification" in r.stderr
    r = kb(broker, "producer", "encrypt-file", "in", "x", "--key-id", key_id,
           "--chunk-size", "3000", cwd=tmp_path)  # fmt: skip
    assert r.returncode == 2 and b"power of two" in r.stderr
    r = kb(broker, "producer", "encrypt-file", "missing", "x", "--key-id", key_id, cwd=tmp_path)
    one_line_error(r, 3, "keybroker: IO: No such file or directory: missing")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "in.kbf"]


def run_on_terminal(
    broker: Broker, args: list[str], cwd: Path, stream: str
) -> tuple[int, str, bytes]:
    """Runs the CLI with ``stream`` (stdout or stderr) on a pseudo-terminal."""
    master, slave = pty.openpty()
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    r = kb(broker, "producer", *args, cwd=cwd, capture_output=False,
           stdout=slave if stream == "stdout" else subprocess.PIPE,
           stderr=slave if stream == "stderr" else subprocess.PIPE)  # fmt: skip
    os.close(slave)
    reader.join(10)
    os.close(master)
    other = r.stdout if stream == "stderr" else r.stderr
    return r.returncode, b"".join(chunks).decode(errors="replace"), other or b""


def test_progress_bar_on_a_terminal_only(broker: Broker, key_id: str, tmp_path: Path) -> None:
    (tmp_path / "in").write_bytes(os.urandom(1 << 20))
    args = ["encrypt-file", "in", "in.kbf", "--key-id", key_id, "--context", "dataset=cohort-42"]
    code, screen, stdout = run_on_terminal(broker, args, tmp_path, "stderr")
    assert code == 0, screen
    assert "encrypting" in screen and "100%" in screen and stdout == b""
    # Binary output is never sent to a terminal.
    code, screen, stderr = run_on_terminal(
        broker, ["encrypt-file", "in", "-", "--key-id", key_id], tmp_path, "stdout"
    )
    assert code == 2 and "OUT is a terminal" in stderr.decode() and screen == ""
