"""The file format as a stream: round trips around chunk boundaries, short reads and writes,
several chunks per read and write (no byte of the file changes, a write holds only
authenticated chunks), and memory that stays flat however large the file (tracemalloc, not
time)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import random
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from keybroker_client import fileformat as ff
from keybroker_client.fileformat import FileCipher

KEY = os.urandom(32)
WRAPPED = b"KB\x01\x08patients" + b"w" * 64


def sizes_near_boundaries(chunk: int) -> st.SearchStrategy[int]:
    near = st.builds(lambda k, d: max(0, k * chunk + d), st.integers(0, 4), st.integers(-2, 2))
    return st.one_of(near, st.integers(0, 5 * chunk))


class Dribble(io.RawIOBase):
    """A reader or writer that moves at most ``step`` bytes per call, like a pipe."""

    def __init__(self, data: bytes = b"", step: int = 1) -> None:
        self.src, self.step, self.pos, self.out = data, step, 0, bytearray()

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        n = min(len(buffer), self.step, len(self.src) - self.pos)
        buffer[:n] = self.src[self.pos : self.pos + n]
        self.pos += n
        return n

    def write(self, data: memoryview) -> int:  # type: ignore[override]
        n = min(len(data), self.step)
        self.out += data[:n]
        return n


@settings(max_examples=60, deadline=None)
@given(
    chunk=st.sampled_from([4096, 8192]).flatmap(
        lambda c: st.tuples(st.just(c), sizes_near_boundaries(c))
    ),
    seed=st.integers(0, 2**32 - 1),
    ctx=st.dictionaries(
        st.text(min_size=1, max_size=8).filter(lambda s: "\0" not in s),
        st.text(max_size=8).filter(lambda s: "\0" not in s),
        max_size=4,
    ),
)
def test_round_trip_around_chunk_boundaries(
    chunk: tuple[int, int], seed: int, ctx: dict[str, str]
) -> None:
    chunk_size, size = chunk
    data = random.Random(seed).randbytes(size)
    header = ff.new_header(WRAPPED, ctx, chunk_size)
    sealed = io.BytesIO()
    assert FileCipher(KEY, header).encrypt(io.BytesIO(data), sealed) == size
    blob = sealed.getvalue()
    full, rest = divmod(size, chunk_size)
    assert len(blob) == len(header.raw) + full * (chunk_size + 16) + rest + 16
    src = io.BytesIO(blob)
    parsed = ff.read_header(src)
    assert parsed == header
    out = io.BytesIO()
    assert FileCipher(KEY, parsed).decrypt(src, out) == size
    assert out.getvalue() == data


@settings(max_examples=25, deadline=None)
@given(size=sizes_near_boundaries(4096), step=st.integers(1, 5000), seed=st.integers(0, 2**16))
def test_short_reads_and_writes(size: int, step: int, seed: int) -> None:
    data = random.Random(seed).randbytes(size)
    header = ff.new_header(WRAPPED, {"dataset": "x"}, 4096)
    sink = Dribble(step=step)
    FileCipher(KEY, header).encrypt(Dribble(data, step), sink)
    src = Dribble(bytes(sink.out), step)
    out = Dribble(step=step)
    FileCipher(KEY, ff.read_header(src)).decrypt(src, out)
    assert bytes(out.out) == data


def test_progress_reports_every_byte() -> None:
    data = os.urandom(3 * 4096 + 5)
    header = ff.new_header(WRAPPED, {}, 4096)
    seen: list[int] = []
    sealed = io.BytesIO()
    FileCipher(KEY, header).encrypt(io.BytesIO(data), sealed, progress=seen.append)
    assert seen == [4096, 4096, 4096, 5]
    seen.clear()
    src = io.BytesIO(sealed.getvalue())
    FileCipher(KEY, ff.read_header(src)).decrypt(src, io.BytesIO(), progress=seen.append)
    assert sum(seen) == len(sealed.getvalue()) - len(header.raw)


@contextlib.contextmanager
def chunks_per_call(n: int) -> Iterator[None]:
    """Reads and writes of ``n`` 4 KiB chunks, so that small files cross many batches."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ff, "IO_SIZE", n * 4096)
        yield


def sealed_with(data: bytes, header: ff.Header, per_call: int) -> bytes:
    out = io.BytesIO()
    with chunks_per_call(per_call):
        FileCipher(KEY, header).encrypt(io.BytesIO(data), out)
    return out.getvalue()


