"""An insider with write access to the database but not to the HSM tampers with the trail;
`VerifyAuditLog` (over gRPC, real SoftHSM2 anchors) names the first bad record every time
(DESIGN.md invariant 7, docs/audit.md)."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from keybroker.v1 import audit_pb2
from keybroker_client import evidence

from tests.broker_fixtures import Broker
from tests.integration.audit_helpers import (
    chain_of,
    checkpoint,
    copy_db,
    fill,
    jwks,
    own_trail,
    query,
    relink,
    restore_db,
    rows,
    sql,
    verify,
)


@dataclass
class Trail:
    """A broker whose chain is: events 1-7 signed by checkpoint 7, 8-10 signed by checkpoint
    10 (also in the HSM anchor), 11-12 unsigned (and the verifications' own events after)."""

    b: Broker
    db: Path
    chain: str


@pytest.fixture
def trail(hsm_home: Path, tmp_path: Path) -> Iterator[Trail]:
    db = tmp_path / "keybroker.db"
    b = own_trail(hsm_home, db)
    try:
        key_id = fill(b, 6)
        assert checkpoint(b) == 7
        fill_more(b, key_id, 3)
        assert checkpoint(b) == 10
        fill_more(b, key_id, 2)
        good = verify(b)
        assert good.ok, good.error
        assert (good.events_checked, good.unsigned_events) == (12, 2)
        assert (good.chains_checked, good.checkpoints_checked) == (1, 2)
        yield Trail(b, db, chain_of(b))
    finally:
        b.close()


def fill_more(b: Broker, key_id: str, calls: int) -> None:
    from tests.integration.flows import datakey

    for _ in range(calls):
        datakey(b, key_id)


def _edit_and_rehash(t: Trail) -> None:
    records = rows(t.db, t.chain)
    records[2]["principal"] = "someone-else"
    relink(t.db, t.chain, records)


def _delete_and_rehash(t: Trail) -> None:
    records = rows(t.db, t.chain)
    relink(t.db, t.chain, records[:3] + records[4:])


def _insert_and_rehash(t: Trail) -> None:
    records = rows(t.db, t.chain)
    forged = {**records[2], "principal": "ghost", "request_id": "forged"}
    # The newest event goes, so the live writer's next chain_sequence stays free.
    relink(t.db, t.chain, [*records[:3], forged, *records[3:-1]])


def _swap(t: Trail) -> None:
    sql(
        t.db,
        "UPDATE audit_events SET sequence = -1 WHERE chain_sequence = 2",
        "UPDATE audit_events SET sequence = sequence - 1 WHERE chain_sequence = 3",
        "UPDATE audit_events SET sequence = 1 + (SELECT sequence FROM audit_events "
        "WHERE chain_sequence = 3) WHERE sequence = -1",
    )


def _checkpoint_with_another_head(t: Trail) -> None:
    sql(
        t.db,
        "UPDATE audit_checkpoints SET head = (SELECT hash FROM audit_events WHERE "
        "chain_sequence = 9) WHERE chain_sequence = 10",
    )


def _forged_checkpoint(t: Trail) -> None:
    """A checkpoint over the unsigned tail, signed with the insider's own key under the kid of
    the broker's audit key."""
    kid = next(k["kid"] for k in jwks(t.b)["keys"] if k["keybroker_purpose"] == "audit")
    head = rows(t.db, t.chain)[11]["hash"]
    record = {"type": "checkpoint", "chain": t.chain, "chain_sequence": 12, "head": head,
              "time": "2030-01-01T00:00:00.000000Z", "closed": False}  # fmt: skip
    record["jws"] = sign_as(ec.generate_private_key(ec.SECP256R1()), kid, record)
    sql(
        t.db,
        "INSERT INTO audit_checkpoints (chain, chain_sequence, head, time, closed, jws) "
        "VALUES (?, 12, ?, ?, 0, ?)",
        params=(t.chain, head, record["time"], record["jws"]),
    )


def sign_as(key: ec.EllipticCurvePrivateKey, kid: str, record: dict[str, object]) -> str:
    """A well-formed ES256 JWS over the record, by `key`."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).decode().rstrip("=")

    header = b64(json.dumps({"alg": "ES256", "kid": kid, "typ": evidence.JWS_TYPE}).encode())
    signing_input = f"{header}.{b64(evidence.signing_input(record))}".encode()
    r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
    return f"{signing_input.decode()}.{b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


CASES: dict[str, tuple[Callable[[Trail], None], int, str]] = {
    # name: (tampering, first bad chain_sequence, words of the error)
    "edit, hashes recomputed": (_edit_and_rehash, 7, "head of the signed checkpoint"),
    "edit, hashes left": (
        lambda t: sql(t.db, "UPDATE audit_events SET outcome = 'denied' WHERE chain_sequence = 5"),
        5,
        "hash does not match",
    ),
    "delete in the middle": (
        lambda t: sql(t.db, "DELETE FROM audit_events WHERE chain_sequence = 4"),
        4,
        "where 4 was expected",
    ),
    "delete in the middle, hashes recomputed": (_delete_and_rehash, 7, "head of the signed"),
    "delete the signed tail": (
        lambda t: sql(t.db, "DELETE FROM audit_events WHERE chain_sequence > 8"),
        9,
        "events deleted",
    ),
    "delete the tail and its checkpoints": (
        lambda t: sql(
            t.db,
            "DELETE FROM audit_events WHERE chain_sequence > 8",
            "DELETE FROM audit_checkpoints WHERE chain_sequence > 8",
        ),
        8,
        "rolled back or truncated",
    ),
    "delete every event": (lambda t: sql(t.db, "DELETE FROM audit_events"), 1, "events deleted"),
    "delete everything": (
        lambda t: sql(
            t.db,
            "DELETE FROM audit_events",
            "DELETE FROM audit_checkpoints",
            "DELETE FROM audit_chains",
        ),
        10,
        "missing from the trail",
    ),
    "swap two events": (_swap, 2, "where 2 was expected"),
    "insert, hashes recomputed": (_insert_and_rehash, 7, "head of the signed checkpoint"),
    "checkpoint head changed": (_checkpoint_with_another_head, 10, "signed payload is not"),
    "forged checkpoint": (_forged_checkpoint, 12, "does not verify"),
    "invalid UTF-8 in a row": (
        lambda t: sql(
            t.db,
            "UPDATE audit_events SET principal = CAST(X'FF41' AS TEXT) WHERE chain_sequence = 6",
        ),
        6,
        "malformed",
    ),
    "a BLOB in a text column": (
        lambda t: sql(t.db, "UPDATE audit_events SET reason = X'00FF' WHERE chain_sequence = 2"),
        2,
        "reason is not a string",
    ),
    "malformed row": (
        lambda t: sql(
            t.db, "UPDATE audit_events SET context = '{not json' WHERE chain_sequence = 3"
        ),
        3,
        "malformed",
    ),
}


#: Cases only SQLite's loose column types allow (PostgreSQL refuses bytes or invalid UTF-8 in
#: a text column, so an insider cannot store them there).
SQLITE_ONLY = {"invalid UTF-8 in a row", "a BLOB in a text column"}


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(
            c,
            marks=[pytest.mark.sqlite("PostgreSQL's text columns refuse bytes")]
            if c in SQLITE_ONLY
            else [],
        )
        for c in CASES
    ],
)
def test_tampering_is_caught_by_verify(trail: Trail, case: str) -> None:
    tamper, first_bad, words = CASES[case]
    tamper(trail)
    bad = verify(trail.b)
    assert not bad.ok
    assert (bad.first_bad_chain, bad.first_bad_sequence) == (trail.chain, first_bad), bad.error
    assert words in bad.error


def test_a_malformed_row_is_reported_and_listing_streams_past_it(trail: Trail) -> None:
    sql(trail.db, "UPDATE audit_events SET context = '{not json' WHERE chain_sequence = 3")
    listed = [r.event for r in trail.b.audit().ListAuditEvents(audit_pb2.ListAuditEventsRequest())]
    assert [e.chain_sequence for e in listed[:4]] == [1, 2, 4, 5]
    assert all(e.chain == trail.chain for e in listed)
    bad = verify(trail.b)
    assert not bad.ok and bad.first_bad_sequence == 3 and "context" in bad.error


def test_rollback_to_an_older_copy_is_caught(hsm_home: Path, tmp_path: Path) -> None:
    db, older = tmp_path / "keybroker.db", tmp_path / "older.db"
    b = own_trail(hsm_home, db)
    key_id = fill(b, 3)
    checkpoint(b)
    copy_db(db, older)  # the insider keeps a copy ...
    fill_more(b, key_id, 3)
    checkpoint(b)
    chain = chain_of(b)
    b.close()
    restore_db(older, db)  # ... and puts it back while the broker is stopped
    b = own_trail(hsm_home, db)
    try:
        bad = verify(b)
        assert not bad.ok and bad.first_bad_chain == chain
        assert "rolled back" in bad.error
    finally:
        b.close()


def test_a_whole_chain_deleted_is_caught(hsm_home: Path, tmp_path: Path) -> None:
    db = tmp_path / "keybroker.db"
    first = own_trail(hsm_home, db)
    fill(first, 2)
    gone = chain_of(first)
    first.close()  # a closing checkpoint, in the database and in the HSM anchor
    b = own_trail(hsm_home, db)
    try:
        fill(b, 2)
        assert verify(b).chains_checked == 2
        sql(
            db,
            *(
                f"DELETE FROM {table} WHERE chain = '{gone}'"
                for table in ("audit_events", "audit_checkpoints", "audit_chains")
            ),
        )
        bad = verify(b)
        assert not bad.ok and bad.first_bad_chain == gone
        assert "missing from the trail" in bad.error
    finally:
        b.close()


def test_a_clean_shutdown_signs_everything(hsm_home: Path, tmp_path: Path) -> None:
    db = tmp_path / "keybroker.db"
    b = own_trail(hsm_home, db)
    fill(b, 3)
    assert verify(b).unsigned_events == 4
    chain = chain_of(b)
    b.close()
    closing = rows(db, chain)[-1]
    b = own_trail(hsm_home, db)
    try:
        report = verify(b)
        assert report.ok, report.error
        assert report.unsigned_events == 0 and report.chains_checked == 2
        # The first chain's events all verified, the last one under its closing checkpoint.
        assert report.events_checked == closing["chain_sequence"]
        last = query(
            db,
            "SELECT chain_sequence, closed FROM audit_checkpoints WHERE chain = ? ORDER BY id",
            (chain,),
        )[-1]
        assert tuple(last) == (closing["chain_sequence"], 1)
    finally:
        b.close()
