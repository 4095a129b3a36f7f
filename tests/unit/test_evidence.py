"""`keybroker_client.evidence`: the byte encoding, the event hash, signed records and the
verifier, with a local key standing in for the HSM audit key."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm
from jwt.api_jws import PyJWS
from keybroker_client import evidence

GENESIS = evidence.GENESIS_HASH
T = "2026-11-30T12:00:00.000000Z"


class LocalSigner:
    """Signs like the broker's `SigningKeys` (ES256, kid header), with a key in memory."""

    def __init__(self, kid: str = "audit-1", purpose: str = "audit") -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.kid, self.purpose = kid, purpose

    def sign(self, record: dict[str, Any], **header: str) -> dict[str, Any]:
        headers = {"typ": evidence.JWS_TYPE, "kid": self.kid, **header}
        jws = PyJWS().encode(evidence.signing_input(record), self.key, "ES256", headers)
        return {**record, "jws": jws}

    def jwk(self) -> dict[str, Any]:
        jwk = json.loads(ECAlgorithm.to_jwk(self.key.public_key()))
        return {**jwk, "kid": self.kid, "keybroker_purpose": self.purpose}


def event(chain: str, number: int, prev: str, sequence: int | None = None) -> dict[str, Any]:
    record = {
        "type": "event", "sequence": sequence or number, "chain": chain,
        "chain_sequence": number, "time": "2026-11-30T12:00:00.000000Z", "principal": "p",
        "operation": "Decrypt", "key_id": "k", "key_version": 1, "token_id": "",
        "context": {"dataset": "cohort-42"}, "justification": "", "outcome": "allowed",
        "reason": "", "request_id": f"r{number}", "prev_hash": prev, "hash": "",
    }  # fmt: skip
    record["hash"] = evidence.event_hash(record)
    return record


def chain_of(signer: LocalSigner, name: str, count: int) -> list[dict[str, Any]]:
    records = [signer.sign({"type": "chain", "chain": name, "writer": "w", "time": T})]
    prev = GENESIS
    for number in range(1, count + 1):
        records.append(event(name, number, prev))
        prev = records[-1]["hash"]
    return records


def checkpoint(signer: LocalSigner, name: str, number: int, head: str, closed: bool = False) -> Any:
    return signer.sign({"type": "checkpoint", "chain": name, "chain_sequence": number,
                        "head": head, "time": T, "closed": closed})  # fmt: skip


def test_canonical_form_is_sorted_compact_utf8() -> None:
    assert evidence.canonical({"b": 1, "a": "é\n\x1b", "c": True}) == (
        b'{"a":"\xc3\xa9\\n\\u001b","b":1,"c":true}'
    )
    with pytest.raises(ValueError):
        evidence.canonical({"x": float("nan")})


def test_times_are_utc_microseconds_with_z() -> None:
    paris = timezone(timedelta(hours=1))
    assert evidence.format_time(datetime(2026, 1, 2, 4, 4, 5, 6, tzinfo=paris)) == (
        "2026-01-02T03:04:05.000006Z"
    )
    assert evidence.format_time(datetime(2026, 1, 2, 3, 4, 5)) == "2026-01-02T03:04:05.000000Z"
    assert evidence.parse_time("2026-01-02T03:04:05.000006Z") == datetime(
        2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC
    )
    with pytest.raises(ValueError):
        evidence.parse_time("2026-01-02T03:04:05+00:00")


def test_event_hash_is_the_documented_rule() -> None:
    record = event("kb-0123456789ab", 1, GENESIS)
    body = (
        b'{"chain":"kb-0123456789ab","chain_sequence":1,"context":{"dataset":"cohort-42"},'
        b'"justification":"","key_id":"k","key_version":1,"operation":"Decrypt",'
        b'"outcome":"allowed","prev_hash":"' + GENESIS.encode() + b'","principal":"p",'
        b'"reason":"","request_id":"r1","time":"2026-11-30T12:00:00.000000Z","token_id":""}'
    )
    assert record["hash"] == hashlib.sha256(bytes(32) + body).hexdigest()
    # `sequence` is the store's order, outside the hash: renumbering alone changes nothing.
    assert evidence.event_hash({**record, "sequence": 99}) == record["hash"]


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"context": "{not json"}, "context"),
        ({"key_version": True}, "key_version"),
        ({"outcome": "maybe"}, "outcome"),
        ({"hash": "AB" * 32}, "hash"),
        ({"extra": 1}, "unexpected ['extra']"),
        ({"time": "2026-11-30T12:00:00Z"}, "time"),
    ],
)
def test_malformed_events_are_named(change: dict[str, Any], words: str) -> None:
    assert words in evidence.event_problem({**event("c", 1, GENESIS), **change})


