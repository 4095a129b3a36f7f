"""Property tests of every parser a hostile party can feed: the broker's blob, the file
envelope's header and chunks, encryption contexts, and the offline audit verifier.

Each property says what a parser may do with any input: return the documented result or raise
its one documented error, never anything else, and never accept an altered input. Brief in
`make test`; `make fuzz` runs the same properties with many more examples (tests/fuzzing.py),
and `tests/fuzz/` runs the parsers under atheris. A crash found becomes a regression example
(`@example`) here.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from keybroker_client import evidence
from keybroker_client import fileformat as ff
from keybroker_client.fileformat import FileCipher, InvalidFile

from broker import blob as blobs
from broker.domain import canonical_context, validate_context
from broker.errors import InvalidArgument
from tests.fuzzing import fuzz_settings
from tests.unit.test_evidence import LocalSigner, T, chain_of, checkpoint

pytestmark = pytest.mark.fuzz

KEY = os.urandom(32)
WRAPPED = b"KB\x01\x08patients" + b"w" * 64
HEADER = ff.new_header(WRAPPED, {"dataset": "cohort-42", "purpose": "research"}, 4096)
PLAIN = os.urandom(3 * 4096 + 100)


def _seal(data: bytes = PLAIN) -> bytes:
    out = io.BytesIO()
    FileCipher(KEY, HEADER).encrypt(io.BytesIO(data), out)
    return out.getvalue()


SEALED = _seal()
VALID_BLOB = blobs.Blob("patients", 3, bytes(12), os.urandom(48)).encode()


def mutate(data: bytes, position: int, value: int) -> bytes:
    """`data` with byte `position` (mod length) replaced by a different value."""
    index = position % len(data)
    new = value % 256
    if new == data[index]:
        new ^= 0xFF
    return data[:index] + bytes([new]) + data[index + 1 :]


# -- the broker's blob ---------------------------------------------------------------------------


@fuzz_settings(300)
@given(st.binary(max_size=300))
@example(b"KB\x01\x00\x00\x00\x00\x01" + bytes(28))  # empty key id
@example(b"KB\x01\x01a\x00\x00\x00\x00" + bytes(28))  # version 0
def test_blob_parse_returns_or_raises_invalid_argument(data: bytes) -> None:
    try:
        parsed = blobs.parse(data)
    except InvalidArgument:
        return
    # Whatever parses encodes back to exactly the input: one blob, one encoding.
    assert parsed.encode() == data


@fuzz_settings(300)
@given(st.integers(0, 10_000), st.integers(0, 255))
def test_a_changed_blob_header_changes_what_it_names(position: int, value: int) -> None:
    header_size = len(blobs.parse(VALID_BLOB).header())
    changed = mutate(VALID_BLOB, position % header_size, value)
    try:
        parsed = blobs.parse(changed)
    except InvalidArgument:
        return
    original = blobs.parse(VALID_BLOB)
    # The header feeds the AAD, so the HSM's tag check fails for any change that still parses.
    assert parsed.aad({}) != original.aad({})


# -- the file envelope ---------------------------------------------------------------------------


@fuzz_settings(300)
@given(st.binary(max_size=400))
def test_read_header_returns_or_raises_invalid_file(data: bytes) -> None:
    try:
        header = ff.read_header(io.BytesIO(data))
    except InvalidFile:
        return
    assert data.startswith(header.raw)


@fuzz_settings(300)
@given(st.integers(0, 10_000), st.integers(0, 255))
def test_a_changed_header_is_refused_or_fails_the_first_chunk(position: int, value: int) -> None:
    changed = mutate(SEALED, position % len(HEADER.raw), value)
    src = io.BytesIO(changed)
    try:
        header = ff.read_header(src)
        FileCipher(KEY, header).decrypt(src, io.BytesIO())
    except InvalidFile:
        return
    pytest.fail("an altered header decrypted")


@fuzz_settings(200)
@given(st.integers(0, 10**7), st.integers(0, 255))
def test_any_changed_byte_of_a_file_is_detected(position: int, value: int) -> None:
    changed = mutate(SEALED, position, value)
    src = io.BytesIO(changed)
    with pytest.raises(InvalidFile):
        FileCipher(KEY, ff.read_header(src)).decrypt(src, io.BytesIO())


@fuzz_settings(200)
@given(st.integers(0, len(SEALED) - 1), st.binary(max_size=40))
def test_truncated_or_extended_files_are_detected(cut: int, tail: bytes) -> None:
    for changed in (SEALED[:cut], SEALED + tail if tail else SEALED[:-1]):
        src = io.BytesIO(changed)
        with pytest.raises(InvalidFile):
            FileCipher(KEY, ff.read_header(src)).decrypt(src, io.BytesIO())


# -- contexts ------------------------------------------------------------------------------------

any_text = st.text(st.characters(codec=None, categories=None), max_size=300)


@fuzz_settings(300)
@given(st.dictionaries(any_text, any_text, max_size=40))
@example({"\udfdf": "x"})  # found by atheris: a lone surrogate raised UnicodeEncodeError
@example({"k": "\ud800"})
def test_validate_context_returns_a_copy_or_raises_invalid_argument(ctx: dict[str, str]) -> None:
    try:
        checked = validate_context(ctx)
    except InvalidArgument:
        return
    assert checked == ctx
    assert canonical_context(checked)


@fuzz_settings(300)
@given(
    st.dictionaries(any_text, any_text, max_size=6), st.dictionaries(any_text, any_text, max_size=6)
)
def test_valid_contexts_encode_injectively(a: dict[str, str], b: dict[str, str]) -> None:
    try:
        a, b = validate_context(a), validate_context(b)
    except InvalidArgument:
        return
    assert (canonical_context(a) == canonical_context(b)) == (a == b)


# -- the offline audit verifier ------------------------------------------------------------------

SIGNER = LocalSigner()


def _export() -> list[bytes]:
    records = chain_of(SIGNER, "a", 3)
    records.append(checkpoint(SIGNER, "a", 3, records[-1]["hash"]))
    manifest = SIGNER.sign({
        "type": "manifest", "after_sequence": 0, "through_sequence": 3,
        "chains": {"a": {"chain_sequence": 3, "head": records[3]["hash"]}}, "time": T,
        "verified": True, "error": "",
    })  # fmt: skip
    return [evidence.canonical(r) + b"\n" for r in [*records, manifest]]


EXPORT = _export()
JWKS = {"keys": [SIGNER.jwk()]}


def _signature_bytes(line: bytes) -> Any:
    """The decoded parts of a signed record's JWS (None for a record without one)."""
    try:
        record = json.loads(line)
        parts = record.pop("jws").split(".")
        return record, [evidence.records._b64url(p) for p in parts]
    except (ValueError, KeyError, AttributeError, TypeError):
        return None


