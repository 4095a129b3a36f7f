"""Exports of the trail verified offline, with the JWKS alone: `evidence.verify_export` and
`keybroker audit verify EXPORT --jwks JWKS` as a subprocess, against an export made over gRPC
by a broker on real SoftHSM2; each tampering of the file is caught and named."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from keybroker_client import evidence

from tests.broker_fixtures import Broker
from tests.integration.audit_helpers import (
    chain_of,
    checkpoint,
    copy_db,
    export,
    fill,
    jwks,
    own_trail,
    restore_db,
    sql,
    verify,
)
from tests.integration.test_audit_tampering import fill_more, sign_as

CLI = [sys.executable, "-c", "from keybroker_client.cli import main; main()"]
Records = list[dict[str, Any]]


def kb(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120)


def parse(lines: list[bytes]) -> Records:
    return [json.loads(line) for line in lines]


def encode(records: Records) -> list[bytes]:
    return [evidence.canonical(r) + b"\n" for r in records]


def relinked(records: Records) -> Records:
    """Recomputes every event's prev_hash and hash with the public rule, in file order."""
    heads: dict[str, str] = {}
    out = []
    for record in records:
        if record["type"] == "event":
            prev = heads.get(record["chain"], evidence.GENESIS_HASH)
            linked = {**record, "prev_hash": prev}
            linked["hash"] = heads[record["chain"]] = evidence.event_hash(linked)
            out.append(linked)
        else:
            out.append(record)
    return out


@dataclass
class Exported:
    b: Broker
    jwks: dict[str, Any]
    lines: list[bytes]
    chain: str
    tmp: Path

    def write(self, name: str, lines: list[bytes]) -> Path:
        path = self.tmp / name
        path.write_bytes(b"".join(lines))
        return path

    def write_jwks(self) -> Path:
        path = self.tmp / "jwks.json"
        path.write_text(json.dumps(self.jwks))
        return path


@pytest.fixture
def exported(hsm_home: Path, tmp_path: Path) -> Iterator[Exported]:
    b = own_trail(hsm_home, tmp_path / "keybroker.db")
    try:
        key_id = fill(b, 6)
        checkpoint(b)
        fill_more(b, key_id, 3)
        # The export signs the head (10), then its own event (11) goes into the stream.
        lines = export(b)
        yield Exported(b, jwks(b), lines, chain_of(b), tmp_path)
    finally:
        b.close()


def test_an_export_verifies_offline(exported: Exported) -> None:
    records = parse(exported.lines)
    assert [r["type"] for r in records][:2] == ["chain", "event"]
    assert records[-1]["type"] == "manifest" and records[-1]["verified"]
    assert [r["chain_sequence"] for r in records if r["type"] == "checkpoint"] == [7, 10]
    assert all(
        line == evidence.canonical(r) + b"\n"
        for line, r in zip(exported.lines, records, strict=True)
    )
    report = evidence.verify_export(exported.lines, exported.jwks)
    assert report.ok, report.error
    assert (report.events_checked, report.checkpoints_checked, report.chains_checked) == (11, 2, 1)
    r = kb("audit", "verify", str(exported.write("a.jsonl", exported.lines)),
           "--jwks", str(exported.write_jwks()))  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("ok: 11 events in 1 chains, 2 signed checkpoints")


def _edit(records: Records) -> Records:
    events = [r for r in records if r["type"] == "event"]
    events[2]["principal"] = "someone-else"
    return relinked(records)


def _without(records: Records, drop: Callable[[dict[str, Any]], bool]) -> Records:
    return [r for r in records if not drop(r)]


def _swap(records: Records) -> Records:
    i, j = (k for k, r in enumerate(records) if r.get("chain_sequence") in (2, 3))
    records[i], records[j] = records[j], records[i]
    return records


def _insert(records: Records) -> Records:
    """A forged event after the third, the later ones renumbered and relinked, and each
    checkpoint moved after the event that now carries its chain_sequence."""
    events = [r for r in records if r["type"] == "event"]
    events.insert(3, {**events[2], "principal": "ghost", "request_id": "forged"})
    first = events[0]["sequence"]
    for number, event in enumerate(events, 1):
        event["chain_sequence"], event["sequence"] = number, first + number - 1
    checkpoints = {r["chain_sequence"]: r for r in records if r["type"] == "checkpoint"}
    body = []
    for event in events:
        body.append(event)
        if event["chain_sequence"] in checkpoints:
            body.append(checkpoints[event["chain_sequence"]])
    return relinked([records[0], *body, records[-1]])