def test_signed_records_check_header_payload_key_and_signature() -> None:
    signer, other = LocalSigner(), LocalSigner("audit-2")
    keys = evidence.audit_keys({"keys": [signer.jwk(), LocalSigner("t", "token").jwk()]})
    assert list(keys) == ["audit-1"]  # the token key is not an audit key
    good = checkpoint(signer, "c", 1, GENESIS)
    assert evidence.signature_problem(good, keys) == ""
    assert "payload is not this record" in evidence.signature_problem(
        {**good, "head": "1" * 64}, keys
    )
    assert "no audit key" in evidence.signature_problem(checkpoint(other, "c", 1, GENESIS), keys)
    forged = LocalSigner("audit-1").sign({k: v for k, v in good.items() if k != "jws"})
    assert "does not verify" in evidence.signature_problem(forged, keys)
    wrong_typ = signer.sign({k: v for k, v in good.items() if k != "jws"}, typ="JWT")
    assert "header" in evidence.signature_problem(wrong_typ, keys)
    assert "compact JWS" in evidence.signature_problem({**good, "jws": "a.b"}, keys)
    with pytest.raises(evidence.EvidenceError):
        evidence.audit_keys({"keys": []})


def test_the_verifier_walks_chains_checkpoints_and_anchors() -> None:
    signer = LocalSigner()
    jwks = {"keys": [signer.jwk()]}
    records = chain_of(signer, "a", 5)
    v = evidence.TrailVerifier(jwks)
    v.chain_record(records[0])
    for record in records[1:4]:
        v.event(record)
    v.checkpoint(checkpoint(signer, "a", 3, records[3]["hash"]))
    for record in records[4:]:
        v.event(record)
    report = v.finish()
    assert report.ok and (report.events_checked, report.unsigned_events) == (5, 2)
    # The HSM anchor holds a later checkpoint than the trail: rolled back.
    v.anchor(checkpoint(signer, "a", 5, records[5]["hash"]), "HSM anchor a")
    bad = v.finish()
    assert not bad.ok and (bad.first_bad_chain, bad.first_bad_sequence) == ("a", 4)
    assert "rolled back" in bad.error and bad.location == "HSM anchor a"
    # A chain the trail lacks entirely, named by its anchor.
    w = evidence.TrailVerifier(jwks)
    w.anchor(checkpoint(signer, "gone", 2, GENESIS), "HSM anchor gone")
    assert "missing from the trail" in w.finish().error


def test_a_closed_chain_takes_no_more_events() -> None:
    signer = LocalSigner()
    records = chain_of(signer, "a", 3)
    v = evidence.TrailVerifier({"keys": [signer.jwk()]})
    v.chain_record(records[0])
    v.event(records[1])
    v.event(records[2])
    v.checkpoint(checkpoint(signer, "a", 2, records[2]["hash"], closed=True))
    assert v.finish().unsigned_events == 0
    v.event(records[3])
    assert "after the chain was closed" in v.finish().error


def test_a_minimal_export_verifies_and_its_manifest_binds_it() -> None:
    signer = LocalSigner()
    records = chain_of(signer, "a", 2)
    manifest = signer.sign({
        "type": "manifest", "after_sequence": 0, "through_sequence": 2,
        "chains": {"a": {"chain_sequence": 2, "head": records[-1]["hash"]}}, "time": T,
        "verified": True, "error": "",
    })  # fmt: skip
    lines = [evidence.canonical(r) + b"\n" for r in [*records, manifest]]
    assert evidence.verify_export(lines, {"keys": [signer.jwk()]}).ok
    report = evidence.verify_export(lines[:2] + lines[3:], {"keys": [signer.jwk()]})
    assert not report.ok and report.location == "line 3" and report.first_bad_sequence == 2
