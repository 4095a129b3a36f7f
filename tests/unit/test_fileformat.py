"""The keybroker file format (docs/file-format.md): layout, and every tampering refused.

Each test builds files with a known data key and reads them back through the pure module, so
a failure names the format, not the broker. Chunk size 4 KiB keeps files small.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct

import pytest
from keybroker_client import fileformat as ff
from keybroker_client.fileformat import FileCipher, InvalidFile

C = 4096
T = ff.TAG_SIZE
KEY = bytes(range(32))
CTX = {"dataset": "cohort-42", "site": "lyon"}


def wrapped(key_id: str = "patients") -> bytes:
    """A stand-in for the broker's blob: only its key-id prefix is read on the client."""
    return b"KB\x01" + bytes([len(key_id)]) + key_id.encode() + b"\x00\x00\x00\x01" + b"w" * 60


def seal(data: bytes, key: bytes = KEY, context: dict[str, str] | None = None) -> bytes:
    header = ff.new_header(wrapped(), CTX if context is None else context, C)
    out = io.BytesIO()
    assert FileCipher(key, header).encrypt(io.BytesIO(data), out) == len(data)
    return out.getvalue()


def unseal(blob: bytes, key: bytes = KEY) -> bytes:
    src = io.BytesIO(blob)
    header = ff.read_header(src)
    out = io.BytesIO()
    FileCipher(key, header).decrypt(src, out)
    return out.getvalue()


def header_size(blob: bytes) -> int:
    return len(ff.read_header(io.BytesIO(blob)).raw)


def chunks(blob: bytes) -> tuple[bytes, list[bytes]]:
    """The header and the chunks of a file (all full-size but the last)."""
    h = header_size(blob)
    body = blob[h:]
    return blob[:h], [body[i : i + C + T] for i in range(0, len(body), C + T)]


DATA = os.urandom(3 * C + 1000)  # three full chunks and a short final one
FILE = seal(DATA)
HEADER, CHUNKS = chunks(FILE)


def test_layout_byte_by_byte() -> None:
    header = ff.read_header(io.BytesIO(FILE))
    assert FILE[:4] == b"KBFS" and FILE[4] == 1 and FILE[5] == 12
    assert FILE[6:13] == header.nonce_prefix and FILE[13:45] == header.salt
    (wlen,) = struct.unpack(">H", FILE[45:47])
    assert FILE[47 : 47 + wlen] == wrapped() == header.wrapped_key
    ctx = FILE[47 + wlen :]
    # count, then entries sorted by key: (2, "dataset", 2, "cohort-42"), (2, "site", 2, "lyon")
    assert ctx[0] == 2
    assert ctx[1:33] == b"\x00\x07dataset\x00\x09cohort-42\x00\x04site\x00\x04lyon"
    assert header.raw == HEADER and len(HEADER) == 47 + wlen + 33
    assert header.context == CTX and header.chunk_size == C and header.key_id == "patients"
    assert [len(c) for c in CHUNKS] == [C + T] * 3 + [1000 + T]
    assert unseal(FILE) == DATA