def _forge_checkpoint(records: Records) -> Records:
    cp = next(r for r in records if r["type"] == "checkpoint")
    header = cp["jws"].split(".")[0]
    kid = json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))["kid"]
    unsigned = {k: v for k, v in cp.items() if k != "jws"}
    cp["jws"] = sign_as(ec.generate_private_key(ec.SECP256R1()), kid, unsigned)
    return records


CASES: dict[str, tuple[Callable[[Records], Records], int, str]] = {
    # name: (tampering of the parsed export, first bad chain_sequence, words of the error)
    "edit, hashes recomputed": (_edit, 7, "head of the signed checkpoint"),
    "edit, hashes left": (
        lambda rs: [
            {**r, "outcome": "denied"}
            if r.get("chain_sequence") == 5 and r["type"] == "event"
            else r
            for r in rs
        ],
        5,
        "hash does not match",
    ),
    "delete in the middle": (
        lambda rs: _without(rs, lambda r: r["type"] == "event" and r["chain_sequence"] == 4),
        4,
        "where 4 was expected",
    ),
    "delete the tail": (
        lambda rs: _without(
            rs, lambda r: r["type"] != "manifest" and r.get("chain_sequence", 0) > 8
        ),
        9,
        "events deleted or added",
    ),
    "delete every event and checkpoint": (
        lambda rs: _without(rs, lambda r: r["type"] in ("event", "checkpoint")),
        1,
        "events deleted or added",
    ),
    "swap two events": (_swap, 2, "where 2 was expected"),
    "insert, hashes recomputed": (_insert, 7, "head of the signed checkpoint"),
    "forged checkpoint": (_forge_checkpoint, 7, "does not verify"),
    "chain deleted whole": (
        lambda rs: _without(rs, lambda r: r.get("chain") is not None),
        1,
        "events deleted or added",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_tampering_of_an_export_is_caught_offline(exported: Exported, case: str) -> None:
    tamper, first_bad, words = CASES[case]
    lines = encode(tamper(parse(exported.lines)))
    report = evidence.verify_export(lines, exported.jwks)
    assert not report.ok
    assert (report.first_bad_chain, report.first_bad_sequence) == (exported.chain, first_bad)
    assert words in report.error and report.location.startswith("line ")
    path = exported.write("tampered.jsonl", lines)
    r = kb("audit", "verify", str(path), "--jwks", str(exported.write_jwks()))
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stdout.startswith(f"FAILED: {path}:{report.location.removeprefix('line ')}: ")
    assert f"chain {exported.chain}, chain_sequence {first_bad}" in r.stdout


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        (lambda ls: [*ls[:3], b"{not json\n", *ls[4:]], "canonical JSON"),
        (lambda ls: [*ls[:3], ls[3].replace(b'":', b'": ', 1), *ls[4:]], "canonical JSON"),
        (lambda ls: ls[:-1], "without its signed manifest"),
        (lambda ls: [], "without its signed manifest"),
        (lambda ls: [*ls, ls[2]], "where 12 was expected"),
    ],
    ids=["malformed line", "not canonical", "manifest cut off", "empty", "line appended"],
)
def test_malformed_or_truncated_exports_are_caught(
    exported: Exported, damage: Callable[[list[bytes]], list[bytes]], words: str
) -> None:
    report = evidence.verify_export(damage(list(exported.lines)), exported.jwks)
    assert not report.ok and words in report.error


def test_an_export_of_a_rolled_back_database_fails_offline(hsm_home: Path, tmp_path: Path) -> None:
    db, older = tmp_path / "keybroker.db", tmp_path / "older.db"
    b = own_trail(hsm_home, db)
    key_id = fill(b, 3)
    checkpoint(b)
    copy_db(db, older)
    fill_more(b, key_id, 3)
    checkpoint(b)
    b.close()
    restore_db(older, db)
    b = own_trail(hsm_home, db)
    try:
        lines = export(b)
        manifest = json.loads(lines[-1])
        assert manifest["verified"] is False and "rolled back" in manifest["error"]
        report = evidence.verify_export(lines, jwks(b))
        assert not report.ok and "rolled back" in report.error
        # The CLI exports it anyway (it is the evidence) and says so with exit status 1.
        out = tmp_path / "rolled-back.jsonl"
        r = kb("--home", str(b.home), "--target", b.target, "--as", "auditor",
               "audit", "export", "--output", str(out))  # fmt: skip
        assert r.returncode == 1 and "rolled back" in r.stderr, r.stderr
        assert out.exists()
    finally:
        b.close()


