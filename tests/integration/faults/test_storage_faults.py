"""D.21, D.22, D.24: the database fails under the broker.

- ENOSPC and EIO on the audit write, injected into a broker process's own system calls with
  `strace -e inject` (SQLite writes with pwrite64 and syncs with fdatasync; SoftHSM2 and gRPC
  use neither): calls fail closed with UNAVAILABLE, and once writes succeed again the chain
  goes on with no gap and no duplicate, and VerifyAuditLog passes.
- The SQLite database locked by another process's write transaction: UNAVAILABLE within the
  caller's deadline, no partial rows, and calls go through again once the lock is released.
  (PostgreSQL backends terminated under the broker: tests/integration/test_postgres_store.py,
  `test_an_unreachable_database_fails_calls_closed_until_it_is_back`, on a --store=postgres run.)
- A torn or garbage tail in the store: detected, never repaired silently.
"""

from __future__ import annotations

import logging
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from keybroker.v1 import audit_pb2, key_admin_pb2

from broker.errors import HsmObjectMissing, StoreUnavailable
from broker.ports import KeyKind
from tests.broker_fixtures import new_key_id, start_broker
from tests.integration.audit_helpers import chain_of, fill, own_trail, query, sql, verify
from tests.integration.faults.procs import BrokerProcess, running
from tests.integration.flows import code_of, create_key, datakey, decrypt, issue, standard_policy
from tests.integration.signals import DEFAULT_SIGINT

STRACE = shutil.which("strace")


