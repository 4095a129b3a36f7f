"""The byte encodings pinned against fixed expected values: the blob header and AAD, the
canonical context, the audit event's hashed body and its context JSON, and the times of audit
records. A change to any of them breaks every blob or audit trail already written, so each is
compared with literal bytes, not with another implementation of the same rule."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone

import pytest
from keybroker_client import evidence

from broker import blob as blobs
from broker.domain import (
    Approval,
    ApprovalOperation,
    ApprovalRequest,
    ApprovalState,
    AuditEvent,
    Caller,
    Key,
    KeyPolicy,
    KeyState,
    KeyVersion,
    Lease,
    LeaseTask,
    Outcome,
    canonical_context,
    chained_event,
    context_json,
    event_record,
    format_time,
    stored_event,
    validate_context,
)
from broker.errors import InvalidArgument, Unauthenticated

T0 = datetime(2026, 11, 30, 12, 0, 1, 250_000, tzinfo=UTC)

# Blob and AAD ---------------------------------------------------------------------------------


def test_the_blob_header_aad_and_encoding_are_fixed_bytes() -> None:
    blob = blobs.Blob("k", 0x01020304, bytes(range(12)), b"\xaa" * 16)
    header = b"KB\x01\x01k\x01\x02\x03\x04"
    assert blob.header() == header
    assert blob.encode() == header + bytes(range(12)) + b"\xaa" * 16
    assert blob.aad({"b": "2", "a": "1"}) == (
        b"keybroker.blob.v1" + header + b"\x02\x00\x01a\x00\x011\x00\x01b\x00\x012"
    )
    assert blob.aad({}) == b"keybroker.blob.v1" + header + b"\x00"


def test_a_fixed_blob_parses_to_its_fields() -> None:
    data = b"KB\x01\x03k.1\x00\x00\x01\x00" + bytes(range(12)) + b"\x01\x02" + b"\xbb" * 16
    assert blobs.parse(data) == blobs.Blob("k.1", 256, bytes(range(12)), b"\x01\x02" + b"\xbb" * 16)


def test_the_shortest_and_the_longest_blob_parse() -> None:
    shortest = b"KB\x01\x01k\x00\x00\x00\x01" + b"\x00" * 12 + b"\x00" * 16
    assert blobs.parse(shortest).sealed == b"\x00" * 16
    with pytest.raises(InvalidArgument):
        blobs.parse(shortest[:-1])
    key_id = "k" * 63
    longest = blobs.Blob(key_id, 1, b"\x00" * 12, b"\x00" * (blobs.MAX_PLAINTEXT + 16)).encode()
    assert len(longest) == blobs.MAX_BLOB
    assert blobs.parse(longest).key_id == key_id
    with pytest.raises(InvalidArgument):
        blobs.parse(longest + b"\x00")


@pytest.mark.parametrize(
    "data",
    [
        b"K",
        b"KB\x01",
        b"KBX\x01k\x00\x00\x00\x01" + b"\x00" * 28,
        b"KB\x01\x01\xff\x00\x00\x00\x01" + b"\x00" * 28,  # not ASCII
        b"KB\x01\x01-\x00\x00\x00\x01" + b"\x00" * 28,  # not a key id
        b"KB\x01\x02k\x00\x00\x00\x01" + b"\x00" * 28,  # key id runs into the version
    ],
)
def test_more_malformed_blobs(data: bytes) -> None:
    with pytest.raises(InvalidArgument, match="not a keybroker blob"):
        blobs.parse(data)


def test_an_empty_ciphertext_is_asked_for() -> None:
    with pytest.raises(InvalidArgument, match="ciphertext is required"):
        blobs.parse(b"")


# Canonical context ----------------------------------------------------------------------------


def test_canonical_context_is_fixed_bytes() -> None:
    assert canonical_context({}) == b"\x00"
    assert canonical_context({"é": "€€", "a": "v" * 256}) == (
        b"\x02" + b"\x00\x01a\x01\x00" + b"v" * 256 + b"\x00\x02\xc3\xa9\x00\x06" + "€€".encode()
    )
    # Sorted by the keys' UTF-8 bytes: "Z" < "a" < "é".
    assert canonical_context({"é": "", "a": "", "Z": ""}) == (
        b"\x03\x00\x01Z\x00\x00\x00\x01a\x00\x00\x00\x02\xc3\xa9\x00\x00"
    )


def test_canonical_context_counts_and_lengths_are_unsigned() -> None:
    many = {f"{i:03d}": "" for i in range(200)}
    assert canonical_context(many)[:1] == b"\xc8"
    long = canonical_context({"k": "v" * 40_000})
    assert long[:8] == b"\x01\x00\x01k\x9c\x40vv"
    assert len(long) == 1 + 2 + 1 + 2 + 40_000
    assert canonical_context({"k" * 40_000: ""})[1:3] == b"\x9c\x40"


# Contexts ------------------------------------------------------------------------------------


def test_validate_context_at_its_bounds() -> None:
    sixteen = {f"{i}": "v" for i in range(16)}
    checked = validate_context(sixteen)
    assert checked == sixteen and checked is not sixteen and type(checked) is dict
    assert validate_context({"é" * 32: "€" * 85}) == {"é" * 32: "€" * 85}


@pytest.mark.parametrize(
    "context",
    [
        {"k\ud800": "v"},
        {"k": "v\udfff"},
        {1: "v"},
        {"k": 1},
        {"k": None},
    ],
)
def test_validate_context_refuses_what_is_not_text(context: dict[object, object]) -> None:
    with pytest.raises(InvalidArgument, match="context keys and values must"):
        validate_context(context)  # type: ignore[arg-type]


# Audit event hash and context JSON ----------------------------------------------------------


def event() -> AuditEvent:
    return AuditEvent(
        sequence=7,
        time=T0,
        principal="consumer",
        operation="Decrypt",
        key_id="k",
        key_version=2,
        token_id="t-1",
        context={"site": "lyon", "d": 'é"\n'},
        justification="why",
        outcome=Outcome.ALLOWED,
        reason="",
        request_id="r3",
        prev_hash="",
        hash="",
    )


#: The hash of `event()` at chain_sequence 5 of chain kb-0123456789ab after 32 zero bytes.
EVENT_HASH = "d75208e2b07ddfe257559c0d308d410076559f3f5ddbb40fca2144983ef23817"


def test_the_event_hash_is_fixed() -> None:
    chained = chained_event(event(), "kb-0123456789ab", 5, "00" * 32)
    assert chained.hash == EVENT_HASH
    assert (chained.chain, chained.chain_sequence, chained.prev_hash) == (
        "kb-0123456789ab",
        5,
        "00" * 32,
    )
    assert replace(chained, chain="", chain_sequence=0, prev_hash="", hash="") == event()
    # The offline verifier's own rule gives the same hash.
    assert evidence.event_hash(event_record(chained)) == EVENT_HASH


def test_the_event_hash_covers_every_field() -> None:
    base = chained_event(event(), "kb-0123456789ab", 5, "00" * 32).hash
    changes = [
        {"time": T0 + timedelta(microseconds=1)},
        {"principal": "consumer2"},
        {"operation": "Encrypt"},
        {"key_id": "j"},
        {"key_version": 3},
        {"token_id": "t-2"},
        {"context": {"site": "lyon"}},
        {"justification": "why not"},
        {"outcome": Outcome.DENIED},
        {"reason": "r"},
        {"request_id": "r4"},
    ]
    hashes = {
        chained_event(replace(event(), **c), "kb-0123456789ab", 5, "00" * 32).hash for c in changes
    }
    assert len(hashes) == len(changes) and base not in hashes
    assert chained_event(event(), "kb-0123456789ab", 6, "00" * 32).hash != base
    assert chained_event(event(), "kb-x", 5, "00" * 32).hash != base
    assert chained_event(event(), "kb-0123456789ab", 5, "01" * 32).hash != base


def test_context_json_is_fixed_text() -> None:
    assert context_json({}) == "{}"
    assert context_json({"site": "lyon", "d": 'é"\n'}) == '{"d":"é\\"\\n","site":"lyon"}'
    assert context_json({"b": "\x01", "a": "\\"}) == '{"a":"\\\\","b":"\\u0001"}'
    # Values that are not text (never from a request) are still written as canonical JSON.
    assert context_json({"é": "ü", "b": 1}) == '{"b":1,"é":"ü"}'
    assert context_json({"b": None, "a": True}) == '{"a":true,"b":null}'


def test_odd_field_types_hash_as_canonical_json() -> None:
    odd = replace(event(), key_version=True, principal=None)  # type: ignore[arg-type]
    chained = chained_event(odd, "c", 1, "00" * 32)
    record = event_record(replace(odd, chain="c", chain_sequence=1, prev_hash="00" * 32))
    assert record["key_version"] is True and record["principal"] is None
    assert chained.hash == evidence.event_hash(record)
    assert chained.hash != chained_event(replace(odd, key_version=1), "c", 1, "00" * 32).hash


def test_event_record_and_stored_event() -> None:
    chained = chained_event(event(), "kb-0123456789ab", 5, "00" * 32)
    stored = stored_event(chained, 42)
    assert stored == replace(chained, sequence=42)
    assert event_record(stored) == {
        "type": "event",
        "sequence": 42,
        "chain": "kb-0123456789ab",
        "chain_sequence": 5,
        "time": "2026-11-30T12:00:01.250000Z",
        "principal": "consumer",
        "operation": "Decrypt",
        "key_id": "k",
        "key_version": 2,
        "token_id": "t-1",
        "context": {"site": "lyon", "d": 'é"\n'},
        "justification": "why",
        "outcome": "allowed",
        "reason": "",
        "request_id": "r3",
        "prev_hash": "00" * 32,
        "hash": EVENT_HASH,
    }


def test_audit_times_are_utc_with_microseconds() -> None:
    assert (
        format_time(datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC)) == "2026-01-02T03:04:05.000006Z"
    )
    paris = timezone(timedelta(hours=2))
    assert format_time(datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=paris)) == (
        "2026-01-02T01:04:05.000006Z"
    )
    assert format_time(datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)) == "2026-01-02T03:04:05.000000Z"


# Small domain rules ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "caller", [Caller("", "C" * 43, "r"), Caller("consumer", "", "r"), Caller("", "", "r")]
)
def test_a_caller_needs_a_principal_and_a_thumbprint(caller: Caller) -> None:
    with pytest.raises(Unauthenticated, match="no client certificate"):
        caller.require_authenticated()
    Caller("consumer", "C" * 43, "r").require_authenticated()


def make_key(**changes: object) -> Key:
    versions = (KeyVersion(1, T0, "kb:k:1"), KeyVersion(3, T0, "kb:k:3"))
    key = Key("k", "", KeyState.ENABLED, 3, versions, 1, KeyPolicy(), "local", T0)
    return key.evolve(**changes)


def test_key_versions_and_destruction() -> None:
    key = make_key()
    assert key.version(3) == KeyVersion(3, T0, "kb:k:3")
    assert key.version(2) is None and key.primary().hsm_label == "kb:k:3"
    assert key.evolve(state=KeyState.DISABLED).state is KeyState.DISABLED
    assert not key.destruction_started()
    rotating = key.evolve(lease=Lease("h", LeaseTask.ROTATE, T0))
    assert not rotating.destruction_started()
    assert key.evolve(lease=Lease("h", LeaseTask.DESTROY, T0)).destruction_started()


def test_a_lease_holds_until_its_expiry() -> None:
    lease = Lease("h", LeaseTask.DESTROY, T0)
    assert lease.held(T0 - timedelta(microseconds=1))
    assert not lease.held(T0)


def test_approval_requests() -> None:
    request = ApprovalRequest(
        request_id="apr-1",
        operation=ApprovalOperation.ENABLE_KEY,
        key_id="k",
        requester="admin",
        create_time=T0,
        expire_time=T0 + timedelta(hours=1),
        required=2,
        key_revision=1,
        approvals=(Approval("admin", T0), Approval("admin2", T0)),
    )
    assert request.approvers() == ("admin", "admin2")
    assert not request.past_expiry(T0 + timedelta(minutes=59))
    assert request.past_expiry(T0 + timedelta(hours=1))
    closed = request.evolve(state=ApprovalState.APPLIED)
    assert closed.state is ApprovalState.APPLIED and closed.request_id == "apr-1"
    assert not closed.past_expiry(T0 + timedelta(hours=2))


def test_versions_use_all_32_bits_unsigned() -> None:
    top = blobs.Blob("k", 0xFFFFFFFF, b"\x00" * 12, b"\x00" * 16)
    assert top.header() == b"KB\x01\x01k\xff\xff\xff\xff"
    assert blobs.parse(top.encode()).key_version == 0xFFFFFFFF
    half = b"KB\x01\x01k\x80\x00\x00\x00" + b"\x00" * 28
    assert blobs.parse(half).key_version == 0x80000000


def test_fields_of_odd_types_are_written_as_canonical_json() -> None:
    """Stored events hold text and integers; anything else is still written exactly as the
    evidence format's canonical JSON writes it (UTF-8, no NaN), or refused like it."""
    odd = replace(event(), principal=["é", 1.5, {"b": 1, "a": None}], key_version="é")  # type: ignore[arg-type]
    chained = chained_event(odd, "c", 1, "00" * 32)
    record = event_record(replace(odd, chain="c", chain_sequence=1, prev_hash="00" * 32))
    assert chained.hash == evidence.event_hash(record)
    for field in ("principal", "key_version"):
        nan = replace(event(), **{field: float("nan")})
        with pytest.raises(ValueError):
            chained_event(nan, "c", 1, "00" * 32)
        with pytest.raises(ValueError):
            evidence.canonical(event_record(nan))
    assert context_json({1: "é"}) == '{"1":"é"}'  # type: ignore[dict-item]
    assert context_json({"b": {"y": 1, "x": "é"}, "a": ""}) == '{"a":"","b":{"x":"é","y":1}}'  # type: ignore[dict-item]
    with pytest.raises(ValueError):
        context_json({"a": float("nan")})  # type: ignore[dict-item]