@settings(max_examples=60, deadline=None)
@given(
    size=sizes_near_boundaries(4096),
    per_call=st.integers(1, 4),
    step=st.sampled_from([1 << 30, 1, 4095, 4113, 9000]),
    seed=st.integers(0, 2**16),
)
def test_chunks_per_call_change_no_byte_of_the_file(
    size: int, per_call: int, step: int, seed: int
) -> None:
    data = random.Random(seed).randbytes(size)
    header = ff.new_header(WRAPPED, {"dataset": "x"}, 4096)
    one = sealed_with(data, header, 1)
    assert sealed_with(data, header, per_call) == one
    src, out = Dribble(one, step), io.BytesIO()
    with chunks_per_call(per_call):
        assert FileCipher(KEY, ff.read_header(src)).decrypt(src, out) == size
    assert out.getvalue() == data


class Writes:
    """A writer that keeps each write apart."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data: memoryview) -> int:
        self.writes.append(bytes(data))
        return len(data)


def test_a_write_holds_only_chunks_that_authenticated() -> None:
    data = os.urandom(5 * 4096 + 100)
    header = ff.new_header(WRAPPED, {}, 4096)
    blob = bytearray(sealed_with(data, header, 1))
    blob[len(header.raw) + 3 * 4112 + 7] ^= 1  # chunk 3, the second of the second read
    src, out = io.BytesIO(bytes(blob)), Writes()
    with chunks_per_call(2), pytest.raises(ff.InvalidFile, match="chunk 3"):
        FileCipher(KEY, ff.read_header(src)).decrypt(src, out)
    # Chunk 2 authenticated, but it shares its write with chunk 3: only chunks 0 and 1 went out.
    assert out.writes == [data[: 2 * 4096]]


@pytest.mark.parametrize("per_call", [1, 2, 4])
def test_a_file_cut_where_a_read_ends_is_refused(per_call: int) -> None:
    data = os.urandom(4 * 4096)
    header = ff.new_header(WRAPPED, {}, 4096)
    blob = sealed_with(data, header, per_call)
    body = len(header.raw) + 4 * 4112  # four full chunks; the empty final chunk cut off
    for cut, match in ((body, r"truncated: it ends before its final chunk \(4\)"), (-1, "4")):
        src = io.BytesIO(blob[:cut])
        with chunks_per_call(per_call), pytest.raises(ff.InvalidFile, match=match):
            FileCipher(KEY, ff.read_header(src)).decrypt(src, io.BytesIO())
    for extra in (b"\0", blob[len(header.raw) : len(header.raw) + 4112]):
        src = io.BytesIO(blob + extra)
        with chunks_per_call(per_call), pytest.raises(ff.InvalidFile):
            FileCipher(KEY, ff.read_header(src)).decrypt(src, io.BytesIO())


STREAM_SIZE = 256 << 20


class Generated:
    """A 256 MiB plaintext made on the fly: each chunk stamped with its index, never stored."""

    def __init__(self, size: int) -> None:
        self.left, self.index, self.digest = size, 0, hashlib.sha256()

    def readinto(self, buffer: memoryview) -> int:
        n = min(len(buffer), self.left)
        stamp = self.index.to_bytes(8, "big") * 16
        buffer[: min(n, len(stamp))] = stamp[:n]
        self.digest.update(buffer[:n])
        self.left -= n
        self.index += 1
        return n


class Digest:
    """A writer that keeps only a hash and a count."""

    def __init__(self) -> None:
        self.digest, self.size = hashlib.sha256(), 0

    def write(self, data: memoryview) -> int:
        self.digest.update(data)
        self.size += len(data)
        return len(data)


def peak_bytes(run: object) -> int:
    assert callable(run)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        run()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_stays_flat_on_a_256_mib_stream(tmp_path: Path) -> None:
    chunk = ff.DEFAULT_CHUNK_SIZE
    header = ff.new_header(WRAPPED, {"dataset": "cohort-42"}, chunk)
    source = Generated(STREAM_SIZE)
    sealed_path = tmp_path / "big.kbf"
    with open(sealed_path, "wb") as sink:
        peak = peak_bytes(lambda: FileCipher(KEY, header).encrypt(source, sink))
    assert source.left == 0
    assert (
        sealed_path.stat().st_size
        == len(header.raw) + STREAM_SIZE + (STREAM_SIZE // chunk + 1) * 16
    )
    # Two buffers of IO_SIZE (the chunks of one read, plaintext and sealed), whatever the size.
    limit = 2 * ff.IO_SIZE + 4 * chunk
    assert peak < limit, f"encrypting 256 MiB peaked at {peak} bytes"

    result = Digest()
    with open(sealed_path, "rb", buffering=0) as src:

        def run() -> None:
            FileCipher(KEY, ff.read_header(src)).decrypt(src, result)

        peak = peak_bytes(run)
    assert result.size == STREAM_SIZE
    assert result.digest.digest() == source.digest.digest()
    assert peak < limit, f"decrypting 256 MiB peaked at {peak} bytes"