@contextmanager
def syscalls_failing(pid: int, syscall: str, errno: str) -> Iterator[None]:
    """Every `syscall` of every thread of process `pid` fails with `errno` for the block
    (strace attached, then detached: the process goes on untouched)."""
    assert STRACE is not None
    tracer = subprocess.Popen(
        [*DEFAULT_SIGINT, STRACE, "-f", "-p", str(pid), "-o", "/dev/null", "-e", f"trace={syscall}",
         "-e", f"inject={syscall}:error={errno}"],
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert tracer.stderr is not None
        line = tracer.stderr.readline()  # "strace: Process N attached with M threads"
        if "attached" not in line:
            pytest.skip(f"strace cannot attach here: {line.strip()}")
        yield
    finally:
        tracer.send_signal(signal.SIGINT)  # detaches from every thread
        tracer.wait(timeout=30)


def chain_sequences(broker: BrokerProcess) -> dict[str, list[int]]:
    stream = broker.audit().ListAuditEvents(audit_pb2.ListAuditEventsRequest())
    chains: dict[str, list[int]] = {}
    for response in stream:
        chains.setdefault(response.event.chain, []).append(response.event.chain_sequence)
    return chains


@pytest.mark.skipif(STRACE is None, reason="strace is not installed (apt-get install strace)")
@pytest.mark.parametrize(
    ("syscall", "errno"), [("pwrite64", "ENOSPC"), ("fdatasync", "EIO")], ids=["ENOSPC", "EIO"]
)
def test_audit_write_failing_fails_closed_and_the_chain_goes_on(
    broker_home: Path, syscall: str, errno: str
) -> None:
    home = broker_home
    with running(home) as broker:
        key_id = create_key(broker)  # type: ignore[arg-type]
        kept = datakey(broker, key_id)  # type: ignore[arg-type]
        token = issue(broker, key_id).token  # type: ignore[arg-type]
        refused = []
        with syscalls_failing(broker.proc.pid, syscall, errno):
            for call in (
                lambda: datakey(broker, key_id),  # type: ignore[arg-type]
                lambda: decrypt(broker, kept.wrapped_key, token),  # type: ignore[arg-type]
                lambda: broker.keys().RotateKey(key_admin_pb2.RotateKeyRequest(key_id=key_id)),
            ):
                refused.append(code_of(call))
        for code, message in refused:
            assert code == grpc.StatusCode.UNAVAILABLE, message
            assert kept.plaintext_key.hex() not in message
        # Writes succeed again: the same calls go through, on the same chain.
        assert decrypt(broker, kept.wrapped_key, token).plaintext == kept.plaintext_key  # type: ignore[arg-type]
        datakey(broker, key_id)  # type: ignore[arg-type]
        report = broker.verify()
        assert report.ok, report.error
        for chain, numbers in chain_sequences(broker).items():
            assert numbers == list(range(1, len(numbers) + 1)), chain  # no gap, no duplicate
        assert broker.stop() == 0
    assert kept.plaintext_key.hex() not in broker.output
    assert (home / "hsm.pin").read_text().strip() not in broker.output
    assert "Traceback" not in broker.output


# -- D.22: the database locked by another process --------------------------------------------

#: Holds a write transaction on the database given as argv[1] until its stdin closes.
LOCKER = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.read()
db.execute("ROLLBACK")
"""


@contextmanager
def locked(db: Path) -> Iterator[None]:
    """Another process holds a write transaction on `db` for the block."""
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCKER, str(db)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdin is not None and holder.stdout is not None
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


@pytest.mark.sqlite("holds a SQLite write lock; PostgreSQL: test_postgres_store.py")
def test_a_locked_database_fails_closed_within_the_deadline_and_leaves_no_partial_row(
    hsm_home: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "locked.db"
    b = start_broker(hsm_home, database=db)
    try:
        key_id = new_key_id()
        request = key_admin_pb2.CreateKeyRequest(key_id=key_id, policy=standard_policy())
        caplog.set_level(logging.INFO, logger="broker.adapters.pkcs11")
        with locked(db):
            # The store waits for the lock (busy timeout), then gives up: well within the
            # caller's deadline, and with UNAVAILABLE, not DEADLINE_EXCEEDED.
            code, message = code_of(lambda: b.keys().CreateKey(request, timeout=60))
        assert code == grpc.StatusCode.UNAVAILABLE, message
        assert "fail closed" in message or "retry" in message
        # No partial rows: no key, no event, and the HSM object made first was removed.
        assert query(db, "SELECT count(*) FROM keys WHERE key_id = ?", (key_id,))[0][0] == 0
        assert query(db, "SELECT count(*) FROM audit_events WHERE key_id = ?", (key_id,))[0][0] == 0
        (label,) = {
            getattr(r, "label", "")
            for r in caplog.records
            if r.getMessage() == "kek generated" and key_id in getattr(r, "label", "")
        }
        with pytest.raises(HsmObjectMissing):
            b.app.hsms["local"].key_properties(label, KeyKind.KEK)
        # The lock released, the same call goes through and the trail verifies.
        b.keys().CreateKey(request, timeout=60)
        assert datakey(b, key_id).key_version == 1
        report = verify(b)
        assert report.ok, report.error
    finally:
        b.close()


# -- D.24: a torn or garbage tail -------------------------------------------------------------


@pytest.mark.sqlite("the file of a SQLite database")
@pytest.mark.parametrize("damage", ["cut short", "written past its end"])
def test_a_damaged_database_file_refuses_the_start_and_is_left_alone(
    hsm_home: Path, tmp_path: Path, damage: str
) -> None:
    db = tmp_path / "torn.db"
    b = start_broker(hsm_home, database=db)
    fill(b, 3)
    b.close()
    whole = db.read_bytes()
    damaged = whole[: len(whole) - 4096 - 100] if damage == "cut short" else whole + b"\x5a" * 5000
    db.write_bytes(damaged)
    with pytest.raises(StoreUnavailable) as refused:
        start_broker(hsm_home, database=db)
    assert f"it was {damage}" in refused.value.message
    assert "left as it is" in refused.value.message
    assert db.read_bytes() == damaged  # not repaired, not truncated, not extended
    assert not db.with_name(db.name + "-wal").exists()


def test_a_garbage_tail_of_the_audit_table_is_reported_after_every_restart(
    hsm_home: Path, tmp_path: Path
) -> None:
    db = tmp_path / "tail.db"
    b = own_trail(hsm_home, db)
    fill(b, 2)
    chain = chain_of(b)
    b.close()
    last = query(db, "SELECT max(sequence), max(chain_sequence) FROM audit_events")[0]
    # A torn append: the chain's next row, half written (no hash, context cut short).
    sql(
        db,
        "INSERT INTO audit_events (sequence, chain, chain_sequence, time, principal, operation,"
        " key_id, key_version, token_id, context, justification, outcome, reason, request_id,"
        " prev_hash, hash) VALUES (?, ?, ?, '2030-01-01T00:00:00', 'x', 'Decrypt', 'k', 1, '',"
        " '{\"data', '', 'allowed', '', 'torn', '', '')",
        params=(last[0] + 1, chain, last[1] + 1),
    )
    for _ in range(2):  # reported, and still there after a restart: nothing repairs it
        b = own_trail(hsm_home, db)
        try:
            bad = verify(b)
            assert not bad.ok
            assert (bad.first_bad_chain, bad.first_bad_sequence) == (chain, last[1] + 1), bad.error
        finally:
            b.close()
        assert query(db, "SELECT count(*) FROM audit_events WHERE request_id = 'torn'")[0][0] == 1