def test_chunks_are_stream_aes_gcm_under_the_hkdf_file_key() -> None:
    """Recomputes chunk 1 and the final chunk from the documented construction."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.hashes import SHA256
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    header = ff.read_header(io.BytesIO(FILE))
    file_key = HKDF(SHA256(), 32, salt=header.salt, info=b"keybroker file v1").derive(KEY)
    aad = hashlib.sha256(HEADER).digest()
    aead = AESGCM(file_key)
    nonce1 = header.nonce_prefix + (1).to_bytes(4, "big") + b"\x00"
    assert aead.encrypt(nonce1, DATA[C : 2 * C], aad) == CHUNKS[1]
    nonce3 = header.nonce_prefix + (3).to_bytes(4, "big") + b"\x01"
    assert aead.encrypt(nonce3, DATA[3 * C :], aad) == CHUNKS[3]


@pytest.mark.parametrize(
    ("size", "sizes"), [(0, [T]), (C, [C + T, T]), (2 * C - 1, [C + T, C - 1 + T])]
)
def test_empty_and_exact_multiple_end_with_a_short_final_chunk(size: int, sizes: list[int]) -> None:
    data = os.urandom(size)
    blob = seal(data)
    assert [len(c) for c in chunks(blob)[1]] == sizes
    assert unseal(blob) == data


def test_headers_are_fresh_per_file() -> None:
    a, b = ff.read_header(io.BytesIO(seal(b"x"))), ff.read_header(io.BytesIO(seal(b"x")))
    assert a.salt != b.salt and a.nonce_prefix != b.nonce_prefix


def refused(blob: bytes, match: str | None = None, key: bytes = KEY) -> None:
    with pytest.raises(InvalidFile, match=match):
        unseal(blob, key)


@pytest.mark.parametrize("keep", [0, 1, 2, 3])
def test_truncation_at_each_chunk_boundary(keep: int) -> None:
    refused(HEADER + b"".join(CHUNKS[:keep]), "truncated")


@pytest.mark.parametrize("cut", [1, T - 1, T, C // 2, C + T - 1])
def test_truncation_inside_a_chunk(cut: int) -> None:
    refused(HEADER + CHUNKS[0] + CHUNKS[1][:cut])
    refused(FILE[:-1])


def test_truncation_inside_the_header() -> None:
    for cut in (0, 3, 5, 46, len(HEADER) - 1):
        refused(FILE[:cut], "not a keybroker file")


def test_dropped_last_chunk_even_when_it_is_empty() -> None:
    blob = seal(os.urandom(2 * C))
    head, parts = chunks(blob)
    assert len(parts[-1]) == T
    refused(head + b"".join(parts[:-1]), "truncated")


def test_reordered_chunks() -> None:
    refused(HEADER + CHUNKS[1] + CHUNKS[0] + CHUNKS[2] + CHUNKS[3], "chunk 0")
    refused(HEADER + CHUNKS[0] + CHUNKS[2] + CHUNKS[1] + CHUNKS[3], "chunk 1")


def test_duplicated_chunk() -> None:
    refused(HEADER + CHUNKS[0] + CHUNKS[0] + CHUNKS[1] + CHUNKS[2] + CHUNKS[3], "chunk 1")
    refused(FILE + CHUNKS[3])


def test_chunk_swapped_from_another_file_with_the_same_data_key() -> None:
    other = seal(DATA)  # same data key, same wrapped key, same context: another salt and prefix
    _, other_chunks = chunks(other)
    assert unseal(other) == DATA
    for i in range(4):
        mixed = list(CHUNKS)
        mixed[i] = other_chunks[i]
        refused(HEADER + b"".join(mixed), f"chunk {i}")
    # Nor does another file's header fit these chunks.
    refused(chunks(other)[0] + b"".join(CHUNKS), "chunk 0")


def test_chunk_swapped_from_another_file_with_another_key() -> None:
    _, other_chunks = chunks(seal(DATA, key=os.urandom(32)))
    refused(HEADER + CHUNKS[0] + other_chunks[1] + CHUNKS[2] + CHUNKS[3], "chunk 1")


@pytest.mark.parametrize("extra", [b"\x00", os.urandom(T), CHUNKS[0]])
def test_appended_bytes(extra: bytes) -> None:
    refused(FILE + extra)


def test_appended_bytes_after_a_final_chunk_that_fills_the_read() -> None:
    # Data ending in a final chunk of C - 1 bytes: one appended byte makes it full-size.
    blob = seal(os.urandom(2 * C - 1))
    refused(blob + b"\x00")
    refused(blob + b"\x00\x00")


def test_wrong_data_key() -> None:
    refused(FILE, "chunk 0", key=os.urandom(32))


def flip(blob: bytes, i: int, bit: int = 1) -> bytes:
    return blob[:i] + bytes([blob[i] ^ bit]) + blob[i + 1 :]


def test_every_header_byte_is_authenticated() -> None:
    for i in range(len(HEADER)):
        for bit in (0x01, 0x80):
            refused(flip(FILE, i, bit))


def test_chunk_bytes_are_authenticated() -> None:
    for i in range(len(HEADER), len(FILE), 61):
        refused(flip(FILE, i), "does not authenticate")
    refused(flip(FILE, len(FILE) - 1), "chunk 3")


@pytest.mark.parametrize(
    ("offset", "value", "match"),
    [
        (0, b"KBFX", "no KBFS magic"),
        (4, b"\x02", "unsupported file format version 2"),
        (5, b"\x0b", "chunk size exponent 11"),
        (5, b"\x19", "chunk size exponent 25"),
        (5, b"\x0d", "chunk 0"),  # a valid but different chunk size: the header digest differs
        (6, b"\xff" * 7, "chunk 0"),  # nonce prefix
        (13, b"\xff" * 32, "chunk 0"),  # salt
        (45, b"\x00\x00", "wrapped key length 0"),
        (45, b"\xff\xff", "wrapped key length 65535"),
    ],
)
def test_each_header_field_edited(offset: int, value: bytes, match: str) -> None:
    refused(FILE[:offset] + value + FILE[offset + len(value) :], match)


def test_context_edited_in_the_header() -> None:
    wlen = len(wrapped())
    at = HEADER.index(b"cohort-42")
    refused(FILE[:at] + b"cohort-43" + FILE[at + 9 :], "chunk 0")
    refused(FILE[: 47 + wlen] + b"\x11" + FILE[48 + wlen :], "17 context entries")
    refused(FILE[: 47 + wlen] + b"\x01" + FILE[48 + wlen :], "chunk 0")  # entry dropped
    refused(FILE[:at] + b"\xff\xfe" + FILE[at + 2 :], "not UTF-8")


def header_with(entries: list[tuple[bytes, bytes]]) -> bytes:
    fixed = b"KBFS\x01\x0c" + b"p" * 7 + b"s" * 32 + struct.pack(">H", len(wrapped())) + wrapped()
    body = bytes([len(entries)]) + b"".join(
        struct.pack(">H", len(k)) + k + struct.pack(">H", len(v)) + v for k, v in entries
    )
    return fixed + body


@pytest.mark.parametrize(
    ("entries", "match"),
    [
        ([(b"b", b"1"), (b"a", b"2")], "not sorted and unique"),
        ([(b"a", b"1"), (b"a", b"2")], "not sorted and unique"),
        ([(b"", b"1")], "context key length 0"),
        ([(b"k" * 65, b"1")], "context key length 65"),
        ([(b"a", b"v" * 257)], "context value length 257"),
        ([(b"a\x00", b"1")], "NUL"),
    ],
)
def test_non_canonical_or_oversize_contexts_are_refused(
    entries: list[tuple[bytes, bytes]], match: str
) -> None:
    with pytest.raises(InvalidFile, match=match):
        ff.read_header(io.BytesIO(header_with(entries) + b"\x00" * 64))


class CountingReader(io.BytesIO):
    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.consumed = 0

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        n = super().readinto(buffer)
        self.consumed += n
        return n


def test_a_hostile_header_is_refused_within_the_header_cap() -> None:
    # Lengths at their caps, then garbage: at most MAX_HEADER_SIZE bytes are read.
    entries = [(bytes([65 + i]) * 64, b"v" * 256) for i in range(16)]
    reader = CountingReader(header_with(entries)[:-1] + b"\xff" * (1 << 20))
    with pytest.raises(InvalidFile):
        ff.read_header(reader)
    assert reader.consumed <= ff.MAX_HEADER_SIZE
    big = b"KBFS\x01\x0c" + b"p" * 7 + b"s" * 32 + b"\xff\xff" + b"\x00" * (1 << 20)
    reader = CountingReader(big)
    with pytest.raises(InvalidFile, match="65535"):
        ff.read_header(reader)
    assert reader.consumed == 47


def test_largest_header_round_trips() -> None:
    ctx = {chr(65 + i) * 64: "v" * 256 for i in range(16)}
    header = ff.new_header(b"KB\x01\x01k" + b"w" * 1019, ctx, ff.MAX_CHUNK_SIZE)
    assert len(header.raw) == ff.MAX_HEADER_SIZE
    assert ff.read_header(io.BytesIO(header.raw)) == header


@pytest.mark.parametrize("size", [0, 2048, 3000, 8191, 1 << 25])
def test_chunk_sizes_outside_the_set_are_refused(size: int) -> None:
    with pytest.raises(ValueError, match="power of two"):
        ff.new_header(wrapped(), CTX, size)


@pytest.mark.parametrize(
    "ctx",
    [
        {f"k{i}": "v" for i in range(17)},
        {"": "v"},
        {"k" * 65: "v"},
        {"k": "v" * 257},
        {"k": "a\x00b"},
    ],
)
def test_contexts_outside_the_broker_limits_are_refused(ctx: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        ff.new_header(wrapped(), ctx)


@pytest.mark.parametrize("blob", [b"", b"KB", b"KB\x02\x01k", b"KB\x01\x00", b"KB\x01\x05ab"])
def test_wrapped_key_id_refuses_what_is_not_a_blob(blob: bytes) -> None:
    with pytest.raises(InvalidFile, match="not a keybroker blob"):
        ff.wrapped_key_id(blob)


def test_wrong_data_key_size_is_refused() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        FileCipher(b"short", ff.new_header(wrapped(), CTX))