def test_the_export_verifies_unchanged() -> None:
    assert evidence.verify_export(EXPORT, JWKS).ok


@fuzz_settings(300)
@given(st.integers(0, len(EXPORT) - 1), st.integers(0, 10_000), st.integers(0, 255))
def test_any_changed_byte_of_an_export_is_reported(line: int, position: int, value: int) -> None:
    lines = list(EXPORT)
    lines[line] = mutate(lines[line].rstrip(b"\n"), position, value) + b"\n"
    report = evidence.verify_export(lines, JWKS)
    if report.ok:
        # The one harmless change: unused low bits of a base64url character of the JWS, which
        # decode to the very same signed bytes.
        before, after = _signature_bytes(EXPORT[line]), _signature_bytes(lines[line])
        assert before is not None and before == after


@fuzz_settings(300)
@given(st.lists(st.binary(max_size=200), max_size=8))
def test_the_verifier_reports_garbage_and_never_raises(lines: list[bytes]) -> None:
    report = evidence.verify_export([*EXPORT[:2], *lines], JWKS)
    assert not report.ok or not lines


@fuzz_settings(100)
@given(st.permutations(range(len(EXPORT))))
def test_reordered_exports_are_reported(order: list[int]) -> None:
    if order == sorted(order):
        return
    assert not evidence.verify_export([EXPORT[i] for i in order], JWKS).ok
