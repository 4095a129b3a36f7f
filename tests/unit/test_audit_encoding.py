"""The broker's fast audit encoding gives the very bytes of the evidence format's rules: the
event hash of `keybroker_client.evidence.event_hash`, the stored context of `canonical`, the
time of `format_time`. Generated events cover escapes, non-ASCII, empty and odd values."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone

from hypothesis import given, settings
from hypothesis import strategies as st
from keybroker_client import evidence

from broker.adapters.sql_common import event_params
from broker.domain import (
    AuditEvent,
    Outcome,
    chained_event,
    context_json,
    event_record,
    format_time,
    stored_event,
)

# Text without lone surrogates (UTF-8 cannot carry them; the request decoder refuses them).
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)
CONTEXTS = st.dictionaries(TEXT, TEXT, max_size=6)
TIMES = st.datetimes(
    min_value=datetime(1970, 1, 2), max_value=datetime(9998, 12, 31), timezones=st.just(UTC)
)
HASHES = st.binary(min_size=32, max_size=32).map(bytes.hex)


def reference_hash(event: AuditEvent, chain: str, chain_sequence: int, prev_hash: str) -> str:
    placed = replace(event, chain=chain, chain_sequence=chain_sequence, prev_hash=prev_hash)
    return evidence.event_hash(event_record(placed))


@st.composite
def events(draw: st.DrawFn) -> AuditEvent:
    return AuditEvent(
        sequence=0,
        time=draw(TIMES),
        principal=draw(TEXT),
        operation=draw(st.sampled_from(["Decrypt", "GenerateDataKey", "IssueToken"])),
        key_id=draw(TEXT),
        key_version=draw(st.integers(0, 2**31)),
        token_id=draw(TEXT),
        context=draw(CONTEXTS),
        justification=draw(TEXT),
        outcome=draw(st.sampled_from(list(Outcome))),
        reason=draw(TEXT),
        request_id=draw(TEXT),
        prev_hash="",
        hash="",
    )


@settings(max_examples=300, deadline=None)
@given(events(), TEXT.filter(bool), st.integers(1, 2**62), HASHES)
def test_chained_event_hash_is_the_evidence_hash(
    event: AuditEvent, chain: str, chain_sequence: int, prev_hash: str
) -> None:
    placed = chained_event(event, chain, chain_sequence, prev_hash)
    assert placed.hash == reference_hash(event, chain, chain_sequence, prev_hash)
    assert (placed.chain, placed.chain_sequence, placed.prev_hash) == (
        chain,
        chain_sequence,
        prev_hash,
    )
    assert replace(placed, hash="", chain="", chain_sequence=0, prev_hash="") == event
    assert evidence.event_problem(event_record(stored_event(placed, 7))) == ""


@settings(max_examples=300, deadline=None)
@given(CONTEXTS)
def test_context_json_is_the_canonical_json(context: dict[str, str]) -> None:
    expected = json.dumps(context, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert context_json(context) == expected


def test_escapes_and_odd_values_encode_as_json_does() -> None:
    context = {'q"uote': "back\\slash", "ctl\x01\n\t": "\u2028é😀", "": ""}
    assert context_json(context) == json.dumps(
        context, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    event = AuditEvent(0, datetime(2026, 1, 1, tzinfo=UTC), "p\"\\", "Decrypt", "k", 0, "",
                       context, "", Outcome.DENIED, "\x7f", "", "", "")  # fmt: skip
    assert chained_event(event, "c", 1, "0" * 64).hash == reference_hash(event, "c", 1, "0" * 64)


@given(TIMES)
def test_format_time_is_the_evidence_form(value: datetime) -> None:
    assert format_time(value) == evidence.format_time(value)
    assert format_time(value) == format_time(value)  # from the cache, the same


def test_format_time_converts_other_zones_and_naive_times() -> None:
    paris = datetime(2026, 3, 1, 12, 0, 0, 5, tzinfo=timezone(timedelta(hours=1)))
    assert format_time(paris) == "2026-03-01T11:00:00.000005Z" == evidence.format_time(paris)
    naive = datetime(2026, 3, 1, 12, 0)
    assert format_time(naive) == "2026-03-01T12:00:00.000000Z" == evidence.format_time(naive)


def test_stored_columns_are_the_hashed_forms() -> None:
    when = datetime(2026, 1, 1, 0, 0, 0, 1, tzinfo=UTC)
    draft = AuditEvent(0, when, "p", "Decrypt", "k", 1, "t", {"b": "2", "a": "é"}, "j",
                       Outcome.ALLOWED, "", "r", "", "")  # fmt: skip
    event = chained_event(draft, "c", 1, evidence.GENESIS_HASH)
    params = event_params(event)
    assert params[2] == "2026-01-01T00:00:00.000001Z"
    assert params[8] == '{"a":"é","b":"2"}'
    record = event_record(event)
    assert json.loads(params[8]) == record["context"] and params[2] == record["time"]
