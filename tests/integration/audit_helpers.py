"""Helpers of the audit-evidence tests: a broker with its own trail, and an insider's tools
(SQL on its database, SQLite or PostgreSQL, and the public hash rule) to tamper with it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from keybroker.v1 import audit_pb2, tokens_pb2
from keybroker_client import evidence

from broker.adapters.sql_common import row_record
from tests import store_fixtures
from tests.broker_fixtures import Broker, start_broker
from tests.integration.flows import create_key, datakey

_COLUMNS = (
    "sequence, chain, chain_sequence, time, principal, operation, key_id, key_version, "
    "token_id, context, justification, outcome, reason, request_id, prev_hash, hash"
)


def own_trail(hsm_home: Path, db: Path, **changes: object) -> Broker:
    """A broker with its own database; checkpoints only when a test asks (or at close)."""
    changes.setdefault("audit_checkpoint_seconds", 3600.0)
    return start_broker(hsm_home, database=db, **changes)


def fill(b: Broker, calls: int) -> str:
    """A key and `calls` GenerateDataKey calls: 1 + calls events."""
    key_id = create_key(b)
    for _ in range(calls):
        datakey(b, key_id)
    return key_id


def checkpoint(b: Broker) -> int:
    """Signs the broker's chain head now; returns its chain_sequence."""
    assert b.app.audit is not None
    b.app.audit.checkpoints.checkpoint()
    return b.app.audit.checkpoints.signed


def chain_of(b: Broker) -> str:
    assert b.app.audit is not None
    return b.app.audit.chain


def verify(b: Broker) -> audit_pb2.VerifyAuditLogResponse:
    return b.audit().VerifyAuditLog(audit_pb2.VerifyAuditLogRequest())


def export(b: Broker, after: int = 0, identity: str = "auditor") -> list[bytes]:
    request = audit_pb2.ExportAuditLogRequest(after_sequence=after)
    stream = b.audit(identity).ExportAuditLog(request)
    return [r.line + b"\n" for r in stream]


def jwks(b: Broker) -> dict[str, Any]:
    response = b.tokens("auditor").GetSigningKeys(tokens_pb2.GetSigningKeysRequest())
    return json.loads(response.jwks_json)  # type: ignore[no-any-return]


def sql(db: Path, *statements: str, params: tuple[Any, ...] = ()) -> None:
    """Runs statements (`?` markers) as an insider with write access to the database would."""
    with store_fixtures.connect(db) as con:
        for statement in statements:
            con.execute(statement, params)


def query(db: Path, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """The rows of one read (`?` markers)."""
    with store_fixtures.connect(db) as con:
        return con.execute(statement, params)


def rows(db: Path, chain: str) -> list[dict[str, Any]]:
    """The chain's event records, in chain order."""
    found = query(
        db,
        f"SELECT {_COLUMNS} FROM audit_events WHERE chain = ? ORDER BY chain_sequence",
        (chain,),
    )
    return [row_record(r) for r in found]


def relink(db: Path, chain: str, records: list[dict[str, Any]]) -> None:
    """Rewrites the chain as `records` (in order), renumbering (sequence and chain_sequence)
    and recomputing every hash with the public rule: the insider's best forgery without the
    HSM. For a database holding that one chain."""
    con = store_fixtures.connect(db)
    con.execute("DELETE FROM audit_events WHERE chain = ?", (chain,))
    prev = evidence.GENESIS_HASH
    first = records[0]["sequence"]
    for number, original in enumerate(records, 1):
        record = {**original, "sequence": first + number - 1, "chain_sequence": number}
        record["prev_hash"] = prev
        record["hash"] = prev = evidence.event_hash(record)
        con.execute(
            f"INSERT INTO audit_events ({_COLUMNS}) VALUES ({', '.join('?' * 16)})",
            (
                record["sequence"], chain, number, record["time"], record["principal"],
                record["operation"], record["key_id"], record["key_version"],
                record["token_id"], json.dumps(record["context"]), record["justification"],
                record["outcome"], record["reason"], record["request_id"], record["prev_hash"],
                record["hash"],
            ),
        )  # fmt: skip
    con.commit()
    con.close()


def copy_db(source: Path, target: Path) -> None:
    """A consistent copy of a live database (SQLite's backup API, WAL included; `pg_dump`)."""
    store_fixtures.backup(source, target)


def restore_db(backup: Path, db: Path) -> None:
    """Puts an older copy in place of a stopped broker's database."""
    store_fixtures.restore(backup, db)
