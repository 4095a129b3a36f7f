"""Pure rules: key ids, contexts, canonical AAD and the blob format."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker import blob as blobs
from broker.domain import (
    Grant,
    Operation,
    canonical_context,
    validate_context,
    validate_key_id,
)
from broker.errors import InvalidArgument

text = st.text(
    st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=12
)
contexts = st.dictionaries(text.filter(bool), text, max_size=5)


@given(contexts, contexts)
def test_distinct_contexts_give_distinct_aad(a: dict[str, str], b: dict[str, str]) -> None:
    if a != b:
        assert canonical_context(a) != canonical_context(b)
        blob = blobs.Blob("k", 1, b"\x00" * 12, b"")
        assert blob.aad(a) != blob.aad(b)


@given(contexts)
def test_canonical_context_ignores_insertion_order(ctx: dict[str, str]) -> None:
    reordered = dict(reversed(list(ctx.items())))
    assert canonical_context(ctx) == canonical_context(reordered)


def test_aad_binds_key_and_version() -> None:
    ctx = {"a": "b"}
    base = blobs.Blob("k", 1, b"\x00" * 12, b"").aad(ctx)
    assert blobs.Blob("k", 2, b"\x00" * 12, b"").aad(ctx) != base
    assert blobs.Blob("j", 1, b"\x00" * 12, b"").aad(ctx) != base
    assert base.startswith(b"keybroker.blob.v1KB\x01")


@given(
    st.from_regex(r"[a-z0-9][a-z0-9._-]{0,62}", fullmatch=True),
    st.integers(1, 2**32 - 1),
    st.binary(min_size=12, max_size=12),
    st.binary(min_size=16, max_size=80),
)
def test_blob_round_trip(key_id: str, version: int, iv: bytes, sealed: bytes) -> None:
    blob = blobs.Blob(key_id, version, iv, sealed)
    assert blobs.parse(blob.encode()) == blob


@given(st.binary(max_size=200))
def test_parse_never_crashes(data: bytes) -> None:
    try:
        blobs.parse(data)
    except InvalidArgument:
        pass


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"KB",
        b"XX\x01\x01k\x00\x00\x00\x01" + b"\x00" * 28,
        b"KB\x02\x01k\x00\x00\x00\x01" + b"\x00" * 28,
        b"KB\x01\x01k\x00\x00\x00\x00" + b"\x00" * 28,
        b"KB\x01\x01K\x00\x00\x00\x01" + b"\x00" * 28,
        b"KB\x01\x00\x00\x00\x00\x01" + b"\x00" * 28,
    ],
)
def test_parse_rejects_malformed(data: bytes) -> None:
    with pytest.raises(InvalidArgument):
        blobs.parse(data)


def test_parse_rejects_oversize() -> None:
    good = blobs.Blob("k", 1, b"\x00" * 12, b"\x00" * 16).encode()
    with pytest.raises(InvalidArgument):
        blobs.parse(good + b"\x00" * blobs.MAX_BLOB)


@pytest.mark.parametrize("key_id", ["a", "a" * 63, "0abc", "a.b_c-d"])
def test_valid_key_ids(key_id: str) -> None:
    assert validate_key_id(key_id) == key_id


@pytest.mark.parametrize("key_id", ["", "A", "_a", "a" * 64, "a b", "a\n", "é"])
def test_invalid_key_ids(key_id: str) -> None:
    with pytest.raises(InvalidArgument):
        validate_key_id(key_id)


def test_context_limits() -> None:
    assert validate_context({"k" * 64: "v" * 256})
    for bad in (
        {"k" * 65: "v"},
        {"k": "v" * 257},
        {f"{i}": "v" for i in range(17)},
        {"": "v"},
        {"k\x00": "v"},
        {"k": "\x00"},
        {"é" * 33: "v"},
    ):
        with pytest.raises(InvalidArgument):
            validate_context(bad)


def test_grant_context_matching() -> None:
    g = Grant("svc", frozenset({Operation.DECRYPT}), {"dataset": "cohort-*", "site": "lyon"})
    assert g.context_allows({"dataset": "cohort-42", "site": "lyon", "extra": "x"})
    assert not g.context_allows({"dataset": "cohort-42"})
    assert not g.context_allows({"dataset": "other", "site": "lyon"})
    assert not g.context_allows({"dataset": "cohort-42", "site": "Lyon"})
    exact = Grant("svc", frozenset({Operation.DECRYPT}), {"dataset": "a"})
    assert not exact.context_allows({"dataset": "ab"})