def test_consecutive_exports_verify_as_one_and_a_gap_fails(exported: Exported) -> None:
    b = exported.b
    first = exported.lines
    through = json.loads(first[-1])["through_sequence"]
    fill(b, 2)
    second = export(b, after=through)
    assert json.loads(second[-1])["after_sequence"] == through
    fill(b, 2)
    third = export(b, after=json.loads(second[-1])["through_sequence"])
    assert evidence.verify_export(first + second + third, exported.jwks).ok
    assert evidence.verify_export(third, exported.jwks).ok  # a later range alone
    gap = evidence.verify_export(first + third, exported.jwks)
    assert not gap.ok and gap.first_bad_sequence == 12 and "where 12 was expected" in gap.error
    # A range that starts elsewhere than where the previous one ended is refused as such,
    # even when no chain shows it.
    other = export(b, after=json.loads(third[-1])["through_sequence"] + 1)
    overlap = evidence.verify_export(first + second + third + other, exported.jwks)
    assert not overlap.ok and "gap or overlap between exports" in overlap.error
    jwks_file = exported.write_jwks()
    files = [str(exported.write(f"part{i}.jsonl", p)) for i, p in enumerate((first, second, third))]
    r = kb("audit", "verify", *files, "--jwks", str(jwks_file))
    assert r.returncode == 0, r.stdout + r.stderr
    r = kb("audit", "verify", files[0], files[2], "--jwks", str(jwks_file))
    assert r.returncode == 1 and f"FAILED: {files[2]}:" in r.stdout


def test_the_cli_exports_over_grpc_and_verifies_the_file(exported: Exported) -> None:
    b, out = exported.b, exported.tmp / "cli.jsonl"
    common = ["--home", str(b.home), "--target", b.target, "--as", "auditor", "audit"]
    r = kb(*common, "export", "--output", str(out))
    assert r.returncode == 0, r.stderr
    assert "--after-sequence" in r.stderr
    jwks_file = exported.write_jwks()
    assert kb("audit", "verify", str(out), "--jwks", str(jwks_file)).returncode == 0
    # Online verification too, with the new fields in --json.
    r = kb(*common, "verify", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["ok"] and report["chains_checked"] == 1 and report["unsigned_events"] >= 1
    # Usage: offline needs --jwks; --jwks needs files.
    assert kb("audit", "verify", str(out)).returncode == 2
    assert kb(*common, "verify", "--jwks", str(jwks_file)).returncode == 2
    # The export call is audited (auditor, allowed).
    assert verify(b).ok


def test_an_export_of_a_damaged_database_says_so_and_fails_offline(
    exported: Exported, store_kind: str
) -> None:
    db = exported.tmp / "keybroker.db"
    damage = ["UPDATE audit_events SET context = '{not json' WHERE chain_sequence = 3"]
    if store_kind == "sqlite":  # only SQLite's loose column types let bytes into a text column
        damage.append(
            "UPDATE audit_events SET principal = CAST(X'FF' AS TEXT) WHERE chain_sequence = 4"
        )
    sql(db, *damage)
    lines = export(exported.b)
    records = parse(lines)
    assert records[3]["context"] == "{not json"  # exported as stored
    if store_kind == "sqlite":
        assert records[4] == {"type": "event", "damaged": True}  # not even encodable
    manifest = records[-1]
    assert manifest["verified"] is False and "chain_sequence 3" in manifest["error"]
    report = evidence.verify_export(lines, exported.jwks)
    assert not report.ok and "context" in report.error and report.location == "line 4"


def test_only_auditors_and_admins_export(exported: Exported) -> None:
    from keybroker.v1 import audit_pb2

    from tests.integration.flows import code_of

    request = audit_pb2.ExportAuditLogRequest()
    code, _ = code_of(lambda: list(exported.b.audit("producer").ExportAuditLog(request)))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert export(exported.b, identity="admin")[-1].startswith(b'{"after_sequence":0,')
    listed = exported.b.audit().ListAuditEvents(
        audit_pb2.ListAuditEventsRequest(operation="ExportAuditLog")
    )
    outcomes = [(r.event.principal, r.event.outcome) for r in listed]
    assert ("producer", 2) in outcomes and ("auditor", 1) in outcomes  # denied, allowed
